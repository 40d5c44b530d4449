"""Schedule math: intervals keep a fixed cadence, crontabs follow their zone across DST, solar events."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest
from celery.schedules import crontab, schedule, solar

from celery_dbsched.schedules import (
    CrontabSchedule,
    IntervalSchedule,
    SolarSchedule,
    schedule_from,
    schedule_from_spec,
)

UTC = dt.timezone.utc


def utc(*args: int) -> dt.datetime:
    return dt.datetime(*args, tzinfo=UTC)


def slots(sched: CrontabSchedule | IntervalSchedule, start: dt.datetime, count: int) -> list[dt.datetime]:
    out, t = [], start
    for _ in range(count):
        t = sched.next_after(t)
        out.append(t)
    return out


def local(times: list[dt.datetime], zone: str) -> list[str]:
    return [t.astimezone(ZoneInfo(zone)).strftime("%m-%d %H:%M%z") for t in times]


def test_interval_keeps_fixed_cadence_from_its_anchor() -> None:
    every = IntervalSchedule(10)
    anchor = utc(2026, 1, 1)
    # Completed 3 s after the slot: next slot is anchor + 10 s, not completion + 10 s.
    assert every.next_after(anchor + dt.timedelta(seconds=3), anchor) == anchor + dt.timedelta(seconds=10)
    # Slots missed: the next one after now, still on the cadence.
    assert every.next_after(anchor + dt.timedelta(seconds=35), anchor) == anchor + dt.timedelta(seconds=40)
    assert every.next_after(anchor) == anchor + dt.timedelta(seconds=10)


def test_interval_latest_missed_slot_is_the_one_catch_up() -> None:
    every = IntervalSchedule(10)
    since = utc(2026, 1, 1)
    assert every.latest_at_or_before(since + dt.timedelta(seconds=9), since) is None
    assert every.latest_at_or_before(since + dt.timedelta(seconds=35), since) == since + dt.timedelta(seconds=30)


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf")])
def test_interval_must_be_positive(bad: float) -> None:
    with pytest.raises(ValueError, match="positive"):
        IntervalSchedule(bad)


def test_daily_crontab_across_berlin_spring_transition_neither_skips_nor_doubles() -> None:
    daily = schedule_from(crontab(minute=30, hour=2), timezone="Europe/Berlin")
    times = slots(daily, utc(2026, 3, 27, 12), 4)  # Europe/Berlin springs forward on 2026-03-29
    assert local(times, "Europe/Berlin") == [
        "03-28 02:30+0100",
        "03-29 03:30+0200",  # 02:30 does not exist that night: shifted by the gap, not skipped
        "03-30 02:30+0200",
        "03-31 02:30+0200",
    ]


def test_daily_crontab_across_berlin_autumn_transition_runs_once() -> None:
    daily = schedule_from(crontab(minute=30, hour=2), timezone="Europe/Berlin")
    times = slots(daily, utc(2026, 10, 23, 12), 4)  # falls back on 2026-10-25: 02:30 happens twice
    assert local(times, "Europe/Berlin") == [
        "10-24 02:30+0200",
        "10-25 02:30+0200",
        "10-26 02:30+0100",
        "10-27 02:30+0100",
    ]


def test_crontab_across_new_york_transitions() -> None:
    every_half_hour = CrontabSchedule(minute="0,30", hour="1-3", timezone="America/New_York")
    spring = slots(every_half_hour, utc(2026, 3, 8, 6, 0), 5)  # 2026-03-08 02:00 EST -> 03:00 EDT
    assert local(spring, "America/New_York") == [
        "03-08 01:30-0500",
        "03-08 03:00-0400",  # 02:00 and 02:30 fall in the gap: shifted to 03:00 and 03:30 ...
        "03-08 03:30-0400",  # ... which are slots anyway: each runs once
        "03-09 01:00-0400",
        "03-09 01:30-0400",
    ]
    autumn = slots(every_half_hour, utc(2026, 11, 1, 4, 45), 6)  # 2026-11-01 02:00 EDT -> 01:00 EST
    assert local(autumn, "America/New_York") == [
        "11-01 01:00-0400",
        "11-01 01:30-0400",  # the repeated 01:00-01:59 (EST) does not run again
        "11-01 02:00-0500",
        "11-01 02:30-0500",
        "11-01 03:00-0500",
        "11-01 03:30-0500",
    ]
    assert len(set(autumn)) == len(autumn)


def test_crontab_follows_app_timezone_not_utc() -> None:
    nine = schedule_from(crontab(minute=0, hour=9), timezone="America/New_York")
    assert nine.next_after(utc(2026, 7, 1, 0)) == utc(2026, 7, 1, 13)  # 09:00 EDT


def test_crontab_day_of_month_and_day_of_week_both_match_like_celery() -> None:
    friday_13th = CrontabSchedule(minute="0", hour="0", day_of_month="13", day_of_week="5")
    assert friday_13th.next_after(utc(2026, 1, 1)) == utc(2026, 2, 13)
    assert friday_13th.next_after(utc(2026, 2, 13)) == utc(2026, 3, 13)


def test_crontab_latest_missed_slot() -> None:
    daily = CrontabSchedule(minute="0", hour="6")
    assert daily.latest_at_or_before(utc(2026, 1, 5, 12), utc(2026, 1, 1, 12)) == utc(2026, 1, 5, 6)
    assert daily.latest_at_or_before(utc(2026, 1, 1, 13), utc(2026, 1, 1, 12)) is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"minute": "61"}, "invalid crontab"),
        ({"hour": "x"}, "invalid crontab"),
        ({"timezone": "Mars/Olympus"}, "unknown timezone"),
        ({"day_of_month": "30", "month_of_year": "2"}, "invalid crontab"),
    ],
)
def test_crontab_validation(kwargs: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CrontabSchedule(**kwargs)


def test_solar_sunrise_in_berlin() -> None:
    pytest.importorskip("ephem", reason="solar schedules need the 'ephem' package (the [solar] extra)")
    sunrise = schedule_from(solar("sunrise", 52.52, 13.40))
    first = sunrise.next_after(utc(2026, 6, 21))
    assert first.date() == dt.date(2026, 6, 21)
    assert dt.time(2, 30) <= first.time() <= dt.time(3, 0)  # about 04:43 CEST
    second = sunrise.next_after(first)
    assert dt.timedelta(hours=23, minutes=50) < second - first < dt.timedelta(hours=24, minutes=10)


def test_solar_validation() -> None:
    with pytest.raises(ValueError, match="unknown solar event"):
        SolarSchedule("noonish", 0, 0)
    with pytest.raises(ValueError, match="lat"):
        SolarSchedule("sunrise", 95, 0)


@pytest.mark.parametrize(
    "value",
    [
        30,
        2.5,
        dt.timedelta(minutes=5),
        schedule(run_every=dt.timedelta(seconds=45)),
        crontab(minute="*/15", hour="9-17", day_of_week="mon-fri"),
        crontab(minute={0, 30}),
        solar("sunset", -33.87, 151.21),
    ],
)
def test_celery_schedules_round_trip_through_their_spec(value: object) -> None:
    sched = schedule_from(value, timezone="Europe/Berlin")
    again = schedule_from_spec(sched.to_json())
    assert again == sched
    assert again.spec() == sched.spec()


@pytest.mark.parametrize("value", [True, "hourly", None, object(), -5, dt.timedelta(0)])
def test_unsupported_schedules_are_rejected(value: object) -> None:
    with pytest.raises(ValueError):
        schedule_from(value)
