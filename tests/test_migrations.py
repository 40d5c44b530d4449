"""Schema migrations: `migrate`, `check_schema` and `prepare_schema`, on SQLite and PostgreSQL."""

from __future__ import annotations

import multiprocessing
from typing import Any

import pytest
from sqlalchemy import inspect, text

from celery_dbsched import DatabaseUnavailable, SchemaMismatch
from celery_dbsched.engine import make_engine
from celery_dbsched.migrate import (
    VERSION_TABLE,
    check_schema,
    current_revision,
    head_revision,
    migrate,
    prepare_schema,
)
from celery_dbsched.repository import JobRepository

TABLES = {"dbsched_job", "dbsched_job_run", VERSION_TABLE}


def _versions(repository: JobRepository) -> list[str]:
    with repository.engine.connect() as conn:
        return [row[0] for row in conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}"))]


def _tables(repository: JobRepository) -> set[str]:
    return set(inspect(repository.engine).get_table_names()) & TABLES


def test_migrate_a_fresh_database_then_again(database: Any) -> None:
    repository = database.repository()
    assert _tables(repository) == set()
    assert current_revision(repository.engine) is None
    assert migrate(repository.engine) is None  # nothing there before
    assert _tables(repository) == TABLES
    assert current_revision(repository.engine) == head_revision()
    assert migrate(repository.engine) == head_revision()  # idempotent: already at head
    assert _versions(repository) == [head_revision()]
    check_schema(repository.engine)  # does not raise
    prepare_schema(repository.engine, auto_migrate=False)
    prepare_schema(repository.engine, auto_migrate=True)
    assert _versions(repository) == [head_revision()]


def test_the_migrated_schema_works(database: Any) -> None:
    repository = database.repository()
    prepare_schema(repository.engine, auto_migrate=True)
    repository.upsert_job("j", "a job")
    [run] = repository.claim_runs("beat", 10).runs
    assert repository.start_run(run.id, "w").status == "running"


def test_the_schema_enforces_one_active_run_per_job(database: Any) -> None:
    """The unique partial index, not the repository's query, is what guarantees it (design §2)."""
    repository = database.migrated_repository()
    repository.upsert_job("j", "a job")
    now = repository.database_now().replace(tzinfo=None).isoformat(sep=" ")  # a text every database reads as UTC
    insert = text(
        "INSERT INTO dbsched_job_run (job_name, status, claimed_by, create_time, update_time) "
        "VALUES ('j', :status, 'b', :now, :now)"
    )
    with repository.engine.begin() as conn:
        conn.execute(insert, {"status": "queued", "now": now})
        conn.execute(insert, {"status": "completed", "now": now})  # final runs do not count
    with pytest.raises(Exception, match=r"(?i)unique|duplicate entry"), repository.engine.begin() as conn:
        conn.execute(insert, {"status": "running", "now": now})


def _migrate_in_a_process(url: str, start: Any, results: Any) -> None:
    engine = make_engine(url)
    try:
        start.wait(60)  # everyone imported and ready: migrate at the same instant
        results.put(("ok", migrate(engine)))
    except BaseException as exc:
        results.put(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        engine.dispose()


@pytest.mark.processes  # multiprocessing
def test_several_processes_migrating_at_once_migrate_once(database: Any) -> None:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    start = context.Barrier(4)
    processes = [context.Process(target=_migrate_in_a_process, args=(database.url, start, results)) for _ in range(4)]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    assert all(kind == "ok" for kind, _ in outcomes), outcomes
    # Exactly one found the database fresh; the others found it at head, already migrated.
    assert sorted(outcomes, key=lambda outcome: str(outcome[1])) == [("ok", head_revision())] * 3 + [("ok", None)]
    repository = database.repository()
    assert _versions(repository) == [head_revision()]
    assert _tables(repository) == TABLES


def test_a_fresh_database_needs_the_migrate_command(database: Any) -> None:
    repository = database.repository()
    for check in (lambda: check_schema(repository.engine), lambda: prepare_schema(repository.engine, False)):
        with pytest.raises(SchemaMismatch, match="no celery_dbsched tables") as excinfo:
            check()
        assert "celery -A proj dbsched migrate" in str(excinfo.value)
        assert head_revision() in str(excinfo.value)
    assert _tables(repository) == set()  # checking created nothing


def _set_revision(repository: JobRepository, revision: str) -> None:
    with repository.engine.begin() as conn:
        conn.execute(text(f"UPDATE {VERSION_TABLE} SET version_num = :revision"), {"revision": revision})


def test_a_schema_newer_than_this_code_is_refused_clearly(database: Any) -> None:
    repository = database.migrated_repository()
    _set_revision(repository, "9999_from_the_future")
    checks = [
        lambda: check_schema(repository.engine),
        lambda: prepare_schema(repository.engine, auto_migrate=False),
        lambda: prepare_schema(repository.engine, auto_migrate=True),
        lambda: migrate(repository.engine),
    ]
    for check in checks:
        with pytest.raises(SchemaMismatch, match="newer than this celery_dbsched") as excinfo:
            check()
        assert "'9999_from_the_future'" in str(excinfo.value)
        assert "upgrade celery_dbsched" in str(excinfo.value)
    assert _versions(repository) == ["9999_from_the_future"]  # left alone


def test_an_unreachable_database_is_database_unavailable() -> None:
    engine = make_engine("postgresql+psycopg://postgres@127.0.0.1:1/test", {"connect_args": {"connect_timeout": 5}})
    try:
        for auto_migrate in (True, False):
            with pytest.raises(DatabaseUnavailable):
                prepare_schema(engine, auto_migrate=auto_migrate)
    finally:
        engine.dispose()


def test_0005_moves_the_interrupt_reason_into_its_column(database: Any) -> None:
    """Interrupted runs from before 0005 get their reason from the start of their error text; a downgrade
    drops the column and leaves the runs as they were."""
    from alembic import command

    from celery_dbsched.migrate import _config
    from celery_dbsched.states import InterruptReason

    engine = make_engine(database.url)
    try:
        with engine.begin() as conn:
            command.upgrade(_config(conn), "0004")
        errors = {
            "stalled: no progress within the interrupt threshold": "interrupted",
            "shutdown: w1 shut down": "interrupted",
            "restart: left behind by beat-1": "interrupted",
            "cancelled": "interrupted",  # interrupt_run without a detail: the bare reason
            "cancelled: by an operator": "interrupted",
            "expired: not started before its slot + expires": "interrupted",
            "stalledness: not a reason": "interrupted",
            "stalled: but it failed": "failed",  # only interrupted runs have a reason
            "": "completed",
        }
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO dbsched_job (name, description, next_scheduled_run, create_time, update_time) "
                    "VALUES ('j', 'old', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
                )
            )
            for error, status in errors.items():
                conn.execute(
                    text(
                        "INSERT INTO dbsched_job_run (job_name, status, error, claimed_by, create_time, update_time) "
                        "VALUES ('j', :s, :e, 'old-beat', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
                    ),
                    {"s": status, "e": error or None},
                )
        with engine.begin() as conn:
            command.upgrade(_config(conn), "head")
        repository = database.repository()
        found = {run.error or "": run.interrupt_reason for run in repository.list_runs("j")}
        assert found == {
            "stalled: no progress within the interrupt threshold": InterruptReason.STALLED,
            "shutdown: w1 shut down": InterruptReason.SHUTDOWN,
            "restart: left behind by beat-1": InterruptReason.RESTART,
            "cancelled": InterruptReason.CANCELLED,
            "cancelled: by an operator": InterruptReason.CANCELLED,
            "expired: not started before its slot + expires": InterruptReason.EXPIRED,
            "stalledness: not a reason": None,
            "stalled: but it failed": None,
            "": None,
        }
        with pytest.raises(Exception, match=r"(?i)check|constraint .* failed"), engine.begin() as conn:
            conn.execute(text("UPDATE dbsched_job_run SET interrupt_reason = 'bored'"))

        with engine.begin() as conn:
            command.downgrade(_config(conn), "0004")
        assert current_revision(engine) == "0004"
        columns = {column["name"] for column in inspect(engine).get_columns("dbsched_job_run")}
        assert "interrupt_reason" not in columns and "error" in columns
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM dbsched_job_run")).scalar_one() == len(errors)
        with engine.begin() as conn:
            command.upgrade(_config(conn), "head")
        assert current_revision(engine) == head_revision()
        assert {run.error or "": run.interrupt_reason for run in repository.list_runs("j")} == found  # again
    finally:
        engine.dispose()


def test_0006_adds_the_registration_and_stop_stamps_in_place(database: Any) -> None:
    """0006 adds `dbsched_job.registered_time` and `dbsched_job_run.stopped_time` (NULL for what exists) without
    copying the tables, so the active-run triggers of 0003 still count; a downgrade drops both."""
    import datetime as dt

    from alembic import command

    from celery_dbsched.migrate import _config

    engine = make_engine(database.url)
    repository = JobRepository(engine)
    try:
        with engine.begin() as conn:
            command.upgrade(_config(conn), "0005")
            conn.execute(
                text(
                    "INSERT INTO dbsched_job (name, description, next_scheduled_run, create_time, update_time) "
                    "VALUES ('j', 'old', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
                )
            )
        assert migrate(engine) == "0005"
        [run] = repository.claim_runs("beat", 10).runs
        assert repository.lookup_job("j").active_runs == 1  # the trigger survived the upgrade
        repository.start_run(run.id, "w1")
        repository.interrupt_job_runs("j")
        assert repository.lookup_job("j").active_runs == 0
        assert repository.run_stopped_time(run.id) is None
        repository.mark_run_stopped(run.id)
        stopped = repository.run_stopped_time(run.id)
        assert stopped is not None and abs(stopped - repository.database_now()) < dt.timedelta(minutes=1)
        repository.mark_registered(["j"])
        assert repository.orphaned_jobs() == {}

        with engine.begin() as conn:
            command.downgrade(_config(conn), "0005")
        assert "registered_time" not in {column["name"] for column in inspect(engine).get_columns("dbsched_job")}
        assert "stopped_time" not in {column["name"] for column in inspect(engine).get_columns("dbsched_job_run")}
        assert migrate(engine) == "0005"
        assert repository.run_stopped_time(run.id) is None  # back at head: the runs kept, the stamp not
    finally:
        repository.close()
        engine.dispose()


def test_0008_adds_the_owner_one_off_and_expire_time_backfilled_from_kind(database: Any) -> None:
    """0008 adds `dbsched_job.origin` (a job of kind "job" came from code, a plain task from beat_schedule),
    `one_off` (false) and `expire_time` (NULL) in place; a downgrade drops them and keeps the jobs."""
    from alembic import command

    from celery_dbsched.migrate import _config
    from celery_dbsched.states import Origin

    engine = make_engine(database.url)
    repository = JobRepository(engine)
    insert = text(
        "INSERT INTO dbsched_job (name, description, kind, task, next_scheduled_run, create_time, update_time) "
        "VALUES (:name, 'old', :kind, :task, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
    )
    try:
        with engine.begin() as conn:
            command.upgrade(_config(conn), "0007")
            conn.execute(insert, {"name": "code-job", "kind": "job", "task": None})
            conn.execute(insert, {"name": "entry", "kind": "task", "task": "proj.tasks.entry"})
        assert migrate(engine) == "0007"
        jobs = {job.name: job for job in repository.list_jobs()}
        assert {name: job.origin for name, job in jobs.items()} == {
            "code-job": Origin.CODE,
            "entry": Origin.BEAT_SCHEDULE,
        }
        assert not any(job.one_off or job.expire_time for job in jobs.values())
        columns = {column["name"]: column for column in inspect(engine).get_columns("dbsched_job")}
        assert not columns["origin"]["nullable"] and not columns["one_off"]["nullable"]
        assert columns["expire_time"]["nullable"]
        with pytest.raises(Exception, match=r"(?i)null"), engine.begin() as conn:
            conn.execute(text("UPDATE dbsched_job SET origin = NULL"))

        with engine.begin() as conn:
            command.downgrade(_config(conn), "0007")
        assert not {"origin", "one_off", "expire_time"} & {
            c["name"] for c in inspect(engine).get_columns("dbsched_job")
        }
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM dbsched_job")).scalar_one() == 2
        assert migrate(engine) == "0007"
        assert {job.name: job.origin for job in repository.list_jobs()} == {
            "code-job": Origin.CODE,
            "entry": Origin.BEAT_SCHEDULE,
        }
    finally:
        repository.close()
        engine.dispose()


def test_0008_on_an_empty_database_stores_runtime_jobs(database: Any) -> None:
    from celery_dbsched.job import JobDefinition
    from celery_dbsched.records import RuntimeEntry
    from celery_dbsched.schedules import IntervalSchedule
    from celery_dbsched.states import Origin

    repository = database.repository()
    assert migrate(repository.engine) is None
    assert current_revision(repository.engine) == head_revision() == "0008"
    definition = JobDefinition(
        "rt", "runtime", kind="task", task="t", schedule=IntervalSchedule(60), origin=Origin.RUNTIME, one_off=True
    )
    record = repository.add_runtime_job(RuntimeEntry(definition))
    assert record.origin == Origin.RUNTIME and record.one_off and record.expire_time is None


def test_every_earlier_revision_upgrades_to_head_keeping_its_jobs_and_active_runs(database: Any) -> None:
    """From an empty database at each revision (reached by downgrading to nothing and upgrading to it), with a
    job and its running run stored there, `migrate` reaches head: the job is kept, its run counted active, and a
    second active run of it refused by the database (on MySQL/MariaDB through the generated column)."""
    from alembic import command
    from alembic.script import ScriptDirectory
    from sqlalchemy.exc import IntegrityError

    from celery_dbsched.migrate import _config

    revisions = [script.revision for script in ScriptDirectory.from_config(_config()).walk_revisions()][::-1]
    engine = make_engine(database.url)
    repository = JobRepository(engine)
    insert_run = text(
        "INSERT INTO dbsched_job_run (job_name, status, claimed_by, create_time, update_time) "
        "VALUES ('j', 'running', 'old-beat', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
    )
    try:
        for revision in revisions[:-1]:
            with engine.begin() as conn:
                command.downgrade(_config(conn), "base")
            with engine.begin() as conn:
                command.upgrade(_config(conn), revision)
                conn.execute(
                    text(
                        "INSERT INTO dbsched_job (name, description, next_scheduled_run, create_time, update_time) "
                        "VALUES ('j', 'old', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
                    )
                )
                conn.execute(insert_run)
            assert migrate(engine) == revision
            assert current_revision(engine) == head_revision()
            assert repository.lookup_job("j").active_runs == 1, revision
            with pytest.raises(IntegrityError), engine.begin() as conn:
                conn.execute(insert_run)
    finally:
        repository.close()
        engine.dispose()
