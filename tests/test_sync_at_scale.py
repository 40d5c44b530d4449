"""Issue 9, goals 1 and 2: `beat_schedule` (and `@job`) sync correct at any size, and O(changes) at start-up.

- 70,000 entries on each database: synced, a beat started on them, every one claimed once; no statement carries
  a parameter list that grows with N (PostgreSQL refuses more than 65,535 bound parameters, SQLite 32,766).
- An unchanged schedule costs the same statements at N = 10 and N = 2,000 (counted with SQLAlchemy's
  `before_cursor_execute`), for `beat_schedule` and for `@job` registrations.
- Changes, additions and removals through the bulk path; the fingerprint shortcut never hides a change.
- Errors: an outage is `DatabaseUnavailable`, a refused statement is a `DatabaseError` that is not; a beat whose
  start-up is refused exits non-zero saying so instead of retrying it forever as "database unavailable".
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from celery import Celery
from celery.schedules import crontab
from helpers.apps import make_app
from helpers.processes import Processes
from helpers.services import Database
from kombu import Connection
from sqlalchemy import Engine, column, event, select, table, text

from celery_dbsched import job
from celery_dbsched.beat_schedule import SYNC_SOURCE, fingerprint, sync_beat_schedule
from celery_dbsched.binding import bind_repository
from celery_dbsched.clock import TestClock
from celery_dbsched.errors import DatabaseError, DatabaseUnavailable, is_outage
from celery_dbsched.registry import registry_for
from celery_dbsched.repository import JobRepository
from celery_dbsched.scheduler import REFUSED_RETRY, Scheduler

UTC = dt.timezone.utc
T0 = dt.datetime(2026, 6, 1, 8, 0, tzinfo=UTC)
BIG = 70_000  # more bound parameters than either database takes in one statement
PG_TRIGGER = "FOR EACH ROW EXECUTE FUNCTION refuse()"


def scale_app(n: int, **conf: Any) -> Celery:
    """An app whose beat_schedule has `n` entries."""
    return make_app("sync_scale", **{"result_expires": None, "beat_schedule": entries(n), **conf})


def entries(n: int, prefix: str = "entry") -> dict[str, dict[str, Any]]:
    return {f"{prefix}-{i:06d}": {"task": "proj.tasks.tick", "schedule": 60.0, "args": [i]} for i in range(n)}


@contextmanager
def counted(engine: Engine) -> Iterator[list[str]]:
    """The SQL statements `engine` runs meanwhile."""
    statements: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", count)


@contextmanager
def parameters(engine: Engine) -> Iterator[list[int]]:
    """The number of bound parameters of each statement (the largest of an executemany's sets)."""
    sizes: list[int] = []

    def count(_conn: Any, _cursor: Any, _statement: str, parameters: Any, _context: Any, executemany: bool) -> None:
        sets = parameters if executemany else [parameters]
        sizes.append(max((len(p) if p is not None else 0 for p in sets), default=0))

    event.listen(engine, "before_cursor_execute", count)
    try:
        yield sizes
    finally:
        event.remove(engine, "before_cursor_execute", count)


def drain(queue: str) -> int:
    count = 0
    with Connection("memory://") as conn:
        channel = conn.channel()
        try:
            while channel.basic_get(queue, no_ack=True) is not None:
                count += 1
        finally:
            channel.close()
    return count


# --- 70,000 entries ---------------------------------------------------------------------------------


@pytest.mark.slow  # 70,000 entries
def test_70000_entries_sync_start_claim_and_publish(database: Database) -> None:
    queue = f"scale-{uuid.uuid4().hex[:8]}"
    repository = database.migrated_repository(clock=TestClock(frozen_at=T0))
    app = scale_app(BIG, task_default_queue=queue, dbsched_listen=False, dbsched_server_id="beat-big")
    bind_repository(app, repository)
    try:
        with parameters(repository.engine) as sizes:
            beat = Scheduler(app=app)  # start-up: the sync of 70,000 new entries
            with repository.engine.connect() as conn:
                assert conn.execute(text("SELECT count(*) FROM dbsched_job WHERE enabled")).scalar_one() == BIG
            # A restart with the same schedule: one read, whatever N.
            with counted(repository.engine) as statements:
                assert len(sync_beat_schedule(app, repository)) == BIG
            assert len(statements) <= 2, statements

            # The beat's tick claims a batch and publishes each entry's task on the broker.
            beat.tick()
            # A full batch (dbsched_run_jobs_limit's default, 1,000) makes the beat claim the next one ahead, on
            # its claim thread; closing the beat publishes that one too, so nothing is claimed behind our back.
            beat.close()
            assert drain(queue) == 2000
            # The rest, claimed in batches of 10,000; the lookup of every claimed entry is one statement.
            claimed = {run.job_name for run in repository.list_runs(limit=BIG)}
            while len(claimed) < BIG:
                runs = repository.claim_runs("beat-big", 10_000).runs
                assert runs and not {run.job_name for run in runs} & claimed
                claimed |= {run.job_name for run in runs}
            assert len(repository.lookup_jobs(sorted(claimed))) == BIG

            # One removed, one changed, one added, at this size.
            schedule = entries(BIG)
            del schedule["entry-000001"]
            schedule["entry-000002"]["args"] = ["changed"]
            schedule["added"] = {"task": "proj.tasks.tick", "schedule": 60.0}
            app.conf.beat_schedule = schedule
            assert len(sync_beat_schedule(app, repository)) == BIG
        assert max(sizes) < 30_000  # below PostgreSQL's 65,535 and SQLite's default 32,766
        assert repository.lookup_job("entry-000001").policy.enabled is False
        assert repository.lookup_job("entry-000002").task_args == ("changed",)
        assert repository.lookup_job("added").policy.enabled is True
        beat.close()
    finally:
        bind_repository(app, None)
        drain(queue)


# --- statements: constant in N ----------------------------------------------------------------------


def resync_statements(database: Database, n: int) -> list[str]:
    repository = database.migrated_repository()
    app = scale_app(n)
    sync_beat_schedule(app, repository)
    with counted(repository.engine) as statements:
        assert len(sync_beat_schedule(scale_app(n), repository)) == n  # a new app object: a new process
    return statements


def test_an_unchanged_beat_schedule_costs_the_same_statements_at_any_size(database: Database) -> None:
    small = resync_statements(database, 10)
    large = resync_statements(database, 2_000)
    assert len(small) == len(large) <= 2  # the fingerprint read (plus SQLite's BEGIN IMMEDIATE)


def job_registry_statements(database: Database, n: int) -> tuple[int, int]:
    repository = database.migrated_repository()
    app = Celery(f"jobs_{uuid.uuid4().hex[:6]}", set_as_current=False)
    for i in range(n):
        job(app, name=f"job-{i:05d}", description="a job", every=60)(lambda ctx: None)
    registry = registry_for(app)
    with counted(repository.engine) as first:
        registry.sync(repository)
    with counted(repository.engine) as again:
        registry.sync(repository)
    assert len(repository.list_jobs()) == n
    return len(first), len(again)


@pytest.mark.slow
def test_job_registrations_sync_in_statements_independent_of_their_number(database: Database) -> None:
    small_first, small_again = job_registry_statements(database, 10)
    large_first, large_again = job_registry_statements(database, 2_000)
    assert small_again == large_again <= 2  # unchanged: one read
    assert large_first <= small_first + 10  # new: bounded chunks, not a statement (or two) per job


@pytest.mark.slow
def test_a_worker_start_keeps_operators_edits_in_one_read(database: Database) -> None:
    """Jobs edited on the dashboard and an unchanged registry: a worker start's sync is still one read (the
    edits are applied over the code's values before comparing), and the edits hold."""
    repository = database.migrated_repository()
    app = Celery(f"jobs_{uuid.uuid4().hex[:6]}", set_as_current=False)
    for i in range(200):
        job(app, name=f"job-{i:05d}", description="a job", every=60)(lambda ctx: None)
    registry = registry_for(app)
    registry.sync(repository)
    edited = [f"job-{i:05d}" for i in range(0, 200, 2)]
    for name in edited:
        repository.edit_job(name, every=dt.timedelta(seconds=300))
    with counted(repository.engine) as again:
        registry.sync(repository)
    assert len(again) <= 2  # one read (plus SQLite's BEGIN)
    every = {record.name: record.every for record in repository.list_jobs()}
    assert {every[name] for name in edited} == {dt.timedelta(seconds=300)}
    assert set(every.values()) == {dt.timedelta(seconds=60), dt.timedelta(seconds=300)}


# --- changes through the bulk path -----------------------------------------------------------------


def test_a_changed_schedule_writes_only_what_changed(database: Database) -> None:
    clock = TestClock(frozen_at=T0)
    repository = database.migrated_repository(clock=clock)
    app = scale_app(500)
    sync_beat_schedule(app, repository)
    before = {j.name: j for j in repository.list_jobs()}

    clock.freeze(T0 + dt.timedelta(seconds=30))
    schedule = entries(500)
    schedule["entry-000007"]["args"] = ["new args"]  # settings only: next run kept
    schedule["entry-000008"]["schedule"] = 90.0  # schedule: next run recomputed
    del schedule["entry-000009"]  # removed: disabled, kept
    schedule["new-one"] = {"task": "proj.tasks.other", "schedule": crontab(minute=0, hour=12)}
    app.conf.beat_schedule = schedule
    with counted(repository.engine) as statements:
        names = sync_beat_schedule(app, repository)
    assert len(statements) < 20
    assert "entry-000009" not in names and "new-one" in names
    after = {j.name: j for j in repository.list_jobs()}
    untouched = set(before) - {"entry-000007", "entry-000008", "entry-000009"}
    assert all(after[name] == before[name] for name in untouched)  # not even their update_time
    assert after["entry-000007"].task_args == ("new args",)
    assert after["entry-000007"].next_scheduled_run == before["entry-000007"].next_scheduled_run
    assert after["entry-000007"].update_time > before["entry-000007"].update_time
    assert after["entry-000008"].next_scheduled_run == T0 + dt.timedelta(seconds=30 + 90)
    assert after["entry-000009"].policy.enabled is False
    assert after["new-one"].next_scheduled_run == dt.datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def test_the_fingerprint_never_hides_a_change(database: Database) -> None:
    repository = database.migrated_repository()
    app = scale_app(50, timezone="Europe/Berlin")
    app.conf.beat_schedule = {**entries(50), "noon": {"task": "t.noon", "schedule": crontab(minute=0, hour=12)}}
    sync_beat_schedule(app, repository)
    digest = fingerprint(app)
    assert digest is not None and repository.sync_is_current(SYNC_SOURCE, digest, "beat_schedule")

    # The app's timezone is part of what a crontab entry means.
    app.conf.timezone = "Asia/Tokyo"
    assert fingerprint(app) != digest
    sync_beat_schedule(app, repository)
    assert repository.lookup_job("noon").schedule.timezone == "Asia/Tokyo"  # type: ignore[union-attr]

    # Jobs deleted (or added) behind the sync's back: the count no longer matches, everything is compared.
    with repository.engine.begin() as conn:
        conn.execute(text("DELETE FROM dbsched_job WHERE name = 'entry-000003'"))
    assert not repository.sync_is_current(SYNC_SOURCE, fingerprint(app) or "", "beat_schedule")
    sync_beat_schedule(app, repository)
    assert repository.lookup_job("entry-000003").policy.enabled is True

    # A value the fingerprint cannot digest faithfully: no shortcut, every start compares every entry.
    # (Here: kwargs whose keys cannot be sorted, which json.dumps stores as they are.)
    app.conf.beat_schedule = {"f": {"task": "t", "schedule": 60, "kwargs": {1: "a", "b": 2}}}
    assert fingerprint(app) is None
    sync_beat_schedule(app, repository)
    assert repository.lookup_job("entry-000003").policy.enabled is False


def test_several_beats_syncing_one_schedule_at_once_agree(database: Database) -> None:
    repository = database.migrated_repository(clock=TestClock(frozen_at=T0))
    sync_beat_schedule(scale_app(300), repository)  # the schedule before the deploy
    schedule = entries(300)
    for i in range(0, 300, 3):
        schedule[f"entry-{i:06d}"]["schedule"] = 120.0
    schedule.update(entries(200, prefix="more"))
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def start() -> None:
        own = database.repository(clock=TestClock(frozen_at=T0 + dt.timedelta(seconds=10)))
        app = scale_app(0)
        app.conf.beat_schedule = schedule
        try:
            barrier.wait()
            sync_beat_schedule(app, own)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    jobs = {j.name: j for j in repository.list_jobs()}
    assert len(jobs) == 500
    assert all(j.policy.enabled for j in jobs.values())
    for i in range(0, 300, 3):  # recomputed once, from the new schedule
        assert jobs[f"entry-{i:06d}"].next_scheduled_run == T0 + dt.timedelta(seconds=10 + 120)
    assert jobs["entry-000001"].next_scheduled_run == T0  # untouched
    again = scale_app(0)
    again.conf.beat_schedule = schedule
    digest = fingerprint(again)
    assert digest is not None and repository.sync_is_current(SYNC_SOURCE, digest, "beat_schedule")


# --- error classification --------------------------------------------------------------------------


def driver_error(database: Database, sql: str, parameters: Any = None) -> BaseException:
    """The driver's own exception for `sql`, raised by the real database."""
    repository = database.migrated_repository()
    raw = repository.engine.raw_connection()
    try:
        cursor = raw.cursor()
        try:
            cursor.execute(sql, parameters) if parameters is not None else cursor.execute(sql)
        except Exception as exc:
            return exc
        raise AssertionError(f"{sql[:60]!r}... did not fail")
    finally:
        raw.close()


def test_refused_statements_are_not_outages(database: Database) -> None:
    bad_syntax = driver_error(database, "SELEC 1")
    marker = "%s" if database.kind == "postgres" else "?"
    # More bound parameters than the database takes (SQLite: this build's limit, often above 32,766).
    n = (
        BIG
        if database.kind == "postgres"
        else sqlite3.connect(":memory:").getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) + 1
    )
    too_many = driver_error(database, f"SELECT 1 WHERE 1 IN ({', '.join([marker] * n)})", tuple(range(n)))
    assert not is_outage(bad_syntax)
    assert not is_outage(too_many), too_many
    repository = database.migrated_repository()
    for statement in ("SELEC 1", "SELECT 1/0" if database.kind == "postgres" else "SELECT abs(-9223372036854775808)"):
        with pytest.raises(DatabaseError) as refused, repository._tx() as conn:
            conn.execute(text(statement))
        assert not isinstance(refused.value, DatabaseUnavailable)
        assert "not an outage" in str(refused.value)


def test_outages_are_outages(postgres_database: Database, tmp_path: Any) -> None:
    refused = None
    try:
        psycopg.connect("postgresql://postgres@127.0.0.1:1/test", connect_timeout=2)
    except psycopg.OperationalError as exc:
        refused = exc
    assert refused is not None and is_outage(refused)
    for sqlstate in ("57P01", "40001", "40P01", "08006", "53300", "25006", "55P03", "57014"):
        assert is_outage(psycopg.errors.lookup(sqlstate)("x")), sqlstate
    for sqlstate in ("42601", "42P01", "22012", "23505", "54000", "0A000", "XX000"):
        assert not is_outage(psycopg.errors.lookup(sqlstate)("x")), sqlstate

    # SQLite: a database locked by another writer is busy, not broken.
    path = tmp_path / "locked.sqlite3"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN IMMEDIATE")
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    with pytest.raises(sqlite3.OperationalError) as locked:
        other.execute("BEGIN IMMEDIATE")
    holder.close()
    other.close()
    assert is_outage(locked.value)

    # Through the repository: the server is gone.
    down = JobRepository("postgresql+psycopg://postgres@127.0.0.1:1/test", engine_options={"pool_pre_ping": False})
    with pytest.raises(DatabaseUnavailable):
        down.ping()
    down.close()


def refuse_job_inserts(database: Database, name: str) -> None:
    """Make the database refuse to store a job called `name`, with an error that will recur on every retry
    and that the code before issue 9 took for an outage (a driver "operational" error)."""
    repository = database.migrated_repository()
    with repository.engine.begin() as conn:
        if database.kind == "sqlite":
            # A trigger calling a function that does not exist: SQLITE_ERROR, raised as sqlite3.OperationalError.
            conn.execute(
                text(
                    f"CREATE TRIGGER refuse BEFORE INSERT ON dbsched_job WHEN NEW.name = '{name}' "
                    "BEGIN SELECT no_such_function(); END"
                )
            )
        else:
            # SQLSTATE 54000 (program limit exceeded), raised as psycopg's OperationalError.
            conn.execute(
                text(
                    "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                    f"IF NEW.name = '{name}' THEN RAISE EXCEPTION 'refused' USING ERRCODE = '54000'; END IF; "
                    "RETURN NEW; END $$"
                )
            )
            conn.execute(
                text("CREATE TRIGGER refuse BEFORE INSERT ON dbsched_job FOR EACH ROW EXECUTE FUNCTION refuse()")
            )


@pytest.mark.e2e
def test_a_beat_whose_start_up_is_refused_exits_and_says_why(database: Database, processes: Processes) -> None:
    refuse_job_inserts(database, "refused")
    settings = {"beat_schedule": {"refused": {"task": "proj.tasks.t", "schedule": 60}}, "result_expires": None}
    beat = processes.start_beat(
        "cli_app", env={"DBSCHED_TEST_APP_DB": database.url, "DBSCHED_TEST_APP_SETTINGS": json.dumps(settings)}
    )
    deadline = time.monotonic() + 60
    while beat.alive() and time.monotonic() < deadline:
        time.sleep(0.1)  # polling for the exit, bounded by the deadline
    log = beat.log()
    assert not beat.alive(), f"the beat kept running:\n{log[-5000:]}"
    assert beat.returncode not in (0, None), log[-5000:]
    assert "CRITICAL/MainProcess] celery_dbsched: the beat cannot start: " in log, log[-5000:]
    assert "not an outage" in log and "Traceback" not in log, log[-5000:]
    assert "database unavailable" not in log, log[-5000:]


def test_a_tick_whose_statement_is_refused_logs_error_and_retries_slowly(
    database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    repository = database.migrated_repository()
    app = scale_app(0, dbsched_listen=False, beat_schedule={"fine": {"task": "t", "schedule": 60}})
    bind_repository(app, repository)
    try:
        beat = Scheduler(app=app)  # started: the entry is stored
        with repository.engine.begin() as conn:  # now the claim's statement will be refused
            if database.kind == "sqlite":
                conn.execute(text("CREATE TRIGGER refuse BEFORE INSERT ON dbsched_job_run BEGIN SELECT nope(); END"))
            else:
                conn.execute(
                    text(
                        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                        "RAISE EXCEPTION 'refused' USING ERRCODE = '54000'; END $$"
                    )
                )
                conn.execute(
                    text(
                        "CREATE TRIGGER refuse BEFORE INSERT ON dbsched_job_run FOR EACH ROW EXECUTE FUNCTION refuse()"
                    )
                )
        caplog.set_level("DEBUG", logger="celery_dbsched")
        assert beat.tick() == REFUSED_RETRY
        assert beat.tick() == REFUSED_RETRY
        errors = [r for r in caplog.records if r.levelname == "ERROR" and "not an outage" in r.getMessage()]
        assert len(errors) == 2  # each try is an ERROR, at most one a minute
        assert not [r for r in caplog.records if "database unavailable" in r.getMessage()]
        with repository.engine.begin() as conn:
            conn.execute(text("DROP TRIGGER refuse" + ("" if database.kind == "sqlite" else " ON dbsched_job_run")))
        beat.tick()
        assert [run.job_name for run in repository.list_runs()] == ["fine"]  # working again
        beat.close()
    finally:
        bind_repository(app, None)


def test_sync_state_table_is_in_the_schema(database: Database) -> None:
    repository = database.migrated_repository()
    sync_beat_schedule(scale_app(3), repository)
    state = table("dbsched_sync", column("key"), column("job_count"))
    with repository.engine.connect() as conn:
        assert conn.execute(select(state.c.key, state.c.job_count)).all() == [(SYNC_SOURCE, 3)]
