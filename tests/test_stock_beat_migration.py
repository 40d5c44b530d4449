"""Issue 3, end to end: a project that runs under stock Celery beat switches to `celery_dbsched.Scheduler`.

`migration_app` is a plain Celery project (interval, crontab and solar entries; its tasks append what ran to a
file). It first runs under stock `celery beat` (PersistentScheduler); then only `beat_scheduler` changes and
two beats share one database while the worker stays as it was. Then the worker side is enabled with one line
(`imports = ["celery_dbsched.tracking"]`): runs are tracked to `completed`/`failed`, and a tracked run whose
worker is SIGKILLed ends `interrupted` through worker liveness.

Real processes: the filesystem broker + SQLite (the database is the scheduler's default file in the processes'
working directory: nothing but `beat_scheduler` is set), and PostgreSQL + RabbitMQ for the basic switch.
"""

from __future__ import annotations

import datetime as dt
import json
import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from celery.schedules import solar
from helpers.polling import wait_for
from helpers.processes import CeleryProcess, Processes
from helpers.services import RABBITMQ_URL, Broker, Database, cleanup_queue, require_service

from celery_dbsched.errors import DbschedError
from celery_dbsched.records import RunRecord
from celery_dbsched.repository import JobRepository
from celery_dbsched.schedules import CrontabSchedule
from celery_dbsched.transport import filesystem_broker_settings

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

UTC = dt.timezone.utc
APP = "migration_app"
DBSCHED = {"beat_scheduler": "celery_dbsched.Scheduler"}
TRACKING = {"imports": ["celery_dbsched.tracking"]}
# Tiny liveness settings for the tracking tests (beat monitor and worker heartbeat).
LIVENESS = {"dbsched_monitor_interval": 0.5, "dbsched_interrupt_threshold": 3}


class Project:
    """The environment of one migration: broker, events file, database, and the processes run on them."""

    def __init__(self, processes: Processes, broker: dict[str, Any], database_url: str | None) -> None:
        self.processes = processes
        self.events_path = processes.folder / "events.jsonl"
        self.broker = broker
        # None: the scheduler's default, a SQLite file in the processes' working directory.
        self.database_url = database_url or f"sqlite:///{processes.cwd / 'celery_dbsched.sqlite3'}"
        self._set_url = database_url is not None
        self._repository: JobRepository | None = None

    def env(self, settings: dict[str, Any] | None = None, entries: dict[str, Any] | None = None) -> dict[str, str]:
        settings = dict(settings or {})
        if self._set_url and ("beat_scheduler" in settings or "imports" in settings):
            settings["dbsched_database_url"] = self.database_url
        return {
            "MIG_BROKER": json.dumps(self.broker),
            "MIG_SETTINGS": json.dumps(settings),
            "MIG_ENTRIES": json.dumps(entries or {}),
            "MIG_EVENTS": str(self.events_path),
        }

    def worker(self, settings: dict[str, Any] | None = None, **kwargs: Any) -> CeleryProcess:
        worker = self.processes.start_worker(APP, env=self.env(settings), **kwargs)
        worker.wait_ready(timeout=120)
        return worker

    def beat(
        self, settings: dict[str, Any] | None = None, entries: dict[str, Any] | None = None, name: str = "beat"
    ) -> CeleryProcess:
        """`celery -A migration_app beat` with no -S: the scheduler is whatever `beat_scheduler` says."""
        schedule_file = self.processes.folder / f"{name}-{uuid.uuid4().hex[:6]}-schedule"
        args = ["-A", APP, "beat", "-l", "INFO", "-s", str(schedule_file)]
        return self.processes.start_celery(args, env=self.env(settings, entries), name=name)

    def events(self, label: str | None = None) -> list[dict[str, Any]]:
        try:
            lines = self.events_path.read_text().splitlines()
        except FileNotFoundError:
            return []
        events = [json.loads(line) for line in lines if line.endswith("}")]
        return [e for e in events if label is None or e["label"] == label]

    @property
    def repository(self) -> JobRepository:
        if self._repository is None:
            self._repository = JobRepository(self.database_url)
        return self._repository

    def runs(self, job_name: str) -> list[RunRecord]:
        """The job's runs, oldest first ([] until a beat has created the tables)."""
        try:
            return list(reversed(self.repository.list_runs(job_name, limit=100_000)))
        except DbschedError:
            return []

    def close(self) -> None:
        if self._repository is not None:
            self._repository.close()


@pytest.fixture
def sqlite_project(processes: Processes, tmp_path: Path) -> Iterator[Project]:
    project = Project(processes, {**filesystem_broker_settings(tmp_path / "broker"), "task_default_queue": "mig"}, None)
    yield project
    project.close()


def _statuses(project: Project, *job_names: str) -> Counter[tuple[str, str]]:
    return Counter((run.job_name, run.status) for name in job_names for run in project.runs(name))


def _wait_for_dbsched_runs(project: Project, label: str, count: int, timeout: float = 120) -> None:
    wait_for(
        lambda: len([e for e in project.events(label) if e["run_id"] is not None]) >= count,
        timeout,
        interval=0.2,
        message=lambda: f"{count} executions of {label!r} sent by celery_dbsched; events: {project.events(label)[-5:]}",
    )


def _stop_beats_and_drain(project: Project, beats: list[CeleryProcess], job_names: list[str]) -> None:
    """Stop the beats (no new runs), then wait until the worker has executed every run they sent."""
    for beat in beats:
        assert beat.stop(signal.SIGTERM, timeout=60) in (0, -signal.SIGTERM), beat.log_tail()

    def drained() -> bool:
        executed = {e["run_id"] for e in project.events()}
        return all(run.id in executed for name in job_names for run in project.runs(name))

    wait_for(drained, 120, interval=0.2, message="the worker to execute every run the beats sent")


def _check_interval_runs(project: Project, beats_started: float) -> list[RunRecord]:
    """The 1 s entry ran at its slots: one run per slot, each executed once, none doubled across beats."""
    runs = project.runs("interval")
    executions = [e for e in project.events("interval") if e["run_id"] is not None]
    per_run = Counter(e["run_id"] for e in executions)
    assert per_run and max(per_run.values()) == 1, f"a run was executed twice: {per_run.most_common(3)}"
    assert set(per_run) == {run.id for run in runs}  # every run was executed, no execution without a run

    slots = [run.scheduled_for for run in runs]
    assert all(slot is not None for slot in slots)
    assert len(set(slots)) == len(slots), "a slot was sent twice"
    assert slots == sorted(slots)  # type: ignore[type-var]
    first: dt.datetime = slots[0]  # type: ignore[assignment]
    offsets = [(slot - first).total_seconds() for slot in slots]  # type: ignore[operator]
    assert all(abs(o - round(o)) < 0.002 for o in offsets), f"off the 1 s cadence: {offsets}"
    span = round(offsets[-1])
    assert len(slots) <= span + 1  # never more runs than slots ...
    assert len(slots) >= 0.6 * (span + 1), f"{len(slots)} runs for {span + 1} slots"  # ... nor many missed

    # Executions against the wall clock: about one a second while the beats ran, never a burst.
    times = sorted(e["time"] for e in executions)
    elapsed = times[-1] - beats_started
    assert len(times) <= elapsed + 2, f"{len(times)} executions in {elapsed:.1f}s"
    assert {run.status for run in runs} == {"dispatched"}, Counter(run.status for run in runs)
    assert all(e["kwargs"] == {"note": "every second"} and e["x_source"] == "beat_schedule" for e in executions)
    task_ids = {run.task_id for run in runs}
    assert task_ids == {e["task_id"] for e in executions}  # the Celery task id is kept with each run
    return runs


def _check_registered_schedules(project: Project) -> None:
    repo = project.repository
    nightly = repo.lookup_job("nightly")
    assert nightly.kind == "task" and nightly.task == "migration_app.record" and nightly.policy.enabled
    assert nightly.schedule == CrontabSchedule(minute="30", hour="2", timezone="Europe/Berlin")
    berlin = ZoneInfo("Europe/Berlin")
    today = nightly.create_time.astimezone(berlin).date()
    expected = min(
        t
        for t in (dt.datetime.combine(today + dt.timedelta(days=d), dt.time(2, 30), berlin) for d in (0, 1))
        if t > nightly.create_time
    )
    assert nightly.next_scheduled_run == expected  # the next 02:30 in the app's zone after the switch
    sunset = repo.lookup_job("sunset")
    created = sunset.create_time
    celery_says = created + solar("sunset", 52.52, 13.40, nowfun=lambda: created).remaining_estimate(created)
    assert abs(sunset.next_scheduled_run - celery_says) < dt.timedelta(seconds=1)
    assert repo.lookup_job("every-minute").policy.enabled
    # Stock beat adds celery.backend_cleanup for an app without an auto-expiring result backend; so do we.
    assert repo.lookup_job("celery.backend_cleanup").task == "celery.backend_cleanup"


def _switch(project: Project, *, wait_for_crontab: bool) -> None:
    processes = project.processes
    worker = project.worker()

    # 1. Stock beat: the project works as it always did.
    stock = project.beat(name="stock-beat")
    wait_for(
        lambda: len(project.events("interval")) >= 3,
        120,
        interval=0.2,
        message=lambda: f"three executions under stock beat; beat log:\n{stock.log_tail(30)}",
    )
    assert stock.stop(signal.SIGTERM, timeout=60) in (0, -signal.SIGTERM), stock.log_tail()
    assert all(e["run_id"] is None for e in project.events())  # stock beat: no header of ours
    stock_count = len(project.events())

    # 2. Only beat_scheduler changes; two beats; the same worker.
    beats_started = time.time()
    beats = [project.beat(DBSCHED, name="dbsched-beat-1"), project.beat(DBSCHED, name="dbsched-beat-2")]
    _wait_for_dbsched_runs(project, "interval", 8)
    if wait_for_crontab:
        _wait_for_dbsched_runs(project, "every-minute", 1, timeout=150)  # the next minute boundary
    processes.check_alive(worker, *beats)
    _stop_beats_and_drain(project, beats, ["interval", "every-minute"])
    assert len(project.events()) > stock_count

    _check_interval_runs(project, beats_started)
    for event in project.events():
        # The worker never loaded our worker side: no wrapper task, no signals, no tracking. (The installed
        # package's `celery dbsched` command plugin, and the filesystem transport, do import the package.)
        assert not {"celery_dbsched.worker", "celery_dbsched.tracking", "celery_dbsched.scheduler"} & set(
            event["dbsched_modules"]
        )
        assert event["dbsched_registry"] is False
    assert "celery_dbsched.run_job" not in worker.log()  # not among the worker's [tasks]
    if wait_for_crontab:
        minute_runs = project.runs("every-minute")
        assert minute_runs and {run.status for run in minute_runs} == {"dispatched"}
        for run in minute_runs:
            assert run.scheduled_for is not None
            assert (run.scheduled_for.second, run.scheduled_for.microsecond) == (0, 0)  # on the minute
        executed = Counter(e["run_id"] for e in project.events("every-minute") if e["run_id"] is not None)
        assert set(executed) == {run.id for run in minute_runs} and set(executed.values()) == {1}
    _check_registered_schedules(project)
    assert worker.alive()


# The crontab entry's run at the next minute boundary waits up to a minute: with --soak (CI time). In CI the
# crontab entry is registered and its next run checked (_check_registered_schedules); crontab claims at the
# minute are tests/test_cadence_and_policies.py's.
@pytest.mark.parametrize(
    "wait_for_crontab", [False, pytest.param(True, marks=pytest.mark.soak)], ids=["interval", "and-crontab"]
)
def test_switch_from_stock_beat_with_two_beats_sqlite_filesystem(
    sqlite_project: Project, wait_for_crontab: bool
) -> None:
    _switch(sqlite_project, wait_for_crontab=wait_for_crontab)
    jobs = sqlite_project.processes.start_celery(
        ["-A", APP, "dbsched", "jobs"], env=sqlite_project.env(DBSCHED), name="dbsched-jobs"
    )
    assert jobs.stop(None, timeout=120) == 0, jobs.log()
    listing = jobs.log()
    for name in ("interval", "every-minute", "nightly", "sunset", "celery.backend_cleanup"):
        assert name in listing
    assert "cron 30 2 * * * Europe/Berlin" in listing


@pytest.mark.postgres
@pytest.mark.rabbitmq
def test_switch_from_stock_beat_with_two_beats_postgres_rabbitmq(
    processes: Processes, postgres_database: Database
) -> None:
    require_service("rabbitmq")
    queue = f"dbsched-mig-{uuid.uuid4().hex[:12]}"
    broker = Broker("rabbitmq", {"broker_url": RABBITMQ_URL}, queue)
    project = Project(processes, broker.conf(), postgres_database.url)
    try:
        _switch(project, wait_for_crontab=False)
    finally:
        project.close()
        processes.stop_all()
        cleanup_queue(broker)


# --- the worker side enabled --------------------------------------------------------------------------


def test_tracked_runs_complete_or_fail_with_worker_and_task_id(sqlite_project: Project) -> None:
    project = sqlite_project
    worker = project.worker({**TRACKING, **LIVENESS})
    entries = {"boom": {"task": "migration_app.boom", "schedule": 1.5, "args": ["boom"]}}
    beats = [project.beat({**DBSCHED, **LIVENESS}, entries, name=f"beat-{i}") for i in (1, 2)]

    wait_for(
        lambda: (
            len([r for r in project.runs("interval") if r.status == "completed"]) >= 4
            and len([r for r in project.runs("boom") if r.status == "failed"]) >= 2
        ),
        120,
        interval=0.2,
        message=lambda: f"completed and failed runs: {_statuses(project, 'interval', 'boom')}",
    )
    project.processes.check_alive(worker, *beats)
    _stop_beats_and_drain(project, beats, ["interval", "boom"])
    wait_for(
        lambda: all(r.status in ("completed", "failed") for r in project.runs("interval") + project.runs("boom")),
        60,
        interval=0.2,
        message=lambda: f"every run to end: {_statuses(project, 'interval', 'boom')}",
    )

    executions = {e["run_id"]: e for e in project.events() if e["run_id"] is not None}
    assert all("celery_dbsched.tracking" in e["dbsched_modules"] for e in executions.values())
    for run in project.runs("interval"):
        assert run.status == "completed", run
        assert run.worker == worker.node
        assert run.task_id == executions[run.id]["task_id"]
        assert run.start_time is not None and run.end_time is not None and run.start_time <= run.end_time
        assert run.error is None
    for run in project.runs("boom"):
        assert run.status == "failed", run
        assert run.worker == worker.node
        assert run.task_id == executions[run.id]["task_id"]
        assert run.error is not None and "ValueError" in run.error and "boom from boom" in run.error
    slots = [run.scheduled_for for run in project.runs("boom")]
    assert len(set(slots)) == len(slots)  # a failing entry is not retried early: one run per slot


def test_tracked_run_of_a_killed_worker_ends_interrupted(sqlite_project: Project) -> None:
    project = sqlite_project
    worker = project.worker({**TRACKING, **LIVENESS})
    entries = {"slow": {"task": "migration_app.slow", "schedule": 3600, "args": ["slow"]}}
    beat = project.beat({**DBSCHED, **LIVENESS}, entries)

    def running_slow() -> RunRecord | None:
        runs = [r for r in project.runs("slow") if r.status == "running"]
        return runs[0] if runs else None

    run = wait_for(running_slow, 120, interval=0.2, message="the slow task to be running")
    assert run.worker == worker.node
    # No progress at all, yet not stalled while its worker is alive: liveness, not progress, for plain tasks.
    repository = project.repository
    assert run.start_time is not None
    started = run.start_time
    wait_for(
        lambda: repository.database_now() - started > dt.timedelta(seconds=3 * 3),
        60,
        interval=0.2,
        message="three interrupt thresholds to pass",
    )
    assert repository.lookup_run(run.id).status == "running"

    worker.kill()  # SIGKILL: no shutdown handler runs, the heartbeat simply stops
    ended = wait_for(
        lambda: (r := repository.lookup_run(run.id)).status != "running" and r,
        60,
        interval=0.2,
        message="the run of the killed worker to end",
    )
    assert ended.status == "interrupted"
    assert ended.error is not None and ended.error.startswith("stalled"), ended.error
    assert "worker" in ended.error
    assert beat.alive()
