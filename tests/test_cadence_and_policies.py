"""Issue 3: fixed cadence, crontabs across DST, and per-job policies, on a frozen database clock.

Every test drives `celery_dbsched.testing.TestScheduler` (a beat and a worker in one object) on SQLite and on
PostgreSQL, with the database clock frozen at exact instants (`now=`, `freeze`, `advance`): no sleeping.
Each policy test holds a control next to it (the same timeline without the policy) so that it fails when
the policy is not applied.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from celery.schedules import crontab
from helpers.apps import TestSchedulerFactory, make_app, noop, seconds

from celery_dbsched import Job, JobContext, JobStatus, job, register_job
from celery_dbsched.beat_schedule import definitions
from celery_dbsched.errors import InvalidRunState

UTC = dt.timezone.utc
T0 = dt.datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")


def utc(*args: int) -> dt.datetime:
    return dt.datetime(*args, tzinfo=UTC)


# --- fixed cadence ------------------------------------------------------------------------------------


def test_every_keeps_a_fixed_cadence_whatever_the_completion_time(scheduler: TestSchedulerFactory) -> None:
    app = make_app()
    job(app, name="cadence", description="every minute", every=60)(noop)
    s = scheduler(app)
    assert s.job("cadence").next_scheduled_run == T0  # an interval's first slot is at once

    [run] = s.claim()
    assert run.scheduled_for == T0
    s.advance(25)  # the run takes 25 s
    finished = s.run(run)
    assert finished is not None and finished.status == "completed"
    # Due at T0 -> next due at T0 + 60, not at completion (T0 + 25) + 60.
    assert s.job("cadence").next_scheduled_run == T0 + seconds(60)

    s.freeze(T0 + seconds(60))
    [run] = s.claim()
    s.advance(59)
    s.run(run)
    assert s.job("cadence").next_scheduled_run == T0 + seconds(120)


def test_missed_slots_give_one_catch_up_run_then_back_on_cadence(scheduler: TestSchedulerFactory) -> None:
    app = make_app()
    job(app, name="catch-up", description="every minute", every=60)(noop)
    s = scheduler(app)
    assert [r.scheduled_for for r in s.tick()] == [T0]

    s.freeze(T0 + seconds(5 * 60 + 10))  # five slots (T0+60 ... T0+300) passed while nothing ran
    [catch_up] = s.tick()
    assert catch_up.scheduled_for == T0 + seconds(60)
    assert s.tick() == []  # never a burst of the missed slots
    assert s.job("catch-up").next_scheduled_run == T0 + seconds(360)  # the next slot on the cadence

    s.freeze(T0 + seconds(359))
    assert s.tick() == []
    s.freeze(T0 + seconds(360))
    assert [r.scheduled_for for r in s.tick()] == [T0 + seconds(360)]
    assert len(s.runs("catch-up")) == 3


def test_returned_delay_counts_from_completion_and_wins(scheduler: TestSchedulerFactory) -> None:
    app = make_app()

    @job(app, name="returns-delay", description="returns its own delay", every=60)
    def returns_delay(ctx: JobContext) -> dt.timedelta:
        return seconds(7)

    @job(app, name="returns-zero", description="asks to run again at once", every=3600)
    def returns_zero(ctx: JobContext) -> int:
        return 0

    s = scheduler(app)
    runs = {run.job_name: run for run in s.claim()}
    s.advance(25)
    for run in runs.values():
        s.run(run)
    assert s.job("returns-delay").next_scheduled_run == T0 + seconds(25 + 7)  # completion + 7, not T0 + 60
    assert s.job("returns-zero").next_scheduled_run == T0 + seconds(25)
    assert [r.job_name for r in s.tick()] == ["returns-zero"]


class SevenSeconds(Job):
    name = "class-delay"
    description = "a class job whose next_run_in() gives the delay"
    every = dt.timedelta(minutes=1)

    def __init__(self, delay: dt.timedelta | None) -> None:
        self.delay = delay

    def status(self) -> JobStatus:
        return JobStatus(0, 0)

    def run(self, ctx: JobContext) -> None:
        return None

    def next_run_in(self) -> dt.timedelta | None:
        return self.delay


@pytest.mark.parametrize(
    ("delay", "expected"),
    [(seconds(7), T0 + seconds(25 + 7)), (None, T0 + seconds(60))],
    ids=["next_run_in-wins", "None-keeps-the-cadence"],
)
def test_class_job_next_run_in(
    scheduler: TestSchedulerFactory, delay: dt.timedelta | None, expected: dt.datetime
) -> None:
    app = make_app()
    register_job(app, SevenSeconds(delay))
    s = scheduler(app)
    [run] = s.claim()
    s.advance(25)
    s.run(run)
    assert s.job("class-delay").next_scheduled_run == expected


# --- crontabs, time zones, DST ------------------------------------------------------------------------

# Jobs of the DST test: (name, crontab, per-job timezone or None for app.conf.timezone = Europe/Berlin).
DST_JOBS = [
    ("berlin.0230", crontab(minute=30, hour=2), None),  # skipped (spring) and repeated (autumn) in Berlin
    ("berlin.hourly", crontab(minute=30), None),
    ("ny.0230", crontab(minute=30, hour=2), "America/New_York"),  # skipped in New York's spring
    ("ny.0130", crontab(minute=30, hour=1), "America/New_York"),  # repeated in New York's autumn
    ("ny.hourly", crontab(minute=30), "America/New_York"),
]
ZONES = {"berlin": BERLIN, "ny": NEW_YORK}

# Each season: the window simulated, and the transition days (zone -> day).
SEASONS = {
    "spring": (utc(2026, 3, 1, 12), utc(2026, 4, 4, 12), {"berlin": dt.date(2026, 3, 29), "ny": dt.date(2026, 3, 8)}),
    "autumn": (
        utc(2026, 10, 17, 12),
        utc(2026, 11, 8, 12),
        {"berlin": dt.date(2026, 10, 25), "ny": dt.date(2026, 11, 1)},
    ),
}

# The runs on the transition days, by hand: what a reader of the README expects.
TRANSITION_RUNS = {
    ("spring", "berlin.0230"): [utc(2026, 3, 29, 1, 30)],  # 02:30 does not exist: 03:30 CEST
    ("spring", "ny.0230"): [utc(2026, 3, 8, 7, 30)],  # 02:30 does not exist: 03:30 EDT
    ("spring", "ny.0130"): [utc(2026, 3, 8, 6, 30)],  # 01:30 EST, untouched
    ("autumn", "berlin.0230"): [utc(2026, 10, 25, 0, 30)],  # 02:30 twice: the first (CEST) only
    ("autumn", "ny.0130"): [utc(2026, 11, 1, 5, 30)],  # 01:30 twice: the first (EDT) only
    ("autumn", "ny.0230"): [utc(2026, 11, 1, 7, 30)],  # 02:30 EST, once
}


def _tick_times(start: dt.datetime, end: dt.datetime, transitions: list[dt.date]) -> list[dt.datetime]:
    """Day by day at 12:00 UTC, and every 20 minutes from the day before each transition to two days after."""
    times = set()
    t = start
    while t <= end:
        times.add(t)
        t += dt.timedelta(days=1)
    for day in transitions:
        t = dt.datetime.combine(day - dt.timedelta(days=1), dt.time(0), UTC)
        stop = t + dt.timedelta(days=4)
        while t < stop:
            times.add(t)
            t += dt.timedelta(minutes=20)
    return sorted(times)


@pytest.mark.slow  # ticks through the days around a DST change
@pytest.mark.parametrize("season", list(SEASONS))
def test_crontabs_across_dst_neither_skip_nor_double(scheduler: TestSchedulerFactory, season: str) -> None:
    start, end, transitions = SEASONS[season]
    app = make_app(timezone="Europe/Berlin")
    for name, cron, zone in DST_JOBS:
        job(app, name=name, description=f"crontab {name}", schedule=cron, timezone=zone)(noop)
    s = scheduler(app, now=start)
    assert s.job("berlin.0230").schedule.timezone == "Europe/Berlin"  # type: ignore[union-attr]
    assert s.job("ny.hourly").schedule.timezone == "America/New_York"  # type: ignore[union-attr]

    for t in _tick_times(start, end, list(transitions.values())):
        s.freeze(t)
        for run in s.tick():
            assert run.status == "completed", run

    by_day: dict[tuple[str, dt.date], list[dt.datetime]] = defaultdict(list)
    for run in s.runs():
        assert run.scheduled_for is not None
        zone = ZONES[run.job_name.split(".")[0]]
        by_day[run.job_name, run.scheduled_for.astimezone(zone).date()].append(run.scheduled_for)

    first_day, last_day = start.date() + dt.timedelta(days=1), end.date() - dt.timedelta(days=1)
    day = first_day
    while day <= last_day:
        for name, cron, _ in DST_JOBS:
            prefix = name.split(".")[0]
            zone = ZONES[prefix]
            slots = sorted(by_day[name, day])
            assert len(set(slots)) == len(slots), f"{name} doubled a slot on {day}: {slots}"
            if (season, name) in TRANSITION_RUNS and day == transitions[prefix]:
                assert slots == TRANSITION_RUNS[season, name], f"{name} on {day}"
            elif name.endswith("hourly"):
                if day not in (transitions[prefix], transitions[prefix] + dt.timedelta(days=1)):
                    continue  # ticked once a day there: one catch-up run a day, not a count of slots
                # Every real hour once: 23 runs on the short spring day (02:30 is 03:30's instant), 25 on
                # the long autumn day (an every-hour crontab also runs in the repeated hour, as cron does).
                expected = {"spring": 23, "autumn": 25}[season] if day == transitions[prefix] else 24
                assert len(slots) == expected, f"{name} on {day}: {[t.astimezone(zone).isoformat() for t in slots]}"
                assert {t.astimezone(zone).minute for t in slots} == {30}
            else:
                wall = dt.datetime.combine(day, dt.time(int(cron._orig_hour), 30))
                assert slots == [wall.replace(tzinfo=zone).astimezone(UTC)], f"{name} on {day}: {slots}"
        day += dt.timedelta(days=1)


def test_crontab_without_a_zone_follows_app_timezone(scheduler: TestSchedulerFactory) -> None:
    app = make_app(timezone="America/New_York")
    job(app, name="nine", description="09:00 in the app's zone", schedule=crontab(minute=0, hour=9))(noop)
    job(app, name="nine-utc", description="09:00 UTC", schedule=crontab(minute=0, hour=9), timezone="UTC")(noop)
    s = scheduler(app, now=utc(2026, 7, 1, 0))
    assert s.job("nine").next_scheduled_run == utc(2026, 7, 1, 13)  # 09:00 EDT
    assert s.job("nine-utc").next_scheduled_run == utc(2026, 7, 1, 9)


def test_app_timezone_set_after_the_jobs_are_declared_still_applies(scheduler: TestSchedulerFactory) -> None:
    # A common layout: tasks/jobs modules are imported, then the app is configured (config_from_object).
    app = make_app()
    job(app, name="nine", description="09:00 in the app's zone", schedule=crontab(minute=0, hour=9))(noop)
    app.conf.timezone = "America/New_York"
    s = scheduler(app, now=utc(2026, 7, 1, 0))
    assert s.job("nine").schedule.timezone == "America/New_York"  # type: ignore[union-attr]
    assert s.job("nine").next_scheduled_run == utc(2026, 7, 1, 13)


# --- enabled ------------------------------------------------------------------------------------------


def test_disabled_job_is_never_claimed_and_enabling_it_does_not_fire_for_missed_slots(
    scheduler: TestSchedulerFactory,
) -> None:
    app = make_app()
    job(app, name="off", description="disabled", every=60, enabled=False)(noop)
    job(app, name="on", description="control", every=60)(noop)
    s = scheduler(app)
    for minutes in range(0, 10):
        s.freeze(T0 + dt.timedelta(minutes=minutes, seconds=1))
        s.tick()
    assert s.runs("off") == []
    assert len(s.runs("on")) == 10  # the control ran at every slot
    assert s.job("off").policy.enabled is False

    now = T0 + seconds(10 * 60 + 30)
    s.freeze(now)
    job(app, name="off", description="disabled", every=60, enabled=True)(noop)  # re-registered, enabled
    assert s.job("off").policy.enabled is True
    assert s.job("off").next_scheduled_run > now
    assert [r.job_name for r in s.tick()] == ["on"]  # not fired at once for the ten slots it was off

    s.freeze(s.job("off").next_scheduled_run)
    assert "off" in [r.job_name for r in s.tick()]
    assert len(s.runs("off")) == 1


def test_enabling_keeps_the_cadence(scheduler: TestSchedulerFactory) -> None:
    app = make_app()
    job(app, name="off", description="disabled", every=60, enabled=False)(noop)
    s = scheduler(app)
    s.freeze(T0 + seconds(150))
    job(app, name="off", description="disabled", every=60, enabled=True)(noop)
    # The next slot of its cadence (T0 + k * 60), not now + 60.
    assert s.job("off").next_scheduled_run == T0 + seconds(180)


# --- misfire ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("misfire", "expected_slots"),
    [
        # skip: T0+60 is 30 s late (beyond a 10 s grace): not run; T0+120 is 5 s late (within): runs.
        ("skip", [T0, T0 + seconds(120)]),
        # run_once (default): the late slot runs once (a catch-up), then T0+120 on schedule.
        ("run_once", [T0, T0 + seconds(60), T0 + seconds(120)]),
    ],
)
def test_misfire_policy(scheduler: TestSchedulerFactory, misfire: str, expected_slots: list[dt.datetime]) -> None:
    app = make_app()
    job(app, name="m", description="misfire", every=60, misfire=misfire, misfire_grace=10)(noop)
    s = scheduler(app)
    s.tick()
    s.freeze(T0 + seconds(90))
    s.tick()
    if misfire == "skip":
        assert s.job("m").next_scheduled_run == T0 + seconds(120)  # moved to the next slot, not run
    s.freeze(T0 + seconds(125))
    s.tick()
    assert [r.scheduled_for for r in s.runs("m")] == expected_slots
    assert {r.status for r in s.runs("m")} == {"completed"}


def test_misfire_skip_default_grace_is_a_minute(scheduler: TestSchedulerFactory) -> None:
    app = make_app()
    job(app, name="skip", description="skip", every=600, misfire="skip")(noop)
    s = scheduler(app)
    s.tick()
    s.freeze(T0 + seconds(600 + 59))  # 59 s late: within the default grace
    assert [r.scheduled_for for r in s.tick()] == [T0 + seconds(600)]
    s.freeze(T0 + seconds(1200 + 61))  # 61 s late: skipped
    assert s.tick() == []
    assert s.job("skip").next_scheduled_run == T0 + seconds(1800)


def test_misfire_skip_on_a_crontab_after_downtime(scheduler: TestSchedulerFactory) -> None:
    app = make_app()
    job(app, name="daily", description="06:00", schedule=crontab(minute=0, hour=6), misfire="skip")(noop)
    job(app, name="daily-catch-up", description="06:00", schedule=crontab(minute=0, hour=6))(noop)
    s = scheduler(app, now=utc(2026, 1, 1, 12))
    s.freeze(utc(2026, 1, 4, 9))  # down for three days
    assert [r.job_name for r in s.tick()] == ["daily-catch-up"]  # one catch-up run, not three
    assert s.tick() == []
    assert s.job("daily").next_scheduled_run == utc(2026, 1, 5, 6)
    assert s.job("daily-catch-up").next_scheduled_run == utc(2026, 1, 5, 6)


# --- max_active ---------------------------------------------------------------------------------------


def test_max_active_two_allows_two_concurrent_runs_never_a_third(scheduler: TestSchedulerFactory) -> None:
    app = make_app()
    job(app, name="overlap", description="may overlap", every=60, max_active=2)(noop)
    job(app, name="single", description="control: one at a time", every=60)(noop)
    s = scheduler(app)

    first = s.claim()
    assert sorted(r.job_name for r in first) == ["overlap", "single"]
    # The schedule advances at claim for an overlapping job (and only once: no burst).
    assert s.job("overlap").next_scheduled_run == T0 + seconds(60)
    assert s.claim() == []

    s.freeze(T0 + seconds(60))
    second = s.claim()
    assert [r.job_name for r in second] == ["overlap"]  # "single" still has its queued run
    assert s.job("overlap").next_scheduled_run == T0 + seconds(120)
    assert len(s.runs("overlap", status="queued")) == 2

    for minutes in (2, 3, 4):
        s.freeze(T0 + dt.timedelta(minutes=minutes))
        assert s.claim() == []  # never a third
    assert len(s.runs("overlap", status="queued")) == 2
    assert s.job("overlap").next_scheduled_run == T0 + seconds(120)

    s.freeze(T0 + seconds(250))
    done = s.run(first[[r.job_name for r in first].index("overlap")])
    assert done is not None and done.status == "completed"
    [third] = [r for r in s.claim() if r.job_name == "overlap"]  # one catch-up for the missed slots
    assert third.scheduled_for == T0 + seconds(120)
    assert s.job("overlap").next_scheduled_run == T0 + seconds(300)
    assert s.claim() == []
    assert len(s.runs("overlap", status="queued")) == 2


def test_max_active_runs_really_run_side_by_side(scheduler: TestSchedulerFactory) -> None:
    app = make_app()
    job(app, name="overlap", description="may overlap", every=60, max_active=2)(noop)
    s = scheduler(app)
    [a] = s.claim()
    s.freeze(T0 + seconds(60))
    [b] = s.claim()
    s.repository.start_run(a.id, "w1")
    s.repository.start_run(b.id, "w2")
    assert {r.id for r in s.runs("overlap", status="running")} == {a.id, b.id}
    s.freeze(T0 + seconds(120))
    assert s.claim() == []


# --- retry backoff ------------------------------------------------------------------------------------


def test_per_job_retry_backoff_overrides_the_global_one(scheduler: TestSchedulerFactory) -> None:
    app = make_app()

    def boom(ctx: JobContext) -> None:
        raise RuntimeError("boom")

    job(app, name="own", description="own backoff", every=3600, retry_backoff=(100, 150))(boom)
    job(app, name="global", description="global backoff", every=3600)(boom)
    s = scheduler(app, retry_backoff=(5, 50))
    assert s.job("own").policy.retry_backoff == (seconds(100), seconds(150))

    assert {r.status for r in s.tick()} == {"failed"}
    assert s.job("own").next_scheduled_run == T0 + seconds(100)
    assert s.job("global").next_scheduled_run == T0 + seconds(5)

    s.freeze(T0 + seconds(100))
    s.tick()  # both fail again
    assert s.job("own").failure_count == 2
    assert s.job("own").next_scheduled_run == T0 + seconds(100 + 150)  # 200 s, capped at 150
    assert s.job("global").next_scheduled_run == T0 + seconds(100 + 10)  # the global base (5 s), doubled


# --- expires ------------------------------------------------------------------------------------------


def test_queued_run_not_started_before_slot_plus_expires_ends_expired(scheduler: TestSchedulerFactory) -> None:
    app = make_app()
    job(app, name="exp", description="expires after 30 s", every=60, expires=30)(noop)
    job(app, name="no-exp", description="control", every=60)(noop)
    s = scheduler(app)
    runs = {r.job_name: r for r in s.claim()}

    s.freeze(T0 + seconds(29))
    assert s.repository.expire_runs() == []
    s.freeze(T0 + seconds(31))
    [expired] = s.repository.expire_runs()
    assert expired.id == runs["exp"].id
    assert expired.status == "interrupted"
    assert expired.error is not None and expired.error.startswith("expired")
    assert s.repository.lookup_run(runs["no-exp"].id).status == "queued"  # the control is untouched


def test_worker_refuses_to_start_an_expired_run(scheduler: TestSchedulerFactory) -> None:
    app = make_app()
    started: list[int] = []

    @job(app, name="exp", description="expires after 30 s", every=60, expires=30)
    def exp(ctx: JobContext) -> None:
        started.append(ctx.run_id)

    s = scheduler(app)
    [late] = s.claim()
    s.freeze(T0 + seconds(31))
    assert s.run(late) is None  # the message is dropped
    assert started == []
    run = s.repository.lookup_run(late.id)
    assert run.status == "interrupted"
    assert run.error is not None and run.error.startswith("expired")
    with pytest.raises(InvalidRunState):
        s.repository.start_run(late.id, "another-worker")


def test_run_started_within_expires_runs(scheduler: TestSchedulerFactory) -> None:
    app = make_app()
    job(app, name="exp", description="expires after 30 s", every=60, expires=30)(noop)
    s = scheduler(app)
    [run] = s.claim()
    s.freeze(T0 + seconds(29))
    finished = s.run(run)
    assert finished is not None and finished.status == "completed"


def test_after_an_expired_run_the_job_waits_for_its_next_slot(scheduler: TestSchedulerFactory) -> None:
    app = make_app()
    job(app, name="exp", description="expires after 30 s", every=60, expires=30)(noop)
    s = scheduler(app)
    [late] = s.claim()
    s.freeze(T0 + seconds(40))
    assert [r.id for r in s.repository.expire_runs()] == [late.id]
    # Not claimed again for the slot that expired (that run would only expire again): the next slot.
    assert s.claim() == []
    assert s.job("exp").next_scheduled_run == T0 + seconds(60)
    s.freeze(T0 + seconds(61))
    [run] = s.claim()
    assert run.scheduled_for == T0 + seconds(60)
    finished = s.run(run)
    assert finished is not None and finished.status == "completed"


# --- re-registration ----------------------------------------------------------------------------------


def test_reregistration_recomputes_next_run_only_when_the_schedule_changes(scheduler: TestSchedulerFactory) -> None:
    app = make_app()
    job(app, name="r", description="first", every=60)(noop)
    s = scheduler(app)
    s.tick()
    before = s.job("r")
    assert before.next_scheduled_run == T0 + seconds(60)

    s.freeze(T0 + seconds(10))
    job(app, name="r", description="first", every=60)(noop)  # unchanged
    assert s.job("r") == before  # nothing written, not even update_time

    job(app, name="r", description="a new description", every=60)(noop)
    after = s.job("r")
    assert after.description == "a new description"
    assert after.next_scheduled_run == before.next_scheduled_run  # settings changed, schedule not

    job(app, name="r", description="a new description", every=300)(noop)
    assert s.job("r").next_scheduled_run == T0 + seconds(10 + 300)

    job(app, name="r", description="a new description", schedule=crontab(minute=0, hour=6))(noop)
    assert s.job("r").next_scheduled_run == utc(2026, 1, 6, 6)


# --- validation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"every": 60, "misfire": "sometimes"}, "misfire"),
        ({"every": 60, "max_active": 0}, "max_active"),
        ({"every": 60, "max_active": 1001}, "max_active"),
        ({"schedule": crontab(minute=0), "timezone": "Mars/Olympus"}, "Mars/Olympus"),
        ({"every": 60, "timezone": "Mars/Olympus"}, "Mars/Olympus"),
        ({"every": 60, "schedule": crontab(minute=0)}, "every"),
        ({"every": 60, "misfire_grace": -1}, "misfire_grace"),
        ({"every": 60, "expires": -1}, "expires"),
        ({"every": 60, "retry_backoff": (100, 10)}, "retry_backoff"),
        ({"schedule": "hourly"}, "schedule"),
    ],
)
def test_invalid_job_options_are_value_errors_naming_the_job(options: dict[str, Any], message: str) -> None:
    app = make_app()
    with pytest.raises(ValueError, match=message) as caught:
        job(app, name="bad.job", description="invalid", **options)(noop)
    assert "bad.job" in str(caught.value)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"task": "t", "schedule": 60, "every": 60}, "every"),
        ({"task": "t", "schedule": 60, "options": {"dbsched": {"misfire": "later"}}}, "misfire"),
        ({"task": "t", "schedule": 60, "max_active": 0}, "max_active"),
        ({"task": "t", "schedule": crontab(minute=0), "timezone": "Nowhere/Land"}, "Nowhere/Land"),
        ({"task": "t"}, "schedule"),
        ({"schedule": 60}, "task"),
    ],
)
def test_invalid_beat_schedule_entries_are_value_errors_naming_the_entry(entry: dict[str, Any], message: str) -> None:
    app = make_app(beat_schedule={"bad-entry": entry})
    with pytest.raises(ValueError, match=message) as caught:
        definitions(app)
    assert "bad-entry" in str(caught.value)
