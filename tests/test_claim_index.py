"""Claims and idle ticks cost what is due, not what exists (issue 5; revision 0003).

Each job's `active_runs` is kept by triggers on the runs table; the due index holds only claimable jobs. The
counter must equal the runs table after every transition, whoever makes it, or a job would be claimed twice
(counter too low: the unique index still refuses the second run) or never again (counter too high).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from helpers.repository import claim_one
from sqlalchemy import delete, event, select, text, update

from celery_dbsched import JobRepository
from celery_dbsched.clock import TestClock
from celery_dbsched.engine import make_engine
from celery_dbsched.migrate import current_revision, head_revision
from celery_dbsched.schema import job_table, run_table
from celery_dbsched.states import ACTIVE

HOUR = dt.timedelta(hours=1)


def counted(repository: JobRepository) -> dict[str, int]:
    with repository.engine.connect() as conn:
        return {row.name: row.active_runs for row in conn.execute(select(job_table.c.name, job_table.c.active_runs))}


def actual(repository: JobRepository) -> dict[str, int]:
    r = run_table
    with repository.engine.connect() as conn:
        names = [row[0] for row in conn.execute(select(job_table.c.name))]
        rows = conn.execute(select(r.c.job_name, r.c.id).where(r.c.status.in_(ACTIVE), r.c.slot >= 0)).all()
    counts = dict.fromkeys(names, 0)
    for name, _ in rows:
        counts[name] += 1
    return counts


@pytest.fixture
def checked(repository: JobRepository) -> Iterator[Callable[[str], None]]:
    """check(step): the counters equal the runs table; counts the checks made."""
    made: list[str] = []

    def check(step: str) -> None:
        assert counted(repository) == actual(repository), f"after {step}"
        made.append(step)

    yield check
    assert made


def due_now(repository: JobRepository, name: str) -> None:
    repository.update_job_next_run_in_at_least(name, dt.timedelta(0))


def test_the_counter_follows_every_transition(
    repository: JobRepository, clock: TestClock, checked: Callable[[str], None]
) -> None:
    repository.upsert_job("job", "a job", every=HOUR)
    checked("registration")
    run = claim_one(repository, "job", server_id="beat")
    assert repository.lookup_job("job").active_runs == 1
    checked("claim")
    assert repository.next_due_in() is None  # its only slot is taken: not claimable, not due
    repository.start_run(run.id, "w1")
    checked("start")
    repository.update_progress(run.id, 1, 2)
    checked("progress")
    repository.complete_run(run.id, dt.timedelta(0))
    checked("complete")

    run = claim_one(repository, "job", server_id="beat")
    repository.fail_run(run.id, "boom")
    checked("fail while queued")
    due_now(repository, "job")
    run = claim_one(repository, "job", server_id="beat")
    repository.start_run(run.id, "w1")
    repository.interrupt_run(run.id)
    checked("interrupt")
    due_now(repository, "job")
    run = claim_one(repository, "job", server_id="beat")
    assert repository.interrupt_runs(server_id="beat")  # the beat restarted: its queued run ends
    checked("restart")
    run = claim_one(repository, "job", server_id="beat")
    assert repository.interrupt_job_runs("job")
    checked("cancel")

    # Two slots: each active run counts; the job stays claimable until both are taken.
    repository.upsert_job("wide", "two at once", every=dt.timedelta(seconds=1), max_active=2)
    first = claim_one(repository, "wide", server_id="beat")
    clock.advance(dt.timedelta(seconds=2))
    second = claim_one(repository, "wide", server_id="beat")
    assert {first.slot, second.slot} == {0, 1}
    assert repository.lookup_job("wide").active_runs == 2
    checked("two slots")
    repository.start_run(second.id, "w2")
    repository.complete_run(second.id)
    checked("one of two ends")

    # A plain task: dispatched is final; a tracked task runs outside the slots (slot = -id).
    repository.upsert_job("entry", "beat_schedule: t", kind="task", task="t", every=HOUR)
    task_run = claim_one(repository, "entry", server_id="beat")
    checked("task claimed")
    repository.dispatch_run(task_run.id, "task-id")
    checked("task dispatched")
    repository.track_start(task_run.id, "w1", "task-id")
    checked("task tracked")
    repository.track_end(task_run.id)
    checked("task ended")

    # Removing runs (pruning, or an operator's DELETE) and a job with its runs.
    with repository.engine.begin() as conn:
        conn.execute(delete(run_table).where(run_table.c.id == first.id))
    checked("run deleted")
    with repository.engine.begin() as conn:
        conn.execute(delete(job_table).where(job_table.c.name == "wide"))
    checked("job deleted")


def test_an_operator_update_of_a_run_is_counted_too(repository: JobRepository, checked: Callable[[str], None]) -> None:
    """Kept by the database, not by this code: a run ended by hand frees the job's slot."""
    repository.upsert_job("job", "a job", every=HOUR)
    run = claim_one(repository, "job", server_id="beat")
    with repository.engine.begin() as conn:
        conn.execute(update(run_table).where(run_table.c.id == run.id).values(status="interrupted"))
    checked("ended by hand")
    assert repository.next_due_in() is not None


def test_many_runs_claimed_in_one_statement_are_all_counted(
    repository: JobRepository, checked: Callable[[str], None]
) -> None:
    for n in range(50):
        repository.upsert_job(f"j{n:02}", "a job", every=HOUR)
    assert len(repository.claim_runs("beat", 30).runs) == 30
    checked("a batch of 30")
    assert len(repository.claim_runs("beat", 30).runs) == 20  # the rest: the first 30 are no longer claimable
    checked("the rest")
    assert repository.claim_runs("beat", 30).runs == []
    for n in range(5):
        checked(f"idle {n}")


def test_a_job_with_several_slots_takes_its_own_next_free_slot(repository: JobRepository, clock: TestClock) -> None:
    """The free slot is searched among the job's own runs, whatever slots other jobs hold."""
    second = dt.timedelta(seconds=1)
    repository.upsert_job("a", "two at once, every 10 s", every=10 * second, max_active=2)
    repository.upsert_job("b", "two at once, every second", every=second, max_active=2)
    assert {(run.job_name, run.slot) for run in repository.claim_runs("beat", 10).runs} == {("a", 0), ("b", 0)}
    clock.advance(2 * second)
    assert [(run.job_name, run.slot) for run in repository.claim_runs("beat", 10).runs] == [("b", 1)]
    clock.advance(10 * second)
    # a holds slot 0, b holds 0 and 1 (full): a's next free slot is 1; b's slot 1 is not a's.
    assert [(run.job_name, run.slot) for run in repository.claim_runs("beat", 10).runs] == [("a", 1)]


# -- plans: what an idle tick and a claim read (PostgreSQL) ------------------------------------------------


def statements_of(repository: JobRepository, action: Callable[[], Any]) -> list[tuple[str, Any]]:
    seen: list[tuple[str, Any]] = []

    def before(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        seen.append((statement, parameters))

    event.listen(repository.engine, "before_cursor_execute", before)
    try:
        action()
    finally:
        event.remove(repository.engine, "before_cursor_execute", before)
    return seen


def plan(repository: JobRepository, statement: str, parameters: Any) -> str:
    with repository.engine.connect() as conn:
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        cursor.execute("BEGIN")
        cursor.execute("EXPLAIN " + statement, parameters)
        lines = "\n".join(row[0] for row in cursor.fetchall())
        cursor.execute("ROLLBACK")
    return lines


@pytest.mark.postgres
def test_idle_tick_and_claim_are_range_scans_of_the_claimable_index(postgres_database: Any) -> None:
    repository = postgres_database.migrated_repository()
    with repository.engine.begin() as conn:
        # 20,000 jobs, 19,990 of them running: none of those may be read by a tick or a claim.
        conn.execute(
            text(
                "INSERT INTO dbsched_job (name, description, next_scheduled_run, create_time, update_time) "
                "SELECT 'j' || g, 'bulk', now() - interval '1 hour', now(), now() FROM generate_series(1, 20000) g"
            )
        )
        conn.execute(
            text(
                "INSERT INTO dbsched_job_run (job_name, status, claimed_by, create_time, update_time) "
                "SELECT 'j' || g, 'running', 'bulk', now(), now() FROM generate_series(11, 20000) g"
            )
        )
    with repository.engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("ANALYZE"))
    assert repository.lookup_job("j5000").active_runs == 1

    [(idle, idle_params)] = statements_of(repository, repository.next_due_in)
    idle_plan = plan(repository, idle, idle_params)
    assert "dbsched_job_claimable" in idle_plan and "Seq Scan" not in idle_plan, idle_plan

    claims = statements_of(repository, lambda: repository.claim_runs("beat", 1000).runs)
    [(claim_sql, claim_params)] = [(s, p) for s, p in claims if s.startswith("INSERT INTO dbsched_job_run")]
    claim_plan = plan(repository, claim_sql, claim_params)
    assert "dbsched_job_claimable" in claim_plan and "Seq Scan on dbsched_job " not in claim_plan, claim_plan
    assert len(repository.list_runs(status="queued", limit=100)) == 10
    # The misfire check reads only jobs with the skip policy (none here): no scan of the job table.
    misfire = [s for s, _ in claims if "misfire" in s and s.lstrip().startswith("SELECT")]
    assert misfire, [s[:80] for s, _ in claims]
    assert "Seq Scan" not in plan(repository, misfire[0], next(p for s, p in claims if s == misfire[0]))


def test_the_index_is_used_on_sqlite_too(sqlite_database: Any) -> None:
    """SQLite uses a partial index only when the query repeats its predicate as written."""
    repository = sqlite_database.migrated_repository()
    repository.upsert_job("job", "a job")
    [(idle, params)] = [(s, p) for s, p in statements_of(repository, repository.next_due_in) if s.startswith("SELECT")]
    with repository.engine.connect() as conn:
        rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + idle, params).all()
    assert any("dbsched_job_claimable" in str(row) for row in rows), rows


# -- the migration -----------------------------------------------------------------------------------------


def test_upgrading_counts_the_runs_already_active(database: Any) -> None:
    from alembic import command

    from celery_dbsched.migrate import _config

    engine = make_engine(database.url)
    try:
        with engine.begin() as conn:
            command.upgrade(_config(conn), "0002")
        with engine.begin() as conn:
            for name in ("idle", "busy"):
                conn.execute(
                    text(
                        "INSERT INTO dbsched_job (name, description, next_scheduled_run, create_time, update_time) "
                        "VALUES (:n, 'old', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
                    ),
                    {"n": name},
                )
            for status in ("running", "completed", "failed"):
                conn.execute(
                    text(
                        "INSERT INTO dbsched_job_run (job_name, status, claimed_by, create_time, update_time) "
                        "VALUES ('busy', :s, 'old-beat', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
                    ),
                    {"s": status},
                )
        with engine.begin() as conn:
            command.upgrade(_config(conn), "head")
        repository = database.repository()
        assert {n: repository.lookup_job(n).active_runs for n in ("idle", "busy")} == {"idle": 0, "busy": 1}
        assert [run.job_name for run in repository.claim_runs("beat", 10).runs] == ["idle"]
        with engine.begin() as conn:
            command.downgrade(_config(conn), "0002")
        with engine.begin() as conn:
            command.upgrade(_config(conn), "head")
        assert current_revision(engine) == head_revision()
        assert repository.lookup_job("busy").active_runs == 1 and repository.lookup_job("idle").active_runs == 1
    finally:
        engine.dispose()
