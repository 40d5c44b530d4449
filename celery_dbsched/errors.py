"""Typed errors: callers never see a bare database error for a scheduler condition."""

from __future__ import annotations

import logging
import re
import sqlite3
import time
from typing import TYPE_CHECKING, NoReturn

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


class UnsupportedDatabase(DatabaseError):
    """The server is not one celery_dbsched supports (MySQL 8, MariaDB before 10.6): not an outage."""


class DatabaseUnavailable(DatabaseError):
    """The database could not be reached or was too busy (down, restarting, network, lock or serialization
    conflict); the caller may retry later."""


class InvalidSchedule(DbschedError, ValueError):
    """A runtime schedule that cannot be stored as given (bad syntax, task name, JSON, timezone, keyword): the
    message names the schedule, the wrong thing and the fix; nothing is stored."""


class NameTaken(DbschedError, ValueError):
    """A job name is owned by another origin: a runtime schedule cannot take the name of a code (`@job`) or
    `beat_schedule` job, and those cannot take a runtime schedule's."""

    def __init__(self, name: str, owner: str, wanted: str) -> None:
        self.name, self.owner, self.wanted = name, owner, wanted
        if wanted == "runtime":
            fix = (
                "use edit for it, or remove --purge it first"
                if owner == "runtime"
                else f"choose another name (the {owner} job keeps its own)"
            )
            message = f"job name {name!r} is taken by a {owner} job; {fix}"
        else:
            message = (
                f"{wanted} job {name!r} is not stored: a runtime schedule has that name; rename the {wanted} job, "
                f"or remove the runtime schedule (dbsched remove {name} --purge)"
            )
        super().__init__(message)


class JobPaused(DbschedError):
    """The job is paused or disabled, so it cannot be triggered."""


class FieldError(ValueError):
    """A value typed for a run-time schedule (a `dbsched add|edit` option, a dashboard form field) that cannot be
    read: `field` names it (the option is `--` and the name with dashes), `reason` says what to write instead."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason

    @property
    def option(self) -> str:
        """The field as the command's option: `--routing-key`; the schedule as its four options."""
        if self.field == "schedule":
            return "--every / --crontab / --at / --solar"
        return "--" + self.field.replace("_", "-")


class NoCadenceWarning(UserWarning):
    """A `@job` function registered with neither `every` nor `schedule`: unless it returns the delay to its
    next run each time, it runs again only after the retry backoff's cap (an hour by default)."""


class CannotStart(SystemExit):
    """A beat or worker cannot start for a reason that waiting will not fix (a bad setting, a missing driver,
    a database that refuses the role or has no such database, a wrong schema). A SystemExit with code 1, so
    that Celery stops the process without printing a traceback; `str()` is the one line logged for it."""

    def __init__(self, process: str, cause: BaseException | str) -> None:
        super().__init__(1)
        self.process = process
        self.message = f"celery_dbsched: the {process} cannot start: {one_line(str(cause))}"
        if isinstance(cause, BaseException):
            self.__cause__ = cause

    def __str__(self) -> str:
        return self.message


def cannot_start(process: str, cause: BaseException | str, log: logging.Logger) -> NoReturn:
    """Log the one line that says why `process` cannot start, at CRITICAL, and exit with code 1."""
    error = CannotStart(process, cause)
    log.critical("%s", error.message)
    raise error


def metrics_not_installed(exc: ImportError) -> str:
    """The start-up error of a beat or worker given `dbsched_metrics_port` without prometheus-client."""
    return (
        f"dbsched_metrics_port is set but prometheus-client is not installed (no module {exc.name!r}): "
        'pip install "celery-dbsched[metrics]", or set dbsched_metrics_port = 0'
    )


def one_line(text: str) -> str:
    """A driver's message on one line (libpq's span several: the hint after a tab on the next line)."""
    return " ".join(text.split())


class Outage:
    """One database outage, said once: ERROR when it starts, DEBUG while it lasts, WARNING when it ends. The
    wait before the next try doubles from half a second up to a cap. The beat's tick and the worker's start
    wait out an outage through it."""

    def __init__(self, log: logging.Logger, waiting: str) -> None:
        self._log = log
        self._waiting = waiting  # what the process does meanwhile, for the first line
        self.since: float | None = None
        self._backoff = 0.0

    def failed(self, exc: BaseException, cap: float) -> float:
        """Record a failed try; returns the seconds to wait before the next."""
        if self.since is None:
            self.since = time.monotonic()
            self._log.error("celery_dbsched: %s; %s (an outage is waited out)", one_line(str(exc)), self._waiting)
        else:
            self._log.debug("celery_dbsched: database still unavailable: %s", one_line(str(exc)))
        self._backoff = min(max(self._backoff * 2, 0.5), cap)
        return self._backoff

    def ended(self) -> None:
        """A try worked: say how long the outage lasted, if there was one."""
        if self.since is not None:
            self._log.warning("celery_dbsched: database back after %.1fs", time.monotonic() - self.since)
            self.since = None
            self._backoff = 0.0


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
# libpq's reasons for refusing a connection that no retry fixes (psycopg gives no SQLSTATE for a failed
# connection, only the server's FATAL message): a role or database that does not exist, a wrong password,
# no pg_hba.conf entry, a role not allowed to log in or to connect to that database.
_REFUSED_CONNECTION_MESSAGES = (
    "does not exist",
    "password authentication failed",
    "no pg_hba.conf entry",
    "is not permitted to log in",
    "permission denied for database",
    "authentication failed",
)
_OUTAGE_MESSAGES = ("locked", "busy", "disk i/o", "unable to open", "connection", "server closed", "timeout")


# MySQL/MariaDB server error numbers (PyMySQL's `args[0]`) of an outage or a transient conflict: lock wait
# timeout, deadlock, too many connections, server gone/lost, cannot connect, read-only (a failover), shutdown.
_MYSQL_OUTAGE_CODES = {1205, 1213, 1040, 1053, 1290, 1836, 2002, 2003, 2006, 2013, 2055}
_MYSQL_DEADLOCK = 1213
_MYSQL_REFUSED_CODES = {1044, 1045, 1049, 1698}  # access denied (user, password, database), unknown database
_MYSQL_NO_TABLE = 1146
_MYSQL_NO_COLUMN = 1054


def _mysql_code(error: BaseException | None) -> int | None:
    """The server's error number of a PyMySQL (or mysqlclient) error, else None."""
    if error is None or not type(error).__module__.startswith(("pymysql", "MySQLdb")):
        return None
    code = error.args[0] if error.args else None
    return code if isinstance(code, int) else None


def is_deadlock(error: BaseException | None) -> bool:
    """A deadlock (PostgreSQL 40P01, MySQL 1213): the transaction was rolled back, and may simply be retried."""
    error = getattr(error, "orig", error)
    return _mysql_code(error) == _MYSQL_DEADLOCK or _sqlstate(error) == "40P01"


def is_client_timeout(error: BaseException | None) -> bool:
    """The statement watchdog (dbsched_client_timeout, watchdog.ClientTimeout) gave up waiting for the server:
    an outage, and the statement may or may not have run."""
    return getattr(error, "dbsched_client_timeout", False) is True


def is_outage(error: BaseException) -> bool:
    """Whether a DBAPI error (psycopg or sqlite3) says the database is unreachable or busy, so that retrying
    later may work, rather than that the statement itself was refused (a bad statement, too many parameters,
    a schema or data problem), which retrying cannot fix. Decided by the driver's SQLSTATE or result code and
    exception class; the message only where the driver gives neither."""
    if is_client_timeout(error):
        return True
    mysql_code = _mysql_code(error)
    if mysql_code is not None:
        return mysql_code in _MYSQL_OUTAGE_CODES
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
    if any(text in message for text in _PERMANENT_MESSAGES) or _refused_connection(error):
        return False
    if isinstance(error, sqlite3.InterfaceError):  # a value of a type SQLite cannot bind
        return False
    if name in ("OperationalError", "InterfaceError"):  # psycopg without a SQLSTATE: connecting, connection lost
        return True
    return any(text in message for text in _OUTAGE_MESSAGES)


def _refused_connection(error: BaseException | None) -> bool:
    """The server answered a connection attempt with a refusal that recurs (FATAL: role "x" does not exist,
    password authentication failed, ...), rather than not answering: a misconfiguration, not an outage."""
    if _mysql_code(error) in _MYSQL_REFUSED_CODES:
        return True
    message = str(error).lower()
    return "fatal:" in message and any(text in message for text in _REFUSED_CONNECTION_MESSAGES)


# PostgreSQL SQLSTATEs of a schema older than the code (not an outage).
_UNDEFINED_TABLE = "42P01"
_UNDEFINED_COLUMN = "42703"
_INVALID_SCHEMA_NAME = "3F000"  # the search_path names no schema that exists ("no schema has been selected")
_INSUFFICIENT_PRIVILEGE = "42501"  # permission denied for a schema or table; must be owner of a table
_READ_ONLY_TRANSACTION = "25006"  # a write (or LISTEN, NOTIFY) on a standby or a read-only server
# Where the privileges of the migration and runtime roles are listed.
GRANTS_DOC = "docs/deployment.md, Least privilege"


def _sqlstate(error: BaseException | None) -> str | None:
    if _mysql_code(error) is not None:  # PyMySQL's errors carry no SQLSTATE to go by
        return None
    sqlstate = getattr(error, "sqlstate", None)
    return sqlstate if isinstance(sqlstate, str) and len(sqlstate) == 5 else None


def _sqlite_message(error: BaseException | None) -> str | None:
    """SQLite reports a missing table or column as SQLITE_ERROR (code 1), as it does a syntax error: only its
    message tells them apart."""
    return str(error).lower() if isinstance(error, sqlite3.Error) else None


def _is_missing(error: BaseException | None, sqlstate: str, sqlite_text: str) -> bool:
    """A table or column this code needs is not there: the schema is older than the code (not an outage)."""
    mysql_code = _mysql_code(error)
    if mysql_code is not None:
        return mysql_code == {_UNDEFINED_TABLE: _MYSQL_NO_TABLE, _UNDEFINED_COLUMN: _MYSQL_NO_COLUMN}.get(sqlstate)
    found = _sqlstate(error)
    if found is not None:
        return found == sqlstate
    message = _sqlite_message(error)
    return message is not None and sqlite_text in message


def _missing_what(error: BaseException | None) -> str:
    """The driver's line naming what is missing: MySQL's message without the clause it was in ("in 'SELECT'")."""
    if _mysql_code(error) is not None and error is not None and len(error.args) > 1:
        return re.sub(r" in '[^']*'$", "", str(error.args[1]))
    return str(error).strip().splitlines()[0]


def _schema_error(error: BaseException | None) -> SchemaMismatch | None:
    if _is_missing(error, _UNDEFINED_TABLE, "no such table"):
        return SchemaMismatch("the celery_dbsched tables are missing: run `celery -A proj dbsched migrate`")
    if _is_missing(error, _UNDEFINED_COLUMN, "no such column"):
        return SchemaMismatch(
            f"the database schema is older than this celery_dbsched ({_missing_what(error)}): "
            "run `celery -A proj dbsched migrate`"
        )
    return None


def _reason(error: BaseException | None) -> str:
    """A driver error in one line: PostgreSQL's primary message without the statement excerpt (LINE ...)
    that follows it; else (no server message, e.g. a failed connection) the whole text, on one line."""
    primary = getattr(getattr(error, "diag", None), "message_primary", None)
    return one_line(primary if isinstance(primary, str) and primary else str(error))


def classify(exc: DBAPIError) -> DbschedError:
    """What a driver error means to callers (the one mapping): the schema is not the one this code needs, the
    database cannot be reached (worth waiting for), or a statement was refused. Decided by the driver's
    SQLSTATE (PostgreSQL) or exception class and result code (SQLite), as `is_outage` does."""
    mismatch = _schema_error(exc.orig)
    if mismatch is not None:
        return mismatch
    reason = _reason(exc.orig)
    if _refused_connection(exc.orig):
        return DatabaseError(
            f"the database refused the connection ({reason}): not an outage, so waiting will not fix it; fix the "
            "user, password or database name in dbsched_database_url, or create that role or database"
        )
    if _sqlstate(exc.orig) == _READ_ONLY_TRANSACTION:
        return DatabaseUnavailable(
            f"database unavailable: {reason} (the server is read-only: a standby, or a primary being failed over; "
            "the connection is discarded and a new one made; with several hosts in dbsched_database_url add "
            "target_session_attrs=read-write to its query so that only the primary is used)"
        )
    if exc.connection_invalidated or is_outage(exc.orig if exc.orig is not None else exc):
        return DatabaseUnavailable(f"database unavailable: {reason}")
    if is_insufficient_privilege(exc):
        return DatabaseError(
            f"the database role of dbsched_database_url lacks a privilege ({reason}): not an outage, so waiting "
            f"will not fix it; grant that role the runtime privileges on the celery_dbsched tables ({GRANTS_DOC})"
        )
    if _sqlstate(exc.orig) in _PREPARED_STATEMENT_LOST:
        return DatabaseError(
            f"a server-side prepared statement went missing or clashed ({reason}): dbsched_database_url likely goes "
            f"through a transaction-mode pooler such as PgBouncer (pool_mode = transaction); {POOLER_FIX}"
        )
    if _sqlstate(exc.orig) == _INVALID_SCHEMA_NAME:
        return DatabaseError(
            f"the database has no schema to use ({reason}): create the schema named by the search_path of "
            "dbsched_database_url (or dbsched_engine_options), or fix that search_path"
        )
    return DatabaseError(
        f"database error (not an outage: retrying the same statement will fail the same way): {reason}; if the "
        "schema was changed by hand run `celery -A proj dbsched migrate`, else report this line as a "
        "celery_dbsched bug"
    )


# psycopg prepares a statement on the server once it ran a few times on a connection; through a transaction-mode
# pooler the next transaction may run on another server connection: the statement is not there (26000), or one
# of the same name, prepared by another client, is (42P05).
_PREPARED_STATEMENT_LOST = ("26000", "42P05")
POOLER_FIX = (
    'set dbsched_pooler = "pgbouncer" (no server-side prepared statements, no LISTEN: beats poll at '
    "dbsched_run_jobs_interval; docs/deployment.md, Behind PgBouncer)"
)


def is_insufficient_privilege(exc: DBAPIError) -> bool:
    """PostgreSQL refused a statement for the role's privileges (a missing grant, or DDL by a non-owner)."""
    return _sqlstate(exc.orig) == _INSUFFICIENT_PRIVILEGE


def migration_not_permitted(exc: DBAPIError, role: str | None) -> DatabaseError:
    """The one error of a migration that the connected role may not make (the runtime role, say)."""
    who = f"the database role {role!r}" if role else "the database role of dbsched_database_url"
    return DatabaseError(
        f"the schema needs migrating and {who} may not change it ({_reason(exc.orig)}): run `celery -A proj "
        "dbsched migrate` with dbsched_database_url naming the migration role (the owner of the celery_dbsched "
        f"tables, with CREATE on their schema; {GRANTS_DOC})"
    )
