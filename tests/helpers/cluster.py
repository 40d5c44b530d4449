"""The cluster under test for the end-to-end and fault suites: real `celery worker` and `celery beat`
processes running tests/e2e_app.py on one test's database and broker, a sampler of the runs table, and the
observations the tests make (runs, job events, waits that fail at once when a process died).

    from helpers.cluster import PG_RABBITMQ, Cluster, on

    @on(PG_RABBITMQ)
    def test_something(cluster: Cluster) -> None:  # the `cluster` fixture is in tests/conftest.py
        ...
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import signal
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from celery_dbsched import RunRecord
from celery_dbsched.binding import forget_repository
from celery_dbsched.repository import JobRepository
from helpers.polling import wait_for
from helpers.processes import CeleryProcess, Processes
from helpers.services import Broker, Database

APP = "e2e_app"

# Short intervals: beats claim and workers report within a fraction of a second. The global interrupt
# threshold stays long; the jobs that must be interrupted set their own.
SETTINGS: dict[str, Any] = {
    "dbsched_run_jobs_interval": 0.3,
    "dbsched_monitor_interval": 0.3,
    "dbsched_interrupt_threshold": 60,
    "dbsched_retry_backoff": [0.5, 30],
}

# Times written by the database in separate statements of one transaction may differ by a few ms (SQLite).
CLOCK_TOLERANCE = 0.05
# How late a due run may start on a loaded machine (beats claim every 0.3 s when idle).
LATENESS = 6.0

SQLITE_FS = pytest.param("filesystem", "sqlite", id="filesystem-sqlite")
PG_RABBITMQ = pytest.param(
    "rabbitmq", "postgres", id="rabbitmq-postgres", marks=[pytest.mark.rabbitmq, pytest.mark.postgres]
)
PG_REDIS = pytest.param("redis", "postgres", id="redis-postgres", marks=[pytest.mark.redis, pytest.mark.postgres])
PG_FS = pytest.param("filesystem", "postgres", id="filesystem-postgres", marks=pytest.mark.postgres)
# PostgreSQL through a private PgBouncer in transaction pooling mode, with dbsched_pooler (helpers/pgbouncer.py).
PGBOUNCER_RABBITMQ = pytest.param(
    "rabbitmq", "pgbouncer", id="rabbitmq-pgbouncer", marks=[pytest.mark.rabbitmq, pytest.mark.postgres]
)
MARIADB_RABBITMQ = pytest.param(
    "rabbitmq", "mariadb", id="rabbitmq-mariadb", marks=[pytest.mark.rabbitmq, pytest.mark.mariadb]
)
# Each database and each broker at least once, each server database with RabbitMQ: the filesystem transport
# with PostgreSQL or MariaDB adds nothing SQLite with it does not (PG_FS is what most other process tests use).
ALL_COMBINATIONS = [SQLITE_FS, PG_RABBITMQ, PG_REDIS, MARIADB_RABBITMQ]


def on(*combinations: Any) -> pytest.MarkDecorator:
    """Run a test on these broker/database combinations."""
    return pytest.mark.parametrize(("broker", "db_kind"), list(combinations), indirect=["broker"])


# -- the cluster under test -------------------------------------------------------------------------------


def e2e_env(
    database: Database,
    broker: Broker,
    events_dir: Path,
    name: str,
    jobs: Sequence[dict[str, Any]],
    settings: dict[str, Any] | None,
) -> dict[str, str]:
    """The environment of an e2e_app process (tests/e2e_app.py): its database, broker, settings over SETTINGS,
    jobs, events folder and name."""
    return {
        "E2E_DATABASE_URL": database.url,
        "E2E_BROKER": json.dumps(broker.conf()),
        "E2E_SETTINGS": json.dumps({**SETTINGS, **database.extra_conf(), **(settings or {})}),
        "E2E_JOBS": json.dumps(list(jobs)),
        "E2E_EVENTS_DIR": str(events_dir),
        "E2E_PROCESS_NAME": name,
    }


class RunSampler(threading.Thread):
    """Reads the runs table every `interval` while the test runs: every state and progress value seen, and
    every moment a job had more than one active run (which the database must make impossible)."""

    def __init__(self, repository: JobRepository, interval: float = 0.1) -> None:
        super().__init__(name="run-sampler", daemon=True)
        self.repository = repository
        self.interval = interval
        self.samples = 0
        self.seen: dict[int, list[tuple[str, int, int]]] = defaultdict(list)  # run id -> distinct values
        self.double_active: list[tuple[str, list[int]]] = []
        self.errors: list[BaseException] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.sample()
            except Exception as exc:  # a busy database now and then is not the test's subject
                self.errors.append(exc)
            self._halt.wait(self.interval)

    def sample(self) -> None:
        runs = self.repository.list_runs(limit=500)  # one statement: a consistent snapshot
        active: dict[str, list[int]] = defaultdict(list)
        for run in runs:
            values = (run.status, run.completed, run.total)
            if not self.seen[run.id] or self.seen[run.id][-1] != values:
                self.seen[run.id].append(values)
            if run.status in ("queued", "running"):
                active[run.job_name].append(run.id)
        self.double_active += [(job, ids) for job, ids in active.items() if len(ids) > 1]
        self.samples += 1

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=30)

    def check(self) -> None:
        assert self.samples >= 5, f"the runs table was sampled only {self.samples} times: {self.errors[-3:]}"
        assert not self.double_active, f"jobs with two active runs at once: {self.double_active[:5]}"


class Cluster:
    """One test's database, broker and celery processes running tests/e2e_app.py."""

    def __init__(self, database: Database, broker: Broker, processes: Processes, tmp_path: Path) -> None:
        self.database = database
        self.broker = broker
        self.processes = processes
        self.repo = database.migrated_repository()
        self.events_dir = tmp_path / "events"
        self.live: list[CeleryProcess] = []  # processes the test expects to be running
        self.samplers: list[RunSampler] = []
        self.apps: list[Celery] = []

    # processes

    def env(self, name: str, jobs: Sequence[dict[str, Any]], settings: dict[str, Any] | None) -> dict[str, str]:
        return e2e_env(self.database, self.broker, self.events_dir, name, jobs, settings)

    def worker(
        self,
        jobs: Sequence[dict[str, Any]],
        *,
        name: str = "worker",
        settings: dict[str, Any] | None = None,
        pool: str = "threads",
        concurrency: int = 4,
        node: str | None = None,
        embedded_beat: str | None = None,
    ) -> CeleryProcess:
        process = self.processes.start_worker(
            APP,
            env=self.env(name, jobs, settings),
            name=name,
            pool=pool,
            concurrency=concurrency,
            node=node,
            embedded_beat=embedded_beat,
        )
        self.live.append(process)
        return process

    def beat(self, *, name: str = "beat", settings: dict[str, Any] | None = None) -> CeleryProcess:
        """A beat that knows no jobs: it only needs the database and the broker."""
        process = self.processes.start_beat(APP, env=self.env(name, [], settings), name=name)
        self.live.append(process)
        return process

    def stop(self, process: CeleryProcess, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        self.live.remove(process)
        return process.stop(sig, timeout)

    def kill(self, process: CeleryProcess) -> None:
        self.live.remove(process)
        process.kill()

    def sampler(self) -> RunSampler:
        sampler = RunSampler(self.repo)
        self.samplers.append(sampler)
        sampler.start()
        return sampler

    def app(self) -> Celery:
        """A Celery app in the test process, on the same database (to call the public API)."""
        app = Celery("e2e-test", set_as_current=False)
        app.conf.update(self.database.conf())
        self.apps.append(app)
        return app

    def close(self) -> None:
        for sampler in self.samplers:
            sampler.stop()
        self.processes.stop_all()
        for app in self.apps:
            forget_repository(app)

    # observations

    def runs(self, job: str | None = None) -> list[RunRecord]:
        """Oldest first."""
        return list(reversed(self.repo.list_runs(job_name=job, limit=10_000)))

    def describe_runs(self, job: str | None = None) -> str:
        return "\n".join(
            f"  run {r.id} {r.job_name} {r.status} {r.completed}/{r.total} claimed_by={r.claimed_by} worker={r.worker} "
            f"created={r.create_time:%H:%M:%S.%f} ended={r.end_time and f'{r.end_time:%H:%M:%S.%f}'} "
            f"error={(r.error or '')[-120:]!r}"
            for r in self.runs(job)
        )

    def wait(self, predicate: Callable[[], Any], timeout: float, message: str, job: str | None = None) -> Any:
        """wait_for, failing at once if a process the test expects to run has died, and listing the runs."""

        def check() -> Any:
            self.processes.check_alive(*self.live)
            return predicate()

        return wait_for(check, timeout, 0.1, lambda: f"{message}; runs:\n{self.describe_runs(job)}")

    def wait_run(
        self, job: str, predicate: Callable[[RunRecord], bool], timeout: float = 60.0, message: str = ""
    ) -> RunRecord:
        """The first run of `job` (oldest first) that satisfies `predicate`."""

        def find() -> RunRecord | None:
            return next((run for run in self.runs(job) if predicate(run)), None)

        run: RunRecord = self.wait(find, timeout, message or f"a matching run of {job}", job)
        return run

    def wait_runs(
        self, job: str, count: int, predicate: Callable[[RunRecord], bool], timeout: float = 60.0
    ) -> list[RunRecord]:
        def enough() -> list[RunRecord] | None:
            matching = [run for run in self.runs(job) if predicate(run)]
            return matching if len(matching) >= count else None

        runs: list[RunRecord] = self.wait(enough, timeout, f"{count} matching runs of {job}", job)
        return runs

    def events(self, run_id: int) -> list[dict[str, Any]]:
        try:
            text = (self.events_dir / f"{run_id}.jsonl").read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines()]

    def event(self, run_id: int, kind: str, timeout: float = 30.0) -> dict[str, Any]:
        found: dict[str, Any] = self.wait(
            lambda: next((e for e in self.events(run_id) if e["event"] == kind), None),
            timeout,
            f"a {kind!r} event of run {run_id} (events: {self.events(run_id)})",
        )
        return found

    def assert_started_once(self, runs: Sequence[RunRecord]) -> None:
        """Every run that a worker started ran the job exactly once; no run that was never started did.

        The runs may be a snapshot taken a moment ago, and the database says `running` a moment before the
        job's first line writes its event: read the events first, then the run as it is now."""
        for run in runs:
            starts = [e for e in self.events(run.id) if e["event"] == "start"]
            now = self.repo.lookup_run(run.id)
            if now.start_time is not None and not starts:
                self.event(run.id, "start")
                starts = [e for e in self.events(run.id) if e["event"] == "start"]
            expected = 0 if now.start_time is None else 1
            assert len(starts) == expected, f"run {run.id} ({now.status}) started {len(starts)} times: {starts}"


def seconds_between(a: dt.datetime, b: dt.datetime) -> float:
    return (b - a).total_seconds()


def assert_runs_spaced(runs: Sequence[RunRecord], every: float, *, lateness: float = LATENESS) -> None:
    """Each run was claimed when its job was due, once per due time: its slot (`scheduled_for`) is at least
    `every` after the previous run's slot (a fixed cadence for `every`; for a job that returns its delay the
    slot is counted from the previous end, which is later still), it was never claimed before its slot, and
    not much after its slot or the previous run's end, whichever is later (never skipped)."""
    for previous, run in itertools.pairwise(runs):
        assert previous.end_time is not None, f"run {previous.id} is {previous.status} but a later run exists"
        assert run.scheduled_for is not None and previous.scheduled_for is not None
        step = seconds_between(previous.scheduled_for, run.scheduled_for)
        assert step >= every - CLOCK_TOLERANCE, f"run {run.id} is for a slot {step:.3f}s after run {previous.id}'s"
        early = seconds_between(run.create_time, run.scheduled_for)
        assert early <= CLOCK_TOLERANCE, f"run {run.id} claimed {early:.3f}s before its slot"
        due = max(run.scheduled_for, previous.end_time)
        late = seconds_between(due, run.create_time)
        assert late <= lateness, f"run {run.id} claimed {late:.3f}s after it was due"
    if len(runs) > 1:
        assert runs[0].scheduled_for is not None and runs[-1].scheduled_for is not None
        elapsed = seconds_between(runs[0].scheduled_for, runs[-1].scheduled_for)
        assert len(runs) <= elapsed / every + 1 + CLOCK_TOLERANCE, f"{len(runs)} runs for slots {elapsed:.2f}s apart"


def quick(name: str, every: float, **spec: Any) -> dict[str, Any]:
    return {"kind": "quick", "name": name, "every": every, **spec}
