"""The typed rows: `JobRecord`, `RunRecord`, what a claim took (`Claim`) and what a sync did (`JobSync`), their
conversion from rows, and the row values a `JobDefinition` is stored as (and what storing it over a row
changes). No SQL statements here (see `statements`)."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Row

from . import timing
from .job import JobDefinition, JobStatus
from .policy import JobPolicy, backoff_of, delta_of, seconds_of
from .schedules import Schedule, schedule_from_spec
from .states import InterruptReason, JobKind, Origin, RunState

# A job's `every` (its interval when it has no schedule) is stored in this column, named for Boundary's
# "default next run in"; these records are the one place that maps the two.
EVERY_COLUMN = "default_next_run_in"
# An operator's edits (the dashboard's edit action), by column: {"column": {"code": value, "edited": value}},
# JSON text; NULL: none. A sync stores the code's values with the edited ones over them (`synced_values`).
OVERRIDES_COLUMN = "overrides"


@dataclass(frozen=True)
class JobRecord:
    name: str
    description: str
    next_scheduled_run: dt.datetime
    every: dt.timedelta | None
    queue: str | None
    interrupt_threshold: dt.timedelta | None
    failure_count: int
    create_time: dt.datetime
    update_time: dt.datetime
    kind: JobKind = JobKind.JOB
    schedule: Schedule | None = None
    task: str | None = None
    task_args: tuple[Any, ...] = ()
    task_kwargs: dict[str, Any] = field(default_factory=dict)
    task_options: dict[str, Any] = field(default_factory=dict)
    policy: JobPolicy = field(default_factory=JobPolicy)
    paused: bool = False
    active_runs: int = 0  # queued or running runs holding a slot (kept by the database)
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # an operator's edits, by column
    origin: Origin = Origin.CODE  # who owns it: code, beat_schedule or runtime
    one_off: bool = False  # disabled once a run of it is claimed
    expire_time: dt.datetime | None = None  # no slot after it is claimed

    @classmethod
    def from_row(cls, row: Row[Any]) -> JobRecord:
        m = row._mapping
        return cls(
            name=m["name"],
            description=m["description"],
            next_scheduled_run=m["next_scheduled_run"],
            every=delta_of(m[EVERY_COLUMN]),
            queue=m["queue"],
            interrupt_threshold=delta_of(m["interrupt_threshold"]),
            failure_count=m["failure_count"],
            create_time=m["create_time"],
            update_time=m["update_time"],
            kind=JobKind(m["kind"]),
            schedule=schedule_from_spec(m["schedule"]) if m["schedule"] else None,
            task=m["task"],
            task_args=tuple(json.loads(m["task_args"])) if m["task_args"] else (),
            task_kwargs=json.loads(m["task_kwargs"]) if m["task_kwargs"] else {},
            task_options=json.loads(m["task_options"]) if m["task_options"] else {},
            policy=JobPolicy.from_columns(m),
            paused=bool(m["paused"]),
            active_runs=m["active_runs"],
            overrides=overrides_of(m[OVERRIDES_COLUMN]),
            origin=Origin(m["origin"]),
            one_off=bool(m["one_off"]),
            expire_time=m["expire_time"],
        )

    @property
    def edited_fields(self) -> list[str]:
        """The fields an operator edited on the dashboard, which override the code's declaration."""
        return sorted(self.overrides_by_field())

    def overrides_by_field(self) -> dict[str, dict[str, Any]]:
        """An operator's edits, by field: the code's value and the edited one, as the columns store them (JSON)."""
        return {field_of(column): dict(edit) for column, edit in sorted(self.overrides.items())}

    @property
    def advances_at_claim(self) -> bool:
        return timing.advances_at_claim(self.kind, self.policy.max_active)

    @property
    def cadence(self) -> Schedule | None:
        return timing.cadence(self.schedule, self.every)

    @property
    def message_options(self) -> dict[str, Any]:
        """The options a plain task's message is sent with: its stored options, and its `expire_time` as the
        message's `expires` (an absolute time, as django-celery-beat sends its `expires`)."""
        if self.expire_time is None:
            return self.task_options
        return {**self.task_options, "expires": self.expire_time.isoformat()}

    def passes_expiry(self, slot: dt.datetime) -> bool:
        """A slot after the job's `expire_time`: the job is disabled rather than moved there."""
        return self.expire_time is not None and slot > self.expire_time

    def next_slot(self, now: dt.datetime, anchor: dt.datetime | None) -> dt.datetime | None:
        """The job's next slot after `now` on its cadence (None when it has no schedule)."""
        return timing.next_slot(self.cadence, now, anchor)


def definition_values(definition: JobDefinition) -> dict[str, Any]:
    return {
        "description": definition.description,
        "kind": definition.kind,
        "schedule": definition.schedule.to_json() if definition.schedule is not None else None,
        EVERY_COLUMN: seconds_of(definition.every),
        "queue": definition.queue,
        "interrupt_threshold": seconds_of(definition.interrupt_threshold),
        **definition.policy.columns(),
        "task": definition.task,
        "task_args": json.dumps(list(definition.task_args)) if definition.kind == JobKind.TASK else None,
        "task_kwargs": json.dumps(dict(definition.task_kwargs)) if definition.kind == JobKind.TASK else None,
        "task_options": json.dumps(dict(definition.task_options)) if definition.kind == JobKind.TASK else None,
        "origin": definition.origin,
        "one_off": definition.one_off,
        "expire_time": definition.expire_time,
    }


def field_of(column: str) -> str:
    """The `JobDefinition` (or `JobPolicy`) field a job column stores."""
    return "every" if column == EVERY_COLUMN else column


def overrides_of(text: str | None) -> dict[str, dict[str, Any]]:
    loaded: dict[str, dict[str, Any]] = json.loads(text) if text else {}
    return loaded


def _overrides_text(overrides: Mapping[str, Mapping[str, Any]]) -> str | None:
    return json.dumps(overrides, sort_keys=True) if overrides else None


def synced_values(row: Row[Any], values: Mapping[str, Any]) -> Mapping[str, Any]:
    """What a sync of the code's `values` stores over `row`: those values with the operator's edits over them,
    and the edits' record of the code's values brought up to date (for "revert to code")."""
    overrides = overrides_of(row._mapping[OVERRIDES_COLUMN])
    if not overrides:
        return values
    kept = {column: {"code": values[column], "edited": edit["edited"]} for column, edit in overrides.items()}
    edited = {column: edit["edited"] for column, edit in kept.items()}
    return {**values, **edited, OVERRIDES_COLUMN: _overrides_text(kept)}


def edited_values(row: Row[Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """What an operator's edit (the job's `values` with the edited fields) stores over `row`: the values, and
    each column it changes recorded as an override of the code's value (an edit back to the code's value
    drops that override)."""
    stored = row._mapping
    overrides = overrides_of(stored[OVERRIDES_COLUMN])
    for column, value in values.items():
        if stored[column] == value:
            continue
        code = overrides[column]["code"] if column in overrides else stored[column]
        if value == code:
            overrides.pop(column, None)
        else:
            overrides[column] = {"code": code, "edited": value}
    return {**values, OVERRIDES_COLUMN: _overrides_text(overrides)}


def reverted_values(row: Row[Any]) -> dict[str, Any]:
    """The code's values of the columns an operator edited, and no overrides: "revert to code"."""
    overrides = overrides_of(row._mapping[OVERRIDES_COLUMN])
    return {**{column: edit["code"] for column, edit in overrides.items()}, OVERRIDES_COLUMN: None}


def _differs(row: Row[Any], values: Mapping[str, Any]) -> bool:
    stored = row._mapping
    return any(stored[key] != value for key, value in values.items())


def changes(row: Row[Any], values: Mapping[str, Any], now: dt.datetime) -> dict[str, Any]:
    """What storing `values` (`definition_values`, through `synced_values`, `edited_values`, `reverted_values`)
    over the stored `row` changes (with `update_time`), or {}: its settings, and its next run only when its
    schedule changed (the new schedule's next slot) or it is enabled again after being disabled (its next slot
    after now, so it does not fire at once for the time it was off)."""
    if not _differs(row, values):
        return {}
    current = JobRecord.from_row(row)
    updates = dict(values)
    nsr = current.next_scheduled_run
    spec = values.get("schedule", row._mapping["schedule"])
    schedule = schedule_from_spec(spec) if spec else None
    enabled = values.get("enabled", current.policy.enabled)
    if schedule != current.schedule and schedule is not None:
        nsr = schedule.next_after(now)
    elif enabled and not current.policy.enabled:
        nsr = timing.resume_at(current.cadence, nsr, now)
    if nsr != current.next_scheduled_run:
        updates["next_scheduled_run"] = nsr
    changed = {key: value for key, value in updates.items() if row._mapping[key] != value}
    if changed:
        changed["update_time"] = now
    return changed


@dataclass(frozen=True)
class RuntimeEntry:
    """What a runtime schedule stores (`celery_dbsched.runtime`): its definition (origin runtime), and when it
    may first run: not before `start_time`, and (an importer's) the first slot after `last_run_at`."""

    definition: JobDefinition
    start_time: dt.datetime | None = None
    last_run_at: dt.datetime | None = None

    @property
    def name(self) -> str:
        return self.definition.name

    def first_run(self, now: dt.datetime) -> dt.datetime:
        """Its next run when it is created at `now` (`timing.runtime_first_run`)."""
        assert self.definition.schedule is not None
        return timing.runtime_first_run(
            self.definition.schedule, now, start_time=self.start_time, last_run_at=self.last_run_at
        )

    def values(self, first: dt.datetime) -> dict[str, Any]:
        """Its column values when created with first run `first`: disabled at once when that is past its
        `expire_time` (django-celery-beat disables an expired task the same way)."""
        values = definition_values(self.definition)
        if self.definition.expire_time is not None and first > self.definition.expire_time:
            values["enabled"] = False
        return values


def runtime_changes(row: Row[Any], entry: RuntimeEntry, now: dt.datetime, *, timing_given: bool) -> dict[str, Any]:
    """What storing a runtime `entry` over its stored `row` changes (with `update_time`), or {}: its settings;
    its next run only when its schedule changed (the new schedule's next slot, `timing.rescheduled`), when it is
    enabled again (its next slot after now), or with `timing_given` when a `start_time` or `last_run_at` is given
    (as when it is created); disabled when that next run is past its `expire_time`. Editing only args, kwargs,
    options, description or policies leaves the next run alone."""
    current = JobRecord.from_row(row)
    definition = entry.definition
    values = definition_values(definition)
    updates = {**values, **changes(row, values, now)}
    updates.pop("update_time", None)
    schedule = definition.schedule
    assert schedule is not None
    nsr: dt.datetime = updates.get("next_scheduled_run", current.next_scheduled_run)
    if timing_given and entry.last_run_at is not None:
        nsr = entry.first_run(now)
    elif schedule != current.schedule:
        nsr = timing.rescheduled(schedule, now, entry.start_time)
    elif timing_given and entry.start_time is not None and nsr < entry.start_time:
        nsr = schedule.first_slot(entry.start_time)
    updates["next_scheduled_run"] = nsr
    if updates["enabled"] and definition.expire_time is not None and nsr > definition.expire_time:
        updates["enabled"] = False
    changed = {key: value for key, value in updates.items() if row._mapping[key] != value}
    if changed:
        changed["update_time"] = now
    return changed


@dataclass(frozen=True)
class PutResult:
    """What `put_schedules` did (or, with `dry_run`, would do), names in the order given: created, updated,
    left as they were, and refused with the reason (a name owned by code or beat_schedule, a bad entry)."""

    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)
    dry_run: bool = False


@dataclass(frozen=True)
class ClaimStats:
    """What a beat claimed over the last minute: how many runs, and their claim lag (claimed at minus the slot
    each was claimed for) in seconds, median and maximum (None: nothing claimed). Written with its heartbeat."""

    count: int = 0
    lag_p50: float | None = None
    lag_max: float | None = None


@dataclass(frozen=True)
class JobSync:
    """What `JobRepository.sync_jobs` did (names sorted); `unchanged`: nothing to do, found in one read."""

    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    disabled: list[str] = field(default_factory=list)
    unchanged: bool = False
    refused: list[str] = field(default_factory=list)  # declared names a runtime job owns: left alone


@dataclass(frozen=True)
class SyncPlan:
    new: list[str]
    candidates: list[str]  # stored, and differing in some setting
    missing: list[str]  # enabled jobs of the synced origin that are no longer declared
    refused: list[str] = field(default_factory=list)  # declared, but the stored job is a runtime one

    @property
    def pending(self) -> bool:
        return bool(self.new or self.candidates or self.missing)


def owned_by_runtime(row: Row[Any], definition: JobDefinition) -> bool:
    """A declared job (code, beat_schedule) whose name a runtime job holds: a sync leaves that job alone."""
    return bool(row._mapping["origin"] == Origin.RUNTIME and definition.origin != Origin.RUNTIME)


def plan_sync(
    rows: Mapping[str, Row[Any]],
    wanted: Mapping[str, JobDefinition],
    values: Mapping[str, Mapping[str, Any]],
    origin: Origin | None,
) -> SyncPlan:
    """What a sync of `wanted` does over the stored `rows`; `origin`: the jobs of that origin no longer declared
    are disabled (a sync never disables, nor writes over, a job of another origin)."""
    new = [name for name in wanted if name not in rows]
    refused = sorted(name for name, row in rows.items() if name in wanted and owned_by_runtime(row, wanted[name]))
    candidates = [
        name
        for name, row in rows.items()
        if name in wanted and name not in refused and _differs(row, synced_values(row, values[name]))
    ]
    missing = (
        [] if origin is None else [n for n, r in rows.items() if n not in wanted and r.origin == origin and r.enabled]
    )
    return SyncPlan(new, sorted(candidates), sorted(missing), refused)


def _utc(when: dt.datetime) -> str:
    return when.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


@dataclass(frozen=True)
class RunRecord:
    id: int
    job_name: str
    status: RunState
    queue: str | None
    claimed_by: str
    worker: str | None
    task_id: str | None
    completed: int
    total: int
    error: str | None
    requested_next_run: dt.datetime | None
    create_time: dt.datetime
    start_time: dt.datetime | None
    update_time: dt.datetime
    end_time: dt.datetime | None
    kind: JobKind = JobKind.JOB
    slot: int = 0
    scheduled_for: dt.datetime | None = None
    interrupt_reason: InterruptReason | None = None  # why, when `interrupted`

    @classmethod
    def from_row(cls, row: Row[Any]) -> RunRecord:
        m = row._mapping  # a new mapping object at each access
        values = {name: m[name] for name in cls.__dataclass_fields__}
        values["status"] = RunState(values["status"])
        values["kind"] = JobKind(values["kind"])
        reason = values["interrupt_reason"]
        values["interrupt_reason"] = None if reason is None else InterruptReason(reason)
        return cls(**values)

    @property
    def progress(self) -> JobStatus:
        return JobStatus(self.completed, self.total)

    def label(self) -> str:
        """How log lines name a run: its id, job and slot."""
        slot = "" if self.scheduled_for is None else f" (slot {_utc(self.scheduled_for)})"
        return f"run {self.id} of job {self.job_name!r}{slot}"


@dataclass(frozen=True)
class Claim:
    """What one claim took: its runs (by id) and, read in the same transaction, the jobs of those that advance
    at claim (plain tasks, `max_active` > 1), by name."""

    runs: list[RunRecord]
    jobs: dict[str, JobRecord]


@dataclass(frozen=True)
class StartedRun:
    """A run this repository started, with what its finish needs: the job's cadence as the start statement
    read it, and the start by this host's monotonic clock and the repository's clock `key` (to tell the
    database's time at the finish within a second)."""

    run: RunRecord
    schedule: str | None
    every: float | None  # seconds
    kind: JobKind
    max_active: int
    retry_backoff_base: float | None
    retry_backoff_cap: float | None
    failure_count: int
    monotonic: float
    clock_key: Hashable

    @classmethod
    def from_row(cls, row: Row[Any], *, monotonic: float, clock_key: Hashable) -> StartedRun:
        """From a row of the start statement (`statements.start`): the run, and the job's facts as `job_*`."""
        m = row._mapping
        return cls(
            run=RunRecord.from_row(row),
            schedule=m["job_schedule"],
            every=m[f"job_{EVERY_COLUMN}"],
            kind=JobKind(m["job_kind"]),
            max_active=m["job_max_active"],
            retry_backoff_base=m["job_retry_backoff_base"],
            retry_backoff_cap=m["job_retry_backoff_cap"],
            failure_count=m["job_failure_count"],
            monotonic=monotonic,
            clock_key=clock_key,
        )

    def column(self, name: str) -> Any:
        """A fact of the job as the start statement read it, by its column name."""
        return self.every if name == EVERY_COLUMN else getattr(self, name)

    @property
    def advances_at_claim(self) -> bool:
        return timing.advances_at_claim(self.kind, self.max_active)

    @property
    def cadence(self) -> Schedule | None:
        return timing.cadence(schedule_from_spec(self.schedule) if self.schedule else None, delta_of(self.every))

    @property
    def retry_backoff(self) -> tuple[dt.timedelta, dt.timedelta] | None:
        """The job's own backoff (None: the repository's)."""
        return backoff_of(self.retry_backoff_base, self.retry_backoff_cap)


# -- what `dbsched watch` shows (issue 12 §2) -------------------------------------------------------------------


def definition_of(job: JobRecord, **replaced: Any) -> JobDefinition:
    """The definition a stored job was registered with, with `replaced` fields (an operator's edit)."""
    values: dict[str, Any] = {
        "name": job.name,
        "description": job.description,
        "kind": job.kind,
        "schedule": job.schedule,
        "every": job.every,
        "queue": job.queue,
        "interrupt_threshold": job.interrupt_threshold,
        "policy": job.policy,
        "task": job.task,
        "task_args": job.task_args,
        "task_kwargs": job.task_kwargs,
        "task_options": job.task_options,
        "origin": job.origin,
        "one_off": job.one_off,
        "expire_time": job.expire_time,
    }
    values.update(replaced)
    return JobDefinition(**values)


@dataclass(frozen=True)
class RunSummary:
    """A run without its error or progress: what a job's recent history (outcome, sparkline) needs."""

    id: int
    job_name: str
    status: RunState
    create_time: dt.datetime
    start_time: dt.datetime | None
    end_time: dt.datetime | None

    @classmethod
    def from_row(cls, row: Row[Any]) -> RunSummary:
        m = row._mapping
        return cls(m["id"], m["job_name"], RunState(m["status"]), m["create_time"], m["start_time"], m["end_time"])

    @property
    def duration(self) -> dt.timedelta | None:
        """How long it ran (None: not started, or not ended)."""
        return None if self.start_time is None or self.end_time is None else self.end_time - self.start_time


@dataclass(frozen=True)
class RunsPage:
    """A page of run history, newest first, and the `before` of the next page (None: no older runs)."""

    runs: list[RunRecord]
    next_before: int | None


@dataclass(frozen=True)
class WatchRun:
    """An active run and the threshold past which, without progress, it counts as stalled."""

    run: RunRecord
    interrupt_threshold: dt.timedelta

    def stalled_for(self, now: dt.datetime) -> dt.timedelta | None:
        """How long it has gone without progress, when that is past its threshold (else None). A running plain
        task reports no progress: its liveness is its worker's (the fleet line), as for the stall check."""
        if self.run.kind == JobKind.TASK and self.run.status == RunState.RUNNING:
            return None
        quiet = now - self.run.update_time
        return quiet if quiet > self.interrupt_threshold else None


@dataclass(frozen=True)
class WatchFrame:
    """One refresh of `dbsched watch`, read in one transaction: the database's time, the server rows (as
    `statements.servers` reads them: `observe.Fleet.of` makes them the fleet), the oldest active runs
    (`more_active`: there are more than those), the latest ended runs (newest first)."""

    now: dt.datetime
    servers: list[Row[Any]]
    active: list[WatchRun]
    more_active: bool
    recent: list[RunRecord]
