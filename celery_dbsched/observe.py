"""What the scheduler is doing: the read model behind `dbsched status` (and the web page, metrics and watch).

Each function reads one thing through the repository, with bounded statements (index ranges, LIMITs, counts
over LIMITed subqueries: never a count over the runs table), and returns a dataclass whose `.as_json()` is the
stable, documented shape (README, "Status and health"). Times are the database's, as ISO 8601 UTC strings in
JSON; durations are seconds.

- `fleet`: the beats and workers, alive or silent since when (`Server`).
- `due_backlog`: jobs due but not claimed, and how late the earliest is (`DueBacklog`).
- `active_runs`, `stalled_runs`, `recent_failures`: runs, counted and listed (`RunList`).
- `status`: all of it, plus the orphaned jobs, and `Status.problems(max_lag)`: why it is unhealthy.
- `run_json`, `job_json`: one run, one job, as the JSON of `dbsched runs/run/jobs --json`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Row

from .display import duration, schedule
from .records import JobRecord, RunRecord
from .repository import SERVER_LIMIT, JobRepository
from .states import ACTIVE

COUNT_CAP = 10_000  # counts stop there ("capped": at least that many): a count never scans without a bound
LIST_LIMIT = 10  # runs listed per section of the status
SILENT_AFTER = 3  # heartbeats missed before a server counts as silent
DEFAULT_HEARTBEAT = 30.0  # seconds, for a row written before revision 0007 (no interval recorded)
FAILURE_WINDOW = dt.timedelta(hours=1)


def _time(value: dt.datetime | None) -> str | None:
    return None if value is None else value.astimezone(dt.timezone.utc).isoformat()


@dataclass(frozen=True)
class Server:
    """A beat's or worker's row: alive while it wrote a heartbeat within three of its intervals."""

    id: str
    role: str  # "beat" or "worker"
    host: str
    pid: int
    version: str | None
    started: dt.datetime
    last_seen: dt.datetime
    heartbeat_interval: float | None
    alive: bool
    silent_for: float  # seconds since its last heartbeat
    claims_last_minute: int | None = None  # beats
    claim_lag_p50: float | None = None  # beats, seconds
    claim_lag_max: float | None = None  # beats, seconds
    runs_in_flight: int | None = None  # workers

    @classmethod
    def from_row(cls, row: Row[Any], now: dt.datetime) -> Server:
        interval = row.heartbeat_interval
        silent = max(0.0, (now - row.last_seen).total_seconds())
        return cls(
            id=row.id,
            role=row.kind,
            host=row.hostname,
            pid=row.pid,
            version=row.version,
            started=row.start_time,
            last_seen=row.last_seen,
            heartbeat_interval=interval,
            alive=silent <= SILENT_AFTER * (interval or DEFAULT_HEARTBEAT),
            silent_for=silent,
            claims_last_minute=row.claims_last_minute,
            claim_lag_p50=row.claim_lag_p50,
            claim_lag_max=row.claim_lag_max,
            runs_in_flight=row.runs_in_flight,
        )

    def as_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": self.id,
            "role": self.role,
            "host": self.host,
            "pid": self.pid,
            "version": self.version,
            "started": _time(self.started),
            "last_seen": _time(self.last_seen),
            "heartbeat_interval": self.heartbeat_interval,
            "alive": self.alive,
            "silent_for": round(self.silent_for, 3),
        }
        if self.role == "beat":
            data.update(
                last_tick=_time(self.last_seen),
                claims_last_minute=self.claims_last_minute,
                claim_lag_p50=self.claim_lag_p50,
                claim_lag_max=self.claim_lag_max,
            )
        else:
            data["runs_in_flight"] = self.runs_in_flight
        return data


@dataclass(frozen=True)
class Fleet:
    servers: list[Server]

    @property
    def beats(self) -> list[Server]:
        return [server for server in self.servers if server.role == "beat"]

    @property
    def workers(self) -> list[Server]:
        return [server for server in self.servers if server.role != "beat"]

    @classmethod
    def of(cls, rows: Sequence[Row[Any]], now: dt.datetime) -> Fleet:
        """The fleet of server rows read (`statements.servers`) at the database's time `now`."""
        return cls([Server.from_row(row, now) for row in rows])

    def as_json(self) -> dict[str, Any]:
        return {
            "beats": [server.as_json() for server in self.beats],
            "workers": [server.as_json() for server in self.workers],
        }


def fleet(repository: JobRepository) -> Fleet:
    """Every server row (beats first, latest seen first), with whether it is alive by the database's clock."""
    return Fleet.of(*repository.server_rows(SERVER_LIMIT))


@dataclass(frozen=True)
class DueBacklog:
    """The enabled, unpaused jobs with a free slot that are due now: a beat claims them within its tick; many,
    or a late earliest one, means no beat is claiming (or they cannot keep up)."""

    count: int
    capped: bool  # more than COUNT_CAP: `count` is COUNT_CAP
    earliest_job: str | None  # the claimable job due first (due now or later)
    earliest_due: dt.datetime | None
    now: dt.datetime

    @property
    def lateness(self) -> float:
        """Seconds the earliest due job has waited (0 when none is due)."""
        if self.earliest_due is None:
            return 0.0
        return max(0.0, (self.now - self.earliest_due).total_seconds())

    def as_json(self) -> dict[str, Any]:
        late = self.count > 0
        return {
            "count": self.count,
            "capped": self.capped,
            "oldest_job": self.earliest_job if late else None,
            "oldest_due": _time(self.earliest_due) if late else None,
            "oldest_lateness": round(self.lateness, 3) if late else None,
        }


def due_backlog(repository: JobRepository) -> DueBacklog:
    count, earliest, name, now = repository.due_backlog(COUNT_CAP)
    return DueBacklog(min(count, COUNT_CAP), count > COUNT_CAP, name, earliest, now)


@dataclass(frozen=True)
class RunList:
    """A set of runs: how many (up to COUNT_CAP), and the first few of them."""

    count: int
    capped: bool
    runs: list[RunRecord] = field(default_factory=list)

    @classmethod
    def of(cls, counted: tuple[int, list[RunRecord]]) -> RunList:
        count, runs = counted
        return cls(min(count, COUNT_CAP), count > COUNT_CAP, runs)

    def as_json(self, now: dt.datetime | None = None) -> dict[str, Any]:
        return {"count": self.count, "capped": self.capped, "runs": [run_json(run, now) for run in self.runs]}


def active_runs(repository: JobRepository, limit: int = LIST_LIMIT) -> RunList:
    """Queued and running runs, the latest claimed first."""
    return RunList.of(repository.active_runs(COUNT_CAP, limit))


def active_by_status(repository: JobRepository) -> dict[str, int]:
    """How many runs are queued and how many running (every active status, 0 when none): through the partial
    index of active runs, as many rows as runs in flight."""
    counted = repository.active_by_status()
    return {str(state): counted.get(str(state), 0) for state in ACTIVE}


def stalled_runs(repository: JobRepository, limit: int = LIST_LIMIT) -> RunList:
    """Active runs without progress for their interrupt threshold that no beat's monitor has interrupted yet
    (a beat interrupts them within its monitor interval: many here means no beat is running its monitor)."""
    return RunList.of(repository.stalled_runs(COUNT_CAP, limit))


def recent_failures(
    repository: JobRepository, since: dt.timedelta = FAILURE_WINDOW, limit: int = LIST_LIMIT
) -> RunList:
    """Runs that ended `failed`, or `interrupted` stalled or expired, within `since`, latest first."""
    return RunList.of(repository.failures_since(since, COUNT_CAP, limit))


@dataclass(frozen=True)
class Status:
    """One screen of what the scheduler is doing (`dbsched status`)."""

    now: dt.datetime
    fleet: Fleet
    due: DueBacklog
    active: RunList
    stalled: RunList
    failures: RunList  # in the last hour
    orphaned: dict[str, dt.datetime | None]  # job name: when a worker last registered it

    def problems(self, max_lag: dt.timedelta | None) -> list[str]:
        """Why the scheduler is unhealthy, one line each: no beat alive, or (with `max_lag`) a due job that
        has waited longer. Empty: healthy."""
        found = []
        if not any(beat.alive for beat in self.fleet.beats):
            found.append(no_beat_alive(self.fleet.beats))
        if max_lag is not None and self.due.count and self.due.lateness > max_lag.total_seconds():
            found.append(
                f"job {self.due.earliest_job!r} has been due for {duration(self.due.lateness)}, longer than "
                f"--max-lag {duration(max_lag)} ({self.due.count}{'+' if self.due.capped else ''} job(s) due "
                "and not claimed): the beats do not keep up, or cannot reach the database or the broker"
            )
        return found

    def as_json(self, max_lag: dt.timedelta | None = None) -> dict[str, Any]:
        problems = self.problems(max_lag)
        return {
            "now": _time(self.now),
            "healthy": not problems,
            "problems": problems,
            **self.fleet.as_json(),
            "due": self.due.as_json(),
            "active": self.active.as_json(self.now),
            "stalled": self.stalled.as_json(self.now),
            "failures_last_hour": self.failures.as_json(self.now),
            "orphaned_jobs": [
                {"name": name, "registered": _time(when)} for name, when in sorted(self.orphaned.items())
            ],
        }


def no_beat_alive(beats: list[Server]) -> str:
    """The reason `status` gives when no beat is alive."""
    start = "start one: celery -A proj beat -S celery_dbsched.Scheduler"
    if not beats:
        return f"no beat is alive: no beat has written a heartbeat (or its row was pruned); {start}"
    last = min(beats, key=lambda beat: beat.silent_for)
    return f"no beat is alive: the last one seen, {last.id}, has been silent for {duration(last.silent_for)}; {start}"


def status(repository: JobRepository, limit: int = LIST_LIMIT) -> Status:
    """Everything `dbsched status` shows: a handful of bounded reads."""
    due = due_backlog(repository)
    return Status(
        now=due.now,
        fleet=fleet(repository),
        due=due,
        active=active_runs(repository, limit),
        stalled=stalled_runs(repository, limit),
        failures=recent_failures(repository, limit=limit),
        orphaned=repository.orphaned_jobs(),
    )


# -- one run, one job ------------------------------------------------------------------------------------------


def run_json(run: RunRecord, now: dt.datetime | None = None) -> dict[str, Any]:
    """A run as JSON: its fields, times as ISO 8601 UTC, `duration` in seconds (start to end, or to `now` while
    it runs; None before it starts)."""
    end = run.end_time or now
    return {
        "id": run.id,
        "job": run.job_name,
        "kind": str(run.kind),
        "status": str(run.status),
        "interrupt_reason": None if run.interrupt_reason is None else str(run.interrupt_reason),
        "completed": run.completed,
        "total": run.total,
        "scheduled_for": _time(run.scheduled_for),
        "claimed": _time(run.create_time),
        "started": _time(run.start_time),
        "updated": _time(run.update_time),
        "ended": _time(run.end_time),
        "duration": None if run.start_time is None or end is None else (end - run.start_time).total_seconds(),
        "claimed_by": run.claimed_by,
        "worker": run.worker,
        "queue": run.queue,
        "task_id": run.task_id,
        "slot": run.slot,
        "error": run.error,
    }


def job_json(job: JobRecord, state: str, last_run: RunRecord | None, now: dt.datetime) -> dict[str, Any]:
    """A job as JSON: `state` as `dbsched jobs` shows it (enabled, paused, disabled, orphaned, unknown-task),
    its schedule in words, its next run, and its latest run (`run_json`, or None)."""
    return {
        "name": job.name,
        "kind": str(job.kind),
        "origin": str(job.origin),  # code, beat_schedule or runtime
        "state": state,
        "description": job.description,
        "schedule": schedule(job),
        "next_run": _time(job.next_scheduled_run),
        "due": job.next_scheduled_run <= now,
        "queue": job.queue,
        "task": job.task,
        "failure_count": job.failure_count,
        "active_runs": job.active_runs,
        "max_active": job.policy.max_active,
        "last_run": None if last_run is None else run_json(last_run, now),
        "overrides": job.overrides_by_field(),  # an operator's edits on the dashboard ({}: none)
        "one_off": job.one_off,
        "expire_time": None if job.expire_time is None else _time(job.expire_time),
    }
