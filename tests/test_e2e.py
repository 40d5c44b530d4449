"""End to end: real `celery worker` and `celery beat` processes, a real database and a real broker.

The app is tests/e2e_app.py, configured per test through environment variables; its jobs append what
happened to each run to `<tmp>/events/<run id>.jsonl`, so the tests see both sides: the database (runs,
states, times on the database clock) and the jobs (started once, saw their cancellation).

Production combinations run the core behaviour: SQLite + filesystem:// (one machine), PostgreSQL + RabbitMQ,
PostgreSQL + Redis, and PostgreSQL + filesystem://. The other behaviours run on one combination each.
Intervals are shortened through settings; every wait polls with a generous deadline, because other test
runs share this machine.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import signal
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import procs
import pytest
from celery import Celery
from conftest import Broker, Database
from procs import CeleryProcess, Processes, wait_for

from celery_dbsched import JobStatus, RunRecord, update_job_next_run_in_at_least
from celery_dbsched.repository import JobRepository, forget_repository
from celery_dbsched.worker import RUN_TASK_NAME

pytestmark = pytest.mark.e2e

processes = procs.processes  # the fixture

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
ALL_COMBINATIONS = [SQLITE_FS, PG_RABBITMQ, PG_REDIS, PG_FS]


def on(*combinations: Any) -> pytest.MarkDecorator:
    """Run a test on these broker/database combinations."""
    return pytest.mark.parametrize(("broker", "db_kind"), list(combinations), indirect=["broker"])


# -- the cluster under test -------------------------------------------------------------------------------


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
        return {
            "E2E_DATABASE_URL": self.database.url,
            "E2E_BROKER": json.dumps(self.broker.conf()),
            "E2E_SETTINGS": json.dumps({**SETTINGS, **(settings or {})}),
            "E2E_JOBS": json.dumps(list(jobs)),
            "E2E_EVENTS_DIR": str(self.events_dir),
            "E2E_PROCESS_NAME": name,
        }

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
        app.conf.dbsched_database_url = self.database.url
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
            f"  run {r.id} {r.job_name} {r.status} {r.completed}/{r.total} worker={r.worker} "
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


@pytest.fixture
def e2e_database(request: pytest.FixtureRequest, db_kind: str) -> Database:
    database: Database = request.getfixturevalue(f"{db_kind}_database")
    return database


@pytest.fixture
def cluster(e2e_database: Database, broker: Broker, processes: Processes, tmp_path: Path) -> Iterator[Cluster]:
    # Requested after the database and broker, so torn down (processes stopped) before they are dropped.
    cluster = Cluster(e2e_database, broker, processes, tmp_path)
    try:
        yield cluster
    finally:
        cluster.close()


def seconds(a: dt.datetime, b: dt.datetime) -> float:
    return (b - a).total_seconds()


def assert_runs_spaced(runs: Sequence[RunRecord], every: float, *, lateness: float = LATENESS) -> None:
    """Each run was claimed when its job was due, once per due time: its slot (`scheduled_for`) is at least
    `every` after the previous run's slot (a fixed cadence for `every`; for a job that returns its delay the
    slot is counted from the previous end, which is later still), it was never claimed before its slot, and
    not much after its slot or the previous run's end, whichever is later (never skipped)."""
    for previous, run in itertools.pairwise(runs):
        assert previous.end_time is not None, f"run {previous.id} is {previous.status} but a later run exists"
        assert run.scheduled_for is not None and previous.scheduled_for is not None
        step = seconds(previous.scheduled_for, run.scheduled_for)
        assert step >= every - CLOCK_TOLERANCE, f"run {run.id} is for a slot {step:.3f}s after run {previous.id}'s"
        early = seconds(run.create_time, run.scheduled_for)
        assert early <= CLOCK_TOLERANCE, f"run {run.id} claimed {early:.3f}s before its slot"
        due = max(run.scheduled_for, previous.end_time)
        late = seconds(due, run.create_time)
        assert late <= lateness, f"run {run.id} claimed {late:.3f}s after it was due"
    if len(runs) > 1:
        assert runs[0].scheduled_for is not None and runs[-1].scheduled_for is not None
        elapsed = seconds(runs[0].scheduled_for, runs[-1].scheduled_for)
        assert len(runs) <= elapsed / every + 1 + CLOCK_TOLERANCE, f"{len(runs)} runs for slots {elapsed:.2f}s apart"


def quick(name: str, every: float, **spec: Any) -> dict[str, Any]:
    return {"kind": "quick", "name": name, "every": every, **spec}


# -- on every broker ---------------------------------------------------------------------------------------


@on(*ALL_COMBINATIONS)
def test_two_jobs_run_once_per_due_time(cluster: Cluster) -> None:
    jobs = [quick("e2e.a", 1.0), {"kind": "quick_class", "name": "e2e.b", "every": 1.5}]
    worker = cluster.worker(jobs)
    beat = cluster.beat()
    sampler = cluster.sampler()

    done = lambda run: run.status == "completed"  # noqa: E731
    cluster.wait_runs("e2e.a", 4, done)
    cluster.wait_runs("e2e.b", 3, done)
    sampler.stop()
    sampler.check()

    beat_id = f"{socket.gethostname()}:{beat.pid}"
    for job, every in (("e2e.a", 1.0), ("e2e.b", 1.5)):
        runs = cluster.runs(job)
        finished = [run for run in runs if run.status not in ("queued", "running")]
        assert all(run.status == "completed" for run in finished), cluster.describe_runs(job)
        assert all(run.progress == JobStatus(3, 3) for run in finished), cluster.describe_runs(job)
        assert {run.worker for run in finished} == {worker.node}
        assert {run.claimed_by for run in runs} == {beat_id}
        assert all(run.task_id for run in finished)
        assert_runs_spaced(runs, every)
        cluster.assert_started_once(runs)


@on(*ALL_COMBINATIONS)
def test_progress_values_reach_the_database_while_the_job_runs(cluster: Cluster) -> None:
    cluster.worker(
        [{"kind": "progress", "name": "e2e.progress", "every": 300, "steps": 6, "step": 0.5}],
        settings={"dbsched_monitor_interval": 0.2},
    )
    cluster.beat()
    sampler = cluster.sampler()

    run = cluster.wait_run("e2e.progress", lambda run: run.status == "completed", timeout=60)
    sampler.stop()
    sampler.check()

    assert run.progress == JobStatus(6, 6)
    values = sampler.seen[run.id]
    while_running = [(completed, total) for status, completed, total in values if status == "running"]
    intermediate = [(c, t) for c, t in while_running if t == 6 and 0 < c < 6]
    assert len(intermediate) >= 3, f"progress seen while running: {values}"
    assert while_running == sorted(while_running), f"progress went backwards: {values}"
    cluster.assert_started_once([run])


@on(*ALL_COMBINATIONS)
def test_a_stalled_job_is_interrupted_and_its_context_cancelled(cluster: Cluster) -> None:
    cluster.worker([{"kind": "stall", "name": "e2e.stall", "every": 300, "interrupt_threshold": 1.5}])
    cluster.beat()

    run = cluster.wait_run(
        "e2e.stall", lambda run: run.status == "interrupted" and run.start_time is not None, timeout=60
    )
    assert run.error is not None and run.error.startswith("stalled"), run.error
    assert run.progress == JobStatus(0, 10)  # the last value it reported, kept
    assert run.end_time is not None and run.start_time is not None
    # Interrupted by a beat's monitor once its progress was older than its own threshold (1.5 s), not the
    # global one (60 s).
    assert 1.5 - CLOCK_TOLERANCE <= seconds(run.update_time, run.end_time) < 1.5 + LATENESS

    cancelled = cluster.event(run.id, "cancelled")
    assert "stalled" in cancelled["reason"], cancelled
    cluster.assert_started_once([run])
    # The job is due again after the backoff (0.5 s): it runs (and stalls) again.
    cluster.wait_run("e2e.stall", lambda later: later.id > run.id and later.start_time is not None)


# -- one combination each ------------------------------------------------------------------------------------


@on(SQLITE_FS)
def test_a_failing_job_is_retried_with_backoff_and_keeps_its_final_status(cluster: Cluster) -> None:
    cluster.worker(
        [{"kind": "fail", "name": "e2e.fail", "every": 300}, quick("e2e.steady", 2.0)],
        settings={"dbsched_retry_backoff": [0.4, 30]},
    )
    cluster.beat(settings={"dbsched_retry_backoff": [0.4, 30]})

    failed = cluster.wait_runs("e2e.fail", 4, lambda run: run.status == "failed", timeout=90)[:4]
    cluster.wait_runs("e2e.steady", 3, lambda run: run.status == "completed")

    # Backoff: 0.4, 0.8, 1.6 s after each failure (base 0.4 s, doubling; far below the job's 300 s).
    gaps = [seconds(a.end_time, b.create_time) for a, b in itertools.pairwise(failed)]  # type: ignore[arg-type]
    for n, gap in enumerate(gaps):
        assert 0.4 * 2**n - CLOCK_TOLERANCE <= gap <= 0.4 * 2**n + LATENESS, gaps
    assert gaps == sorted(gaps) and gaps[0] < gaps[-1], f"gaps between failed runs do not grow: {gaps}"
    assert cluster.repo.lookup_job("e2e.fail").failure_count >= 4

    # The final status of each failed run is kept in the history: its last progress and the error.
    for run in failed:
        assert run.progress == JobStatus(1, 3), cluster.describe_runs("e2e.fail")
        assert run.error is not None
        assert f"RuntimeError: e2e failure in run {run.id}" in run.error
        assert "Traceback" in run.error
    cluster.assert_started_once(failed)

    # The failing job's retries do not make the other job run before its time.
    steady = cluster.runs("e2e.steady")
    assert all(run.status in ("completed", "queued", "running") for run in steady), cluster.describe_runs()
    assert_runs_spaced(steady, 2.0)
    assert cluster.repo.lookup_job("e2e.steady").failure_count == 0


@on(PG_RABBITMQ)
def test_a_pull_in_runs_a_job_again_promptly(cluster: Cluster) -> None:
    cluster.worker([quick("e2e.idle", 300), quick("e2e.busy", 300, steps=10, step=0.5)])
    cluster.beat()
    app = cluster.app()

    # Pulled in after its run: due again at once instead of in 300 s.
    first = cluster.wait_run("e2e.idle", lambda run: run.status == "completed")
    job = cluster.repo.lookup_job("e2e.idle")
    assert first.end_time is not None and first.scheduled_for is not None
    # A fixed cadence: its slot + 300 s.
    assert seconds(first.scheduled_for, job.next_scheduled_run) == pytest.approx(300, abs=CLOCK_TOLERANCE)
    before = cluster.repo.database_now()
    update_job_next_run_in_at_least(app, "e2e.idle", 0)
    second = cluster.wait_run("e2e.idle", lambda run: run.id > first.id and run.status == "completed", timeout=30)
    assert seconds(before, second.create_time) < LATENESS

    # Pulled in while it runs (5 s): not lost, honoured when the run ends.
    running = cluster.wait_run("e2e.busy", lambda run: run.status == "running")
    update_job_next_run_in_at_least(app, "e2e.busy", 0)
    assert cluster.repo.lookup_run(running.id).status == "running", "the run ended before the pull-in: too fast"
    again = cluster.wait_run("e2e.busy", lambda run: run.id > running.id, timeout=30)
    ended = cluster.repo.lookup_run(running.id)
    assert ended.status == "completed" and ended.end_time is not None
    assert 0 <= seconds(ended.end_time, again.create_time) < LATENESS
    cluster.assert_started_once([first, second, ended])


@on(PG_REDIS)
def test_interrupting_a_run_in_the_database_cancels_only_that_job(cluster: Cluster) -> None:
    cluster.worker(
        [
            {"kind": "long", "name": "e2e.victim", "every": 300, "seconds": 120},
            {"kind": "progress", "name": "e2e.bystander", "every": 300, "steps": 10, "step": 0.6},
        ]
    )
    cluster.beat()
    victim = cluster.wait_run("e2e.victim", lambda run: run.status == "running")
    bystander = cluster.wait_run("e2e.bystander", lambda run: run.status == "running")
    cluster.event(victim.id, "start")

    interrupted = cluster.repo.interrupt_run(victim.id)
    assert interrupted.status == "interrupted"
    cancelled = cluster.event(victim.id, "cancelled", timeout=15)
    assert "interrupted" in cancelled["reason"], cancelled
    assert cluster.repo.lookup_run(victim.id).error == "cancelled"

    done = cluster.wait_run("e2e.bystander", lambda run: run.id == bystander.id and run.status != "running")
    assert done.status == "completed" and done.progress == JobStatus(10, 10), cluster.describe_runs()
    events = cluster.events(bystander.id)
    assert [e["event"] for e in events] == ["start", "end"]
    assert events[1]["time"] > cancelled["time"], "the bystander ended before the victim was cancelled"
    cluster.assert_started_once([cluster.repo.lookup_run(victim.id), done])


@pytest.mark.parametrize(
    ("broker", "db_kind", "pool"),
    [
        pytest.param(*PG_RABBITMQ.values, "threads", id="threads-rabbitmq-postgres", marks=PG_RABBITMQ.marks),
        pytest.param(*SQLITE_FS.values, "prefork", id="prefork-filesystem-sqlite"),
        pytest.param(*PG_REDIS.values, "solo", id="solo-redis-postgres", marks=PG_REDIS.marks),
    ],
    indirect=["broker"],
)
def test_warm_shutdown_interrupts_the_run_and_another_worker_takes_it_at_once(cluster: Cluster, pool: str) -> None:
    jobs = [{"kind": "long", "name": "e2e.long", "every": 300, "seconds": 120}]
    if pool != "solo":
        jobs.append(quick("e2e.quick", 0.5))
    concurrency = {"threads": 4, "prefork": 2, "solo": 1}[pool]
    first = cluster.worker(jobs, name="first", pool=pool, concurrency=concurrency)
    cluster.beat()

    run = cluster.wait_run("e2e.long", lambda run: run.status == "running" and run.worker == first.node)
    start = cluster.event(run.id, "start")
    if pool == "prefork":
        assert start["pid"] != first.pid, "the job ran in the worker's main process, not a pool child"
    else:
        assert start["pid"] == first.pid
    if pool != "solo":
        cluster.wait_runs("e2e.quick", 2, lambda run: run.status == "completed" and run.worker == first.node)

    second = cluster.worker(jobs, name="second", pool=pool, concurrency=concurrency)
    second.wait_ready()
    began = time.monotonic()
    assert cluster.stop(first, signal.SIGTERM, timeout=60) == 0, first.log_tail()
    assert time.monotonic() - began < 20, "the worker waited for the job instead of stopping it"

    ended = cluster.repo.lookup_run(run.id)
    assert ended.status == "interrupted", cluster.describe_runs()
    assert ended.error is not None and ended.error.startswith("shutdown"), ended.error
    cancelled = cluster.event(run.id, "cancelled")
    assert cancelled["reason"].startswith("shutdown"), cancelled
    assert cancelled["pid"] == start["pid"]

    # Due again at once (not after the backoff or the threshold): the second worker runs it.
    taken = cluster.wait_run("e2e.long", lambda later: later.id > run.id and later.status == "running", timeout=30)
    assert taken.worker == second.node
    assert ended.end_time is not None
    assert 0 <= seconds(ended.end_time, taken.create_time) < LATENESS
    cluster.assert_started_once(cluster.runs())
    if pool != "solo":
        quick_runs = cluster.runs("e2e.quick")
        assert {run.status for run in quick_runs} <= {"completed", "interrupted", "queued", "running"}
        assert all(run.progress == JobStatus(3, 3) for run in quick_runs if run.status == "completed")


@on(PG_FS)
def test_a_worker_restarted_with_the_same_name_ends_the_runs_it_left_running(cluster: Cluster) -> None:
    jobs = [{"kind": "long", "name": "e2e.long", "every": 300, "seconds": 120, "interrupt_threshold": 120}]
    node = f"e2e-restart-{time.monotonic_ns() % 10**9}@%h"
    crashed = cluster.worker(jobs, name="crashed", node=node)
    cluster.beat()
    run = cluster.wait_run("e2e.long", lambda run: run.status == "running")
    cluster.event(run.id, "start")
    assert run.worker == crashed.node

    cluster.kill(crashed)  # SIGKILL: no shutdown, the run stays `running`
    assert cluster.repo.lookup_run(run.id).status == "running"
    restarted_at = cluster.repo.database_now()
    restarted = cluster.worker(jobs, name="restarted", node=node)

    ended = cluster.wait_run("e2e.long", lambda r: r.id == run.id and r.status != "running", timeout=30)
    assert ended.status == "interrupted"
    assert ended.error is not None and ended.error.startswith("restart"), ended.error
    assert ended.end_time is not None
    # Ended by the restart, well before the job's 120 s threshold.
    assert seconds(restarted_at, ended.end_time) < 30
    assert not [e for e in cluster.events(run.id) if e["event"] == "cancelled"]  # it was killed, not told

    # And it is due again at once: the restarted worker runs it.
    again = cluster.wait_run("e2e.long", lambda r: r.id > run.id and r.status == "running", timeout=30)
    assert again.worker == restarted.node
    assert 0 <= seconds(ended.end_time, again.create_time) < LATENESS


@on(SQLITE_FS)
def test_a_worker_that_does_not_know_the_job_fails_the_run_naming_both(cluster: Cluster) -> None:
    # Registered in the database (as by another deployment), but not in this worker's app.
    cluster.repo.upsert_job(
        "e2e.elsewhere", "a job this worker has never heard of", default_next_run_in=dt.timedelta(seconds=300)
    )
    worker = cluster.worker([quick("e2e.known", 300)], pool="solo", concurrency=1)
    cluster.beat()

    run = cluster.wait_run("e2e.elsewhere", lambda run: run.status == "failed")
    assert run.error is not None
    assert "'e2e.elsewhere'" in run.error and f"'{worker.node}'" in run.error, run.error
    assert run.worker == worker.node
    assert cluster.events(run.id) == []
    known = cluster.wait_run("e2e.known", lambda run: run.status == "completed")
    assert known.worker == worker.node


@on(SQLITE_FS)
def test_a_worker_with_an_embedded_beat_runs_jobs(cluster: Cluster) -> None:
    # The example's quick start: one process, `celery worker -B --scheduler celery_dbsched.Scheduler`.
    worker = cluster.worker([quick("e2e.a", 1.0)], embedded_beat="celery_dbsched.Scheduler")
    runs = cluster.wait_runs("e2e.a", 3, lambda run: run.status == "completed")
    assert {run.worker for run in runs} == {worker.node}
    # The embedded beat is a process of its own (a child of the worker), with a server id of its own.
    [claimed_by] = {run.claimed_by for run in runs}
    host, _, pid = claimed_by.rpartition(":")
    assert host == socket.gethostname() and pid.isdigit() and int(pid) != worker.pid, claimed_by
    assert_runs_spaced(cluster.runs("e2e.a"), 1.0)
    cluster.assert_started_once(cluster.runs("e2e.a"))


@on(PG_RABBITMQ, SQLITE_FS)
def test_two_beats_never_start_a_run_twice(cluster: Cluster) -> None:
    jobs = [quick(f"e2e.many{n}", 0.5, steps=2, step=0.05) for n in range(4)]
    worker = cluster.worker(jobs, concurrency=4)
    beats = [cluster.beat(name="beat-1"), cluster.beat(name="beat-2")]
    sampler = cluster.sampler()
    beat_ids = {f"{socket.gethostname()}:{beat.pid}" for beat in beats}

    # Long enough that both beats claim some runs (they race for every due job).
    cluster.wait(
        lambda: {run.claimed_by for run in cluster.runs()} >= beat_ids and len(cluster.runs()) >= 40,
        timeout=120,
        message="both beats to claim runs, 40 runs in all",
    )
    sampler.stop()
    sampler.check()

    runs = cluster.runs()
    assert {run.claimed_by for run in runs} == beat_ids
    assert {run.status for run in runs} <= {"completed", "queued", "running"}, cluster.describe_runs()
    assert {run.worker for run in runs if run.status == "completed"} == {worker.node}
    cluster.assert_started_once(runs)
    for job in jobs:
        assert_runs_spaced(cluster.runs(job["name"]), 0.5)


@on(PG_REDIS)
def test_a_run_message_delivered_again_does_not_start_the_run_again(cluster: Cluster) -> None:
    worker = cluster.worker([quick("e2e.once", 300), {"kind": "long", "name": "e2e.long", "every": 300}])
    cluster.beat()
    finished = cluster.wait_run("e2e.once", lambda run: run.status == "completed")
    running = cluster.wait_run("e2e.long", lambda run: run.status == "running")
    cluster.event(running.id, "start")

    # What a broker redelivery or a beat re-sending after a crash looks like to the worker.
    sender = Celery("e2e-sender", set_as_current=False)
    sender.conf.update(cluster.broker.conf())
    try:
        for run in (finished, running, finished):
            sender.send_task(RUN_TASK_NAME, args=[run.id, run.job_name], serializer="json")
        sender.send_task(RUN_TASK_NAME, args=[999_999, "e2e.once"], serializer="json")
    finally:
        sender.close()

    def dropped() -> bool:
        log = worker.log()
        return (
            log.count(f"dropping the message for run {finished.id}:") == 2
            and log.count(f"dropping the message for run {running.id}:") == 1
            and "dropping the message for run 999999:" in log
        )

    cluster.wait(dropped, timeout=30, message="the worker to drop the four messages")
    assert cluster.repo.lookup_run(finished.id) == finished
    assert cluster.repo.lookup_run(running.id).status == "running"
    assert len(cluster.runs("e2e.once")) == 1
    cluster.assert_started_once([finished, running])
