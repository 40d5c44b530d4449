"""When a job runs: intervals, crontabs and solar events, stored with the job as a small JSON spec.

The beat and the workers compute the next slot from the stored spec (never from job code), on the database
clock. Crontabs run on wall-clock time in their zone: a wall time that a spring transition skips runs
shifted by the gap (02:30 -> 03:30); one that an autumn transition repeats runs once, at its first
occurrence, unless the crontab runs every hour (then each real hour runs, as cron does).
"""

from __future__ import annotations

import abc
import datetime as dt
import functools
import json
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

UTC = dt.timezone.utc
_MAX_SEARCH_DAYS = 366 * 5  # a crontab such as "29 Feb on a Monday" can be years away; none is further


def parse_timezone(name: object) -> ZoneInfo:
    """An IANA zone, or ValueError naming the bad value."""
    if isinstance(name, ZoneInfo):
        return name
    if isinstance(name, dt.tzinfo):
        key = getattr(name, "key", None) or getattr(name, "zone", None) or str(name)
        return parse_timezone(key)
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"timezone must be an IANA zone name such as 'Europe/Berlin', got {name!r}")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown timezone {name!r}; use an IANA zone name such as 'Europe/Berlin'") from None


class Schedule(abc.ABC):
    """A sequence of slots (aware UTC datetimes)."""

    @abc.abstractmethod
    def spec(self) -> dict[str, Any]:
        """JSON-serialisable description, stored with the job."""

    @abc.abstractmethod
    def next_after(self, after: dt.datetime, anchor: dt.datetime | None = None) -> dt.datetime:
        """The first slot strictly after `after`; `anchor` is a previous slot the cadence is counted from."""

    def first_slot(self, now: dt.datetime) -> dt.datetime:
        """The first slot of a newly registered job: the next one after now."""
        return self.next_after(now)

    def latest_at_or_before(self, now: dt.datetime, since: dt.datetime) -> dt.datetime | None:
        """The last slot in (since, now], or None: the one catch-up run after slots were missed."""
        latest = None
        slot = self.next_after(since, since)
        for _ in range(1_000_000):
            if slot > now:
                return latest
            latest = slot
            slot = self.next_after(slot, slot)
        return latest

    def to_json(self) -> str:
        return json.dumps(self.spec(), sort_keys=True)


@dataclass(frozen=True)
class IntervalSchedule(Schedule):
    seconds: float

    def __post_init__(self) -> None:
        if not math.isfinite(self.seconds) or self.seconds <= 0:
            raise ValueError(f"an interval schedule needs a positive number of seconds, got {self.seconds!r}")

    def spec(self) -> dict[str, Any]:
        return {"type": "interval", "seconds": self.seconds}

    def next_after(self, after: dt.datetime, anchor: dt.datetime | None = None) -> dt.datetime:
        step = dt.timedelta(seconds=self.seconds)
        if anchor is None:
            return after + step
        if anchor > after:
            return anchor
        # Fixed cadence: anchor + k*step for the smallest k that lands after `after`.
        k = math.floor((after - anchor) / step) + 1
        return anchor + k * step

    def first_slot(self, now: dt.datetime) -> dt.datetime:
        return now

    def latest_at_or_before(self, now: dt.datetime, since: dt.datetime) -> dt.datetime | None:
        step = dt.timedelta(seconds=self.seconds)
        if now - since < step:
            return None
        return since + math.floor((now - since) / step) * step


def _field(value: object) -> str:
    """A crontab field as text: '*', '*/15', '1,2,3', '1-5'."""
    if isinstance(value, str):
        return value.strip() or "*"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, Iterable):
        return ",".join(str(int(v)) for v in sorted(value))
    raise ValueError(f"crontab field must be text, a number or numbers, got {value!r}")


@functools.lru_cache(maxsize=4096)
def _crontab_sets(
    minute: str, hour: str, day_of_week: str, day_of_month: str, month_of_year: str
) -> tuple[frozenset[int], frozenset[int], frozenset[int], frozenset[int], frozenset[int]]:
    """The minutes, hours, weekdays, days and months a crontab matches, parsed by Celery once per expression
    (a schedule is read back from its spec at every claim and sync: parsing it each time dominated a bulk put)."""
    from celery.schedules import crontab

    try:
        cron = crontab(
            minute=minute, hour=hour, day_of_week=day_of_week, day_of_month=day_of_month, month_of_year=month_of_year
        )
    except Exception as exc:
        expression = f"{minute} {hour} {day_of_month} {month_of_year} {day_of_week}"
        raise ValueError(f"invalid crontab {expression!r}: {exc}") from None
    sets = (cron.minute, cron.hour, cron.day_of_week, cron.day_of_month, cron.month_of_year)
    return tuple(frozenset(values) for values in sets)  # type: ignore[return-value]


@dataclass(frozen=True)
class CrontabSchedule(Schedule):
    minute: str = "*"
    hour: str = "*"
    day_of_week: str = "*"
    day_of_month: str = "*"
    month_of_year: str = "*"
    timezone: str = "UTC"

    def __post_init__(self) -> None:
        parse_timezone(self.timezone)
        self._sets()  # validates the fields

    def _sets(self) -> tuple[frozenset[int], frozenset[int], frozenset[int], frozenset[int], frozenset[int]]:
        return _crontab_sets(self.minute, self.hour, self.day_of_week, self.day_of_month, self.month_of_year)

    @property
    def expression(self) -> str:
        return f"{self.minute} {self.hour} {self.day_of_month} {self.month_of_year} {self.day_of_week}"

    def spec(self) -> dict[str, Any]:
        return {
            "type": "crontab",
            "minute": self.minute,
            "hour": self.hour,
            "day_of_week": self.day_of_week,
            "day_of_month": self.day_of_month,
            "month_of_year": self.month_of_year,
            "timezone": self.timezone,
        }

    def _wall_times(self, start: dt.datetime) -> Iterator[dt.datetime]:
        """Matching wall-clock times in order, from `start` on (naive, local; Celery's rule: day of month AND
        day of week must both match)."""
        minutes, hours, weekdays, days, months = self._sets()
        hours_sorted, minutes_sorted = sorted(hours), sorted(minutes)
        first_day = start.date()
        for offset in range(_MAX_SEARCH_DAYS):
            day = first_day + dt.timedelta(days=offset)
            if day.month not in months or day.day not in days or (day.weekday() + 1) % 7 not in weekdays:
                continue
            for hour in hours_sorted:
                if offset == 0 and hour < start.hour:
                    continue
                for minute in minutes_sorted:
                    wall = dt.datetime(day.year, day.month, day.day, hour, minute)
                    if wall >= start:
                        yield wall

    def next_after(self, after: dt.datetime, anchor: dt.datetime | None = None) -> dt.datetime:
        zone = parse_timezone(self.timezone)
        local_after = after.astimezone(zone).replace(tzinfo=None)
        every_hour = len(self._sets()[1]) == 24
        best: dt.datetime | None = None
        best_wall: dt.datetime | None = None
        for wall in self._wall_times(local_after - dt.timedelta(hours=3)):
            if best_wall is not None and wall > best_wall + dt.timedelta(hours=3):
                return best  # type: ignore[return-value]
            # fold=0: a wall time the spring jump skips maps past the gap, a repeated autumn one to its first
            # occurrence. A crontab that runs every hour also runs in the repeated hour (each real hour once,
            # as cron does for wildcard hours); one at fixed hours runs once.
            folds = (0, 1) if every_hour else (0,)
            for fold in folds:
                slot = wall.replace(tzinfo=zone, fold=fold).astimezone(UTC)
                if slot > after and (best is None or slot < best):
                    best, best_wall = slot, wall
        if best is not None:
            return best
        raise ValueError(f"crontab {self.expression!r} has no slot within {_MAX_SEARCH_DAYS} days")


@dataclass(frozen=True)
class SolarSchedule(Schedule):
    event: str
    latitude: float
    longitude: float

    def __post_init__(self) -> None:
        from celery.schedules import solar

        if self.event not in solar._all_events:
            raise ValueError(f"unknown solar event {self.event!r}; one of {', '.join(sorted(solar._all_events))}")
        if not -90 <= self.latitude <= 90 or not -180 <= self.longitude <= 180:
            raise ValueError(f"solar schedule needs -90 <= lat <= 90 and -180 <= lon <= 180, got {self!r}")

    def spec(self) -> dict[str, Any]:
        return {"type": "solar", "event": self.event, "lat": self.latitude, "lon": self.longitude}

    def next_after(self, after: dt.datetime, anchor: dt.datetime | None = None) -> dt.datetime:
        try:
            import ephem
        except ImportError:
            raise RuntimeError(
                "solar schedules need the 'ephem' package: pip install 'celery-dbsched[solar]'"
            ) from None
        from celery.schedules import solar

        observer = ephem.Observer()
        observer.lat = str(self.latitude)
        observer.lon = str(self.longitude)
        observer.elevation = 0
        # As Celery's solar: the horizons already include refraction, so ephem must not add its own.
        observer.pressure = 0
        observer.horizon = solar._horizons[self.event]
        method = getattr(observer, solar._methods[self.event])
        use_center = solar._use_center_l[self.event]
        # Step just past `after` so an event exactly at `after` is not returned again.
        observer.date = ephem.Date((after + dt.timedelta(seconds=1)).astimezone(UTC).replace(tzinfo=None))
        try:
            # As Celery: only rising/setting take use_center, and only when it is set (transits do not).
            kwargs = {"use_center": True} if use_center else {}
            found = method(ephem.Sun(), start=observer.date, **kwargs)
        except (ephem.AlwaysUpError, ephem.NeverUpError):
            # Polar day or night: look again a day later, like Celery's solar schedule.
            return self.next_after(after + dt.timedelta(days=1), anchor)
        return found.datetime().replace(tzinfo=UTC)  # type: ignore[no-any-return]


# The slot of a clocked schedule after its one time: never (the job is disabled once its run is claimed).
NEVER = dt.datetime(9999, 12, 30, tzinfo=UTC)


@dataclass(frozen=True)
class ClockedSchedule(Schedule):
    """One slot at an aware time `at` (django-celery-beat's ClockedSchedule): its first slot is `at` even when
    that is past (it fires at once), and there is none after it. A job on it is one-off: disabled once its run
    is claimed."""

    at: dt.datetime

    def __post_init__(self) -> None:
        if not isinstance(self.at, dt.datetime) or self.at.tzinfo is None or self.at.utcoffset() is None:
            raise ValueError(f"a clocked schedule needs an aware datetime (with a UTC offset), got {self.at!r}")
        object.__setattr__(self, "at", self.at.astimezone(UTC))

    def spec(self) -> dict[str, Any]:
        return {"type": "clocked", "at": self.at.isoformat()}

    def next_after(self, after: dt.datetime, anchor: dt.datetime | None = None) -> dt.datetime:
        return self.at if self.at > after else NEVER

    def first_slot(self, now: dt.datetime) -> dt.datetime:
        return self.at

    def latest_at_or_before(self, now: dt.datetime, since: dt.datetime) -> dt.datetime | None:
        return self.at if since < self.at <= now else None


def crontab_from_text(text: str, timezone: str = "UTC") -> CrontabSchedule:
    """A crontab from its five fields as cron writes them, "minute hour day-of-month month day-of-week"."""
    fields = text.split()
    if len(fields) != 5:
        raise ValueError(
            f"a schedule given as text is a crontab string of 5 fields, 'minute hour day-of-month month "
            f"day-of-week' (e.g. '*/5 * * * *'), got {text!r}"
        )
    minute, hour, day_of_month, month_of_year, day_of_week = fields
    return CrontabSchedule(minute, hour, day_of_week, day_of_month, month_of_year, parse_timezone(timezone).key)


def schedule_from(value: object, *, timezone: str | None = None) -> Schedule:
    """A Schedule from what users write: seconds, a timedelta, Celery's schedule, crontab or solar, a crontab
    string ("*/5 * * * *", in `timezone`), or an aware datetime (clocked: once at that time)."""
    from celery.schedules import crontab, schedule, solar

    if isinstance(value, Schedule):
        return value
    if isinstance(value, bool):
        raise ValueError(f"a schedule cannot be {value!r}")
    if isinstance(value, str):
        return crontab_from_text(value, timezone or "UTC")
    if isinstance(value, dt.datetime):
        return ClockedSchedule(value)
    if isinstance(value, (int, float)):
        return IntervalSchedule(float(value))
    if isinstance(value, dt.timedelta):
        return IntervalSchedule(value.total_seconds())
    if isinstance(value, crontab):
        zone = timezone or _zone_name(getattr(value, "tz", None)) or "UTC"
        return CrontabSchedule(
            minute=_field(value._orig_minute),
            hour=_field(value._orig_hour),
            day_of_week=_field(value._orig_day_of_week),
            day_of_month=_field(value._orig_day_of_month),
            month_of_year=_field(value._orig_month_of_year),
            timezone=parse_timezone(zone).key,
        )
    if isinstance(value, solar):
        return SolarSchedule(value.event, float(value.lat), float(value.lon))
    if isinstance(value, schedule):
        return IntervalSchedule(value.run_every.total_seconds())
    raise ValueError(
        f"unsupported schedule {value!r}: use seconds, a timedelta, a crontab string such as '*/5 * * * *', an "
        "aware datetime (once), or celery.schedules crontab/solar/schedule"
    )


def _zone_name(tz: object) -> str | None:
    if tz is None:
        return None
    return getattr(tz, "key", None) or getattr(tz, "zone", None)


def schedule_from_spec(spec: Mapping[str, Any] | str) -> Schedule:
    data = json.loads(spec) if isinstance(spec, str) else dict(spec)
    kind = data.get("type")
    if kind == "interval":
        return IntervalSchedule(float(data["seconds"]))
    if kind == "crontab":
        return CrontabSchedule(
            minute=data["minute"],
            hour=data["hour"],
            day_of_week=data["day_of_week"],
            day_of_month=data["day_of_month"],
            month_of_year=data["month_of_year"],
            timezone=data.get("timezone", "UTC"),
        )
    if kind == "solar":
        return SolarSchedule(data["event"], float(data["lat"]), float(data["lon"]))
    if kind == "clocked":
        return ClockedSchedule(dt.datetime.fromisoformat(data["at"]))
    raise ValueError(f"unknown schedule spec {spec!r}")
