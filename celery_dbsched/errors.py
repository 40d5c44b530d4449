"""Typed errors: callers never see a bare database error for a scheduler condition."""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy.exc import DBAPIError


class DbschedError(Exception):
    """Base class of every error raised by celery_dbsched."""


class JobNotFound(DbschedError, LookupError):
    """No job with that name is registered in the database."""

    def __init__(self, name: str) -> None:
        super().__init__(f"job {name!r} not found")
        self.name = name


class RunNotFound(DbschedError, LookupError):
    """No run with that id exists (it may have been pruned)."""

    def __init__(self, run_id: object) -> None:
        super().__init__(f"run {run_id!r} not found")
        self.run_id = run_id


class InvalidRunState(DbschedError):
    """A run is not in the state the requested transition needs (e.g. it already ended)."""

    def __init__(self, run_id: int, status: str, wanted: str) -> None:
        super().__init__(f"run {run_id} is {status}, not {wanted}")
        self.run_id = run_id
        self.status = status
        self.wanted = wanted


class JobInterrupted(DbschedError):
    """Raised inside a job when its run was interrupted (stalled, cancelled or worker shutdown)."""


class JobNotRegistered(DbschedError, LookupError):
    """A worker took a run of a job whose code it does not have (the run fails, and its Celery task)."""

    def __init__(self, name: str, worker: str) -> None:
        super().__init__(name, worker)  # picklable as (name, worker): a prefork child sends it to its parent
        self.name = name
        self.worker = worker

    def __str__(self) -> str:
        return (
            f"job {self.name!r} is not registered on worker {self.worker!r}; import the module that registers it "
            "on this worker, or route the job's queue to workers that do"
        )

    def __repr__(self) -> str:  # as Celery's task failure line shows it
        return f"{type(self).__name__}({str(self)!r})"


class SchemaMismatch(DbschedError):
    """The database schema is not the one this version of celery_dbsched needs."""


class DatabaseError(DbschedError):
    """The database refused a statement for a reason that is not a scheduler condition. Unless it is the
    subclass DatabaseUnavailable, retrying the same statement fails the same way (a bug, a schema or data
    problem): it is not an outage."""


class DatabaseUnavailable(DatabaseError):
    """The database could not be reached or was too busy (down, restarting, network, lock or serialization
    conflict); the caller may retry later."""


class JobPaused(DbschedError):
    """The job is paused or disabled, so it cannot be triggered."""


# PostgreSQL SQLSTATE classes and codes that are about the server or the connection, not the statement: the
# same statement may well work when retried (https://www.postgresql.org/docs/current/errcodes-appendix.html).
_OUTAGE_SQLSTATE_CLASSES = {
    "08",  # connection exception
    "40",  # transaction rollback: serialization failure, deadlock
    "53",  # insufficient resources: too many connections, disk full, out of memory
    "57",  # operator intervention: admin/crash shutdown, cannot connect now, query cancelled (statement timeout)
    "58",  # system error: I/O
}
_OUTAGE_SQLSTATES = {
    "25006",  # read-only transaction: connected to a standby during a failover
    "25P03",  # idle-in-transaction session timeout: the server ended the session
    "55P03",  # lock not available (lock_timeout)
    "55006",  # object in use
}
# SQLite primary result codes of a busy, locked or unreachable database file; every other code (SQLITE_ERROR:
# a syntax error, too many SQL variables, ...; CONSTRAINT, MISMATCH, CORRUPT, NOTADB, READONLY ...) recurs.
_SQLITE_OUTAGE_CODES = {
    5,  # SQLITE_BUSY
    6,  # SQLITE_LOCKED
    7,  # SQLITE_NOMEM
    9,  # SQLITE_INTERRUPT
    10,  # SQLITE_IOERR
    13,  # SQLITE_FULL
    14,  # SQLITE_CANTOPEN
    15,  # SQLITE_PROTOCOL
    17,  # SQLITE_SCHEMA (the schema changed under a prepared statement)
}
# Client-side errors that drivers raise as "operational" without a code, yet recur on every retry.
_PERMANENT_MESSAGES = (
    "number of parameters must be between",  # libpq: more than 65,535 bound parameters
    "too many sql variables",  # SQLite: more than 32,766 bound parameters
    "syntax error",
)
_OUTAGE_MESSAGES = ("locked", "busy", "disk i/o", "unable to open", "connection", "server closed", "timeout")


def is_outage(error: BaseException) -> bool:
    """Whether a DBAPI error (psycopg or sqlite3) says the database is unreachable or busy, so that retrying
    later may work, rather than that the statement itself was refused (a bad statement, too many parameters,
    a schema or data problem), which retrying cannot fix. Decided by the driver's SQLSTATE or result code and
    exception class; the message only where the driver gives neither."""
    sqlstate = _sqlstate(error)
    if sqlstate is not None:
        return sqlstate[:2] in _OUTAGE_SQLSTATE_CLASSES or sqlstate in _OUTAGE_SQLSTATES
    code = getattr(error, "sqlite_errorcode", None)
    if isinstance(error, sqlite3.Error) and isinstance(code, int):
        return code & 0xFF in _SQLITE_OUTAGE_CODES
    name = type(error).__name__
    if name in ("ProgrammingError", "DataError", "IntegrityError", "NotSupportedError"):
        return False
    message = str(error).lower()
    if any(text in message for text in _PERMANENT_MESSAGES):
        return False
    if isinstance(error, sqlite3.InterfaceError):  # a value of a type SQLite cannot bind
        return False
    if name in ("OperationalError", "InterfaceError"):  # psycopg without a SQLSTATE: connecting, connection lost
        return True
    return any(text in message for text in _OUTAGE_MESSAGES)


# PostgreSQL SQLSTATEs of a schema older than the code (not an outage).
_UNDEFINED_TABLE = "42P01"
_UNDEFINED_COLUMN = "42703"


def _sqlstate(error: BaseException | None) -> str | None:
    sqlstate = getattr(error, "sqlstate", None)
    return sqlstate if isinstance(sqlstate, str) and len(sqlstate) == 5 else None


def _sqlite_message(error: BaseException | None) -> str | None:
    """SQLite reports a missing table or column as SQLITE_ERROR (code 1), as it does a syntax error: only its
    message tells them apart."""
    return str(error).lower() if isinstance(error, sqlite3.Error) else None


def _is_missing(error: BaseException | None, sqlstate: str, sqlite_text: str) -> bool:
    """A table or column this code needs is not there: the schema is older than the code (not an outage)."""
    found = _sqlstate(error)
    if found is not None:
        return found == sqlstate
    message = _sqlite_message(error)
    return message is not None and sqlite_text in message


def _schema_error(error: BaseException | None) -> SchemaMismatch | None:
    if _is_missing(error, _UNDEFINED_TABLE, "no such table"):
        return SchemaMismatch("the celery_dbsched tables are missing: run `celery -A proj dbsched migrate`")
    if _is_missing(error, _UNDEFINED_COLUMN, "no such column"):
        return SchemaMismatch(
            f"the database schema is older than this celery_dbsched ({str(error).strip().splitlines()[0]}): "
            "run `celery -A proj dbsched migrate`"
        )
    return None


def classify(exc: DBAPIError) -> DbschedError:
    """What a driver error means to callers (the one mapping): the schema is not the one this code needs, the
    database cannot be reached (worth waiting for), or a statement was refused. Decided by the driver's
    SQLSTATE (PostgreSQL) or exception class and result code (SQLite), as `is_outage` does."""
    mismatch = _schema_error(exc.orig)
    if mismatch is not None:
        return mismatch
    if exc.connection_invalidated or is_outage(exc.orig if exc.orig is not None else exc):
        return DatabaseUnavailable(f"database unavailable: {exc.orig}")
    return DatabaseError(
        f"database error (not an outage: retrying the same statement will fail the same way): {exc.orig}"
    )
