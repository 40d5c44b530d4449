"""`celery -A proj dbsched import redbeat`: RedBeat's schedule (celery-redbeat) read from Redis, as runtime schedules.

RedBeat keeps, under its key prefix (`redbeat_key_prefix`, "redbeat:" by default), a sorted set
`<prefix>:schedule` of entry keys (`<prefix><name>`), and for each entry a hash with two JSON fields:
`definition` {name, task, args, kwargs, options, schedule, enabled} and `meta` {last_run_at, total_run_count},
written by its own JSON encoder (datetimes, and the schedules `interval`, `crontab`, `rrule` as
{"__type__": ...} objects). This reads them with the plain Redis client (RedBeat need not be installed) and
turns each into the keywords of `put_schedules`:

    interval {every, relative}  -> seconds (relative=True: only when `every` is whole days, hours or minutes,
                                   the run times Celery rounds to; else skipped)
    crontab {minute, hour, ...} -> the same crontab, in the app's timezone (RedBeat does not store one: its
                                   crontabs follow the app's `timezone`, as the import does)
    rrule                       -> skipped: no equivalent (recreate it as a crontab or interval)
    options.expires (datetime)  -> expire_time (no run after it); a number stays options.expires (seconds)
    meta.last_run_at            -> last_run_at: the first run is the first slot after it, the one RedBeat's
                                   is_due() would fire next (nothing fires twice or is skipped at the switch)
    meta.total_run_count        -> not imported (the run history starts with the first run here)

An entry of RedBeat's statics (`<prefix>:statics`: the RedBeat beat's `beat_schedule`), or Celery's own
`celery.backend_cleanup` (which RedBeat's beat stores at each start), that this app's `beat_schedule` declares
too is left to it (celery_dbsched's beat syncs it from there): listed as left out, not counted as skipped. Any
other entry named like a beat_schedule entry is refused by `put_schedules` (a real conflict).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any

import click

from ..errors import DbschedError
from ..schedules import parse_timezone, schedule_from
from . import Reading, Skipped, allow_skip_option, dry_run_option, run_import

DEFAULT_KEY_PREFIX = "redbeat:"
CHUNK = 500  # hashes read per Redis round trip
_DATETIME_FIELDS = ("year", "month", "day", "hour", "minute", "second", "microsecond")
_RESOLUTIONS = ((86_400, "day"), (3_600, "hour"), (60, "minute"))
# Entries every beat installs by itself (stock beat's install_default_entries; RedBeat stores it as a dynamic entry).
CELERY_OWN_ENTRIES = frozenset({"celery.backend_cleanup"})
_LEFT_TO_BEAT_SCHEDULE = (
    "RedBeat's copy of an entry of this app's beat_schedule (or of Celery's own): celery_dbsched's beat syncs it "
    "from there"
)

__all__ = ["DEFAULT_KEY_PREFIX", "command", "read_redbeat", "redis_client"]


@click.command(name="redbeat")
@click.option("--redis-url", required=True, help="RedBeat's Redis (its redbeat_redis_url), e.g. redis://HOST:6379/0")
@click.option(
    "--key-prefix",
    default=DEFAULT_KEY_PREFIX,
    show_default=True,
    help="RedBeat's redbeat_key_prefix: its keys are PREFIX<name> and PREFIX:schedule",
)
@dry_run_option
@allow_skip_option
@click.pass_context
def command(ctx: click.Context, redis_url: str, key_prefix: str, dry_run: bool, allow_skip: bool) -> None:
    """Import RedBeat's entries (its Redis keys) as runtime schedules; crontabs in the app's timezone, and each
    next run the first slot after RedBeat's last_run_at. Running it again changes only what changed in Redis."""
    from ..beat_schedule import entry_names
    from ..registry import app_timezone

    app = ctx.obj.app
    try:
        zone = app_timezone(app)
    except ValueError as exc:
        raise click.ClickException(f"the app's timezone setting: {exc}") from None

    def read() -> Reading:
        client = redis_client(redis_url)
        return read_redbeat(client, key_prefix=key_prefix, timezone=zone, declared=entry_names(app))

    source = f"RedBeat at {_masked(redis_url)} (prefix {key_prefix!r}; crontabs in {zone})"
    run_import(ctx, source, read, dry_run=dry_run, allow_skip=allow_skip)


class _Skip(Exception):
    """An entry that cannot be carried over; the message is the reason."""


def redis_client(url: str) -> Any:
    """A plain Redis client on `url` that answers (one clear DbschedError otherwise)."""
    try:
        import redis
    except ImportError:
        raise DbschedError(
            "importing from RedBeat needs the 'redis' package: pip install 'celery-dbsched[redis]'"
        ) from None
    try:
        client = redis.Redis.from_url(url, decode_responses=True)
        client.ping()
    except ValueError as exc:
        raise DbschedError(f"--redis-url {_masked(url)} is not a Redis URL ({exc}); use redis://HOST:PORT/DB") from None
    except redis.RedisError as exc:
        raise DbschedError(f"cannot read Redis at {_masked(url)}: {exc}; check --redis-url") from None
    return client


def read_redbeat(
    client: Any,
    *,
    key_prefix: str = DEFAULT_KEY_PREFIX,
    timezone: str = "UTC",
    declared: Collection[str] = (),
) -> Reading:
    """Every entry of RedBeat's sorted set under `key_prefix`, read in chunks. `timezone`: the zone RedBeat's
    crontabs followed (its app's `timezone`); `declared`: the names this app's beat_schedule declares (with
    Celery's own `celery.backend_cleanup`): RedBeat's statics and Celery's own among them are left to it.
    DbschedError when the prefix holds no RedBeat schedule (a wrong --key-prefix)."""
    zone = parse_timezone(timezone).key
    schedule_key = key_prefix + ":schedule"
    if not client.exists(schedule_key):
        hint = ""
        if not key_prefix.endswith(":") and client.exists(key_prefix + "::schedule"):
            hint = f" (there is one under --key-prefix {key_prefix + ':'!r})"
        raise DbschedError(
            f"no RedBeat schedule at key {schedule_key!r}{hint}: check --key-prefix (RedBeat's redbeat_key_prefix, "
            f"{DEFAULT_KEY_PREFIX!r} by default) and --redis-url"
        )
    statics = set(client.smembers(key_prefix + ":statics"))
    reading = Reading()
    for key, definition, meta in _hashes(client, client.zrange(schedule_key, 0, -1)):
        fallback = key[len(key_prefix) :] if key.startswith(key_prefix) else key
        try:
            entry = _entry(key, fallback, definition, meta, zone)
        except _Skip as exc:
            reading.skipped.append(Skipped(fallback, str(exc)))
            continue
        name = entry["name"]
        if name in declared and (name in statics or name in CELERY_OWN_ENTRIES):
            reading.left_out.append(Skipped(name, _LEFT_TO_BEAT_SCHEDULE))
            continue
        reading.entries.append(entry)
    return reading


def _hashes(client: Any, keys: Sequence[str]) -> Iterator[tuple[str, str | None, str | None]]:
    for start in range(0, len(keys), CHUNK):
        chunk = keys[start : start + CHUNK]
        with client.pipeline(transaction=False) as pipe:
            for key in chunk:
                pipe.hmget(key, "definition", "meta")
            values = pipe.execute()
        for key, (definition, meta) in zip(chunk, values, strict=True):
            yield key, definition, meta


def _entry(key: str, fallback: str, definition_text: str | None, meta_text: str | None, zone: str) -> dict[str, Any]:
    """The put_schedules entry of one hash; its name is the definition's (as RedBeat's, made text), else the key's."""
    if not definition_text:
        raise _Skip(f"key {key!r} has no 'definition' (RedBeat itself drops such a key from its schedule)")
    definition = _decoded(key, "definition", definition_text)
    meta = _decoded(key, "meta", meta_text) if meta_text else {}
    if not isinstance(definition, dict) or not isinstance(meta, dict):
        raise _Skip(f"key {key!r}: 'definition' and 'meta' must be JSON objects")
    last_run_at = meta.get("last_run_at")
    if last_run_at is not None and not isinstance(last_run_at, dt.datetime):
        raise _Skip(f"meta.last_run_at is not a RedBeat datetime: {last_run_at!r}")
    schedule, last_run_at = _schedule(definition.get("schedule"), last_run_at, zone)
    options = definition.get("options") or {}
    if not isinstance(options, dict):
        raise _Skip(f"options {options!r} are not a JSON object")
    options = dict(options)
    expire_time = None
    if isinstance(options.get("expires"), dt.datetime):
        expire_time = options.pop("expires")
    for option, value in options.items():
        if isinstance(value, dt.datetime):
            raise _Skip(f"option {option!r} is a fixed time ({value.isoformat()}); a periodic schedule cannot carry it")
    enabled = definition.get("enabled", True)
    return {
        "name": str(definition.get("name") or fallback),
        "task": definition.get("task"),
        "schedule": schedule,
        "args": definition.get("args") or (),
        "kwargs": definition.get("kwargs") or None,
        "options": options or None,
        "enabled": enabled,
        "expire_time": expire_time,
        "last_run_at": last_run_at,
    }


def _decoded(key: str, name: str, text: str) -> Any:
    try:
        return json.loads(text, object_hook=_datetime)
    except (ValueError, TypeError, KeyError) as exc:
        raise _Skip(f"key {key!r}: {name} is not RedBeat's JSON ({exc})") from None


def _datetime(value: dict[str, Any]) -> Any:
    """RedBeat's {"__type__": "datetime", ...} as an aware datetime (its `timezone`: a zone name, or an offset in
    seconds; none, from RedBeat before 2.0, is UTC); any other object as it is."""
    if value.get("__type__") != "datetime":
        return value
    zone = value.get("timezone", "UTC")
    tz: dt.tzinfo = dt.timezone(dt.timedelta(seconds=zone)) if isinstance(zone, (int, float)) else parse_timezone(zone)
    year, month, day, hour, minute, second, microsecond = (int(value.get(name, 0)) for name in _DATETIME_FIELDS)
    return dt.datetime(year, month, day, hour, minute, second, microsecond, tzinfo=tz)


def _schedule(value: Any, last_run_at: dt.datetime | None, zone: str) -> tuple[Any, dt.datetime | None]:
    """Our schedule for RedBeat's, and the last_run_at whose next slot is RedBeat's next run."""
    kind = value.get("__type__") if isinstance(value, dict) else None
    if kind == "interval":
        return _interval(value, last_run_at)
    if kind == "crontab":
        from celery.schedules import crontab

        fields = {name: value.get(name, "*") for name in ("minute", "hour", "day_of_week", "day_of_month")}
        try:
            return schedule_from(crontab(month_of_year=value.get("month_of_year", "*"), **fields), timezone=zone), (
                last_run_at
            )
        except (ValueError, TypeError) as exc:
            raise _Skip(f"crontab {value!r} is not valid: {exc}") from None
    if kind == "rrule":
        raise _Skip(
            "an rrule schedule (a dateutil recurrence rule) has no celery_dbsched equivalent; recreate it as a "
            "crontab or an interval with `celery -A proj dbsched add`"
        )
    raise _Skip(f"schedule {value!r} is none RedBeat writes (interval, crontab, rrule)")


def _interval(value: Mapping[str, Any], last_run_at: dt.datetime | None) -> tuple[float, dt.datetime | None]:
    every = value.get("every")
    if isinstance(every, bool) or not isinstance(every, (int, float)) or every <= 0:
        raise _Skip(f"interval {dict(value)!r} needs a positive number of seconds")
    if not value.get("relative"):
        return float(every), last_run_at  # RedBeat's next run: last_run_at + every, as ours
    # relative=True: Celery rounds each run time down to the interval's resolution (the day, hour or minute).
    # Whole days/hours/minutes keep a fixed cadence from the rounded time; anything else has none.
    unit, unit_name = next(((s, n) for s, n in _RESOLUTIONS if every >= s), (1, "second"))
    if every % unit:
        raise _Skip(
            f"a relative interval of {every:g} s runs at times Celery rounds down to the {unit_name}: no fixed "
            f"cadence; recreate it as a crontab, or as an interval of whole {unit_name}s"
        )
    if last_run_at is None:
        return float(every), None
    due = last_run_at + dt.timedelta(seconds=every)
    due = due.replace(microsecond=0)
    if unit >= 60:
        due = due.replace(second=0)
    if unit >= 3_600:
        due = due.replace(minute=0)
    if unit >= 86_400:
        due = due.replace(hour=0)
    return float(every), due - dt.timedelta(seconds=every)


def _masked(url: str) -> str:
    from ..settings import mask_database_url

    return mask_database_url(url)
