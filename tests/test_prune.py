"""Batched pruning of the run history (issue 9, goal 7): `JobRepository.prune_runs` deletes every final run
older than the retention, oldest first, in transactions of at most `batch` rows, and never an active run or a
recent one; the beat prunes at a cadence derived from the retention."""

from __future__ import annotations

import datetime as dt
import os
import time
import uuid
from typing import Any

import pytest
from celery import Celery
from helpers.repository import bind_clock
from helpers.services import Database
from sqlalchemy import event

from celery_dbsched import JobRepository, observe
from celery_dbsched.binding import forget_repository
from celery_dbsched.clock import TestClock
from celery_dbsched.scheduler import PRUNE_EVERY, Scheduler, prune_interval

DAY = dt.timedelta(days=1)


def _final_runs(repository: JobRepository, count: int, jobs: int = 1, prefix: str = "p") -> list[int]:
    """`count` completed runs spread over `jobs` jobs (claim, start, complete due again at once; repeat)."""
    assert count % jobs == 0
    for j in range(jobs):
        repository.upsert_job(f"{prefix}{j}", "prune test")
    ids: list[int] = []
    while len(ids) < count:
        runs = [run for run in repository.claim_runs("beat-1", 1000).runs if run.job_name.startswith(prefix)]
        assert len(runs) == jobs, "every job is due again at once"
        for run in runs:
            repository.start_run(run.id, "w")
            repository.complete_run(run.id, dt.timedelta(0))
            ids.append(run.id)
    return ids


class Deletes:
    """Counts DELETE statements on the repository's engine and the rows each deleted."""

    def __init__(self, repository: JobRepository) -> None:
        self.rows: list[int] = []
        self.engine = repository.engine
        event.listen(self.engine, "after_cursor_execute", self._after)

    def _after(self, conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        if statement.lstrip().upper().startswith("DELETE"):
            self.rows.append(cursor.rowcount)

    def remove(self) -> None:
        event.remove(self.engine, "after_cursor_execute", self._after)


@pytest.mark.slow
def test_prunes_everything_old_in_bounded_batches(repository: JobRepository, clock: TestClock) -> None:
    old = _final_runs(repository, 23)
    clock.shift_to(2 * DAY)
    deletes = Deletes(repository)
    try:
        assert repository.prune_runs(DAY, batch=5) == 23
    finally:
        deletes.remove()
    # ceil(23 / 5) = 5 full-or-partial batches, each at most 5 rows; the last one is short, so it stops there.
    assert deletes.rows == [5, 5, 5, 5, 3]
    remaining = {run.id for run in repository.list_runs(limit=1000)}
    assert remaining.isdisjoint(old)
    assert repository.prune_runs(DAY, batch=5) == 0


def test_an_exact_multiple_of_the_batch_ends_with_one_empty_batch(repository: JobRepository, clock: TestClock) -> None:
    _final_runs(repository, 10)
    clock.shift_to(2 * DAY)
    deletes = Deletes(repository)
    try:
        assert repository.prune_runs(DAY, batch=5) == 10
    finally:
        deletes.remove()
    assert deletes.rows == [5, 5, 0]


def test_never_prunes_an_active_run_nor_a_recent_one(repository: JobRepository, clock: TestClock) -> None:
    old = _final_runs(repository, 12, jobs=3)
    # Active runs, claimed long ago: p0 running, p1 and p2 queued (claimed just now, after the loop above).
    active = repository.claim_runs("beat-1", 1000).runs
    assert {run.job_name for run in active} == {"p0", "p1", "p2"}
    running = next(run for run in active if run.job_name == "p0")
    repository.start_run(running.id, "w")
    clock.shift_to(2 * DAY)
    # A final run that ended recently (on the shifted clock): p0's run completes now.
    repository.complete_run(running.id, dt.timedelta(hours=1))
    assert repository.prune_runs(DAY, batch=4) == 12
    left = {run.id: run.status for run in repository.list_runs(limit=1000)}
    assert set(left).isdisjoint(old)
    assert left == {run.id: ("completed" if run.job_name == "p0" else "queued") for run in active}
    clock.shift_to(30 * DAY)
    assert repository.prune_runs(DAY, batch=4) == 1  # p0's run, now old; the queued ones stay
    assert {run.status for run in repository.list_runs(limit=1000)} == {"queued"}


def test_max_rows_bounds_one_call_and_takes_the_oldest_first(repository: JobRepository, clock: TestClock) -> None:
    _final_runs(repository, 9)
    ended = {run.id: run.end_time for run in repository.list_runs(limit=1000)}
    clock.shift_to(2 * DAY)
    assert repository.prune_runs(DAY, batch=2, max_rows=5) == 5
    left = {run.id for run in repository.list_runs(limit=1000)}
    pruned = set(ended) - left
    assert len(left) == 4 and max(ended[i] for i in pruned) <= min(ended[i] for i in left), "oldest first"
    assert repository.prune_runs(DAY, batch=2, max_rows=5) == 4
    assert repository.list_runs(limit=1000) == []


def test_batch_must_be_positive(repository: JobRepository) -> None:
    with pytest.raises(ValueError, match="batch"):
        repository.prune_runs(DAY, batch=0)


def test_prune_cadence_follows_the_retention() -> None:
    assert prune_interval(dt.timedelta(days=7)) == PRUNE_EVERY.total_seconds()
    assert prune_interval(dt.timedelta(minutes=2)) == 12.0
    assert prune_interval(dt.timedelta(seconds=3)) == 1.0


@pytest.mark.slow
def test_the_beat_prunes_at_a_tenth_of_the_retention(database: Database) -> None:
    repository = database.migrated_repository()
    app = Celery(f"prune-{uuid.uuid4().hex[:8]}", set_as_current=False)
    app.conf.update(
        broker_url="memory://",
        dbsched_database_url=database.url,
        dbsched_listen=False,
        dbsched_run_retention=dt.timedelta(seconds=10),  # prune every second
        dbsched_monitor_interval=dt.timedelta(seconds=0.05),
    )
    bind_clock(app, TestClock(offset=DAY))  # on the beat's clock every run ended long ago
    scheduler = Scheduler(app=app)
    try:
        _final_runs(repository, 3, prefix="a")
        # Before the tick: the first tick also prepares the beat (migrate, sync), so its end can come well after
        # the prune it made; the interval is counted from the prune, which is no earlier than this.
        first_prune = time.monotonic()
        scheduler.tick()
        assert repository.list_runs(status="completed") == [], "the first monitor step prunes"
        _final_runs(repository, 3, prefix="b")
        time.sleep(0.1)
        scheduler.tick()
        assert len(repository.list_runs(status="completed")) == 3, "not again before the prune interval"
        deadline = time.monotonic() + 10
        while repository.list_runs(status="completed"):
            assert time.monotonic() < deadline, "the beat never pruned again"
            time.sleep(0.05)
            scheduler.tick()
        assert time.monotonic() - first_prune >= 0.9
    finally:
        scheduler.close()
        forget_repository(app)


def test_the_beat_writes_its_row_and_prunes_the_rows_of_dead_servers(database: Database) -> None:
    repository = database.migrated_repository()
    repository.heartbeat("celery@gone", "worker", "old-host", 1, interval=1.0)  # seen a day ago, on the beat's clock
    app = Celery(f"prune-{uuid.uuid4().hex[:8]}", set_as_current=False)
    app.conf.update(
        broker_url="memory://",
        dbsched_database_url=database.url,
        dbsched_listen=False,
        dbsched_server_id="beat-prunes",
        dbsched_server_retention=dt.timedelta(hours=1),
    )
    bind_clock(app, TestClock(offset=DAY))
    scheduler = Scheduler(app=app)
    try:
        scheduler.tick()  # the first tick runs the monitor step, which prunes, then writes the beat's heartbeat
        [beat] = observe.fleet(repository).servers
        assert (beat.id, beat.role, beat.pid, beat.heartbeat_interval) == ("beat-prunes", "beat", os.getpid(), 5.0)
        assert beat.claims_last_minute == 0 and beat.claim_lag_p50 is None
    finally:
        scheduler.close()
        forget_repository(app)
