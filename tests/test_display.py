"""How `dbsched` shows times and durations, and reads `--since` (celery_dbsched.display): pure functions."""

from __future__ import annotations

import datetime as dt
from types import SimpleNamespace
from zoneinfo import ZoneInfo

import pytest

from celery_dbsched import display
from celery_dbsched.schedules import CrontabSchedule, IntervalSchedule

NOW = dt.datetime(2026, 12, 5, 8, 0, tzinfo=dt.timezone.utc)


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (0, "0 s"),
        (0.42, "0.4 s"),
        (9.96, "10 s"),
        (42.7, "42 s"),
        (60, "1 min"),
        (303, "5 min 3 s"),
        (3600, "1 h"),
        (50085, "13 h 54 min"),
        (86400, "1 d"),
        (2 * 86400 + 3 * 3600 + 59, "2 d 3 h"),
        (-90, "-1 min 30 s"),
    ],
)
def test_durations_read_as_people_say_them(seconds: float, shown: str) -> None:
    assert display.duration(seconds) == shown
    assert display.duration(dt.timedelta(seconds=seconds)) == shown


def test_relative_times() -> None:
    assert display.relative(NOW + dt.timedelta(seconds=50085), NOW) == "in 13 h 54 min"
    assert display.relative(NOW, NOW) == "due"
    assert display.relative(NOW - dt.timedelta(hours=2), NOW) == "due"
    assert display.ago(NOW - dt.timedelta(minutes=5), NOW) == "5 min ago"


def test_times_in_a_zone() -> None:
    assert display.when(NOW) == "2026-12-05 08:00:00"
    assert display.when(NOW, ZoneInfo("Europe/Berlin")) == "2026-12-05 09:00:00"
    assert display.when(None) == "-"
    assert display.zone_name(ZoneInfo("Asia/Tokyo")) == "Asia/Tokyo"


@pytest.mark.parametrize(
    ("text", "since"),
    [
        ("90s", NOW - dt.timedelta(seconds=90)),
        ("30m", NOW - dt.timedelta(minutes=30)),
        ("30min", NOW - dt.timedelta(minutes=30)),
        ("1h", NOW - dt.timedelta(hours=1)),
        (" 1.5 h ", NOW - dt.timedelta(minutes=90)),
        ("2d", NOW - dt.timedelta(days=2)),
        ("1w", NOW - dt.timedelta(days=7)),
        ("2026-12-04", dt.datetime(2026, 12, 4, tzinfo=dt.timezone.utc)),
        ("2026-12-04T22:30", dt.datetime(2026, 12, 4, 22, 30, tzinfo=dt.timezone.utc)),
        ("2026-12-04T22:30+01:00", dt.datetime(2026, 12, 4, 21, 30, tzinfo=dt.timezone.utc)),
    ],
)
def test_since_takes_a_duration_or_an_iso_time(text: str, since: dt.datetime) -> None:
    assert display.parse_since(text, NOW) == since


def test_since_reads_a_naive_time_in_the_zone_shown() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    assert display.parse_since("2026-12-05T09:00", NOW, berlin) == NOW


@pytest.mark.parametrize("text", ["yesterday", "1y", "-1h", "", "1 hour"])
def test_since_anything_else_is_one_clear_error(text: str) -> None:
    with pytest.raises(ValueError) as excinfo:
        display.parse_since(text, NOW)
    assert str(excinfo.value) == (
        f"--since: expected a duration such as 30m, 1h, 2d or an ISO time such as 2026-12-05T08:00, got {text!r}"
    )


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"minute": "0", "hour": "2"}, "at 02:00 every day (UTC)"),
        ({"minute": "*/15"}, "every 15 min (UTC)"),
        (
            {"minute": "30", "hour": "9", "day_of_week": "1-5", "timezone": "Europe/Berlin"},
            "at 09:30 Monday to Friday (Europe/Berlin)",
        ),
        ({"minute": "0", "hour": "*/6"}, "every 6 h at :00 (UTC)"),
        ({"minute": "5"}, "every hour at :05 (UTC)"),
        ({}, "every minute (UTC)"),
        (
            {"minute": "0", "hour": "0", "day_of_month": "1", "month_of_year": "1,7"},
            "at 00:00 on day 1 of the month in January, July (UTC)",
        ),
        ({"minute": "0", "hour": "8", "day_of_week": "0,6"}, "at 08:00 on Sunday, Saturday (UTC)"),
        ({"minute": "0-10", "hour": "3"}, "cron 0-10 3 * * * UTC"),  # other shapes: as `dbsched jobs` writes them
        ({"minute": "0", "hour": "9", "day_of_week": "mon"}, "cron 0 9 * * mon UTC"),
    ],
)
def test_crontabs_in_words(fields: dict[str, str], words: str) -> None:
    job = SimpleNamespace(schedule=CrontabSchedule(**fields), every=None)
    assert display.schedule_words(job) == words


def test_intervals_in_words() -> None:
    assert display.schedule_words(SimpleNamespace(schedule=IntervalSchedule(300.0), every=None)) == "every 5 min"
