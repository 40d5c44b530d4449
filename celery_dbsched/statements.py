"""Every SQL statement of celery_dbsched, built by pure functions named for what they do.

A function takes what the statement needs (the dialect's name, `now`: the clock expression builder of the
repository, and the values) and returns a SQLAlchemy statement; nothing here connects or executes. A
difference between dialects (PostgreSQL, MySQL/MariaDB, SQLite) is decided in the one function that builds the
statement. MySQL/MariaDB have no UPDATE ... RETURNING: the repository runs those as a locking read, the
update, and a read (`JobRepository._tx`); and a statement that writes the runs table must not read the job
table there (the active-run triggers write it: MySQL error 1442), so the claim is two statements on MySQL.
Times are computed by the database (`now`), never by this host.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
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
    delete,
    exists,
    func,
    literal,
    or_,
    select,
    text,
    true,
    tuple_,
    update,
)
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.sql import Select
from sqlalchemy.sql.base import Executable
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.types import TypeEngine

from .engine import is_mysql
from .schema import UTCDateTime, claimable, db_time_at, job_table, least, run_table, server_table, sync_table
from .settings import DEFAULT_MISFIRE_GRACE
from .states import ACTIVE, FINAL, InterruptReason, JobKind, Misfire, Origin, RunState

WAKEUP_CHANNEL = "dbsched_wakeup"
ERROR_TEXT_LIMIT = 10_000
# A finishing statement that finds its job's cadence changed under it (a re-registration committed while it
# ran) stops itself with this text, so that nothing it wrote is kept, and the finish is done again the long way.
RECHECK = "celery_dbsched: job changed while finishing"
# The facts of a job that a one-statement finish is computed from (returned by the start statement).
FINISH_FACTS = ("schedule", "default_next_run_in", "kind", "max_active", "retry_backoff_base", "retry_backoff_cap")
EXPIRED_ERROR = f"{InterruptReason.EXPIRED}: not started before its slot + expires"

j, r, s = job_table, run_table, server_table


class Now(Protocol):
    """The database's clock (plus `offset` seconds), as an SQL expression: `Clock.now` (the repository's clock)."""

    def __call__(self, offset: float | ColumnElement[Any] | None = None) -> ColumnElement[dt.datetime]: ...


def _is_postgres(dialect: str) -> bool:
    return dialect == "postgresql"


def insert(dialect: str, table: Any) -> Any:
    """An INSERT of the dialect (for ON CONFLICT / ON DUPLICATE KEY)."""
    if is_mysql(dialect):
        return mysql.insert(table)
    return (postgresql.insert if _is_postgres(dialect) else sqlite.insert)(table)


def insert_ignoring_conflicts(dialect: str, table: Any) -> Any:
    """An INSERT that skips the rows a unique index refuses (ON CONFLICT DO NOTHING; INSERT IGNORE on MySQL,
    whose RETURNING then returns the rows inserted only)."""
    if is_mysql(dialect):
        return mysql.insert(table).prefix_with("IGNORE")
    return insert(dialect, table).on_conflict_do_nothing()


def error_text(error: str) -> str:
    """A run's error as stored: PostgreSQL text cannot hold NUL, and an exception message may (the run must
    still end), and a huge one is cut."""
    return error.replace("\x00", "\\x00")[:ERROR_TEXT_LIMIT]


def interrupted(now: Now, reason: InterruptReason, error: Any) -> dict[str, Any]:
    """The values that end a run `interrupted`: its reason in its own column, and the error text for people
    (which starts with the reason, as it always has)."""
    return {"status": RunState.INTERRUPTED, "interrupt_reason": reason, "end_time": now(), "error": error}


def _status_is(states: Sequence[RunState]) -> ColumnElement[bool]:
    """`status IN (...)` for a fixed set of states, without the expanding parameter that `in_` renders
    (processed again at every execution of a statement built once)."""
    return or_(*(r.c.status == state for state in states))


def _lock(dialect: str, query: Select[Any]) -> Select[Any]:
    """`FOR UPDATE` on PostgreSQL and MySQL; SQLite transactions hold the database's write lock from their start."""
    return query if dialect == "sqlite" else query.with_for_update()


# -- lists as one bound parameter ----------------------------------------------------------------------------
# A list of bound parameters would grow with N, and PostgreSQL refuses more than 65,535 a statement (SQLite
# 32,766): a list travels as ONE parameter, an array on PostgreSQL, a JSON text on SQLite. PyMySQL binds on
# the client (no server-side parameters, no such bound): on MySQL a list is an expanding IN.


def values_of(dialect: str, values: Iterable[Any], of: Any) -> Any:
    """`SELECT value` over `values` (one JSON array parameter), for `of.in_(...)` / `not_in(...)`."""
    if is_mysql(dialect):
        return bindparam(None, list(values), expanding=True, type_=of.type)
    payload = literal(json.dumps(list(values)), String)
    if _is_postgres(dialect):
        elements = func.json_array_elements_text(cast(payload, JSON)).table_valued("value")
    else:
        elements = func.json_each(payload).table_valued("value")
    return select(cast(elements.c.value, of.type))


def in_ids(dialect: str, of: Any, ids: Sequence[int]) -> ColumnElement[bool]:
    """`of IN (ids)`: `= ANY(array)` on PostgreSQL, a JSON list on SQLite, an expanding IN on MySQL."""
    if is_mysql(dialect):
        return of.in_(values_of(dialect, ids, of))  # type: ignore[no-any-return]
    if _is_postgres(dialect):
        result: ColumnElement[bool] = of == any_(literal(list(ids), postgresql.ARRAY(BigInteger)))
        return result
    values = func.json_each(literal(json.dumps(list(ids)), String)).table_valued("value")
    return of.in_(select(values.c.value).scalar_subquery())  # type: ignore[no-any-return]


_SQLITE = sqlite.dialect()


def _sqlite_value(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        to_text = UTCDateTime().bind_processor(_SQLITE)
        assert to_text is not None
        return str(to_text(value))
    return value


def pairs(dialect: str, rows: Sequence[tuple[Any, Any]], types: tuple[TypeEngine[Any], TypeEngine[Any]]) -> Any:
    """(first, second) pairs as one parameter, as two column expressions of a table to join on: two arrays
    `unnest`ed side by side on PostgreSQL (`types`: their elements'), one JSON list of pairs on SQLite."""
    if _is_postgres(dialect):
        table = (
            func.unnest(
                literal([first for first, _ in rows], postgresql.ARRAY(types[0])),
                literal([second for _, second in rows], postgresql.ARRAY(types[1])),
            )
            .table_valued("first", "second")
            .render_derived(name="pairs")
        )
        return table.c.first, table.c.second
    data = json.dumps([[_sqlite_value(first), _sqlite_value(second)] for first, second in rows])
    values = func.json_each(literal(data, String)).table_valued("value")
    return func.json_extract(values.c.value, "$[0]"), func.json_extract(values.c.value, "$[1]")


# -- jobs ----------------------------------------------------------------------------------------------------


def job(name: str) -> Select[Any]:
    return select(j).where(j.c.name == name)


def locked_job(dialect: str, name: str) -> Select[Any]:
    """The job's row, held until commit (a concurrent claim or finish of it waits)."""
    return _lock(dialect, job(name))


def jobs(dialect: str, names: Iterable[str]) -> Select[Any]:
    return select(j).where(j.c.name.in_(values_of(dialect, names, j.c.name)))


def all_jobs(origin: Origin | None = None) -> Select[Any]:
    query = select(j).order_by(j.c.name)
    return query if origin is None else query.where(j.c.origin == origin)


def insert_job(dialect: str, name: str, first: dt.datetime, now: dt.datetime, values: Mapping[str, Any]) -> Any:
    """A new job (nothing when another process inserted it meanwhile); returns its row."""
    row = {"name": name, "next_scheduled_run": first, "create_time": now, "update_time": now, **values}
    return insert_ignoring_conflicts(dialect, j).values(**row).returning(*j.c)


def update_job(name: str, changed: Mapping[str, Any]) -> Any:
    return update(j).where(j.c.name == name).values(**changed).returning(*j.c)


def wakeup_channel() -> ColumnElement[str]:
    """The LISTEN/NOTIFY channel of the beats of this schema (PostgreSQL): `WAKEUP_CHANNEL`, `_` and a hash of
    the current schema. A channel is per database, so deployments that share a database in schemas of their
    own never wake each other. Computed by the server, for the sender and the listener alike."""
    schema = func.convert_to(func.coalesce(func.current_schema(), ""), "UTF8")
    return func.concat(f"{WAKEUP_CHANNEL}_", func.left(func.encode(func.sha256(schema), "hex"), 16))


def notify(name: Any) -> Select[Any]:
    """Wake the sleeping beats of this schema (PostgreSQL NOTIFY, sent at commit)."""
    return select(func.pg_notify(wakeup_channel(), name))


def count_jobs(origin: Origin | None) -> Select[Any]:
    count = select(func.count()).select_from(j)
    return count if origin is None else count.where(j.c.origin == origin)


def sync_state(source: str, origin: Origin | None) -> Select[Any]:
    """The fingerprint and job count the last sync of `source` stored, and the jobs of `origin` now."""
    return select(sync_table.c.fingerprint, sync_table.c.job_count, count_jobs(origin).scalar_subquery()).where(
        sync_table.c.key == source
    )


def add_source(dialect: str, now: Now, source: str) -> Any:
    return insert_ignoring_conflicts(dialect, sync_table).values(
        key=source, fingerprint=None, job_count=0, update_time=now()
    )


def locked_source(dialect: str, source: str) -> Select[Any]:
    return _lock(dialect, select(sync_table.c.fingerprint, sync_table.c.job_count).where(sync_table.c.key == source))


def store_fingerprint(source: str, fingerprint: str | None, job_count: int, now: dt.datetime) -> Any:
    return (
        update(sync_table)
        .where(sync_table.c.key == source)
        .values(fingerprint=fingerprint, job_count=job_count, update_time=now)
    )


def jobs_to_sync(dialect: str, names: Iterable[str], origin: Origin | None) -> Select[Any]:
    """The rows of the named jobs and (with `origin`) every enabled job of that origin."""
    condition: ColumnElement[bool] = j.c.name.in_(values_of(dialect, names, j.c.name))
    if origin is not None:
        condition = or_(condition, and_(j.c.origin == origin, j.c.enabled))
    return select(j).where(condition)


def _json_time(value: object) -> str:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    raise TypeError(f"not JSON: {value!r}")


def insert_jobs(dialect: str, rows: Sequence[Mapping[str, Any]]) -> tuple[Any, list[Mapping[str, Any]] | None]:
    """New jobs, skipping those another process inserted first: the statement and its executemany rows (None:
    the rows are in the statement, which returns the names it inserted)."""
    if not _is_postgres(dialect):
        # Under SQLite's write lock nobody else inserts meanwhile; executemany binds ~25 values a row. MySQL:
        # INSERT IGNORE, executemany (PyMySQL sends it as one multi-row INSERT); a row another process inserted
        # first is skipped, and found again as a candidate by the caller's compare.
        return insert_ignoring_conflicts(dialect, j), list(rows)
    # One JSON parameter per chunk: libpq would otherwise parse a statement of ~25 placeholders a row.
    columns = list(rows[0])
    records = func.json_to_recordset(cast(literal(json.dumps(rows, default=_json_time), String), JSON))
    source = records.table_valued(*(column(name, j.c[name].type) for name in columns)).render_derived(
        name="new_job", with_types=True
    )
    stmt = insert(dialect, j).from_select(columns, select(*source.c)).on_conflict_do_nothing()
    return stmt.returning(j.c.name), None


def locked_jobs(dialect: str, names: Iterable[str]) -> Select[Any]:
    return _lock(dialect, jobs(dialect, names))


def update_jobs_by_name() -> Any:
    """Executemany: each parameter set is a job's `b_name` and the values it changes."""
    return update(j).where(j.c.name == bindparam("b_name"))


def disable_jobs(dialect: str, names: Iterable[str], origin: Origin, now: dt.datetime) -> Any:
    return (
        update(j)
        .where(j.c.name.in_(values_of(dialect, names, j.c.name)), j.c.origin == origin, j.c.enabled)
        .values(enabled=False, update_time=now)
        .returning(j.c.name)
    )


def disable_jobs_not_in(dialect: str, now: Now, kind: JobKind, names: Iterable[str]) -> Any:
    return (
        update(j)
        .where(
            j.c.kind == kind,
            j.c.origin != Origin.RUNTIME,
            j.c.enabled,
            j.c.name.not_in(values_of(dialect, names, j.c.name)),
        )
        .values(enabled=False, update_time=now())
        .returning(j.c.name)
    )


def disable_named(dialect: str, now: Now, names: Iterable[str]) -> Any:
    """Disable the named jobs (the names as one parameter)."""
    return update(j).where(j.c.name.in_(values_of(dialect, names, j.c.name))).values(enabled=False, update_time=now())


def pull_in_job(name: str, wanted: ColumnElement[dt.datetime]) -> Any:
    return (
        update(j)
        .where(j.c.name == name)
        .values(next_scheduled_run=least(wanted, j.c.next_scheduled_run))
        .returning(*j.c)
    )


def pull_in_active_runs(name: str, wanted: ColumnElement[dt.datetime]) -> Any:
    """Kept on the job's active runs and honoured when they end (design §6)."""
    requested = least(func.coalesce(r.c.requested_next_run, wanted), wanted)
    return update(r).where(r.c.job_name == name, r.c.status.in_(ACTIVE)).values(requested_next_run=requested)


def next_due(now: Now) -> Select[Any]:
    """The earliest claimable job's next run, and now: one indexed query."""
    return (
        select(j.c.next_scheduled_run, now().label("now"))
        .where(claimable)
        .order_by(j.c.next_scheduled_run, j.c.name)
        .limit(1)
    )


def set_next_runs(dialect: str, slots: Sequence[tuple[str, dt.datetime]]) -> Any:
    """`next_scheduled_run` of many jobs in one statement, with the (name, time) pairs as one parameter."""
    if len(slots) == 1:
        return update(j).where(j.c.name == slots[0][0]).values(next_scheduled_run=slots[0][1])
    if is_mysql(dialect):
        by_name = case({name: literal(when, UTCDateTime()) for name, when in slots}, value=j.c.name)
        return (
            update(j)
            .where(j.c.name.in_(values_of(dialect, [name for name, _ in slots], j.c.name)))
            .values(next_scheduled_run=by_name)
        )
    name, slot = pairs(dialect, slots, (String(), postgresql.TIMESTAMP(timezone=True)))
    return update(j).where(j.c.name == name).values(next_scheduled_run=slot)


def set_paused(name: str, values: Mapping[str, Any]) -> Any:
    return update(j).where(j.c.name == name).values(**values).returning(*j.c)


# -- runs: claiming --------------------------------------------------------------------------------------------


def _slot_to_take() -> ColumnElement[int]:
    """The slot a claimed run takes: 0, or for `max_active` > 1 with slot 0 taken, the lowest free one."""
    slot_taken = exists().where(r.c.job_name == j.c.name, r.c.status.in_(ACTIVE), r.c.slot == 0)
    r2 = run_table.alias("r2")
    next_free = (
        select(func.min(r.c.slot + 1))
        .where(
            r.c.job_name == j.c.name,
            r.c.status.in_(ACTIVE),
            ~exists().where(r2.c.job_name == r.c.job_name, r2.c.status.in_(ACTIVE), r2.c.slot == r.c.slot + 1),
        )
        .correlate(j)
        .scalar_subquery()
    )
    return case((j.c.max_active == 1, 0), (~slot_taken, 0), else_=next_free)


_CLAIM_COLUMNS = (
    "job_name", "status", "queue", "claimed_by", "create_time", "update_time", "kind", "slot", "scheduled_for",
)  # fmt: skip


def _due_to_claim(now: Now, server_id: str, limit: int) -> Select[Any]:
    """The values of a `queued` run (`_CLAIM_COLUMNS`) for each of up to `limit` due jobs, earliest due first."""
    at = now()
    return (
        select(
            j.c.name,
            literal(RunState.QUEUED, String),
            j.c.queue,
            literal(server_id, String),
            at,
            at,
            j.c.kind,
            _slot_to_take(),
            func.coalesce(j.c.retry_slot, j.c.next_scheduled_run),
        )
        .where(
            j.c.next_scheduled_run <= at,
            claimable,
            # No slot after a job's expire_time (the job is disabled when it gets there: _advance_claimed).
            or_(j.c.expire_time.is_(None), j.c.next_scheduled_run <= j.c.expire_time),
        )
        .order_by(j.c.next_scheduled_run, j.c.name)
        .limit(limit)
    )


def claim(dialect: str, now: Now, server_id: str, limit: int) -> Any:
    """A `queued` run for each of up to `limit` due jobs, earliest due first, then by name; returns the runs.
    On PostgreSQL the due jobs are read `FOR UPDATE SKIP LOCKED`: beats claiming at the same time take
    disjoint sets of jobs instead of waiting for each other's claim and then finding nothing left. (MySQL:
    `claim_due` then `insert_claims`.)"""
    due = _due_to_claim(now, server_id, limit)
    if _is_postgres(dialect):
        due = due.with_for_update(skip_locked=True, of=j)
    return insert_ignoring_conflicts(dialect, r).from_select(_CLAIM_COLUMNS, due).returning(*r.c)


def claim_due(now: Now, server_id: str, limit: int) -> Select[Any]:
    """MySQL/MariaDB, the claim's first statement: the due jobs' new runs as values, the jobs' rows locked
    (`FOR UPDATE SKIP LOCKED`, read as last committed: a job another beat is claiming is left to it). One
    statement cannot read the jobs and insert the runs there: the active-run trigger writes the job table."""
    return _due_to_claim(now, server_id, limit).with_for_update(skip_locked=True)


def insert_claims(dialect: str, due: Sequence[Row[Any]]) -> Any:
    """MySQL/MariaDB, the claim's second statement: the runs of `claim_due`'s rows, INSERT IGNORE ... RETURNING:
    a run the unique index of active runs refuses (another beat's) is skipped, never returned."""
    rows = [dict(zip(_CLAIM_COLUMNS, row, strict=True)) for row in due]
    return insert_ignoring_conflicts(dialect, r).values(rows).returning(*r.c)


def drop_stale_claims(dialect: str, ids: Sequence[int]) -> Any:
    """Delete the claimed runs whose slot is no longer their job's due slot; returns their ids."""
    return (
        delete(r)
        .where(
            in_ids(dialect, r.c.id, ids),
            ~exists().where(
                j.c.name == r.c.job_name,
                func.coalesce(j.c.retry_slot, j.c.next_scheduled_run) == r.c.scheduled_for,
            ),
        )
        .returning(r.c.id)
    )


def misfired(now: Now, limit: int) -> Select[Any]:
    """Claimable jobs with the `skip` misfire policy that are later than their grace."""
    grace = func.coalesce(j.c.misfire_grace, DEFAULT_MISFIRE_GRACE.total_seconds())
    return (
        select(j)
        .where(
            j.c.misfire == Misfire.SKIP,
            j.c.next_scheduled_run <= now(),  # a range on the (small) index of skip-policy jobs
            j.c.next_scheduled_run < now(-grace),
            claimable,
        )
        .limit(limit)
    )


def claimed_jobs_advancing(dialect: str, now: Now, ids: Sequence[int]) -> Select[Any]:
    """The jobs of the claimed runs `ids` that advance at claim, with the run's slot (`claimed_slot`) and now
    (`claimed_at`)."""
    return (
        select(j, r.c.scheduled_for.label("claimed_slot"), now().label("claimed_at"))
        .join(r, r.c.job_name == j.c.name)
        .where(in_ids(dialect, r.c.id, ids), or_(j.c.kind == JobKind.TASK, j.c.max_active > 1))
    )


# -- runs: transitions -----------------------------------------------------------------------------------------


def run(run_id: int) -> Select[Any]:
    return select(r).where(r.c.id == run_id)


def run_status() -> Select[Any]:
    return select(r.c.status).where(r.c.id == bindparam("run_id"))


def _started(at: ColumnElement[dt.datetime]) -> dict[str, Any]:
    """The values of a run that a worker starts (`run_worker`, `run_task_id`: bound at execution)."""
    return {
        "status": RunState.RUNNING,
        "worker": bindparam("run_worker"),
        "task_id": bindparam("run_task_id"),
        "start_time": at,
        "update_time": at,
    }


def start(now: Now) -> Any:
    """PostgreSQL, one statement: `queued -> running` unless expired (counted from the claim, as in
    `start_queued`), returning the run and its job's facts for the finish (`job_*`). Bound: `run_id`,
    `run_worker`, `run_task_id`."""
    at = now()
    return (
        update(r)
        .where(
            r.c.id == bindparam("run_id"),
            r.c.status == RunState.QUEUED,
            j.c.name == r.c.job_name,
            or_(j.c.expires.is_(None), r.c.create_time >= now(-j.c.expires)),
        )
        .values(**_started(at))
        .returning(
            *r.c,
            *(j.c[name].label(f"job_{name}") for name in FINISH_FACTS),
            j.c.failure_count.label("job_failure_count"),
        )
    )


def _job_expires() -> Any:
    return select(j.c.expires).where(j.c.name == r.c.job_name).scalar_subquery()


def start_queued(now: Now, run_id: int, worker: str, task_id: str | None) -> Any:
    """`queued -> running` unless the job `expires` and its slot + expires has passed."""
    expires = _job_expires()
    not_expired = or_(
        expires.is_(None),
        # Counted from the claim, which is the slot itself or, for a catch-up run after downtime, the moment
        # the slot was taken up: a catch-up run must not expire before it could start.
        r.c.create_time >= now(-expires),
    )
    at = now()
    return (
        update(r)
        .where(r.c.id == run_id, r.c.status == RunState.QUEUED, not_expired)
        .values(status=RunState.RUNNING, worker=worker, task_id=task_id, start_time=at, update_time=at)
        .returning(*r.c)
    )


def expire_queued(now: Now, run_id: int) -> Any:
    return (
        update(r)
        .where(r.c.id == run_id, r.c.status == RunState.QUEUED)
        .values(**interrupted(now, InterruptReason.EXPIRED, EXPIRED_ERROR))
        .returning(*r.c)
    )


def progress(now: Now) -> Any:
    """PostgreSQL: the write, or (when it matched nothing) the run as it was: why it did not apply, in one
    statement (`_written` says which). Bound: `run_id`, `p_completed`, `p_total`."""
    changed = or_(r.c.completed != bindparam("p_completed"), r.c.total != bindparam("p_total"))
    written = (
        update(r)
        .where(r.c.id == bindparam("run_id"), r.c.status == RunState.RUNNING, changed)
        .values(completed=bindparam("p_completed"), total=bindparam("p_total"), update_time=now())
        .returning(*r.c, true().label("_written"))
        .cte("written")
    )
    as_it_was = select(*r.c, literal(False).label("_written")).where(
        r.c.id == bindparam("run_id"), ~exists(select(written.c.id))
    )
    return select(written).union_all(as_it_was)


def set_progress(now: Now, run_id: int, completed: int, total: int) -> Any:
    """A running run's progress; `update_time` moves only when the values change (design §5)."""
    return (
        update(r)
        .where(r.c.id == run_id, r.c.status == RunState.RUNNING, or_(r.c.completed != completed, r.c.total != total))
        .values(completed=completed, total=total, update_time=now())
        .returning(*r.c)
    )


def end_run(now: Now, run_id: int, status: RunState, from_states: Sequence[RunState], values: Mapping[str, Any]) -> Any:
    """End a run in one of `from_states` as `status`, with `values` (error, progress)."""
    return (
        update(r)
        .where(r.c.id == run_id, r.c.status.in_(from_states))
        .values(status=status, end_time=now(), **values)
        .returning(*r.c)
    )


def schedule_next(job_name: str, when: dt.datetime, *, failed: bool, run_slot: dt.datetime | None) -> Any:
    """The job's next run after a run of `run_slot` ended; a failure counts, and the slot it retries is kept."""
    retry_slot = func.coalesce(j.c.retry_slot, literal(run_slot, UTCDateTime())) if failed else None
    return (
        update(j)
        .where(j.c.name == job_name)
        .values(
            next_scheduled_run=when,
            failure_count=j.c.failure_count + 1 if failed else 0,
            retry_slot=retry_slot,
        )
    )


def _ended(now: Now, failed: bool, checked: bool, facts_hold: ColumnElement[bool]) -> Any:
    at = now()
    in_window = and_(bindparam("w_lower", type_=UTCDateTime()) <= at, at < bindparam("w_upper", type_=UTCDateTime()))
    conditions = [r.c.id == bindparam("run_id"), _status_is(ACTIVE if failed else (RunState.RUNNING,)), in_window]
    if checked:
        conditions.append(exists().where(j.c.name == r.c.job_name, facts_hold))
    values: dict[str, Any] = {
        "status": RunState.FAILED if failed else RunState.COMPLETED,
        "end_time": at,
        "completed": func.coalesce(bindparam("p_completed", type_=Integer), r.c.completed),
        "total": func.coalesce(bindparam("p_total", type_=Integer), r.c.total),
    }
    if failed:
        values["error"] = bindparam("run_error", type_=Text)
    return update(r).where(*conditions).values(**values).returning(*r.c).cte("ended")


def _next_run_in_window(now: Now, failed: bool, requested: Any) -> Any:
    """`timing.finish_window` in SQL: the next run after the finish, from the bound window."""
    at = now()
    slots = func.unnest(cast(bindparam("w_slots"), postgresql.ARRAY(UTCDateTime()))).column_valued("slot")
    next_slot = select(func.min(slots)).where(slots > at).scalar_subquery()
    after_delay = at + cast(bindparam("w_delay"), Interval())
    use_next = cast(bindparam("w_use_next"), Boolean())
    if failed:
        # now + min(backoff, next slot - now), and never later than a slot the claim moved the job to.
        when: Any = least(after_delay, next_slot, case((use_next, j.c.next_scheduled_run)))
    else:
        when = case((use_next, j.c.next_scheduled_run), else_=least(after_delay, next_slot))
    return least(when, requested)  # least() skips NULLs: a pull-in made meanwhile wins


def finish(now: Now, failed: bool, checked: bool) -> Any:
    """PostgreSQL, one statement: end the run (CTE `ended`), then schedule its job (CTE `scheduled`, the same
    row order as the long way: run, then job), wake the beats when the job is due within their interval
    (NOTIFY, sent at commit), and return the ended run. Applies only while the database's time is in the
    bound window and (`checked`) the job's facts are still the bound ones; a job that changed under the
    statement stops it with RECHECK. Bound: see `JobRepository._finish_in_one_statement`."""
    job_facts = [j.c[name].is_not_distinct_from(bindparam(f"f_{name}")) for name in FINISH_FACTS]
    if failed:
        job_facts.append(j.c.failure_count == bindparam("f_failure_count"))
    facts_hold = and_(*job_facts)
    ended = _ended(now, failed, checked, facts_hold)
    job_values: dict[str, Any] = {
        "next_scheduled_run": _next_run_in_window(now, failed, ended.c.requested_next_run),
        "failure_count": j.c.failure_count + 1 if failed else 0,
        "retry_slot": func.coalesce(j.c.retry_slot, ended.c.scheduled_for) if failed else None,
    }
    scheduled = update(j).where(j.c.name == ended.c.job_name)
    if checked:
        scheduled = scheduled.where(facts_hold)  # as the row is when locked (it may have changed since)
    scheduled_cte = scheduled.values(**job_values).returning(j.c.name, j.c.next_scheduled_run).cte("scheduled")
    # A job that changed under the statement (so not scheduled by it) stops the statement with RECHECK:
    # the run's end is undone with it. Cast from a column's value, so the planner cannot fold it early.
    recheck = case(
        (scheduled_cte.c.name.is_(None), cast(func.coalesce(scheduled_cte.c.name, RECHECK), Integer)),
        else_=literal(0),
    )
    wake = case(
        (
            scheduled_cte.c.next_scheduled_run < now() + cast(bindparam("w_wake"), Interval()),
            func.pg_notify(wakeup_channel(), scheduled_cte.c.name),
        )
    )
    return select(ended, recheck.label("_recheck"), wake.label("_wake")).select_from(
        ended.outerjoin(scheduled_cte, true())
    )


def stalled(now: Now, default_threshold: float) -> ColumnElement[bool]:
    """An active run whose `update_time` is older than its job's interrupt threshold (else `default_threshold`
    seconds): what the monitor interrupts, and what `dbsched status` shows as stalled until it does."""
    per_job = select(j.c.interrupt_threshold).where(j.c.name == r.c.job_name).scalar_subquery()
    return and_(
        r.c.status.in_(ACTIVE),
        # A tracked plain task reports no progress: its liveness is its worker's (interrupt_orphaned).
        or_(r.c.kind != JobKind.TASK, r.c.status == RunState.QUEUED),
        r.c.update_time < now(-func.coalesce(per_job, default_threshold)),
    )


def interrupt_stalled(now: Now, default_threshold: float, reason: InterruptReason) -> Any:
    """End `interrupted` every active run whose `update_time` is older than its job's interrupt threshold
    (else `default_threshold` seconds); returns them."""
    condition = stalled(now, default_threshold)
    error = case(
        (r.c.status == RunState.QUEUED, f"{reason}: no worker started it within the interrupt threshold"),
        else_=f"{reason}: no progress within the interrupt threshold",
    )
    # The error first: MySQL assigns left to right, and the CASE must see the status before it changes.
    values = {"error": error, **interrupted(now, reason, error)}
    return update(r).where(condition).ordered_values(*values.items()).returning(*r.c)


def interrupt_left_behind(now: Now, server_id: str, threshold: dt.timedelta | None, reason: InterruptReason) -> Any:
    """End `interrupted` the runs `server_id` left behind (running on it as a worker, or queued by it as a
    beat), older than `threshold` when given; returns them."""
    condition = or_(
        and_(r.c.status == RunState.RUNNING, r.c.worker == server_id),
        and_(r.c.status == RunState.QUEUED, r.c.claimed_by == server_id),
    )
    if threshold:
        condition = and_(condition, r.c.update_time < now(-threshold.total_seconds()))
    error = f"{reason}: " + (
        f"{server_id} shut down" if reason == InterruptReason.SHUTDOWN else f"left behind by {server_id}"
    )
    return update(r).where(condition).values(**interrupted(now, reason, error)).returning(*r.c)


def due_again(dialect: str, now: Now, names: Iterable[str]) -> Any:
    """The named jobs whose schedule moved on when their run was claimed (plain tasks, max_active > 1) are
    due again at once: the slot a dead beat claimed but never sent is not lost (design §4)."""
    return (
        update(j)
        .where(j.c.name.in_(values_of(dialect, names, j.c.name)), or_(j.c.kind == JobKind.TASK, j.c.max_active > 1))
        .values(next_scheduled_run=least(j.c.next_scheduled_run, now()))
    )


def expire(now: Now) -> Any:
    """End `interrupted` (expired) the queued runs whose job sets `expires` and whose slot + expires passed."""
    expires = _job_expires()
    return (
        update(r)
        .where(r.c.status == RunState.QUEUED, expires.is_not(None), r.c.create_time < now(-expires))
        .values(**interrupted(now, InterruptReason.EXPIRED, EXPIRED_ERROR))
        .returning(*r.c)
    )


def dispatch(now: Now, run_id: int, task_id: str | None) -> Any:
    """`queued -> dispatched`: a plain task was sent."""
    values: dict[str, Any] = {"status": RunState.DISPATCHED, "end_time": now()}
    if task_id is not None:
        values["task_id"] = task_id
    return update(r).where(r.c.id == run_id, r.c.status == RunState.QUEUED).values(**values).returning(*r.c)


def reset_failures(job_name: str) -> Any:
    """Sent: whatever failed to publish before is behind it."""
    return update(j).where(j.c.name == job_name).values(failure_count=0, retry_slot=None)


def dispatch_many(dialect: str, now: Now, sent: Sequence[tuple[int, str | None]]) -> list[Any]:
    """`queued -> dispatched` for (run id, task id) pairs (one parameter), and their jobs' failure counts
    reset: one statement on PostgreSQL (the mark as a data-modifying CTE of the reset), two on SQLite."""
    ids = [run_id for run_id, _ in sent]
    if is_mysql(dialect):
        by_id = case({run_id: literal(task_id, String()) for run_id, task_id in sent}, value=r.c.id)
        mark = (
            update(r)
            .where(in_ids(dialect, r.c.id, ids), r.c.status == RunState.QUEUED)
            .values(status=RunState.DISPATCHED, end_time=now(), task_id=func.coalesce(by_id, r.c.task_id))
        )
    else:
        run_id, task_id = pairs(dialect, sent, (BigInteger(), String()))
        mark = (
            update(r)
            .where(r.c.id == run_id, r.c.status == RunState.QUEUED)
            .values(status=RunState.DISPATCHED, end_time=now(), task_id=func.coalesce(task_id, r.c.task_id))
        )
    reset = (
        update(j)
        .where(
            j.c.name.in_(select(r.c.job_name).where(in_ids(dialect, r.c.id, ids))),
            or_(j.c.failure_count != 0, j.c.retry_slot.is_not(None)),
        )
        .values(failure_count=0, retry_slot=None)
    )
    if _is_postgres(dialect):
        return [reset.add_cte(mark.cte("marked"))]
    return [mark, reset]


# -- plain tasks tracked on workers ----------------------------------------------------------------------------


def track_start(now: Now) -> Any:
    """`dispatched|queued -> running` of a plain task, taking no slot (slot = -id). Bound: `run_id`,
    `run_worker`, `run_task_id`."""
    at = now()
    return (
        update(r)
        .where(
            r.c.id == bindparam("run_id"), _status_is((RunState.QUEUED, RunState.DISPATCHED)), r.c.kind == JobKind.TASK
        )
        .values(**_started(at), end_time=None, slot=-r.c.id)
        .returning(*r.c)
    )


def track_end(now: Now, status: RunState) -> Any:
    """`running -> status` of a tracked plain task. Bound: `run_id`, and `run_error` when failed."""
    values: dict[str, Any] = {"status": status, "end_time": now()}
    if status == RunState.FAILED:
        values["error"] = bindparam("run_error", type_=Text)
    return (
        update(r).where(r.c.id == bindparam("run_id"), r.c.status == RunState.RUNNING).values(**values).returning(*r.c)
    )


def track_refused(now: Now) -> Any:
    """`dispatched|queued -> failed` of a plain task whose message a worker refused without starting it (an
    unknown or invalid task). Bound: `run_id`, `run_worker`, `run_task_id`, `run_error`."""
    return (
        update(r)
        .where(
            r.c.id == bindparam("run_id"), _status_is((RunState.QUEUED, RunState.DISPATCHED)), r.c.kind == JobKind.TASK
        )
        .values(
            status=RunState.FAILED,
            worker=bindparam("run_worker"),
            task_id=bindparam("run_task_id"),
            error=bindparam("run_error", type_=Text),
            update_time=now(),
            end_time=now(),
        )
        .returning(*r.c)
    )


def runs_in_flight(worker: Any) -> Select[Any]:
    """How many runs are `running` on `worker`: a count over the active runs only (their partial index)."""
    return select(func.count()).where(r.c.status == RunState.RUNNING, r.c.worker == worker)


def heartbeat(dialect: str, now: Now, role: str) -> Executable:
    """Record that a server is alive now, with what `dbsched status` shows of it. Bound: `s_id`, `s_kind`,
    `s_hostname`, `s_pid`, `s_version`, `s_interval`; for a beat `s_claims`, `s_lag_p50`, `s_lag_max` (its
    claims over the last minute); a worker's runs in flight are counted here, over the active runs only (the
    partial index of active runs). A row whose host or pid changed is a new process: its start time too."""
    at = now()
    values: dict[str, Any] = {
        "id": bindparam("s_id"),
        "kind": bindparam("s_kind"),
        "hostname": bindparam("s_hostname"),
        "pid": bindparam("s_pid"),
        "start_time": at,
        "last_seen": at,
        "version": bindparam("s_version", type_=String),
        "heartbeat_interval": bindparam("s_interval", type_=Float),
    }
    if role == "beat":
        values["claims_last_minute"] = bindparam("s_claims", type_=Integer)
        values["claim_lag_p50"] = bindparam("s_lag_p50", type_=Float)
        values["claim_lag_max"] = bindparam("s_lag_max", type_=Float)
    elif is_mysql(dialect):  # counted before, without locks (JobRepository.heartbeat)
        values["runs_in_flight"] = bindparam("s_flight", type_=Integer)
    else:
        values["runs_in_flight"] = runs_in_flight(bindparam("s_id")).scalar_subquery()
    stmt = insert(dialect, s).values(**values)
    new = stmt.inserted if is_mysql(dialect) else stmt.excluded
    new_process = or_(s.c.pid != new.pid, s.c.hostname != new.hostname)
    updated = {name: new[name] for name in values if name not in ("id", "start_time")}
    # MySQL assigns left to right, each SET seeing the ones before: start_time first, while pid is the old one.
    start_time = case((new_process, new.start_time), else_=s.c.start_time)
    if is_mysql(dialect):
        upsert: Executable = stmt.on_duplicate_key_update([("start_time", start_time), *updated.items()])
    else:
        upsert = stmt.on_conflict_do_update(index_elements=[s.c.id], set_={**updated, "start_time": start_time})
    return upsert


def interrupt_orphaned(now: Now, threshold: float) -> Any:
    """End `interrupted` the tracked plain tasks whose worker has not been seen for `threshold` seconds."""
    alive = exists().where(s.c.id == r.c.worker, s.c.last_seen >= now(-threshold))
    return (
        update(r)
        .where(r.c.kind == JobKind.TASK, r.c.status == RunState.RUNNING, ~alive, r.c.start_time < now(-threshold))
        .values(**interrupted(now, InterruptReason.STALLED, f"{InterruptReason.STALLED}: its worker stopped answering"))
        .returning(*r.c)
    )


def interrupt_job_runs(now: Now, job_name: str) -> Any:
    """End `interrupted` (cancelled, by an operator) the job's queued and running runs; returns them."""
    return (
        update(r)
        .where(r.c.job_name == job_name, r.c.status.in_(ACTIVE))
        .values(**interrupted(now, InterruptReason.CANCELLED, f"{InterruptReason.CANCELLED}: by an operator"))
        .returning(*r.c)
    )


def mark_registered(dialect: str, now: Now, names: Iterable[str]) -> Any:
    """A worker started with these `@job`s in its code: stamp their `registered_time` (one parameter)."""
    return (
        update(j)
        .where(j.c.kind == JobKind.JOB, j.c.name.in_(values_of(dialect, names, j.c.name)))
        .values(registered_time=now())
    )


def orphaned_jobs(grace: float) -> Select[Any]:
    """The enabled `@job`s that no worker registered within `grace` seconds before the latest registration of
    any job (its name and when it was last registered, NULL: never since revision 0006); nothing before any
    worker registered a job."""
    latest = select(func.max(j.c.registered_time)).where(j.c.kind == JobKind.JOB).scalar_subquery()
    last = func.coalesce(j.c.registered_time, j.c.create_time)
    return (
        select(j.c.name, j.c.registered_time)
        .where(j.c.kind == JobKind.JOB, j.c.enabled, last < db_time_at(latest, -grace))
        .order_by(j.c.name)
    )


def last_runs(dialect: str) -> Select[Any]:
    """Each job's latest run: per job, the newest entry of the runs-by-job index (a lateral LIMIT 1 on
    PostgreSQL, a correlated subquery on SQLite), never a pass over the whole history."""
    newest = select(r).where(r.c.job_name == j.c.name).order_by(r.c.id.desc()).limit(1)
    if _is_postgres(dialect):
        latest = newest.lateral("latest")
        return select(*latest.c).select_from(j.join(latest, true()))
    newest_id = newest.with_only_columns(r.c.id).scalar_subquery()
    return select(r).where(r.c.id.in_(select(newest_id).select_from(j)))


def mark_run_stopped(now: Now, run_id: int) -> Any:
    """The code of a run that ended under its worker (cancelled, interrupted) has returned."""
    return update(r).where(r.c.id == run_id, r.c.stopped_time.is_(None)).values(stopped_time=now())


def run_stopped_time(run_id: int) -> Select[Any]:
    return select(r.c.stopped_time).where(r.c.id == run_id)


def delete_idle_job(name: str) -> Any:
    """Delete a job that has no queued or running run, and its history (the runs cascade)."""
    return delete(j).where(j.c.name == name, j.c.active_runs == 0)


# -- history ---------------------------------------------------------------------------------------------------


def runs(job_name: str | None, status: str | None, limit: int, since: dt.datetime | None = None) -> Select[Any]:
    """Newest first; `since`: claimed at or after."""
    query = select(r).order_by(r.c.id.desc()).limit(limit)
    if since is not None:
        query = query.where(r.c.create_time >= since)
    if job_name is not None:
        query = query.where(r.c.job_name == job_name)
    if status is not None:
        query = query.where(r.c.status == status)
    return query


def prune_batch(dialect: str, now: Now, retention: dt.timedelta, size: int) -> Any:
    """Delete up to `size` final runs that ended more than `retention` ago, oldest first, picked through the
    `end_time` index; on PostgreSQL rows another pruning beat holds are skipped, not waited for."""
    oldest = (
        select(r.c.id)
        .where(r.c.end_time < now(-retention.total_seconds()), r.c.status.in_(FINAL))
        .order_by(r.c.end_time)
        .limit(size)
    )
    if _is_postgres(dialect):
        oldest = oldest.with_for_update(skip_locked=True)
    if is_mysql(dialect):  # MySQL reads no LIMIT in an IN subquery, nor the table it deletes from: one more level
        return delete(r).where(r.c.id.in_(select(oldest.subquery().c.id)))
    return delete(r).where(r.c.id.in_(oldest.scalar_subquery()))


def prune_servers(now: Now, retention: dt.timedelta) -> Any:
    """Delete the rows of servers not seen for `retention` (through the `last_seen` index)."""
    return delete(s).where(s.c.last_seen < now(-retention.total_seconds()))


# -- what the scheduler is doing (celery_dbsched.observe) -------------------------------------------------------
# Each statement is bounded: an index range or a LIMIT, and a count only over a LIMITed subquery (never a
# count over the runs table).


def _capped_count(query: Select[Any], cap: int) -> Any:
    """How many rows `query` has, counting at most `cap` + 1 (more than `cap`: at least that many)."""
    return select(func.count()).select_from(query.limit(cap + 1).subquery()).scalar_subquery()


def servers(limit: int) -> Select[Any]:
    """The server rows, beats first, most recently seen first."""
    return select(s).order_by(s.c.kind, s.c.last_seen.desc(), s.c.id).limit(limit)


def due_backlog(now: Now, cap: int) -> Select[Any]:
    """The claimable jobs due now (counted up to `cap` + 1), the earliest next run of a claimable job and that
    job's name, and now: range scans of the claimable index."""
    at = now()
    due = select(j.c.name).where(claimable, j.c.next_scheduled_run <= at)

    def first(col: Any) -> Any:
        return select(col).where(claimable).order_by(j.c.next_scheduled_run, j.c.name).limit(1).scalar_subquery()

    return select(_capped_count(due, cap), first(j.c.next_scheduled_run), first(j.c.name), at)


def active_runs(cap: int, limit: int) -> tuple[Select[Any], Select[Any]]:
    """The active runs (counted up to `cap` + 1) and the `limit` most recently claimed of them."""
    active = select(r.c.id).where(r.c.status.in_(ACTIVE))
    listed = select(r).where(r.c.status.in_(ACTIVE)).order_by(r.c.id.desc()).limit(limit)
    return select(_capped_count(active, cap)), listed


def stalled_runs(now: Now, default_threshold: float, cap: int, limit: int) -> tuple[Select[Any], Select[Any]]:
    """The stalled runs not interrupted yet (counted up to `cap` + 1), and the `limit` longest silent of them."""
    condition = stalled(now, default_threshold)
    listed = select(r).where(condition).order_by(r.c.update_time).limit(limit)
    return select(_capped_count(select(r.c.id).where(condition), cap)), listed


FAILURE_REASONS = (InterruptReason.STALLED, InterruptReason.EXPIRED)


def failures_since(now: Now, seconds: float, cap: int, limit: int) -> tuple[Select[Any], Select[Any]]:
    """Runs that ended `failed`, or `interrupted` stalled or expired, in the last `seconds` (counted up to
    `cap` + 1), and the `limit` latest: a range of the end-time index."""
    failed = or_(
        r.c.status == RunState.FAILED,
        and_(r.c.status == RunState.INTERRUPTED, r.c.interrupt_reason.in_(FAILURE_REASONS)),
    )
    condition = and_(r.c.end_time >= now(-seconds), failed)
    listed = select(r).where(condition).order_by(r.c.end_time.desc()).limit(limit)
    return select(_capped_count(select(r.c.id).where(condition), cap)), listed


def database_now(now: Now) -> Select[Any]:
    return select(now())


def ping() -> Executable:
    return text("SELECT 1")


def active_by_status() -> Select[Any]:
    """Active runs by status (through the partial index of active runs: as many rows as runs in flight)."""
    return select(r.c.status, func.count()).where(r.c.status.in_(ACTIVE)).group_by(r.c.status)


# What `dbsched watch` reads each refresh (issue 12 §2): a handful of bounded statements, each through an index
# (tests/test_watch.py states the plans): the server rows (`servers`), the active runs, the latest outcomes.


def watch_active_runs(job_name: str | None, limit: int) -> Select[Any]:
    """The oldest `limit` queued and running runs (of `job_name`), with their job's interrupt threshold as
    `job_interrupt_threshold`: read through the partial indexes of active runs, however long the history."""
    threshold = select(j.c.interrupt_threshold).where(j.c.name == r.c.job_name).scalar_subquery()
    query = (
        select(r, threshold.label("job_interrupt_threshold"))
        .where(r.c.status.in_(ACTIVE))
        .order_by(r.c.id)
        .limit(limit)
    )
    return query if job_name is None else query.where(r.c.job_name == job_name)


def watch_recent_runs(job_name: str | None, limit: int) -> Select[Any]:
    """The `limit` latest ended runs: by end time through the end-time index; of one job, newest first through
    the runs-by-job index (its ended runs end in about the order they were claimed)."""
    query = select(r).where(r.c.end_time.is_not(None)).limit(limit)
    if job_name is None:
        return query.order_by(r.c.end_time.desc())
    return query.where(r.c.job_name == job_name).order_by(r.c.id.desc())


# -- the dashboard's reads (celery_dbsched.web): bounded, keyset-paged, never a count over the runs table -------

JOB_SORTS = ("name", "next_run")
JOB_FILTERS = ("enabled", "paused", "running", "failing", "late")


def _job_filter(state: str, now: Now, late_after: float) -> ColumnElement[bool]:
    """A job state of the dashboard's filter: `late` is claimable and due more than `late_after` seconds ago."""
    conditions: dict[str, ColumnElement[bool]] = {
        "enabled": and_(j.c.enabled, ~j.c.paused),
        "paused": j.c.paused,
        "running": j.c.active_runs > 0,
        "failing": j.c.failure_count > 0,
        "late": and_(claimable, j.c.next_scheduled_run < now(-late_after)),
    }
    return conditions[state]


def _job_sort_key(sort: str) -> list[Any]:
    return [j.c.name] if sort == "name" else [j.c.next_scheduled_run, j.c.name]


def jobs_page(
    now: Now,
    *,
    search: str | None,
    state: str | None,
    sort: str,
    descending: bool,
    after: Sequence[Any] | None,
    limit: int,
    late_after: float,
) -> Select[Any]:
    """One page of jobs, in `sort` order (name, or next run then name), after the keyset `after` (the sort
    key of the previous page's last job): `limit` rows at most. `search`: a part of the name or description,
    any case."""
    key = _job_sort_key(sort)
    query = select(j)
    if search:
        needle = search.lower()
        query = query.where(
            or_(
                func.lower(j.c.name).contains(needle, autoescape=True),
                func.lower(j.c.description).contains(needle, autoescape=True),
            )
        )
    if state is not None:
        query = query.where(_job_filter(state, now, late_after))
    if after is not None:
        position = tuple_(*key)
        bound = tuple_(*(literal(value, column.type) for value, column in zip(after, key, strict=True)))
        query = query.where(position < bound if descending else position > bound)
    return query.order_by(*(column.desc() if descending else column for column in key)).limit(limit)


_RECENT_COLUMNS = (r.c.id, r.c.job_name, r.c.status, r.c.create_time, r.c.start_time, r.c.end_time)


def recent_runs_of(dialect: str, names: Sequence[str], per_job: int) -> Select[Any]:
    """The latest `per_job` runs of each named job (the names as one parameter), without their errors: a
    lateral index scan per job on PostgreSQL (bounded however many runs a job has), a window on SQLite."""
    if _is_postgres(dialect):
        recent = (
            select(*_RECENT_COLUMNS).where(r.c.job_name == j.c.name).order_by(r.c.id.desc()).limit(per_job)
        ).lateral("recent")
        return (
            select(*recent.c)
            .select_from(j.join(recent, true()))
            .where(j.c.name.in_(values_of(dialect, names, j.c.name)))
        )
    rank = func.row_number().over(partition_by=r.c.job_name, order_by=r.c.id.desc()).label("rank")
    ranked = select(*_RECENT_COLUMNS, rank).where(r.c.job_name.in_(values_of(dialect, names, r.c.job_name))).subquery()
    return select(*(ranked.c[c.name] for c in _RECENT_COLUMNS)).where(ranked.c.rank <= per_job)


def active_runs_of(job_name: str | None, limit: int) -> Select[Any]:
    """Queued and running runs (of one job), newest first (through the partial indexes on active runs)."""
    query = select(r).where(r.c.status.in_(ACTIVE)).order_by(r.c.id.desc()).limit(limit)
    return query if job_name is None else query.where(r.c.job_name == job_name)


def runs_page(
    *,
    job_name: str | None,
    status: str | None,
    worker: str | None,
    since: dt.datetime | None,
    until: dt.datetime | None,
    before: int | None,
    at_least: int | None,
    limit: int,
    ended_only: bool = False,
) -> Select[Any]:
    """One page of runs, newest first, older than run id `before` (the keyset) and not older than run id
    `at_least` (the window a filtered page scans at most), claimed within [since, until]; `ended_only`: not
    the queued and running ones (a page that lists those apart)."""
    query = runs(job_name, status, limit, since)
    if ended_only:
        query = query.where(r.c.status.not_in(ACTIVE))
    if worker is not None:
        query = query.where(r.c.worker == worker)
    if until is not None:
        query = query.where(r.c.create_time <= until)
    if at_least is not None:
        query = query.where(r.c.id >= at_least)
    return query if before is None else query.where(r.c.id < before)


def run_id_range() -> Select[Any]:
    """The newest and the oldest run id (two ends of the primary key)."""
    return select(func.max(r.c.id), func.min(r.c.id))
