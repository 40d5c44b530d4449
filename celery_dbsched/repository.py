"""`JobRepository`: every SQL statement of celery_dbsched, one method per state transition.

Times are computed by the database (`db_now`), never by this host. Each method is one short transaction.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Connection,
    Engine,
    Float,
    Integer,
    Interval,
    Row,
    String,
    Text,
    and_,
    any_,
    bindparam,
    case,
    cast,
    column,
    create_engine,
    delete,
    event,
    exists,
    func,
    literal,
    or_,
    select,
    text,
    true,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError
from sqlalchemy.pool import NullPool
from sqlalchemy.sql import Select
from sqlalchemy.sql.base import Executable
from sqlalchemy.sql.elements import ColumnElement

from .errors import (
    DatabaseError,
    DatabaseUnavailable,
    DbschedError,
    InvalidRunState,
    JobNotFound,
    RunNotFound,
    SchemaMismatch,
    is_outage,
)
from .job import JobDefinition, JobStatus
from .schedules import IntervalSchedule, Schedule, schedule_from_spec
from .schema import (
    ACTIVE_STATES,
    COMPLETED,
    DISPATCHED,
    FAILED,
    FINAL_STATES,
    INTERRUPTED,
    KIND_JOB,
    KIND_TASK,
    MISFIRE_RUN_ONCE,
    MISFIRE_SKIP,
    QUEUED,
    RUN_STATES,
    RUNNING,
    UTCDateTime,
    claimable,
    db_now,
    db_time_at,
    job_table,
    least,
    run_table,
    server_table,
    sync_table,
)
from .settings import (
    DEFAULT_INTERRUPT_THRESHOLD,
    DEFAULT_MISFIRE_GRACE,
    DEFAULT_RETRY_BACKOFF,
    backoff_delay,
    mask_database_url,
)

ERROR_TEXT_LIMIT = 10_000
# Rows per statement when a sync writes many: with ~25 columns a row, far below PostgreSQL's 65,535 and
# SQLite's 32,766 bound parameters per statement.
SYNC_CHUNK = 500
SYNC_JSON_CHUNK = 5_000  # rows per statement when they travel as one JSON parameter (PostgreSQL)
# Runs one pruning transaction deletes at most (JobRepository.prune_runs).
PRUNE_BATCH = 5_000
WAKEUP_CHANNEL = "dbsched_wakeup"

# Why a run was interrupted: the prefix of its `error` text.
STALLED = "stalled"
SHUTDOWN = "shutdown"
RESTART = "restart"
CANCELLED = "cancelled"
EXPIRED = "expired"


def _seconds(value: dt.timedelta | None) -> float | None:
    return None if value is None else value.total_seconds()


def _delta(value: float | None) -> dt.timedelta | None:
    return None if value is None else dt.timedelta(seconds=value)


@dataclass(frozen=True)
class JobRecord:
    name: str
    description: str
    next_scheduled_run: dt.datetime
    default_next_run_in: dt.timedelta | None
    queue: str | None
    interrupt_threshold: dt.timedelta | None
    failure_count: int
    enabled: bool
    create_time: dt.datetime
    update_time: dt.datetime
    kind: str = KIND_JOB
    schedule: Schedule | None = None
    task: str | None = None
    task_args: tuple[Any, ...] = ()
    task_kwargs: dict[str, Any] = field(default_factory=dict)
    task_options: dict[str, Any] = field(default_factory=dict)
    misfire: str = MISFIRE_RUN_ONCE
    misfire_grace: dt.timedelta | None = None
    max_active: int = 1
    retry_backoff: tuple[dt.timedelta, dt.timedelta] | None = None
    expires: dt.timedelta | None = None
    paused: bool = False
    active_runs: int = 0  # queued or running runs holding a slot (kept by the database)

    @classmethod
    def from_row(cls, row: Row[Any]) -> JobRecord:
        m = row._mapping
        base, cap = m["retry_backoff_base"], m["retry_backoff_cap"]
        return cls(
            name=m["name"],
            description=m["description"],
            next_scheduled_run=m["next_scheduled_run"],
            default_next_run_in=_delta(m["default_next_run_in"]),
            queue=m["queue"],
            interrupt_threshold=_delta(m["interrupt_threshold"]),
            failure_count=m["failure_count"],
            enabled=bool(m["enabled"]),
            create_time=m["create_time"],
            update_time=m["update_time"],
            kind=m["kind"],
            schedule=schedule_from_spec(m["schedule"]) if m["schedule"] else None,
            task=m["task"],
            task_args=tuple(json.loads(m["task_args"])) if m["task_args"] else (),
            task_kwargs=json.loads(m["task_kwargs"]) if m["task_kwargs"] else {},
            task_options=json.loads(m["task_options"]) if m["task_options"] else {},
            misfire=m["misfire"],
            misfire_grace=_delta(m["misfire_grace"]),
            max_active=m["max_active"],
            retry_backoff=None if base is None else (dt.timedelta(seconds=base), dt.timedelta(seconds=cap)),
            expires=_delta(m["expires"]),
            paused=bool(m["paused"]),
            active_runs=m["active_runs"],
        )

    @property
    def advances_at_claim(self) -> bool:
        return self.kind == KIND_TASK or self.max_active > 1

    def next_slot(self, now: dt.datetime, anchor: dt.datetime | None) -> dt.datetime | None:
        """The job's next slot after `now` on its cadence (None when it has no schedule)."""
        cadence = _cadence(self.schedule, self.default_next_run_in)
        return None if cadence is None else cadence.next_after(now, anchor)


def _cadence(schedule: Schedule | None, default_next_run_in: dt.timedelta | None) -> Schedule | None:
    """The slots a job keeps to: its schedule, else its `every` as an interval; None when it has neither."""
    if schedule is not None:
        return schedule
    if default_next_run_in is not None and default_next_run_in > dt.timedelta(0):
        return IntervalSchedule(default_next_run_in.total_seconds())
    return None


def _definition_values(definition: JobDefinition) -> dict[str, Any]:
    backoff = definition.retry_backoff
    return {
        "description": definition.description,
        "kind": definition.kind,
        "schedule": definition.schedule.to_json() if definition.schedule is not None else None,
        "default_next_run_in": _seconds(definition.default_next_run_in),
        "queue": definition.queue,
        "interrupt_threshold": _seconds(definition.interrupt_threshold),
        "enabled": definition.enabled,
        "misfire": definition.misfire,
        "misfire_grace": _seconds(definition.misfire_grace),
        "max_active": definition.max_active,
        "retry_backoff_base": None if backoff is None else backoff[0].total_seconds(),
        "retry_backoff_cap": None if backoff is None else backoff[1].total_seconds(),
        "expires": _seconds(definition.expires),
        "task": definition.task,
        "task_args": json.dumps(list(definition.task_args)) if definition.kind == KIND_TASK else None,
        "task_kwargs": json.dumps(dict(definition.task_kwargs)) if definition.kind == KIND_TASK else None,
        "task_options": json.dumps(dict(definition.task_options)) if definition.kind == KIND_TASK else None,
    }


def _json_time(value: object) -> str:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    raise TypeError(f"not JSON: {value!r}")


def _check_first_run(name: str, next_run_in: dt.timedelta | None) -> None:
    if next_run_in is not None and next_run_in < dt.timedelta(0):
        raise ValueError(f"job {name!r}: next_run_in must not be negative")


def _first_run(definition: JobDefinition, next_run_in: dt.timedelta | None, now: dt.datetime) -> dt.datetime:
    """A new job is first due at now + `next_run_in`, else at its schedule's first slot, else now."""
    if next_run_in is not None:
        return now + next_run_in
    if definition.schedule is not None:
        return definition.schedule.first_slot(now)
    return now


def _differs(row: Row[Any], values: Mapping[str, Any]) -> bool:
    stored = row._mapping
    return any(stored[key] != value for key, value in values.items())


def _changes(row: Row[Any], definition: JobDefinition, values: Mapping[str, Any], now: dt.datetime) -> dict[str, Any]:
    """What storing `definition` over the stored `row` changes (with `update_time`), or {}: its settings, and
    its next run only when its schedule changed (the new schedule's next slot) or it is enabled again after
    being disabled (its next slot after now, so it does not fire at once for the time it was off)."""
    if not _differs(row, values):
        return {}
    current = JobRecord.from_row(row)
    updates = dict(values)
    nsr = current.next_scheduled_run
    if definition.schedule != current.schedule and definition.schedule is not None:
        nsr = definition.schedule.next_after(now)
    elif definition.enabled and not current.enabled and nsr < now:
        nsr = current.next_slot(now, nsr) or nsr  # on its cadence, anchored at the missed slot
    if nsr != current.next_scheduled_run:
        updates["next_scheduled_run"] = nsr
    changed = {key: value for key, value in updates.items() if row._mapping[key] != value}
    if changed:
        changed["update_time"] = now
    return changed


@dataclass(frozen=True)
class JobSync:
    """What `JobRepository.sync_jobs` did (names sorted); `unchanged`: nothing to do, found in one read."""

    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    disabled: list[str] = field(default_factory=list)
    unchanged: bool = False


@dataclass(frozen=True)
class _SyncPlan:
    new: list[str]
    candidates: list[str]  # stored, and differing in some setting
    missing: list[str]  # enabled jobs of the synced kind that are no longer declared

    @property
    def pending(self) -> bool:
        return bool(self.new or self.candidates or self.missing)


def _plan_sync(
    rows: Mapping[str, Row[Any]],
    wanted: Mapping[str, JobDefinition],
    values: Mapping[str, Mapping[str, Any]],
    kind: str | None,
) -> _SyncPlan:
    new = [name for name in wanted if name not in rows]
    candidates = [name for name, row in rows.items() if name in wanted and _differs(row, values[name])]
    missing = [] if kind is None else [n for n, r in rows.items() if n not in wanted and r.kind == kind and r.enabled]
    return _SyncPlan(new, sorted(candidates), sorted(missing))


@dataclass(frozen=True)
class RunRecord:
    id: int
    job_name: str
    status: str
    queue: str | None
    claimed_by: str
    worker: str | None
    task_id: str | None
    completed: int
    total: int
    error: str | None
    requested_next_run: dt.datetime | None
    create_time: dt.datetime
    start_time: dt.datetime | None
    update_time: dt.datetime
    end_time: dt.datetime | None
    kind: str = KIND_JOB
    slot: int = 0
    scheduled_for: dt.datetime | None = None

    @classmethod
    def from_row(cls, row: Row[Any]) -> RunRecord:
        m = row._mapping  # a new mapping object at each access
        return cls(**{name: m[name] for name in cls.__dataclass_fields__})

    @property
    def progress(self) -> JobStatus:
        return JobStatus(self.completed, self.total)


@dataclass(frozen=True)
class Claim:
    """What one claim took: its runs (by id) and, read in the same transaction, the jobs of those that advance
    at claim (plain tasks, `max_active` > 1), by name."""

    runs: list[RunRecord]
    jobs: dict[str, JobRecord]


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


def make_engine(url: str, engine_options: Mapping[str, Any] | None = None) -> Engine:
    """An engine for PostgreSQL (psycopg 3) or SQLite (WAL, busy timeout, immediate transactions)."""
    parsed = make_url(url)
    try:
        return _make_engine(parsed, engine_options)
    except NoSuchModuleError:
        raise ValueError(f"dbsched_database_url: no database driver {parsed.drivername!r} is installed") from None
    except (TypeError, ArgumentError) as exc:  # an option create_engine does not take, or of the wrong type
        raise ValueError(f"dbsched_engine_options: not accepted by SQLAlchemy: {exc}") from None


def _make_engine(parsed: URL, engine_options: Mapping[str, Any] | None) -> Engine:
    options = dict(engine_options or {})
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
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
    if backend != "postgresql":
        raise ValueError(f"dbsched_database_url: {backend!r} is not supported; use postgresql+psycopg:// or sqlite:///")
    options.setdefault("pool_pre_ping", True)
    return create_engine(parsed, **options)


def _is_missing_table(exc: DBAPIError) -> bool:
    message = str(exc.orig).lower()
    return "no such table" in message or ("relation" in message and "does not exist" in message)


def _is_missing_column(exc: DBAPIError) -> bool:
    """A column this code needs is not there: the schema is older than the code (not an outage)."""
    message = str(exc.orig).lower()
    return "no such column" in message or ("column" in message and "does not exist" in message)


def _schema_error(exc: DBAPIError) -> SchemaMismatch | None:
    if _is_missing_table(exc):
        return SchemaMismatch("the celery_dbsched tables are missing: run `celery -A proj dbsched migrate`")
    if _is_missing_column(exc):
        return SchemaMismatch(
            f"the database schema is older than this celery_dbsched ({str(exc.orig).strip().splitlines()[0]}): "
            "run `celery -A proj dbsched migrate`"
        )
    return None


def _error_text(error: str) -> str:
    """A run's error as stored: PostgreSQL text cannot hold NUL, and an exception message may (the run must
    still end), and a huge one is cut."""
    return error.replace("\x00", "\\x00")[:ERROR_TEXT_LIMIT]


def _status_is(states: Sequence[str]) -> ColumnElement[bool]:
    """`status IN (...)` for a fixed set of states, without the expanding parameter that `in_` renders
    (processed again at every execution of a statement built once)."""
    return or_(*(run_table.c.status == state for state in states))


def _database_error(exc: DBAPIError) -> DbschedError:
    """What a driver error means to callers (the one mapping, for `_tx` and `_one`): the schema is not the
    one this code needs, the database cannot be reached (worth waiting for), or a statement was refused."""
    mismatch = _schema_error(exc)
    if mismatch is not None:
        return mismatch
    if exc.connection_invalidated or is_outage(exc.orig if exc.orig is not None else exc):
        return DatabaseUnavailable(f"database unavailable: {exc.orig}")
    return DatabaseError(
        f"database error (not an outage: retrying the same statement will fail the same way): {exc.orig}"
    )


# A finishing statement that finds its job's cadence changed under it (a re-registration committed while it
# ran) stops itself with this text, so that nothing it wrote is kept, and the finish is done again the long way.
_RECHECK = "celery_dbsched: job changed while finishing"


class _Recheck(Exception):
    """The one-statement finish did nothing because a fact it was computed from no longer holds."""


class _KeptConnections:
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


@dataclass(frozen=True)
class _Started:
    """A run this repository started, with what its finish needs: the job's cadence as the start statement
    read it, and the start on both clocks (to tell the database's time at the finish within a second)."""

    run: RunRecord
    schedule: str | None
    default_next_run_in: float | None
    kind: str
    max_active: int
    retry_backoff_base: float | None
    retry_backoff_cap: float | None
    failure_count: int
    monotonic: float
    clock_shift: dt.timedelta
    frozen: bool

    @property
    def advances_at_claim(self) -> bool:
        return self.kind == KIND_TASK or self.max_active > 1


# The facts of a job that a one-statement finish is computed from (returned by the start statement).
_FINISH_FACTS = ("schedule", "default_next_run_in", "kind", "max_active", "retry_backoff_base", "retry_backoff_cap")
_STARTED_KEPT = 10_000  # runs started and not finished yet by this repository, remembered for their finish
# The one-statement finish picks the job's next slot among a few computed here around the expected time of
# the finish; the statement checks that the database's time is within them, else the finish goes the long way.
_SLOT_WINDOW = dt.timedelta(seconds=1)
_MAX_SLOTS = 32
_NEVER_BEFORE = dt.datetime(1, 1, 2, tzinfo=dt.timezone.utc)
_NEVER_AFTER = dt.datetime(9999, 12, 30, tzinfo=dt.timezone.utc)


def _slots_near(
    cadence: Schedule, anchor: dt.datetime, expected: dt.datetime
) -> tuple[list[dt.datetime], dt.datetime, dt.datetime]:
    """Consecutive slots of `cadence` (counted from `anchor`) from the first one after `expected` - window
    until one past `expected` + window (at most `_MAX_SLOTS`), and the range [lower, upper) of times `now`
    for which the first of them after `now` is `cadence.next_after(now, anchor)`."""
    lower = expected - _SLOT_WINDOW
    slots = [cadence.next_after(lower, anchor)]
    while slots[-1] <= expected + _SLOT_WINDOW and len(slots) < _MAX_SLOTS:
        slots.append(cadence.next_after(slots[-1], anchor))
    return slots, lower, slots[-1]


class JobRepository:
    """The job store. `url_or_engine` is a SQLAlchemy URL string or an `Engine` it does not own."""

    def __init__(
        self,
        url_or_engine: str | Engine,
        *,
        engine_options: Mapping[str, Any] | None = None,
        interrupt_threshold: dt.timedelta = DEFAULT_INTERRUPT_THRESHOLD,
        retry_backoff: tuple[dt.timedelta, dt.timedelta] = DEFAULT_RETRY_BACKOFF,
    ) -> None:
        if isinstance(url_or_engine, Engine):
            self.engine = url_or_engine
            self._owns_engine = False
        else:
            self.engine = make_engine(url_or_engine, engine_options)
            self._owns_engine = True
        self.interrupt_threshold = interrupt_threshold
        self.retry_backoff = retry_backoff
        # Test hooks, never set in production: `clock_shift` is added to the database clock (time moves on
        # without sleeping); `frozen_now` replaces it with a fixed time (schedule math at exact instants).
        self.clock_shift = dt.timedelta(0)
        self.frozen_now: dt.datetime | None = None
        # PostgreSQL: a job whose next run is set within this many seconds of now wakes the sleeping beats
        # (NOTIFY); beats sleep at most their run-jobs interval anyway, so later ones need no wake-up.
        self.wake_within: float | None = None
        self._is_postgres = self.engine.dialect.name == "postgresql"
        # The worker side (start, progress, finish, tracking): one statement each, built once.
        self._kept = _KeptConnections(self.engine) if self._is_postgres else None
        self._statements: dict[tuple[Any, ...], Executable] = {}
        self._started: dict[int, _Started] = {}
        self._started_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<JobRepository {mask_database_url(self.engine.url)}>"

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def close(self) -> None:
        if self._kept is not None:
            self._kept.close()
        if self._owns_engine:
            self.engine.dispose()

    # -- plumbing -------------------------------------------------------------------------------------

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        """One transaction. A database error comes out typed: SchemaMismatch (run the migration),
        DatabaseUnavailable (an outage: worth waiting for) or DatabaseError (the statement itself was refused
        and will be on every retry: a bug or a schema problem, not an outage)."""
        try:
            with self.engine.begin() as conn:
                yield conn
        except DBAPIError as exc:
            raise _database_error(exc) from exc

    def _one(self, statement: Executable, params: Mapping[str, Any] | None = None) -> list[Row[Any]]:
        """Run one statement in a transaction of its own and return its rows. On PostgreSQL: autocommit (the
        statement is the whole transaction: no BEGIN or COMMIT round trip) on a kept connection (no ping)."""
        if self._kept is None:
            with self._tx() as conn:
                result = conn.execute(statement, params)
                return list(result) if result.returns_rows else []
        for attempt in (1, 2):
            reused = False
            try:
                conn, reused = self._kept.take()
                try:
                    # In autocommit SQLAlchemy's transaction (begun with the connection's first statement)
                    # is bookkeeping only: left open while the connection is kept, no commit() per statement.
                    result = conn.execute(statement, params)
                    rows = list(result) if result.returns_rows else []
                except BaseException:
                    conn.close()
                    raise
            except DBAPIError as exc:
                if attempt == 1 and reused and exc.connection_invalidated:
                    continue  # dropped while kept: the statement did not run; once more on a pinged connection
                if _RECHECK in str(exc.orig):
                    raise _Recheck() from exc
                raise _database_error(exc) from exc
            self._kept.give_back(conn)
            return rows
        raise AssertionError("unreachable")

    def _prepared(self, name: str, build: Callable[[], Any]) -> Any:
        """The statement `name`, built once (per test clock: `_now` embeds the test hooks)."""
        key = (name, self.clock_shift, self.frozen_now)
        statement = self._statements.get(key)
        if statement is None:
            statement = self._statements[key] = build()
        return statement

    def _now(self, offset: float | ColumnElement[Any] | None = None) -> ColumnElement[dt.datetime]:
        """The database's clock (plus `offset` seconds): every persisted time is computed from it."""
        shift = self.clock_shift.total_seconds()
        if self.frozen_now is not None:
            base = literal(self.frozen_now, UTCDateTime())
            total: Any = shift if offset is None else (offset + shift if shift else offset)
            return db_time_at(base, literal(float(total), Float) if isinstance(total, (int, float)) else total)
        if offset is None:
            return db_now(literal(shift, Float)) if shift else db_now()
        if isinstance(offset, (int, float)):
            return db_now(literal(float(offset) + shift, Float))
        return db_now(offset + shift) if shift else db_now(offset)

    def _insert(self, table: Any) -> Any:
        return (postgresql.insert if self._is_postgres else sqlite.insert)(table)

    def _values_of(self, values: Iterable[Any], column: Any) -> Select[Any]:
        """`SELECT value` over `values`, as ONE bound parameter (a JSON array) whatever their number: for
        `column.in_(...)` / `not_in(...)`. A list of bound parameters would grow with N, and PostgreSQL refuses
        more than 65,535 a statement (SQLite 32,766)."""
        payload = literal(json.dumps(list(values)), String)
        if self._is_postgres:
            elements = func.json_array_elements_text(cast(payload, JSON)).table_valued("value")
        else:
            elements = func.json_each(payload).table_valued("value")
        return select(cast(elements.c.value, column.type))

    def _run_or_raise(self, conn: Connection, run_id: int, wanted: str) -> RunRecord:
        """After a conditional transition matched nothing: say why, as a typed error."""
        row = conn.execute(select(run_table).where(run_table.c.id == run_id)).first()
        if row is None:
            raise RunNotFound(run_id)
        raise InvalidRunState(run_id, row.status, wanted)

    # -- jobs -----------------------------------------------------------------------------------------

    def upsert_job(
        self,
        name: str,
        description: str,
        *,
        next_run_in: dt.timedelta | None = None,
        default_next_run_in: dt.timedelta | None = None,
        queue: str | None = None,
        interrupt_threshold: dt.timedelta | None = None,
        **policies: Any,
    ) -> JobRecord:
        """Insert a job, or update an existing one's description and settings without touching its next
        scheduled run (design §8). `policies` are the other `JobDefinition` fields (schedule, misfire, ...)."""
        definition = JobDefinition(
            name=name,
            description=description,
            default_next_run_in=default_next_run_in,
            queue=queue,
            interrupt_threshold=interrupt_threshold,
            **policies,
        )
        return self.define_job(definition, next_run_in=next_run_in)

    def define_job(self, definition: JobDefinition, *, next_run_in: dt.timedelta | None = None) -> JobRecord:
        """The upsert behind registration. A new job is first due at now + `next_run_in`, else at its
        schedule's first slot (now for intervals), else now. An existing job keeps its next run unless its
        schedule changed (then: the new schedule's next slot) or it is enabled again after being disabled
        (then: its next slot after now, so it does not fire at once for the time it was off)."""
        _check_first_run(definition.name, next_run_in)
        j = job_table
        values = _definition_values(definition)
        while True:
            with self._tx() as conn:
                now = self._db_now(conn)
                query = select(j).where(j.c.name == definition.name)
                if self._is_postgres:
                    query = query.with_for_update()
                row = conn.execute(query).first()
                if row is None:
                    first = _first_run(definition, next_run_in, now)
                    inserted = conn.execute(
                        self._insert(j)
                        .values(
                            name=definition.name, next_scheduled_run=first, create_time=now, update_time=now, **values
                        )
                        .on_conflict_do_nothing()
                        .returning(*j.c)
                    ).first()
                    if inserted is None:
                        continue  # registered concurrently by another process: update it instead
                    self._wake_if_soon(conn, definition.name, first, now)
                    return JobRecord.from_row(inserted)
                changed = _changes(row, definition, values, now)
                if not changed:
                    return JobRecord.from_row(row)
                updated = conn.execute(
                    update(j).where(j.c.name == definition.name).values(**changed).returning(*j.c)
                ).one()
                return JobRecord.from_row(updated)

    def sync_jobs(
        self,
        definitions: Sequence[JobDefinition],
        *,
        next_run_in: Mapping[str, dt.timedelta | None] | None = None,
        disable_missing: str | None = None,
        source: str | None = None,
        fingerprint: str | None = None,
    ) -> JobSync:
        """`define_job` for many jobs at once, in a constant number of statements when nothing changed and
        bounded chunks for what did (never a statement per job, never a parameter per job in one statement).

        Each job is stored as `define_job` stores it (new: first due as there; changed: its next run only
        recomputed when its schedule changed or it is enabled again). `disable_missing`: also disable the
        enabled jobs of that kind not among `definitions` (history kept). `source` + `fingerprint`: a digest of
        whatever the definitions were built from; when the database says the last sync of `source` stored the
        same one (`sync_is_current`, which callers ask first to skip building the definitions) nothing is written;
        the fingerprint is stored with the changes, in their transaction. Several processes syncing one source
        at once are serialised on its `dbsched_sync` row (on SQLite, on the database's write lock)."""
        wanted = {definition.name: definition for definition in definitions}
        for definition in wanted.values():
            _check_first_run(definition.name, (next_run_in or {}).get(definition.name))
        values = {name: _definition_values(definition) for name, definition in wanted.items()}
        if source is None:
            # No digest to go by: compare without locking first, so that an unchanged registry is one read.
            with self._tx() as conn:
                rows = self._rows_to_sync(conn, wanted, disable_missing)
            if not _plan_sync(rows, wanted, values, disable_missing).pending:
                return JobSync(unchanged=True)
        with self._tx() as conn:
            if source is not None and fingerprint is not None:
                stored = self._lock_source(conn, source)
                if stored is not None and stored == (fingerprint, self._count_kind(conn, disable_missing)):
                    return JobSync(unchanged=True)  # another process just synced the same
            now = self._db_now(conn)
            rows = self._rows_to_sync(conn, wanted, disable_missing)
            plan = _plan_sync(rows, wanted, values, disable_missing)
            added = self._insert_new(conn, [wanted[name] for name in plan.new], values, next_run_in or {}, now)
            raced = sorted(set(plan.new) - set(added))  # inserted by another process meanwhile: compare them
            changed = self._update_changed(conn, plan.candidates + raced, wanted, values, now)
            disabled = self._disable(conn, plan.missing, disable_missing, now) if disable_missing else []
            if source is not None and fingerprint is not None:
                self._store_fingerprint(conn, source, fingerprint, disable_missing, now)
        return JobSync(added=added, changed=changed, disabled=disabled)

    def sync_is_current(self, source: str, fingerprint: str, kind: str | None) -> bool:
        """One read: the last sync of `source` stored this fingerprint, and the jobs of `kind` are still as
        many as it left (none deleted or added behind its back). Then syncing the same again is a no-op."""
        s, j = sync_table, job_table
        count = select(func.count()).select_from(j)
        if kind is not None:
            count = count.where(j.c.kind == kind)
        with self._tx() as conn:
            row = conn.execute(
                select(s.c.fingerprint, s.c.job_count, count.scalar_subquery()).where(s.c.key == source)
            ).first()
        return row is not None and row[0] == fingerprint and row[1] == row[2]

    def _count_kind(self, conn: Connection, kind: str | None) -> int:
        j = job_table
        count = select(func.count()).select_from(j)
        if kind is not None:
            count = count.where(j.c.kind == kind)
        return int(conn.execute(count).scalar_one())

    def _lock_source(self, conn: Connection, source: str) -> tuple[str | None, int] | None:
        """Hold the `source` row until commit (another process syncing the same source waits here)."""
        s = sync_table
        conn.execute(
            self._insert(s)
            .values(key=source, fingerprint=None, job_count=0, update_time=self._now())
            .on_conflict_do_nothing()
        )
        query = select(s.c.fingerprint, s.c.job_count).where(s.c.key == source)
        if self._is_postgres:
            query = query.with_for_update()
        row = conn.execute(query).first()
        return None if row is None else (row[0], int(row[1]))

    def _store_fingerprint(
        self, conn: Connection, source: str, fingerprint: str, kind: str | None, now: dt.datetime
    ) -> None:
        s = sync_table
        conn.execute(
            update(s)
            .where(s.c.key == source)
            .values(fingerprint=fingerprint, job_count=self._count_kind(conn, kind), update_time=now)
        )

    def _rows_to_sync(
        self, conn: Connection, wanted: Mapping[str, JobDefinition], kind: str | None
    ) -> dict[str, Row[Any]]:
        """The stored rows of the wanted jobs and (with `kind`) every enabled job of that kind: one statement."""
        j = job_table
        condition: ColumnElement[bool] = j.c.name.in_(self._values_of(wanted, j.c.name))
        if kind is not None:
            condition = or_(condition, and_(j.c.kind == kind, j.c.enabled))
        return {row.name: row for row in conn.execute(select(j).where(condition))}

    def _insert_new(
        self,
        conn: Connection,
        definitions: Sequence[JobDefinition],
        values: Mapping[str, Mapping[str, Any]],
        next_run_in: Mapping[str, dt.timedelta | None],
        now: dt.datetime,
    ) -> list[str]:
        """Insert the new jobs in chunks; returns the names inserted (not those another process got to first)."""
        j = job_table
        added: list[str] = []
        soon = False
        chunk = SYNC_JSON_CHUNK if self._is_postgres else SYNC_CHUNK
        for start in range(0, len(definitions), chunk):
            rows = []
            for definition in definitions[start : start + chunk]:
                first = _first_run(definition, next_run_in.get(definition.name), now)
                soon = soon or self._is_soon(first, now)
                rows.append(
                    {
                        "name": definition.name,
                        "next_scheduled_run": first,
                        "create_time": now,
                        "update_time": now,
                        **values[definition.name],
                    }
                )
            if self._is_postgres:
                # One JSON parameter per chunk: libpq would otherwise parse a statement of ~25 placeholders a row.
                columns = list(rows[0])
                records = func.json_to_recordset(cast(literal(json.dumps(rows, default=_json_time), String), JSON))
                source = records.table_valued(*(column(name, j.c[name].type) for name in columns)).render_derived(
                    name="new_job", with_types=True
                )
                stmt = self._insert(j).from_select(columns, select(*source.c)).on_conflict_do_nothing()
                added.extend(conn.execute(stmt.returning(j.c.name)).scalars())
            else:
                # Under SQLite's write lock nobody else inserts meanwhile; executemany binds ~25 values a row.
                conn.execute(self._insert(j).on_conflict_do_nothing(), rows)
                added.extend(row["name"] for row in rows)
        if soon and added:
            conn.execute(select(func.pg_notify(WAKEUP_CHANNEL, added[0])))
        return added

    def _update_changed(
        self,
        conn: Connection,
        names: Sequence[str],
        wanted: Mapping[str, JobDefinition],
        values: Mapping[str, Mapping[str, Any]],
        now: dt.datetime,
    ) -> list[str]:
        """Re-read the jobs that differ (locked on PostgreSQL, so that a claim that moves one meanwhile is not
        undone) and write what changed, in chunks of one statement per set of changed columns."""
        j = job_table
        changed_names: list[str] = []
        for start in range(0, len(names), SYNC_CHUNK):
            chunk = names[start : start + SYNC_CHUNK]
            query = select(j).where(j.c.name.in_(self._values_of(chunk, j.c.name)))
            if self._is_postgres:
                query = query.with_for_update()
            groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
            for row in conn.execute(query):
                changes = _changes(row, wanted[row.name], values[row.name], now)
                if changes:
                    groups.setdefault(tuple(sorted(changes)), []).append({"b_name": row.name, **changes})
                    changed_names.append(row.name)
            for params in groups.values():
                conn.execute(update(j).where(j.c.name == bindparam("b_name")), params)
        return sorted(changed_names)

    def _disable(self, conn: Connection, names: Sequence[str], kind: str, now: dt.datetime) -> list[str]:
        if not names:
            return []
        j = job_table
        rows = conn.execute(
            update(j)
            .where(j.c.name.in_(self._values_of(names, j.c.name)), j.c.kind == kind, j.c.enabled)
            .values(enabled=False, update_time=now)
            .returning(j.c.name)
        ).all()
        return sorted(row[0] for row in rows)

    def _db_now(self, conn: Connection) -> dt.datetime:
        value = conn.execute(select(self._now())).scalar_one()
        assert isinstance(value, dt.datetime)
        return value

    def lookup_job(self, name: str) -> JobRecord:
        with self._tx() as conn:
            row = conn.execute(select(job_table).where(job_table.c.name == name)).first()
        if row is None:
            raise JobNotFound(name)
        return JobRecord.from_row(row)

    def lookup_jobs(self, names: Sequence[str]) -> dict[str, JobRecord]:
        """The named jobs that exist, by name (one query, one bound parameter however many names)."""
        if not names:
            return {}
        with self._tx() as conn:
            rows = conn.execute(
                select(job_table).where(job_table.c.name.in_(self._values_of(set(names), job_table.c.name)))
            ).all()
        return {row.name: JobRecord.from_row(row) for row in rows}

    def list_jobs(self) -> list[JobRecord]:
        with self._tx() as conn:
            rows = conn.execute(select(job_table).order_by(job_table.c.name)).all()
        return [JobRecord.from_row(row) for row in rows]

    def update_job_next_run_in_at_least(self, name: str, delta: dt.timedelta, *, run_now: bool = False) -> JobRecord:
        """`next_scheduled_run = least(now + delta, next_scheduled_run)`: only ever earlier. When the job has
        an active run the request is kept on that run and honoured when it ends (design §6)."""
        if not isinstance(name, str) or not name:
            raise ValueError("job name must not be empty")
        seconds = delta.total_seconds()
        if seconds < 0:
            raise ValueError(f"delta must not be negative, got {delta}")
        j, r = job_table, run_table
        wanted = self._now(seconds)
        with self._tx() as conn:
            row = conn.execute(
                update(j)
                .where(j.c.name == name)
                .values(next_scheduled_run=least(wanted, j.c.next_scheduled_run))
                .returning(*j.c)
            ).first()
            if row is None:
                raise JobNotFound(name)
            conn.execute(
                update(r)
                .where(r.c.job_name == name, r.c.status.in_(ACTIVE_STATES))
                .values(requested_next_run=least(func.coalesce(r.c.requested_next_run, wanted), wanted))
            )
            if run_now and self._is_postgres:
                conn.execute(select(func.pg_notify(WAKEUP_CHANNEL, name)))
        return JobRecord.from_row(row)

    def next_due_in(self) -> float | None:
        """Seconds until the earliest claimable job is due (<= 0: due now); None when there is none. One
        indexed query: this is what an idle beat tick costs."""
        j = job_table
        stmt = (
            select(j.c.next_scheduled_run, self._now().label("now"))
            .where(claimable)
            .order_by(j.c.next_scheduled_run, j.c.name)
            .limit(1)
        )
        with self._tx() as conn:
            row = conn.execute(stmt).first()
        if row is None:
            return None
        due: dt.datetime = row[0]
        now: dt.datetime = row[1]
        return (due - now).total_seconds()

    # -- runs: claiming -------------------------------------------------------------------------------

    def run_jobs(self, server_id: str, limit: int) -> list[RunRecord]:
        """Claim up to `limit` due jobs (see `claim_due`); the claimed runs, by id."""
        return self.claim_due(server_id, limit).runs

    def claim_due(self, server_id: str, limit: int) -> Claim:
        """Claim up to `limit` due jobs in one statement: a `queued` run for each, earliest due first, then by
        name. Jobs without a free slot are skipped; the unique partial index on (job, slot) plus ON CONFLICT
        DO NOTHING makes concurrent claims by several beats safe (design §2). On PostgreSQL the due jobs are
        read `FOR UPDATE SKIP LOCKED`: beats claiming at the same time take disjoint sets of jobs instead of
        waiting for each other's claim and then finding nothing left.

        In the same transaction: jobs with the `skip` misfire policy that are later than their grace are
        moved to their next slot instead of running, and jobs that advance when claimed (plain tasks,
        `max_active` > 1) get their next slot. The claim returns, beside its runs, those jobs as one set-based
        read keyed on the claim saw them: what a plain task's message is built from."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        j, r = job_table, run_table
        now = self._now()
        with self._tx() as conn:
            self._skip_misfired(conn, limit)
            slot_taken = exists().where(r.c.job_name == j.c.name, r.c.status.in_(ACTIVE_STATES), r.c.slot == 0)
            r2 = run_table.alias("r2")
            next_free = (
                select(func.min(r.c.slot + 1))
                .where(
                    r.c.job_name == j.c.name,
                    r.c.status.in_(ACTIVE_STATES),
                    ~exists().where(
                        r2.c.job_name == r.c.job_name, r2.c.status.in_(ACTIVE_STATES), r2.c.slot == r.c.slot + 1
                    ),
                )
                .correlate(j)
                .scalar_subquery()
            )
            slot = case((j.c.max_active == 1, 0), (~slot_taken, 0), else_=next_free)
            due = (
                select(
                    j.c.name,
                    literal(QUEUED, String),
                    j.c.queue,
                    literal(server_id, String),
                    now,
                    now,
                    j.c.kind,
                    slot,
                    func.coalesce(j.c.retry_slot, j.c.next_scheduled_run),
                )
                .where(j.c.next_scheduled_run <= now, claimable)
                .order_by(j.c.next_scheduled_run, j.c.name)
                .limit(limit)
            )
            if self._is_postgres:
                due = due.with_for_update(skip_locked=True, of=j)
            columns = [
                "job_name", "status", "queue", "claimed_by", "create_time", "update_time", "kind", "slot",
                "scheduled_for",
            ]  # fmt: skip
            rows = conn.execute(
                self._insert(r).from_select(columns, due).on_conflict_do_nothing().returning(*r.c)
            ).all()
            runs = sorted((RunRecord.from_row(row) for row in rows), key=lambda run: run.id)
            if runs and self._is_postgres:
                runs = self._drop_stale_claims(conn, runs)
            jobs = self._advance_claimed(conn, runs)
        return Claim(runs, jobs)

    def _id_set(self, ids: Sequence[int]) -> Any:
        """`ids` as one bound parameter (an array on PostgreSQL, a JSON list on SQLite), for `id IN (...)`
        without a parameter per id."""
        if self._is_postgres:
            return any_(literal(list(ids), postgresql.ARRAY(BigInteger)))
        values = func.json_each(literal(json.dumps(list(ids)), String)).table_valued("value")
        return select(values.c.value).scalar_subquery()

    def _in_ids(self, column: Any, ids: Sequence[int]) -> ColumnElement[bool]:
        ids_set = self._id_set(ids)
        result: ColumnElement[bool] = column == ids_set if self._is_postgres else column.in_(ids_set)
        return result

    def _drop_stale_claims(self, conn: Connection, runs: list[RunRecord]) -> list[RunRecord]:
        """PostgreSQL (READ COMMITTED): the claim statement read the jobs as they were when it began. When it
        waits on another beat's uncommitted claim, a run of the same slot that a third beat claimed and a worker
        finished meanwhile is no longer active, so it does not conflict, and the slot would run twice. This
        statement reads afresh (it sees every commit the claim waited for): a claimed run whose slot is no
        longer the job's due slot was already run (or moved) by someone else, and is dropped. (The claimed ids
        are one array parameter, however many.)"""
        j, r = job_table, run_table
        stale = set(
            conn.execute(
                delete(r)
                .where(
                    self._in_ids(r.c.id, [run.id for run in runs]),
                    ~exists().where(
                        j.c.name == r.c.job_name,
                        func.coalesce(j.c.retry_slot, j.c.next_scheduled_run) == r.c.scheduled_for,
                    ),
                )
                .returning(r.c.id)
            ).scalars()
        )
        return [run for run in runs if run.id not in stale]

    def _skip_misfired(self, conn: Connection, limit: int) -> None:
        j = job_table
        grace = func.coalesce(j.c.misfire_grace, DEFAULT_MISFIRE_GRACE.total_seconds())
        rows = conn.execute(
            select(j)
            .where(
                j.c.misfire == MISFIRE_SKIP,
                j.c.next_scheduled_run <= self._now(),  # a range on the (small) index of skip-policy jobs
                j.c.next_scheduled_run < self._now(-grace),
                claimable,
            )
            .limit(limit)
        ).all()
        if not rows:
            return
        now = self._db_now(conn)
        slots = []
        for row in rows:
            job = JobRecord.from_row(row)
            slot = job.next_slot(now, job.next_scheduled_run)
            if slot is not None:
                slots.append((job.name, slot))
        self._set_next_runs(conn, slots)

    def _advance_claimed(self, conn: Connection, runs: Sequence[RunRecord]) -> dict[str, JobRecord]:
        """Plain tasks and overlapping jobs: the claim itself moves the job to its next slot (fixed cadence;
        one catch-up at most, never a burst of missed slots). One read of those jobs, joined on the claimed
        runs, and one update of all their next slots; returns the jobs as read."""
        j, r = job_table, run_table
        if not runs:
            return {}
        rows = conn.execute(
            select(j, r.c.scheduled_for.label("claimed_slot"), self._now().label("claimed_at"))
            .join(r, r.c.job_name == j.c.name)
            .where(self._in_ids(r.c.id, [run.id for run in runs]), or_(j.c.kind == KIND_TASK, j.c.max_active > 1))
        ).all()
        jobs: dict[str, JobRecord] = {}
        slots: list[tuple[str, dt.datetime]] = []
        for row in rows:
            job = JobRecord.from_row(row)
            jobs[job.name] = job
            slot = job.next_slot(row.claimed_at, row.claimed_slot)
            if slot is not None:
                slots.append((job.name, slot))
        self._set_next_runs(conn, slots)
        return jobs

    def _set_next_runs(self, conn: Connection, slots: Sequence[tuple[str, dt.datetime]]) -> None:
        """`next_scheduled_run` of many jobs in one statement, with the (name, time) pairs as one parameter."""
        if not slots:
            return
        j = job_table
        if len(slots) == 1:
            conn.execute(update(j).where(j.c.name == slots[0][0]).values(next_scheduled_run=slots[0][1]))
            return
        if self._is_postgres:
            pairs = (
                func.unnest(
                    literal([name for name, _ in slots], postgresql.ARRAY(String)),
                    literal([when for _, when in slots], postgresql.ARRAY(postgresql.TIMESTAMP(timezone=True))),
                )
                .table_valued("name", "slot")
                .render_derived(name="pairs")
            )
            conn.execute(update(j).where(j.c.name == pairs.c.name).values(next_scheduled_run=pairs.c.slot))
            return
        to_text = UTCDateTime().bind_processor(conn.dialect)
        assert to_text is not None
        data = json.dumps([[name, str(to_text(when))] for name, when in slots])
        pairs = func.json_each(literal(data, String)).table_valued("value")
        conn.execute(
            update(j)
            .where(j.c.name == func.json_extract(pairs.c.value, "$[0]"))
            .values(next_scheduled_run=func.json_extract(pairs.c.value, "$[1]"))
        )

    # -- runs: transitions ----------------------------------------------------------------------------

    def start_run(self, run_id: int, worker: str, task_id: str | None = None) -> RunRecord:
        """`queued -> running`, or InvalidRunState: the one gate that makes a run start at most once. A run
        whose job `expires` and whose slot + expires has passed ends `interrupted` (expired) instead.

        On PostgreSQL the gate is one statement that also returns the job's cadence, for the finish."""
        if self._is_postgres:
            rows = self._one(
                self._prepared("start", self._start_statement),
                {"run_id": run_id, "run_worker": worker, "run_task_id": task_id},
            )
            if rows:
                return self._remember_start(rows[0])
            # Not started: not queued, unknown, or expired. The long way says which (and ends an expired run).
        return self._start_run_in_tx(run_id, worker, task_id)

    def _start_statement(self) -> Executable:
        r, j = run_table, job_table
        now = self._now()
        return (
            update(r)
            .where(
                r.c.id == bindparam("run_id"),
                r.c.status == QUEUED,
                j.c.name == r.c.job_name,
                # As in `_start_run_in_tx`: expires counts from the claim.
                or_(j.c.expires.is_(None), r.c.create_time >= self._now(-j.c.expires)),
            )
            .values(
                status=RUNNING,
                worker=bindparam("run_worker"),
                task_id=bindparam("run_task_id"),
                start_time=now,
                update_time=now,
            )
            .returning(
                *r.c,
                *(j.c[name].label(f"job_{name}") for name in _FINISH_FACTS),
                j.c.failure_count.label("job_failure_count"),
            )
        )

    def _remember_start(self, row: Row[Any]) -> RunRecord:
        run = RunRecord.from_row(row)
        m = row._mapping
        started = _Started(
            run=run,
            schedule=m["job_schedule"],
            default_next_run_in=m["job_default_next_run_in"],
            kind=m["job_kind"],
            max_active=m["job_max_active"],
            retry_backoff_base=m["job_retry_backoff_base"],
            retry_backoff_cap=m["job_retry_backoff_cap"],
            failure_count=m["job_failure_count"],
            monotonic=time.monotonic(),
            clock_shift=self.clock_shift,
            frozen=self.frozen_now is not None,
        )
        with self._started_lock:
            if len(self._started) >= _STARTED_KEPT:
                self._started.pop(next(iter(self._started)))
            self._started[run.id] = started
        return run

    def _forget_start(self, run_id: int) -> None:
        with self._started_lock:
            self._started.pop(run_id, None)

    def _start_run_in_tx(self, run_id: int, worker: str, task_id: str | None) -> RunRecord:
        r, j = run_table, job_table
        now = self._now()
        expires = select(j.c.expires).where(j.c.name == r.c.job_name).scalar_subquery()
        not_expired = or_(
            expires.is_(None),
            # Counted from the claim, which is the slot itself or, for a catch-up run after downtime, the moment
            # the slot was taken up: a catch-up run must not expire before it could start.
            r.c.create_time >= self._now(-expires),
        )
        expired = None
        with self._tx() as conn:
            row = conn.execute(
                update(r)
                .where(r.c.id == run_id, r.c.status == QUEUED, not_expired)
                .values(status=RUNNING, worker=worker, task_id=task_id, start_time=now, update_time=now)
                .returning(*r.c)
            ).first()
            if row is None:
                expired = conn.execute(
                    update(r)
                    .where(r.c.id == run_id, r.c.status == QUEUED)
                    .values(status=INTERRUPTED, end_time=now, error=f"{EXPIRED}: not started before its slot + expires")
                    .returning(*r.c)
                ).first()
                if expired is None:
                    self._run_or_raise(conn, run_id, QUEUED)
                else:
                    self._skip_slot(conn, RunRecord.from_row(expired))
        if expired is not None:
            # Raised after the commit: raising inside the transaction would roll the expiry back.
            raise InvalidRunState(run_id, INTERRUPTED, QUEUED)
        assert row is not None
        return RunRecord.from_row(row)

    def update_progress(self, run_id: int, completed: int, total: int) -> RunRecord:
        """Store a running run's progress; `update_time` moves only when the values change (design §5)."""
        JobStatus(completed, total)
        if self._is_postgres:
            rows = self._one(
                self._prepared("progress", self._progress_statement),
                {"run_id": run_id, "p_completed": completed, "p_total": total},
            )
            if not rows:
                raise RunNotFound(run_id)
            row = rows[0]
            if row._mapping["_written"]:
                return RunRecord.from_row(row)
            if row.status != RUNNING:
                raise InvalidRunState(run_id, row.status, RUNNING)
            if (row.completed, row.total) == (completed, total):
                return RunRecord.from_row(row)
            # The write missed a running run with other values: it changed meanwhile. Look again.
        return self._update_progress_in_tx(run_id, completed, total)

    def _progress_statement(self) -> Executable:
        """The write, or (when it matched nothing) the run as it was: why it did not apply, in one statement."""
        r = run_table
        changed = or_(r.c.completed != bindparam("p_completed"), r.c.total != bindparam("p_total"))
        written = (
            update(r)
            .where(r.c.id == bindparam("run_id"), r.c.status == RUNNING, changed)
            .values(completed=bindparam("p_completed"), total=bindparam("p_total"), update_time=self._now())
            .returning(*r.c, true().label("_written"))
            .cte("written")
        )
        as_it_was = select(*r.c, literal(False).label("_written")).where(
            r.c.id == bindparam("run_id"), ~exists(select(written.c.id))
        )
        return select(written).union_all(as_it_was)

    def _update_progress_in_tx(self, run_id: int, completed: int, total: int) -> RunRecord:
        r = run_table
        with self._tx() as conn:
            row = conn.execute(
                update(r)
                .where(
                    r.c.id == run_id,
                    r.c.status == RUNNING,
                    or_(r.c.completed != completed, r.c.total != total),
                )
                .values(completed=completed, total=total, update_time=self._now())
                .returning(*r.c)
            ).first()
            if row is None:
                row = conn.execute(select(r).where(r.c.id == run_id)).first()
                if row is None:
                    raise RunNotFound(run_id)
                if row.status != RUNNING:
                    raise InvalidRunState(run_id, row.status, RUNNING)
        return RunRecord.from_row(row)

    def run_status(self, run_id: int) -> str:
        statement = self._prepared(
            "status", lambda: select(run_table.c.status).where(run_table.c.id == bindparam("run_id"))
        )
        rows = self._one(statement, {"run_id": run_id})
        if not rows:
            raise RunNotFound(run_id)
        return str(rows[0][0])

    def _end_run(
        self,
        conn: Connection,
        run_id: int,
        status: str,
        from_states: tuple[str, ...],
        *,
        error: str | None = None,
        progress: JobStatus | None = None,
    ) -> RunRecord:
        r = run_table
        values: dict[str, Any] = {"status": status, "end_time": self._now()}
        if error is not None:
            values["error"] = _error_text(error)
        if progress is not None:
            values["completed"] = progress.completed
            values["total"] = progress.total
        row = conn.execute(
            update(r).where(r.c.id == run_id, r.c.status.in_(from_states)).values(**values).returning(*r.c)
        ).first()
        if row is None:
            self._run_or_raise(conn, run_id, " or ".join(from_states))
        assert row is not None
        return RunRecord.from_row(row)

    def _job(self, conn: Connection, name: str) -> JobRecord | None:
        query = select(job_table).where(job_table.c.name == name)
        if self._is_postgres:
            query = query.with_for_update()
        row = conn.execute(query).first()
        return None if row is None else JobRecord.from_row(row)

    def _schedule_next(
        self, conn: Connection, run: RunRecord, when: dt.datetime, *, failed: bool, now: dt.datetime | None = None
    ) -> None:
        j = job_table
        if run.requested_next_run is not None:
            when = min(when, run.requested_next_run)
        conn.execute(
            update(j)
            .where(j.c.name == run.job_name)
            .values(
                next_scheduled_run=when,
                failure_count=j.c.failure_count + 1 if failed else 0,
                retry_slot=func.coalesce(j.c.retry_slot, literal(run.scheduled_for, UTCDateTime())) if failed else None,
            )
        )
        if now is not None:
            self._wake_if_soon(conn, run.job_name, when, now)

    def _is_soon(self, when: dt.datetime, now: dt.datetime) -> bool:
        return self._is_postgres and self.wake_within is not None and (when - now).total_seconds() < self.wake_within

    def _wake_if_soon(self, conn: Connection, name: str, when: dt.datetime, now: dt.datetime) -> None:
        if self._is_soon(when, now):
            conn.execute(select(func.pg_notify(WAKEUP_CHANNEL, name)))

    def complete_run(
        self, run_id: int, next_run_in: dt.timedelta | None = None, *, progress: JobStatus | None = None
    ) -> RunRecord:
        """`running -> completed`. The job is next due at now + `next_run_in` when the job gave a delay
        (relative to completion, as in Boundary); with None, at its next slot after now on its fixed cadence
        (counted from the slot this run was for). A pull-in made meanwhile wins if earlier.

        On PostgreSQL, for a run this repository started, one statement ends the run and schedules the job
        (`_finish_in_one_statement`); otherwise, or when that does not apply, `_complete_in_tx`."""
        if next_run_in is not None and next_run_in < dt.timedelta(0):
            raise ValueError(f"next_run_in must not be negative, got {next_run_in}")
        if self._is_postgres:
            run = self._finish_in_one_statement(run_id, None, next_run_in, progress)
            if run is not None:
                return run
        self._forget_start(run_id)
        return self._complete_in_tx(run_id, next_run_in, progress)

    def _complete_in_tx(self, run_id: int, next_run_in: dt.timedelta | None, progress: JobStatus | None) -> RunRecord:
        with self._tx() as conn:
            run = self._end_run(conn, run_id, COMPLETED, (RUNNING,), progress=progress)
            job = self._job(conn, run.job_name)
            if job is None:
                return run
            # Counted from the run's end on the database clock, not from a later statement's now: a slot that came
            # between the two (a loaded database) is still due, not passed over as if the run had overrun it.
            now = run.end_time if run.end_time is not None else self._db_now(conn)
            if next_run_in is not None:
                when = now + next_run_in
            elif job.advances_at_claim:
                when = job.next_scheduled_run  # moved when the run was claimed
            else:
                when = job.next_slot(now, run.scheduled_for or now) or now + self.retry_backoff[1]
            self._schedule_next(conn, run, when, failed=False, now=now)
        return run

    def _retry(self, conn: Connection, run: RunRecord) -> None:
        """Schedule the retry of a failed or stalled run (and wake the beats if it is soon)."""
        now = self._db_now(conn)
        self._schedule_next(conn, run, self._retry_at(conn, run, now), failed=True, now=now)

    def _retry_at(self, conn: Connection, run: RunRecord, now: dt.datetime) -> dt.datetime:
        """Exponential backoff (the job's own, else the global), never later than the job's next slot."""
        job = self._job(conn, run.job_name)
        if job is None:
            return now
        slot = job.next_slot(now, run.scheduled_for or now)
        ceiling = None if slot is None else slot - now
        delay = backoff_delay(job.failure_count + 1, job.retry_backoff or self.retry_backoff, ceiling)
        when = now + delay
        if job.advances_at_claim:
            when = min(when, job.next_scheduled_run)
        return when

    def fail_run(self, run_id: int, error: str, *, progress: JobStatus | None = None) -> RunRecord:
        """`queued|running -> failed` with the error text; the job is retried after the backoff (design §7).
        One statement on PostgreSQL for a run this repository started, as `complete_run`."""
        if self._is_postgres:
            run = self._finish_in_one_statement(run_id, error or "failed", None, progress)
            if run is not None:
                return run
        self._forget_start(run_id)
        with self._tx() as conn:
            run = self._end_run(conn, run_id, FAILED, ACTIVE_STATES, error=error or "failed", progress=progress)
            self._retry(conn, run)
        return run

    def _finish_in_one_statement(
        self, run_id: int, error: str | None, next_run_in: dt.timedelta | None, progress: JobStatus | None
    ) -> RunRecord | None:
        """PostgreSQL: end the run (completed, or failed with `error`) and schedule its job's next run in one
        statement, with the semantics of `_complete_in_tx` / `fail_run`'s `_retry` exactly. The next slot is
        computed here from the job's cadence as the start returned it (`_Started`), as a few candidate slots
        around the expected time of the finish; the statement applies only if the database's time falls
        among them and the job's cadence is still the one they were computed from. None when it did not
        apply (the run is not ours to end, the facts changed, or no start is remembered): nothing was written,
        and the caller goes the long way, which also says why."""
        failed = error is not None
        started = self._started.get(run_id)
        params: dict[str, Any] = {
            "run_id": run_id,
            "p_completed": None if progress is None else progress.completed,
            "p_total": None if progress is None else progress.total,
            "w_lower": _NEVER_BEFORE,
            "w_upper": _NEVER_AFTER,
            "w_slots": [],
            "w_delay": None,
            "w_use_next": False,
            "w_wake": None if self.wake_within is None else dt.timedelta(seconds=self.wake_within),
        }
        if failed:
            params["run_error"] = _error_text(error or "failed")
        if not failed and next_run_in is not None:
            checked = False  # now + the job's own delay: nothing about the job is needed
            params["w_delay"] = next_run_in
        else:
            if started is None or started.run.scheduled_for is None:
                return None
            expected = self._expected_now(started)
            if expected is None:
                return None
            checked = True
            params.update({f"f_{name}": getattr(started, name) for name in _FINISH_FACTS})
            params["f_failure_count"] = started.failure_count
            cadence = _cadence(
                schedule_from_spec(started.schedule) if started.schedule else None, _delta(started.default_next_run_in)
            )
            advances = started.advances_at_claim
            if cadence is not None and (failed or not advances):
                slots, lower, upper = _slots_near(cadence, started.run.scheduled_for, expected)
                params.update(w_slots=slots, w_lower=lower, w_upper=upper)
            params["w_use_next"] = advances
            if failed:
                base, cap = started.retry_backoff_base, started.retry_backoff_cap
                backoff = self.retry_backoff if base is None or cap is None else (_delta(base), _delta(cap))
                params["w_delay"] = backoff_delay(started.failure_count + 1, backoff, None)  # type: ignore[arg-type]
            elif not advances and cadence is None:
                params["w_delay"] = self.retry_backoff[1]
        statement = self._prepared(f"finish-{failed}-{checked}", lambda: self._finish_statement(failed, checked))
        try:
            rows = self._one(statement, params)
        except _Recheck:
            return None
        if not rows:
            return None
        self._forget_start(run_id)
        return RunRecord.from_row(rows[0])

    def _expected_now(self, started: _Started) -> dt.datetime | None:
        """The database's time now, as told by the start's time on both clocks (exact when a test froze it)."""
        if self.frozen_now is not None:
            return self.frozen_now + self.clock_shift
        if started.frozen or started.run.start_time is None:
            return None
        elapsed = dt.timedelta(seconds=time.monotonic() - started.monotonic)
        return started.run.start_time + elapsed + (self.clock_shift - started.clock_shift)

    def _finish_statement(self, failed: bool, checked: bool) -> Executable:
        """See `_finish_in_one_statement`. Ends the run (CTE `ended`), then schedules its job (CTE `scheduled`,
        the same row order as `_complete_in_tx`: run, then job), wakes the beats when the job is due within
        their interval (NOTIFY, sent at commit), and returns the ended run."""
        r, j = run_table, job_table
        now = self._now()
        job_facts = [j.c[name].is_not_distinct_from(bindparam(f"f_{name}")) for name in _FINISH_FACTS]
        if failed:
            job_facts.append(j.c.failure_count == bindparam("f_failure_count"))
        facts_hold = and_(*job_facts)
        in_window = and_(
            bindparam("w_lower", type_=UTCDateTime()) <= now, now < bindparam("w_upper", type_=UTCDateTime())
        )
        conditions = [r.c.id == bindparam("run_id"), _status_is(ACTIVE_STATES if failed else (RUNNING,)), in_window]
        if checked:
            conditions.append(exists().where(j.c.name == r.c.job_name, facts_hold))
        values: dict[str, Any] = {
            "status": FAILED if failed else COMPLETED,
            "end_time": now,
            "completed": func.coalesce(bindparam("p_completed", type_=Integer), r.c.completed),
            "total": func.coalesce(bindparam("p_total", type_=Integer), r.c.total),
        }
        if failed:
            values["error"] = bindparam("run_error", type_=Text)
        ended = update(r).where(*conditions).values(**values).returning(*r.c).cte("ended")

        slots = func.unnest(cast(bindparam("w_slots"), postgresql.ARRAY(UTCDateTime()))).column_valued("slot")
        next_slot = select(func.min(slots)).where(slots > now).scalar_subquery()
        after_delay = now + cast(bindparam("w_delay"), Interval())
        use_next = cast(bindparam("w_use_next"), Boolean())
        if failed:
            # now + min(backoff, next slot - now), and never later than a slot the claim moved the job to.
            when: Any = least(after_delay, next_slot, case((use_next, j.c.next_scheduled_run)))
        else:
            when = case((use_next, j.c.next_scheduled_run), else_=least(after_delay, next_slot))
        when = least(when, ended.c.requested_next_run)  # least() skips NULLs: a pull-in made meanwhile wins
        job_values: dict[str, Any] = {
            "next_scheduled_run": when,
            "failure_count": j.c.failure_count + 1 if failed else 0,
            "retry_slot": func.coalesce(j.c.retry_slot, ended.c.scheduled_for) if failed else None,
        }
        scheduled = update(j).where(j.c.name == ended.c.job_name)
        if checked:
            scheduled = scheduled.where(facts_hold)  # as the row is when locked (it may have changed since)
        scheduled_cte = scheduled.values(**job_values).returning(j.c.name, j.c.next_scheduled_run).cte("scheduled")
        # A job that changed under the statement (so not scheduled by it) stops the statement with _RECHECK:
        # the run's end is undone with it. Cast from a column's value, so the planner cannot fold it early.
        recheck = case(
            (scheduled_cte.c.name.is_(None), cast(func.coalesce(scheduled_cte.c.name, _RECHECK), Integer)),
            else_=literal(0),
        )
        wake = case(
            (
                scheduled_cte.c.next_scheduled_run < now + cast(bindparam("w_wake"), Interval()),
                func.pg_notify(WAKEUP_CHANNEL, scheduled_cte.c.name),
            )
        )
        return select(ended, recheck.label("_recheck"), wake.label("_wake")).select_from(
            ended.outerjoin(scheduled_cte, true())
        )

    def interrupt_run(self, run_id: int, reason: str = CANCELLED, detail: str = "") -> RunRecord:
        """End one active run `interrupted`; the worker running it sees that and cancels the job."""
        self._forget_start(run_id)
        with self._tx() as conn:
            run = self._end_run(
                conn, run_id, INTERRUPTED, ACTIVE_STATES, error=f"{reason}: {detail}" if detail else reason
            )
            if reason == STALLED:
                self._retry(conn, run)
        return run

    def interrupt_runs(
        self,
        threshold: dt.timedelta | None = None,
        server_id: str | None = None,
        *,
        reason: str | None = None,
    ) -> list[RunRecord]:
        """Mark runs `interrupted`.

        Without `server_id`: every active run whose `update_time` is older than its job's interrupt
        threshold (else `threshold`, else the repository's) - stalled, retried with backoff.
        With `server_id`: the runs that server left behind (running on it as a worker, or queued by it as a
        beat), older than `threshold` when given; they are due again at once (reason `restart` by default,
        or e.g. `shutdown`).
        """
        r, j = run_table, job_table
        if server_id is None:
            default = (threshold or self.interrupt_threshold).total_seconds()
            per_job = select(j.c.interrupt_threshold).where(j.c.name == r.c.job_name).scalar_subquery()
            condition = and_(
                r.c.status.in_(ACTIVE_STATES),
                # A tracked plain task reports no progress: its liveness is its worker's (interrupt_orphaned).
                or_(r.c.kind != KIND_TASK, r.c.status == QUEUED),
                r.c.update_time < self._now(-func.coalesce(per_job, default)),
            )
            reason = reason or STALLED
            error: Any = case(
                (r.c.status == QUEUED, f"{reason}: no worker started it within the interrupt threshold"),
                else_=f"{reason}: no progress within the interrupt threshold",
            )
        else:
            condition = or_(
                and_(r.c.status == RUNNING, r.c.worker == server_id),
                and_(r.c.status == QUEUED, r.c.claimed_by == server_id),
            )
            if threshold:
                condition = and_(condition, r.c.update_time < self._now(-threshold.total_seconds()))
            reason = reason or RESTART
            error = f"{reason}: " + (f"{server_id} shut down" if reason == SHUTDOWN else f"left behind by {server_id}")
        with self._tx() as conn:
            rows = conn.execute(
                update(r).where(condition).values(status=INTERRUPTED, end_time=self._now(), error=error).returning(*r.c)
            ).all()
            runs = [RunRecord.from_row(row) for row in rows]
            if reason == STALLED:
                for run in runs:
                    self._retry(conn, run)
            elif runs:
                # Due again at once. Other jobs still are (their next run moves when a run ends); a job whose
                # schedule moved on when the run was claimed (plain tasks, max_active > 1) is brought back, so
                # the slot a dead beat claimed but never sent is not lost (design §4).
                j = job_table
                conn.execute(
                    update(j)
                    .where(
                        j.c.name.in_(self._values_of({run.job_name for run in runs}, j.c.name)),
                        or_(j.c.kind == KIND_TASK, j.c.max_active > 1),
                    )
                    .values(next_scheduled_run=least(j.c.next_scheduled_run, self._now()))
                )
        return runs

    def expire_runs(self) -> list[RunRecord]:
        """End `interrupted` (expired) the queued runs whose job sets `expires` and whose slot + expires has
        passed: better not at all than late."""
        r, j = run_table, job_table
        expires = select(j.c.expires).where(j.c.name == r.c.job_name).scalar_subquery()
        with self._tx() as conn:
            rows = conn.execute(
                update(r)
                .where(
                    r.c.status == QUEUED,
                    expires.is_not(None),
                    r.c.create_time < self._now(-expires),
                )
                .values(
                    status=INTERRUPTED, end_time=self._now(), error=f"{EXPIRED}: not started before its slot + expires"
                )
                .returning(*r.c)
            ).all()
            runs = [RunRecord.from_row(row) for row in rows]
            for run in runs:
                self._skip_slot(conn, run)
        return runs

    def _skip_slot(self, conn: Connection, run: RunRecord) -> None:
        """The run of this slot will not happen (expired, cancelled): a job rescheduled when its run ends (not at
        claim) moves to its next slot; left due at that slot it would be claimed again at once for it."""
        job = self._job(conn, run.job_name)
        if job is None or job.advances_at_claim:
            return
        now = self._db_now(conn)
        when = job.next_slot(now, run.scheduled_for or now) or now
        if run.requested_next_run is not None:
            when = min(when, run.requested_next_run)
        conn.execute(update(job_table).where(job_table.c.name == job.name).values(next_scheduled_run=when))

    def dispatch_run(self, run_id: int, task_id: str | None = None) -> RunRecord:
        """`queued -> dispatched`: a plain task was sent; its outcome is unknown unless a worker with the
        tracking signals reports it (final; never blocks the job's next slot). A tracking worker may have
        started (or even finished) the task before the beat gets here: then the run is left as it is."""
        r = run_table
        values: dict[str, Any] = {"status": DISPATCHED, "end_time": self._now()}
        if task_id is not None:
            values["task_id"] = task_id
        j = job_table
        with self._tx() as conn:
            row = conn.execute(
                update(r).where(r.c.id == run_id, r.c.status == QUEUED).values(**values).returning(*r.c)
            ).first()
            if row is None:
                row = conn.execute(select(r).where(r.c.id == run_id)).first()
                if row is None or row.kind != KIND_TASK or row.status not in (RUNNING, COMPLETED, FAILED):
                    self._run_or_raise(conn, run_id, QUEUED)
            assert row is not None
            # Sent: whatever failed to publish before is behind it.
            conn.execute(update(j).where(j.c.name == row.job_name).values(failure_count=0, retry_slot=None))
        return RunRecord.from_row(row)

    def dispatch_runs(self, sent: Sequence[tuple[int, str | None]]) -> None:
        """`queued -> dispatched` for a whole published batch of plain tasks, (run id, task id) pairs, in one
        statement (the pairs are one parameter); runs a tracking worker already moved on are left as they are.
        Their jobs' failure counts are reset: whatever failed to publish before is behind them."""
        if not sent:
            return
        r, j = run_table, job_table
        ids = [run_id for run_id, _ in sent]
        if self._is_postgres:
            pairs = (
                func.unnest(
                    literal(ids, postgresql.ARRAY(BigInteger)),
                    literal([task_id for _, task_id in sent], postgresql.ARRAY(String)),
                )
                .table_valued("id", "task_id")
                .render_derived(name="pairs")
            )
            task_id: Any = pairs.c.task_id
            match: Any = r.c.id == pairs.c.id
        else:
            pairs = func.json_each(literal(json.dumps(sent), String)).table_valued("value")
            task_id = func.json_extract(pairs.c.value, "$[1]")
            match = r.c.id == func.json_extract(pairs.c.value, "$[0]")
        mark = (
            update(r)
            .where(match, r.c.status == QUEUED)
            .values(status=DISPATCHED, end_time=self._now(), task_id=func.coalesce(task_id, r.c.task_id))
        )
        reset = (
            update(j)
            .where(
                j.c.name.in_(select(r.c.job_name).where(self._in_ids(r.c.id, ids))),
                or_(j.c.failure_count != 0, j.c.retry_slot.is_not(None)),
            )
            .values(failure_count=0, retry_slot=None)
        )
        with self._tx() as conn:
            if self._is_postgres:  # one statement: the mark as a data-modifying CTE of the reset
                conn.execute(reset.add_cte(mark.cte("marked")))
            else:
                conn.execute(mark)
                conn.execute(reset)

    # -- plain tasks tracked on workers ---------------------------------------------------------------

    def track_start(self, run_id: int, worker: str, task_id: str | None) -> RunRecord:
        """A worker with the tracking signals started a dispatched plain task: `dispatched -> running` (or
        `queued -> running` when the message beat the beat's own `dispatched` mark to the worker).
        It takes no slot (slot = -id), so it never blocks the entry's next slot, as under stock beat."""
        r = run_table

        def build() -> Executable:
            now = self._now()
            return (
                update(r)
                .where(r.c.id == bindparam("run_id"), _status_is((QUEUED, DISPATCHED)), r.c.kind == KIND_TASK)
                .values(
                    status=RUNNING,
                    worker=bindparam("run_worker"),
                    task_id=bindparam("run_task_id"),
                    start_time=now,
                    update_time=now,
                    end_time=None,
                    slot=-r.c.id,
                )
                .returning(*r.c)
            )

        rows = self._one(
            self._prepared("track-start", build), {"run_id": run_id, "run_worker": worker, "run_task_id": task_id}
        )
        if not rows:
            self._raise_why_not(run_id, DISPATCHED)
        return RunRecord.from_row(rows[0])

    def track_end(self, run_id: int, error: str | None = None) -> RunRecord:
        """The tracked plain task ended: `running -> completed`, or `failed` with its error."""
        r = run_table

        def build(status: str) -> Callable[[], Executable]:
            def statement() -> Executable:
                values: dict[str, Any] = {"status": status, "end_time": self._now()}
                if status == FAILED:
                    values["error"] = bindparam("run_error", type_=Text)
                return (
                    update(r)
                    .where(r.c.id == bindparam("run_id"), r.c.status == RUNNING)
                    .values(**values)
                    .returning(*r.c)
                )

            return statement

        if error is None:
            rows = self._one(self._prepared("track-completed", build(COMPLETED)), {"run_id": run_id})
        else:
            rows = self._one(
                self._prepared("track-failed", build(FAILED)), {"run_id": run_id, "run_error": _error_text(error)}
            )
        if not rows:
            self._raise_why_not(run_id, RUNNING)
        return RunRecord.from_row(rows[0])

    def _raise_why_not(self, run_id: int, wanted: str) -> None:
        """After a one-statement transition matched nothing (and so changed nothing): say why."""
        with self._tx() as conn:
            self._run_or_raise(conn, run_id, wanted)

    def heartbeat(self, server_id: str, kind: str, hostname: str, pid: int) -> None:
        """Record that a worker (or beat) is alive now."""
        s = server_table

        def build() -> Executable:
            now = self._now()
            stmt = self._insert(s).values(
                id=bindparam("s_id"),
                kind=bindparam("s_kind"),
                hostname=bindparam("s_hostname"),
                pid=bindparam("s_pid"),
                start_time=now,
                last_seen=now,
            )
            upsert: Executable = stmt.on_conflict_do_update(
                index_elements=[s.c.id], set_={"last_seen": stmt.excluded.last_seen, "pid": stmt.excluded.pid}
            )
            return upsert

        self._one(
            self._prepared("heartbeat", build),
            {"s_id": server_id, "s_kind": kind, "s_hostname": hostname, "s_pid": pid},
        )

    def interrupt_orphaned(self, threshold: dt.timedelta | None = None) -> list[RunRecord]:
        """Tracked plain tasks whose worker has not been seen for the threshold end `interrupted`."""
        r, s = run_table, server_table
        limit = (threshold or self.interrupt_threshold).total_seconds()
        alive = exists().where(s.c.id == r.c.worker, s.c.last_seen >= self._now(-limit))
        with self._tx() as conn:
            rows = conn.execute(
                update(r)
                .where(r.c.kind == KIND_TASK, r.c.status == RUNNING, ~alive, r.c.start_time < self._now(-limit))
                .values(status=INTERRUPTED, end_time=self._now(), error=f"{STALLED}: its worker stopped answering")
                .returning(*r.c)
            ).all()
        return [RunRecord.from_row(row) for row in rows]

    # -- operator controls ----------------------------------------------------------------------------

    def set_paused(self, name: str, paused: bool) -> JobRecord:
        """Pause (never claimed) or resume a job. Resuming moves a job whose slot passed while it was paused
        to its next slot after now: it does not fire at once for the time it was off."""
        j = job_table
        with self._tx() as conn:
            job = self._job(conn, name)
            if job is None:
                raise JobNotFound(name)
            values: dict[str, Any] = {"paused": paused}
            now = self._db_now(conn)
            if not paused and job.paused and job.next_scheduled_run < now:
                slot = job.next_slot(now, job.next_scheduled_run)  # on its cadence, not now + interval
                if slot is not None:
                    values["next_scheduled_run"] = slot
            row = conn.execute(update(j).where(j.c.name == name).values(**values).returning(*j.c)).one()
        return JobRecord.from_row(row)

    def cancel_active_runs(self, name: str) -> list[RunRecord]:
        """Interrupt (cancelled) the job's queued and running runs; the worker cancels the job's context."""
        r = run_table
        with self._tx() as conn:
            if self._job(conn, name) is None:
                raise JobNotFound(name)
            rows = conn.execute(
                update(r)
                .where(r.c.job_name == name, r.c.status.in_(ACTIVE_STATES))
                .values(status=INTERRUPTED, end_time=self._now(), error=f"{CANCELLED}: by an operator")
                .returning(*r.c)
            ).all()
            runs = [RunRecord.from_row(row) for row in rows]
            for run in runs:
                self._skip_slot(conn, run)  # cancelled means not now: not claimed again at once
        return runs

    def disable_jobs_not_in(self, kind: str, names: Sequence[str]) -> list[str]:
        """Disable the jobs of `kind` that are not in `names` (entries removed from beat_schedule); their
        history stays. One statement and one bound parameter however many names."""
        j = job_table
        with self._tx() as conn:
            rows = conn.execute(
                update(j)
                .where(j.c.kind == kind, j.c.enabled, j.c.name.not_in(self._values_of(names, j.c.name)))
                .values(enabled=False, update_time=self._now())
                .returning(j.c.name)
            ).all()
        return sorted(row[0] for row in rows)

    # -- history ----------------------------------------------------------------------------------------

    def lookup_run(self, run_id: int) -> RunRecord:
        with self._tx() as conn:
            row = conn.execute(select(run_table).where(run_table.c.id == run_id)).first()
        if row is None:
            raise RunNotFound(run_id)
        return RunRecord.from_row(row)

    def list_runs(self, job_name: str | None = None, status: str | None = None, limit: int = 100) -> list[RunRecord]:
        """Newest first."""
        if status is not None and status not in RUN_STATES:
            raise ValueError(f"unknown run status {status!r}; one of {', '.join(RUN_STATES)}")
        query = select(run_table).order_by(run_table.c.id.desc()).limit(limit)
        if job_name is not None:
            query = query.where(run_table.c.job_name == job_name)
        if status is not None:
            query = query.where(run_table.c.status == status)
        with self._tx() as conn:
            rows = conn.execute(query).all()
        return [RunRecord.from_row(row) for row in rows]

    def prune_runs(self, retention: dt.timedelta, *, batch: int = PRUNE_BATCH, max_rows: int | None = None) -> int:
        """Delete final runs that ended more than `retention` ago, oldest first, in transactions of at most
        `batch` rows (a short lock and a bounded WAL burst each, so that claims and vacuum go on meanwhile),
        until none is left or `max_rows` were deleted; returns how many were deleted. Active runs have no end
        time and are never touched. Each batch is picked through the `end_time` index (`dbsched_job_run_end`);
        on PostgreSQL rows another pruning beat holds are skipped, not waited for."""
        if batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")
        r = run_table
        total = 0
        while max_rows is None or total < max_rows:
            size = batch if max_rows is None else min(batch, max_rows - total)
            cutoff = self._now(-retention.total_seconds())
            oldest = (
                select(r.c.id)
                .where(r.c.end_time < cutoff, r.c.status.in_(FINAL_STATES))
                .order_by(r.c.end_time)
                .limit(size)
            )
            if self._is_postgres:
                oldest = oldest.with_for_update(skip_locked=True)
            with self._tx() as conn:
                deleted = int(conn.execute(delete(r).where(r.c.id.in_(oldest.scalar_subquery()))).rowcount or 0)
            total += deleted
            if deleted < size:
                break
        return total

    def database_now(self) -> dt.datetime:
        with self._tx() as conn:
            value = conn.execute(select(self._now())).scalar_one()
        assert isinstance(value, dt.datetime)
        return value

    def ping(self) -> None:
        with self._tx() as conn:
            conn.execute(text("SELECT 1"))


_repositories: dict[tuple[int, int], JobRepository] = {}
_repositories_lock = threading.Lock()


def repository_for(app: Any, settings: Any = None) -> JobRepository:
    """The process's repository for a Celery app (engines are never shared across a fork)."""
    from .settings import Settings

    key = (id(app), os.getpid())
    with _repositories_lock:
        repository = _repositories.get(key)
        if repository is None:
            resolved = settings if settings is not None else Settings.from_mapping(app.conf)
            repository = JobRepository(
                resolved.database_url,
                engine_options=resolved.engine_options,
                interrupt_threshold=resolved.interrupt_threshold,
                retry_backoff=resolved.retry_backoff,
            )
            if resolved.listen:
                repository.wake_within = resolved.run_jobs_interval.total_seconds()
            _repositories[key] = repository
        return repository


def _after_fork_in_child() -> None:
    # The parent's pooled connections belong to the parent: drop them without closing their sockets.
    with _repositories_lock:
        inherited = [key for key in _repositories if key[1] != os.getpid()]
        for key in inherited:
            _repositories.pop(key).engine.dispose(close=False)


os.register_at_fork(after_in_child=_after_fork_in_child)


def bind_repository(app: Any, repository: JobRepository | None) -> JobRepository | None:
    """Make `repository` the app's in this process (None unbinds); returns the one it replaces."""
    key = (id(app), os.getpid())
    with _repositories_lock:
        previous = _repositories.pop(key, None)
        if repository is not None:
            _repositories[key] = repository
    return previous


def forget_repository(app: Any) -> None:
    with _repositories_lock:
        repository = _repositories.pop((id(app), os.getpid()), None)
    if repository is not None:
        repository.close()
