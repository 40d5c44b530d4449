"""Fault suite, outages (issue 4, scenarios 5 and 6): the database and the broker go away while beats and
workers run, and come back.

The services that go down are private to this module, so that the shared PostgreSQL, RabbitMQ and Redis
that other test runs use are never touched:

- PostgreSQL: a cluster of our own (`pg_createcluster`, as root), restarted with `pg_ctlcluster restart` and
  stopped for 20 s with `pg_ctlcluster stop` / `start`, dropped at the end of the session.
- Redis: a `redis-server` subprocess on a free port (no persistence), stopped and started again.
- RabbitMQ (issue 15): a node of our own on free ports (`private_rabbitmq`, tests/helpers/rabbitmq.py), stopped
  with `rabbitmqctl stop` and started again with `rabbitmq-server -detached`.
- PostgreSQL black-holed (issue 15): the shared server behind a `TcpProxy` that stops forwarding; only the
  processes that connect through the proxy see it.
- RabbitMQ or Redis black-holed (issue 15): the shared server behind a `TcpProxy` of the test's own.

Each test prints one line `FAULTS <name>: key=value ...` with what it counted, and appends it as JSON to the
file named by DBSCHED_FAULT_REPORT when that is set.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers.cluster import APP, LATENESS, Cluster, RunSampler, assert_runs_spaced, quick, seconds_between
from helpers.polling import wait_for
from helpers.postgres import PrivatePostgres, private_cluster
from helpers.processes import CeleryProcess, Processes
from helpers.proxy import TcpProxy, host_port, with_port
from helpers.rabbitmq import PrivateRabbitMQ
from helpers.services import (
    RABBITMQ_URL,
    REDIS_URL,
    Broker,
    Database,
    cleanup_queue,
    free_port,
    require_service,
    unavailable,
)

from celery_dbsched import RunRecord, update_job_next_run_in_at_least
from celery_dbsched.publisher import PUBLISH_TIMEOUT
from celery_dbsched.states import RunState
from celery_dbsched.wakeup import RECONNECT_AFTER

pytestmark = [pytest.mark.faults, pytest.mark.e2e]


OUTAGE = 20.0  # seconds the database (and the broker) stay away (30 until stop 21; CI time)
# A beat backs off at most its run-jobs interval (0.3 s here) while the database is down; claiming must
# resume within this many seconds of the database accepting connections again (slack for 2 shared cores).
RESUME_BOUND = 10.0
# ERROR/CRITICAL/Traceback lines one process may log for one outage: "log once, back off" (a line per tick
# would be ~100 for 30 s at a 0.3 s tick).
ERROR_LINES_BOUND = 3
CLUSTER_PREFIX = "dbschedfaults"


# -- a private PostgreSQL cluster ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def private_postgres() -> Iterator[PrivatePostgres]:
    """A PostgreSQL cluster of this module's own, on a free port (trust, localhost only, no fsync), created
    once for the module's tests and dropped as soon as they are done (also when they fail), not at the end
    of a whole CI session. A cluster left by a killed run is dropped by the next run."""
    with private_cluster(CLUSTER_PREFIX) as pg:
        yield pg


@pytest.fixture
def private_pg_database(private_postgres: PrivatePostgres) -> Iterator[Database]:
    """An empty database in the private cluster (the cluster must be up at the end to drop it)."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    private_postgres.admin(f'CREATE DATABASE "{name}"')
    database = Database("postgres", private_postgres.url(name))
    try:
        yield database
    finally:
        for repository in database.repositories:
            repository.close()
        with contextlib.suppress(Exception):
            if not private_postgres.accepting():
                private_postgres.ctl("start")
            private_postgres.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- a private Redis -----------------------------------------------------------------------------------------


class PrivateRedis:
    """`redis-server` on a port of its own, without persistence: stopping it loses what it held."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.popen: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--daemonize", "no", "--dir", str(self.folder)]
        with open(self.folder / "redis.log", "ab") as log:
            self.popen = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_for(self.ready, 30, 0.1, f"redis-server on port {self.port}")

    def ready(self) -> bool:
        if self.popen is not None and self.popen.poll() is not None:
            raise AssertionError(f"redis-server exited with {self.popen.returncode}: {self.log()}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def log(self) -> str:
        return (self.folder / "redis.log").read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        if self.popen is None:
            return
        self.popen.kill()  # the broker dies: no shutdown, what it held is gone
        self.popen.wait(30)
        self.popen = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    if not shutil.which("redis-server"):
        unavailable("a private Redis needs redis-server (Debian's redis-server)")
    redis = PrivateRedis(tmp_path / "redis")
    redis.start()
    try:
        yield redis
    finally:
        redis.stop()


# -- observations --------------------------------------------------------------------------------------------

_ERROR_LINE = re.compile(r": (ERROR|CRITICAL)/|^Traceback \(most recent call last\)")


def error_lines(process: CeleryProcess, since: int = 0) -> list[str]:
    """The ERROR/CRITICAL log lines and tracebacks of a process, after byte offset `since` of its log."""
    with open(process.log_path, "rb") as f:
        f.seek(since)
        lines = f.read().decode(errors="replace").splitlines()
    return [line for line in lines if _ERROR_LINE.search(line)]


def log_size(process: CeleryProcess) -> int:
    return process.log_path.stat().st_size if process.log_path.exists() else 0


def report(name: str, **figures: Any) -> None:
    def show(value: Any) -> str:
        return f"{value:.1f}s" if isinstance(value, float) else str(value)

    print(f"\nFAULTS {name}: " + " ".join(f"{key}={show(value)}" for key, value in figures.items()))
    path = os.environ.get("DBSCHED_FAULT_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"test": name, **figures}) + "\n")


def hold(cluster: Cluster, duration: float) -> None:
    """Let `duration` seconds pass while checking that every process the test expects to run still does."""
    deadline = time.monotonic() + duration

    def over() -> bool:
        cluster.processes.check_alive(*cluster.live)
        return time.monotonic() >= deadline

    wait_for(over, duration + 30, 0.2, "the outage to last")


def first_claims_after(cluster: Cluster, jobs: Sequence[str], moment: dt.datetime, timeout: float) -> list[RunRecord]:
    """For each job, its first run claimed after `moment` (database clock), waiting for all of them."""

    def found() -> list[RunRecord] | None:
        firsts = []
        for job in jobs:
            run = next((run for run in cluster.runs(job) if run.create_time > moment), None)
            if run is None:
                return None
            firsts.append(run)
        return firsts

    runs: list[RunRecord] = cluster.wait(found, timeout, f"a claim of each of {list(jobs)} after {moment}")
    return runs


def listening_beats(pg: PrivatePostgres, database: str) -> int:
    count: int = pg.scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND backend_type = 'client backend' AND query LIKE 'LISTEN dbsched\\_wakeup\\_%'",
        database,
    )
    return count


def lost_runs(
    runs: Sequence[RunRecord], now: dt.datetime, expected_failures: Callable[[RunRecord], bool]
) -> list[RunRecord]:
    """Runs that did not end `completed`, except the failures the scenario documents, and runs still active
    long after they were claimed (stuck)."""
    ended_badly = [run for run in runs if run.status in ("failed", "interrupted") and not expected_failures(run)]
    stuck = [run for run in runs if run.status in ("queued", "running") and seconds_between(run.update_time, now) > 20]
    return ended_badly + stuck


def done(run: RunRecord) -> bool:
    return run.status == "completed"


def describe(runs: Sequence[RunRecord]) -> str:
    return "; ".join(f"run {r.id} {r.job_name} {r.status} error={(r.error or '')[:160]!r}" for r in runs)


# -- scenario 5: PostgreSQL restarted, and away for 20 s ----------------------------------------------------

QUICK_JOBS = [f"e2e.q{n}" for n in range(4)]


@pytest.fixture
def rabbitmq_broker() -> Iterator[Broker]:
    require_service("rabbitmq")
    broker = Broker("rabbitmq", {"broker_url": RABBITMQ_URL}, f"dbsched-faults-{uuid.uuid4().hex[:12]}")
    yield broker
    cleanup_queue(broker)
    cleanup_queue(Broker("rabbitmq", broker.settings, f"{broker.queue}-solo"))


@pytest.fixture
def pg_cluster(
    private_pg_database: Database, rabbitmq_broker: Broker, processes: Processes, tmp_path: Path
) -> Iterator[Cluster]:
    cluster = Cluster(private_pg_database, rabbitmq_broker, processes, tmp_path)
    try:
        yield cluster
    finally:
        cluster.close()


def _database_outage(
    name: str, pg: PrivatePostgres, cluster: Cluster, cut: Callable[[], float], *, solo_worker: bool, across: float
) -> None:
    """Beats and workers run while `cut` takes the database away and brings it back (returning how long it
    was away); then: no process exited, few error lines, claiming resumed promptly, no run lost or doubled,
    the run that was running across the outage completed."""
    database = cluster.database.url.rsplit("/", 1)[1]
    jobs: list[dict[str, Any]] = [quick(job, 1.0) for job in QUICK_JOBS]
    # Runs across the outage: its progress writes fail for a while; it must end `completed`, not `failed`.
    jobs.append({"kind": "long", "name": "e2e.across", "every": 300, "seconds": across, "step": 0.2})
    workers = [cluster.worker(jobs, name="worker", concurrency=8)]
    solo_queue = f"{cluster.broker.queue}-solo"
    if solo_worker:
        # One slot, one queue: a job that ends during the outage (its completion must wait for the database)
        # and, behind it in the queue, a run claimed before the outage whose message is delivered only when
        # the slot frees: its start must wait for the database too.
        solo = [
            {"kind": "long", "name": "e2e.ends_during", "every": 300, "seconds": 6, "step": 0.2, "queue": solo_queue},
            quick("e2e.behind", 1.0, queue=solo_queue),
        ]
        solo_process = cluster.processes.start_worker(
            APP,
            env=cluster.env("solo-worker", solo, None),
            name="solo-worker",
            concurrency=1,
            queues=[solo_queue],
        )
        cluster.live.append(solo_process)
        workers.append(solo_process)
    beats = [cluster.beat(name="beat-a"), cluster.beat(name="beat-b")]
    for worker in workers:
        worker.wait_ready()
    sampler = cluster.sampler()
    for job in QUICK_JOBS:
        cluster.wait_runs(job, 2, done, timeout=90)
    across_run = cluster.wait_run("e2e.across", lambda run: run.status == "running", timeout=60)
    cluster.wait(lambda: listening_beats(pg, database) == 2, 30, "both beats listening for wake-ups")
    if solo_worker:
        cluster.wait_runs("e2e.behind", 1, done, timeout=60)
        # Its first run (at registration) is over by now; pull it in to have it running as the outage starts.
        first = cluster.wait_run("e2e.ends_during", done, timeout=60)
        update_job_next_run_in_at_least(cluster.app(), "e2e.ends_during", 0)
        ends_during = cluster.wait_run(
            "e2e.ends_during", lambda run: run.id > first.id and run.status == "running", timeout=30
        )
        assert ends_during.start_time is not None
        cluster.wait_run(
            "e2e.behind",
            lambda run: run.status == "queued" and run.create_time > ends_during.start_time,  # type: ignore[operator]
            timeout=10,
            message="a run of e2e.behind queued behind e2e.ends_during",
        )
    before = {process.name: error_lines(process) for process in cluster.live}
    assert not any(before.values()), f"error lines before the outage: {before}"
    offsets = {process.name: log_size(process) for process in cluster.live}

    down = cut()
    back = time.monotonic()

    started_at: dt.datetime = pg.scalar("SELECT pg_postmaster_start_time()", database)
    resumed = first_claims_after(cluster, QUICK_JOBS, started_at, timeout=60)
    resume_first = max(min(seconds_between(started_at, run.create_time) for run in resumed), 0.0)
    resume_all = max(seconds_between(started_at, run.create_time) for run in resumed)
    # Each beat's LISTEN connection comes back (it retries RECONNECT_AFTER seconds after losing it).
    cluster.wait(
        lambda: listening_beats(pg, database) == 2, RECONNECT_AFTER + 30, "both beats listening again after the outage"
    )
    listening_after = time.monotonic() - back
    across_run = cluster.wait_run(
        "e2e.across", lambda run: run.id == across_run.id and run.end_time is not None, timeout=across + 60
    )
    assert across_run.status == "completed", describe([across_run])
    assert across_run.progress.completed == across_run.progress.total > 0, describe([across_run])
    if solo_worker:
        ends_during = cluster.wait_run(
            "e2e.ends_during", lambda run: run.id == ends_during.id and run.end_time is not None, timeout=90
        )
        assert ends_during.status == "completed", describe([ends_during])
        cluster.wait_runs("e2e.behind", 1, lambda run: done(run) and run.create_time > started_at, timeout=60)
    for job in QUICK_JOBS:
        cluster.wait_runs(job, 2, lambda run: done(run) and run.create_time > started_at, timeout=60)
    # Runs claimed before the outage end within the bound (a few retries), not at the interrupt threshold.
    cluster.wait(
        lambda: all(run.end_time is not None for run in cluster.runs() if run.create_time < started_at),
        30,
        "every run claimed before the outage to end",
    )
    sampler.stop()
    sampler.check()

    runs = cluster.runs()
    lost = lost_runs(runs, cluster.repo.database_now(), lambda run: False)
    cluster.assert_started_once(runs)
    cluster.processes.check_alive(*cluster.live)
    errors = {process.name: error_lines(process, offsets[process.name]) for process in cluster.live}
    report(
        name,
        down=round(down, 1),
        claims_resumed_after=round(resume_first, 2),
        all_jobs_resumed_after=round(resume_all, 2),
        listen_back_within=round(listening_after, 1),
        runs=len(runs),
        lost=len(lost),
        doubled=len(sampler.double_active),
        failed=sum(run.status == "failed" for run in runs),
        writes_waited_out=sum(process.log().count(": done after ") for process in cluster.live),
        error_lines=sum(map(len, errors.values())),
        error_lines_by_process={name: len(lines) for name, lines in errors.items()},
    )
    assert not lost, f"runs lost or falsely ended: {describe(lost)}"
    assert resume_all <= RESUME_BOUND, f"claiming resumed {resume_all:.1f}s after the database came back"
    for process_name, lines in errors.items():
        assert len(lines) <= ERROR_LINES_BOUND, f"{process_name} logged {len(lines)} error lines: {lines[:10]}"
        assert not [line for line in lines if line.startswith("Traceback")], f"{process_name}: {lines}"
    assert {p.name for p in beats} <= {p.name for p in cluster.live}


def test_postgres_restart_while_beats_and_workers_run(private_postgres: PrivatePostgres, pg_cluster: Cluster) -> None:
    restart = lambda: private_postgres.ctl("restart")  # noqa: E731
    _database_outage("pg-restart", private_postgres, pg_cluster, restart, solo_worker=False, across=15)


def test_postgres_away_for_20s_while_beats_and_workers_run(
    private_postgres: PrivatePostgres, pg_cluster: Cluster
) -> None:
    def away() -> float:
        started = time.monotonic()
        private_postgres.ctl("stop")
        hold(pg_cluster, OUTAGE)
        private_postgres.ctl("start")
        return time.monotonic() - started

    _database_outage("pg-down-20s", private_postgres, pg_cluster, away, solo_worker=True, across=OUTAGE + 12)


# -- scenario 6: the broker goes down during dispatch --------------------------------------------------------

# The jobs' interrupt threshold here: a queued run that no worker starts within it (its message died with the
# broker, or sat in the queue while the worker was still reconnecting) is ended by a beat's monitor by then.
BROKER_THRESHOLD = 8.0


@dataclass
class OutageBroker:
    """A broker the test can take away and bring back: `stop()`, `start()`."""

    kind: str
    url: str
    stop: Callable[[], float | None]  # how long the stop / the start took, when measured
    start: Callable[[], float | None]
    description: str


@pytest.fixture(
    params=[
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("rabbitmq", marks=pytest.mark.rabbitmq),
    ]
)
def outage_broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OutageBroker]:
    """Redis: a private redis-server, killed (what it held is lost) and started again on the same port.
    RabbitMQ: a private node (tests/helpers/rabbitmq.py), stopped with `rabbitmqctl stop` and started again on
    the same port; its durable queues keep their persistent messages across the stop, as in production."""
    if request.param == "redis":
        redis: PrivateRedis = request.getfixturevalue("private_redis")
        yield OutageBroker("redis", redis.url, redis.stop, redis.start, "redis (private, killed)")
        return
    node: PrivateRabbitMQ = request.getfixturevalue("private_rabbitmq")
    yield OutageBroker(
        "rabbitmq",
        node.url,
        node.stop,
        node.start,
        "rabbitmq (private node, rabbitmqctl stop / rabbitmq-server -detached)",
    )


@contextlib.contextmanager
def cluster_on_broker(
    database: Database, kind: str, url: str, real_url: str, processes: Processes, tmp_path: Path
) -> Iterator[Cluster]:
    """A cluster whose processes reach the broker at `url` (a proxy, or a private server); its queue is deleted
    at the end through `real_url` (the shared server's; "" for a private server that dies with the test)."""
    broker = Broker(kind, {"broker_url": url}, f"dbsched-faults-{uuid.uuid4().hex[:12]}")
    cluster = Cluster(database, broker, processes, tmp_path)
    try:
        yield cluster
    finally:
        cluster.close()
        if real_url:
            cleanup_queue(Broker(kind, {"broker_url": real_url}, broker.queue))


@pytest.fixture
def broker_cluster(
    postgres_database: Database, outage_broker: OutageBroker, processes: Processes, tmp_path: Path
) -> Iterator[Cluster]:
    # Both brokers are private servers that die with the test: no queue to delete on a shared one.
    with cluster_on_broker(postgres_database, outage_broker.kind, outage_broker.url, "", processes, tmp_path) as c:
        yield c


def _not_published(run: RunRecord) -> bool:
    return run.status == "failed" and (run.error or "").startswith("not published") and run.start_time is None


def _unstarted_interrupted(run: RunRecord) -> bool:
    """Claimed and sent, but no worker started it within the threshold: ended by a beat's monitor."""
    return run.status == "interrupted" and (run.error or "").startswith("stalled") and run.start_time is None


@dataclass
class BrokerReturn:
    """What a broker scenario finds once the broker answers again."""

    runs: list[RunRecord]
    not_published: list[RunRecord]  # ended `failed`: the beat could not publish them
    unstarted: list[RunRecord]  # sent, not started within the threshold: ended `interrupted` by a monitor
    lost: list[RunRecord]  # anything else that did not complete
    first_run: float  # seconds from the return to the first job's run starting
    all_run: float  # ... to every job's
    doubled: int  # samples of a job with two active runs

    def figures(self) -> dict[str, Any]:
        """The counts both broker scenarios report."""
        return {
            "not_published": len(self.not_published),
            "first_run_after": round(self.first_run, 1),
            "all_jobs_ran_after": round(self.all_run, 1),
            "runs": len(self.runs),
            "lost": len(self.lost),
            "doubled": self.doubled,
        }


def after_the_broker_returns(cluster: Cluster, sampler: RunSampler, back: dt.datetime) -> BrokerReturn:
    """Each quick job runs again after `back` (the database clock), every run claimed before it ends
    (completed, not published, or not started within the threshold and interrupted), no job had two active
    runs and no run started twice."""
    resumed = [
        cluster.wait_run(
            job,
            lambda run: done(run) and run.start_time is not None and run.start_time > back,
            timeout=120,
            message=f"a run of {job} started after the broker came back",
        )
        for job in QUICK_JOBS
    ]
    cluster.wait(
        lambda: all(run.end_time is not None for run in cluster.runs() if run.create_time < back),
        BROKER_THRESHOLD + 30,
        "every run claimed before the broker came back to end",
    )
    sampler.stop()
    sampler.check()
    runs = cluster.runs()
    cluster.assert_started_once(runs)
    expected = lambda run: _not_published(run) or _unstarted_interrupted(run)  # noqa: E731
    return BrokerReturn(
        runs=runs,
        not_published=[run for run in runs if _not_published(run)],
        unstarted=[run for run in runs if _unstarted_interrupted(run)],
        lost=lost_runs(runs, cluster.repo.database_now(), expected),
        first_run=min(seconds_between(back, run.start_time) for run in resumed),  # type: ignore[arg-type]
        all_run=max(seconds_between(back, run.start_time) for run in resumed),  # type: ignore[arg-type]
        doubled=len(sampler.double_active),
    )


def test_broker_down_during_dispatch(outage_broker: OutageBroker, broker_cluster: Cluster) -> None:
    cluster = broker_cluster
    settings = {"dbsched_retry_backoff": [0.5, 4]}
    jobs = [quick(job, 1.0, interrupt_threshold=BROKER_THRESHOLD) for job in QUICK_JOBS]
    worker = cluster.worker(jobs, settings=settings)
    beat = cluster.beat(settings=settings)
    worker.wait_ready()
    sampler = cluster.sampler()
    for job in QUICK_JOBS:
        cluster.wait_runs(job, 2, done, timeout=90)
    offsets = {process.name: log_size(process) for process in cluster.live}

    went_down = cluster.repo.database_now()
    stop_s = outage_broker.stop()
    # The beat goes on claiming; what it cannot publish it ends `failed` ("not published") and retries.
    cluster.wait_run(QUICK_JOBS[0], _not_published, timeout=OUTAGE, message="a run that could not be published")
    hold(cluster, OUTAGE - seconds_between(went_down, cluster.repo.database_now()))
    start_s = outage_broker.start()
    came_back = cluster.repo.database_now()

    after = after_the_broker_returns(cluster, sampler, came_back)
    unstarted, lost, all_run = after.unstarted, after.lost, after.all_run
    # Sent before the stop, started after the start: the message waited out the stop in a durable queue.
    kept = [run for run in after.runs if run.create_time < went_down and run.start_time and run.start_time > came_back]
    cluster.processes.check_alive(worker, beat)
    beat_errors = error_lines(beat, offsets[beat.name])
    worker_errors = error_lines(worker, offsets[worker.name])
    beat_log = beat.log()
    report(
        f"broker-down-20s-{outage_broker.kind}",
        broker=outage_broker.description,
        down=round(seconds_between(went_down, came_back), 1),
        broker_stop_s=round(stop_s, 1) if stop_s is not None else None,
        broker_start_s=round(start_s, 1) if start_s is not None else None,
        **after.figures(),
        unstarted_interrupted=len(unstarted),
        kept_across_stop=len(kept),
        beat_error_lines=len(beat_errors),
        worker_error_lines=len(worker_errors),
        duplicate_deliveries_dropped=worker.log().count("dropping the message for run"),
    )
    assert not lost, f"runs lost or falsely ended: {describe(lost)}"
    assert after.not_published, "no run was refused by the broker: the outage was not during dispatch"
    for run in unstarted:
        # Ended by a beat's monitor once older than the job's threshold: threshold + monitor interval + slack.
        assert run.end_time is not None
        assert seconds_between(run.create_time, run.end_time) <= BROKER_THRESHOLD + 0.3 + LATENESS, describe([run])
    # The beat says once that it cannot publish, and once that it can again: no line per tick, no traceback.
    assert len(beat_errors) <= ERROR_LINES_BOUND, beat_errors[:20]
    assert not [line for line in beat_errors if line.startswith("Traceback")], beat_errors[:10]
    assert "publishing works again" in beat_log
    # Celery's worker reconnects with its own backoff (2, 4, 6, ... s): the jobs run within it.
    assert all_run <= 60, f"a job ran only {all_run:.1f}s after the broker came back"


# -- issue 15, item 1: the database black-holed ---------------------------------------------------------------

BLACKHOLE = 25.0  # seconds the database stays silent
# A process notices within dbsched_client_timeout (20 s: a statement on a connection it holds) plus, for a
# connection taken from the pool, the connect timeout (10 s: the pre-ping is cut, and the pool tries one new
# connection before it gives up): 30 s. The slack is for the tick that notices and 2 shared cores.
NOTICE_BOUND = 30.0
NOTICE_SLACK = 3.0
# Claims resume within the client timeout of the database's return (a statement sent into the black hole just
# before it ended waits that long for an answer that never comes), plus RESUME_BOUND's slack.
BLACKHOLE_RESUME_BOUND = 20.0 + RESUME_BOUND
_LOG_TIME = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): ")


class ProxiedCluster(Cluster):
    """A cluster whose celery processes reach the database through `url` (a proxy); the test's own reads
    (the sampler, the waits) go to the database directly."""

    def __init__(self, url: str, *args: Any) -> None:
        super().__init__(*args)
        self.process_url = url
        self.direct: set[str] = set()  # names of the processes that reach the database directly instead

    def env(self, name: str, jobs: Sequence[dict[str, Any]], settings: dict[str, Any] | None) -> dict[str, str]:
        env = super().env(name, jobs, settings)
        return env if name in self.direct else {**env, "E2E_DATABASE_URL": self.process_url}


@pytest.fixture
def blackhole_cluster(
    postgres_database: Database, pg_proxy: TcpProxy, rabbitmq_broker: Broker, processes: Processes, tmp_path: Path
) -> Iterator[ProxiedCluster]:
    url = with_port(postgres_database.url, pg_proxy.port)
    cluster = ProxiedCluster(url, postgres_database, rabbitmq_broker, processes, tmp_path)
    try:
        yield cluster
    finally:
        pg_proxy.restore()
        cluster.close()


def first_line_time(process: CeleryProcess, since: int, text: str) -> dt.datetime | None:
    """The time stamp of the first log line after byte offset `since` that contains `text`."""
    with open(process.log_path, "rb") as f:
        f.seek(since)
        for line in f.read().decode(errors="replace").splitlines():
            found = _LOG_TIME.match(line)
            if found and text in line:
                return dt.datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S,%f")
    return None


def wait_notice(
    cluster: Cluster, process: CeleryProcess, since: int, start: dt.datetime, timeout: float, what: str
) -> float:
    """Seconds from `start` (local time: the processes' log time stamps are local) to `process`'s first
    "database unavailable" line after byte offset `since`, waited for at most `timeout` (`what`: for the
    message)."""

    def noticed() -> float | None:
        moment = first_line_time(process, since, "database unavailable")
        return None if moment is None else (moment - start).total_seconds()

    seconds: float = cluster.wait(noticed, timeout, what)
    return seconds


@pytest.mark.postgres
@pytest.mark.rabbitmq
def test_database_black_holed_while_a_beat_and_a_worker_run(
    pg_proxy: TcpProxy, blackhole_cluster: ProxiedCluster
) -> None:
    """The database stops answering without refusing (every packet dropped, the TCP connections up) for 25 s
    while a beat claims four jobs every second and a worker runs them: each process notices within the bound
    and keeps running, claims resume once the database answers again, no slot is run twice, and no run is lost
    but those claimed at the black hole's edge."""
    cluster = blackhole_cluster
    worker = cluster.worker([quick(job, 1.0) for job in QUICK_JOBS], concurrency=4)
    beat = cluster.beat()
    worker.wait_ready()
    sampler = cluster.sampler()
    for job in QUICK_JOBS:
        cluster.wait_runs(job, 2, done, timeout=90)
    before = {process.name: error_lines(process) for process in cluster.live}
    assert not any(before.values()), f"error lines before the black hole: {before}"
    offsets = {process.name: log_size(process) for process in cluster.live}

    went = cluster.repo.database_now()
    silent_from = dt.datetime.now()  # the processes' log time stamps are local
    pg_proxy.blackhole()
    hold(cluster, BLACKHOLE)
    pg_proxy.restore()
    back = cluster.repo.database_now()

    resumed = first_claims_after(cluster, QUICK_JOBS, back, timeout=BLACKHOLE_RESUME_BOUND + 30)
    resume_first = min(seconds_between(back, run.create_time) for run in resumed)
    resume_all = max(seconds_between(back, run.create_time) for run in resumed)

    def noticed() -> dict[str, float] | None:
        times = {p.name: first_line_time(p, offsets[p.name], "database unavailable") for p in (beat, worker)}
        if any(moment is None for moment in times.values()):
            return None
        return {name: (moment - silent_from).total_seconds() for name, moment in times.items() if moment}

    notice = cluster.wait(noticed, NOTICE_BOUND + NOTICE_SLACK + 10, "the beat and the worker to log the outage")
    after = after_the_database_returns(cluster, sampler, went, back, offsets)
    cluster.processes.check_alive(worker, beat)
    report(
        "pg-blackhole-25s",
        silent=round(seconds_between(went, back), 1),
        beat_noticed_after=round(notice["beat"], 1),
        worker_noticed_after=round(notice["worker"], 1),
        claims_resumed_after=round(resume_first, 2),
        all_jobs_resumed_after=round(resume_all, 2),
        **after.figures(),
        failed=sum(run.status == "failed" for run in after.runs),
        bytes_dropped=pg_proxy.dropped,
    )
    assert not after.lost, f"runs lost or falsely ended outside the black hole: {describe(after.lost)}"
    for name, seconds in notice.items():
        assert seconds <= NOTICE_BOUND + NOTICE_SLACK, f"{name} noticed the black hole after {seconds:.1f}s"
    assert resume_all <= BLACKHOLE_RESUME_BOUND, f"claiming resumed {resume_all:.1f}s after the database came back"
    for process_name, lines in after.errors.items():
        assert not [line for line in lines if line.startswith("Traceback")], f"{process_name}: {lines}"


@dataclass
class DatabaseReturn:
    """What a database black-hole scenario finds once the database answers again."""

    runs: list[RunRecord]
    lost: list[RunRecord]  # claimed away from the hole's edges and not ended as they should
    lost_in_window: list[RunRecord]  # the same, claimed within a second of the hole's start or end (counted)
    doubled: int  # samples of a job with two active runs
    errors: dict[str, list[str]]  # each live process's error lines since `offsets`

    def figures(self) -> dict[str, Any]:
        return {
            "runs": len(self.runs),
            "lost": len(self.lost),
            "lost_in_window": len(self.lost_in_window),
            "doubled": self.doubled,
            "error_lines_by_process": {name: len(lines) for name, lines in self.errors.items()},
        }


def after_the_database_returns(
    cluster: Cluster, sampler: RunSampler, went: dt.datetime, back: dt.datetime, offsets: dict[str, int]
) -> DatabaseReturn:
    """Each quick job runs again after `back`, every run claimed before `went` ends (its finish waited the hole
    out), and no run started twice; the runs counted lost apart for those claimed at the hole's edges."""
    for job in QUICK_JOBS:
        cluster.wait_runs(job, 2, lambda run: done(run) and run.create_time > back, timeout=60)
    cluster.wait(
        lambda: all(run.end_time is not None for run in cluster.runs() if run.create_time < went),
        60,
        "every run claimed before the black hole to end",
    )
    sampler.stop()
    sampler.check()
    runs = cluster.runs()
    cluster.assert_started_once(runs)
    edge_from, edge_to = went - dt.timedelta(seconds=1), back + dt.timedelta(seconds=1)
    at_edge = lambda run: edge_from <= run.create_time <= edge_to  # noqa: E731
    now = cluster.repo.database_now()
    return DatabaseReturn(
        runs=runs,
        lost=lost_runs([run for run in runs if not at_edge(run)], now, lambda run: False),
        lost_in_window=lost_runs([run for run in runs if at_edge(run)], now, lambda run: False),
        doubled=len(sampler.double_active),
        errors={process.name: error_lines(process, offsets[process.name]) for process in cluster.live},
    )


# -- issue 15, item 1: the black hole at an exact point, mid-claim and mid-finish -------------------------------

# The processes of these scenarios: a client timeout of 5 s (20 s by default; shortened for CI time) and a connect
# timeout of 5 s (10 s by default: a connection attempted into the hole just before it ends waits that long), and
# no prepared statements (`prepare_threshold` None, as dbsched_pooler sets it): psycopg then sends each statement's
# SQL text every time, so the trigger sees the claim or the finish whenever it is armed, not only before the 5th
# execution (past it, a prepared statement travels by name only).
POINT_CLIENT_TIMEOUT = 5.0
POINT_SETTINGS: dict[str, Any] = {
    "dbsched_client_timeout": POINT_CLIENT_TIMEOUT,
    "dbsched_engine_options": {"connect_args": {"prepare_threshold": None, "connect_timeout": 5}},
}
# The SQL text on the wire (PostgreSQL): the claim (statements.claim), the one-statement start (statements.start)
# and finish (statements.finish); the commit of the claim's transaction.
CLAIM_SQL = b"INSERT INTO dbsched_job_run (job_name, status, queue, claimed_by"
FINISH_SQL = b"WITH ended AS"
START_SQL = b"start_time=statement_timestamp()"  # statements.start (the worker's gate), nothing else here
COMMIT_SQL = b"COMMIT"
POINT_JOB = "e2e.point"
# The claim scenarios' job: a run claimed but never published is stalled this long after its claim.
POINT_THRESHOLD = 3.0
POINT_NOTICE_SLACK = 3.0  # the tick that notices, 2 shared cores


@pytest.mark.postgres
@pytest.mark.rabbitmq
@pytest.mark.parametrize(  # CI time: the three where the request was dropped run with --soak
    ("phase", "reaches_server"),
    [
        pytest.param(phase, reaches, id=f"{phase}-{'answer' if reaches else 'request'}-dropped", marks=marks)
        for phase in ("claim", "start", "finish")
        for reaches, marks in ((False, [pytest.mark.soak]), (True, []))
    ],
)
def test_database_black_holed_mid_claim_start_or_finish(
    pg_proxy: TcpProxy, blackhole_cluster: ProxiedCluster, phase: str, reaches_server: bool
) -> None:
    """The database goes silent at an exact point: when the beat sends its claim, or the worker its start or its
    finish (the proxy's trigger on the statement's SQL text; prepared statements off, see POINT_SETTINGS). Either
    the request is dropped (the server never sees it) or it is delivered and the hole starts before the answer
    (for the claim: at its transaction's COMMIT, so the claim is committed; the start and the finish are one
    statement each in autocommit: committed), the client never learning the outcome.

    The process sending it notices within the client timeout (5 s here) + slack, says so without a traceback, and
    keeps running; once the database answers again (the hole is ended as soon as it noticed):
    - claim, dropped: nothing was committed; the slot is claimed again and run once (completed);
    - claim, answer dropped: the run claimed (queued) was never published; it ends `interrupted` (stalled) once
      older than the job's threshold (3 s), and the job runs again;
    - start, dropped: the worker's retry starts the run after the return; it completes;
    - start, answer dropped: the run is `running` but its job never ran: the worker's retry finds it so and drops
      the message (it cannot tell its own committed start from another's); the run ends `interrupted` (stalled)
      once older than the job's threshold (3 s), never having run its job, and the job runs again;
    - finish, dropped: the worker's retry ends the run `completed` after the return;
    - finish, answer dropped: the run was `completed` by the first attempt; the retry finds it so and says the
      finish had been committed, the run stays as it was (same end time), and the job runs again.
    Always: no job has two active runs, no job runs twice for one run."""
    cluster = blackhole_cluster
    # A short threshold where the run is to be recovered by it; else the default (60 s), so that a queued or
    # running run waiting out the hole is not ended by it meanwhile.
    stranded = phase == "claim" or (phase == "start" and reaches_server)
    spec = quick(POINT_JOB, 1.0, interrupt_threshold=POINT_THRESHOLD if stranded else None)
    worker = cluster.worker([spec], settings=POINT_SETTINGS, concurrency=2)
    beat = cluster.beat(settings=POINT_SETTINGS)
    worker.wait_ready()
    sampler = cluster.sampler()
    cluster.wait_runs(POINT_JOB, 1, done, timeout=60)
    noticer = beat if phase == "claim" else worker
    offsets = {process.name: log_size(process) for process in cluster.live}

    before = {run.id for run in cluster.runs(POINT_JOB)}
    if phase == "claim":
        then = COMMIT_SQL if reaches_server else None
        pg_proxy.blackhole_on(CLAIM_SQL, forward_trigger=reaches_server, then=then)
    else:
        pg_proxy.blackhole_on(START_SQL if phase == "start" else FINISH_SQL, forward_trigger=reaches_server)
    cluster.wait(pg_proxy.hole_started.is_set, 10, f"the {noticer.name} to {phase} a run")
    silent_from = pg_proxy.hole_started_at
    assert silent_from is not None
    went = cluster.repo.database_now()

    bound = POINT_CLIENT_TIMEOUT + POINT_NOTICE_SLACK
    notice = wait_notice(
        cluster, noticer, offsets[noticer.name], silent_from, bound + 10, f"the {noticer.name} to log the black hole"
    )
    # What the database has now, before the return: the run the statement was about. A run claimed (and
    # published) between the read of `before` and the arming is started, and ended before the job's next claim.
    fresh = [run for run in cluster.runs(POINT_JOB) if run.id not in before and run.start_time is None]
    affected = cluster.runs(POINT_JOB)[-1]
    pg_proxy.restore()
    back = cluster.repo.database_now()

    if phase == "claim" and not reaches_server:
        assert not fresh, f"a claim that never reached the server took a run: {describe(fresh)}"
        final = cluster.wait_run(POINT_JOB, lambda run: run.create_time > back and done(run), 30)
        last = final
        expected = "no run; the slot claimed again after the return, completed"
    elif phase == "claim":
        assert [run.status for run in fresh] == ["queued"], f"the claim committed one run: {describe(fresh)}"
        affected = fresh[0]
        final = cluster.wait_run(POINT_JOB, lambda run: run.id == affected.id and run.end_time is not None, 30)
        assert final.status == "interrupted" and final.interrupt_reason == "stalled", describe([final])
        assert final.start_time is None, describe([final])
        last = cluster.wait_run(POINT_JOB, lambda run: run.id > affected.id and done(run), 30)
        expected = "the claimed run interrupted (stalled, never started), the job run again"
    elif phase == "start":
        assert affected.id not in before, f"the run being started: {describe([affected])}"
        if not reaches_server:
            assert affected.status == "queued", f"the start never reached the server: {describe([affected])}"
            final = cluster.wait_run(POINT_JOB, lambda run: run.id == affected.id and run.end_time is not None, 30)
            assert final.status == "completed", describe([final])
            expected = "started by the retry, completed"
        else:
            assert affected.status == "running", f"the start committed: {describe([affected])}"
            cluster.wait(
                lambda: first_line_time(worker, offsets[worker.name], f"dropping the message for run {affected.id}"),
                30,
                "the worker to drop the message of the run it had started",
            )
            final = cluster.wait_run(POINT_JOB, lambda run: run.id == affected.id and run.end_time is not None, 30)
            assert final.status == "interrupted" and final.interrupt_reason == "stalled", describe([final])
            assert not [e for e in cluster.events(affected.id) if e["event"] == "start"], "its job ran"
            expected = "running but never run: interrupted (stalled), the job run again"
        last = cluster.wait_run(POINT_JOB, lambda run: run.id > affected.id and done(run), 30)
    else:
        assert not fresh and affected.start_time is not None, f"the run being finished: {describe([affected])}"
        if reaches_server:
            assert affected.status == "completed", f"the finish committed: {describe([affected])}"
        else:
            assert affected.status == "running", f"the finish never reached the server: {describe([affected])}"
        retried = "had been committed" if reaches_server else "done after"

        def retry_logged() -> bool:
            return first_line_time(worker, offsets[worker.name], retried) is not None

        cluster.wait(retry_logged, 30, f"the worker to log {retried!r} for its finish")
        final = cluster.wait_run(POINT_JOB, lambda run: run.id == affected.id and run.end_time is not None, 30)
        assert final.status == "completed", describe([final])
        if reaches_server:
            assert final.end_time == affected.end_time, "the retried finish wrote the run again"
        else:
            assert final.end_time is not None and final.end_time >= back, describe([final])
        last = cluster.wait_run(POINT_JOB, lambda run: run.id > affected.id and done(run), 30)
        expected = "completed by the first attempt, kept" if reaches_server else "completed by the retry"
    sampler.stop()
    sampler.check()
    # The runs up to the job's first completed run after the affected one: the job stays due every second, so a
    # later run may be queued or running at this read (one active run per job: every earlier one has ended).
    runs = [run for run in cluster.runs() if run.id <= last.id]
    # A run whose start was committed unanswered is `running` once without its job ever running: left out.
    cluster.assert_started_once([run for run in runs if not (phase == "start" and run.id == affected.id)])
    cluster.processes.check_alive(worker, beat)
    unexpected = [run for run in runs if run.status != "completed" and run.id != affected.id]
    lost = lost_runs([run for run in runs if run.id != affected.id], cluster.repo.database_now(), lambda run: False)
    errors = {process.name: error_lines(process, offsets[process.name]) for process in cluster.live}
    notices = {
        process.name: sum("database unavailable" in line for line in _log_lines(process, offsets[process.name]))
        for process in cluster.live
    }
    report(
        f"pg-blackhole-mid-{phase}-{'answer' if reaches_server else 'request'}-dropped",
        database="postgresql (shared, through a TcpProxy)",
        broker="rabbitmq",
        client_timeout=POINT_CLIENT_TIMEOUT,
        noticed_after=round(notice, 1),
        silent=round(seconds_between(went, back), 1),
        affected_run=final.status if phase != "claim" or reaches_server else "none",
        job_ran_for_it=len([e for e in cluster.events(final.id) if e["event"] == "start"]),
        expected=expected,
        runs=len(runs),
        lost=len(lost),
        doubled=len(sampler.double_active),
        notice_lines_by_process=notices,
        error_lines_by_process={name: len(lines) for name, lines in errors.items()},
    )
    assert notice <= bound, f"the {noticer.name} noticed the black hole after {notice:.1f}s"
    assert not unexpected, f"runs other than the affected one did not complete: {describe(unexpected)}"
    assert not lost, describe(lost)
    assert notices[noticer.name] <= ERROR_LINES_BOUND, f"the {noticer.name} said it {notices[noticer.name]} times"
    for name, lines in errors.items():
        assert len(lines) <= ERROR_LINES_BOUND, f"{name}: {lines}"
        assert not [line for line in lines if line.startswith("Traceback")], f"{name}: {lines}"


TWO_BEATS_HOLE = 8.0  # seconds the held beat stays in the black hole (more than POINT_CLIENT_TIMEOUT)


def server_id(process: CeleryProcess) -> str:
    """A beat's server id, as its claims record it (`claimed_by`)."""
    return f"{socket.gethostname()}:{process.pid}"


def stop_between_claims(cluster: Cluster, beat: CeleryProcess, beat_id: str) -> None:
    """SIGSTOP `beat` at a moment when it has sent every run it claimed. Stopped between a claim's commit and its
    publishing, it would leave those runs `queued` and unsent: their jobs busy, no other beat claims them until the
    threshold. The idle worker starts a sent run within milliseconds, so a run of this beat still `queued` 2 s
    after the stop was caught unsent: the beat goes on until that run has started, and is stopped again."""

    def unsent() -> set[int]:
        return {run.id for run in cluster.repo.list_runs(status=RunState.QUEUED) if run.claimed_by == beat_id}

    for _ in range(5):
        os.kill(beat.pid, signal.SIGSTOP)
        try:
            wait_for(lambda: not unsent(), 2, 0.05, f"the runs claimed by {beat.name} to start")
            return
        except AssertionError:
            caught = unsent()
            os.kill(beat.pid, signal.SIGCONT)
            wait_for(lambda c=caught: not c & unsent(), 30, 0.05, f"runs {sorted(caught)} to start after the stop")
    raise AssertionError(f"{beat.name} was caught with unsent runs at each of 5 stops")


@pytest.mark.postgres
@pytest.mark.rabbitmq
# CI time: the held claim left open (27 s) runs with --soak; its lock on four jobs for the whole hole is in
# docs/reliability.md.
@pytest.mark.parametrize("held_claim", ["dropped", pytest.param("open", marks=pytest.mark.soak)])
def test_two_beats_one_black_holed_mid_claim(
    pg_proxy: TcpProxy, blackhole_cluster: ProxiedCluster, held_claim: str
) -> None:
    """Two beats claim four jobs every second; one reaches the database through the proxy, the other (and the
    worker) directly. The hole starts when the held beat sends its claim (trigger on the claim's SQL text, as in
    the test above) and lasts 8 s; the held beat notices within the client timeout and keeps running, every run
    claimed meanwhile is the direct beat's, and once the hole ends the held beat claims again; no job has two
    active runs, no run starts twice, none is lost.

    - `dropped`: the claim never reaches the server (it holds no lock there): the direct beat claims every job
      on time throughout (every run within LATENESS of its slot).
    - `open`: the claim reaches the server, which runs it (its due jobs locked, their runs inserted) and waits for
      the rest of the transaction, which never comes: those jobs are not claimed by anyone until the server ends
      that session (here when the hole ends and the held beat's closed socket reaches it; at most
      idle_in_transaction_session_timeout, 60 s, set on connect), then at once (within LATENESS of the return);
      the other jobs stay on time. The claim is rolled back: no run of it is ever seen."""
    cluster = blackhole_cluster
    cluster.direct.update({"worker", "direct"})
    worker = cluster.worker([quick(job, 1.0) for job in QUICK_JOBS], settings=POINT_SETTINGS, concurrency=4)
    held = cluster.beat(name="held", settings=POINT_SETTINGS)
    direct = cluster.beat(name="direct", settings=POINT_SETTINGS)
    worker.wait_ready()
    sampler = cluster.sampler()
    held_id, direct_id = server_id(held), server_id(direct)
    cluster.wait(lambda: {held_id, direct_id} <= {r.claimed_by for r in cluster.runs()}, 60, "a claim by each beat")
    offsets = {process.name: log_size(process) for process in cluster.live}

    # The direct beat paused while the trigger is armed, so that the held beat's next claim takes every job due
    # then (the direct one, closer to the database, wins most races): what an open claim holds is not left to luck.
    stop_between_claims(cluster, direct, direct_id)
    try:
        pg_proxy.blackhole_on(CLAIM_SQL, forward_trigger=held_claim == "open")
        cluster.wait(pg_proxy.hole_started.is_set, 10, "the held beat to claim")
    finally:
        os.kill(direct.pid, signal.SIGCONT)
    silent_from = pg_proxy.hole_started_at
    assert silent_from is not None
    went = cluster.repo.database_now()

    bound = POINT_CLIENT_TIMEOUT + POINT_NOTICE_SLACK
    notice = wait_notice(
        cluster, held, offsets[held.name], silent_from, bound + 10, "the held beat to log the black hole"
    )
    hold(cluster, max(0.0, TWO_BEATS_HOLE - (dt.datetime.now() - silent_from).total_seconds()))
    pg_proxy.restore()
    back = cluster.repo.database_now()
    held_again: RunRecord = cluster.wait(
        lambda: next((r for r in cluster.runs() if r.claimed_by == held_id and r.create_time > back), None),
        30,
        "the held beat to claim again after the return",
    )
    for job in QUICK_JOBS:
        cluster.wait_runs(job, 1, lambda run: done(run) and run.create_time > held_again.create_time, timeout=30)
    sampler.stop()
    sampler.check()

    runs = cluster.runs()
    in_hole = [run for run in runs if went <= run.create_time <= back]
    # The jobs the held beat's open claim took: nobody claimed them in the hole.
    held_jobs = {job for job in QUICK_JOBS if not any(run.job_name == job for run in in_hole)}
    lateness: dict[str, float] = {}
    for job in QUICK_JOBS:
        ended = [run for run in cluster.runs(job) if run.end_time is not None]
        assert_runs_spaced(ended, 1.0, lateness=TWO_BEATS_HOLE + LATENESS if job in held_jobs else LATENESS)
        for previous, run in itertools.pairwise(ended):
            assert run.scheduled_for is not None and previous.end_time is not None
            if run.create_time >= went:
                late = seconds_between(max(run.scheduled_for, previous.end_time), run.create_time)
                lateness[job] = max(lateness.get(job, 0.0), late)
    held_claimed_after = {
        job: seconds_between(back, next(run for run in cluster.runs(job) if run.create_time > back).create_time)
        for job in held_jobs
    }
    lost = lost_runs(runs, cluster.repo.database_now(), lambda run: False)
    cluster.assert_started_once(runs)
    cluster.processes.check_alive(worker, held, direct)
    errors = {process.name: error_lines(process, offsets[process.name]) for process in cluster.live}
    report(
        f"pg-blackhole-two-beats-held-claim-{held_claim}",
        database="postgresql (shared; one beat through a TcpProxy)",
        broker="rabbitmq",
        client_timeout=POINT_CLIENT_TIMEOUT,
        silent=round(seconds_between(went, back), 1),
        held_noticed_after=round(notice, 1),
        held_claimed_again_after=round(seconds_between(back, held_again.create_time), 2),
        claims_in_hole=len(in_hole),
        claims_in_hole_by_held=sum(run.claimed_by == held_id for run in in_hole),
        jobs_held_by_the_open_claim=len(held_jobs),
        held_jobs_claimed_after_return_ms=sorted(round(1000 * v) for v in held_claimed_after.values()),
        max_lateness_of_the_others_ms=max(
            (round(1000 * late) for job, late in lateness.items() if job not in held_jobs), default=None
        ),
        runs=len(runs),
        lost=len(lost),
        doubled=len(sampler.double_active),
        error_lines_by_process={name: len(lines) for name, lines in errors.items()},
    )
    assert notice <= bound, f"the held beat noticed the black hole after {notice:.1f}s"
    assert all(run.claimed_by == direct_id for run in in_hole), describe(in_hole)
    if held_claim == "dropped":
        assert not held_jobs, f"jobs not claimed while the held beat's claim was dropped: {held_jobs}"
    else:
        assert held_jobs, "the held beat's open claim held no job"
        for job, seconds in held_claimed_after.items():
            assert seconds <= LATENESS, f"{job}, held by the open claim, claimed {seconds:.1f}s after the return"
    # Each other job claimed about once a second while the held beat was silent (its first and last second aside).
    for job in set(QUICK_JOBS) - held_jobs:
        claims = sum(run.job_name == job for run in in_hole)
        assert claims >= TWO_BEATS_HOLE / 2, f"{job} claimed {claims} times in an {TWO_BEATS_HOLE:g} s hole"
    assert not lost, describe(lost)
    for name, lines in errors.items():
        assert len(lines) <= ERROR_LINES_BOUND, f"{name}: {lines}"
        assert not [line for line in lines if line.startswith("Traceback")], f"{name}: {lines}"


def _log_lines(process: CeleryProcess, since: int) -> list[str]:
    with open(process.log_path, "rb") as f:
        f.seek(since)
        return f.read().decode(errors="replace").splitlines()


# -- issue 15, item 1: the broker black-holed -----------------------------------------------------------------

BROKER_HOLE = 15.0  # seconds the broker stays silent
# What the workers here are given, as docs/deployment.md recommends (shorter, for CI time): RabbitMQ heartbeats
# (Celery's worker checks them at broker_heartbeat_checkrate, 2 a heartbeat; py-amqp gives up after two missed),
# and for Redis a socket timeout and kombu's health checks (a BRPOP without its reply for brpop_timeout, 1 s,
# plus health_check_interval is dropped, checked every health_check_interval).
HOLE_HEARTBEAT = 4
HOLE_HEALTH_CHECK = 4
WORKER_HOLE_SETTINGS: dict[str, dict[str, Any]] = {
    "rabbitmq": {"broker_heartbeat": HOLE_HEARTBEAT},
    "redis": {"broker_transport_options": {"socket_timeout": 5, "health_check_interval": HOLE_HEALTH_CHECK}},
}
WORKER_HOLE_BOUND = {"rabbitmq": 2.5 * HOLE_HEARTBEAT, "redis": 1 + 2 * HOLE_HEALTH_CHECK}
# The beat's publishing connection has celery_dbsched's default publish timeout (PUBLISH_TIMEOUT, 5 s): on
# Redis its first publish into the hole fails then, and it says so. On RabbitMQ a publish (without confirms)
# does not wait for the broker: it goes into the hole and the beat cannot notice; the run is recovered by its
# threshold (ended `interrupted`, stalled, and run again).
BEAT_HOLE_BOUND = {"redis": PUBLISH_TIMEOUT + 1.0}
WORKER_NOTICE = ("Connection to broker lost", "dropping stale connection", "heartbeats missed")
BEAT_NOTICE = ("a publish failed", "could not publish")


@dataclass
class HoleBroker:
    kind: str
    real_url: str
    proxy: TcpProxy

    @property
    def url(self) -> str:
        return with_port(self.real_url, self.proxy.port)


@pytest.fixture(
    params=[pytest.param("rabbitmq", marks=pytest.mark.rabbitmq), pytest.param("redis", marks=pytest.mark.redis)]
)
def hole_broker(request: pytest.FixtureRequest) -> Iterator[HoleBroker]:
    """The shared RabbitMQ or Redis behind a TcpProxy of the test's own, which the test black-holes."""
    kind: str = request.param
    require_service(kind)
    real_url = RABBITMQ_URL if kind == "rabbitmq" else REDIS_URL
    proxy = TcpProxy(host_port(real_url, 5672 if kind == "rabbitmq" else 6379))
    try:
        yield HoleBroker(kind, real_url, proxy)
    finally:
        proxy.close()


@pytest.fixture
def hole_cluster(
    postgres_database: Database, hole_broker: HoleBroker, processes: Processes, tmp_path: Path
) -> Iterator[Cluster]:
    with cluster_on_broker(
        postgres_database, hole_broker.kind, hole_broker.url, hole_broker.real_url, processes, tmp_path
    ) as c:
        try:
            yield c
        finally:
            hole_broker.proxy.restore()


def first_notice(
    process: CeleryProcess, since: int, texts: Sequence[str], start: dt.datetime
) -> tuple[float | None, str]:
    """Seconds from `start` (local time) to the first log line after `since` containing any of `texts`, and
    which text it was."""
    moments = [(moment, text) for text in texts if (moment := first_line_time(process, since, text)) is not None]
    if not moments:
        return None, ""
    moment, text = min(moments)
    return round((moment - start).total_seconds(), 1), text


@pytest.mark.postgres
def test_broker_black_holed_while_a_beat_and_a_worker_run(hole_broker: HoleBroker, hole_cluster: Cluster) -> None:
    """The broker stops answering without refusing for 15 s while a beat claims four jobs every second and a
    worker (with the recommended settings, shortened) runs them: each process that can notice does within its
    bound, nobody exits, the jobs run again after the broker is back, no slot runs twice, and a run whose
    message went into the hole is ended by its threshold (stalled) and run again."""
    kind = hole_broker.kind
    _broker_hole(hole_broker, hole_cluster, "", WORKER_HOLE_SETTINGS[kind], BROKER_HOLE, WORKER_HOLE_BOUND[kind])


# Celery's and kombu's defaults: RabbitMQ heartbeats of 120 s asked (the server's 60 s is the one negotiated when
# lower; py-amqp gives up after two missed), kombu's Redis health checks every 25 s (a BRPOP overdue by 1 + 25 s
# is dropped). Measured: 139 s (RabbitMQ's default 60 s), 49 s.
DEFAULT_WORKER_BOUND = {"rabbitmq": 2.5 * 120, "redis": 1 + 2 * 25}


@pytest.mark.soak  # the worker's bound with Celery's defaults: 51 s (Redis), 300 s (RabbitMQ)
@pytest.mark.postgres
@pytest.mark.timeout(900)
def test_soak_broker_black_holed_with_the_workers_defaults(
    request: pytest.FixtureRequest, hole_broker: HoleBroker, hole_cluster: Cluster
) -> None:
    """Why docs/deployment.md asks for these settings: the same black hole, the worker left at the defaults."""
    kind = hole_broker.kind
    if kind == "redis":
        # Measured: the worker dropped its BRPOP connection after 49 s, then never consumed again (still not 120 s
        # after the return): without a socket_timeout a command sent into the hole waits forever for its answer.
        reason = "kombu's defaults (no socket_timeout): the worker does not come back after a Redis black hole"
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))
    bound = DEFAULT_WORKER_BOUND[kind]
    _broker_hole(hole_broker, hole_cluster, "-defaults", {}, bound + 10, bound)


def _broker_hole(
    hole_broker: HoleBroker,
    cluster: Cluster,
    variant: str,
    worker_settings: dict[str, Any],
    silent: float,
    worker_bound: float,
) -> None:
    kind = hole_broker.kind
    settings = {"dbsched_retry_backoff": [0.5, 4]}
    jobs = [quick(job, 1.0, interrupt_threshold=BROKER_THRESHOLD) for job in QUICK_JOBS]
    worker = cluster.worker(jobs, settings={**settings, **worker_settings}, concurrency=4)
    beat = cluster.beat(settings=settings)
    worker.wait_ready()
    sampler = cluster.sampler()
    for job in QUICK_JOBS:
        cluster.wait_runs(job, 2, done, timeout=90)
    offsets = {process.name: log_size(process) for process in cluster.live}

    went = cluster.repo.database_now()
    silent_from = dt.datetime.now()  # the processes' log time stamps are local
    hole_broker.proxy.blackhole()
    hold(cluster, silent)
    hole_broker.proxy.restore()
    back = cluster.repo.database_now()

    after = after_the_broker_returns(cluster, sampler, back)
    unstarted, lost, all_run = after.unstarted, after.lost, after.all_run
    cluster.processes.check_alive(worker, beat)
    worker_notice, worker_said = first_notice(worker, offsets[worker.name], WORKER_NOTICE, silent_from)
    beat_notice, beat_said = first_notice(beat, offsets[beat.name], BEAT_NOTICE, silent_from)
    beat_errors = error_lines(beat, offsets[beat.name])
    report(
        f"broker-blackhole-{kind}{variant}",
        silent=round(seconds_between(went, back), 1),
        worker_noticed_after=worker_notice,
        worker_said=repr(worker_said),
        beat_noticed_after=beat_notice,
        beat_said=repr(beat_said),
        **after.figures(),
        recovered_after_threshold=len(unstarted),
        beat_error_lines=len(beat_errors),
        worker_error_lines=len(error_lines(worker, offsets[worker.name])),
        duplicate_deliveries_dropped=worker.log().count("dropping the message for run"),
        bytes_dropped=hole_broker.proxy.dropped,
    )
    assert not lost, f"runs lost or falsely ended: {describe(lost)}"
    assert worker_notice is not None, "the worker never said the broker was silent"
    assert worker_notice <= worker_bound + NOTICE_SLACK, f"the worker noticed after {worker_notice:.1f}s"
    if kind in BEAT_HOLE_BOUND:
        assert beat_notice is not None, "the beat never said it could not publish"
        assert beat_notice <= BEAT_HOLE_BOUND[kind] + NOTICE_SLACK, f"the beat noticed after {beat_notice:.1f}s"
    for run in unstarted:  # the beat's monitor runs between publishes, each held at most PUBLISH_TIMEOUT
        assert run.end_time is not None
        bound = BROKER_THRESHOLD + 0.3 + PUBLISH_TIMEOUT + LATENESS
        assert seconds_between(run.create_time, run.end_time) <= bound, describe([run])
    assert len(beat_errors) <= ERROR_LINES_BOUND, beat_errors[:20]
    assert not [line for line in beat_errors if line.startswith("Traceback")], beat_errors[:10]
    assert all_run <= 60, f"a job ran only {all_run:.1f}s after the broker came back"
