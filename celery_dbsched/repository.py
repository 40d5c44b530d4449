"""`JobRepository`: the transactions of celery_dbsched, one method per state transition.

Each method is one short transaction: it runs statements built in `statements`, applies the rules of
`timing`, and returns records (`records`). Times are computed by the database, from the expressions of the
repository's `clock` (`clock`), never by this host.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar, cast

from sqlalchemy import Connection, Engine, Result, Row, Update, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.base import Executable

from . import statements as sql
from . import timing
from .clock import Clock, DatabaseClock
from .engine import DEFAULT_CLIENT_TIMEOUT, KeptConnections, is_mysql, make_engine
from .errors import (
    DbschedError,
    InvalidRunState,
    JobNotFound,
    NameTaken,
    RunNotFound,
    classify,
    is_client_timeout,
    is_deadlock,
)
from .job import JobDefinition, JobStatus
from .policy import POLICY_NAMES, JobPolicy, delta_of
from .records import (
    Claim,
    ClaimStats,
    JobRecord,
    JobSync,
    PutResult,
    RunRecord,
    RunsPage,
    RunSummary,
    RuntimeEntry,
    StartedRun,
    WatchFrame,
    WatchRun,
    changes,
    definition_of,
    definition_values,
    edited_values,
    owned_by_runtime,
    plan_sync,
    reverted_values,
    runtime_changes,
    synced_values,
)
from .schema import job_table, run_table
from .settings import DEFAULT_INTERRUPT_THRESHOLD, DEFAULT_RETRY_BACKOFF, Settings, mask_database_url
from .states import ACTIVE, InterruptReason, JobKind, Origin, RunState

# Rows per statement when a sync writes many: with ~25 columns a row, far below PostgreSQL's 65,535 and
# SQLite's 32,766 bound parameters per statement.
SYNC_CHUNK = 500
SYNC_JSON_CHUNK = 5_000  # rows per statement when they travel as one JSON parameter (PostgreSQL)
# Runs one pruning transaction deletes at most (JobRepository.prune_runs).
PRUNE_BATCH = 5_000
try:  # what each server row records as the version it runs
    PACKAGE_VERSION = importlib.metadata.version("celery-dbsched")
except importlib.metadata.PackageNotFoundError:  # imported from a checkout without installing it
    PACKAGE_VERSION = "unknown"
SERVER_LIMIT = 1_000  # server rows read at most (dead ones are pruned after dbsched_server_retention)
# Run ids a filtered page of history scans at most (JobRepository.runs_page): no index serves a worker or time
# filter, so a page is bounded by the ids it looks at rather than by the runs it finds (a job or a status alone
# is served by its index, dbsched_job_run_job or dbsched_job_run_status: no window).
RUNS_SCAN_WINDOW = 100_000
_log = logging.getLogger(__name__)
_T = TypeVar("_T")
_STARTED_KEPT = 10_000  # runs started and not finished yet by this repository, remembered for their finish


class _Recheck(Exception):
    """The one-statement finish did nothing because a fact it was computed from no longer holds."""


class _MySQLConnection:
    """A connection in a transaction on MySQL/MariaDB, which have no UPDATE ... RETURNING (MariaDB has INSERT
    and DELETE ... RETURNING): an UPDATE that returns rows runs as a plain read of the matching rows' keys, a
    locking read of those rows by key that checks the WHERE clause again, the update of the rows it kept, and a
    read of them as updated; in the transaction, so what is returned is what was written.

    The first read takes no lock: a locking read that scanned an index (the monitor's, over every running run)
    waited on each row it met, finishes included, while those finishes waited on the index entries it held: a
    deadlock under load. By key, it locks only the rows it updates, in key order. The update itself reads no
    other table (an update of the runs never reads the job table that the runs' triggers write: MySQL error
    1442). An update of runs locks their jobs first (the order the claim takes them in)."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    def execute(self, statement: Any, parameters: Any = None, **kw: Any) -> Result[Any]:
        if not (isinstance(statement, Update) and statement._returning):
            return self._conn.execute(statement, parameters, **kw)
        table: Any = statement.table
        (key,) = table.primary_key.columns
        where: Any = statement.whereclause
        keys = list(self._conn.execute(select(key).where(where).order_by(key), parameters).scalars())
        if keys and table is run_table:
            # The jobs first, in name order, as the claim locks them: the runs' trigger would lock them after
            # the runs, and a claim holding a job while it waits on a run of the unique index would deadlock.
            jobs = select(job_table.c.name).where(
                job_table.c.name.in_(select(run_table.c.job_name).where(run_table.c.id.in_(keys)))
            )
            self._conn.execute(jobs.order_by(job_table.c.name).with_for_update())
        if keys:
            found = select(key).where(key.in_(keys), where).order_by(key).with_for_update()
            keys = list(self._conn.execute(found, parameters).scalars())
        if keys:
            write = statement._clone()
            write._where_criteria = (key.in_(keys),)
            write._returning = ()
            self._conn.execute(write, parameters)
        return self._conn.execute(select(*statement._returning).where(key.in_(keys)).order_by(key))


class JobRepository:
    """The job store. `url_or_engine` is a SQLAlchemy URL string or an `Engine` it does not own."""

    def __init__(
        self,
        url_or_engine: str | Engine,
        *,
        clock: Clock | None = None,
        engine_options: Mapping[str, Any] | None = None,
        interrupt_threshold: dt.timedelta = DEFAULT_INTERRUPT_THRESHOLD,
        retry_backoff: tuple[dt.timedelta, dt.timedelta] = DEFAULT_RETRY_BACKOFF,
        wake_within: dt.timedelta | None = None,
        client_timeout: float | None = DEFAULT_CLIENT_TIMEOUT,
        pooler: str | None = None,
    ) -> None:
        """`clock`: what times are computed with (`DatabaseClock` by default; tests give a `TestClock`).
        `wake_within` (PostgreSQL): a job whose next run is set within this of now wakes the sleeping beats
        (NOTIFY); beats sleep at most their run-jobs interval anyway, so later ones need no wake-up.
        `client_timeout`: seconds a statement waits for the server (None: no end; `make_engine`: PostgreSQL
        and PyMySQL).
        `pooler` (PostgreSQL): "transaction" through a transaction-mode pooler (dbsched_pooler; `make_engine`)."""
        if isinstance(url_or_engine, Engine):
            self.engine = url_or_engine
            self._owns_engine = False
        else:
            self.engine = make_engine(url_or_engine, engine_options, client_timeout=client_timeout, pooler=pooler)
            self._owns_engine = True
        self.clock = clock if clock is not None else DatabaseClock()
        self.interrupt_threshold = interrupt_threshold
        self.retry_backoff = retry_backoff
        self.wake_within = wake_within
        self._is_postgres = self.engine.dialect.name == "postgresql"
        self._is_mysql = is_mysql(self.engine.dialect.name)
        # The worker side (start, progress, finish, tracking): one statement each, built once.
        self._kept = KeptConnections(self.engine) if self._is_postgres else None
        self._statements: dict[tuple[Any, ...], Executable] = {}
        self._started: dict[int, StartedRun] = {}
        self._started_lock = threading.Lock()

    @classmethod
    def from_settings(
        cls, settings: Settings, *, clock: Clock | None = None, engine: Engine | None = None
    ) -> JobRepository:
        """The repository the settings describe (on `engine` when given, which it then does not own): the one
        constructor path of the beat, the worker, `TestScheduler` and the tests. With `listen`, jobs due within
        the run-jobs interval wake the beats."""
        return cls(
            engine if engine is not None else settings.database_url,
            clock=clock,
            engine_options=settings.engine_options,
            interrupt_threshold=settings.interrupt_threshold,
            retry_backoff=settings.retry_backoff,
            wake_within=settings.run_jobs_interval if settings.listen else None,
            client_timeout=settings.client_timeout_seconds(),
            pooler=settings.pooler,
        )

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

    def _again_on_deadlock(self, what: str, attempt: Callable[[], _T]) -> _T:
        """`attempt` (one transaction), made once more when the database broke a deadlock by rolling it back
        (MySQL/MariaDB 1213, PostgreSQL 40P01): nothing of it happened, so a second try is safe, and it is
        logged once (a WARNING) rather than taken for an outage. A second deadlock is raised as one
        (`DatabaseUnavailable`: the caller's outage handling retries it later)."""
        try:
            return attempt()
        except DbschedError as exc:
            if not is_deadlock(exc.__cause__):
                raise
            _log.warning("celery_dbsched: %s hit a deadlock, trying again: %s", what, exc)
        return attempt()

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        """One transaction. A database error comes out typed: SchemaMismatch (run the migration),
        DatabaseUnavailable (an outage: worth waiting for) or DatabaseError (the statement itself was refused
        and will be on every retry: a bug or a schema problem, not an outage)."""
        try:
            with self.engine.begin() as conn:
                yield cast(Connection, _MySQLConnection(conn)) if self._is_mysql else conn
        except DBAPIError as exc:
            raise classify(exc) from exc

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
                if attempt == 1 and reused and exc.connection_invalidated and not is_client_timeout(exc.orig):
                    # Dropped while kept: the statement did not run; once more on a pinged connection. Not after
                    # the watchdog cut it (the server may have run it): the caller decides whether to retry.
                    continue
                if sql.RECHECK in str(exc.orig):
                    raise _Recheck() from exc
                raise classify(exc) from exc
            self._kept.give_back(conn)
            return rows
        raise AssertionError("unreachable")

    def _prepared(self, name: str, build: Callable[[], Any]) -> Any:
        """The statement `name`, built once (per state of a test clock: the clock's expressions embed it)."""
        key = (name, self.clock.key)
        statement = self._statements.get(key)
        if statement is None:
            statement = self._statements[key] = build()
        return statement

    def _db_now(self, conn: Connection) -> dt.datetime:
        value = conn.execute(sql.database_now(self.clock.now)).scalar_one()
        assert isinstance(value, dt.datetime)
        return value

    def _run_or_raise(self, conn: Connection, run_id: int, wanted: str) -> RunRecord:
        """After a conditional transition matched nothing: say why, as a typed error."""
        row = conn.execute(sql.run(run_id)).first()
        if row is None:
            raise RunNotFound(run_id)
        raise InvalidRunState(run_id, row.status, wanted)

    def _raise_why_not(self, run_id: int, wanted: str) -> None:
        """After a one-statement transition matched nothing (and so changed nothing): say why."""
        with self._tx() as conn:
            self._run_or_raise(conn, run_id, wanted)

    def _job(self, conn: Connection, name: str) -> JobRecord | None:
        row = conn.execute(sql.locked_job(self.dialect, name)).first()
        return None if row is None else JobRecord.from_row(row)

    def _is_soon(self, when: dt.datetime, now: dt.datetime) -> bool:
        return self._is_postgres and self.wake_within is not None and when - now < self.wake_within

    def _wake_if_soon(self, conn: Connection, name: str, when: dt.datetime, now: dt.datetime) -> None:
        if self._is_soon(when, now):
            conn.execute(sql.notify(name))

    def _set_next_runs(self, conn: Connection, slots: Sequence[tuple[str, dt.datetime]]) -> None:
        if slots:
            conn.execute(sql.set_next_runs(self.dialect, slots))

    # -- jobs -----------------------------------------------------------------------------------------

    def upsert_job(
        self,
        name: str,
        description: str,
        *,
        first_run_in: dt.timedelta | None = None,
        every: dt.timedelta | None = None,
        queue: str | None = None,
        interrupt_threshold: dt.timedelta | None = None,
        **fields: Any,
    ) -> JobRecord:
        """Insert a job, or update an existing one's description and settings without touching its next
        scheduled run (design §8). `fields` are the other `JobDefinition` fields (schedule, kind, ...) and the
        `JobPolicy` fields (misfire, max_active, ...), as typed values."""
        policy = JobPolicy(**{key: fields.pop(key) for key in POLICY_NAMES if key in fields})
        definition = JobDefinition(
            name=name,
            description=description,
            every=every,
            queue=queue,
            interrupt_threshold=interrupt_threshold,
            policy=policy,
            **fields,
        )
        return self.define_job(definition, first_run_in=first_run_in)

    def define_job(self, definition: JobDefinition, *, first_run_in: dt.timedelta | None = None) -> JobRecord:
        """The upsert behind registration. A new job is first due at now + `first_run_in`, else at its
        schedule's first slot (now for intervals), else now. An existing job keeps its next run unless its
        schedule changed (then: the new schedule's next slot) or it is enabled again after being disabled
        (then: its next slot after now, so it does not fire at once for the time it was off)."""
        timing.check_first_run(definition.name, first_run_in)
        values = definition_values(definition)
        while True:
            with self._tx() as conn:
                now = self._db_now(conn)
                row = conn.execute(sql.locked_job(self.dialect, definition.name)).first()
                if row is None:
                    first = timing.first_run(definition.schedule, first_run_in, now)
                    inserted = conn.execute(sql.insert_job(self.dialect, definition.name, first, now, values)).first()
                    if inserted is None:
                        continue  # registered concurrently by another process: update it instead
                    self._wake_if_soon(conn, definition.name, first, now)
                    return JobRecord.from_row(inserted)
                if owned_by_runtime(row, definition):
                    raise NameTaken(definition.name, Origin.RUNTIME, str(definition.origin))
                return self._store_over(conn, row, synced_values(row, values), now)

    def _store_over(self, conn: Connection, row: Row[Any], values: Mapping[str, Any], now: dt.datetime) -> JobRecord:
        """Store `values` over a job's locked `row` (`records.changes`): the job as it is afterwards."""
        changed = changes(row, values, now)
        if not changed:
            return JobRecord.from_row(row)
        return JobRecord.from_row(conn.execute(sql.update_job(row.name, changed)).one())

    def sync_jobs(
        self,
        definitions: Sequence[JobDefinition],
        *,
        first_run_in: Mapping[str, dt.timedelta | None] | None = None,
        disable_missing: Origin | None = None,
        source: str | None = None,
        fingerprint: str | None = None,
    ) -> JobSync:
        """`define_job` for many jobs at once, in a constant number of statements when nothing changed and
        bounded chunks for what did (never a statement per job, never a parameter per job in one statement).

        Each job is stored as `define_job` stores it (new: first due as there; changed: its next run only
        recomputed when its schedule changed or it is enabled again). `disable_missing`: also disable the
        enabled jobs of that origin not among `definitions` (history kept). A definition whose name a runtime job
        holds is left alone (`JobSync.refused`): a sync never disables nor writes over a runtime job.
        `source` + `fingerprint`: a digest of
        whatever the definitions were built from; when the database says the last sync of `source` stored the
        same one (`sync_is_current`, which callers ask first to skip building the definitions) nothing is written;
        the fingerprint is stored with the changes, in their transaction. Several processes syncing one source
        at once are serialised on its `dbsched_sync` row (on SQLite, on the database's write lock)."""
        wanted = {definition.name: definition for definition in definitions}
        for definition in wanted.values():
            timing.check_first_run(definition.name, (first_run_in or {}).get(definition.name))
        values = {name: definition_values(definition) for name, definition in wanted.items()}
        if source is None:
            # No digest to go by: compare without locking first, so that an unchanged registry is one read.
            with self._tx() as conn:
                rows = self._rows_to_sync(conn, wanted, disable_missing)
            if not plan_sync(rows, wanted, values, disable_missing).pending:
                return JobSync(unchanged=True)
        with self._tx() as conn:
            if source is not None and fingerprint is not None:
                stored = self._lock_source(conn, source)
                if stored is not None and stored == (fingerprint, self._count_kind(conn, disable_missing)):
                    return JobSync(unchanged=True)  # another process just synced the same
            now = self._db_now(conn)
            done = self._store_sync(conn, wanted, values, first_run_in or {}, disable_missing, now)
            if source is not None and fingerprint is not None:
                count = self._count_kind(conn, disable_missing)
                # A definition refused for a runtime job's name: no fingerprint, so that the next sync looks again.
                kept = None if done.refused else fingerprint
                conn.execute(sql.store_fingerprint(source, kept, count, now))
        return done

    def _store_sync(
        self,
        conn: Connection,
        wanted: Mapping[str, JobDefinition],
        values: Mapping[str, Mapping[str, Any]],
        first_run_in: Mapping[str, dt.timedelta | None],
        origin: Origin | None,
        now: dt.datetime,
    ) -> JobSync:
        """The writes of `sync_jobs`, in its transaction: insert the new, update the changed, disable the missing."""
        plan = plan_sync(self._rows_to_sync(conn, wanted, origin), wanted, values, origin)
        added = self._insert_new(conn, [wanted[name] for name in plan.new], values, first_run_in, now)
        raced = sorted(set(plan.new) - set(added))  # inserted by another process meanwhile: compare them
        refused = list(plan.refused)
        changed = self._update_changed(conn, plan.candidates + raced, wanted, values, now, refused)
        disabled = self._disable(conn, plan.missing, origin, now) if origin else []
        return JobSync(added=added, changed=changed, disabled=disabled, refused=sorted(refused))

    def sync_is_current(self, source: str, fingerprint: str, origin: Origin | None) -> bool:
        """One read: the last sync of `source` stored this fingerprint, and the jobs of `origin` are still as
        many as it left (none deleted or added behind its back). Then syncing the same again is a no-op."""
        with self._tx() as conn:
            row = conn.execute(sql.sync_state(source, origin)).first()
        return row is not None and row[0] == fingerprint and row[1] == row[2]

    def _count_kind(self, conn: Connection, origin: Origin | None) -> int:
        return int(conn.execute(sql.count_jobs(origin)).scalar_one())

    def _lock_source(self, conn: Connection, source: str) -> tuple[str | None, int] | None:
        """Hold the `source` row until commit (another process syncing the same source waits here)."""
        conn.execute(sql.add_source(self.dialect, self.clock.now, source))
        row = conn.execute(sql.locked_source(self.dialect, source)).first()
        return None if row is None else (row[0], int(row[1]))

    def _rows_to_sync(
        self, conn: Connection, wanted: Mapping[str, JobDefinition], origin: Origin | None
    ) -> dict[str, Row[Any]]:
        """The stored rows of the wanted jobs and (with `origin`) every enabled job of that origin: one statement."""
        return {row.name: row for row in conn.execute(sql.jobs_to_sync(self.dialect, wanted, origin))}

    def _insert_new(
        self,
        conn: Connection,
        definitions: Sequence[JobDefinition],
        values: Mapping[str, Mapping[str, Any]],
        first_run_in: Mapping[str, dt.timedelta | None],
        now: dt.datetime,
        firsts: Mapping[str, dt.datetime] | None = None,
    ) -> list[str]:
        """Insert the new jobs in chunks; returns the names inserted (not those another process got to first).
        Each is first due as `define_job` says, or at its time in `firsts` when given."""
        added: list[str] = []
        soon = False
        chunk = SYNC_JSON_CHUNK if self._is_postgres else SYNC_CHUNK
        for start in range(0, len(definitions), chunk):
            rows = []
            for definition in definitions[start : start + chunk]:
                if firsts is not None:
                    first = firsts[definition.name]
                else:
                    first = timing.first_run(definition.schedule, first_run_in.get(definition.name), now)
                soon = soon or self._is_soon(first, now)
                row = {"name": definition.name, "next_scheduled_run": first, "create_time": now, "update_time": now}
                rows.append({**row, **values[definition.name]})
            statement, many = sql.insert_jobs(self.dialect, rows)
            result = conn.execute(statement, many)
            added.extend(result.scalars() if many is None else (row["name"] for row in rows))
        if soon and added:
            conn.execute(sql.notify(added[0]))
        return added

    def _update_changed(
        self,
        conn: Connection,
        names: Sequence[str],
        wanted: Mapping[str, JobDefinition],
        values: Mapping[str, Mapping[str, Any]],
        now: dt.datetime,
        refused: list[str],
    ) -> list[str]:
        """Re-read the jobs that differ (locked on PostgreSQL, so that a claim that moves one meanwhile is not
        undone) and write what changed, in chunks of one statement per set of changed columns. A job a runtime
        job's name holds is added to `refused` instead."""
        changed_names: list[str] = []
        for start in range(0, len(names), SYNC_CHUNK):
            groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
            for row in conn.execute(sql.locked_jobs(self.dialect, names[start : start + SYNC_CHUNK])):
                if owned_by_runtime(row, wanted[row.name]):
                    refused.append(row.name)
                    continue
                changed = changes(row, synced_values(row, values[row.name]), now)
                if changed:
                    groups.setdefault(tuple(sorted(changed)), []).append({"b_name": row.name, **changed})
                    changed_names.append(row.name)
            for params in groups.values():
                conn.execute(sql.update_jobs_by_name(), params)
        return sorted(changed_names)

    def _disable(self, conn: Connection, names: Sequence[str], origin: Origin, now: dt.datetime) -> list[str]:
        if not names:
            return []
        return sorted(row[0] for row in conn.execute(sql.disable_jobs(self.dialect, names, origin, now)).all())

    def lookup_job(self, name: str) -> JobRecord:
        with self._tx() as conn:
            row = conn.execute(sql.job(name)).first()
        if row is None:
            raise JobNotFound(name)
        return JobRecord.from_row(row)

    def lookup_jobs(self, names: Sequence[str]) -> dict[str, JobRecord]:
        """The named jobs that exist, by name (one query, one bound parameter however many names)."""
        if not names:
            return {}
        with self._tx() as conn:
            rows = conn.execute(sql.jobs(self.dialect, set(names))).all()
        return {row.name: JobRecord.from_row(row) for row in rows}

    def list_jobs(self, origin: Origin | None = None) -> list[JobRecord]:
        """Every job (of `origin` when given), by name."""
        with self._tx() as conn:
            rows = conn.execute(sql.all_jobs(origin)).all()
        return [JobRecord.from_row(row) for row in rows]

    # -- runtime schedules (celery_dbsched.runtime) --------------------------------------------------------

    def add_runtime_job(self, entry: RuntimeEntry) -> JobRecord:
        """Store a new runtime schedule, first due at `entry.first_run` (disabled at once when that is past its
        expire_time); NameTaken when a job of that name exists (whatever its origin). Wakes the beats if soon."""
        name = entry.name
        with self._tx() as conn:
            now = self._db_now(conn)
            row = conn.execute(sql.locked_job(self.dialect, name)).first()
            if row is None:
                first = entry.first_run(now)
                row = conn.execute(sql.insert_job(self.dialect, name, first, now, entry.values(first))).first()
                if row is not None:
                    self._wake_if_soon(conn, name, first, now)
                    return JobRecord.from_row(row)
                row = conn.execute(sql.job(name)).one()  # inserted by another process meanwhile
            raise NameTaken(name, row.origin, Origin.RUNTIME)

    def _runtime_row(self, conn: Connection, name: str) -> Row[Any]:
        """A runtime schedule's row, locked; JobNotFound, or DbschedError for a job of another origin."""
        row = conn.execute(sql.locked_job(self.dialect, name)).first()
        if row is None:
            raise JobNotFound(name)
        if row.origin != Origin.RUNTIME:
            where = "the code that registers it (@job)" if row.origin == Origin.CODE else "the app's beat_schedule"
            raise DbschedError(f"job {name!r} is a {row.origin} job, not a runtime schedule; change it in {where}")
        return row

    def update_runtime_job(
        self, name: str, build: Callable[[JobRecord], RuntimeEntry], *, timing_given: bool = False
    ) -> JobRecord:
        """Store `build(current)` over a runtime schedule (`records.runtime_changes`: its next run moves only when
        its schedule changed, it is enabled again, or `timing_given`). Wakes the beats if its next run is soon."""
        with self._tx() as conn:
            row = self._runtime_row(conn, name)
            entry = build(JobRecord.from_row(row))
            now = self._db_now(conn)
            changed = runtime_changes(row, entry, now, timing_given=timing_given)
            if not changed:
                return JobRecord.from_row(row)
            updated = JobRecord.from_row(conn.execute(sql.update_job(name, changed)).one())
            if updated.policy.enabled and not updated.paused:
                self._wake_if_soon(conn, name, updated.next_scheduled_run, now)
            return updated

    def remove_runtime_job(self, name: str, *, purge: bool = False) -> JobRecord:
        """`remove_job` for a runtime schedule only (DbschedError for a job of another origin)."""
        with self._tx() as conn:
            self._runtime_row(conn, name)
        return self.remove_job(name, purge=purge)

    def put_runtime_jobs(self, entries: Sequence[RuntimeEntry], *, dry_run: bool = False) -> PutResult:
        """Create the missing runtime schedules, update the changed (as `update_runtime_job`), leave the
        identical alone, refuse names a code or beat_schedule job holds; in one transaction of bounded
        statements (chunks of SYNC_CHUNK names: one locked read each, the names as one parameter, then one insert
        and an executemany update per set of changed columns). `dry_run`: only the reads."""
        created: list[str] = []
        updated: list[str] = []
        unchanged: list[str] = []
        refused: list[tuple[str, str]] = []
        with self._tx() as conn:
            now = self._db_now(conn)
            soon: str | None = None
            for start in range(0, len(entries), SYNC_CHUNK):
                part = entries[start : start + SYNC_CHUNK]
                rows = {row.name: row for row in conn.execute(sql.locked_jobs(self.dialect, [e.name for e in part]))}
                new: list[RuntimeEntry] = []
                groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
                for entry in part:
                    row = rows.get(entry.name)
                    if row is None:
                        new.append(entry)
                    elif row.origin != Origin.RUNTIME:
                        refused.append((entry.name, str(NameTaken(entry.name, row.origin, Origin.RUNTIME))))
                    else:
                        changed = runtime_changes(row, entry, now, timing_given=False)
                        if not changed:
                            unchanged.append(entry.name)
                            continue
                        updated.append(entry.name)
                        groups.setdefault(tuple(sorted(changed)), []).append({"b_name": entry.name, **changed})
                        when = changed.get("next_scheduled_run")
                        if when is not None and self._is_soon(when, now):
                            soon = entry.name
                if dry_run:
                    created.extend(entry.name for entry in new)
                    continue
                firsts = {entry.name: entry.first_run(now) for entry in new}
                values = {entry.name: entry.values(firsts[entry.name]) for entry in new}
                definitions = [entry.definition for entry in new]
                added = set(self._insert_new(conn, definitions, values, {}, now, firsts))
                created.extend(entry.name for entry in new if entry.name in added)
                refused.extend((e.name, "created by another process meanwhile") for e in new if e.name not in added)
                for params in groups.values():
                    conn.execute(sql.update_jobs_by_name(), params)
            if soon is not None and not dry_run:
                conn.execute(sql.notify(soon))
        return PutResult(created, updated, unchanged, refused, dry_run)

    def update_job_next_run_in_at_least(self, name: str, delta: dt.timedelta, *, run_now: bool = False) -> JobRecord:
        """`next_scheduled_run = least(now + delta, next_scheduled_run)`: only ever earlier. When the job has
        an active run the request is kept on that run and honoured when it ends (design §6)."""
        if not isinstance(name, str) or not name:
            raise ValueError("job name must not be empty")
        seconds = delta.total_seconds()
        if seconds < 0:
            raise ValueError(f"delta must not be negative, got {delta}")
        wanted = self.clock.now(seconds)
        with self._tx() as conn:
            row = conn.execute(sql.pull_in_job(name, wanted)).first()
            if row is None:
                raise JobNotFound(name)
            conn.execute(sql.pull_in_active_runs(name, wanted))
            if run_now and self._is_postgres:
                conn.execute(sql.notify(name))
        return JobRecord.from_row(row)

    def next_due_in(self) -> float | None:
        """Seconds until the earliest claimable job is due (<= 0: due now); None when there is none. One
        indexed query: this is what an idle beat tick costs."""
        with self._tx() as conn:
            row = conn.execute(sql.next_due(self.clock.now)).first()
        if row is None:
            return None
        due: dt.datetime = row[0]
        now: dt.datetime = row[1]
        return (due - now).total_seconds()

    # -- runs: claiming -------------------------------------------------------------------------------

    def claim_runs(self, server_id: str, limit: int) -> Claim:
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
        if self._is_mysql:
            return self._claim_runs_mysql(server_id, limit)
        with self._tx() as conn:
            self._skip_misfired(conn, limit)
            rows = conn.execute(sql.claim(self.dialect, self.clock.now, server_id, limit)).all()
            runs = sorted((RunRecord.from_row(row) for row in rows), key=lambda run: run.id)
            if runs and self._is_postgres:
                runs = self._drop_stale_claims(conn, runs)
            jobs = self._advance_claimed(conn, runs)
        return Claim(runs, jobs)

    def _claim_runs_mysql(self, server_id: str, limit: int) -> Claim:
        """MySQL/MariaDB: the due jobs read locked (SKIP LOCKED, last committed: no stale read to drop
        afterwards), then their runs inserted (INSERT IGNORE ... RETURNING): two statements, as a statement that
        inserts runs may not read the job table there (the trigger of active runs writes it). A deadlock (a beat
        and a worker's finish locking a job and its run in opposite orders) rolls the whole claim back, so no
        slot was taken: it is logged once and the claim made once more."""

        def claim() -> Claim:
            with self._tx() as conn:
                self._skip_misfired(conn, limit)
                due = conn.execute(sql.claim_due(self.clock.now, server_id, limit)).all()
                rows = conn.execute(sql.insert_claims(self.dialect, due)).all() if due else []
                runs = sorted((RunRecord.from_row(row) for row in rows), key=lambda run: run.id)
                return Claim(runs, self._advance_claimed(conn, runs))

        return self._again_on_deadlock(f"claim by {server_id}", claim)

    def _drop_stale_claims(self, conn: Connection, runs: list[RunRecord]) -> list[RunRecord]:
        """PostgreSQL (READ COMMITTED): the claim statement read the jobs as they were when it began. When it
        waits on another beat's uncommitted claim, a run of the same slot that a third beat claimed and a worker
        finished meanwhile is no longer active, so it does not conflict, and the slot would run twice. This
        statement reads afresh (it sees every commit the claim waited for): a claimed run whose slot is no
        longer the job's due slot was already run (or moved) by someone else, and is dropped. (The claimed ids
        are one array parameter, however many.)"""
        ids = [run.id for run in runs]
        stale = set(conn.execute(sql.drop_stale_claims(self.dialect, ids)).scalars())
        return [run for run in runs if run.id not in stale]

    def _skip_misfired(self, conn: Connection, limit: int) -> None:
        rows = conn.execute(sql.misfired(self.clock.now, limit)).all()
        if not rows:
            return
        now = self._db_now(conn)
        slots = []
        ended: list[str] = []
        for row in rows:
            job = JobRecord.from_row(row)
            slot = timing.skip_misfired(job.cadence, job.next_scheduled_run, now)
            if slot is not None and job.passes_expiry(slot):
                ended.append(job.name)
            elif slot is not None:
                slots.append((job.name, slot))
        self._set_next_runs(conn, slots)
        self._disable_ended(conn, ended)

    def _advance_claimed(self, conn: Connection, runs: Sequence[RunRecord]) -> dict[str, JobRecord]:
        """Plain tasks and overlapping jobs: the claim itself moves the job to its next slot (fixed cadence;
        one catch-up at most, never a burst of missed slots). One read of those jobs, joined on the claimed
        runs, and one update of all their next slots; returns the jobs as read."""
        if not runs:
            return {}
        rows = conn.execute(sql.claimed_jobs_advancing(self.dialect, self.clock.now, [run.id for run in runs])).all()
        jobs: dict[str, JobRecord] = {}
        slots: list[tuple[str, dt.datetime]] = []
        ended: list[str] = []
        for row in rows:
            job = JobRecord.from_row(row)
            jobs[job.name] = job
            slot = job.next_slot(row.claimed_at, row.claimed_slot)
            if job.one_off or (slot is not None and job.passes_expiry(slot)):
                ended.append(job.name)  # its one run, or its last before expire_time: disabled, history kept
            elif slot is not None:
                slots.append((job.name, slot))
        self._set_next_runs(conn, slots)
        self._disable_ended(conn, ended)
        return jobs

    def _disable_ended(self, conn: Connection, names: Sequence[str]) -> None:
        """Disable one-off jobs whose run was claimed and jobs past their `expire_time` (one statement, the names
        as one parameter); their next run stays at the slot claimed, their history is kept."""
        if names:
            conn.execute(sql.disable_named(self.dialect, self.clock.now, names))

    # -- runs: transitions ----------------------------------------------------------------------------

    def start_run(self, run_id: int, worker: str, task_id: str | None = None) -> RunRecord:
        """`queued -> running`, or InvalidRunState: the one gate that makes a run start at most once. A run
        whose job `expires` and whose slot + expires has passed ends `interrupted` (expired) instead.

        On PostgreSQL the gate is one statement that also returns the job's cadence, for the finish."""
        if self._is_postgres:
            rows = self._one(
                self._prepared("start", lambda: sql.start(self.clock.now)),
                {"run_id": run_id, "run_worker": worker, "run_task_id": task_id},
            )
            if rows:
                return self._remember_start(rows[0])
            # Not started: not queued, unknown, or expired. The long way says which (and ends an expired run).
        return self._start_run_in_tx(run_id, worker, task_id)

    def _remember_start(self, row: Row[Any]) -> RunRecord:
        started = StartedRun.from_row(row, monotonic=time.monotonic(), clock_key=self.clock.key)
        with self._started_lock:
            if len(self._started) >= _STARTED_KEPT:
                self._started.pop(next(iter(self._started)))
            self._started[started.run.id] = started
        return started.run

    def _forget_start(self, run_id: int) -> None:
        with self._started_lock:
            self._started.pop(run_id, None)

    def _start_run_in_tx(self, run_id: int, worker: str, task_id: str | None) -> RunRecord:
        expired = None
        with self._tx() as conn:
            row = conn.execute(sql.start_queued(self.clock.now, run_id, worker, task_id)).first()
            if row is None:
                expired = conn.execute(sql.expire_queued(self.clock.now, run_id)).first()
                if expired is None:
                    self._run_or_raise(conn, run_id, RunState.QUEUED)
                else:
                    self._skip_slot(conn, RunRecord.from_row(expired))
        if expired is not None:
            # Raised after the commit: raising inside the transaction would roll the expiry back.
            raise InvalidRunState(run_id, RunState.INTERRUPTED, RunState.QUEUED)
        assert row is not None
        return RunRecord.from_row(row)

    def update_progress(self, run_id: int, completed: int, total: int) -> RunRecord:
        """Store a running run's progress; `update_time` moves only when the values change (design §5)."""
        JobStatus(completed, total)
        if self._is_postgres:
            rows = self._one(
                self._prepared("progress", lambda: sql.progress(self.clock.now)),
                {"run_id": run_id, "p_completed": completed, "p_total": total},
            )
            if not rows:
                raise RunNotFound(run_id)
            row = rows[0]
            if row._mapping["_written"]:
                return RunRecord.from_row(row)
            if row.status != RunState.RUNNING:
                raise InvalidRunState(run_id, row.status, RunState.RUNNING)
            if (row.completed, row.total) == (completed, total):
                return RunRecord.from_row(row)
            # The write missed a running run with other values: it changed meanwhile. Look again.
        return self._update_progress_in_tx(run_id, completed, total)

    def _update_progress_in_tx(self, run_id: int, completed: int, total: int) -> RunRecord:
        with self._tx() as conn:
            row = conn.execute(sql.set_progress(self.clock.now, run_id, completed, total)).first()
            if row is None:
                row = conn.execute(sql.run(run_id)).first()
                if row is None:
                    raise RunNotFound(run_id)
                if row.status != RunState.RUNNING:
                    raise InvalidRunState(run_id, row.status, RunState.RUNNING)
        return RunRecord.from_row(row)

    def run_status(self, run_id: int) -> RunState:
        rows = self._one(self._prepared("status", sql.run_status), {"run_id": run_id})
        if not rows:
            raise RunNotFound(run_id)
        return RunState(rows[0][0])

    def _end_run(
        self,
        conn: Connection,
        run_id: int,
        status: RunState,
        from_states: tuple[RunState, ...],
        *,
        error: str | None = None,
        progress: JobStatus | None = None,
        interrupt_reason: InterruptReason | None = None,
        worker: str | None = None,
    ) -> RunRecord:
        values: dict[str, Any] = {}
        if worker is not None:
            values["worker"] = worker
        if interrupt_reason is not None:
            values["interrupt_reason"] = interrupt_reason
        if error is not None:
            values["error"] = sql.error_text(error)
        if progress is not None:
            values["completed"] = progress.completed
            values["total"] = progress.total
        row = conn.execute(sql.end_run(self.clock.now, run_id, status, from_states, values)).first()
        if row is None:
            self._run_or_raise(conn, run_id, " or ".join(from_states))
        assert row is not None
        return RunRecord.from_row(row)

    def _schedule_next(
        self, conn: Connection, run: RunRecord, when: dt.datetime, *, failed: bool, now: dt.datetime
    ) -> None:
        """Store the job's next run `when` (the timing rules applied the pull-in) and wake the beats if soon."""
        conn.execute(sql.schedule_next(run.job_name, when, failed=failed, run_slot=run.scheduled_for))
        self._wake_if_soon(conn, run.job_name, when, now)

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
        return self._again_on_deadlock(
            f"completing run {run_id}", lambda: self._complete_in_tx(run_id, next_run_in, progress)
        )

    def _complete_in_tx(self, run_id: int, next_run_in: dt.timedelta | None, progress: JobStatus | None) -> RunRecord:
        with self._tx() as conn:
            run = self._end_run(conn, run_id, RunState.COMPLETED, (RunState.RUNNING,), progress=progress)
            job = self._job(conn, run.job_name)
            if job is None:
                return run
            # Counted from the run's end on the database clock, not from a later statement's now: a slot that came
            # between the two (a loaded database) is still due, not passed over as if the run had overrun it.
            now = run.end_time if run.end_time is not None else self._db_now(conn)
            when = timing.next_run_after_completion(
                now,
                next_run_in=next_run_in,
                advances=job.advances_at_claim,
                claimed_next_run=job.next_scheduled_run,
                slots=job.cadence,
                run_slot=run.scheduled_for,
                backoff_cap=self.retry_backoff[1],
                requested=run.requested_next_run,
            )
            self._schedule_next(conn, run, when, failed=False, now=now)
        return run

    def _retry(self, conn: Connection, run: RunRecord) -> None:
        """Schedule the retry of a failed or stalled run (and wake the beats if it is soon): exponential
        backoff (the job's own, else the global), never later than the job's next slot."""
        now = self._db_now(conn)
        job = self._job(conn, run.job_name)
        when = timing.pulled_in(now, run.requested_next_run)
        if job is not None:
            when = timing.retry_at(
                now,
                failure_count=job.failure_count,
                backoff=job.policy.retry_backoff or self.retry_backoff,
                advances=job.advances_at_claim,
                claimed_next_run=job.next_scheduled_run,
                slots=job.cadence,
                run_slot=run.scheduled_for,
                requested=run.requested_next_run,
            )
        self._schedule_next(conn, run, when, failed=True, now=now)

    def fail_run(self, run_id: int, error: str, *, progress: JobStatus | None = None) -> RunRecord:
        """`queued|running -> failed` with the error text; the job is retried after the backoff (design §7).
        One statement on PostgreSQL for a run this repository started, as `complete_run`."""
        if self._is_postgres:
            run = self._finish_in_one_statement(run_id, error or "failed", None, progress)
            if run is not None:
                return run
        self._forget_start(run_id)

        def fail() -> RunRecord:
            with self._tx() as conn:
                run = self._end_run(conn, run_id, RunState.FAILED, ACTIVE, error=error or "failed", progress=progress)
                self._retry(conn, run)
            return run

        return self._again_on_deadlock(f"failing run {run_id}", fail)

    def refuse_run(self, run_id: int, worker: str, error: str) -> RunRecord:
        """`queued -> failed`: a worker refused the run's message without starting it (it does not have the run
        task); the job is retried after the backoff. Never a run that started: a second delivery of its
        message to such a worker leaves it alone (InvalidRunState)."""
        self._forget_start(run_id)
        with self._tx() as conn:
            run = self._end_run(conn, run_id, RunState.FAILED, (RunState.QUEUED,), error=error, worker=worker)
            self._retry(conn, run)
        return run

    def _finish_in_one_statement(
        self, run_id: int, error: str | None, next_run_in: dt.timedelta | None, progress: JobStatus | None
    ) -> RunRecord | None:
        """PostgreSQL: end the run (completed, or failed with `error`) and schedule its job's next run in one
        statement (`statements.finish`), with the semantics of `_complete_in_tx` / `fail_run`'s `_retry` exactly.
        The next slot is computed here from the job's cadence as the start returned it (`StartedRun`), as a few
        candidate slots around the expected time of the finish (`timing.finish_window`); the statement applies
        only if the database's time falls among them and the job's cadence is still the one they were computed
        from. None when it did not apply (the run is not ours to end, the facts changed, or no start is
        remembered): nothing was written, and the caller goes the long way, which also says why."""
        failed = error is not None
        params: dict[str, Any] = {
            "run_id": run_id,
            "p_completed": None if progress is None else progress.completed,
            "p_total": None if progress is None else progress.total,
            "w_wake": self.wake_within,
        }
        if failed:
            params["run_error"] = sql.error_text(error or "failed")
        checked = failed or next_run_in is None  # else now + the job's own delay: nothing about the job is needed
        window = timing.FinishWindow(delay=next_run_in)
        if checked:
            started = self._started.get(run_id)
            facts = None if started is None else self._finish_facts(started, failed)
            if facts is None:
                return None
            window, job_facts = facts
            params.update(job_facts)
        params.update(w_slots=window.slots, w_lower=window.lower, w_upper=window.upper)
        params.update(w_delay=window.delay, w_use_next=window.use_next)
        statement = self._prepared(f"finish-{failed}-{checked}", lambda: sql.finish(self.clock.now, failed, checked))
        try:
            rows = self._one(statement, params)
        except _Recheck:
            return None
        if not rows:
            return None
        self._forget_start(run_id)
        return RunRecord.from_row(rows[0])

    def _finish_facts(self, started: StartedRun, failed: bool) -> tuple[timing.FinishWindow, dict[str, Any]] | None:
        """The window of a checked finish and the job facts it holds to (bound as `f_*`); None: go the long way."""
        expected = self.clock.expected_now(started.run.start_time, started.monotonic, started.clock_key)
        if started.run.scheduled_for is None or expected is None:
            return None
        window = timing.finish_window(
            expected,
            failed=failed,
            advances=started.advances_at_claim,
            slots=started.cadence,
            run_slot=started.run.scheduled_for,
            failure_count=started.failure_count,
            backoff=started.retry_backoff or self.retry_backoff,
            backoff_cap=self.retry_backoff[1],
        )
        facts = {f"f_{name}": started.column(name) for name in sql.FINISH_FACTS}
        facts["f_failure_count"] = started.failure_count
        return window, facts

    def interrupt_run(
        self,
        run_id: int,
        reason: InterruptReason = InterruptReason.CANCELLED,
        detail: str = "",
        *,
        skip_slot: bool = False,
    ) -> RunRecord:
        """End one active run `interrupted` for `reason` (its error text: the reason, then `detail`); the
        worker running it sees that and cancels the job. `skip_slot`: its job moves to its next slot (not
        claimed again at once), as after an operator's cancel."""
        self._forget_start(run_id)
        with self._tx() as conn:
            run = self._end_run(
                conn,
                run_id,
                RunState.INTERRUPTED,
                ACTIVE,
                error=f"{reason}: {detail}" if detail else str(reason),
                interrupt_reason=reason,
            )
            if reason == InterruptReason.STALLED:
                self._retry(conn, run)
            elif skip_slot:
                self._skip_slot(conn, run)
        return run

    def interrupt_runs(
        self,
        threshold: dt.timedelta | None = None,
        server_id: str | None = None,
        *,
        reason: InterruptReason | None = None,
    ) -> list[RunRecord]:
        """Mark runs `interrupted`.

        Without `server_id`: every active run whose `update_time` is older than its job's interrupt
        threshold (else `threshold`, else the repository's) - stalled, retried with backoff.
        With `server_id`: the runs that server left behind (running on it as a worker, or queued by it as a
        beat), older than `threshold` when given; they are due again at once (reason `restart` by default,
        or e.g. `shutdown`).
        """
        if server_id is None:
            reason = reason or InterruptReason.STALLED
            default = (threshold or self.interrupt_threshold).total_seconds()
            statement = sql.interrupt_stalled(self.clock.now, default, reason)
        else:
            reason = reason or InterruptReason.RESTART
            statement = sql.interrupt_left_behind(self.clock.now, server_id, threshold, reason)
        with self._tx() as conn:
            runs = [RunRecord.from_row(row) for row in conn.execute(statement).all()]
            if reason == InterruptReason.STALLED:
                for run in runs:
                    self._retry(conn, run)
            elif runs:
                # Due again at once. Other jobs still are (their next run moves when a run ends).
                conn.execute(sql.due_again(self.dialect, self.clock.now, {run.job_name for run in runs}))
        return runs

    def expire_runs(self) -> list[RunRecord]:
        """End `interrupted` (expired) the queued runs whose job sets `expires` and whose slot + expires has
        passed: better not at all than late."""
        with self._tx() as conn:
            runs = [RunRecord.from_row(row) for row in conn.execute(sql.expire(self.clock.now)).all()]
            for run in runs:
                self._skip_slot(conn, run)
        return runs

    def _skip_slot(self, conn: Connection, run: RunRecord) -> None:
        """The run of this slot will not happen (expired, cancelled): a job rescheduled when its run ends (not at
        claim) moves to its next slot (`timing.skip_slot`)."""
        job = self._job(conn, run.job_name)
        if job is None or job.advances_at_claim:
            return
        when = timing.skip_slot(job.cadence, self._db_now(conn), run.scheduled_for, run.requested_next_run)
        self._set_next_runs(conn, [(job.name, when)])

    def dispatch_run(self, run_id: int, task_id: str | None = None) -> RunRecord:
        """`queued -> dispatched`: a plain task was sent; its outcome is unknown unless a worker with the
        tracking signals reports it (final; never blocks the job's next slot). A tracking worker may have
        started (or even finished) the task before the beat gets here: then the run is left as it is."""
        with self._tx() as conn:
            row = conn.execute(sql.dispatch(self.clock.now, run_id, task_id)).first()
            if row is None:
                row = conn.execute(sql.run(run_id)).first()
                if (
                    row is None
                    or row.kind != JobKind.TASK
                    or row.status not in (RunState.RUNNING, RunState.COMPLETED, RunState.FAILED)
                ):
                    self._run_or_raise(conn, run_id, RunState.QUEUED)
            assert row is not None
            conn.execute(sql.reset_failures(row.job_name))
        return RunRecord.from_row(row)

    def dispatch_runs(self, sent: Sequence[tuple[int, str | None]]) -> None:
        """`queued -> dispatched` for a whole published batch of plain tasks, (run id, task id) pairs, in one
        statement (the pairs are one parameter); runs a tracking worker already moved on are left as they are.
        Their jobs' failure counts are reset: whatever failed to publish before is behind them."""
        if not sent:
            return
        with self._tx() as conn:
            for statement in sql.dispatch_many(self.dialect, self.clock.now, sent):
                conn.execute(statement)

    # -- plain tasks tracked on workers ---------------------------------------------------------------

    def track_start(self, run_id: int, worker: str, task_id: str | None) -> RunRecord:
        """A worker with the tracking signals started a dispatched plain task: `dispatched -> running` (or
        `queued -> running` when the message beat the beat's own `dispatched` mark to the worker).
        It takes no slot (slot = -id), so it never blocks the entry's next slot, as under stock beat."""
        rows = self._one(
            self._prepared("track-start", lambda: sql.track_start(self.clock.now)),
            {"run_id": run_id, "run_worker": worker, "run_task_id": task_id},
        )
        if not rows:
            self._raise_why_not(run_id, RunState.DISPATCHED)
        return RunRecord.from_row(rows[0])

    def track_end(self, run_id: int, error: str | None = None) -> RunRecord:
        """The tracked plain task ended: `running -> completed`, or `failed` with its error."""
        if error is None:
            statement = self._prepared("track-completed", lambda: sql.track_end(self.clock.now, RunState.COMPLETED))
            rows = self._one(statement, {"run_id": run_id})
        else:
            statement = self._prepared("track-failed", lambda: sql.track_end(self.clock.now, RunState.FAILED))
            rows = self._one(statement, {"run_id": run_id, "run_error": sql.error_text(error)})
        if not rows:
            self._raise_why_not(run_id, RunState.RUNNING)
        return RunRecord.from_row(rows[0])

    def track_refused(self, run_id: int, worker: str, task_id: str | None, error: str) -> RunRecord:
        """A worker with the tracking signals refused a plain task's message (an unknown or invalid task): the
        run that was sent (`dispatched`, or still `queued`) ends `failed` with `error`, never having started."""
        rows = self._one(
            self._prepared("track-refused", lambda: sql.track_refused(self.clock.now)),
            {"run_id": run_id, "run_worker": worker, "run_task_id": task_id, "run_error": sql.error_text(error)},
        )
        if not rows:
            self._raise_why_not(run_id, RunState.DISPATCHED)
        return RunRecord.from_row(rows[0])

    def heartbeat(
        self,
        server_id: str,
        kind: str,
        hostname: str,
        pid: int,
        *,
        interval: float | None = None,
        claims: ClaimStats | None = None,
    ) -> None:
        """Record that a worker (or beat) is alive now: one statement. `interval`: the longest it goes between
        two heartbeats; `claims` (beats): what it claimed over the last minute. A worker's runs in flight are
        counted by the statement (on MySQL/MariaDB, by a read just before it)."""
        role = "beat" if kind == "beat" else "worker"
        params: dict[str, Any] = {
            "s_id": server_id,
            "s_kind": kind,
            "s_hostname": hostname,
            "s_pid": pid,
            "s_version": PACKAGE_VERSION,
            "s_interval": interval,
        }
        if role == "beat":
            stats = claims or ClaimStats()
            params.update(s_claims=stats.count, s_lag_p50=stats.lag_p50, s_lag_max=stats.lag_max)
        statement = self._prepared(f"heartbeat-{role}", lambda: sql.heartbeat(self.dialect, self.clock.now, role))
        if self._is_mysql and role == "worker":
            # InnoDB reads a subquery of an INSERT with shared row locks, even under READ COMMITTED: counting
            # the runs there locked the running runs against their own finishes (deadlocks under load). The
            # count is a plain read (no lock) before the upsert.
            with self._tx() as conn:
                params["s_flight"] = conn.execute(sql.runs_in_flight(server_id)).scalar_one()
                conn.execute(statement, params)
            return
        self._one(statement, params)

    def interrupt_orphaned(self, threshold: dt.timedelta | None = None) -> list[RunRecord]:
        """Tracked plain tasks whose worker has not been seen for the threshold end `interrupted`."""
        limit = (threshold or self.interrupt_threshold).total_seconds()
        with self._tx() as conn:
            rows = conn.execute(sql.interrupt_orphaned(self.clock.now, limit)).all()
        return [RunRecord.from_row(row) for row in rows]

    # -- operator controls ----------------------------------------------------------------------------

    def set_paused(self, name: str, paused: bool) -> JobRecord:
        """Pause (never claimed) or resume a job. Resuming moves a job whose slot passed while it was paused
        to its next slot after now: it does not fire at once for the time it was off."""
        with self._tx() as conn:
            job = self._job(conn, name)
            if job is None:
                raise JobNotFound(name)
            values: dict[str, Any] = {"paused": paused}
            now = self._db_now(conn)
            if not paused and job.paused:
                when = timing.resume_at(job.cadence, job.next_scheduled_run, now)
                if when != job.next_scheduled_run:
                    values["next_scheduled_run"] = when
            row = conn.execute(sql.set_paused(name, values)).one()
        return JobRecord.from_row(row)

    def interrupt_job_runs(self, name: str) -> list[RunRecord]:
        """Interrupt (cancelled, by an operator) the job's queued and running runs in the database; the worker
        running one sees that and cancels the job's context."""
        with self._tx() as conn:
            if self._job(conn, name) is None:
                raise JobNotFound(name)
            runs = [RunRecord.from_row(row) for row in conn.execute(sql.interrupt_job_runs(self.clock.now, name)).all()]
            for run in runs:
                self._skip_slot(conn, run)  # cancelled means not now: not claimed again at once
        return runs

    def cancel_run(self, run_id: int, detail: str = "by an operator") -> RunRecord:
        """Interrupt (cancelled) one queued or running run, as `interrupt_job_runs` does the job's all: its
        worker cancels the job's context, and its job is not claimed again at once (its next slot)."""
        return self.interrupt_run(run_id, InterruptReason.CANCELLED, detail, skip_slot=True)

    def disable_jobs_not_in(self, kind: JobKind, names: Sequence[str]) -> list[str]:
        """Disable the jobs of `kind` that are not in `names` (entries removed from beat_schedule); their
        history stays. One statement and one bound parameter however many names."""
        with self._tx() as conn:
            rows = conn.execute(sql.disable_jobs_not_in(self.dialect, self.clock.now, kind, names)).all()
        return sorted(row[0] for row in rows)

    def remove_job(self, name: str, *, purge: bool = False) -> JobRecord:
        """Take a job out of the schedule: disable it (never claimed again; its history kept), or with `purge`
        delete it and its history. A run still active goes on (`purge` refuses: cancel it first). A `@job` or
        `beat_schedule` entry still declared is enabled again by the next worker or beat start that syncs it.
        Returns the job as it was (purged) or is now (disabled)."""
        with self._tx() as conn:
            job = self._job(conn, name)
            if job is None:
                raise JobNotFound(name)
            if not purge:
                values = {"enabled": False, "update_time": self._db_now(conn)}
                return JobRecord.from_row(conn.execute(sql.update_job(name, values)).one())
            if not conn.execute(sql.delete_idle_job(name)).rowcount:
                raise DbschedError(f"job {name!r} has a queued or running run; cancel it first: dbsched cancel {name}")
        return job

    def mark_registered(self, names: Sequence[str]) -> None:
        """A worker started with these `@job`s in its code (one statement, the names as one parameter)."""
        with self._tx() as conn:
            conn.execute(sql.mark_registered(self.dialect, self.clock.now, names))

    def orphaned_jobs(self, grace: dt.timedelta | None = None) -> dict[str, dt.datetime | None]:
        """The enabled `@job`s that look removed from the code: no worker registered them within `grace`
        (default: the interrupt threshold, time for a rolling restart) before the latest worker start that
        registered any job. By name: when each was last registered (None: never by a worker of this version).
        Empty until a worker has registered its jobs. For `dbsched jobs` and `dbsched status`."""
        seconds = (grace if grace is not None else self.interrupt_threshold).total_seconds()
        with self._tx() as conn:
            rows = conn.execute(sql.orphaned_jobs(seconds)).all()
        return {row.name: row.registered_time for row in rows}

    def last_runs(self) -> dict[str, RunRecord]:
        """Each job's latest run, by job name: one probe of the runs-by-job index per job, however long the
        history (`statements.last_runs`)."""
        with self._tx() as conn:
            rows = conn.execute(sql.last_runs(self.dialect)).all()
        return {run.job_name: run for run in map(RunRecord.from_row, rows)}

    def mark_run_stopped(self, run_id: int) -> None:
        """The worker's code of a run that was ended under it has returned (`run_stopped_time`)."""
        with self._tx() as conn:
            conn.execute(sql.mark_run_stopped(self.clock.now, run_id))

    def run_stopped_time(self, run_id: int) -> dt.datetime | None:
        """When the worker's code of the run returned after the run was ended under it (None: not seen)."""
        with self._tx() as conn:
            row = conn.execute(sql.run_stopped_time(run_id)).first()
        if row is None:
            raise RunNotFound(run_id)
        value: dt.datetime | None = row[0]
        return value

    # -- history ----------------------------------------------------------------------------------------

    def lookup_run(self, run_id: int) -> RunRecord:
        with self._tx() as conn:
            row = conn.execute(sql.run(run_id)).first()
        if row is None:
            raise RunNotFound(run_id)
        return RunRecord.from_row(row)

    def list_runs(
        self,
        job_name: str | None = None,
        status: str | None = None,
        limit: int = 100,
        *,
        since: dt.datetime | None = None,
    ) -> list[RunRecord]:
        """Newest first; `since`: only runs claimed at or after it."""
        if status is not None and status not in set(RunState):
            raise ValueError(f"unknown run status {status!r}; one of {', '.join(RunState)}")
        with self._tx() as conn:
            rows = conn.execute(sql.runs(job_name, status, limit, since)).all()
        return [RunRecord.from_row(row) for row in rows]

    def prune_runs(self, retention: dt.timedelta, *, batch: int = PRUNE_BATCH, max_rows: int | None = None) -> int:
        """Delete final runs that ended more than `retention` ago, oldest first, in transactions of at most
        `batch` rows (a short lock and a bounded WAL burst each, so that claims and vacuum go on meanwhile),
        until none is left or `max_rows` were deleted; returns how many were deleted. Active runs have no end
        time and are never touched. Each batch is picked through the `end_time` index (`dbsched_job_run_end`);
        on PostgreSQL rows another pruning beat holds are skipped, not waited for."""
        if batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")
        total = 0
        while max_rows is None or total < max_rows:
            size = batch if max_rows is None else min(batch, max_rows - total)
            with self._tx() as conn:
                result = conn.execute(sql.prune_batch(self.dialect, self.clock.now, retention, size))
                deleted = int(result.rowcount or 0)
            total += deleted
            if deleted < size:
                break
        return total

    def prune_servers(self, retention: dt.timedelta) -> int:
        """Delete the rows of servers (beats, workers) not seen for `retention`; returns how many."""
        with self._tx() as conn:
            return int(conn.execute(sql.prune_servers(self.clock.now, retention)).rowcount or 0)

    # -- what the scheduler is doing (read by celery_dbsched.observe; every read bounded) --------------------

    def server_rows(self, limit: int) -> tuple[list[Row[Any]], dt.datetime]:
        """The server rows (at most `limit`), beats first, and the database's time."""
        with self._tx() as conn:
            return list(conn.execute(sql.servers(limit)).all()), self._db_now(conn)

    def due_backlog(self, cap: int) -> tuple[int, dt.datetime | None, str | None, dt.datetime]:
        """Claimable jobs due now (counted up to `cap` + 1), the earliest next run of a claimable job and its
        name, and now."""
        with self._tx() as conn:
            count, earliest, name, now = conn.execute(sql.due_backlog(self.clock.now, cap)).one()
        return int(count), earliest, name, now

    def _counted_runs(self, statements: tuple[Any, Any]) -> tuple[int, list[RunRecord]]:
        count, listed = statements
        with self._tx() as conn:
            total = int(conn.execute(count).scalar_one())
            runs = [RunRecord.from_row(row) for row in conn.execute(listed).all()]
        return total, runs

    def active_runs(self, cap: int, limit: int) -> tuple[int, list[RunRecord]]:
        """The queued and running runs: how many (up to `cap` + 1), and the `limit` most recently claimed."""
        return self._counted_runs(sql.active_runs(cap, limit))

    def stalled_runs(self, cap: int, limit: int) -> tuple[int, list[RunRecord]]:
        """Active runs past their interrupt threshold, not interrupted yet (no beat's monitor got to them)."""
        threshold = self.interrupt_threshold.total_seconds()
        return self._counted_runs(sql.stalled_runs(self.clock.now, threshold, cap, limit))

    def failures_since(self, since: dt.timedelta, cap: int, limit: int) -> tuple[int, list[RunRecord]]:
        """Runs that ended failed (or interrupted stalled or expired) within `since`: how many, the latest."""
        return self._counted_runs(sql.failures_since(self.clock.now, since.total_seconds(), cap, limit))

    def active_by_status(self) -> dict[str, int]:
        """The queued and the running runs, counted by status (the statuses with none are left out)."""
        with self._tx() as conn:
            return {str(status): int(count) for status, count in conn.execute(sql.active_by_status()).all()}

    def database_now(self) -> dt.datetime:
        with self._tx() as conn:
            return self._db_now(conn)

    def ping(self) -> None:
        with self._tx() as conn:
            conn.execute(sql.ping())

    def watch_frame(self, job_name: str | None = None, *, active_limit: int = 30, recent_limit: int = 15) -> WatchFrame:
        """What `dbsched watch` shows at one refresh, in one transaction of four bounded, indexed statements:
        the database's time, the server rows, the oldest `active_limit` active runs, the latest `recent_limit`
        ended runs (of `job_name` when given)."""
        with self._tx() as conn:
            now = self._db_now(conn)
            servers = list(conn.execute(sql.servers(SERVER_LIMIT)).all())
            rows = conn.execute(sql.watch_active_runs(job_name, active_limit + 1)).all()
            recent = [RunRecord.from_row(row) for row in conn.execute(sql.watch_recent_runs(job_name, recent_limit))]
        active = [
            WatchRun(RunRecord.from_row(row), delta_of(row.job_interrupt_threshold) or self.interrupt_threshold)
            for row in rows[:active_limit]
        ]
        return WatchFrame(now, servers, active, len(rows) > active_limit, recent)

    # -- the dashboard's reads (celery_dbsched.web) ------------------------------------------------------

    def jobs_page(
        self,
        *,
        search: str | None = None,
        state: str | None = None,
        sort: str = "name",
        descending: bool = False,
        after: Sequence[Any] | None = None,
        limit: int = 50,
        late_after: dt.timedelta = dt.timedelta(minutes=1),
    ) -> list[JobRecord]:
        """One page of jobs (`statements.jobs_page`): ValueError for an unknown state or sort."""
        if state is not None and state not in sql.JOB_FILTERS:
            raise ValueError(f"unknown job state {state!r}; one of {', '.join(sql.JOB_FILTERS)}")
        if sort not in sql.JOB_SORTS:
            raise ValueError(f"unknown sort {sort!r}; one of {', '.join(sql.JOB_SORTS)}")
        statement = sql.jobs_page(
            self.clock.now,
            search=search,
            state=state,
            sort=sort,
            descending=descending,
            after=after,
            limit=limit,
            late_after=late_after.total_seconds(),
        )
        with self._tx() as conn:
            return [JobRecord.from_row(row) for row in conn.execute(statement).all()]

    def recent_runs(self, names: Sequence[str], per_job: int = 20) -> dict[str, list[RunSummary]]:
        """The latest `per_job` runs of each named job, newest first, by job name (one bounded query)."""
        found: dict[str, list[RunSummary]] = {name: [] for name in names}
        if not names:
            return found
        with self._tx() as conn:
            rows = conn.execute(sql.recent_runs_of(self.dialect, names, per_job)).all()
        for run in sorted(map(RunSummary.from_row, rows), key=lambda run: -run.id):
            found[run.job_name].append(run)
        return found

    def active_runs_of(self, job_name: str | None = None, limit: int = 200) -> list[RunRecord]:
        """Queued and running runs (of one job), newest first, at most `limit`."""
        with self._tx() as conn:
            return [RunRecord.from_row(row) for row in conn.execute(sql.active_runs_of(job_name, limit)).all()]

    def runs_page(
        self,
        *,
        job_name: str | None = None,
        status: str | None = None,
        worker: str | None = None,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        before: int | None = None,
        limit: int = 50,
        ended_only: bool = False,
    ) -> RunsPage:
        """One page of runs, newest first, older than run id `before` (`statements.runs_page`), and the `before`
        of the next page. Filtered by a worker or a time (no index serves those), a page scans at most
        RUNS_SCAN_WINDOW run ids: it may hold fewer than `limit` runs, or none, and still have a next page.
        `ended_only` leaves out the queued and running runs (a page that shows them live, apart)."""
        if status is not None and status not in set(RunState):
            raise ValueError(f"unknown run status {status!r}; one of {', '.join(RunState)}")
        floor: int | None = None
        with self._tx() as conn:
            if any(value is not None for value in (worker, since, until)):
                newest, oldest = conn.execute(sql.run_id_range()).one()
                top = before if before is not None else (newest or 0) + 1
                floor = max(top - RUNS_SCAN_WINDOW, oldest or 0)
            statement = sql.runs_page(
                job_name=job_name,
                status=status,
                worker=worker,
                since=since,
                until=until,
                before=before,
                at_least=floor,
                limit=limit + 1,
                ended_only=ended_only,
            )
            runs = [RunRecord.from_row(row) for row in conn.execute(statement).all()]
        if len(runs) > limit:
            return RunsPage(runs[:limit], runs[limit - 1].id)
        return RunsPage(runs, floor if floor is not None and floor > (oldest or 0) else None)

    def edit_job(self, name: str, **replaced: Any) -> JobRecord:
        """An operator's edit of a stored job's schedule and policies (`JobDefinition` fields), stored as a
        registration stores it (a changed schedule moves the next run to its next slot) and recorded as
        overrides of the code's values: the next sync of the job keeps them (`records.synced_values`) until
        `revert_job`. JobNotFound when there is no such job."""
        return self._edit(
            name, lambda row: edited_values(row, definition_values(definition_of(JobRecord.from_row(row), **replaced)))
        )

    def revert_job(self, name: str) -> JobRecord:
        """Drop an operator's edits of a job: its edited fields get the code's values again (as its last sync
        stored them). JobNotFound when there is no such job."""
        return self._edit(name, reverted_values)

    def _edit(self, name: str, values_over: Callable[[Row[Any]], Mapping[str, Any]]) -> JobRecord:
        with self._tx() as conn:
            row = conn.execute(sql.locked_job(self.dialect, name)).first()
            if row is None:
                raise JobNotFound(name)
            return self._store_over(conn, row, values_over(row), self._db_now(conn))
