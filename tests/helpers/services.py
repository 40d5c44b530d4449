"""The databases and brokers the suites run against, and whether each service answers.

PostgreSQL, MariaDB (or MySQL), RabbitMQ and Redis are used for real. On a machine without them their tests are
skipped with the reason printed; with DBSCHED_REQUIRE_SERVICES=1 (CI) a missing service fails those tests instead.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import quote, urlsplit

import pytest
from sqlalchemy import create_engine, make_url, text

from celery_dbsched.clock import Clock
from celery_dbsched.migrate import migrate
from celery_dbsched.repository import JobRepository
from celery_dbsched.settings import Settings
from helpers.templates import admin_engine, clone_migrated

POSTGRES_URL = os.environ.get("DBSCHED_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
RABBITMQ_URL = os.environ.get("DBSCHED_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")
# Under pytest-xdist each worker process (gw0, gw1, ...) takes a Redis database of its own (1, 2, ...): kombu's
# Redis transport keeps one `unacked` hash per database, and a worker restoring messages past a test's short
# visibility timeout would otherwise hand another test's in-flight messages back to their queue.
_XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
_REDIS_DB = 1 + int(_XDIST_WORKER[2:]) % 8 if _XDIST_WORKER.startswith("gw") else 0
REDIS_URL = os.environ.get("DBSCHED_TEST_REDIS_URL", f"redis://127.0.0.1:6379/{_REDIS_DB}")
# A server where the tests may create and drop databases of their own (one per test).
MARIADB_URL = os.environ.get("DBSCHED_TEST_MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306/test")
REQUIRE_SERVICES = os.environ.get("DBSCHED_REQUIRE_SERVICES", "").lower() in ("1", "true", "yes")
SOAK = os.environ.get("DBSCHED_SOAK", "").lower() in ("1", "true", "yes")

SERVICE_URLS = {"postgres": POSTGRES_URL, "mariadb": MARIADB_URL, "rabbitmq": RABBITMQ_URL, "redis": REDIS_URL}
_DEFAULT_PORTS = {"postgres": 5432, "mariadb": 3306, "rabbitmq": 5672, "redis": 6379}
_reachable: dict[str, str | None] = {}


def probe(name: str) -> str | None:
    """None when the service answers, else why not."""
    if name in _reachable:
        return _reachable[name]
    url = SERVICE_URLS[name]
    parts = urlsplit(url.replace("postgresql+psycopg", "postgresql").replace("mysql+pymysql", "mysql"))
    host, port = parts.hostname or "127.0.0.1", parts.port or _DEFAULT_PORTS[name]
    reason: str | None = None
    try:
        with socket.create_connection((host, port), timeout=2):
            pass
        if name in ("postgres", "mariadb"):
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


def unavailable(reason: str) -> NoReturn:
    """Skip the test with the reason, or fail it when the services are required (CI)."""
    if REQUIRE_SERVICES:
        pytest.fail(f"{reason}; DBSCHED_REQUIRE_SERVICES is set, so this is a failure, not a skip")
    pytest.skip(reason)


def require_service(name: str) -> None:
    reason = probe(name)
    if reason is not None:
        unavailable(f"{reason}; set DBSCHED_TEST_{name.upper()}_URL or start it to run these tests")


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nobody listened on a moment ago (for a private server of a test)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@dataclass
class Database:
    """A database to test against: SQLite in a temporary folder, a fresh schema in PostgreSQL, or a fresh
    database on the MariaDB server (`schema`: its name there). `own_database`: a fresh PostgreSQL database
    instead of a schema (dropped with it); `settings`: `Settings` fields every client of it needs (e.g. the
    pooler of a URL through PgBouncer, helpers/pgbouncer.py)."""

    kind: str
    url: str
    schema: str | None = None
    repositories: list[JobRepository] = field(default_factory=list)
    own_database: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def repository(self, *, clock: Clock | None = None, **settings: Any) -> JobRepository:
        """A repository on this database, built as the beat and the worker build theirs (`from_settings`):
        `settings` are `Settings` fields (`listen` off unless given); `clock` a `TestClock` to move time."""
        resolved = dataclasses.replace(Settings(database_url=self.url, listen=False), **{**self.settings, **settings})
        repository = JobRepository.from_settings(resolved, clock=clock)
        self.repositories.append(repository)
        return repository

    def migrated_repository(self, *, clock: Clock | None = None, **settings: Any) -> JobRepository:
        """A repository on this database, migrated: a fresh database is a copy of one migrated once per session
        (helpers/templates.py), or migrated when it cannot be."""
        fresh = not self.repositories
        admin = {"postgres": POSTGRES_URL, "mariadb": MARIADB_URL}.get(self.kind, "")
        copied = fresh and clone_migrated(self, admin)
        repository = self.repository(clock=clock, **settings)
        if not copied:
            migrate(repository.engine)
        return repository

    def conf(self) -> dict[str, Any]:
        """Celery settings that point an app at this database."""
        return {"dbsched_database_url": self.url, **self.extra_conf()}

    def extra_conf(self) -> dict[str, Any]:
        """The Celery settings of `settings` (all but the URL)."""
        return {f"dbsched_{name}": value for name, value in self.settings.items()}


def sqlite_database(folder: Path) -> Database:
    """A SQLite file in `folder` (a test's tmp_path)."""
    return Database("sqlite", f"sqlite:///{folder / 'dbsched.sqlite3'}")


def make_postgres_database() -> Database:
    require_service("postgres")
    schema = f"t_{uuid.uuid4().hex[:16]}"
    with admin_engine(POSTGRES_URL).begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    separator = "&" if "?" in POSTGRES_URL else "?"
    url = f"{POSTGRES_URL}{separator}options={quote(f'-csearch_path={schema}')}"
    return Database("postgres", url, schema)


def make_mariadb_database() -> Database:
    require_service("mariadb")
    name = f"t_{uuid.uuid4().hex[:16]}"
    with admin_engine(MARIADB_URL).begin() as conn:
        conn.execute(text(f"CREATE DATABASE `{name}`"))
    return Database("mariadb", str(make_url(MARIADB_URL).set(database=name).render_as_string(False)), name)


def drop_database(database: Database) -> None:
    for repository in database.repositories:
        repository.close()
    if database.kind == "mariadb" and database.schema is not None:
        with admin_engine(MARIADB_URL).begin() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS `{database.schema}`"))
        return
    if database.own_database is not None:
        engine = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:  # FORCE: a pooler may still hold server connections to it
            conn.execute(text(f'DROP DATABASE IF EXISTS "{database.own_database}" WITH (FORCE)'))
        engine.dispose()
        return
    if database.schema is not None:
        with admin_engine(POSTGRES_URL).begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{database.schema}" CASCADE'))


@dataclass
class Broker:
    kind: str
    settings: dict[str, Any]
    queue: str

    def conf(self) -> dict[str, Any]:
        return {**self.settings, "task_default_queue": self.queue}


def cleanup_queue(broker: Broker) -> None:
    """Delete the broker's queue (nothing to do on the filesystem transport: its folder is the test's)."""
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
