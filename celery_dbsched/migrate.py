"""Schema migrations: Alembic revisions shipped in the package, applied under a lock so that several beats
and workers starting at once migrate exactly once."""

from __future__ import annotations

import zlib

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError

from .engine import is_mysql, set_client_timeout
from .errors import SchemaMismatch, classify, is_insufficient_privilege, migration_not_permitted

VERSION_TABLE = "dbsched_alembic_version"
_LOCK_NAME = "celery_dbsched.migrate"
_LOCK_KEY = zlib.crc32(_LOCK_NAME.encode())
MYSQL_LOCK_TIMEOUT = 600  # seconds another process's migration is waited for (GET_LOCK)


def _config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", "celery_dbsched:migrations")
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
        return context.get_current_revision()


def migrate(engine: Engine) -> str | None:
    """Upgrade to the newest revision; returns the revision found before (None: fresh database). A role that
    may read the schema but not change it (the runtime role) migrates a current schema, which changes nothing;
    when there is something to change, it gets one DatabaseError naming the privilege and the migration role."""
    if is_mysql(engine.dialect.name):
        return _migrate_mysql(engine)
    # Without the statement watchdog (dbsched_client_timeout): a migration may take long, and so may the wait
    # for another process's.
    with engine.begin() as conn, set_client_timeout(conn.connection.driver_connection, None):
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
        # SQLite: the engine's BEGIN IMMEDIATE already holds the database's write lock.
        return _upgrade(conn)


def _upgrade(conn: Connection) -> str | None:
    before = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()
    _refuse_unknown(before)
    if before != head_revision():
        try:
            command.upgrade(_config(conn), "head")
        except DBAPIError as exc:
            if is_insufficient_privilege(exc):
                raise migration_not_permitted(exc, conn.engine.url.username) from exc
            raise
    return before


def _migrate_mysql(engine: Engine) -> str | None:
    """MySQL/MariaDB: DDL commits as it goes (no transactional DDL), so the lock is a named lock of the
    session (GET_LOCK, the advisory lock's counterpart), held across the revisions' implicit commits and
    released at the end (or when the session ends)."""
    # The lock's name is per database: deployments in two databases of one server migrate independently.
    with engine.connect() as conn:
        database = conn.execute(text("SELECT DATABASE()")).scalar_one()
        name = f"{_LOCK_NAME}.{database}"[:64]
        got = conn.execute(text("SELECT GET_LOCK(:name, :timeout)"), {"name": name, "timeout": MYSQL_LOCK_TIMEOUT})
        if got.scalar_one() != 1:
            raise SchemaMismatch(
                f"another process held the migration lock {name!r} for {MYSQL_LOCK_TIMEOUT}s: is a migration "
                "stuck? (SELECT * FROM information_schema.METADATA_LOCK_INFO)"
            )
        try:
            conn.commit()
            with conn.begin():
                return _upgrade(conn)
        finally:
            conn.execute(text("SELECT RELEASE_LOCK(:name)"), {"name": name})
            conn.commit()


def _refuse_unknown(revision: str | None) -> None:
    if revision is None:
        return
    script = ScriptDirectory.from_config(_config())
    if not any(rev.revision == revision for rev in script.walk_revisions()):
        raise SchemaMismatch(
            f"the database schema is at revision {revision!r}, newer than this celery_dbsched knows "
            f"(head {head_revision()!r}): upgrade celery_dbsched on this host"
        )


def check_schema(engine: Engine) -> None:
    """Raise SchemaMismatch unless the database is at this code's revision."""
    revision = current_revision(engine)
    _refuse_unknown(revision)
    if revision != head_revision():
        found = "no celery_dbsched tables" if revision is None else f"schema revision {revision!r}"
        raise SchemaMismatch(
            f"the database has {found}, this celery_dbsched needs {head_revision()!r}: "
            "run `celery -A proj dbsched migrate` (or set dbsched_auto_migrate = True)"
        )


def prepare_schema(engine: Engine, auto_migrate: bool) -> None:
    """At beat/worker start: migrate (`dbsched_auto_migrate`, the default) or insist the schema is current. A
    database error comes out typed (`errors.classify`): an outage (DatabaseUnavailable) is worth waiting for,
    a refused connection or a missing schema (DatabaseError) is not."""
    try:
        if auto_migrate:
            migrate(engine)
        else:
            check_schema(engine)
    except DBAPIError as exc:
        raise classify(exc) from exc
