"""JobRepository: every state transition, on SQLite and PostgreSQL (the `repository` fixture runs each test on
both). Time is moved with the repository's `clock` (a `TestClock`), never by sleeping."""

from __future__ import annotations

import datetime as dt
import itertools
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from helpers.repository import claim, claim_one
from sqlalchemy import select, update

from celery_dbsched import (
    InvalidRunState,
    JobNotFound,
    JobPolicy,
    JobRecord,
    JobRepository,
    JobStatus,
    RunNotFound,
    RunRecord,
    SchemaMismatch,
)
from celery_dbsched.clock import TestClock
from celery_dbsched.job import JobDefinition
from celery_dbsched.schema import job_table, run_table
from celery_dbsched.states import InterruptReason, JobKind, RunState

SECOND = dt.timedelta(seconds=1)
MINUTE = dt.timedelta(minutes=1)
HOUR = dt.timedelta(hours=1)
# SQLite stores milliseconds and computes the times of one transition in separate statements.
SLACK = dt.timedelta(seconds=1)


# -- helpers ------------------------------------------------------------------------------------------------


def add_job(repository: JobRepository, name: str, **kwargs: Any) -> JobRecord:
    return repository.upsert_job(name, f"the {name} job", **kwargs)


def running_run(repository: JobRepository, name: str, worker: str = "worker-1", **job_kwargs: Any) -> RunRecord:
    """A registered, due job with a run that a worker started."""
    add_job(repository, name, **job_kwargs)
    run = claim_one(repository, name)
    return repository.start_run(run.id, worker)


def set_job(repository: JobRepository, name: str, **values: Any) -> None:
    with repository.engine.begin() as conn:
        conn.execute(update(job_table).where(job_table.c.name == name).values(**values))


def all_runs(repository: JobRepository) -> list[RunRecord]:
    with repository.engine.begin() as conn:
        rows = conn.execute(select(run_table).order_by(run_table.c.id)).all()
    return [RunRecord.from_row(row) for row in rows]


def assert_close(actual: dt.datetime, expected: dt.datetime, slack: dt.timedelta = SLACK) -> None:
    assert abs(actual - expected) <= slack, f"{actual} is not within {slack} of {expected}"


def within(repository: JobRepository, action: Callable[[], Any]) -> tuple[dt.datetime, Any, dt.datetime]:
    """Run `action` between two readings of the database clock."""
    before = repository.database_now()
    result = action()
    after = repository.database_now()
    return before, result, after


# -- registration (design §8) ----------------------------------------------------------------------------------


def test_new_job_without_first_run_in_is_due_now(repository: JobRepository) -> None:
    before, job, after = within(repository, lambda: add_job(repository, "j"))
    assert before <= job.next_scheduled_run <= after
    assert job.name == "j"
    assert job.description == "the j job"
    assert job.failure_count == 0
    assert job.policy.enabled is True
    assert job.every is None
    assert job.queue is None
    assert job.interrupt_threshold is None
    assert repository.lookup_job("j") == job


def test_new_job_with_first_run_in_is_due_then_on_the_database_clock(repository: JobRepository) -> None:
    before, job, after = within(repository, lambda: add_job(repository, "j", first_run_in=HOUR))
    assert before + HOUR <= job.next_scheduled_run <= after + HOUR
    assert job.next_scheduled_run.tzinfo is not None
    assert job.next_scheduled_run.utcoffset() == dt.timedelta(0)


def test_upsert_stores_the_job_settings(repository: JobRepository) -> None:
    job = add_job(
        repository,
        "j",
        every=dt.timedelta(seconds=90),
        queue="slow",
        interrupt_threshold=dt.timedelta(seconds=45),
    )
    assert job.every == dt.timedelta(seconds=90)
    assert job.queue == "slow"
    assert job.interrupt_threshold == dt.timedelta(seconds=45)


def test_reupsert_keeps_next_scheduled_run_and_updates_description_and_settings(
    repository: JobRepository, clock: TestClock
) -> None:
    first = add_job(repository, "j", first_run_in=HOUR)
    clock.shift_to(10 * SECOND)
    second = repository.upsert_job(
        "j",
        "a better description",
        first_run_in=dt.timedelta(seconds=5),
        every=MINUTE,
        queue="q2",
        interrupt_threshold=dt.timedelta(seconds=30),
    )
    assert second.next_scheduled_run == first.next_scheduled_run
    assert second.create_time == first.create_time
    assert second.update_time >= first.update_time + 10 * SECOND - SLACK
    assert second.description == "a better description"
    assert second.every == MINUTE
    assert second.queue == "q2"
    assert second.interrupt_threshold == dt.timedelta(seconds=30)
    assert [job.name for job in repository.list_jobs()] == ["j"]


def test_reupsert_does_not_reset_a_job_that_is_due(repository: JobRepository, clock: TestClock) -> None:
    add_job(repository, "j")
    clock.shift_to(HOUR)
    job = add_job(repository, "j", first_run_in=HOUR)
    assert job.next_scheduled_run < repository.database_now()
    assert claim_one(repository, "j").job_name == "j"


def test_registering_the_same_job_twice_is_not_an_error(repository: JobRepository) -> None:
    first = add_job(repository, "j")
    second = add_job(repository, "j")
    assert second.next_scheduled_run == first.next_scheduled_run
    assert (second.name, second.description, second.create_time) == (first.name, first.description, first.create_time)
    assert len(repository.list_jobs()) == 1


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("", id="empty"),
        pytest.param("   ", id="blank"),
        pytest.param("x" * 129, id="too-long"),
        pytest.param("a\nb", id="newline"),
        pytest.param("a\x00b", id="nul"),
        pytest.param("a\x7fb", id="del"),
    ],
)
def test_upsert_rejects_a_bad_name_and_stores_nothing(repository: JobRepository, name: str) -> None:
    with pytest.raises(ValueError, match="job name"):
        repository.upsert_job(name, "description")
    assert repository.list_jobs() == []


def test_upsert_accepts_a_name_of_128_characters(repository: JobRepository) -> None:
    name = "n" * 128
    assert add_job(repository, name).name == name
    assert repository.lookup_job(name).name == name


@pytest.mark.parametrize("description", ["", "  \t"])
def test_upsert_rejects_an_empty_description(repository: JobRepository, description: str) -> None:
    with pytest.raises(ValueError, match="description"):
        repository.upsert_job("j", description)
    assert repository.list_jobs() == []


@pytest.mark.parametrize("queue", ["", "  ", "q" * 256])
def test_upsert_rejects_a_bad_queue(repository: JobRepository, queue: str) -> None:
    with pytest.raises(ValueError, match="queue"):
        repository.upsert_job("j", "description", queue=queue)
    assert repository.list_jobs() == []


def test_upsert_accepts_a_queue_name_of_255_characters(repository: JobRepository) -> None:
    assert add_job(repository, "j", queue="q" * 255).queue == "q" * 255


def test_upsert_rejects_a_negative_first_run_in(repository: JobRepository) -> None:
    with pytest.raises(ValueError, match="first_run_in"):
        add_job(repository, "j", first_run_in=-SECOND)
    assert repository.list_jobs() == []


def test_lookup_and_list_jobs(repository: JobRepository) -> None:
    with pytest.raises(JobNotFound, match="'nope'") as excinfo:
        repository.lookup_job("nope")
    assert excinfo.value.name == "nope"
    assert repository.list_jobs() == []
    add_job(repository, "b")
    add_job(repository, "a")
    assert [job.name for job in repository.list_jobs()] == ["a", "b"]


# -- database clock (design §1) --------------------------------------------------------------------------------


def test_times_come_from_the_database_clock_plus_the_test_shift(repository: JobRepository, clock: TestClock) -> None:
    host_now = dt.datetime.now(dt.timezone.utc)
    clock.shift_to(dt.timedelta(days=3))
    before, job, after = within(repository, lambda: add_job(repository, "j", first_run_in=MINUTE))
    # Three days away from this host's clock: the times can only come from the (shifted) database clock.
    assert before >= host_now + dt.timedelta(days=3) - MINUTE
    assert before + MINUTE <= job.next_scheduled_run <= after + MINUTE
    assert before <= job.create_time <= after
    clock.advance(2 * MINUTE)
    queued = claim_one(repository, "j")
    before, run, after = within(repository, lambda: repository.start_run(queued.id, "w"))
    assert before <= run.start_time <= after
    assert queued.create_time <= run.start_time


def test_database_now_is_aware_utc(repository: JobRepository, clock: TestClock) -> None:
    now = repository.database_now()
    assert now.utcoffset() == dt.timedelta(0)
    assert abs(now - dt.datetime.now(dt.timezone.utc)) < MINUTE  # the test databases run on this machine
    clock.shift_to(HOUR)
    assert_close(repository.database_now(), now + HOUR, slack=MINUTE)


# -- claiming: claim_runs (design §2) --------------------------------------------------------------------------


def test_claim_creates_a_queued_run_for_each_due_job(repository: JobRepository) -> None:
    add_job(repository, "j", queue="q")
    before, runs, after = within(repository, lambda: claim(repository, "beat-7"))
    [run] = runs
    assert run.job_name == "j"
    assert run.status == "queued"
    assert run.claimed_by == "beat-7"
    assert run.queue == "q"
    assert run.worker is None
    assert run.task_id is None
    assert (run.completed, run.total) == (0, 0)
    assert run.start_time is None
    assert run.end_time is None
    assert run.error is None
    assert before <= run.create_time <= after
    assert run.update_time == run.create_time
    assert repository.lookup_run(run.id) == run


def test_claim_skips_jobs_not_yet_due(repository: JobRepository, clock: TestClock) -> None:
    add_job(repository, "later", first_run_in=MINUTE)
    add_job(repository, "now")
    assert [run.job_name for run in claim(repository)] == ["now"]
    clock.shift_to(MINUTE - 5 * SECOND)
    assert claim(repository) == []
    clock.shift_to(MINUTE + SECOND)
    assert [run.job_name for run in claim(repository)] == ["later"]


def test_claim_skips_disabled_jobs(repository: JobRepository) -> None:
    add_job(repository, "off")
    add_job(repository, "on")
    set_job(repository, "off", enabled=False)
    assert [run.job_name for run in claim(repository)] == ["on"]
    assert repository.lookup_job("off").policy.enabled is False
    set_job(repository, "off", enabled=True)
    assert [run.job_name for run in claim(repository)] == ["off"]


def test_claim_orders_by_due_time_then_name(repository: JobRepository) -> None:
    now = repository.database_now()
    due = {
        "d": now - 3 * MINUTE,
        "c": now - 2 * MINUTE,
        "a": now - 1 * MINUTE,
        "b": now - 2 * MINUTE,
        "e": now + HOUR,
    }
    for name, when in due.items():
        add_job(repository, name)
        set_job(repository, name, next_scheduled_run=when)
    runs = claim(repository)
    assert [run.job_name for run in runs] == ["d", "b", "c", "a"]  # returned in run id (claim) order


@pytest.mark.parametrize(
    ("limit", "expected"),
    [(1, ["d"]), (2, ["d", "b"]), (3, ["d", "b", "c"]), (10, ["d", "b", "c", "a"])],
)
def test_claim_limit_takes_the_earliest_due(repository: JobRepository, limit: int, expected: list[str]) -> None:
    now = repository.database_now()
    for name, when in {"a": now - MINUTE, "b": now - 2 * MINUTE, "c": now - 2 * MINUTE, "d": now - HOUR}.items():
        add_job(repository, name)
        set_job(repository, name, next_scheduled_run=when)
    assert [run.job_name for run in claim(repository, limit=limit)] == expected
    # The rest are claimed by the next batch.
    rest = [run.job_name for run in claim(repository)]
    assert sorted(expected + rest) == ["a", "b", "c", "d"]


@pytest.mark.parametrize("limit", [0, -1])
def test_claim_rejects_a_limit_below_one(repository: JobRepository, limit: int) -> None:
    add_job(repository, "j")
    with pytest.raises(ValueError, match="limit"):
        claim(repository, limit=limit)
    assert all_runs(repository) == []


def test_claim_never_makes_a_second_active_run(repository: JobRepository, clock: TestClock) -> None:
    add_job(repository, "j")
    run = claim_one(repository, "j")
    assert claim(repository) == []  # queued run
    assert claim(repository, "beat-2") == []
    repository.start_run(run.id, "w")
    clock.shift_to(HOUR)  # still due, still running
    assert claim(repository) == []
    assert [r.id for r in all_runs(repository)] == [run.id]


@pytest.mark.settings(retry_backoff=(dt.timedelta(0), HOUR))  # retry at once after a failure
@pytest.mark.parametrize("finish", ["completed", "failed", "interrupted"])
def test_a_job_whose_run_ended_is_claimable_again_when_due(repository: JobRepository, finish: str) -> None:
    run = running_run(repository, "j")
    if finish == "completed":
        repository.complete_run(run.id, dt.timedelta(0))
    elif finish == "failed":
        repository.fail_run(run.id, "boom")
    else:
        repository.interrupt_run(run.id)
    again = claim_one(repository, "j")
    assert again.id != run.id
    assert repository.lookup_run(run.id).status == finish


def test_a_completed_job_is_not_claimed_before_its_next_run(repository: JobRepository, clock: TestClock) -> None:
    run = running_run(repository, "j")
    repository.complete_run(run.id, MINUTE)
    assert claim(repository) == []
    clock.shift_to(MINUTE + SECOND)
    assert claim_one(repository, "j").job_name == "j"


def test_a_dispatched_run_is_final_and_does_not_block_the_job(repository: JobRepository) -> None:
    add_job(repository, "j")
    run = claim_one(repository, "j")
    dispatched = repository.dispatch_run(run.id)
    assert dispatched.status == "dispatched"
    assert dispatched.end_time is not None
    with pytest.raises(InvalidRunState):
        repository.start_run(run.id, "w")
    assert claim_one(repository, "j").id != run.id


def test_dispatch_needs_a_queued_run(repository: JobRepository) -> None:
    run = running_run(repository, "j")
    with pytest.raises(InvalidRunState):
        repository.dispatch_run(run.id)
    with pytest.raises(RunNotFound):
        repository.dispatch_run(run.id + 1000)


def test_two_repositories_claiming_at_once_never_share_a_job(database: Any) -> None:
    """One round: many threads on two engines claim the same due jobs at the same instant."""
    first = database.migrated_repository()
    second = database.repository()
    names = [f"job-{i:02d}" for i in range(40)]
    for name in names:
        add_job(first, name)
    threads_per_repository = 4
    barrier = threading.Barrier(2 * threads_per_repository)
    claimed: list[RunRecord] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def claimer(repository: JobRepository, server_id: str) -> None:
        try:
            barrier.wait(timeout=30)
            runs = repository.claim_runs(server_id, 15).runs
            with lock:
                claimed.extend(runs)
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=claimer, args=(repository, f"{label}-{i}"))
        for label, repository in (("a", first), ("b", second))
        for i in range(threads_per_repository)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    counts = Counter(run.job_name for run in claimed)
    assert counts and max(counts.values()) == 1, counts
    # Whatever the race left unclaimed is claimed once afterwards; every job has exactly one run.
    claim(first)
    assert Counter(run.job_name for run in all_runs(first)) == dict.fromkeys(names, 1)


@pytest.mark.slow
def test_concurrent_claimers_never_run_a_job_twice_at_once(database: Any) -> None:
    """Many rounds: claim, start, finish with a next run of 0 (due again at once), from several threads on two
    engines. The runs table must show, per job, runs that never overlap and never two active at once."""
    repositories = [database.migrated_repository(), database.repository()]
    names = [f"job-{i}" for i in range(6)]
    for name in names:
        add_job(repositories[0], name)
    active: set[str] = set()
    violations: list[str] = []
    errors: list[BaseException] = []
    claimed_by_thread: Counter[str] = Counter()
    lock = threading.Lock()
    rounds = 25

    def worker(repository: JobRepository, server_id: str) -> None:
        try:
            for _ in range(rounds):
                for run in repository.claim_runs(server_id, 3).runs:
                    with lock:
                        if run.job_name in active:
                            violations.append(f"{server_id} claimed {run.job_name} while it was active")
                        active.add(run.job_name)
                        claimed_by_thread[server_id] += 1
                    repository.start_run(run.id, server_id)
                    repository.update_progress(run.id, 1, 1)
                    with lock:
                        active.discard(run.job_name)
                    repository.complete_run(run.id, dt.timedelta(0))
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=worker, args=(repository, f"server-{index}-{i}"))
        for index, repository in enumerate(repositories)
        for i in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    assert violations == []
    runs = all_runs(repositories[0])
    assert sum(claimed_by_thread.values()) == len(runs)
    assert len(runs) >= len(names)
    # Both engines took part.
    assert any(server.startswith("server-0") for server in claimed_by_thread)
    assert any(server.startswith("server-1") for server in claimed_by_thread)
    assert {run.status for run in runs} == {"completed"}
    for name in names:
        job_runs = sorted((run for run in runs if run.job_name == name), key=lambda run: run.id)
        for previous, following in itertools.pairwise(job_runs):
            assert previous.end_time is not None
            assert following.create_time >= previous.end_time, (previous, following)


# -- next_due_in -----------------------------------------------------------------------------------------------


def test_next_due_in_is_none_without_jobs(repository: JobRepository) -> None:
    assert repository.next_due_in() is None


def test_next_due_in_counts_down_on_the_database_clock(repository: JobRepository, clock: TestClock) -> None:
    add_job(repository, "j", first_run_in=dt.timedelta(seconds=100))
    due_in = repository.next_due_in()
    assert due_in is not None and 95 <= due_in <= 100
    clock.shift_to(dt.timedelta(seconds=130))
    due_in = repository.next_due_in()
    assert due_in is not None and -35 <= due_in <= -29  # negative: overdue


def test_next_due_in_takes_the_earliest_job(repository: JobRepository) -> None:
    add_job(repository, "late", first_run_in=HOUR)
    add_job(repository, "soon", first_run_in=dt.timedelta(seconds=50))
    due_in = repository.next_due_in()
    assert due_in is not None and 45 <= due_in <= 50


def test_next_due_in_excludes_jobs_with_an_active_run_and_disabled_jobs(repository: JobRepository) -> None:
    add_job(repository, "busy")
    run = claim_one(repository, "busy")
    assert repository.next_due_in() is None
    add_job(repository, "off")
    set_job(repository, "off", enabled=False)
    assert repository.next_due_in() is None
    add_job(repository, "other", first_run_in=dt.timedelta(seconds=200))
    due_in = repository.next_due_in()
    assert due_in is not None and 190 <= due_in <= 200
    repository.start_run(run.id, "w")
    repository.complete_run(run.id, dt.timedelta(seconds=20))
    due_in = repository.next_due_in()
    assert due_in is not None and 15 <= due_in <= 20


# -- start_run (design §3) --------------------------------------------------------------------------------------


def test_start_run_moves_queued_to_running(repository: JobRepository, clock: TestClock) -> None:
    add_job(repository, "j")
    queued = claim_one(repository, "j")
    clock.shift_to(5 * SECOND)
    before, run, after = within(repository, lambda: repository.start_run(queued.id, "worker-9", "task-1"))
    assert run.status == "running"
    assert run.worker == "worker-9"
    assert run.task_id == "task-1"
    assert run.claimed_by == "beat-1"
    assert before <= run.start_time <= after
    assert run.update_time == run.start_time
    assert run.create_time == queued.create_time
    assert repository.run_status(run.id) == "running"


def test_a_run_starts_at_most_once(repository: JobRepository) -> None:
    add_job(repository, "j")
    run = claim_one(repository, "j")
    repository.start_run(run.id, "worker-1")
    with pytest.raises(InvalidRunState) as excinfo:
        repository.start_run(run.id, "worker-2")
    assert (excinfo.value.run_id, excinfo.value.status, excinfo.value.wanted) == (run.id, "running", "queued")
    assert repository.lookup_run(run.id).worker == "worker-1"


@pytest.mark.parametrize("finish", ["complete", "fail", "interrupt"])
def test_a_final_run_cannot_start(repository: JobRepository, finish: str) -> None:
    run = running_run(repository, "j")
    {
        "complete": lambda: repository.complete_run(run.id, HOUR),
        "fail": lambda: repository.fail_run(run.id, "boom"),
        "interrupt": lambda: repository.interrupt_run(run.id),
    }[finish]()
    with pytest.raises(InvalidRunState):
        repository.start_run(run.id, "worker-2")


def test_start_run_of_an_unknown_run(repository: JobRepository) -> None:
    with pytest.raises(RunNotFound) as excinfo:
        repository.start_run(424242, "w")
    assert excinfo.value.run_id == 424242
    with pytest.raises(RunNotFound):
        repository.run_status(424242)


def test_concurrent_starts_of_one_run_let_exactly_one_win(database: Any) -> None:
    repositories = [database.migrated_repository(), database.repository()]
    add_job(repositories[0], "j")
    run = claim_one(repositories[0], "j")
    barrier = threading.Barrier(6)
    results: list[str] = []
    lock = threading.Lock()

    def start(repository: JobRepository, worker: str) -> None:
        barrier.wait(timeout=30)
        try:
            repository.start_run(run.id, worker)
            outcome = "started"
        except InvalidRunState:
            outcome = "refused"
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=start, args=(repositories[i % 2], f"w{i}")) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(results) == ["refused"] * 5 + ["started"]


# -- progress (design §5) ---------------------------------------------------------------------------------------


def test_update_progress_stores_the_values(repository: JobRepository) -> None:
    run = running_run(repository, "j")
    updated = repository.update_progress(run.id, 3, 10)
    assert (updated.completed, updated.total) == (3, 10)
    assert updated.progress == JobStatus(3, 10)
    assert repository.lookup_run(run.id).progress == JobStatus(3, 10)


def test_update_time_moves_only_when_progress_changes(repository: JobRepository, clock: TestClock) -> None:
    run = running_run(repository, "j")
    started = run.update_time
    clock.shift_to(10 * SECOND)
    unchanged = repository.update_progress(run.id, 0, 0)  # the values a run starts with
    assert unchanged.update_time == started
    changed = repository.update_progress(run.id, 1, 10)
    assert changed.update_time >= started + 10 * SECOND - SLACK
    clock.shift_to(20 * SECOND)
    assert repository.update_progress(run.id, 1, 10).update_time == changed.update_time
    assert repository.lookup_run(run.id).update_time == changed.update_time
    moved = repository.update_progress(run.id, 1, 11)  # a new total is a change too
    assert moved.update_time >= changed.update_time + 10 * SECOND - SLACK


def test_unchanged_progress_does_not_keep_a_run_alive(repository: JobRepository, clock: TestClock) -> None:
    run = running_run(repository, "j")
    repository.update_progress(run.id, 1, 5)
    for minutes in (2, 4, 6):
        clock.shift_to(minutes * MINUTE)
        repository.update_progress(run.id, 1, 5)
    [stalled] = repository.interrupt_runs()
    assert stalled.id == run.id


def test_changing_progress_keeps_a_run_alive(repository: JobRepository, clock: TestClock) -> None:
    run = running_run(repository, "j")
    for step, minutes in enumerate((2, 4, 6, 8), start=1):
        clock.shift_to(minutes * MINUTE)
        repository.update_progress(run.id, step, 10)
        assert repository.interrupt_runs() == []
    assert repository.run_status(run.id) == "running"


@pytest.mark.parametrize(
    ("completed", "total"),
    [
        pytest.param(-1, 5, id="negative-completed"),
        pytest.param(0, -1, id="negative-total"),
        pytest.param(6, 5, id="completed-over-total"),
        pytest.param(True, 5, id="bool"),
        pytest.param(1.0, 5, id="float"),
        pytest.param(1, 5.5, id="float-total"),
        pytest.param("1", 5, id="string"),
        pytest.param(0, 2**31, id="too-large"),
    ],
)
def test_invalid_progress_is_rejected_and_not_stored(repository: JobRepository, completed: Any, total: Any) -> None:
    run = running_run(repository, "j")
    repository.update_progress(run.id, 2, 4)
    with pytest.raises(ValueError):
        repository.update_progress(run.id, completed, total)
    stored = repository.lookup_run(run.id)
    assert (stored.completed, stored.total) == (2, 4)
    assert stored.status == "running"


def test_progress_of_a_run_that_is_not_running(repository: JobRepository) -> None:
    add_job(repository, "j")
    run = claim_one(repository, "j")
    with pytest.raises(InvalidRunState) as excinfo:
        repository.update_progress(run.id, 1, 2)
    assert excinfo.value.status == "queued"
    repository.start_run(run.id, "w")
    repository.update_progress(run.id, 1, 2)
    repository.complete_run(run.id, HOUR)
    for completed, total in ((1, 2), (2, 2)):  # unchanged values and new ones alike
        with pytest.raises(InvalidRunState) as excinfo:
            repository.update_progress(run.id, completed, total)
        assert excinfo.value.status == "completed"
    with pytest.raises(RunNotFound):
        repository.update_progress(run.id + 1000, 1, 2)


# -- complete_run ----------------------------------------------------------------------------------------------


def test_complete_run_schedules_the_next_run_on_the_database_clock(repository: JobRepository, clock: TestClock) -> None:
    run = running_run(repository, "j")
    clock.shift_to(7 * SECOND)
    before, done, after = within(
        repository, lambda: repository.complete_run(run.id, dt.timedelta(minutes=10), progress=JobStatus(4, 4))
    )
    assert done.status == "completed"
    assert before <= done.end_time <= after
    assert (done.completed, done.total) == (4, 4)
    assert done.error is None
    job = repository.lookup_job("j")
    assert before + 10 * MINUTE <= job.next_scheduled_run <= after + 10 * MINUTE
    assert repository.lookup_run(run.id) == done


def test_complete_run_without_progress_keeps_the_last_written(repository: JobRepository) -> None:
    run = running_run(repository, "j")
    repository.update_progress(run.id, 2, 9)
    done = repository.complete_run(run.id, HOUR)
    assert (done.completed, done.total) == (2, 9)


def test_complete_run_with_zero_makes_the_job_due_at_once(repository: JobRepository) -> None:
    run = running_run(repository, "j")
    repository.complete_run(run.id, dt.timedelta(0))
    due_in = repository.next_due_in()
    assert due_in is not None and due_in <= 0
    assert claim_one(repository, "j").id > run.id


@pytest.mark.settings(retry_backoff=(dt.timedelta(0), HOUR))
def test_complete_run_resets_the_failure_count(repository: JobRepository) -> None:
    run = running_run(repository, "j")
    repository.fail_run(run.id, "boom")
    run = repository.start_run(claim_one(repository, "j").id, "w")
    repository.fail_run(run.id, "boom")
    assert repository.lookup_job("j").failure_count == 2
    run = repository.start_run(claim_one(repository, "j").id, "w")
    repository.complete_run(run.id, HOUR)
    assert repository.lookup_job("j").failure_count == 0


def test_complete_run_needs_a_running_run(repository: JobRepository) -> None:
    add_job(repository, "j")
    queued = claim_one(repository, "j")
    with pytest.raises(InvalidRunState) as excinfo:
        repository.complete_run(queued.id, HOUR)
    assert excinfo.value.status == "queued"
    repository.start_run(queued.id, "w")
    repository.complete_run(queued.id, HOUR)
    with pytest.raises(InvalidRunState) as excinfo:
        repository.complete_run(queued.id, dt.timedelta(0))
    assert excinfo.value.status == "completed"
    with pytest.raises(RunNotFound):
        repository.complete_run(queued.id + 1000, HOUR)


def test_a_second_completion_does_not_move_the_next_run(repository: JobRepository) -> None:
    run = running_run(repository, "j")
    repository.complete_run(run.id, HOUR)
    scheduled = repository.lookup_job("j").next_scheduled_run
    with pytest.raises(InvalidRunState):
        repository.complete_run(run.id, dt.timedelta(0))
    assert repository.lookup_job("j").next_scheduled_run == scheduled


def test_complete_run_rejects_a_negative_next_run_in(repository: JobRepository) -> None:
    run = running_run(repository, "j")
    with pytest.raises(ValueError, match="negative"):
        repository.complete_run(run.id, -SECOND)
    assert repository.run_status(run.id) == "running"


# -- fail_run (design §7) ---------------------------------------------------------------------------------------


def test_fail_run_keeps_the_error_and_the_final_progress(repository: JobRepository) -> None:
    run = running_run(repository, "j")
    repository.update_progress(run.id, 1, 10)
    error = "Traceback (most recent call last):\n  ...\nRuntimeError: boom"
    before, failed, after = within(repository, lambda: repository.fail_run(run.id, error, progress=JobStatus(3, 10)))
    assert failed.status == "failed"
    assert failed.error == error
    assert (failed.completed, failed.total) == (3, 10)
    assert before <= failed.end_time <= after
    assert repository.lookup_run(run.id) == failed
    assert repository.lookup_job("j").failure_count == 1


def test_fail_run_without_error_text_still_says_failed(repository: JobRepository) -> None:
    run = running_run(repository, "j")
    assert repository.fail_run(run.id, "").error == "failed"


def test_fail_run_truncates_a_huge_error(repository: JobRepository) -> None:
    run = running_run(repository, "j")
    failed = repository.fail_run(run.id, "x" * 50_000)
    assert failed.error is not None and 0 < len(failed.error) <= 10_000


def test_fail_run_with_a_nul_in_the_error_still_fails_the_run(repository: JobRepository) -> None:
    """PostgreSQL text cannot hold NUL; an exception message can. The run must end `failed` all the same."""
    run = running_run(repository, "j")
    failed = repository.fail_run(run.id, "bad byte \x00 in the input")
    assert failed.status == "failed"
    assert failed.error == "bad byte \\x00 in the input"
    assert repository.lookup_run(run.id).error == failed.error


def test_a_queued_run_can_fail(repository: JobRepository) -> None:
    """A beat whose publish fails ends the run it claimed `failed`."""
    add_job(repository, "j")
    run = claim_one(repository, "j")
    failed = repository.fail_run(run.id, "publish failed: connection refused")
    assert failed.status == "failed"
    assert failed.worker is None
    assert repository.lookup_job("j").failure_count == 1


def test_fail_run_of_a_final_or_unknown_run(repository: JobRepository) -> None:
    run = running_run(repository, "j")
    repository.fail_run(run.id, "boom")
    with pytest.raises(InvalidRunState) as excinfo:
        repository.fail_run(run.id, "again")
    assert excinfo.value.status == "failed"
    assert repository.lookup_run(run.id).error == "boom"
    assert repository.lookup_job("j").failure_count == 1
    with pytest.raises(RunNotFound):
        repository.fail_run(run.id + 1000, "boom")


def _fail_once(repository: JobRepository, clock: TestClock, name: str) -> dt.timedelta:
    """Claim, start and fail the job's run; returns the retry delay it got (next run - end time)."""
    clock.advance(dt.timedelta(days=1))  # beyond any delay: the job is due
    run = repository.start_run(claim_one(repository, name).id, "w")
    failed = repository.fail_run(run.id, "boom")
    assert failed.end_time is not None
    return repository.lookup_job(name).next_scheduled_run - failed.end_time


def _assert_delays(actual: list[dt.timedelta], expected_seconds: list[float]) -> None:
    assert len(actual) == len(expected_seconds)
    for got, want in zip(actual, expected_seconds, strict=True):
        assert abs(got.total_seconds() - want) <= SLACK.total_seconds(), (actual, expected_seconds)


@pytest.mark.settings(retry_backoff=(dt.timedelta(seconds=10), dt.timedelta(seconds=60)))
def test_fail_run_backs_off_exponentially_up_to_the_cap(repository: JobRepository, clock: TestClock) -> None:
    add_job(repository, "j")
    delays = [_fail_once(repository, clock, "j") for _ in range(5)]
    _assert_delays(delays, [10, 20, 40, 60, 60])
    assert repository.lookup_job("j").failure_count == 5


@pytest.mark.settings(retry_backoff=(dt.timedelta(seconds=10), HOUR))
def test_fail_run_retries_no_later_than_the_jobs_next_slot(repository: JobRepository, clock: TestClock) -> None:
    """Backoff 10, 20, 40 s for a job every 30 s: never later than its next slot on its grid, which retries
    of the same slot do not move."""
    start = repository.database_now()
    clock.freeze(start)
    add_job(repository, "j", every=dt.timedelta(seconds=30))
    slots = []
    for _ in range(3):
        run = repository.start_run(claim_one(repository, "j").id, "w")
        assert run.scheduled_for == start  # every retry is a late run of the first slot
        repository.fail_run(run.id, "boom")
        slots.append(repository.lookup_job("j").next_scheduled_run - start)
        clock.freeze(repository.lookup_job("j").next_scheduled_run)
    assert slots == [dt.timedelta(seconds=10), dt.timedelta(seconds=30), dt.timedelta(seconds=60)]
    run = repository.start_run(claim_one(repository, "j").id, "w")
    repository.complete_run(run.id)
    assert repository.lookup_job("j").next_scheduled_run == start + dt.timedelta(seconds=90)  # back on the grid


@pytest.mark.settings(retry_backoff=(dt.timedelta(0), HOUR))
def test_fail_run_with_a_zero_base_retries_at_once(repository: JobRepository) -> None:
    run = running_run(repository, "j")
    repository.fail_run(run.id, "boom")
    due_in = repository.next_due_in()
    assert due_in is not None and due_in <= 0
    assert claim_one(repository, "j").id > run.id


@pytest.mark.settings(retry_backoff=(dt.timedelta(seconds=30), HOUR))
def test_failed_job_is_not_retried_before_the_backoff(repository: JobRepository, clock: TestClock) -> None:
    run = running_run(repository, "j")
    repository.fail_run(run.id, "boom")
    clock.shift_to(dt.timedelta(seconds=25))
    assert claim(repository) == []
    clock.shift_to(dt.timedelta(seconds=31))
    assert claim_one(repository, "j").job_name == "j"


def test_the_default_backoff_is_ten_seconds(repository: JobRepository, clock: TestClock) -> None:
    add_job(repository, "j")
    _assert_delays([_fail_once(repository, clock, "j")], [10])


# -- interrupt_runs: stalled runs (design §5) ---------------------------------------------------------------------


@pytest.mark.settings(retry_backoff=(dt.timedelta(seconds=10), HOUR))
def test_a_stalled_running_run_is_interrupted_after_the_threshold(repository: JobRepository, clock: TestClock) -> None:
    run = running_run(repository, "j")
    repository.update_progress(run.id, 1, 3)
    clock.shift_to(4 * MINUTE + 50 * SECOND)
    assert repository.interrupt_runs() == []
    clock.shift_to(5 * MINUTE + 10 * SECOND)
    before, stalled, after = within(repository, repository.interrupt_runs)
    [interrupted] = stalled
    assert interrupted.id == run.id
    assert interrupted.status == "interrupted"
    assert interrupted.error is not None and interrupted.error.startswith("stalled")
    assert "progress" in interrupted.error
    assert (interrupted.completed, interrupted.total) == (1, 3)  # the last progress is kept
    assert before <= interrupted.end_time <= after
    job = repository.lookup_job("j")
    assert job.failure_count == 1
    assert before + 10 * SECOND <= job.next_scheduled_run <= after + 10 * SECOND + SLACK
    assert repository.interrupt_runs() == []  # only once


def test_a_queued_run_no_worker_started_is_interrupted_too(repository: JobRepository, clock: TestClock) -> None:
    add_job(repository, "j")
    run = claim_one(repository, "j")
    clock.shift_to(5 * MINUTE + SECOND)
    [interrupted] = repository.interrupt_runs()
    assert interrupted.id == run.id
    assert interrupted.error is not None and "no worker started it" in interrupted.error
    with pytest.raises(InvalidRunState):
        repository.start_run(run.id, "late-worker")  # a late message is dropped


@pytest.mark.settings(retry_backoff=(dt.timedelta(seconds=10), dt.timedelta(seconds=25)))
def test_interrupted_stalled_runs_back_off(repository: JobRepository, clock: TestClock) -> None:
    add_job(repository, "j")
    delays = []
    for _ in range(3):
        clock.advance(HOUR)
        run = claim_one(repository, "j")
        clock.advance(10 * MINUTE)
        [interrupted] = repository.interrupt_runs()
        assert interrupted.id == run.id and interrupted.end_time is not None
        delays.append(repository.lookup_job("j").next_scheduled_run - interrupted.end_time)
    _assert_delays(delays, [10, 20, 25])


def test_interrupt_runs_honours_the_threshold_argument(repository: JobRepository, clock: TestClock) -> None:
    run = running_run(repository, "j")
    clock.shift_to(9 * SECOND)
    assert repository.interrupt_runs(dt.timedelta(seconds=10)) == []
    clock.shift_to(11 * SECOND)
    assert [r.id for r in repository.interrupt_runs(dt.timedelta(seconds=10))] == [run.id]


def test_interrupt_runs_honours_the_repository_threshold(database: Any, clock: TestClock) -> None:
    repository = database.migrated_repository(clock=clock, interrupt_threshold=dt.timedelta(seconds=20))
    run = running_run(repository, "j")
    clock.shift_to(15 * SECOND)
    assert repository.interrupt_runs() == []
    clock.shift_to(25 * SECOND)
    assert [r.id for r in repository.interrupt_runs()] == [run.id]


def test_interrupt_runs_honours_a_per_job_threshold(repository: JobRepository, clock: TestClock) -> None:
    quick = running_run(repository, "quick", interrupt_threshold=dt.timedelta(seconds=30))
    patient = running_run(repository, "patient", interrupt_threshold=dt.timedelta(minutes=10))
    default = running_run(repository, "default")
    clock.shift_to(31 * SECOND)
    assert [r.id for r in repository.interrupt_runs()] == [quick.id]
    clock.shift_to(6 * MINUTE)
    assert [r.id for r in repository.interrupt_runs()] == [default.id]
    clock.shift_to(9 * MINUTE)
    assert repository.interrupt_runs() == []
    clock.shift_to(11 * MINUTE)
    assert [r.id for r in repository.interrupt_runs()] == [patient.id]


def test_interrupt_runs_leaves_final_runs_alone(repository: JobRepository, clock: TestClock) -> None:
    run = running_run(repository, "j")
    repository.complete_run(run.id, dt.timedelta(days=30))
    clock.shift_to(dt.timedelta(days=1))
    assert repository.interrupt_runs() == []
    assert repository.lookup_run(run.id).status == "completed"


def test_a_progress_write_after_the_interruption_is_refused(repository: JobRepository, clock: TestClock) -> None:
    run = running_run(repository, "j")
    clock.shift_to(6 * MINUTE)
    repository.interrupt_runs()
    with pytest.raises(InvalidRunState) as excinfo:
        repository.update_progress(run.id, 1, 2)
    assert excinfo.value.status == "interrupted"
    with pytest.raises(InvalidRunState):
        repository.complete_run(run.id, HOUR)
    with pytest.raises(InvalidRunState):
        repository.fail_run(run.id, "boom")
    assert repository.lookup_run(run.id).status == "interrupted"


# -- interrupt_runs(server_id=...): a restarting server (design §9) ---------------------------------------------


def _runs_of_two_servers(repository: JobRepository) -> dict[str, RunRecord]:
    """Runs claimed/started by "w1" and by others, in every combination that matters."""
    runs = {}
    for name, claimed_by, worker in [
        ("mine-running", "beat-x", "w1"),  # running on w1
        ("mine-queued", "w1", None),  # claimed by w1 (a worker with an embedded beat), not started
        ("claimed-by-me-running-elsewhere", "w1", "w2"),
        ("other-running", "beat-x", "w2"),
        ("other-queued", "beat-x", None),
    ]:
        add_job(repository, name)
        run = claim_one(repository, name, server_id=claimed_by)
        runs[name] = repository.start_run(run.id, worker) if worker else run
    return runs


def test_interrupt_runs_of_a_server_ends_only_its_runs_and_they_are_due_at_once(repository: JobRepository) -> None:
    runs = _runs_of_two_servers(repository)
    ended = repository.interrupt_runs(server_id="w1")
    assert sorted(run.job_name for run in ended) == ["mine-queued", "mine-running"]
    for run in ended:
        assert run.status == "interrupted"
        assert run.error == "restart: left behind by w1"
    for name in ("claimed-by-me-running-elsewhere", "other-running", "other-queued"):
        assert repository.lookup_run(runs[name].id).status == runs[name].status
    # Due again at once, without a failure or a backoff.
    assert sorted(run.job_name for run in claim(repository)) == ["mine-queued", "mine-running"]
    assert repository.lookup_job("mine-running").failure_count == 0


def test_interrupt_runs_of_a_server_at_shutdown(repository: JobRepository) -> None:
    run = running_run(repository, "j", worker="w1")
    [ended] = repository.interrupt_runs(server_id="w1", reason=InterruptReason.SHUTDOWN)
    assert ended.id == run.id
    assert ended.error == "shutdown: w1 shut down"
    assert claim_one(repository, "j").id > run.id


def test_interrupt_runs_of_a_server_with_a_threshold_spares_fresh_runs(
    repository: JobRepository, clock: TestClock
) -> None:
    old = running_run(repository, "old", worker="w1")
    clock.shift_to(MINUTE)
    fresh = running_run(repository, "fresh", worker="w1")
    clock.shift_to(MINUTE + 10 * SECOND)
    ended = repository.interrupt_runs(dt.timedelta(seconds=30), server_id="w1")
    assert [run.id for run in ended] == [old.id]
    assert repository.run_status(fresh.id) == "running"


def test_interrupt_runs_of_a_server_without_runs(repository: JobRepository) -> None:
    running_run(repository, "j", worker="w2")
    assert repository.interrupt_runs(server_id="w1") == []


# -- interrupt_run ---------------------------------------------------------------------------------------------


def test_interrupt_run_ends_an_active_run(repository: JobRepository) -> None:
    run = running_run(repository, "j")
    before, ended, after = within(repository, lambda: repository.interrupt_run(run.id))
    assert ended.status == "interrupted"
    assert ended.error == "cancelled"
    assert before <= ended.end_time <= after
    assert repository.lookup_job("j").failure_count == 0
    assert claim_one(repository, "j").id > run.id  # the job is free again


def test_interrupt_run_with_a_reason_and_detail(repository: JobRepository) -> None:
    add_job(repository, "j")
    queued = claim_one(repository, "j")
    ended = repository.interrupt_run(queued.id, InterruptReason.SHUTDOWN, "worker w1 stopping")
    assert ended.error == "shutdown: worker w1 stopping"


@pytest.mark.settings(retry_backoff=(dt.timedelta(seconds=40), HOUR))
def test_interrupt_run_as_stalled_backs_off(repository: JobRepository) -> None:
    run = running_run(repository, "j")
    ended = repository.interrupt_run(run.id, InterruptReason.STALLED, "no progress")
    assert ended.error == "stalled: no progress"
    assert ended.end_time is not None
    assert repository.lookup_job("j").failure_count == 1
    assert_close(repository.lookup_job("j").next_scheduled_run, ended.end_time + 40 * SECOND)


def test_interrupt_run_of_a_final_or_unknown_run(repository: JobRepository) -> None:
    run = running_run(repository, "j")
    repository.complete_run(run.id, HOUR)
    with pytest.raises(InvalidRunState) as excinfo:
        repository.interrupt_run(run.id)
    assert excinfo.value.status == "completed"
    assert repository.lookup_run(run.id).status == "completed"
    with pytest.raises(RunNotFound):
        repository.interrupt_run(run.id + 1000)


# -- interrupt_reason: every path that interrupts a run writes its reason in its own column ----------------------


def test_every_interrupting_path_stores_its_reason(repository: JobRepository, clock: TestClock) -> None:
    run = running_run(repository, "stalled-running")
    add_job(repository, "stalled-queued")
    queued = claim_one(repository, "stalled-queued")
    clock.shift_to(HOUR)
    assert {r.id for r in repository.interrupt_runs(dt.timedelta(minutes=5))} == {run.id, queued.id}

    run = running_run(repository, "shutdown", worker="w1")
    [ended] = repository.interrupt_runs(server_id="w1", reason=InterruptReason.SHUTDOWN)
    assert ended.id == run.id and ended.interrupt_reason is InterruptReason.SHUTDOWN

    run = running_run(repository, "restart", worker="w2")
    [ended] = repository.interrupt_runs(server_id="w2")
    assert ended.id == run.id and ended.interrupt_reason is InterruptReason.RESTART

    run = running_run(repository, "operator")
    [ended] = repository.interrupt_job_runs("operator")
    assert ended.id == run.id and ended.interrupt_reason is InterruptReason.CANCELLED

    run = running_run(repository, "one-run")
    assert repository.interrupt_run(run.id).interrupt_reason is InterruptReason.CANCELLED
    run = running_run(repository, "one-run-stalled")
    assert repository.interrupt_run(run.id, InterruptReason.STALLED, "x").interrupt_reason is InterruptReason.STALLED

    for name in ("expired-by-monitor", "expired-at-start"):
        repository.define_job(JobDefinition(name=name, description=name, every=HOUR, policy=JobPolicy(expires=MINUTE)))
    claimed = {run.job_name: run for run in claim(repository)}
    by_monitor, at_start = claimed["expired-by-monitor"], claimed["expired-at-start"]
    clock.advance(HOUR)
    with pytest.raises(InvalidRunState):
        repository.start_run(at_start.id, "worker-1")  # too late: ended expired instead
    assert [r.id for r in repository.expire_runs()] == [by_monitor.id]

    repository.define_job(JobDefinition(name="orphan", description="orphan", kind=JobKind.TASK, task="t", every=HOUR))
    orphan = repository.dispatch_run(claim_one(repository, "orphan").id)
    repository.track_start(orphan.id, "gone@host", None)  # a worker that never sent a heartbeat
    clock.advance(HOUR)
    assert [r.id for r in repository.interrupt_orphaned(MINUTE)] == [orphan.id]

    runs = all_runs(repository)
    assert all(run.interrupt_reason is None for run in runs if run.status != RunState.INTERRUPTED)
    # The error text, for people, still starts with the reason.
    stored = {run.job_name: (run.interrupt_reason, (run.error or "").split(":")[0]) for run in runs if run.error}
    R = InterruptReason
    assert stored == {
        "stalled-running": (R.STALLED, "stalled"),
        "stalled-queued": (R.STALLED, "stalled"),
        "shutdown": (R.SHUTDOWN, "shutdown"),
        "restart": (R.RESTART, "restart"),
        "operator": (R.CANCELLED, "cancelled"),
        "one-run": (R.CANCELLED, "cancelled"),
        "one-run-stalled": (R.STALLED, "stalled"),
        "expired-by-monitor": (R.EXPIRED, "expired"),
        "expired-at-start": (R.EXPIRED, "expired"),
        "orphan": (R.STALLED, "stalled"),
    }
    assert all(isinstance(run.status, RunState) and isinstance(run.kind, JobKind) for run in runs)


def test_a_run_not_interrupted_has_no_interrupt_reason(repository: JobRepository) -> None:
    run = running_run(repository, "j")
    assert run.interrupt_reason is None
    assert repository.complete_run(run.id, HOUR).interrupt_reason is None
    run = running_run(repository, "k")
    assert repository.fail_run(run.id, "boom").interrupt_reason is None


# -- pull-in: update_job_next_run_in_at_least (design §6) ----------------------------------------------------


def test_pull_in_only_ever_moves_the_next_run_earlier(repository: JobRepository) -> None:
    add_job(repository, "j", first_run_in=HOUR)
    before, job, after = within(
        repository, lambda: repository.update_job_next_run_in_at_least("j", dt.timedelta(minutes=10))
    )
    assert before + 10 * MINUTE <= job.next_scheduled_run <= after + 10 * MINUTE
    assert repository.lookup_job("j") == job
    later = repository.update_job_next_run_in_at_least("j", dt.timedelta(minutes=30))
    assert later.next_scheduled_run == job.next_scheduled_run
    assert repository.lookup_job("j").next_scheduled_run == job.next_scheduled_run


def test_pull_in_of_zero_makes_the_job_due_at_once(repository: JobRepository) -> None:
    add_job(repository, "j", first_run_in=HOUR)
    assert claim(repository) == []
    repository.update_job_next_run_in_at_least("j", dt.timedelta(0))
    assert claim_one(repository, "j").job_name == "j"


def test_pull_in_with_run_now(repository: JobRepository) -> None:
    add_job(repository, "j", first_run_in=HOUR)
    repository.update_job_next_run_in_at_least("j", dt.timedelta(0), run_now=True)
    assert claim_one(repository, "j").job_name == "j"


def test_pull_in_errors(repository: JobRepository) -> None:
    add_job(repository, "j", first_run_in=HOUR)
    scheduled = repository.lookup_job("j").next_scheduled_run
    with pytest.raises(JobNotFound):
        repository.update_job_next_run_in_at_least("nope", dt.timedelta(0))
    with pytest.raises(ValueError, match="negative"):
        repository.update_job_next_run_in_at_least("j", -SECOND)
    with pytest.raises(ValueError, match="empty"):
        repository.update_job_next_run_in_at_least("", dt.timedelta(0))
    assert repository.lookup_job("j").next_scheduled_run == scheduled


def test_a_pull_in_during_a_run_wins_over_a_later_next_run(repository: JobRepository) -> None:
    run = running_run(repository, "j")
    repository.update_job_next_run_in_at_least("j", dt.timedelta(minutes=5))
    repository.complete_run(run.id, HOUR)
    expected = repository.database_now() + 5 * MINUTE
    assert_close(repository.lookup_job("j").next_scheduled_run, expected, slack=5 * SECOND)


def test_a_pull_in_during_a_run_never_delays_an_earlier_next_run(repository: JobRepository) -> None:
    run = running_run(repository, "j")
    repository.update_job_next_run_in_at_least("j", dt.timedelta(minutes=5))
    done = repository.complete_run(run.id, MINUTE)
    assert done.end_time is not None
    assert_close(repository.lookup_job("j").next_scheduled_run, done.end_time + MINUTE)


def test_a_pull_in_of_zero_during_a_run_makes_it_due_when_the_run_ends(repository: JobRepository) -> None:
    run = running_run(repository, "j")
    repository.update_job_next_run_in_at_least("j", dt.timedelta(0))
    assert claim(repository) == []  # still one active run at most
    repository.complete_run(run.id, HOUR)
    assert claim_one(repository, "j").id > run.id


def test_a_pull_in_while_queued_is_kept_too(repository: JobRepository) -> None:
    add_job(repository, "j")
    queued = claim_one(repository, "j")
    repository.update_job_next_run_in_at_least("j", dt.timedelta(0))
    run = repository.start_run(queued.id, "w")
    repository.complete_run(run.id, HOUR)
    assert claim_one(repository, "j").id > run.id


def test_the_earliest_of_several_pull_ins_during_a_run_is_kept(repository: JobRepository) -> None:
    run = running_run(repository, "j")
    repository.update_job_next_run_in_at_least("j", dt.timedelta(minutes=20))
    repository.update_job_next_run_in_at_least("j", dt.timedelta(minutes=3))
    repository.update_job_next_run_in_at_least("j", dt.timedelta(minutes=10))
    repository.complete_run(run.id, HOUR)
    assert_close(repository.lookup_job("j").next_scheduled_run, repository.database_now() + 3 * MINUTE, 5 * SECOND)


@pytest.mark.settings(retry_backoff=(HOUR, 2 * HOUR))
def test_a_pull_in_during_a_run_is_not_lost_when_it_fails(repository: JobRepository) -> None:
    run = running_run(repository, "j")
    repository.update_job_next_run_in_at_least("j", dt.timedelta(0))
    repository.fail_run(run.id, "boom")
    assert repository.lookup_job("j").failure_count == 1
    assert claim_one(repository, "j").id > run.id


def test_a_pull_in_during_an_earlier_run_does_not_leak_into_the_next(repository: JobRepository) -> None:
    run = running_run(repository, "j")
    repository.update_job_next_run_in_at_least("j", dt.timedelta(0))
    repository.complete_run(run.id, HOUR)
    second = repository.start_run(claim_one(repository, "j").id, "w")
    done = repository.complete_run(second.id, HOUR)
    assert done.end_time is not None
    assert_close(repository.lookup_job("j").next_scheduled_run, done.end_time + HOUR)


# -- history -------------------------------------------------------------------------------------------------


def _history(repository: JobRepository) -> dict[str, int]:
    """a1 completed, b1 failed (by worker-1), then a2 running and b2 queued (b retried at once: a repository
    with no retry backoff)."""
    add_job(repository, "a")
    add_job(repository, "b")
    a1, b1 = claim(repository)
    assert (a1.job_name, b1.job_name) == ("a", "b")
    repository.start_run(a1.id, "worker-1")
    repository.start_run(b1.id, "worker-1")
    repository.complete_run(a1.id, dt.timedelta(0))
    repository.fail_run(b1.id, "boom")
    a2, b2 = claim(repository)
    assert (a2.job_name, b2.job_name) == ("a", "b")
    repository.start_run(a2.id, "worker-2")
    return {"a1": a1.id, "b1": b1.id, "a2": a2.id, "b2": b2.id}


@pytest.mark.settings(retry_backoff=(dt.timedelta(0), HOUR))  # `_history` retries b at once
def test_list_runs_newest_first_with_filters(repository: JobRepository) -> None:
    ids = _history(repository)
    assert [run.id for run in repository.list_runs()] == [ids["b2"], ids["a2"], ids["b1"], ids["a1"]]
    assert [run.id for run in repository.list_runs(job_name="a")] == [ids["a2"], ids["a1"]]
    assert [run.id for run in repository.list_runs(status="failed")] == [ids["b1"]]
    assert [run.id for run in repository.list_runs(status="queued")] == [ids["b2"]]
    assert [run.id for run in repository.list_runs(job_name="a", status="running")] == [ids["a2"]]
    assert repository.list_runs(job_name="a", status="failed") == []
    assert repository.list_runs(job_name="nope") == []
    assert [run.id for run in repository.list_runs(limit=2)] == [ids["b2"], ids["a2"]]


def test_list_runs_rejects_an_unknown_status(repository: JobRepository) -> None:
    with pytest.raises(ValueError, match="unknown run status 'done'"):
        repository.list_runs(status="done")


@pytest.mark.settings(retry_backoff=(dt.timedelta(0), HOUR))  # `_history` retries b at once
def test_lookup_run(repository: JobRepository) -> None:
    ids = _history(repository)
    failed = repository.lookup_run(ids["b1"])
    assert (failed.job_name, failed.status, failed.error) == ("b", "failed", "boom")
    assert failed.claimed_by == "beat-1"
    assert failed.worker == "worker-1"
    with pytest.raises(RunNotFound):
        repository.lookup_run(max(ids.values()) + 1)


@pytest.mark.settings(retry_backoff=(dt.timedelta(0), HOUR))  # `_history` retries b at once
def test_prune_runs_deletes_only_final_runs_older_than_the_retention(
    repository: JobRepository, clock: TestClock
) -> None:
    ids = _history(repository)  # a1, b1 final; a2 running; b2 queued: all "old" after the shift below
    clock.shift_to(dt.timedelta(days=2))
    repository.complete_run(ids["a2"], dt.timedelta(0))  # final, but ended recently
    assert repository.prune_runs(dt.timedelta(days=1)) == 2
    remaining = {run.id for run in repository.list_runs()}
    assert remaining == {ids["a2"], ids["b2"]}
    assert repository.prune_runs(dt.timedelta(days=1)) == 0
    clock.shift_to(dt.timedelta(days=4))
    assert repository.prune_runs(dt.timedelta(days=1)) == 1  # a2; the queued b2 is never pruned
    assert [run.id for run in repository.list_runs()] == [ids["b2"]]
    assert [job.name for job in repository.list_jobs()] == ["a", "b"]


# -- typed errors -----------------------------------------------------------------------------------------------


def test_missing_tables_raise_schema_mismatch(database: Any) -> None:
    repository = database.repository()  # not migrated
    calls: list[Callable[[], Any]] = [
        repository.list_jobs,
        lambda: repository.lookup_job("j"),
        lambda: repository.upsert_job("j", "d"),
        lambda: repository.claim_runs("b", 10).runs,
        repository.next_due_in,
        lambda: repository.start_run(1, "w"),
        lambda: repository.update_progress(1, 1, 2),
        repository.interrupt_runs,
        repository.list_runs,
    ]
    for call in calls:
        with pytest.raises(SchemaMismatch, match="dbsched migrate"):
            call()


def test_run_ids_are_never_reused_after_pruning(repository: JobRepository, clock: TestClock) -> None:
    """A late message names a run by id: pruning must not let that id come back as a newer run."""
    repository.upsert_job("reuse", "id reuse")
    first = repository.claim_runs("beat", 10).runs[0]
    repository.start_run(first.id, "w")
    repository.complete_run(first.id, dt.timedelta(0))
    clock.advance(dt.timedelta(days=30))
    assert repository.prune_runs(dt.timedelta(days=1)) == 1
    second = repository.claim_runs("beat", 10).runs[0]
    assert second.id > first.id


@pytest.mark.postgres
def test_a_claim_skips_the_jobs_another_uncommitted_claim_holds_instead_of_waiting(postgres_database: Any) -> None:
    """Found by the fault suite (three beats, 200 jobs a second): on PostgreSQL a claim used to queue behind
    another beat's uncommitted claim, and then could claim a slot that a third beat claimed, and a worker ran,
    meanwhile (the stale-claim check still guards that). Now the due jobs are read FOR UPDATE SKIP LOCKED: the
    job another claim holds is skipped, at once, and the claim takes the others (issue 9: two beats share the
    work instead of one waiting for the other and finding nothing left)."""
    import time

    from sqlalchemy import insert

    repository = postgres_database.migrated_repository()
    now = repository.database_now()
    add_job(repository, "a-blocker")
    add_job(repository, "b-other", every=HOUR)
    set_job(repository, "a-blocker", next_scheduled_run=now - dt.timedelta(seconds=2))
    set_job(repository, "b-other", next_scheduled_run=now - dt.timedelta(seconds=1))

    # Another beat's claim of the blocker, not committed yet (the run's trigger holds the job's row).
    blocker = repository.engine.connect()
    held = blocker.begin()
    blocker.execute(
        insert(run_table).values(
            job_name="a-blocker", status="queued", claimed_by="beat-2", create_time=now, update_time=now
        )
    )
    claimed: list[RunRecord] = []
    thread = threading.Thread(target=lambda: claimed.extend(repository.claim_runs("beat-3", 10).runs))
    thread.start()
    try:
        thread.join(timeout=10)
        assert not thread.is_alive(), "the claim waited for the other one"
    finally:
        held.rollback()
        blocker.close()
        thread.join(timeout=30)
    started = time.monotonic()
    assert [run.job_name for run in claimed] == ["b-other"], claimed
    assert [run.job_name for run in repository.claim_runs("beat-3", 10).runs] == ["a-blocker"]
    assert time.monotonic() - started < 10


def test_a_run_that_ended_before_its_next_slot_is_not_passed_over(
    repository: JobRepository, clock: TestClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by the fault suite (200 jobs a second): the run ended (its end_time) before the next slot, but the
    completing transaction's later statement ran after it. The next slot is counted from the end: it is due,
    not passed over as if the run had overrun it."""
    slot = dt.datetime(2030, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
    add_job(repository, "cadence", every=dt.timedelta(seconds=1))
    set_job(repository, "cadence", next_scheduled_run=slot)
    clock.freeze(slot + dt.timedelta(milliseconds=100))
    run = repository.start_run(claim_one(repository, "cadence").id, "worker-1")
    assert run.scheduled_for == slot

    clock.freeze(slot + dt.timedelta(milliseconds=990))  # the run ends 10 ms before the next slot
    real_db_now = repository._db_now
    monkeypatch.setattr(repository, "_db_now", lambda conn: real_db_now(conn) + dt.timedelta(milliseconds=50))
    ended = repository.complete_run(run.id)

    assert ended.end_time is not None and ended.end_time < slot + dt.timedelta(seconds=1)
    assert repository.lookup_job("cadence").next_scheduled_run == slot + dt.timedelta(seconds=1)
