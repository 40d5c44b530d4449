"""What people type for a run-time schedule (`dbsched add|edit` options, the dashboard's form) read into the
runtime API's keywords (celery_dbsched.schedule_input): pure functions, the one reader of both fronts."""

from __future__ import annotations

import dataclasses
import datetime as dt
from zoneinfo import ZoneInfo

import pytest

from celery_dbsched import display, schedule_input
from celery_dbsched.errors import FieldError
from celery_dbsched.records import JobRecord
from celery_dbsched.schedules import ClockedSchedule, CrontabSchedule, IntervalSchedule, SolarSchedule
from celery_dbsched.states import JobKind, Misfire, Origin

T0 = dt.datetime(2026, 12, 5, 8, 0, tzinfo=dt.timezone.utc)


def read(zone: str = "UTC", **values: object) -> dict[str, object]:
    return schedule_input.read_fields(values, zone)


def stored(**changes: object) -> JobRecord:
    job = JobRecord(
        name="report",
        description="weekly",
        next_scheduled_run=T0,
        every=None,
        queue="reports",
        interrupt_threshold=None,
        failure_count=0,
        create_time=T0,
        update_time=T0,
        kind=JobKind.TASK,
        schedule=CrontabSchedule("0", "7", timezone="Asia/Tokyo"),
        task="proj.report",
        task_args=("weekly",),
        task_kwargs={"format": "pdf"},
        task_options={"queue": "reports", "priority": 5},
        origin=Origin.RUNTIME,
    )
    return dataclasses.replace(job, **changes)


def test_each_schedule_field_reads_into_our_schedule() -> None:
    assert read(every="90") == {"schedule": IntervalSchedule(90.0)}
    assert read(every="5m")["schedule"] == IntervalSchedule(300.0)
    assert read("Europe/Berlin", crontab="*/5 * * * 1-5")["schedule"] == CrontabSchedule(
        "*/5", day_of_week="1-5", timezone="Europe/Berlin"
    )
    assert read(crontab="0 2 * * *", tz="Asia/Tokyo")["schedule"] == CrontabSchedule("0", "2", timezone="Asia/Tokyo")
    clocked = read(at="2026-12-24T18:00", tz="Europe/Berlin")
    assert clocked == {
        "schedule": ClockedSchedule(dt.datetime(2026, 12, 24, 17, tzinfo=dt.timezone.utc)),
        "one_off": True,
    }
    assert read(at="2026-12-24T18:00+00:00", tz="Europe/Berlin")["schedule"] == ClockedSchedule(
        dt.datetime(2026, 12, 24, 18, tzinfo=dt.timezone.utc)
    )
    assert read(solar="sunrise", lat="52.5", lon="13.4")["schedule"] == SolarSchedule("sunrise", 52.5, 13.4)
    assert read(every="", crontab="", at="", solar="") == {}  # empty schedule fields: none given


@pytest.mark.parametrize(
    ("values", "field", "words"),
    [
        ({"every": "60", "crontab": "* * * * *"}, "schedule", "every and crontab given; give one schedule"),
        ({"every": "-5"}, "every", "90s, 5m or 1h"),
        ({"every": "0s"}, "every", "more than 0 seconds"),
        ({"crontab": "* * * * * *"}, "crontab", "got 6 in"),
        ({"crontab": "* 25 * * *"}, "crontab", "each field as in cron"),
        ({"at": "24/12/2026"}, "at", "ISO time"),
        ({"solar": "sunrise", "lat": "52"}, "solar", "needs lat and lon"),
        ({"solar": "sunrise", "lat": "95", "lon": "0"}, "lat", "from -90 to 90"),
        ({"lon": "13"}, "solar", "give the event too"),
        ({"tz": "Europe/Atlantis"}, "tz", "unknown time zone"),
        ({"args": "[1,"}, "args", "not JSON"),
        ({"args": "7"}, "args", "expected a JSON array"),
        ({"kwargs": "[]"}, "kwargs", "expected a JSON object"),
        ({"headers": "{'a': 1}"}, "headers", "not JSON"),
        ({"priority": "high"}, "priority", "whole number from 0 to 255"),
        ({"max_active": "1001"}, "max_active", "from 1 to 1000"),
        ({"misfire": "never"}, "misfire", "run_once, skip"),
        ({"misfire_grace": "a while"}, "misfire_grace", "90s, 5m or 1h"),
        ({"enabled": "maybe"}, "enabled", "true or false"),
        ({"start_time": "now"}, "start_time", "ISO time"),
    ],
)
def test_a_value_it_cannot_read_is_one_error_naming_the_field(values: dict[str, str], field: str, words: str) -> None:
    with pytest.raises(FieldError) as caught:
        schedule_input.read_fields(values, "UTC")
    assert caught.value.field == field and words in caught.value.reason, caught.value
    assert str(caught.value) == f"{field}: {caught.value.reason}"


def test_the_error_names_the_commands_option() -> None:
    assert FieldError("routing_key", "x").option == "--routing-key"
    assert FieldError("schedule", "x").option == "--every / --crontab / --at / --solar"


def test_the_other_fields_and_what_empty_means() -> None:
    keywords = read(
        task=" proj.t ", args='[1, "a"]', kwargs='{"k": 2}', queue="q", priority="3", headers='{"h": 1}',
        expires="1m", description="d", enabled="off", one_off=True, start_time="2026-12-06T00:00",
        misfire="skip", misfire_grace="30", max_active="4",
    )  # fmt: skip
    assert keywords == {
        "task": "proj.t",
        "args": (1, "a"),
        "kwargs": {"k": 2},
        "options": {"queue": "q", "priority": 3, "headers": {"h": 1}, "expires": 60.0},
        "description": "d",
        "enabled": False,
        "one_off": True,
        "start_time": dt.datetime(2026, 12, 6, tzinfo=dt.timezone.utc),
        "misfire": Misfire.SKIP,
        "misfire_grace": dt.timedelta(seconds=30),
        "max_active": 4,
    }
    # JSON given as JSON (the dashboard's API) is read as its text.
    assert read(args=[1, "a"], kwargs={"k": 2}) == {"args": (1, "a"), "kwargs": {"k": 2}}
    # Empty clears: no args, no kwargs, an option removed, no grace.
    assert read(args="", kwargs="", queue="", misfire_grace="") == {
        "args": (),
        "kwargs": {},
        "options": {"queue": None},
        "misfire_grace": None,
    }
    assert read(tz="Asia/Tokyo") == {"timezone": "Asia/Tokyo"}  # a zone alone: an edit's


def test_for_add_needs_a_task_and_a_schedule() -> None:
    with pytest.raises(FieldError, match=r"^task: which Celery task"):
        schedule_input.for_add(read(every="60"))
    with pytest.raises(FieldError, match=r"^schedule: give one schedule"):
        schedule_input.for_add(read(task="t"))
    with pytest.raises(FieldError, match=r"^schedule: give one schedule"):
        schedule_input.for_add(read(task="t", tz="UTC"))
    added = schedule_input.for_add(read(task="t", every="60", queue="", priority="1", description=""))
    assert added == {"task": "t", "schedule": IntervalSchedule(60.0), "options": {"priority": 1}}


def test_an_edit_changes_what_differs_and_merges_the_options() -> None:
    job = stored()
    assert schedule_input.changes_for(job, read(crontab="0 7 * * *", tz="Asia/Tokyo", args='["weekly"]')) == {}
    assert schedule_input.changes_for(job, read(queue="", headers='{"h": 1}')) == {
        "options": {"priority": 5, "headers": {"h": 1}}
    }
    assert schedule_input.changes_for(job, read(tz="Europe/Berlin")) == {
        "schedule": CrontabSchedule("0", "7", timezone="Europe/Berlin")
    }
    assert schedule_input.changes_for(job, read(every="60", description="weekly")) == {
        "schedule": IntervalSchedule(60.0)
    }
    interval = stored(schedule=IntervalSchedule(60.0))
    with pytest.raises(FieldError, match=r"^tz: report's schedule \(every 1 min\) has no zone"):
        schedule_input.changes_for(interval, read(tz="Europe/Berlin"))


def test_parse_time_and_the_summary_of_a_task_job() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    assert display.parse_time("2026-12-05T09:00", berlin) == T0
    assert display.parse_time("2026-12-05 08:00:00+00:00") == T0
    with pytest.raises(ValueError):
        display.parse_time("tomorrow")
    job = stored(one_off=True)
    assert display.task_summary(job) == (
        'proj.report ["weekly"] {"format": "pdf"} cron 0 7 * * * Asia/Tokyo, queue reports, priority 5, once (one-off)'
    )
    clocked = stored(schedule=ClockedSchedule(T0), task_args=(), task_kwargs={}, task_options={}, one_off=True)
    assert display.task_summary(clocked) == "proj.report once at 2026-12-05 08:00:00"
