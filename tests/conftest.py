"""The suites' fixtures and hooks; the helpers they are built on live in tests/helpers.

PostgreSQL, RabbitMQ and Redis are used for real (helpers/services.py): on a machine without them their
tests are skipped with the reason printed; with DBSCHED_REQUIRE_SERVICES=1 (CI) a missing service fails those
tests instead.
"""

from __future__ import annotations

import functools
import sys
import threading
import traceback
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from helpers.apps import TestSchedulerFactory, make_app, memory_app
from helpers.browser import Browser, launched
from helpers.cluster import Cluster
from helpers.pgbouncer import PgBouncer, make_pgbouncer_database, running_pgbouncer
from helpers.processes import PROCESSES_KEY, Processes
from helpers.proxy import TcpProxy, host_port
from helpers.rabbitmq import PrivateRabbitMQ, kill_stale_nodes, rabbitmq_missing
from helpers.repository import bind_clock
from helpers.services import (
    POSTGRES_URL,
    REQUIRE_SERVICES,
    SERVICE_URLS,
    SOAK,
    Broker,
    Database,
    cleanup_queue,
    drop_database,
    make_mariadb_database,
    make_postgres_database,
    probe,
    require_service,
    unavailable,
)
from helpers.services import (
    sqlite_database as new_sqlite_database,
)

from celery_dbsched import runner
from celery_dbsched.binding import forget_repository
from celery_dbsched.clock import TestClock
from celery_dbsched.repository import JobRepository
from celery_dbsched.scheduler import Scheduler
from celery_dbsched.transport import filesystem_broker_settings

# celery_dbsched.testing: dbsched_scheduler_factory, dbsched_scheduler; helpers.xdist_groups: the e2e tests one
# at a time under pytest-xdist, the rest spread.
pytest_plugins = ["celery_dbsched.testing", "helpers.xdist_groups"]


# -- hooks ----------------------------------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true", help="also run the long fault soaks (marker `soak`)")


# What a `unit` test uses none of: a service (PostgreSQL, RabbitMQ, Redis) or a subprocess; nor is it `slow`.
NOT_UNIT_MARKERS = ("postgres", "mariadb", "rabbitmq", "redis", "e2e", "processes", "slow", "browser")
NOT_UNIT_FIXTURES = frozenset({"postgres_database", "mariadb_database", "broker", "processes", "cluster", "browser"})


def is_unit(item: pytest.Item) -> bool:
    fixtures = getattr(item, "fixturenames", ())
    return NOT_UNIT_FIXTURES.isdisjoint(fixtures) and not any(item.get_closest_marker(m) for m in NOT_UNIT_MARKERS)


# The suites whose database-parametrized tests run on MariaDB too (issue 14): the repository, scheduler, cadence,
# hostile-input, e2e and three-beats suites, as the issue asks, and the migration and MariaDB-only ones. In the
# others the mariadb param is deselected (not skipped: a CI run skips nothing), as the run's header says; they
# exercise nothing dialect-specific that these do not, and each MariaDB suite costs CI time.
MARIADB_SUITES = frozenset(
    {
        "test_cadence_and_policies",
        "test_e2e",
        "test_faults_beats",
        "test_hostile_input",
        "test_mariadb",
        "test_migrations",
        "test_repository",
        "test_scheduler",
        "test_templates",
    }
)


@pytest.hookimpl(tryfirst=True)  # before `-m` selects on the markers added here
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Marks `unit` every test that uses no service and no subprocess (the fast loop: `pytest -m unit`). The
    `soak` tests are opt-in: deselected (not skipped) unless asked for, so CI stays within its time and a
    default run reports nothing skipped for them."""
    for item in items:
        if is_unit(item):
            item.add_marker(pytest.mark.unit)
    not_on_mariadb = [item for item in items if _mariadb_pending(item)]
    if not_on_mariadb:
        config.hook.pytest_deselected(items=not_on_mariadb)
        items[:] = [item for item in items if not _mariadb_pending(item)]
    if SOAK or config.getoption("--soak"):
        return
    soaks = [item for item in items if item.get_closest_marker("soak")]
    if soaks:
        config.hook.pytest_deselected(items=soaks)
        items[:] = [item for item in items if not item.get_closest_marker("soak")]


def _mariadb_pending(item: pytest.Item) -> bool:
    """A MariaDB variant of a test in a suite that does not run on MariaDB yet."""
    return bool(item.get_closest_marker("mariadb")) and Path(str(item.fspath)).stem not in MARIADB_SUITES


def pytest_report_header(config: pytest.Config) -> list[str]:
    lines = [
        "celery_dbsched: MariaDB variants deselected outside "
        + ", ".join(sorted(MARIADB_SUITES))
        + " (the others test nothing dialect-specific beyond these)"
    ]
    for name in SERVICE_URLS:
        reason = probe(name)
        lines.append(f"celery_dbsched: {name}: " + ("available" if reason is None else f"SKIPPED - {reason}"))
    if REQUIRE_SERVICES:
        lines.append("celery_dbsched: DBSCHED_REQUIRE_SERVICES=1 - missing services fail their tests")
    if not (SOAK or config.getoption("--soak")):
        lines.append("celery_dbsched: soak tests deselected (DBSCHED_SOAK=1 or --soak runs them)")
    return lines


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Adds the tail of each celery process's log to the report of a failed test phase."""
    report = yield
    manager = item.stash.get(PROCESSES_KEY, None)
    if manager is not None and report.failed:
        for title, text in manager.log_sections():
            report.sections.append((f"celery process {title}", text))
    return report


# -- databases ------------------------------------------------------------------------------------------------


_MAKE_DATABASE: dict[str, Callable[[Path], Database]] = {
    "sqlite": new_sqlite_database,
    "postgres": lambda _: make_postgres_database(),
    "mariadb": lambda _: make_mariadb_database(),
}


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("mariadb", marks=pytest.mark.mariadb),
    ]
)
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """Each test runs on SQLite, PostgreSQL and MariaDB, each time on an empty database."""
    db = _MAKE_DATABASE[request.param](tmp_path)
    try:
        yield db
    finally:
        drop_database(db)


@pytest.fixture
def pg_proxy() -> Iterator[TcpProxy]:
    """A proxy in front of the shared PostgreSQL (black-holing it affects only who connects through it)."""
    proxy = TcpProxy(host_port(POSTGRES_URL, 5432))
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.fixture
def private_rabbitmq(tmp_path: Path) -> Iterator[PrivateRabbitMQ]:
    """A RabbitMQ node of the test's own (never the shared one), started; shut down and removed at the end,
    also when the test fails."""
    missing = rabbitmq_missing()
    if missing:
        unavailable(missing)
    kill_stale_nodes()
    node = PrivateRabbitMQ(tmp_path / "rabbitmq")
    try:
        seconds = node.start()
        print(f"\nprivate RabbitMQ {node.node} on 127.0.0.1:{node.port}, started in {seconds:.1f}s")
        yield node
    finally:
        node.close()


@pytest.fixture
def sqlite_database(tmp_path: Path) -> Iterator[Database]:
    db = new_sqlite_database(tmp_path)
    yield db
    drop_database(db)


@pytest.fixture
def postgres_database() -> Iterator[Database]:
    db = make_postgres_database()
    try:
        yield db
    finally:
        drop_database(db)


@pytest.fixture
def mariadb_database() -> Iterator[Database]:
    db = make_mariadb_database()
    try:
        yield db
    finally:
        drop_database(db)


@pytest.fixture(scope="module")
def pgbouncer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgBouncer]:
    """A private PgBouncer in transaction pooling mode in front of the shared PostgreSQL, for the test module
    (helpers/pgbouncer.py); stopped when the module's tests are done, also when they fail."""
    with running_pgbouncer(tmp_path_factory.mktemp("pgbouncer")) as bouncer:
        yield bouncer


@pytest.fixture
def pgbouncer_database(pgbouncer: PgBouncer) -> Iterator[Database]:
    """A fresh PostgreSQL database reached through `pgbouncer`, with `dbsched_pooler` set."""
    db = make_pgbouncer_database(pgbouncer)
    try:
        yield db
    finally:
        drop_database(db)


_stuck_seen: set[threading.Thread] = set()


@pytest.fixture(autouse=True)
def worker_state_undone() -> Iterator[None]:
    """Celery's `start_worker` asks its thread to stop with `state.should_terminate = 0` and puts it back only
    when the thread has exited: a worker thread that outlives its timeout would leave every later in-process
    worker and run believing the process is shutting down (one stuck test then failed 21 others in CI). After
    each test the flags are back as a fresh process has them, and a worker thread still alive fails the test's
    teardown with the thread's stack, so that the hang shows where it is."""
    from celery.worker import state

    yield
    if state.should_terminate is None and state.should_stop is None:
        return
    state.should_terminate = state.should_stop = None
    stuck = []
    for thread in threading.enumerate():
        owner = getattr(getattr(thread, "_target", None), "__self__", None)
        if thread.is_alive() and type(owner).__name__.endswith("WorkController") and thread not in _stuck_seen:
            _stuck_seen.add(thread)
            frame = sys._current_frames().get(thread.ident or 0)
            stack = "".join(traceback.format_stack(frame)) if frame is not None else "(no frame)"
            stuck.append(f"embedded worker thread {thread.name} still alive after the test, at:\n{stack}")
    if stuck:
        pytest.fail("\n".join(stuck), pytrace=False)


@pytest.fixture
def shutdown_undone() -> Iterator[None]:
    """For a test that begins this process's warm shutdown (an embedded worker stopping, or
    `cancel_local_runs(InterruptReason.SHUTDOWN)`): after it, the process is no longer shutting down, as the next test's
    fresh process would not be."""
    yield
    runner._Process.shutting_down = False


@pytest.fixture
def clock() -> TestClock:
    """The clock of the `repository` fixture: the database's, moved on by the test (`shift_to`, `freeze`)."""
    return TestClock()


@pytest.fixture
def repository(request: pytest.FixtureRequest, database: Database, clock: TestClock) -> JobRepository:
    """A migrated repository on each database, on the test's `clock`, with the `Settings` fields of the test's
    `settings` marker (`@pytest.mark.settings(retry_backoff=...)`)."""
    marker = request.node.get_closest_marker("settings")
    return database.migrated_repository(clock=clock, **(marker.kwargs if marker else {}))


# -- brokers and processes ------------------------------------------------------------------------------------


@pytest.fixture(
    params=[
        "filesystem",
        pytest.param("rabbitmq", marks=pytest.mark.rabbitmq),
        pytest.param("redis", marks=pytest.mark.redis),
    ]
)
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Broker]:
    """Each end-to-end test runs on the filesystem transport, RabbitMQ and Redis, on a queue of its own."""
    queue = f"dbsched-test-{uuid.uuid4().hex[:12]}"
    if request.param == "filesystem":
        b = Broker("filesystem", filesystem_broker_settings(tmp_path / "broker"), queue)
    else:
        require_service(request.param)
        b = Broker(request.param, {"broker_url": SERVICE_URLS[request.param]}, queue)
    yield b
    cleanup_queue(b)


@pytest.fixture
def processes(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Processes]:
    """A `Processes` for this test; every process it started is stopped at teardown."""
    manager = Processes(tmp_path / "procs")
    request.node.stash[PROCESSES_KEY] = manager
    try:
        yield manager
    finally:
        manager.stop_all()


@pytest.fixture
def e2e_database(request: pytest.FixtureRequest, db_kind: str) -> Database:
    """The database of an `on(...)` combination (helpers/cluster.py)."""
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


@pytest.fixture
def browser() -> Iterator[Browser]:
    """A headless Chromium (helpers/browser.py), its network cut to the origins a test allows; the test fails on
    any console error, uncaught page error, dialog or request elsewhere (a CDN). Skipped without chromium or
    playwright, failed instead with DBSCHED_REQUIRE_SERVICES=1 (CI)."""
    with launched() as session:
        yield session
        session.check()


# -- in-process beats and workers -----------------------------------------------------------------------------


@pytest.fixture
def app() -> Celery:
    """A bare app of this test's own."""
    return make_app("t")


@pytest.fixture
def dbsched_app(app: Celery) -> Celery:
    """`app`, for the shipped `dbsched_scheduler` fixture: a TestScheduler for it on a temporary SQLite file."""
    return app


@pytest.fixture
def scheduler(
    request: pytest.FixtureRequest, database: Database, dbsched_scheduler_factory: TestSchedulerFactory
) -> TestSchedulerFactory:
    """`scheduler(app, now=T0, **settings)`: the shipped TestScheduler factory on this test's database, its clock
    frozen at `now`: by default the test module's `T0`, None for the real clock."""
    return functools.partial(dbsched_scheduler_factory, database_url=database.url, now=request.module.T0)


@pytest.fixture
def make_scheduler() -> Iterator[Callable[..., Scheduler]]:
    """`make_scheduler(database_url, lazy=False, clock=None, **conf)`: a Scheduler built the way Celery beat
    builds it, for a fresh `memory_app` (helpers/apps.py; conf overrides any of its settings), its repository on
    `clock` when given; closed after the test."""
    schedulers: list[Scheduler] = []
    apps: list[Celery] = []

    def factory(database_url: str, *, lazy: bool = False, clock: TestClock | None = None, **conf: Any) -> Scheduler:
        app = memory_app(database_url, main="sched", **conf)
        apps.append(app)
        if clock is not None:
            bind_clock(app, clock)
        scheduler = Scheduler(app=app, lazy=lazy)
        schedulers.append(scheduler)
        return scheduler

    yield factory
    for scheduler in schedulers:
        scheduler.close()
    for app in apps:
        forget_repository(app)
