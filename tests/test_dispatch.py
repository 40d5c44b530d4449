"""The beat's claim and publish path for plain tasks (`beat_schedule` entries) at scale (issue 9).

A batch of plain tasks costs a constant number of statements whatever its size (the claim returns what the
messages are built from; one statement marks the batch `dispatched`), no statement's parameters grow with
the batch, the next batch is claimed while this one is published, and two beats share a backlog.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from helpers.repository import add_due_tasks
from helpers.services import Database
from sqlalchemy import event, text

from celery_dbsched import Scheduler
from celery_dbsched.protocol import RUN_ID_HEADER
from celery_dbsched.repository import JobRepository
from celery_dbsched.states import RunState

Factory = Callable[..., Scheduler]


@pytest.fixture
def make_scheduler(make_scheduler: Factory) -> Factory:
    """The shared factory (conftest.py), each beat with a server id of its own."""

    def factory(database_url: str, **conf: Any) -> Scheduler:
        return make_scheduler(database_url, **{"dbsched_server_id": f"beat-{uuid.uuid4().hex[:8]}", **conf})

    return factory


def enable_all(repository: JobRepository) -> None:
    with repository.engine.begin() as conn:
        conn.execute(text("UPDATE dbsched_job SET enabled = true"))


class Sent:
    """Counts what a scheduler publishes (plain tasks), by run id."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.run_ids: list[int] = []
        publisher = scheduler._publisher
        real = publisher.publish_task

        def publish_task(
            producer: Any, name: str, args: Any, kwargs: Any, options: Any, headers: Any, **kw: Any
        ) -> str:
            task_id = real(producer, name, args, kwargs, options, headers, **kw)
            self.run_ids.append(headers[RUN_ID_HEADER])
            return task_id

        publisher.publish_task = publish_task  # type: ignore[method-assign]


def statements_during(repository_engine: Any, action: Callable[[], Any]) -> list[tuple[str, Any]]:
    seen: list[tuple[str, Any]] = []

    def before(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        seen.append((statement, parameters))

    event.listen(repository_engine, "before_cursor_execute", before)
    try:
        action()
    finally:
        event.remove(repository_engine, "before_cursor_execute", before)
    return seen


def tick_until(scheduler: Scheduler, done: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "not all published in time"
        sleep = scheduler.tick()
        if sleep > 0 and not done():
            time.sleep(min(sleep, 0.05))


def status_counts(repository: JobRepository) -> Counter[str]:
    with repository.engine.connect() as conn:
        return Counter(dict(conn.execute(text("SELECT status, count(*) FROM dbsched_job_run GROUP BY status")).all()))


def duplicates(repository: JobRepository) -> int:
    with repository.engine.connect() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT count(*) FROM (SELECT job_name, scheduled_for FROM dbsched_job_run "
                    "GROUP BY job_name, scheduled_for HAVING count(*) > 1) d"
                )
            ).scalar_one()
        )


@pytest.mark.slow
def test_a_batch_of_plain_tasks_costs_a_constant_number_of_statements(
    database: Database, make_scheduler: Factory
) -> None:
    """Before issue 9: a statement per send to mark it dispatched, one per claimed job to move it to its next
    slot, and an `IN (...)` list as long as the batch. Now: the same few statements for 20 or 1,500 tasks, and
    no statement carries more than a handful of parameters."""
    repository = database.migrated_repository()
    counts = {}
    for size in (20, 1500):
        scheduler = make_scheduler(database.url, dbsched_run_jobs_limit=5000)  # its start-up is not counted
        scheduler._next_monitor = time.monotonic() + 3600  # nor the monitor
        scheduler._next_heartbeat = time.monotonic() + 3600  # nor the beat's row (once per interval, not per batch)
        with repository.engine.begin() as conn:
            conn.execute(text("DELETE FROM dbsched_job_run"))
            conn.execute(text("DELETE FROM dbsched_job"))
        add_due_tasks(repository, size)
        sent = Sent(scheduler)
        statements = statements_during(scheduler.repository.engine, scheduler.tick)
        assert len(sent.run_ids) == size
        assert status_counts(repository) == Counter({RunState.DISPATCHED: size})
        counts[size] = len(statements)
        biggest = max(len(params) if isinstance(params, (dict, list, tuple)) else 0 for _, params in statements)
        assert biggest <= 20, [s[:120] for s, p in statements if len(p) == biggest]
    assert counts[20] == counts[1500] <= 12, counts


def test_dispatched_runs_carry_the_task_ids_of_their_messages(database: Database, make_scheduler: Factory) -> None:
    repository = database.migrated_repository()
    scheduler = make_scheduler(database.url)
    add_due_tasks(repository, 50, options='{"priority": 3}')
    ids: dict[int, str] = {}
    real = scheduler._publisher.publish_task

    def publish_task(producer: Any, name: str, args: Any, kwargs: Any, options: Any, headers: Any, **kw: Any) -> str:
        ids[headers[RUN_ID_HEADER]] = real(producer, name, args, kwargs, options, headers, **kw)
        return ids[headers[RUN_ID_HEADER]]

    scheduler._publisher.publish_task = publish_task  # type: ignore[method-assign]
    tick_until(scheduler, lambda: len(ids) == 50)
    runs = {run.id: run for run in repository.list_runs(limit=100)}
    assert {run_id: run.task_id for run_id, run in runs.items()} == ids
    assert {run.status for run in runs.values()} == {RunState.DISPATCHED}
    # Each moved to its next slot (an hour on) at claim, in one statement for the batch.
    assert all(job.next_scheduled_run > repository.database_now() for job in repository.list_jobs())


def test_a_batch_claimed_ahead_and_never_published_is_recovered(database: Database, make_scheduler: Factory) -> None:
    """The next batch is claimed while this one is published. A beat killed in between leaves it queued: its
    next start ends those runs `interrupted` and their jobs are due again (as for any claimed, unpublished run)."""
    repository = database.migrated_repository()
    scheduler = make_scheduler(database.url, dbsched_run_jobs_limit=10)
    add_due_tasks(repository, 30)
    sent = Sent(scheduler)
    assert scheduler.tick() == 0.0  # a full batch: published, and the next one claimed ahead
    assert scheduler._next_claim is not None
    scheduler._next_claim.result()
    assert len(sent.run_ids) == 10
    deadline = time.monotonic() + 30  # the first batch is marked on a claim thread
    while (counts := status_counts(repository)) != Counter({RunState.DISPATCHED: 10, RunState.QUEUED: 10}):
        assert time.monotonic() < deadline, counts
        time.sleep(0.02)
    # Killed here: the claimed batch is never published. The same server id starts again.
    scheduler._next_claim = None
    server_id = scheduler.server_id
    again = make_scheduler(database.url, dbsched_server_id=server_id, dbsched_run_jobs_limit=100)
    enable_all(repository)  # the bulk entries are not in this app's beat_schedule: its start disabled them
    assert status_counts(repository) == Counter({RunState.DISPATCHED: 10, "interrupted": 10})
    resent = Sent(again)
    tick_until(again, lambda: len(resent.run_ids) == 20)
    assert status_counts(repository)[RunState.DISPATCHED] == 30
    with repository.engine.connect() as conn:
        # The interrupted slots were sent again: every job has exactly one dispatched run.
        assert (
            conn.execute(
                text("SELECT count(DISTINCT job_name) FROM dbsched_job_run WHERE status = 'dispatched'")
            ).scalar_one()
            == 30
        )


def test_closing_publishes_the_batch_claimed_ahead(database: Database, make_scheduler: Factory) -> None:
    repository = database.migrated_repository()
    scheduler = make_scheduler(database.url, dbsched_run_jobs_limit=10)
    add_due_tasks(repository, 20)
    sent = Sent(scheduler)
    assert scheduler.tick() == 0.0
    scheduler.close()
    assert len(sent.run_ids) == 20
    assert status_counts(repository) == Counter({RunState.DISPATCHED: 20})


# -- two beats (PostgreSQL) -------------------------------------------------------------------------------


@pytest.mark.postgres
def test_two_beats_share_a_backlog_of_plain_tasks(postgres_database: Database, make_scheduler: Factory) -> None:
    total = 6000
    repository = postgres_database.migrated_repository()
    beats = [make_scheduler(postgres_database.url, dbsched_run_jobs_limit=500) for _ in range(2)]
    add_due_tasks(repository, total)
    sent = [Sent(beat) for beat in beats]
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def run(beat: Scheduler) -> None:
        try:
            start.wait()
            tick_until(beat, lambda: sum(len(s.run_ids) for s in sent) >= total, timeout=120)
            beat.close()
        except BaseException as exc:  # pragma: no cover (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(beat,)) for beat in beats]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert not errors, errors
    shares = [len(s.run_ids) for s in sent]
    assert sum(shares) == total, shares
    assert all(0.3 * total <= share <= 0.7 * total for share in shares), shares
    assert duplicates(repository) == 0
    assert len(set(sent[0].run_ids) | set(sent[1].run_ids)) == total
    assert status_counts(repository) == Counter({RunState.DISPATCHED: total})


@pytest.mark.postgres
def test_a_beat_that_loses_a_claim_race_neither_waits_nor_sleeps_past_the_next_slot(
    postgres_database: Database, make_scheduler: Factory
) -> None:
    """Beat A's claim holds the due jobs (not committed yet). Beat B's tick does not queue behind it and does
    not sleep its interval: while jobs are due it comes back at once; once A has them, B sleeps until the
    next slot (here 3 s), not its 60 s interval."""
    repository = postgres_database.migrated_repository()
    a = make_scheduler(postgres_database.url, dbsched_run_jobs_interval=60)
    b = make_scheduler(postgres_database.url, dbsched_run_jobs_interval=60)
    add_due_tasks(repository, 200)
    with repository.engine.begin() as conn:
        conn.execute(text("UPDATE dbsched_job SET default_next_run_in = 3"))
    a._next_monitor = b._next_monitor = time.monotonic() + 3600  # only the claims are looked at
    holding, release = threading.Event(), threading.Event()
    real = a.repository._advance_claimed

    def advance_and_hold(conn: Any, runs: Any) -> Any:
        jobs = real(conn, runs)
        holding.set()
        assert release.wait(30)
        return jobs

    a.repository._advance_claimed = advance_and_hold  # type: ignore[method-assign]
    a_sent, b_sent = Sent(a), Sent(b)
    thread = threading.Thread(target=a.tick)
    thread.start()
    try:
        assert holding.wait(30)
        began = time.monotonic()
        sleep = b.tick()
        assert time.monotonic() - began < 5, "B waited for A's claim"
        assert sleep <= 0.05, sleep  # jobs are still due (held by A): ask again at once
        assert b_sent.run_ids == []
    finally:
        release.set()
        thread.join(30)
    assert len(a_sent.run_ids) == 200
    sleep = b.tick()
    assert 0 < sleep <= 3.0, sleep  # until the next slot, not the 60 s interval


def test_a_plain_task_whose_publish_fails_ends_failed_not_published(
    database: Database, make_scheduler: Factory
) -> None:
    repository = database.migrated_repository()
    scheduler = make_scheduler(database.url)
    add_due_tasks(repository, 5)
    real = scheduler._publisher.publish_task
    calls: list[int] = []

    def publish_task(producer: Any, name: str, args: Any, kwargs: Any, options: Any, headers: Any, **kw: Any) -> str:
        calls.append(headers[RUN_ID_HEADER])
        if len(calls) > 2:
            raise ConnectionError("broker gone")
        return real(producer, name, args, kwargs, options, headers, **kw)

    scheduler._publisher.publish_task = publish_task  # type: ignore[method-assign]
    scheduler.tick()
    runs = {run.id: run for run in repository.list_runs(limit=10)}
    assert [runs[run_id].status for run_id in calls] == [RunState.DISPATCHED, RunState.DISPATCHED, "failed"]
    failed = [run for run in runs.values() if run.status == "failed"]
    assert len(failed) == 3 and all("not published" in (run.error or "") for run in failed)
