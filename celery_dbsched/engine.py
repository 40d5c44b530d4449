"""The engine: `make_engine` for PostgreSQL (psycopg 3), MySQL/MariaDB (PyMySQL) and SQLite, the SQLite and
MySQL connection hooks, the connection defaults against a silent server (PostgreSQL: connect timeout, TCP
keepalives, the statement watchdog of `watchdog.py`; PyMySQL: connect, read and write timeouts), and the
PostgreSQL connections the worker-side statements keep checked out (`KeptConnections`)."""

from __future__ import annotations

import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL, ExceptionContext, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError
from sqlalchemy.pool import NullPool

from .errors import UnsupportedDatabase
from .settings import DEFAULT_CLIENT_TIMEOUT as _DEFAULT_CLIENT_TIMEOUT
from .settings import parse_database_url


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy's "begin" hook own transactions, then make several local processes safe to share
    # one file: WAL lets readers run beside the writer, the busy timeout makes writers queue, not fail.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA busy_timeout=30000")
        _switch_to_wal(cursor)
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


def _switch_to_wal(cursor: Any, deadline_seconds: float = 30.0) -> None:
    """Switching a fresh file to WAL needs an exclusive lock and does not wait on the busy timeout: when
    several processes open a new database at once, the losers get "database is locked" at once. Retry."""
    deadline = time.monotonic() + deadline_seconds
    while True:
        try:
            if cursor.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal":
                return
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if ("locked" not in str(exc) and "busy" not in str(exc)) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _sqlite_on_begin(connection: Connection) -> None:
    # Take the write lock up front: a deferred transaction that reads then writes fails at once with
    # "database is locked" when another writer got in between, whatever the busy timeout.
    connection.exec_driver_sql("BEGIN IMMEDIATE")


# The install line for the driver each supported URL needs (the extra is in pyproject.toml).
POSTGRES_INSTALL = 'pip install "celery-dbsched[postgres]" (from a checkout: pip install -e ".[postgres]")'
MYSQL_INSTALL = 'pip install "celery-dbsched[mysql]" (from a checkout: pip install -e ".[mysql]")'
MYSQL_BACKENDS = ("mysql", "mariadb")
# Names are compared byte for byte, as on PostgreSQL: `Job` and `job` are two jobs, `é` and `e` too, and `job `
# (a trailing space) a third: a binary collation without PAD SPACE, named differently by MariaDB and MySQL 8.
MYSQL_CHARSET = "utf8mb4"
MARIADB_COLLATION = "utf8mb4_nopad_bin"
MYSQL_COLLATION = "utf8mb4_0900_bin"


def mysql_collation(dialect: Any) -> str:
    """The collation of celery_dbsched's tables on this server (MariaDB or MySQL)."""
    return MARIADB_COLLATION if getattr(dialect, "is_mariadb", False) else MYSQL_COLLATION


# The claim's isolation: READ COMMITTED. InnoDB's default REPEATABLE READ takes gap and next-key locks on the
# ranges a locking read scans (the claimable index, the unique index of active runs), so beats claiming at
# once would lock each other's ranges and deadlock; READ COMMITTED locks the rows read only, and each
# statement reads the latest commits, as on PostgreSQL. The one active run per job (slot) is the unique index's.
MYSQL_ISOLATION = "READ COMMITTED"


def is_mysql(dialect: str) -> bool:
    """MySQL or MariaDB (SQLAlchemy names a `mariadb://` URL's dialect `mariadb`, a `mysql://` one `mysql`)."""
    return dialect in MYSQL_BACKENDS


# The oldest MariaDB the statements need: INSERT ... RETURNING (10.5) and the claim's locking read with
# SKIP LOCKED (10.6).
MARIADB_MINIMUM = (10, 6)


def check_mysql_server(server_info: str) -> None:
    """Raise UnsupportedDatabase unless `server_info` (the version the server announces, e.g.
    `10.11.6-MariaDB-0+deb12u1`) is MariaDB 10.6 or later. MySQL has no INSERT ... RETURNING, which the claim and
    every run transition use: it would fail later, statement by statement, in the middle of a claim."""
    server_info = server_info.removeprefix("5.5.5-")  # how MariaDB announces itself to old clients
    match = re.match(r"(\d+)\.(\d+)", server_info)
    version = (int(match.group(1)), int(match.group(2))) if match else (0, 0)
    if "mariadb" not in server_info.lower():
        raise UnsupportedDatabase(
            f"dbsched_database_url: the server is MySQL {server_info}, which celery_dbsched does not support (it "
            "has no INSERT ... RETURNING, which claiming runs needs); point dbsched_database_url at MariaDB "
            f"{MARIADB_MINIMUM[0]}.{MARIADB_MINIMUM[1]} or later, or PostgreSQL"
        )
    if version < MARIADB_MINIMUM:
        raise UnsupportedDatabase(
            f"dbsched_database_url: the server is MariaDB {server_info}; celery_dbsched needs MariaDB "
            f"{MARIADB_MINIMUM[0]}.{MARIADB_MINIMUM[1]} or later (INSERT ... RETURNING and SKIP LOCKED): upgrade "
            "the server, or use PostgreSQL"
        )


def _mysql_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # Before anything else runs on the connection (SQLAlchemy's own first-connect queries included).
    check_mysql_server(dbapi_connection.get_server_info())
    # Every time the server computes (NOW(6)) or stores is UTC, whatever the server's global time zone:
    # DATETIME(6) holds no zone, so the session's must not shift what is written or compared.
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"SET time_zone = '+00:00', NAMES {MYSQL_CHARSET}")
    finally:
        cursor.close()


# libpq connection parameters a PostgreSQL engine gets unless the URL's query, `connect_args` (in
# dbsched_engine_options) or the parameter's environment variable sets them. A server that stops answering
# without refusing (packets dropped) is noticed: a connection attempt within connect_timeout seconds; a dead
# peer by keepalive probes after 10 s of silence (10 + 3 x 5 s) and by unacknowledged data after 20 s
# (tcp_user_timeout, ms). Neither catches a middlebox that keeps the TCP connection alive but forwards
# nothing: the statement watchdog (dbsched_client_timeout, watchdog.py) does. Unix sockets ignore the TCP ones.
POSTGRES_CONNECT_DEFAULTS: dict[str, int] = {
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 20000,
}
_POSTGRES_ENVIRONMENT = {"connect_timeout": "PGCONNECT_TIMEOUT"}  # libpq reads these when the URL is silent
DEFAULT_CLIENT_TIMEOUT = _DEFAULT_CLIENT_TIMEOUT.total_seconds()  # dbsched_client_timeout's default, in seconds


def postgres_connect_args(
    parsed: URL, connect_args: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """`connect_args` with POSTGRES_CONNECT_DEFAULTS added where neither they, the URL's query nor the
    environment variable libpq reads for that parameter say otherwise."""
    environ = os.environ if environ is None else environ
    args = dict(connect_args)
    for key, value in POSTGRES_CONNECT_DEFAULTS.items():
        variable = _POSTGRES_ENVIRONMENT.get(key)
        if key in args or key in parsed.query or (variable is not None and variable in environ):
            continue
        args[key] = value
    return args


# PyMySQL's connection parameters a MySQL/MariaDB engine (mysql+pymysql://, mariadb+pymysql://) gets unless the
# URL's query or `connect_args` (in dbsched_engine_options) set them. PyMySQL has no read or write timeout by
# default: a statement sent to a server that stopped answering without refusing (packets dropped, a middlebox that
# forwards nothing) waits for its answer without end. With these, a connection attempt fails after connect_timeout
# seconds, and a statement whose answer (or whose sending) is silent for dbsched_client_timeout seconds fails with
# error 2013 (an outage: DatabaseUnavailable), PyMySQL closing the connection. No read or write timeout when
# dbsched_client_timeout is off (0).
MYSQL_CONNECT_TIMEOUT = 10
MYSQL_TIMEOUT_ARGS = ("read_timeout", "write_timeout")


def mysql_connect_args(parsed: URL, connect_args: Mapping[str, Any], client_timeout: float | None) -> dict[str, Any]:
    """`connect_args` with PyMySQL's connect timeout (MYSQL_CONNECT_TIMEOUT) and read and write timeouts
    (`client_timeout` seconds; none when it is None) added where neither they nor the URL's query say otherwise.
    A timeout in the URL's query that is not a whole number of seconds is a ValueError naming it."""
    for key in ("connect_timeout", *MYSQL_TIMEOUT_ARGS):
        given = parsed.query.get(key)
        if given is not None and not (isinstance(given, str) and given.isdigit() and int(given) > 0):
            # SQLAlchemy turns these into int() for PyMySQL: its own error would not name the setting.
            raise ValueError(
                f"dbsched_database_url: {key}={given!r} in the URL is not a whole number of seconds above 0; "
                f"write it as e.g. ?{key}=30"
            )
    defaults: dict[str, float] = {"connect_timeout": MYSQL_CONNECT_TIMEOUT}
    if client_timeout:
        defaults.update(dict.fromkeys(MYSQL_TIMEOUT_ARGS, client_timeout))
    args = dict(connect_args)
    for key, value in defaults.items():
        if key not in args and key not in parsed.query:
            args[key] = value
    return args


def postgres_pooler_args(connect_args: Mapping[str, Any]) -> dict[str, Any]:
    """`connect_args` for a transaction-mode pooler (dbsched_pooler): psycopg prepares no statement on the
    server (`prepare_threshold` None; a statement prepared on one server connection is unknown to, or clashes
    with one of the same name on, the next connection the pooler hands out). Unless `connect_args` says
    otherwise (PgBouncer >= 1.21 with max_prepared_statements > 0 tracks them itself)."""
    args = dict(connect_args)
    args.setdefault("prepare_threshold", None)
    return args


@contextmanager
def set_client_timeout(driver_connection: Any, seconds: float | None) -> Iterator[None]:
    """Within: the statement watchdog of this driver (DBAPI) connection set to `seconds` (None: off), for work
    whose bound is not the usual one (a migration may legitimately take long). On a PyMySQL connection: its read
    and write timeouts (PyMySQL reads them from the connection at each socket read and write: `_read_timeout`,
    `_write_timeout`, PyMySQL 1.0 to 2.2 at least). Nothing on a connection without either (SQLite, or a
    PostgreSQL engine given a `creator` of its own)."""
    if _is_pymysql(driver_connection):
        with _pymysql_timeouts(driver_connection, seconds):
            yield
        return
    if not hasattr(driver_connection, "dbsched_client_timeout"):
        yield
        return
    before = driver_connection.dbsched_client_timeout
    driver_connection.dbsched_client_timeout = seconds
    try:
        yield
    finally:
        driver_connection.dbsched_client_timeout = before


def _is_pymysql(driver_connection: Any) -> bool:
    return type(driver_connection).__module__.startswith("pymysql") and all(
        hasattr(driver_connection, f"_{name}") for name in MYSQL_TIMEOUT_ARGS
    )


@contextmanager
def _pymysql_timeouts(driver_connection: Any, seconds: float | None) -> Iterator[None]:
    before = [getattr(driver_connection, f"_{name}") for name in MYSQL_TIMEOUT_ARGS]
    for name in MYSQL_TIMEOUT_ARGS:
        setattr(driver_connection, f"_{name}", seconds)
    try:
        yield
    finally:
        for name, value in zip(MYSQL_TIMEOUT_ARGS, before, strict=True):
            setattr(driver_connection, f"_{name}", value)


# SQLSTATEs after which a PostgreSQL connection is discarded (and the pool's older ones with it), though psycopg
# still thinks it open: the server it reaches is read-only (25006: a standby, or a primary demoted in a
# failover; the pool's pre-ping, a SELECT, passes there), or is shutting down or in recovery (57P01 admin
# shutdown, 57P02 crash shutdown, 57P03 cannot connect now). A new connection then goes through the URL's
# hosts again, and with target_session_attrs=read-write reaches the new primary (docs/deployment.md, Failover).
FAILOVER_SQLSTATES = frozenset({"25006", "57P01", "57P02", "57P03"})


def _discard_on_failover(context: ExceptionContext) -> None:
    """SQLAlchemy's handle_error hook: a FAILOVER_SQLSTATES error invalidates the connection (and the pool)."""
    if getattr(context.original_exception, "sqlstate", None) in FAILOVER_SQLSTATES:
        context.is_disconnect = True


def make_engine(
    url: str,
    engine_options: Mapping[str, Any] | None = None,
    *,
    client_timeout: float | None = DEFAULT_CLIENT_TIMEOUT,
    pooler: str | None = None,
) -> Engine:
    """An engine for PostgreSQL (psycopg 3), MySQL/MariaDB or SQLite (WAL, busy timeout, immediate
    transactions). On PostgreSQL each statement waits at most `client_timeout` seconds for the server (None:
    without end) and the connections get POSTGRES_CONNECT_DEFAULTS; on MySQL/MariaDB (PyMySQL) the connections
    get `mysql_connect_args` (a connect timeout, and `client_timeout` as the read and write timeouts); with
    `pooler` ("transaction": dbsched_pooler) they keep no state of the session (`postgres_pooler_args`). A
    driver that is not installed, or that SQLAlchemy does not know, is a ValueError naming the install line."""
    parse_database_url("dbsched_database_url", url)  # one clear error for a URL SQLAlchemy cannot parse
    parsed = make_url(url)
    try:
        return _make_engine(parsed, engine_options, client_timeout, pooler)
    except NoSuchModuleError:
        raise ValueError(
            f"dbsched_database_url: SQLAlchemy has no database driver {parsed.drivername!r}; use "
            f"postgresql+psycopg:// ({POSTGRES_INSTALL}), mysql+pymysql:// ({MYSQL_INSTALL}) or sqlite:///"
        ) from None
    except ImportError as exc:  # the driver's module (SQLAlchemy imports it in create_engine) is missing
        raise ValueError(f"dbsched_database_url: {_missing_driver(parsed, exc)}") from None
    except (TypeError, ArgumentError) as exc:  # an option create_engine does not take, or of the wrong type
        raise ValueError(f"dbsched_engine_options: not accepted by SQLAlchemy: {exc}") from None


def _missing_driver(parsed: URL, exc: ImportError) -> str:
    missing = exc.name or str(exc)
    driver = parsed.get_driver_name()
    if parsed.get_backend_name() == "postgresql" and driver == "psycopg":
        return f"the PostgreSQL driver psycopg is not installed (no module {missing!r}): {POSTGRES_INSTALL}"
    if parsed.get_backend_name() in MYSQL_BACKENDS and driver == "pymysql":
        return f"the MySQL driver PyMySQL is not installed (no module {missing!r}): {MYSQL_INSTALL}"
    return (
        f"the database driver {driver!r} is not installed (no module {missing!r}): install it, or use "
        f"postgresql+psycopg:// ({POSTGRES_INSTALL})"
    )


def _make_engine(
    parsed: URL, engine_options: Mapping[str, Any] | None, client_timeout: float | None, pooler: str | None
) -> Engine:
    options = dict(engine_options or {})
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.drivername in MYSQL_BACKENDS:  # SQLAlchemy's default would be mysqlclient (MySQLdb)
        parsed = parsed.set(drivername=f"{parsed.drivername}+pymysql")
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.database in (None, "", ":memory:") or "mode=memory" in str(parsed):
            raise ValueError(
                "dbsched_database_url: an in-memory SQLite database cannot be shared by beat and workers; "
                "use a file, e.g. sqlite:///celery_dbsched.sqlite3"
            )
        if not str(parsed.database).startswith("file:"):
            os.makedirs(os.path.dirname(os.path.abspath(str(parsed.database))), exist_ok=True)
        connect_args = dict(options.pop("connect_args", {}))
        connect_args.setdefault("timeout", 30)
        connect_args.setdefault("check_same_thread", False)
        # No pooled connection may survive into a forked child (prefork pool, embedded beat): SQLite keeps
        # per-process lock state per file that a child would inherit but not own ("locking protocol").
        options.setdefault("poolclass", NullPool)
        engine = create_engine(parsed, connect_args=connect_args, **options)
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
        return engine
    if backend in MYSQL_BACKENDS:
        return _make_mysql_engine(parsed, options, client_timeout)
    if backend != "postgresql":
        raise ValueError(
            f"dbsched_database_url: {backend!r} is not supported; use postgresql+psycopg://, mysql+pymysql:// "
            "or sqlite:///"
        )
    options.setdefault("pool_pre_ping", True)
    if parsed.get_driver_name() != "psycopg":  # another driver (psycopg2, pg8000): left as SQLAlchemy makes it
        return create_engine(parsed, **options)
    connect_args = postgres_connect_args(parsed, options.pop("connect_args", {}))
    if pooler is not None:
        connect_args = postgres_pooler_args(connect_args)
    engine = create_engine(parsed, connect_args=connect_args, **options)
    event.listen(engine, "handle_error", _discard_on_failover)
    if "creator" not in options:  # a creator of the user's own makes the connections: left as it is
        from . import watchdog

        def connect(_dialect: Any, _record: Any, cargs: list[Any], cparams: dict[str, Any]) -> Any:
            return watchdog.connect(cargs, cparams, client_timeout, session_settings=pooler is None)

        event.listen(engine, "do_connect", connect)
    return engine


def _make_mysql_engine(parsed: URL, options: dict[str, Any], client_timeout: float | None) -> Engine:
    if parsed.get_driver_name() == "pymysql":
        options["connect_args"] = mysql_connect_args(parsed, options.pop("connect_args", {}), client_timeout)
    query = dict(parsed.query)
    query.setdefault("charset", MYSQL_CHARSET)
    options.setdefault("pool_pre_ping", True)
    options.setdefault("isolation_level", MYSQL_ISOLATION)
    options.setdefault("pool_recycle", 3600)  # under the server's wait_timeout (8 hours by default)
    engine = create_engine(parsed.set(query=query), **options)
    event.listen(engine, "connect", _mysql_on_connect, insert=True)  # before SQLAlchemy's first-connect queries
    return engine


class KeptConnections:
    """PostgreSQL connections for the worker-side statements, kept checked out between uses.

    Each statement runs in its own implicit transaction (autocommit: the driver sends no BEGIN and no COMMIT)
    and on a connection that just served one, so the pool's pre-ping (a round trip per checkout) is skipped.
    A kept connection that the database dropped while it was idle (a restart, an idle timeout) fails before
    its statement ran: `JobRepository._one` then sends the statement once more on a fresh, pinged connection.
    As many are kept as the pool holds idle (its pool_size: a threads pool's runs each keep one), at least
    two (a run and the monitor); the others go back to the pool. Never used across a fork.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        size = getattr(engine.pool, "size", None)
        self._keep = max(2, size() if callable(size) else 0)
        self._idle: list[Connection] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def take(self) -> tuple[Connection, bool]:
        """A connection, and whether it is a kept one (not pinged)."""
        with self._lock:
            if self._pid != os.getpid():  # a forked child: the parent's connections are not ours to use
                self._idle, self._pid = [], os.getpid()
            if self._idle:
                return self._idle.pop(), True
        return self._engine.connect(), False

    def give_back(self, conn: Connection) -> None:
        with self._lock:
            if self._pid == os.getpid() and len(self._idle) < self._keep and not conn.invalidated:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
            mine = self._pid == os.getpid()
        if mine:
            for conn in idle:
                conn.close()
