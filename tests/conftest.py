"""Shared fixtures: the databases and brokers the suites run against.

PostgreSQL, RabbitMQ and Redis are used for real. On a machine without them their tests are skipped with
the reason printed; with DBSCHED_REQUIRE_SERVICES=1 (CI) a missing service fails those tests instead.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest
from procs import processes  # noqa: F401 - the fixture of real celery worker/beat subprocesses, for every module
from sqlalchemy import create_engine, text

from celery_dbsched import runner
from celery_dbsched.binding import bind_repository
from celery_dbsched.clock import Clock, TestClock
from celery_dbsched.migrate import migrate
from celery_dbsched.repository import JobRepository
from celery_dbsched.settings import Settings
from celery_dbsched.transport import filesystem_broker_settings

POSTGRES_URL = os.environ.get("DBSCHED_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
RABBITMQ_URL = os.environ.get("DBSCHED_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")
REDIS_URL = os.environ.get("DBSCHED_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
REQUIRE_SERVICES = os.environ.get("DBSCHED_REQUIRE_SERVICES", "").lower() in ("1", "true", "yes")

_SERVICE_URLS = {"postgres": POSTGRES_URL, "rabbitmq": RABBITMQ_URL, "redis": REDIS_URL}
_reachable: dict[str, str | None] = {}


def _probe(name: str) -> str | None:
    """None when the service answers, else why not."""
    if name in _reachable:
        return _reachable[name]
    url = _SERVICE_URLS[name]
    parts = urlsplit(url.replace("postgresql+psycopg", "postgresql"))
    default_port = {"postgres": 5432, "rabbitmq": 5672, "redis": 6379}[name]
    host, port = parts.hostname or "127.0.0.1", parts.port or default_port
    reason: str | None = None
    try:
        with socket.create_connection((host, port), timeout=2):
            pass
        if name == "postgres":
            engine = create_engine(url)
            try:
                with engine.connect() as conn:
                    conn.execute(text("SELECT 1"))
            finally:
                engine.dispose()
    except Exception as exc:
        reason = f"{name} not reachable at {host}:{port} ({type(exc).__name__}: {exc})"
    _reachable[name] = reason
    return reason


def require_service(name: str) -> None:
    reason = _probe(name)
    if reason is None:
        return
    if REQUIRE_SERVICES:
        pytest.fail(f"{reason}; DBSCHED_REQUIRE_SERVICES is set, so this is a failure, not a skip")
    pytest.skip(f"{reason}; set DBSCHED_TEST_{name.upper()}_URL or start it to run these tests")


SOAK = os.environ.get("DBSCHED_SOAK", "").lower() in ("1", "true", "yes")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true", help="also run the long fault soaks (marker `soak`)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The `soak` tests are opt-in: deselected (not skipped) unless asked for, so CI stays within its time and
    a default run reports nothing skipped for them."""
    if SOAK or config.getoption("--soak"):
        return
    soaks = [item for item in items if item.get_closest_marker("soak")]
    if soaks:
        config.hook.pytest_deselected(items=soaks)
        items[:] = [item for item in items if not item.get_closest_marker("soak")]


def pytest_report_header(config: pytest.Config) -> list[str]:
    lines = []
    for name in _SERVICE_URLS:
        reason = _probe(name)
        lines.append(f"celery_dbsched: {name}: " + ("available" if reason is None else f"SKIPPED - {reason}"))
    if REQUIRE_SERVICES:
        lines.append("celery_dbsched: DBSCHED_REQUIRE_SERVICES=1 - missing services fail their tests")
    if not (SOAK or config.getoption("--soak")):
        lines.append("celery_dbsched: soak tests deselected (DBSCHED_SOAK=1 or --soak runs them)")
    return lines


@dataclass
class Database:
    """A database to test against: SQLite in a temporary folder, or a fresh schema in PostgreSQL."""

    kind: str
    url: str
    schema: str | None = None
    repositories: list[JobRepository] = field(default_factory=list)

    def repository(self, *, clock: Clock | None = None, **settings: Any) -> JobRepository:
        """A repository on this database, built as the beat and the worker build theirs (`from_settings`):
        `settings` are `Settings` fields (`listen` off unless given); `clock` a `TestClock` to move time."""
        resolved = dataclasses.replace(Settings(database_url=self.url, listen=False), **settings)
        repository = JobRepository.from_settings(resolved, clock=clock)
        self.repositories.append(repository)
        return repository

    def migrated_repository(self, *, clock: Clock | None = None, **settings: Any) -> JobRepository:
        repository = self.repository(clock=clock, **settings)
        migrate(repository.engine)
        return repository

    def conf(self) -> dict[str, Any]:
        """Celery settings that point an app at this database."""
        return {"dbsched_database_url": self.url}


def bind_clock(app: Any, clock: Clock) -> JobRepository:
    """Bind to `app`, in this process, a repository built from its settings on `clock`, the way the beat and
    the worker build theirs: the app's beat, worker and API then compute times with that clock.
    `forget_repository(app)` closes it."""
    repository = JobRepository.from_settings(Settings.from_mapping(app.conf), clock=clock)
    bind_repository(app, repository)
    return repository


def make_postgres_database() -> Database:
    require_service("postgres")
    schema = f"t_{uuid.uuid4().hex[:16]}"
    engine = create_engine(POSTGRES_URL)
    with engine.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    engine.dispose()
    separator = "&" if "?" in POSTGRES_URL else "?"
    url = f"{POSTGRES_URL}{separator}options={quote(f'-csearch_path={schema}')}"
    return Database("postgres", url, schema)


def drop_database(database: Database) -> None:
    for repository in database.repositories:
        repository.close()
    if database.schema is not None:
        engine = create_engine(POSTGRES_URL)
        with engine.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{database.schema}" CASCADE'))
        engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """Each test runs once on SQLite and once on PostgreSQL, each time on an empty database."""
    if request.param == "sqlite":
        db = Database("sqlite", f"sqlite:///{tmp_path / 'dbsched.sqlite3'}")
    else:
        db = make_postgres_database()
    try:
        yield db
    finally:
        drop_database(db)


@pytest.fixture
def sqlite_database(tmp_path: Path) -> Iterator[Database]:
    db = Database("sqlite", f"sqlite:///{tmp_path / 'dbsched.sqlite3'}")
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
def shutdown_undone() -> Iterator[None]:
    """For a test that begins this process's warm shutdown (an embedded worker stopping, or
    `cancel_active_runs("shutdown")`): after it, the process is no longer shutting down, as the next test's
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


@dataclass
class Broker:
    kind: str
    settings: dict[str, Any]
    queue: str

    def conf(self) -> dict[str, Any]:
        return {**self.settings, "task_default_queue": self.queue}


def _cleanup_queue(broker: Broker) -> None:
    if broker.kind == "filesystem":
        return
    from kombu import Connection

    try:
        with Connection(broker.settings["broker_url"], connect_timeout=5) as conn:
            channel = conn.channel()
            try:
                channel.queue_delete(broker.queue)
            finally:
                channel.close()
    except Exception:
        pass


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
        b = Broker(request.param, {"broker_url": _SERVICE_URLS[request.param]}, queue)
    yield b
    _cleanup_queue(b)
