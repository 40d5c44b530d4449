"""How the `dbsched` command shows things to people: times in a zone, durations as people read them
(`13 h 54 min`), schedules, tables; and what it reads from them (`--since 2h`). Pure functions, no I/O."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from typing import Any
from zoneinfo import ZoneInfo

from .records import JobRecord, RunRecord

UTC = ZoneInfo("UTC")
_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_SINCE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|min|h|d|w)\s*$")


def when(value: dt.datetime | None, zone: dt.tzinfo = UTC) -> str:
    """A time in `zone`, to the second ("-" for none)."""
    return "-" if value is None else value.astimezone(zone).strftime("%Y-%m-%d %H:%M:%S")


def zone_name(zone: dt.tzinfo) -> str:
    return getattr(zone, "key", None) or str(zone)


def duration(value: dt.timedelta | float) -> str:
    """A length of time as people read it: `0.4 s`, `42 s`, `5 min 3 s`, `13 h 54 min`, `2 d 3 h` (the
    smaller unit truncated and left out when zero)."""
    seconds = value.total_seconds() if isinstance(value, dt.timedelta) else float(value)
    if seconds < 0:
        return f"-{duration(-seconds)}"
    if seconds < 10:
        return f"{seconds:.1f} s".replace(".0 s", " s")
    whole = int(seconds)
    for size, unit, smaller, small_unit in ((86400, "d", 3600, "h"), (3600, "h", 60, "min"), (60, "min", 1, "s")):
        if whole >= size:
            rest = (whole % size) // smaller
            return f"{whole // size} {unit}" + (f" {rest} {small_unit}" if rest else "")
    return f"{whole} s"


def relative(target: dt.datetime, now: dt.datetime) -> str:
    """`due` (now or past), else `in 13 h 54 min`."""
    ahead = (target - now).total_seconds()
    return "due" if ahead <= 0 else f"in {duration(ahead)}"


def ago(past: dt.datetime, now: dt.datetime) -> str:
    return f"{duration(max(0.0, (now - past).total_seconds()))} ago"


def run_duration(run: RunRecord, now: dt.datetime) -> str:
    """How long a run ran (until now while it runs); "-" before it started."""
    if run.start_time is None:
        return "-"
    return duration((run.end_time or now) - run.start_time)


def error_line(error: str | None, width: int = 80) -> str:
    """The last line of a run's error (a traceback ends with the exception), cut to `width`; "" for none."""
    lines = (error or "").strip().splitlines()
    return lines[-1][:width] if lines else ""


def schedule(job: JobRecord) -> str:
    """A job's cadence: `every 5 min`, `cron 0 2 * * * Europe/Berlin`, `sunrise at 52.5,13.4`, `-` (none)."""
    if job.schedule is None:
        return "-" if job.every is None else f"every {duration(job.every)}"
    spec = job.schedule.spec()
    if spec["type"] == "interval":
        return f"every {duration(spec['seconds'])}"
    if spec["type"] == "crontab":
        fields = " ".join(spec[k] for k in ("minute", "hour", "day_of_month", "month_of_year", "day_of_week"))
        return f"cron {fields} {spec['timezone']}"
    if spec["type"] == "clocked":
        return f"once at {when(job.schedule.first_slot(job.next_scheduled_run))}"
    return f"{spec['event']} at {spec['lat']:g},{spec['lon']:g}"


_DAYS = ("Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")  # fmt: skip
_STEP = re.compile(r"^\*/(\d+)$")


def _numbers(field: str) -> list[int] | None:
    """`5` or `1,15,30` as numbers (None for anything else: ranges, steps, names, `*`)."""
    parts = field.split(",")
    return [int(part) for part in parts] if all(part.isdigit() for part in parts) else None


def _days(day_of_week: str) -> str | None:
    if day_of_week == "*":
        return ""
    if day_of_week == "1-5":
        return "Monday to Friday"
    days = _numbers(day_of_week)
    if days is None or any(day > 7 for day in days):
        return None
    return "on " + ", ".join(_DAYS[day % 7] for day in days)


def _crontab_words(spec: dict[str, Any]) -> str | None:
    """The common crontab shapes in words (`at 02:30 Monday to Friday`), None for the others."""
    minute, hour = spec["minute"], spec["hour"]
    minutes, hours = _numbers(minute), _numbers(hour)
    minute_step, hour_step = _STEP.match(minute), _STEP.match(hour)
    if minute == "*" and hour == "*":
        time = "every minute"
    elif minute_step and hour == "*":
        time = f"every {minute_step.group(1)} min"
    elif minutes and hour == "*":
        time = "every hour at " + ", ".join(f":{m:02d}" for m in minutes)
    elif minutes and len(minutes) == 1 and hour_step:
        time = f"every {hour_step.group(1)} h at :{minutes[0]:02d}"
    elif minutes and hours and len(minutes) * len(hours) <= 4:
        time = "at " + ", ".join(f"{h:02d}:{m:02d}" for h in hours for m in minutes)
    else:
        return None
    days = _days(spec["day_of_week"])
    month_days, months = _numbers(spec["day_of_month"]), _numbers(spec["month_of_year"])
    if days is None or (spec["day_of_month"] != "*" and month_days is None):
        return None
    if spec["month_of_year"] != "*" and (months is None or any(not 1 <= m <= 12 for m in months)):
        return None
    when = [time]
    if time.startswith("at ") and not (month_days or days or months):
        when.append("every day")
    if month_days:
        when.append("on day " + ", ".join(map(str, month_days)) + " of the month")
    if days:
        when.append(days)
    if months:
        when.append("in " + ", ".join(_MONTHS[m - 1] for m in months))
    return " ".join(when)


def schedule_words(job: JobRecord) -> str:
    """A job's cadence as people say it: `every 5 min`, `at 02:00 Monday to Friday (Europe/Berlin)`; a crontab
    of another shape as `schedule` writes it."""
    if job.schedule is not None and job.schedule.spec()["type"] == "crontab":
        spec = job.schedule.spec()
        words = _crontab_words(spec)
        if words is not None:
            return f"{words} ({spec['timezone']})"
    return schedule(job)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns under the headers as given, two spaces apart, no trailing blanks."""
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def parse_duration(text: str) -> dt.timedelta | None:
    """A duration as people write it: `90s`, `30m`, `1h`, `2d`, `1w` (None: not one)."""
    match = _SINCE.match(text)
    return None if match is None else dt.timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


def parse_since(text: str, now: dt.datetime, zone: dt.tzinfo = UTC) -> dt.datetime:
    """`--since`: a duration back from `now` (`90s`, `30m`, `1h`, `2d`, `1w`) or an ISO time (`2026-12-05`,
    `2026-12-05T08:00`, with an offset or read in `zone`). ValueError with the accepted forms otherwise."""
    ago = parse_duration(text)
    if ago is not None:
        return now - ago
    try:
        parsed = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"--since: expected a duration such as 30m, 1h, 2d or an ISO time such as 2026-12-05T08:00, got {text!r}"
        ) from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=zone)
