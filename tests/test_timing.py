"""The timing rules (celery_dbsched.timing), without a database: pure functions of times and settings."""

from __future__ import annotations

import datetime as dt

import pytest

from celery_dbsched import timing
from celery_dbsched.schedules import CrontabSchedule, IntervalSchedule
from celery_dbsched.states import JobKind

S = dt.timedelta(seconds=1)
T0 = dt.datetime(2030, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
EVERY_10 = IntervalSchedule(10)
HOURLY = CrontabSchedule(minute="0")
BACKOFF = (10 * S, 100 * S)


def completed(now: dt.datetime, **given: object) -> dt.datetime:
    facts: dict[str, object] = {
        "next_run_in": None,
        "advances": False,
        "claimed_next_run": T0,
        "slots": EVERY_10,
        "run_slot": T0,
        "backoff_cap": 100 * S,
        "requested": None,
    }
    facts.update(given)
    return timing.next_run_after_completion(now, **facts)  # type: ignore[arg-type]


def retried(now: dt.datetime, **given: object) -> dt.datetime:
    facts: dict[str, object] = {
        "failure_count": 0,
        "backoff": BACKOFF,
        "advances": False,
        "claimed_next_run": T0 + 1000 * S,
        "slots": EVERY_10,
        "run_slot": T0,
        "requested": None,
    }
    facts.update(given)
    return timing.retry_at(now, **facts)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kind", "max_active", "advances"),
    [(JobKind.JOB, 1, False), (JobKind.JOB, 2, True), (JobKind.TASK, 1, True), (JobKind.TASK, 3, True)],
)
def test_advances_at_claim(kind: str, max_active: int, advances: bool) -> None:
    assert timing.advances_at_claim(kind, max_active) is advances


def test_cadence_is_the_schedule_else_the_interval_else_none() -> None:
    assert timing.cadence(HOURLY, 10 * S) == HOURLY
    assert timing.cadence(None, 10 * S) == EVERY_10
    assert timing.cadence(None, None) is None
    assert timing.cadence(None, dt.timedelta(0)) is None  # a zero delay is no cadence


def test_first_run_is_the_delay_else_the_first_slot_else_now() -> None:
    assert timing.first_run(HOURLY, 5 * S, T0) == T0 + 5 * S
    assert timing.first_run(HOURLY, dt.timedelta(0), T0) == T0  # a zero delay: now, not the next slot
    assert timing.first_run(HOURLY, None, T0 + 90 * S) == T0 + dt.timedelta(hours=1)
    assert timing.first_run(EVERY_10, None, T0) == T0  # an interval's first slot is now
    assert timing.first_run(None, None, T0) == T0


def test_a_negative_first_run_is_refused() -> None:
    timing.check_first_run("j", dt.timedelta(0))
    with pytest.raises(ValueError, match="must not be negative"):
        timing.check_first_run("j", -S)


def test_completion_uses_the_jobs_own_delay_first() -> None:
    assert completed(T0 + 3 * S, next_run_in=7 * S) == T0 + 10 * S
    assert completed(T0 + 3 * S, next_run_in=dt.timedelta(0)) == T0 + 3 * S  # zero delay: due at once


def test_completion_of_a_job_that_advanced_at_claim_keeps_the_claimed_next_run() -> None:
    assert completed(T0 + 3 * S, advances=True, claimed_next_run=T0 + 10 * S) == T0 + 10 * S


def test_completion_goes_to_the_next_slot_counted_from_the_runs_slot() -> None:
    assert completed(T0 + 3 * S) == T0 + 10 * S
    assert completed(T0 + 25 * S) == T0 + 30 * S  # an overrun skips the slots it covered, keeps the cadence
    assert completed(T0 + 10 * S) == T0 + 20 * S  # ending on a slot: the one after it


def test_completion_on_a_crontab_goes_to_its_next_slot() -> None:
    assert completed(T0 + 3 * S, slots=HOURLY) == T0 + dt.timedelta(hours=1)


def test_completion_without_a_cadence_waits_the_backoff_cap() -> None:
    assert completed(T0 + 3 * S, slots=None) == T0 + 103 * S


def test_an_earlier_pull_in_wins_a_later_one_does_not() -> None:
    assert completed(T0 + 3 * S, requested=T0 + 5 * S) == T0 + 5 * S
    assert completed(T0 + 3 * S, requested=T0 + 50 * S) == T0 + 10 * S
    assert completed(T0 + 3 * S, next_run_in=7 * S, requested=T0 + 4 * S) == T0 + 4 * S
    assert retried(T0 + 3 * S, slots=None, requested=T0 + 4 * S) == T0 + 4 * S
    assert retried(T0 + 3 * S, slots=None, requested=T0 + 500 * S) == T0 + 13 * S


def test_retry_backs_off_exponentially_up_to_the_cap() -> None:
    assert retried(T0, slots=None, failure_count=0) == T0 + 10 * S
    assert retried(T0, slots=None, failure_count=1) == T0 + 20 * S
    assert retried(T0, slots=None, failure_count=9) == T0 + 100 * S


def test_retry_is_never_later_than_the_next_slot() -> None:
    assert retried(T0 + 3 * S, failure_count=5) == T0 + 10 * S  # backoff 100 s, next slot in 7 s
    assert retried(T0 + 3 * S, slots=HOURLY, failure_count=5) == T0 + 103 * S  # the slot is further off


def test_retry_of_a_job_that_advanced_at_claim_is_never_later_than_the_claimed_next_run() -> None:
    assert retried(T0, slots=None, advances=True, claimed_next_run=T0 + 4 * S) == T0 + 4 * S
    assert retried(T0, slots=None, advances=True, claimed_next_run=T0 + 40 * S) == T0 + 10 * S


def test_retry_with_a_zero_backoff_is_immediate() -> None:
    assert retried(T0 + 3 * S, backoff=(dt.timedelta(0), 100 * S), failure_count=4) == T0 + 3 * S


def test_resume_moves_a_missed_slot_to_the_next_one_on_the_cadence() -> None:
    assert timing.resume_at(EVERY_10, T0, T0 + 25 * S) == T0 + 30 * S  # anchored at the missed slot
    assert timing.resume_at(HOURLY, T0, T0 + dt.timedelta(minutes=90)) == T0 + dt.timedelta(hours=2)


def test_resume_keeps_a_slot_still_ahead_and_a_job_without_cadence() -> None:
    assert timing.resume_at(EVERY_10, T0 + 30 * S, T0 + 25 * S) == T0 + 30 * S
    assert timing.resume_at(None, T0, T0 + 25 * S) == T0


def test_a_misfired_slot_is_skipped_to_the_next_one_after_now() -> None:
    assert timing.skip_misfired(EVERY_10, T0, T0 + 25 * S) == T0 + 30 * S
    assert timing.skip_misfired(None, T0, T0 + 25 * S) is None


def test_a_slot_that_will_not_run_moves_to_the_next_one() -> None:
    assert timing.skip_slot(EVERY_10, T0 + 3 * S, T0, None) == T0 + 10 * S
    assert timing.skip_slot(None, T0 + 3 * S, T0, None) == T0 + 3 * S  # no cadence: due now
    assert timing.skip_slot(EVERY_10, T0 + 3 * S, T0, T0 + 4 * S) == T0 + 4 * S  # a pull-in wins


def test_slots_near_cover_the_window_around_the_expected_finish() -> None:
    slots, lower, upper = timing.slots_near(EVERY_10, T0, T0 + 15 * S)
    assert lower == T0 + 14 * S
    assert slots == [T0 + 20 * S]
    assert upper == T0 + 20 * S
    dense, _, upper = timing.slots_near(IntervalSchedule(0.01), T0, T0 + 15 * S)
    assert len(dense) == timing.MAX_SLOTS  # bounded: the window is narrower than it would need
    assert upper == dense[-1]


@pytest.mark.parametrize("now_offset", [14.0, 15.0, 15.9, 19.9])
def test_the_first_slot_near_after_now_is_the_next_slot(now_offset: float) -> None:
    slots, lower, upper = timing.slots_near(EVERY_10, T0, T0 + 15 * S)
    now = T0 + now_offset * S
    assert lower <= now < upper
    assert min(slot for slot in slots if slot > now) == EVERY_10.next_after(now, T0)


def test_the_finish_window_of_a_completion_on_a_cadence() -> None:
    window = timing.finish_window(
        T0 + 3 * S,
        failed=False,
        advances=False,
        slots=EVERY_10,
        run_slot=T0,
        failure_count=0,
        backoff=BACKOFF,
        backoff_cap=100 * S,
    )
    assert window.slots[0] == T0 + 10 * S
    assert window.delay is None and not window.use_next


def test_the_finish_window_without_a_cadence_or_of_a_job_that_advanced() -> None:
    no_cadence = timing.finish_window(
        T0, failed=False, advances=False, slots=None, run_slot=T0, failure_count=0, backoff=BACKOFF, backoff_cap=50 * S
    )
    assert no_cadence == timing.FinishWindow(delay=50 * S)
    advanced = timing.finish_window(
        T0, failed=False, advances=True, slots=EVERY_10, run_slot=T0, failure_count=0, backoff=BACKOFF, backoff_cap=S
    )
    assert advanced == timing.FinishWindow(use_next=True)


def test_the_finish_window_of_a_failure_carries_the_backoff_and_the_slots() -> None:
    window = timing.finish_window(
        T0 + 3 * S, failed=True, advances=True, slots=EVERY_10, run_slot=T0, failure_count=2, backoff=BACKOFF,
        backoff_cap=S,
    )  # fmt: skip
    assert window.delay == 40 * S
    assert window.use_next
    assert window.slots[0] == T0 + 10 * S
