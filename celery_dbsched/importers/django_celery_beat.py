"""`celery -A proj dbsched import django-celery-beat --url DATABASE_URL`: django-celery-beat's periodic tasks as
runtime schedules.

Read with SQLAlchemy Core from the tables django-celery-beat's migrations create (Django is not needed):
django_celery_beat_periodictask and its four schedule tables. Each PeriodicTask becomes the runtime schedule
django-celery-beat's beat (its `ModelEntry`) would run:

  name, task, description, enabled, one_off  -> the same (a one_off task that already ran, total_run_count > 0,
                                                is imported disabled: django-celery-beat disables it at its next
                                                check without running it again)
  args, kwargs, headers (JSON text)          -> args, kwargs, options["headers"] (plus "periodic_task_name", the
                                                header django-celery-beat adds to every message it sends)
  queue, exchange, routing_key, priority     -> options (empty ones left out, as django-celery-beat does)
  expires (a time)                           -> expire_time (no run after it; the message's expires too)
  expire_seconds                             -> options["expires"] (seconds after sending, as django-celery-beat)
  start_time                                 -> start_time (no run before it)
  last_run_at                                -> last_run_at: the next run is the schedule's first slot after it,
                                                so nothing fires twice or is skipped at the switch. A task that
                                                never ran is counted, as django-celery-beat counts it, from
                                                date_changed, or (with a start_time) from long ago: it runs once
                                                start_time has come.
  interval (every, period)                   -> an interval of every x period (days ... microseconds)
  crontab (5 fields, timezone)               -> a crontab in its timezone (--crontab-timezone overrides it: for
                                                DJANGO_CELERY_BEAT_TZ_AWARE = False, where Celery's timezone is used)
  solar (event, latitude, longitude)         -> a solar schedule
  clocked (clocked_time)                     -> a clocked schedule (once, at that time, even past; last_run_at
                                                is not used, as django-celery-beat does not use it)
  total_run_count, date_changed              -> not kept (the history starts empty); used only as said above

Entries of the app's own beat_schedule, which django-celery-beat's beat copies into its table at each start, are
left out (listed, not an error): celery_dbsched's beat syncs them from the config.
Datetimes stored without a zone (SQLite, MySQL) are read in --naive-timezone: UTC, as Django stores them with
USE_TZ = True (its default); Django's TIME_ZONE when the project runs with USE_TZ = False. Celery's own
`celery.backend_cleanup` entry is left out: celery_dbsched's beat adds it itself (from `result_expires`).
A row without a schedule, or whose JSON does not parse, is skipped with the reason.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Collection, Iterator, Mapping
from typing import Any

import click
from sqlalchemy import Column, MetaData, Table, create_engine, select
from sqlalchemy.engine import URL, Engine, RowMapping, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError

from ..schedules import parse_timezone
from ..settings import mask_database_url
from . import Reading, Skipped, allow_skip_option, dry_run_option, run_import

__all__ = ["TABLE_PREFIX", "command", "entry_from_row", "read_django_celery_beat"]

TABLE_PREFIX = "django_celery_beat_"
BACKEND_CLEANUP = "celery.backend_cleanup"
PERIODS = frozenset({"days", "hours", "minutes", "seconds", "microseconds"})  # IntervalSchedule.PERIOD_CHOICES
# A task with a start_time that never ran: django-celery-beat counts it from 30 years back, so that it runs as soon
# as start_time has come (ModelEntry.__init__).
_NEVER_RAN_WITH_START = dt.timedelta(days=365 * 30)

_CELERY_OWN = "Celery's own entry: celery_dbsched's beat adds it itself when result_expires is set"
_DECLARED = (
    "an entry of this app's beat_schedule (django-celery-beat's beat copied it into its table): celery_dbsched's "
    "beat syncs it from the config"
)

_meta = MetaData()


def _table(name: str, *columns: str) -> Table:
    return Table(TABLE_PREFIX + name, _meta, Column("id"), *(Column(c) for c in columns))


_task = _table(
    "periodictask",
    "name", "task", "interval_id", "crontab_id", "solar_id", "clocked_id", "args", "kwargs", "queue", "exchange",
    "routing_key", "headers", "priority", "expires", "expire_seconds", "one_off", "start_time", "enabled",
    "last_run_at", "total_run_count", "date_changed", "description",
)  # fmt: skip
_interval = _table("intervalschedule", "every", "period")
_crontab = _table("crontabschedule", "minute", "hour", "day_of_week", "day_of_month", "month_of_year", "timezone")
_solar = _table("solarschedule", "event", "latitude", "longitude")
_clocked = _table("clockedschedule", "clocked_time")

_query = (
    select(
        _task,
        _interval.c.every,
        _interval.c.period,
        _crontab.c.minute,
        _crontab.c.hour,
        _crontab.c.day_of_week,
        _crontab.c.day_of_month,
        _crontab.c.month_of_year,
        _crontab.c.timezone.label("crontab_timezone"),
        _solar.c.event,
        _solar.c.latitude,
        _solar.c.longitude,
        _clocked.c.clocked_time,
    )
    .select_from(
        _task.outerjoin(_interval, _task.c.interval_id == _interval.c.id)
        .outerjoin(_crontab, _task.c.crontab_id == _crontab.c.id)
        .outerjoin(_solar, _task.c.solar_id == _solar.c.id)
        .outerjoin(_clocked, _task.c.clocked_id == _clocked.c.id)
    )
    .order_by(_task.c.id)
)


def source_engine(url: str) -> Engine:
    """An engine on the Django project's database, read only where the database can say so (SQLite). A Django
    style postgresql:// or postgres:// URL uses psycopg 3; a SQLite file that does not exist is an error."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ValueError(
            f"--url: not a database URL: {url!r}; e.g. postgresql://user:password@host/db or sqlite:///path/db.sqlite3"
        ) from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() == "sqlite":
        parsed = _read_only_sqlite(parsed)
    try:
        return create_engine(parsed)
    except (NoSuchModuleError, ImportError) as exc:
        raise ValueError(
            f"--url {mask_database_url(parsed)}: no database driver for {parsed.drivername!r} ({exc}); install it, "
            "or use postgresql://... or sqlite:///..."
        ) from None


def _read_only_sqlite(parsed: URL) -> URL:
    path = parsed.database or ""
    if not path or path == ":memory:" or path.startswith("file:"):
        if not path.startswith("file:"):
            raise ValueError("--url: give the SQLite file of the Django project, e.g. sqlite:////srv/app/db.sqlite3")
        return parsed
    if not os.path.isfile(path):
        raise ValueError(
            f"--url: no SQLite database at {os.path.abspath(path)}; give the Django project's database file "
            "(sqlite:///relative/path or sqlite:////absolute/path)"
        )
    return parsed.set(database=f"file:{os.path.abspath(path)}?mode=ro", query={"uri": "true"})


def _rows(engine: Engine) -> Iterator[RowMapping]:
    try:
        with engine.connect() as conn:
            yield from conn.execution_options(yield_per=2_000).execute(_query).mappings()
    except DBAPIError as exc:
        first = str(exc.orig or exc).strip().splitlines()[0] if str(exc.orig or exc).strip() else type(exc).__name__
        raise ValueError(
            f"cannot read django-celery-beat's tables at {mask_database_url(engine.url)}: {first}. Check the URL "
            f"(the Django project's DATABASES), and that django-celery-beat's migrations were applied there "
            f"({TABLE_PREFIX}periodictask and its schedule tables)"
        ) from None


def read_django_celery_beat(
    url: str,
    *,
    naive_timezone: str = "UTC",
    crontab_timezone: str | None = None,
    declared: Collection[str] = (),
    now: dt.datetime | None = None,
) -> Reading:
    """Every PeriodicTask at `url` as an entry for `put_schedules`, or skipped with the reason (module docstring).
    `declared`: the names the app's beat_schedule declares, left out (django-celery-beat's beat copies its
    app's beat_schedule into its table at each start; celery_dbsched's beat syncs them from the config). `now`
    stands for a task that never ran and has no date_changed (tests)."""
    naive = parse_timezone(naive_timezone)
    if crontab_timezone is not None:
        crontab_timezone = parse_timezone(crontab_timezone).key
    engine = source_engine(url)
    reading = Reading()
    try:
        for row in _rows(engine):
            name = str(row["name"])
            if name == BACKEND_CLEANUP and row["task"] == BACKEND_CLEANUP:
                reading.left_out.append(Skipped(name, _CELERY_OWN))
                continue
            if name in declared:
                reading.left_out.append(Skipped(name, _DECLARED))
                continue
            try:
                reading.entries.append(entry_from_row(row, naive, crontab_timezone, now))
            except ValueError as exc:
                reading.skipped.append(Skipped(name, str(exc)))
    finally:
        engine.dispose()
    return reading


def entry_from_row(
    row: Mapping[Any, Any], naive: dt.tzinfo, crontab_timezone: str | None = None, now: dt.datetime | None = None
) -> dict[str, Any]:
    """One PeriodicTask row (joined with its schedule) as a `put_schedules` entry; ValueError says why it cannot
    be imported."""
    from kombu.utils.json import loads

    name = str(row["name"])
    options: dict[str, Any] = {}
    for key in ("queue", "exchange", "routing_key"):
        if row[key]:
            options[key] = str(row[key])
    if row["priority"] is not None:
        options["priority"] = int(row["priority"])
    if row["expire_seconds"] is not None:
        options["expires"] = int(row["expire_seconds"])
    args = _json(loads, row, "args", "[]")
    kwargs = _json(loads, row, "kwargs", "{}")
    headers = _json(loads, row, "headers", "{}")
    if not isinstance(headers, dict):
        raise ValueError(f"headers is not a JSON object: {row['headers']!r}")
    options["headers"] = {**headers, "periodic_task_name": name}
    enabled = bool(row["enabled"])
    one_off = bool(row["one_off"])
    if one_off and (row["total_run_count"] or 0) > 0:
        enabled = False  # it ran: django-celery-beat disables it at its next check
    start_time = _aware(row["start_time"], naive)
    schedule = _schedule(row, naive, crontab_timezone)
    last_run_at = _aware(row["last_run_at"], naive)
    if schedule["type"] == "clocked":
        last_run_at = None  # django-celery-beat fires it at its time, whatever last_run_at says (once: one_off)
    elif last_run_at is None:
        counted_from = _aware(row["date_changed"], naive) or now or dt.datetime.now(dt.timezone.utc)
        last_run_at = counted_from - _NEVER_RAN_WITH_START if start_time is not None else counted_from
    return {
        "name": name,
        "task": row["task"],
        "schedule": schedule,
        "args": args,
        "kwargs": kwargs,
        "options": options,
        "description": row["description"] or None,
        "enabled": enabled,
        "one_off": one_off,
        "start_time": start_time,
        "expire_time": _aware(row["expires"], naive),
        "last_run_at": last_run_at,
    }


def _json(loads: Any, row: Mapping[Any, Any], key: str, empty: str) -> Any:
    text = row[key] or empty
    try:
        return loads(text)
    except ValueError as exc:
        raise ValueError(f"{key} is not JSON ({exc}): {text!r}") from None


def _schedule(row: Mapping[Any, Any], naive: dt.tzinfo, crontab_timezone: str | None) -> dict[str, Any]:
    """The schedule django-celery-beat runs (`PeriodicTask.scheduler`: interval, else crontab, solar, clocked)."""
    if row["interval_id"] is not None:
        period = row["period"]
        if period not in PERIODS:
            raise ValueError(f"interval period {period!r} is not one of django-celery-beat's ({', '.join(PERIODS)})")
        seconds = dt.timedelta(**{period: row["every"]}).total_seconds()
        if seconds <= 0:
            raise ValueError(f"interval of {row['every']} {period} never repeats: it must be positive")
        return {"type": "interval", "seconds": seconds}
    if row["crontab_id"] is not None:
        return {
            "type": "crontab",
            "minute": row["minute"],
            "hour": row["hour"],
            "day_of_week": row["day_of_week"],
            "day_of_month": row["day_of_month"],
            "month_of_year": row["month_of_year"],
            "timezone": crontab_timezone or str(row["crontab_timezone"] or "UTC"),
        }
    if row["solar_id"] is not None:
        return {"type": "solar", "event": row["event"], "lat": float(row["latitude"]), "lon": float(row["longitude"])}
    if row["clocked_id"] is not None:
        at = _aware(row["clocked_time"], naive)
        assert at is not None  # NOT NULL
        return {"type": "clocked", "at": at.isoformat()}
    raise ValueError("no schedule: none of interval, crontab, solar or clocked is set")


def _aware(value: Any, naive: dt.tzinfo) -> dt.datetime | None:
    """A stored datetime as an aware one: PostgreSQL's carry their zone; SQLite's (text) and MySQL's do not."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    if not isinstance(value, dt.datetime):
        raise ValueError(f"not a datetime: {value!r}")
    return value.replace(tzinfo=naive) if value.tzinfo is None else value


def _zone_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return parse_timezone(value).key
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


@click.command(name="django-celery-beat")
@click.option(
    "--url",
    required=True,
    help="the Django project's database (its DATABASES): postgresql://user:password@host/db or sqlite:///path",
)
@click.option(
    "--naive-timezone",
    default="UTC",
    show_default=True,
    callback=_zone_option,
    help="zone of datetimes stored without one (SQLite, MySQL): UTC with Django's USE_TZ = True, else its TIME_ZONE",
)
@click.option(
    "--crontab-timezone",
    default=None,
    callback=_zone_option,
    help="run every crontab in this zone, not its own timezone (DJANGO_CELERY_BEAT_TZ_AWARE = False: Celery's)",
)
@dry_run_option
@allow_skip_option
@click.pass_context
def command(
    ctx: click.Context, url: str, naive_timezone: str, crontab_timezone: str | None, dry_run: bool, allow_skip: bool
) -> None:
    """Import django-celery-beat's periodic tasks (from the Django project's database) as runtime schedules."""
    from ..beat_schedule import entry_names

    def read() -> Reading:
        return read_django_celery_beat(
            url,
            naive_timezone=naive_timezone,
            crontab_timezone=crontab_timezone,
            declared=entry_names(ctx.obj.app),  # after run_import loaded the app's modules
        )

    run_import(ctx, f"django-celery-beat at {_masked(url)}", read, dry_run=dry_run, allow_skip=allow_skip)


def _masked(url: str) -> str:
    try:
        return mask_database_url(url)
    except Exception:
        return "the given --url"
