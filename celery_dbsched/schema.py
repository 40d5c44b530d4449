"""Table definitions and the SQL constructs that keep PostgreSQL, MySQL/MariaDB and SQLite in step.

Every persisted time comes from the database clock (design §1), so time arithmetic is done in SQL through
`db_now(offset)`; SQLite has no timestamp type, so times are stored there as fixed-width UTC text that sorts
like the time it names. MySQL/MariaDB store them as DATETIME(6) in UTC (the engine sets the session time
zone to UTC), and have no partial index: revisions 0001 onward build its stand-ins (`dialects`).
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    and_,
    false,
    true,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from .engine import MYSQL_BACKENDS, is_mysql
from .states import ACTIVE, InterruptReason, JobKind, Misfire, Origin, RunState

NAME_MAX_LENGTH = 128
QUEUE_MAX_LENGTH = 255

UTC = dt.timezone.utc


def _one_of(column: str, values: type[enum.Enum]) -> str:
    """`column in ('a', 'b')` over an enum's values: the text of a CHECK constraint (the values hold no quote)."""
    return f"{column} in ({', '.join(repr(str(member.value)) for member in values)})"


# Seconds (thresholds, delays, backoffs): a double everywhere. MySQL's FLOAT is single precision.
Seconds = Float().with_variant(mysql.DOUBLE(asdecimal=False), *MYSQL_BACKENDS)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """An aware UTC datetime: `timestamptz` on PostgreSQL, DATETIME(6) in UTC on MySQL/MariaDB, sortable
    naive-UTC text on SQLite."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        if is_mysql(dialect.name):
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(self.impl)

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are not stored; pass an aware datetime")
        if dialect.name == "sqlite" or is_mysql(dialect.name):
            return value.astimezone(UTC).replace(tzinfo=None)
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if isinstance(value, str):  # a time computed in SQL on SQLite
            value = dt.datetime.fromisoformat(value)
        assert isinstance(value, dt.datetime)
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class db_now(FunctionElement[dt.datetime]):
    """The database's current time, optionally plus an offset in seconds (a number or an SQL expression)."""

    type = UTCDateTime()
    inherit_cache = True
    name = "db_now"


@compiles(db_now, "postgresql")
def _db_now_postgresql(element: db_now, compiler: SQLCompiler, **kw: Any) -> str:
    clauses = list(element.clauses)
    # statement_timestamp(), not now(): now() is when the transaction began, and a claim that runs after
    # another statement in its transaction must not stamp a time from before a run it saw end.
    if not clauses:
        return "statement_timestamp()"
    return f"(statement_timestamp() + make_interval(secs => {compiler.process(clauses[0], **kw)}))"


@compiles(db_now, "sqlite")
def _db_now_sqlite(element: db_now, compiler: SQLCompiler, **kw: Any) -> str:
    # Six fractional digits, the same text SQLAlchemy writes for a bound datetime, so strings compare as times.
    clauses = list(element.clauses)
    if not clauses:
        return "strftime('%Y-%m-%d %H:%M:%f000', 'now')"
    offset = compiler.process(clauses[0], **kw)
    return f"strftime('%Y-%m-%d %H:%M:%f000', 'now', printf('%+.3f seconds', {offset}))"


def _mysql_plus_seconds(base: str, offset: str) -> str:
    # Whole microseconds: INTERVAL n SECOND would round a fraction to a whole second on MySQL.
    return f"({base} + INTERVAL ROUND(({offset}) * 1000000) MICROSECOND)"


@compiles(db_now, "mysql")
@compiles(db_now, "mariadb")
def _db_now_mysql(element: db_now, compiler: SQLCompiler, **kw: Any) -> str:
    # NOW(6): the statement's start, with microseconds, in the session's time zone (UTC: engine.py).
    clauses = list(element.clauses)
    if not clauses:
        return "NOW(6)"
    return _mysql_plus_seconds("NOW(6)", compiler.process(clauses[0], **kw))


class db_time_at(FunctionElement[dt.datetime]):
    """A given time plus an offset in seconds, computed like `db_now` (used when a test freezes the clock)."""

    type = UTCDateTime()
    inherit_cache = True
    name = "db_time_at"


@compiles(db_time_at, "postgresql")
def _db_time_at_postgresql(element: db_time_at, compiler: SQLCompiler, **kw: Any) -> str:
    base, offset = (compiler.process(clause, **kw) for clause in element.clauses)
    return f"(CAST({base} AS timestamptz) + make_interval(secs => {offset}))"


@compiles(db_time_at, "sqlite")
def _db_time_at_sqlite(element: db_time_at, compiler: SQLCompiler, **kw: Any) -> str:
    base, offset = (compiler.process(clause, **kw) for clause in element.clauses)
    return f"strftime('%Y-%m-%d %H:%M:%f000', {base}, printf('%+.3f seconds', {offset}))"


@compiles(db_time_at, "mysql")
@compiles(db_time_at, "mariadb")
def _db_time_at_mysql(element: db_time_at, compiler: SQLCompiler, **kw: Any) -> str:
    base, offset = (compiler.process(clause, **kw) for clause in element.clauses)
    return _mysql_plus_seconds(f"CAST({base} AS DATETIME(6))", offset)


class least(FunctionElement[dt.datetime]):
    """The earlier of two times (`least` on PostgreSQL, scalar `min` on SQLite)."""

    type = UTCDateTime()
    inherit_cache = True
    name = "least"


@compiles(least, "postgresql")
def _least_postgresql(element: least, compiler: SQLCompiler, **kw: Any) -> str:
    return f"least({compiler.process(element.clauses, **kw)})"


@compiles(least, "mysql")
@compiles(least, "mariadb")
def _least_mysql(element: least, compiler: SQLCompiler, **kw: Any) -> str:
    # NULL when any is NULL, as SQLite's min(); statements coalesce where a NULL may come.
    return f"least({compiler.process(element.clauses, **kw)})"


@compiles(least, "sqlite")
def _least_sqlite(element: least, compiler: SQLCompiler, **kw: Any) -> str:
    return f"min({compiler.process(element.clauses, **kw)})"


metadata = MetaData()

job_table = Table(
    "dbsched_job",
    metadata,
    Column("name", String(NAME_MAX_LENGTH), primary_key=True),
    Column("description", Text, nullable=False),
    Column("next_scheduled_run", UTCDateTime, nullable=False),
    # Seconds; the delay used when the job gives none (decorator `every`, class attribute `every`).
    Column("default_next_run_in", Seconds, nullable=True),
    Column("queue", String(QUEUE_MAX_LENGTH), nullable=True),
    Column("interrupt_threshold", Seconds, nullable=True),  # seconds; NULL: the global setting
    Column("failure_count", Integer, nullable=False, server_default="0"),
    Column("enabled", Boolean, nullable=False, server_default=true()),
    Column("create_time", UTCDateTime, nullable=False),
    Column("update_time", UTCDateTime, nullable=False),
    # Added by revision 0002 (schedules, beat_schedule entries, per-job policies):
    Column("kind", String(16), nullable=False, server_default=JobKind.JOB.value),
    Column("schedule", Text, nullable=True),  # JSON spec (celery_dbsched.schedules); NULL: delay-driven
    Column("task", String(255), nullable=True),  # kind "task": the Celery task to send
    Column("task_args", Text, nullable=True),  # JSON
    Column("task_kwargs", Text, nullable=True),  # JSON
    Column("task_options", Text, nullable=True),  # JSON: queue, routing_key, priority, expires, headers
    Column("misfire", String(16), nullable=False, server_default=Misfire.RUN_ONCE.value),
    Column("misfire_grace", Seconds, nullable=True),  # seconds
    Column("max_active", Integer, nullable=False, server_default="1"),
    Column("retry_backoff_base", Seconds, nullable=True),  # seconds; NULL: the global setting
    Column("retry_backoff_cap", Seconds, nullable=True),
    Column("expires", Seconds, nullable=True),  # seconds after its slot a queued run may still start
    Column("paused", Boolean, nullable=False, server_default=false()),
    # The slot a failed run was for, while it is retried: retries are late runs of that slot, so the job's
    # cadence stays on its grid (NULL when not retrying).
    Column("retry_slot", UTCDateTime, nullable=True),
    # Added by revision 0003: the job's queued and running runs that hold a slot, counted by triggers on the
    # runs table (never written by this code), so that "claimable" is a condition on the job row alone.
    Column("active_runs", Integer, nullable=False, server_default="0"),
    # Added by revision 0006: when a worker last started with this `@job` in its code (NULL: none since 0006);
    # a job no worker registered for a while is orphaned (`JobRepository.orphaned_jobs`).
    Column("registered_time", UTCDateTime, nullable=True),
    # Added by revision 0007: an operator's edits (the dashboard), JSON {"column": {"code": .., "edited": ..}};
    # a sync keeps them over the code's values (records.synced_values). NULL: none.
    Column("overrides", Text, nullable=True),
    # Added by revision 0008 (issue 13, schedules at run time): who owns the job (states.Origin; backfilled from
    # `kind`), django-celery-beat's `one_off` (disabled once a run of it is claimed) and absolute `expires` (no
    # slot after it is claimed; disabled when its next slot would be past it).
    Column("origin", String(16), nullable=False, server_default=Origin.CODE.value),
    Column("one_off", Boolean, nullable=False, server_default=false()),
    Column("expire_time", UTCDateTime, nullable=True),
    CheckConstraint("length(name) > 0", name="dbsched_job_name_not_empty"),
)
# An enabled, unpaused job with a free slot. The due index holds only such jobs: claims and the idle tick's
# "when is the next job due" are range scans over what can be claimed, however many jobs are running.
claimable = and_(job_table.c.enabled, ~job_table.c.paused, job_table.c.active_runs < job_table.c.max_active)
Index(
    "dbsched_job_claimable",
    job_table.c.next_scheduled_run,
    job_table.c.name,
    postgresql_where=claimable,
    sqlite_where=claimable,
)
_skip = job_table.c.misfire == Misfire.SKIP
Index("dbsched_job_misfire_skip", job_table.c.next_scheduled_run, postgresql_where=_skip, sqlite_where=_skip)

run_table = Table(
    "dbsched_job_run",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column(
        "job_name",
        String(NAME_MAX_LENGTH),
        ForeignKey("dbsched_job.name", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("status", String(16), nullable=False),
    Column("queue", String(QUEUE_MAX_LENGTH), nullable=True),
    Column("claimed_by", String(255), nullable=False),
    Column("worker", String(255), nullable=True),
    Column("task_id", String(255), nullable=True),
    Column("completed", Integer, nullable=False, server_default="0"),
    Column("total", Integer, nullable=False, server_default="0"),
    Column("error", Text, nullable=True),
    # A pull-in asked for while the run was active; honoured when the run ends (design §6).
    Column("requested_next_run", UTCDateTime, nullable=True),
    Column("create_time", UTCDateTime, nullable=False),
    Column("start_time", UTCDateTime, nullable=True),
    Column("update_time", UTCDateTime, nullable=False),
    Column("end_time", UTCDateTime, nullable=True),
    # Added by revision 0002:
    Column("kind", String(16), nullable=False, server_default=JobKind.JOB.value),
    Column("slot", Integer, nullable=False, server_default="0"),  # 0..max_active-1 while active
    Column("scheduled_for", UTCDateTime, nullable=True),  # the job's due time this run was claimed for
    # Added by revision 0005: why an interrupted run was interrupted (NULL for every other state).
    Column("interrupt_reason", String(16), nullable=True),
    # Added by revision 0006: when the code of a run interrupted under its worker actually returned.
    Column("stopped_time", UTCDateTime, nullable=True),
    CheckConstraint(_one_of("status", RunState), name="dbsched_job_run_status_valid"),
    CheckConstraint(_one_of("interrupt_reason", InterruptReason), name="dbsched_job_run_interrupt_reason_valid"),
    CheckConstraint("completed >= 0 and total >= 0 and completed <= total", name="dbsched_job_run_progress_valid"),
    sqlite_autoincrement=True,  # run ids are never reused after pruning: a late message never names a newer run
)
_active = run_table.c.status.in_(ACTIVE)
# design §2: the database, not a process, guarantees one active run per job (per slot, for jobs that opt
# into max_active > 1).
Index(
    "dbsched_job_run_active_slot",
    run_table.c.job_name,
    run_table.c.slot,
    unique=True,
    postgresql_where=_active,
    sqlite_where=_active,
)
Index(
    "dbsched_job_run_active_update",
    run_table.c.update_time,
    postgresql_where=_active,
    sqlite_where=_active,
)
Index("dbsched_job_run_job", run_table.c.job_name, run_table.c.id)
Index("dbsched_job_run_end", run_table.c.end_time)
# Added by revision 0007: the history filtered by a status (the runs page, `dbsched runs --status`), newest
# first, without walking the id index past the runs of the other states.
Index("dbsched_job_run_status", run_table.c.status, run_table.c.id)

# Added by revision 0004: what a bulk sync last wrote, so that a beat starting with an unchanged
# `beat_schedule` costs one read, not a comparison of every entry (celery_dbsched.beat_schedule).
sync_table = Table(
    "dbsched_sync",
    metadata,
    Column("key", String(64), primary_key=True),  # what was synced, e.g. "beat_schedule"
    Column("fingerprint", String(64), nullable=True),  # sha256 of what the code declared; NULL: never synced
    Column("job_count", Integer, nullable=False, server_default="0"),  # jobs of the synced kind afterwards
    Column("update_time", UTCDateTime, nullable=False),
)

server_table = Table(
    "dbsched_server",
    metadata,
    Column("id", String(255), primary_key=True),
    Column("kind", String(16), nullable=False),  # "worker" or "beat"
    Column("hostname", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("start_time", UTCDateTime, nullable=False),
    Column("last_seen", UTCDateTime, nullable=False),
    # Added by revision 0007 (what `dbsched status` shows; celery_dbsched.observe reads them):
    Column("version", String(64), nullable=True),  # the celery_dbsched version the process runs
    # Seconds between two heartbeats of this process at most: it is silent once 3 of them were missed.
    Column("heartbeat_interval", Seconds, nullable=True),
    # Beats, over the minute before the heartbeat: runs claimed, and the claim lag (claimed at minus the slot
    # the run was claimed for) in seconds, median and maximum (NULL: nothing claimed). Kept by the beat in
    # memory from the runs it claimed, written with its heartbeat: no statement per claim, no read of runs.
    Column("claims_last_minute", Integer, nullable=True),
    Column("claim_lag_p50", Seconds, nullable=True),
    Column("claim_lag_max", Seconds, nullable=True),
    # Workers: their runs `running` when the heartbeat was written (counted over the active runs only).
    Column("runs_in_flight", Integer, nullable=True),
)
Index("dbsched_server_last_seen", server_table.c.last_seen)
