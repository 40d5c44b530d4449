"""What people type for a run-time schedule, on the command line (`dbsched add|edit`) and in the dashboard's
form, read into the keywords of `runtime.add_schedule` / `update_schedule`.

One reader for both fronts: a field has the same name in both (the command's option is `--` and the name with
dashes: `routing_key` is `--routing-key`), and a value it cannot read is a `FieldError` naming the field and
saying what to write instead. Schedules are resolved here to our `Schedule`s (a crontab in its zone, a clocked
time as an aware datetime), so that an edit of the zone alone is a new crontab and the comparison of an edit
with what is stored sees equal values as equal.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Mapping
from typing import Any

from . import display
from .errors import FieldError
from .records import JobRecord
from .schedules import (
    ClockedSchedule,
    CrontabSchedule,
    IntervalSchedule,
    Schedule,
    SolarSchedule,
    crontab_from_text,
    parse_timezone,
)
from .settings import parse_bool, parse_duration
from .states import Misfire

SCHEDULE_FIELDS = ("every", "crontab", "at", "solar")
# The message options beat_schedule entries take that a person sets here; stored in the job's options.
OPTION_FIELDS = ("queue", "routing_key", "exchange", "priority", "headers", "expires")
TEXT_FIELDS = ("task", "description")
FIELDS = (
    "task", *SCHEDULE_FIELDS, "lat", "lon", "tz", "args", "kwargs", *OPTION_FIELDS, "description", "enabled",
    "one_off", "start_time", "expire_time", "misfire", "misfire_grace", "max_active",
)  # fmt: skip
SCHEDULE_HELP = (
    "give one schedule: every (seconds, or 90s, 5m, 1h), crontab (five fields: minute hour day-of-month month "
    "day-of-week, such as '*/5 * * * *'), at (an ISO time such as 2026-12-24T18:00, once) or solar (an event "
    "such as sunrise, with lat and lon)"
)


def _given(values: Mapping[str, object], key: str) -> bool:
    return values.get(key) is not None


def _text(values: Mapping[str, object], key: str) -> str | None:
    value = values.get(key)
    if value is None:
        return None
    if isinstance(value, (list, dict)):  # JSON given as JSON (the dashboard's API), not as its text
        return json.dumps(value)
    return str(value).strip()


_JSON_NAMES: dict[type, str] = {list: "array", dict: "object"}


def _json(key: str, text: str, kind: type, example: str) -> Any:
    name = _JSON_NAMES[kind]
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise FieldError(key, f"not JSON ({exc}); give a JSON {name}, such as {example}") from None
    if not isinstance(value, kind):
        raise FieldError(key, f"expected a JSON {name}, such as {example}, got {text!r}")
    return value


def _duration(key: str, text: str) -> dt.timedelta | None:
    """Seconds, or 90s, 5m, 1h, 2d; '' or 0: none."""
    if not text:
        return None
    written = display.parse_duration(text)
    if written is not None:
        return written or None
    try:
        return parse_duration(key, text, None)
    except ValueError:
        raise FieldError(key, f"expected seconds or a duration such as 90s, 5m or 1h, got {text!r}") from None


def _time(key: str, text: str, zone: dt.tzinfo) -> dt.datetime:
    try:
        return display.parse_time(text, zone)
    except ValueError:
        raise FieldError(
            key, f"expected an ISO time such as 2026-12-24T18:00 (read in --tz, or with an offset), got {text!r}"
        ) from None


def _number(key: str, text: str, low: float, high: float) -> float:
    try:
        number = float(text)
    except ValueError:
        number = float("nan")
    if not low <= number <= high:
        raise FieldError(key, f"expected a number from {low:g} to {high:g}, got {text!r}")
    return number


def _whole(key: str, text: str, low: int, high: int) -> int:
    try:
        number = int(text)
    except ValueError:
        raise FieldError(key, f"expected a whole number from {low} to {high}, got {text!r}") from None
    if not low <= number <= high:
        raise FieldError(key, f"expected a whole number from {low} to {high}, got {number}")
    return number


def zone_of(values: Mapping[str, object], default_zone: str) -> str:
    """The zone the fields are read in (--tz, else `default_zone`: the app's); FieldError for an unknown one."""
    text = _text(values, "tz")
    if not text:
        return default_zone
    try:
        return parse_timezone(text).key
    except ValueError:
        raise FieldError("tz", f"unknown time zone {text!r}; use an IANA name such as Europe/Berlin or UTC") from None


def read_schedule(values: Mapping[str, object], zone: str) -> Schedule | None:
    """The one schedule the fields give (None: none given); FieldError for two, or one it cannot read."""
    given = [key for key in SCHEDULE_FIELDS if _text(values, key)]
    if len(given) > 1:
        raise FieldError("schedule", f"{' and '.join(given)} given; {SCHEDULE_HELP}")
    if given != ["solar"] and (_text(values, "lat") or _text(values, "lon")):
        raise FieldError("solar", "lat and lon are for a solar schedule: give the event too, such as sunrise")
    if not given:
        return None
    (key,) = given
    text = _text(values, key) or ""
    if key == "every":
        every = _duration("every", text)
        if every is None:
            raise FieldError("every", f"an interval must be more than 0 seconds, got {text!r}")
        return IntervalSchedule(every.total_seconds())
    if key == "crontab":
        count = len(text.split())
        if count != 5:
            raise FieldError(
                "crontab",
                "expected five fields, minute hour day-of-month month day-of-week, such as '*/5 * * * *' (every 5 "
                f"min), got {count} in {text!r}",
            )
        try:
            return crontab_from_text(text, zone)
        except ValueError as exc:
            raise FieldError("crontab", f"{exc}; each field as in cron: *, 5, 1-5, */15, 1,15") from None
    if key == "at":
        return ClockedSchedule(_time("at", text, parse_timezone(zone)))
    lat, lon = _text(values, "lat"), _text(values, "lon")
    if not lat or not lon:
        raise FieldError("solar", f"a solar schedule needs lat and lon (the place), got lat={lat!r} lon={lon!r}")
    latitude, longitude = _number("lat", lat, -90, 90), _number("lon", lon, -180, 180)
    try:
        return SolarSchedule(text, latitude, longitude)
    except ValueError as exc:
        raise FieldError("solar", str(exc)) from None


def read_fields(values: Mapping[str, object], default_zone: str) -> dict[str, Any]:
    """The keywords the given fields set (a field absent or None is not given). Text fields arrive as text; an
    empty one clears what it sets (its default), except the schedule fields: empty is not given. `options`
    holds the given option fields only, None for one to remove (`merge_options`). `tz` alone (no schedule)
    comes back as `timezone`: an edit of a crontab's zone."""
    zone = zone_of(values, default_zone)
    keywords: dict[str, Any] = {}
    schedule = read_schedule(values, zone)
    if schedule is not None:
        keywords["schedule"] = schedule
        if isinstance(schedule, ClockedSchedule) and not _given(values, "one_off"):
            keywords["one_off"] = True  # a clocked schedule runs once
    elif _text(values, "tz"):
        keywords["timezone"] = zone
    for key in TEXT_FIELDS:
        text = _text(values, key)
        if text is not None:
            keywords[key] = text
    if _given(values, "args"):
        text = _text(values, "args")
        keywords["args"] = tuple(_json("args", text, list, "'[1, \"two\"]'")) if text else ()
    if _given(values, "kwargs"):
        text = _text(values, "kwargs")
        keywords["kwargs"] = _json("kwargs", text, dict, "'{\"days\": 7}'") if text else {}
    options: dict[str, Any] = {}
    for key in OPTION_FIELDS:
        if not _given(values, key):
            continue
        text = _text(values, key) or ""
        if not text:
            options[key] = None
        elif key == "priority":
            options[key] = _whole("priority", text, 0, 255)
        elif key == "headers":
            options[key] = _json("headers", text, dict, '\'{"tenant": "acme"}\'')
        elif key == "expires":
            expires = _duration("expires", text)
            options[key] = None if expires is None else expires.total_seconds()
        else:
            options[key] = text
    if options:
        keywords["options"] = options
    for key in ("enabled", "one_off"):
        if _given(values, key):
            try:
                keywords[key] = parse_bool(key, values[key], True)
            except ValueError as exc:
                raise FieldError(key, str(exc).removeprefix(f"{key}: ")) from None
    if _text(values, "start_time"):
        keywords["start_time"] = _time("start_time", _text(values, "start_time") or "", parse_timezone(zone))
    if _given(values, "expire_time"):
        text = _text(values, "expire_time")
        keywords["expire_time"] = _time("expire_time", text, parse_timezone(zone)) if text else None
    if _text(values, "misfire"):
        misfire = _text(values, "misfire")
        if misfire not in set(Misfire):
            raise FieldError("misfire", f"expected one of {', '.join(Misfire)}, got {misfire!r}")
        keywords["misfire"] = Misfire(misfire)
    if _given(values, "misfire_grace"):
        keywords["misfire_grace"] = _duration("misfire_grace", _text(values, "misfire_grace") or "")
    if _text(values, "max_active"):
        keywords["max_active"] = _whole("max_active", _text(values, "max_active") or "", 1, 1000)
    return keywords


def merge_options(stored: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
    """The stored message options with the given ones over them (None removes one)."""
    merged = {**stored, **given}
    return {key: value for key, value in merged.items() if value is not None}


def for_add(keywords: Mapping[str, Any]) -> dict[str, Any]:
    """`add_schedule`'s keywords (task and schedule required); FieldError naming what is missing."""
    if not keywords.get("task"):
        raise FieldError("task", "which Celery task to send? its registered name, such as proj.tasks.cleanup")
    if "schedule" not in keywords:
        raise FieldError("schedule", SCHEDULE_HELP)
    added = dict(keywords)
    added.pop("timezone", None)  # a zone without a schedule (the form always has one): nothing to apply it to
    if "options" in added:
        added["options"] = merge_options({}, added["options"])
    if not added.get("description"):
        added.pop("description", None)
    return added


def stored_values(job: JobRecord) -> dict[str, Any]:
    """A run-time job's values by `update_schedule` keyword, to compare an edit with."""
    return {
        "task": job.task,
        "schedule": job.schedule,
        "args": tuple(job.task_args),
        "kwargs": dict(job.task_kwargs),
        "options": dict(job.task_options),
        "description": job.description,
        "enabled": job.policy.enabled,
        "one_off": job.one_off,
        "expire_time": job.expire_time,
        "misfire": job.policy.misfire,
        "misfire_grace": job.policy.misfire_grace,
        "max_active": job.policy.max_active,
    }


def changes_for(job: JobRecord, keywords: Mapping[str, Any]) -> dict[str, Any]:
    """`update_schedule`'s keywords for an edit of `job`: the options merged into the stored ones, a zone alone
    as the stored crontab in that zone, and only what differs from what is stored (an unchanged schedule does
    not move the next run). FieldError for a zone given to a schedule without one."""
    edits = dict(keywords)
    if "options" in edits:
        edits["options"] = merge_options(job.task_options, edits["options"])
    if "timezone" in edits:
        zone = edits.pop("timezone")
        if not isinstance(job.schedule, CrontabSchedule):
            raise FieldError(
                "tz",
                f"{job.name}'s schedule ({display.schedule(job)}) has no zone; tz goes with a crontab, "
                "or reads an at or start_time given with it",
            )
        edits["schedule"] = dataclasses.replace(job.schedule, timezone=zone)
    stored = stored_values(job)
    return {key: value for key, value in edits.items() if key not in stored or stored[key] != value}
