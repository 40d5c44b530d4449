"""What MySQL/MariaDB need beyond the shared suites (issue 14): the database itself refuses a second active run
of a job (a unique index over a generated column stands in for the partial index), the session time zone never
shifts a time, names compare byte for byte, and a deadlock in a claim is retried once, logged once, costing no
slot. The shared suites run on MariaDB through the `database` fixture (tests/conftest.py)."""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pymysql
import pytest
from helpers.cluster import quick, seconds_between
from helpers.polling import wait_for
from helpers.processes import Processes
from helpers.proxy import TcpProxy, closed_port, host_port, with_port
from helpers.services import MARIADB_URL, Broker, Database, unavailable
from sqlalchemy import create_engine, insert, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError
from test_faults_outages import (  # the database black-hole scenario's helpers, and its RabbitMQ fixture
    ERROR_LINES_BOUND,
    QUICK_JOBS,
    RESUME_BOUND,
    ProxiedCluster,
    after_the_database_returns,
    describe,
    done,
    first_claims_after,
    first_line_time,
    hold,
    log_size,
    rabbitmq_broker,  # noqa: F401 (a fixture)
    report,
    wait_notice,
)
from test_startup_errors import assert_one_line, exit_code, start

from celery_dbsched import JobRepository
from celery_dbsched.engine import check_mysql_server, set_client_timeout
from celery_dbsched.errors import DatabaseUnavailable, UnsupportedDatabase, is_deadlock
from celery_dbsched.migrate import migrate
from celery_dbsched.schema import job_table, run_table
from celery_dbsched.states import RunState

pytestmark = pytest.mark.mariadb
UTC = dt.timezone.utc
MARIADBD = "/usr/sbin/mariadbd"


@pytest.fixture
def repository(mariadb_database: Database) -> JobRepository:
    return mariadb_database.migrated_repository()


def _run(job: str, slot: int = 0, status: str = RunState.QUEUED) -> dict[str, object]:
    now = dt.datetime.now(UTC)
    return {
        "job_name": job,
        "status": status,
        "claimed_by": "test",
        "slot": slot,
        "create_time": now,
        "update_time": now,
    }


def test_the_database_itself_refuses_a_second_active_run_of_a_job(repository: JobRepository) -> None:
    repository.upsert_job("j", "d", every=dt.timedelta(hours=1))
    with repository.engine.begin() as conn:
        first = conn.execute(insert(run_table).values(_run("j"))).inserted_primary_key[0]
    for status in (RunState.QUEUED, RunState.RUNNING):
        with pytest.raises(IntegrityError, match="dbsched_job_run_active_slot"), repository.engine.begin() as conn:
            conn.execute(insert(run_table).values(_run("j", status=status)))
    with repository.engine.begin() as conn:  # another slot, another job, and ended runs are not refused
        conn.execute(insert(run_table).values(_run("j", slot=1)))
        conn.execute(insert(run_table).values(_run("j", status=RunState.COMPLETED)))
        conn.execute(update(run_table).where(run_table.c.id == first).values(status=RunState.COMPLETED))
        conn.execute(insert(run_table).values(_run("j")))  # slot 0 is free again once its run ended
        active = conn.execute(select(job_table.c.active_runs).where(job_table.c.name == "j")).scalar_one()
    assert active == 2  # the triggers of revision 0003 counted slot 1 and the new slot 0


def test_the_session_time_zone_is_utc_whatever_the_connection_started_with(mariadb_database: Database) -> None:
    # The driver's init_command runs before the engine's on-connect hook: a session at +05:00, as a server whose
    # global time_zone is +05:00 would give (the shared server's globals are not ours to change).
    repository = mariadb_database.migrated_repository(
        engine_options={"connect_args": {"init_command": "SET time_zone = '+05:00'"}}
    )
    with repository.engine.connect() as conn:
        assert conn.execute(text("SELECT @@session.time_zone")).scalar_one() == "+00:00"
    before = dt.datetime.now(UTC)
    job = repository.upsert_job("j", "d", every=dt.timedelta(hours=1), first_run_in=dt.timedelta(0))
    after = dt.datetime.now(UTC)
    assert before - dt.timedelta(seconds=5) <= job.next_scheduled_run <= after + dt.timedelta(seconds=5)
    assert abs(repository.database_now() - after) < dt.timedelta(seconds=5)
    # What is stored is UTC: a session left at +05:00 reads the same wall time, 5 hours behind its own NOW().
    raw = create_engine(mariadb_database.url, connect_args={"init_command": "SET time_zone = '+05:00'"})
    try:
        with raw.connect() as conn:
            stored, local_now = conn.execute(text("SELECT next_scheduled_run, NOW(6) FROM dbsched_job")).one()
    finally:
        raw.dispose()
    assert stored == job.next_scheduled_run.replace(tzinfo=None)
    assert dt.timedelta(hours=4, minutes=59) < local_now - stored < dt.timedelta(hours=5, minutes=1)


def test_names_differing_in_case_or_accent_are_two_jobs(repository: JobRepository) -> None:
    for name in ("Job", "job", "jöb", "job "):
        repository.upsert_job(name, f"the {name!r}", every=dt.timedelta(hours=1))
    jobs = {job.name: job.description for job in repository.list_jobs()}
    assert jobs == {name: f"the {name!r}" for name in ("Job", "job", "jöb", "job ")}


def _real_deadlock(url: str) -> DBAPIError:
    """A deadlock the server reports (1213): two transactions locking two rows in opposite orders."""
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE deadlock_probe (id INT PRIMARY KEY)"))
        conn.execute(text("INSERT INTO deadlock_probe VALUES (1), (2)"))
    caught: list[DBAPIError] = []
    second_locked = threading.Event()

    def other() -> None:
        with engine.connect() as conn, conn.begin():
            conn.execute(text("SELECT id FROM deadlock_probe WHERE id = 2 FOR UPDATE"))
            second_locked.set()
            try:
                conn.execute(text("SELECT id FROM deadlock_probe WHERE id = 1 FOR UPDATE"))
            except DBAPIError as exc:
                caught.append(exc)

    try:
        with engine.connect() as conn, conn.begin():
            conn.execute(text("SELECT id FROM deadlock_probe WHERE id = 1 FOR UPDATE"))
            thread = threading.Thread(target=other)
            thread.start()
            assert second_locked.wait(20)
            try:  # whichever of the two waits second closes the cycle: the server rolls one back
                conn.execute(text("SELECT id FROM deadlock_probe WHERE id = 2 FOR UPDATE"))
            except DBAPIError as exc:
                caught.append(exc)
        thread.join(20)
    finally:
        engine.dispose()
    [deadlock] = caught
    return deadlock


@pytest.fixture
def deadlock(mariadb_database: Database) -> Iterator[DBAPIError]:
    yield _real_deadlock(mariadb_database.url)


def test_a_deadlock_is_an_outage_worth_retrying(deadlock: DBAPIError) -> None:
    from celery_dbsched.errors import classify

    assert is_deadlock(deadlock.orig) and is_deadlock(deadlock)
    assert isinstance(classify(deadlock), DatabaseUnavailable)


def test_a_claim_that_deadlocks_is_made_again_once_logged_once_and_costs_no_slot(
    repository: JobRepository, deadlock: DBAPIError, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    repository.upsert_job("j", "d", every=dt.timedelta(hours=1), first_run_in=dt.timedelta(0))
    original = JobRepository._skip_misfired
    calls = []

    def deadlocked_once(self: JobRepository, conn: object, limit: int) -> None:
        calls.append(limit)
        original(self, conn, limit)  # type: ignore[arg-type]
        if len(calls) == 1:
            raise deadlock

    monkeypatch.setattr(JobRepository, "_skip_misfired", deadlocked_once)
    with caplog.at_level(logging.WARNING, logger="celery_dbsched.repository"):
        claim = repository.claim_runs("beat-1", 10)
    assert [run.job_name for run in claim.runs] == ["j"] and len(calls) == 2
    assert [record.message for record in caplog.records if "deadlock" in record.message] == [
        f"celery_dbsched: claim by beat-1 hit a deadlock, trying again: {classify_text(deadlock)}"
    ]
    assert [run.job_name for run in repository.list_runs()] == ["j"]
    # Twice in a row is not retried again: the error comes out, as any outage does.
    calls.clear()
    monkeypatch.setattr(JobRepository, "_skip_misfired", lambda self, conn, limit: (_ for _ in ()).throw(deadlock))
    with pytest.raises(DatabaseUnavailable, match="Deadlock"):
        repository.claim_runs("beat-1", 10)


@pytest.mark.parametrize("ending", ["complete", "fail"])
def test_a_finish_that_deadlocks_is_made_again_once_and_logged_once(
    repository: JobRepository,
    deadlock: DBAPIError,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    ending: str,
) -> None:
    """A worker's finish and a beat's claim lock a job and its run in opposite orders: MariaDB breaks the
    deadlock by rolling one back. The finish is made again (seen under load in
    test_repository.py::test_concurrent_claimers_never_run_a_job_twice_at_once, where it was an outage)."""
    repository.upsert_job("j", "d", every=dt.timedelta(hours=1), first_run_in=dt.timedelta(0))
    [run] = repository.claim_runs("beat-1", 10).runs
    repository.start_run(run.id, "w1")
    original = JobRepository._end_run
    calls = []

    def deadlocked_once(self: JobRepository, *args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        ended = original(self, *args, **kwargs)
        if len(calls) == 1:
            raise deadlock  # after the run's update: the rollback undoes it
        return ended

    monkeypatch.setattr(JobRepository, "_end_run", deadlocked_once)
    with caplog.at_level(logging.WARNING, logger="celery_dbsched.repository"):
        ended = repository.complete_run(run.id) if ending == "complete" else repository.fail_run(run.id, "boom")
    assert ended.status == ("completed" if ending == "complete" else "failed") and len(calls) == 2
    verb = "completing" if ending == "complete" else "failing"
    assert [record.message for record in caplog.records if "deadlock" in record.message] == [
        f"celery_dbsched: {verb} run {run.id} hit a deadlock, trying again: {classify_text(deadlock)}"
    ]
    [stored] = repository.list_runs()
    assert stored.status == ended.status and stored.end_time == ended.end_time


def classify_text(exc: DBAPIError) -> str:
    from celery_dbsched.errors import classify

    return str(classify(exc))


def test_migrations_run_on_an_empty_database_and_again(repository: JobRepository) -> None:
    # The fixture migrated an empty database; once more finds it current and changes nothing.
    from celery_dbsched.migrate import head_revision

    assert migrate(repository.engine) == head_revision()


# -- servers celery_dbsched does not support: one clear error, before any statement -------------------------


@pytest.mark.parametrize(
    ("announced", "supported"),
    [
        ("8.0.36", False),  # MySQL 8: no INSERT ... RETURNING
        ("8.4.3-commercial", False),
        ("5.7.44-log", False),
        ("5.5.5-10.5.23-MariaDB", False),  # MariaDB before 10.6: no SKIP LOCKED
        ("10.5.2-MariaDB-1:10.5.2+maria~focal", False),
        ("10.6.0-MariaDB", True),
        ("5.5.5-10.11.19-MariaDB-0+deb12u1", True),  # what 10.11 announces to PyMySQL
        ("11.4.2-MariaDB", True),
    ],
)
def test_only_mariadb_10_6_or_later_is_accepted(announced: str, supported: bool) -> None:
    if supported:
        check_mysql_server(announced)
        return
    with pytest.raises(UnsupportedDatabase, match=r"^dbsched_database_url: the server is (MySQL|MariaDB) ") as info:
        check_mysql_server(announced)
    assert "5.5.5-" not in str(info.value)
    assert "MariaDB 10.6 or later" in str(info.value) and "PostgreSQL" in str(info.value)


class LookalikeServer:
    """A private MariaDB server that announces itself as MySQL 8 (`--version=8.0.36`): what a beat, a worker
    and the CLI meet when pointed at MySQL 8, which cannot be installed here."""

    def __init__(self, version: str) -> None:
        # Not under pytest's tmp_path: its folders are private to root, and the server runs as mysql.
        self.folder = Path(tempfile.mkdtemp(prefix="dbsched-mysql-"))
        self.version = version
        self.process: subprocess.Popen[bytes] | None = None
        self.port = closed_port()
        self.url = f"mysql+pymysql://root@127.0.0.1:{self.port}/mysql"

    def start(self) -> None:
        data = self.folder / "data"
        shutil.chown(self.folder, "mysql", "mysql")
        installed = subprocess.run(
            ["mariadb-install-db", "--no-defaults", f"--datadir={data}", "--user=mysql", "--skip-test-db"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert installed.returncode == 0, installed.stdout + installed.stderr
        self.process = process = subprocess.Popen(
            [
                "runuser", "-u", "mysql", "--", MARIADBD, "--no-defaults", f"--datadir={data}",
                f"--port={self.port}", "--bind-address=127.0.0.1", f"--socket={self.folder / 'mysqld.sock'}",
                f"--pid-file={self.folder / 'mysqld.pid'}", "--skip-grant-tables", "--skip-log-bin",
                f"--version={self.version}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=(self.folder / "server.log").open("wb"),
        )  # fmt: skip

        def answers() -> bool:
            try:
                pymysql.connect(host="127.0.0.1", port=self.port, user="root", connect_timeout=1).close()
                return True
            except pymysql.Error:
                assert process.poll() is None, (self.folder / "server.log").read_text()
                return False

        wait_for(answers, 60, interval=0.1, message="the private MariaDB server to answer")

    def stop(self) -> None:
        process = self.process
        if process is not None and process.poll() is None:
            pid_file = self.folder / "mysqld.pid"
            if pid_file.exists():  # runuser's child, the server itself
                os.kill(int(pid_file.read_text()), signal.SIGTERM)
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture(scope="module")
def mysql_8() -> Iterator[LookalikeServer]:
    missing = [tool for tool in ("mariadb-install-db", "runuser") if not shutil.which(tool)]
    if missing or not os.path.exists(MARIADBD) or os.geteuid() != 0:
        unavailable(f"a private MariaDB server needs root, {MARIADBD} and {', '.join(missing) or 'runuser'}")
    server = LookalikeServer("8.0.36")
    try:
        server.start()
        yield server
    finally:
        server.stop()


def test_mysql_8_is_refused_in_one_error_before_any_statement(mysql_8: LookalikeServer) -> None:
    repository = JobRepository(mysql_8.url)
    try:
        with pytest.raises(UnsupportedDatabase, match=r"the server is MySQL 8\.0\.36, which celery_dbsched does not"):
            migrate(repository.engine)
        with pytest.raises(UnsupportedDatabase):
            repository.list_jobs()
    finally:
        repository.close()


@pytest.mark.processes
@pytest.mark.parametrize("command", ["beat", "worker", "cli"])
def test_a_beat_a_worker_and_the_cli_on_mysql_8_exit_1_in_one_line(
    mysql_8: LookalikeServer, processes: Processes, command: str
) -> None:
    process = start(processes, command, mysql_8.url)
    assert exit_code(process) == 1
    assert_one_line(process, "the server is MySQL 8.0.36, which celery_dbsched does not support", command)


# -- issue 15, item 1: MariaDB behind a network black hole --------------------------------------------------

BLACKHOLE_MARGIN = 1.5  # how late past its bound a timeout may fire on a loaded machine


@pytest.fixture
def mariadb_proxy() -> Iterator[TcpProxy]:
    """A proxy in front of the shared MariaDB (black-holing it affects only who connects through it)."""
    proxy = TcpProxy(host_port(MARIADB_URL, 3306))
    try:
        yield proxy
    finally:
        proxy.close()


def _proxied(
    database: Database, proxy: TcpProxy | None, query: dict[str, str] | None = None, **options: object
) -> JobRepository:
    url = make_url(with_port(database.url, proxy.port) if proxy else database.url).update_query_dict(query or {})
    repository = JobRepository(url.render_as_string(False), client_timeout=2.0, engine_options=options or None)
    database.repositories.append(repository)
    return repository


def _timeouts(repository: JobRepository) -> tuple[object, object, object]:
    with repository.engine.connect() as conn:
        driver = conn.connection.driver_connection
        return driver.connect_timeout, driver._read_timeout, driver._write_timeout  # type: ignore[union-attr]


def _silent_heartbeat(repository: JobRepository, proxy: TcpProxy) -> float:
    """How long a heartbeat (a transaction on a pooled, pre-pinged connection) takes to fail once the proxy
    black-holes; it must fail as an outage."""
    repository.heartbeat("w1", "worker", "host", 1)
    proxy.blackhole()
    started = time.monotonic()
    with pytest.raises(DatabaseUnavailable) as excinfo:
        repository.heartbeat("w1", "worker", "host", 1)
    took = time.monotonic() - started
    assert "2013" in str(excinfo.value.__cause__) or "timed out" in str(excinfo.value), repr(excinfo.value)
    assert proxy.dropped > 0
    proxy.restore()
    repository.heartbeat("w1", "worker", "host", 1)  # a new connection: the timed-out one was discarded
    return took


@pytest.mark.slow
def test_a_statement_into_a_black_hole_is_an_outage_within_the_client_timeout(
    mariadb_database: Database, mariadb_proxy: TcpProxy
) -> None:
    """dbsched_client_timeout (2 s here) is PyMySQL's read and write timeout: the pre-ping of the pooled connection
    times out after 2 s, the pool's new connection waits as long for the server's greeting (its read timeout
    too), then the outage is raised: 2 x 2 s."""
    mariadb_database.migrated_repository()
    repository = _proxied(mariadb_database, mariadb_proxy)
    assert _timeouts(repository) == (10, 2.0, 2.0)
    took = _silent_heartbeat(repository, mariadb_proxy)
    print(f"\nMariaDB black hole: a heartbeat failed after {took:.2f}s (client timeout 2 s)")
    assert 2.0 <= took <= 2 * 2.0 + BLACKHOLE_MARGIN, took


@pytest.mark.slow
def test_a_transaction_into_a_black_hole_is_an_outage_within_the_client_timeout(
    mariadb_database: Database, mariadb_proxy: TcpProxy
) -> None:
    """On a connection already checked out (inside a transaction, no pre-ping): the read timeout alone."""
    repository = _proxied(mariadb_database, mariadb_proxy)
    with repository.engine.connect() as conn:
        conn.execute(text("SELECT 1"))
        mariadb_proxy.blackhole()
        started = time.monotonic()
        with pytest.raises(DBAPIError) as excinfo:
            conn.execute(text("SELECT 2"))
        took = time.monotonic() - started
        assert conn.invalidated
    assert 2.0 <= took <= 2.0 + BLACKHOLE_MARGIN, took
    assert isinstance(excinfo.value.orig, pymysql.err.OperationalError) and excinfo.value.orig.args[0] == 2013
    mariadb_proxy.restore()


@pytest.mark.slow
@pytest.mark.parametrize("where", ["url", "connect_args"])
def test_the_url_or_connect_args_override_the_read_timeout(
    mariadb_database: Database, mariadb_proxy: TcpProxy, where: str
) -> None:
    mariadb_database.migrated_repository()
    if where == "url":
        repository = _proxied(mariadb_database, mariadb_proxy, {"read_timeout": "1", "connect_timeout": "4"})
    else:
        args = {"read_timeout": 1, "connect_timeout": 4}
        repository = _proxied(mariadb_database, mariadb_proxy, connect_args=args)
    assert _timeouts(repository) == (4, 1, 2.0)
    took = _silent_heartbeat(repository, mariadb_proxy)
    assert 1.0 <= took <= 2 * 1.0 + BLACKHOLE_MARGIN, took


def test_without_the_client_timeout_pymysql_keeps_no_read_timeout(mariadb_database: Database) -> None:
    repository = JobRepository(mariadb_database.url, client_timeout=None)
    mariadb_database.repositories.append(repository)
    assert _timeouts(repository) == (10, None, None)


def test_migrations_run_without_the_read_timeout(mariadb_database: Database) -> None:
    """As on PostgreSQL (the watchdog off): a migration may legitimately take long. Restored afterwards."""
    repository = _proxied(mariadb_database, None)
    with repository.engine.connect() as conn:
        driver = conn.connection.driver_connection
        with set_client_timeout(driver, None):
            assert (driver._read_timeout, driver._write_timeout) == (None, None)  # type: ignore[union-attr]
        assert (driver._read_timeout, driver._write_timeout) == (2.0, 2.0)  # type: ignore[union-attr]


MARIADB_HOLE = 14.0  # seconds MariaDB stays silent in the process test (more than its notice bound)
MARIADB_HOLE_TIMEOUT = 5.0  # the processes' dbsched_client_timeout there (20 s by default; CI time)
# A process notices within twice its client timeout (a statement through the pool: the pre-ping, then the new
# connection's greeting, each bounded by PyMySQL's read timeout), plus a tick and 2 shared cores.
MARIADB_NOTICE_BOUND = 2 * MARIADB_HOLE_TIMEOUT + 3.0


@pytest.fixture
def mariadb_hole_cluster(
    mariadb_database: Database,
    mariadb_proxy: TcpProxy,
    rabbitmq_broker: Broker,  # noqa: F811 (the fixture imported above)
    processes: Processes,
    tmp_path: Path,
) -> Iterator[ProxiedCluster]:
    url = with_port(mariadb_database.url, mariadb_proxy.port)
    cluster = ProxiedCluster(url, mariadb_database, rabbitmq_broker, processes, tmp_path)
    try:
        yield cluster
    finally:
        mariadb_proxy.restore()
        cluster.close()


@pytest.mark.rabbitmq
@pytest.mark.e2e  # real beat and worker, bounds in seconds: one at a time under xdist
def test_mariadb_black_holed_while_a_beat_and_a_worker_run(
    mariadb_proxy: TcpProxy, mariadb_hole_cluster: ProxiedCluster
) -> None:
    """MariaDB stops answering without refusing for 14 s while a beat claims four jobs every second and a worker
    runs them (both through the proxy, client timeout 5 s): the beat notices within twice its client timeout
    (PyMySQL's read timeout, the default now), logs it once, keeps running; claims resume after the return; no job
    has two active runs, no run starts twice, none is lost but those at the hole's edge (counted)."""
    cluster = mariadb_hole_cluster
    settings = {"dbsched_client_timeout": MARIADB_HOLE_TIMEOUT}
    worker = cluster.worker([quick(job, 1.0) for job in QUICK_JOBS], settings=settings, concurrency=4)
    beat = cluster.beat(settings=settings)
    worker.wait_ready()
    sampler = cluster.sampler()
    for job in QUICK_JOBS:
        cluster.wait_runs(job, 2, done, timeout=90)
    offsets = {process.name: log_size(process) for process in cluster.live}

    went = cluster.repo.database_now()
    silent_from = dt.datetime.now()  # the processes' log time stamps are local
    mariadb_proxy.blackhole()

    notice = wait_notice(
        cluster, beat, offsets[beat.name], silent_from, MARIADB_NOTICE_BOUND + 10, "the beat to log the black hole"
    )
    hold(cluster, max(0.0, MARIADB_HOLE - (dt.datetime.now() - silent_from).total_seconds()))
    mariadb_proxy.restore()
    back = cluster.repo.database_now()
    resumed = first_claims_after(cluster, QUICK_JOBS, back, timeout=60)
    resume_all = max(seconds_between(back, run.create_time) for run in resumed)
    after = after_the_database_returns(cluster, sampler, went, back, offsets)
    cluster.processes.check_alive(worker, beat)
    worker_notice = first_line_time(worker, offsets[worker.name], "database unavailable")
    report(
        "mariadb-blackhole-14s",
        database="mariadb 10.11 (shared, through a TcpProxy)",
        broker="rabbitmq",
        client_timeout=MARIADB_HOLE_TIMEOUT,
        silent=round(seconds_between(went, back), 1),
        beat_noticed_after=round(notice, 1),
        worker_noticed_after=round((worker_notice - silent_from).total_seconds(), 1) if worker_notice else None,
        all_jobs_resumed_after=round(resume_all, 2),
        **after.figures(),
        bytes_dropped=mariadb_proxy.dropped,
    )
    assert notice <= MARIADB_NOTICE_BOUND, f"the beat noticed the black hole after {notice:.1f}s"
    assert not after.lost, describe(after.lost)
    assert resume_all <= 2 * MARIADB_HOLE_TIMEOUT + RESUME_BOUND, f"claims resumed {resume_all:.1f}s after the return"
    for name, lines in after.errors.items():
        assert len(lines) <= ERROR_LINES_BOUND, f"{name}: {lines}"
        assert not [line for line in lines if line.startswith("Traceback")], f"{name}: {lines}"
