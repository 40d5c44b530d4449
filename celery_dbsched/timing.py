"""The timing rules: when a job is due next, as pure functions of times and the job's settings.

No database here: the repository reads the facts (the database's `now`, the job's cadence, the run's slot) in
its transaction, asks these rules, and writes what they say. The one-statement finish on PostgreSQL computes
the same rules in SQL from what `finish_window` gives it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from .schedules import ClockedSchedule, IntervalSchedule, Schedule
from .settings import backoff_delay
from .states import JobKind

Backoff = tuple[dt.timedelta, dt.timedelta]


def advances_at_claim(kind: JobKind, max_active: int) -> bool:
    """Runs that nobody waits for (plain tasks) or that may overlap move the schedule when claimed; other jobs
    are rescheduled when their run ends."""
    return kind == JobKind.TASK or max_active > 1


def cadence(schedule: Schedule | None, every: dt.timedelta | None) -> Schedule | None:
    """The slots a job keeps to: its schedule, else its `every` as an interval; None when it has neither."""
    if schedule is not None:
        return schedule
    if every is not None and every > dt.timedelta(0):
        return IntervalSchedule(every.total_seconds())
    return None


def next_slot(slots: Schedule | None, now: dt.datetime, anchor: dt.datetime | None) -> dt.datetime | None:
    """The next slot after `now` on the cadence `slots` counted from `anchor` (None without a cadence)."""
    return None if slots is None else slots.next_after(now, anchor)


def pulled_in(when: dt.datetime, requested: dt.datetime | None) -> dt.datetime:
    """A pull-in requested while the run was active (`requested_next_run`) wins if earlier (design §6)."""
    return when if requested is None else min(when, requested)


def check_first_run(name: str, first_run_in: dt.timedelta | None) -> None:
    if first_run_in is not None and first_run_in < dt.timedelta(0):
        raise ValueError(f"job {name!r}: first_run_in must not be negative")


def first_run(schedule: Schedule | None, first_run_in: dt.timedelta | None, now: dt.datetime) -> dt.datetime:
    """A new job is first due at now + `first_run_in`, else at its schedule's first slot, else now."""
    if first_run_in is not None:
        return now + first_run_in
    if schedule is not None:
        return schedule.first_slot(now)
    return now


def runtime_first_run(
    schedule: Schedule,
    now: dt.datetime,
    *,
    start_time: dt.datetime | None = None,
    last_run_at: dt.datetime | None = None,
) -> dt.datetime:
    """A runtime schedule's first slot: the first one after `last_run_at` when given (an importer's: nothing
    fires twice or is skipped at the switch; a slot that passed meanwhile runs once, at once), else its first slot
    from now (a clocked one: its time, even past); never before `start_time`."""
    slot = schedule.next_after(last_run_at, last_run_at) if last_run_at is not None else schedule.first_slot(now)
    if start_time is not None and slot < start_time:
        slot = schedule.first_slot(start_time)
    return slot


def rescheduled(schedule: Schedule, now: dt.datetime, start_time: dt.datetime | None = None) -> dt.datetime:
    """The next run of a job whose schedule was edited at `now`: the new schedule's next slot after now (a
    clocked one: its time, even past, as when it is added), never before `start_time`."""
    slot = schedule.first_slot(now) if isinstance(schedule, ClockedSchedule) else schedule.next_after(now)
    if start_time is not None and slot < start_time:
        slot = schedule.first_slot(start_time)
    return slot


def next_run_after_completion(
    now: dt.datetime,
    *,
    next_run_in: dt.timedelta | None,
    advances: bool,
    claimed_next_run: dt.datetime,
    slots: Schedule | None,
    run_slot: dt.datetime | None,
    backoff_cap: dt.timedelta,
    requested: dt.datetime | None,
) -> dt.datetime:
    """After a run completed at `now`: now + the job's own delay when it gave one; else the next run the claim
    moved the job to (it advances at claim); else its next slot after now on its cadence, counted from the
    run's slot; else (no cadence) now + the backoff cap. A pull-in made meanwhile wins if earlier."""
    if next_run_in is not None:
        when = now + next_run_in
    elif advances:
        when = claimed_next_run
    else:
        when = next_slot(slots, now, run_slot or now) or now + backoff_cap
    return pulled_in(when, requested)


def retry_at(
    now: dt.datetime,
    *,
    failure_count: int,
    backoff: Backoff,
    advances: bool,
    claimed_next_run: dt.datetime,
    slots: Schedule | None,
    run_slot: dt.datetime | None,
    requested: dt.datetime | None,
) -> dt.datetime:
    """After a run failed (or stalled) at `now`, the job's `failure_count`-th failure before it: exponential
    backoff, never later than the job's next slot, nor than the slot the claim moved it to. A pull-in made
    meanwhile wins if earlier."""
    slot = next_slot(slots, now, run_slot or now)
    ceiling = None if slot is None else slot - now
    when = now + backoff_delay(failure_count + 1, backoff, ceiling)
    if advances:
        when = min(when, claimed_next_run)
    return pulled_in(when, requested)


def resume_at(slots: Schedule | None, next_scheduled_run: dt.datetime, now: dt.datetime) -> dt.datetime:
    """A job enabled or resumed at `now`: a slot that passed while it was off moves to its next slot after now,
    anchored at the missed slot (on its cadence, not now + interval), so it does not fire at once for the time
    it was off. A slot still ahead, or a job without a cadence, keeps its next run."""
    if next_scheduled_run >= now:
        return next_scheduled_run
    return next_slot(slots, now, next_scheduled_run) or next_scheduled_run


def skip_misfired(slots: Schedule | None, next_scheduled_run: dt.datetime, now: dt.datetime) -> dt.datetime | None:
    """A `skip`-policy job later than its grace: its next slot after now, counted from the missed one (None
    without a cadence: it is left as it is)."""
    return next_slot(slots, now, next_scheduled_run)


def skip_slot(
    slots: Schedule | None, now: dt.datetime, run_slot: dt.datetime | None, requested: dt.datetime | None
) -> dt.datetime:
    """The run of a slot will not happen (expired, cancelled): the job moves to its next slot after now (now
    without a cadence); left due at that slot it would be claimed again at once for it. A pull-in wins."""
    return pulled_in(next_slot(slots, now, run_slot or now) or now, requested)


# The one-statement finish picks the job's next slot among a few computed here around the expected time of
# the finish; the statement checks that the database's time is within them, else the finish goes the long way.
SLOT_WINDOW = dt.timedelta(seconds=1)
MAX_SLOTS = 32
NEVER_BEFORE = dt.datetime(1, 1, 2, tzinfo=dt.timezone.utc)
NEVER_AFTER = dt.datetime(9999, 12, 30, tzinfo=dt.timezone.utc)


def slots_near(
    slots: Schedule, anchor: dt.datetime, expected: dt.datetime
) -> tuple[list[dt.datetime], dt.datetime, dt.datetime]:
    """Consecutive slots of `slots` (counted from `anchor`) from the first one after `expected` - window
    until one past `expected` + window (at most `MAX_SLOTS`), and the range [lower, upper) of times `now`
    for which the first of them after `now` is `slots.next_after(now, anchor)`."""
    lower = expected - SLOT_WINDOW
    found = [slots.next_after(lower, anchor)]
    while found[-1] <= expected + SLOT_WINDOW and len(found) < MAX_SLOTS:
        found.append(slots.next_after(found[-1], anchor))
    return found, lower, found[-1]


@dataclass(frozen=True)
class FinishWindow:
    """`next_run_after_completion` / `retry_at` as the one-statement finish computes them in SQL: the next run
    is `least(now + delay, the first of slots after now)` (or the claim-moved next run when `use_next`: instead
    of it on completion, as a ceiling on retry), valid while the database's `now` is in [lower, upper)."""

    slots: list[dt.datetime] = field(default_factory=list)
    lower: dt.datetime = NEVER_BEFORE
    upper: dt.datetime = NEVER_AFTER
    delay: dt.timedelta | None = None
    use_next: bool = False


def finish_window(
    expected: dt.datetime,
    *,
    failed: bool,
    advances: bool,
    slots: Schedule | None,
    run_slot: dt.datetime,
    failure_count: int,
    backoff: Backoff,
    backoff_cap: dt.timedelta,
) -> FinishWindow:
    """The window of a finish expected at `expected` (a completion without the job's own delay, or a failure)."""
    near: tuple[list[dt.datetime], dt.datetime, dt.datetime] = ([], NEVER_BEFORE, NEVER_AFTER)
    if slots is not None and (failed or not advances):
        near = slots_near(slots, run_slot, expected)
    delay = None
    if failed:
        delay = backoff_delay(failure_count + 1, backoff, None)
    elif not advances and slots is None:
        delay = backoff_cap
    return FinishWindow(near[0], near[1], near[2], delay, advances)
