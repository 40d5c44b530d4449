"""`JobRepository`: every SQL statement of celery_dbsched, one method per state transition.

Times are computed by the database (`db_now`), never by this host. Each method is one short transaction.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    Float,
    Row,
    String,
    and_,
    case,
    create_engine,
    delete,
    event,
    exists,
    func,
    literal,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.pool import NullPool
from sqlalchemy.sql.elements import ColumnElement

from .errors import (
    DatabaseError,
    DatabaseUnavailable,
    InvalidRunState,
    JobNotFound,
    RunNotFound,
    SchemaMismatch,
)
from .job import JobStatus, validate_description, validate_name, validate_queue
from .schema import (
    ACTIVE_STATES,
    COMPLETED,
    DISPATCHED,
    FAILED,
    FINAL_STATES,
    INTERRUPTED,
    QUEUED,
    RUN_STATES,
    RUNNING,
    db_now,
    job_table,
    least,
    run_table,
)
from .settings import DEFAULT_INTERRUPT_THRESHOLD, DEFAULT_RETRY_BACKOFF, backoff_delay

ERROR_TEXT_LIMIT = 10_000
WAKEUP_CHANNEL = "dbsched_wakeup"

# Why a run was interrupted: the prefix of its `error` text.
STALLED = "stalled"
SHUTDOWN = "shutdown"
RESTART = "restart"
CANCELLED = "cancelled"


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

    @classmethod
    def from_row(cls, row: Row[Any]) -> JobRecord:
        m = row._mapping
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
        )


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

    @classmethod
    def from_row(cls, row: Row[Any]) -> RunRecord:
        return cls(**{name: row._mapping[name] for name in cls.__dataclass_fields__})

    @property
    def progress(self) -> JobStatus:
        return JobStatus(self.completed, self.total)


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy's "begin" hook own transactions, then make several local processes safe to share
    # one file: WAL lets readers run beside the writer, the busy timeout makes writers queue, not fail.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_on_begin(connection: Connection) -> None:
    # Take the write lock up front: a deferred transaction that reads then writes fails at once with
    # "database is locked" when another writer got in between, whatever the busy timeout.
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str, engine_options: Mapping[str, Any] | None = None) -> Engine:
    """An engine for PostgreSQL (psycopg 3) or SQLite (WAL, busy timeout, immediate transactions)."""
    parsed = make_url(url)
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
        # Added to the database clock: lets tests move time forward without sleeping. Never set in production.
        self.clock_shift = dt.timedelta(0)
        self._is_postgres = self.engine.dialect.name == "postgresql"

    def __repr__(self) -> str:
        return f"<JobRepository {self.engine.url.render_as_string(hide_password=True)}>"

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def close(self) -> None:
        if self._owns_engine:
            self.engine.dispose()

    # -- plumbing -------------------------------------------------------------------------------------

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        try:
            with self.engine.begin() as conn:
                yield conn
        except (OperationalError, InterfaceError) as exc:
            if _is_missing_table(exc):
                raise SchemaMismatch(
                    "the celery_dbsched tables are missing: run `celery -A proj dbsched migrate`"
                ) from exc
            raise DatabaseUnavailable(f"database unavailable: {exc.orig}") from exc
        except DBAPIError as exc:
            if _is_missing_table(exc):
                raise SchemaMismatch(
                    "the celery_dbsched tables are missing: run `celery -A proj dbsched migrate`"
                ) from exc
            if exc.connection_invalidated:
                raise DatabaseUnavailable(f"database unavailable: {exc.orig}") from exc
            raise DatabaseError(f"database error: {exc.orig}") from exc

    def _now(self, offset: float | ColumnElement[Any] | None = None) -> db_now:
        shift = self.clock_shift.total_seconds()
        if offset is None:
            return db_now(literal(shift, Float)) if shift else db_now()
        if isinstance(offset, (int, float)):
            return db_now(literal(float(offset) + shift, Float))
        return db_now(offset + shift) if shift else db_now(offset)

    def _insert(self, table: Any) -> Any:
        return (postgresql.insert if self._is_postgres else sqlite.insert)(table)

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
    ) -> JobRecord:
        """Insert a job due in `next_run_in` (now when None), or update an existing one's description and
        settings without touching its next scheduled run (DESIGN 8)."""
        validate_name(name)
        validate_description(name, description)
        validate_queue(name, queue)
        first = (next_run_in or dt.timedelta(0)).total_seconds()
        if first < 0:
            raise ValueError(f"job {name!r}: next_run_in must not be negative")
        j = job_table
        stmt = self._insert(j).values(
            name=name,
            description=description,
            next_scheduled_run=self._now(first) if first else self._now(),
            default_next_run_in=_seconds(default_next_run_in),
            queue=queue,
            interrupt_threshold=_seconds(interrupt_threshold),
            create_time=self._now(),
            update_time=self._now(),
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=[j.c.name],
            set_={
                "description": stmt.excluded.description,
                "default_next_run_in": stmt.excluded.default_next_run_in,
                "queue": stmt.excluded.queue,
                "interrupt_threshold": stmt.excluded.interrupt_threshold,
                "update_time": stmt.excluded.update_time,
            },
        ).returning(*j.c)
        with self._tx() as conn:
            return JobRecord.from_row(conn.execute(stmt).one())

    def lookup_job(self, name: str) -> JobRecord:
        with self._tx() as conn:
            row = conn.execute(select(job_table).where(job_table.c.name == name)).first()
        if row is None:
            raise JobNotFound(name)
        return JobRecord.from_row(row)

    def list_jobs(self) -> list[JobRecord]:
        with self._tx() as conn:
            rows = conn.execute(select(job_table).order_by(job_table.c.name)).all()
        return [JobRecord.from_row(row) for row in rows]

    def update_job_next_run_in_at_least(self, name: str, delta: dt.timedelta, *, run_now: bool = False) -> JobRecord:
        """`next_scheduled_run = least(now + delta, next_scheduled_run)`: only ever earlier. When the job has
        an active run the request is kept on that run and honoured when it ends (DESIGN 6)."""
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
        """Seconds until the earliest enabled job without an active run is due (<= 0: due now); None when
        there is none. One indexed query: this is what an idle beat tick costs."""
        j, r = job_table, run_table
        active = exists().where(r.c.job_name == j.c.name, r.c.status.in_(ACTIVE_STATES))
        stmt = (
            select(j.c.next_scheduled_run, self._now().label("now"))
            .where(j.c.enabled, ~active)
            .order_by(j.c.next_scheduled_run)
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
        """Claim up to `limit` due jobs in one statement: a `queued` run for each, earliest due first, then by
        name. Jobs with an active run are skipped; the unique partial index plus ON CONFLICT DO NOTHING makes
        concurrent claims by several beats safe (DESIGN 2)."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        j, r = job_table, run_table
        now = self._now()
        active = exists().where(r.c.job_name == j.c.name, r.c.status.in_(ACTIVE_STATES))
        due = (
            select(
                j.c.name,
                literal(QUEUED, String),
                j.c.queue,
                literal(server_id, String),
                now,
                now,
            )
            .where(j.c.enabled, j.c.next_scheduled_run <= now, ~active)
            .order_by(j.c.next_scheduled_run, j.c.name)
            .limit(limit)
        )
        stmt = (
            self._insert(r)
            .from_select(["job_name", "status", "queue", "claimed_by", "create_time", "update_time"], due)
            .on_conflict_do_nothing()
            .returning(*r.c)
        )
        with self._tx() as conn:
            rows = conn.execute(stmt).all()
        return sorted((RunRecord.from_row(row) for row in rows), key=lambda run: run.id)

    # -- runs: transitions ----------------------------------------------------------------------------

    def start_run(self, run_id: int, worker: str, task_id: str | None = None) -> RunRecord:
        """`queued -> running`, or InvalidRunState: the one gate that makes a run start at most once."""
        r = run_table
        now = self._now()
        with self._tx() as conn:
            row = conn.execute(
                update(r)
                .where(r.c.id == run_id, r.c.status == QUEUED)
                .values(status=RUNNING, worker=worker, task_id=task_id, start_time=now, update_time=now)
                .returning(*r.c)
            ).first()
            if row is None:
                self._run_or_raise(conn, run_id, QUEUED)
        assert row is not None
        return RunRecord.from_row(row)

    def update_progress(self, run_id: int, completed: int, total: int) -> RunRecord:
        """Store a running run's progress; `update_time` moves only when the values change (DESIGN 5)."""
        JobStatus(completed, total)
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
        with self._tx() as conn:
            status = conn.execute(select(run_table.c.status).where(run_table.c.id == run_id)).scalar()
        if status is None:
            raise RunNotFound(run_id)
        return str(status)

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
            # PostgreSQL text cannot hold NUL, and an exception message may: the run must still end.
            values["error"] = error.replace("\x00", "\\x00")[:ERROR_TEXT_LIMIT]
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

    def _schedule_next(self, conn: Connection, run: RunRecord, delay: dt.timedelta, *, failed: bool) -> None:
        j = job_table
        when: ColumnElement[Any] = self._now(delay.total_seconds())
        if run.requested_next_run is not None:
            when = least(when, literal(run.requested_next_run, j.c.next_scheduled_run.type))
        conn.execute(
            update(j)
            .where(j.c.name == run.job_name)
            .values(
                next_scheduled_run=when,
                failure_count=j.c.failure_count + 1 if failed else 0,
            )
        )

    def complete_run(self, run_id: int, next_run_in: dt.timedelta, *, progress: JobStatus | None = None) -> RunRecord:
        """`running -> completed`; the job is next due at now + next_run_in (or a pull-in made meanwhile)."""
        if next_run_in < dt.timedelta(0):
            raise ValueError(f"next_run_in must not be negative, got {next_run_in}")
        with self._tx() as conn:
            run = self._end_run(conn, run_id, COMPLETED, (RUNNING,), progress=progress)
            self._schedule_next(conn, run, next_run_in, failed=False)
        return run

    def _retry_delay(self, conn: Connection, job_name: str) -> dt.timedelta:
        j = job_table
        query = select(j.c.failure_count, j.c.default_next_run_in).where(j.c.name == job_name)
        if self._is_postgres:
            query = query.with_for_update()
        row = conn.execute(query).first()
        if row is None:
            return dt.timedelta(0)
        return backoff_delay(row.failure_count + 1, self.retry_backoff, _delta(row.default_next_run_in))

    def fail_run(self, run_id: int, error: str, *, progress: JobStatus | None = None) -> RunRecord:
        """`queued|running -> failed` with the error text; the job is retried after the backoff (DESIGN 7)."""
        with self._tx() as conn:
            run = self._end_run(conn, run_id, FAILED, ACTIVE_STATES, error=error or "failed", progress=progress)
            self._schedule_next(conn, run, self._retry_delay(conn, run.job_name), failed=True)
        return run

    def interrupt_run(self, run_id: int, reason: str = CANCELLED, detail: str = "") -> RunRecord:
        """End one active run `interrupted`; the worker running it sees that and cancels the job."""
        with self._tx() as conn:
            run = self._end_run(
                conn, run_id, INTERRUPTED, ACTIVE_STATES, error=f"{reason}: {detail}" if detail else reason
            )
            if reason == STALLED:
                self._schedule_next(conn, run, self._retry_delay(conn, run.job_name), failed=True)
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
                    self._schedule_next(conn, run, self._retry_delay(conn, run.job_name), failed=True)
        return runs

    def dispatch_run(self, run_id: int) -> RunRecord:
        """`queued -> dispatched`: sent to a worker that will not report back (final)."""
        with self._tx() as conn:
            return self._end_run(conn, run_id, DISPATCHED, (QUEUED,))

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

    def prune_runs(self, retention: dt.timedelta) -> int:
        """Delete final runs that ended more than `retention` ago."""
        r = run_table
        with self._tx() as conn:
            result = conn.execute(
                delete(r).where(r.c.status.in_(FINAL_STATES), r.c.end_time < self._now(-retention.total_seconds()))
            )
        return int(result.rowcount or 0)

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
