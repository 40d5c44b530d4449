"""Schedules created at run time (issue 13): plain Celery tasks stored in the database by the API, the CLI,
the dashboard or an importer, owned by the database (origin "runtime") rather than by code or `beat_schedule`.

    add_schedule(app, "report", task="proj.tasks.report", schedule="0 7 * * 1-5", kwargs={"to": "ops"})
    update_schedule(app, "report", kwargs={"to": "team"})     # the next run stays where it was
    update_schedule(app, "report", schedule=300)               # the next run moves to the new schedule
    remove_schedule(app, "report")                             # disabled, history kept (purge=True: deleted)

A runtime schedule is sent like a `beat_schedule` entry (its task, args, kwargs and options); beats see changes
at once on PostgreSQL (NOTIFY) and within one run-jobs interval elsewhere. Its name can be no code (`@job`) or
`beat_schedule` job's, and a beat's `beat_schedule` sync never touches it. Bad input raises `InvalidSchedule`
(a `ValueError`) naming what is wrong, and stores nothing.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

from .binding import repository_for
from .errors import InvalidSchedule, NameTaken
from .job import MESSAGE_OPTIONS, JobDefinition, validate_name
from .policy import POLICY_NAMES, JobPolicy
from .records import JobRecord, PutResult, RuntimeEntry
from .registry import app_timezone, existing_registry
from .schedules import ClockedSchedule, CrontabSchedule, Schedule, parse_timezone, schedule_from, schedule_from_spec
from .settings import parse_bool
from .states import JobKind, Origin

TASK_NAME_MAX_LENGTH = 255
_TIMES = ("start_time", "expire_time", "last_run_at")
KEYWORDS = frozenset(
    {"task", "schedule", "args", "kwargs", "options", "timezone", "description", "one_off", *_TIMES, *POLICY_NAMES}
)

__all__ = [
    "KEYWORDS",
    "add_schedule",
    "get_schedule",
    "list_schedules",
    "put_schedules",
    "remove_schedule",
    "runtime_entry",
    "update_schedule",
]


def add_schedule(
    app: Any,
    name: str,
    *,
    task: str,
    schedule: Any,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
    timezone: str | None = None,
    description: str | None = None,
    enabled: bool = True,
    one_off: bool | None = None,
    start_time: dt.datetime | str | None = None,
    expire_time: dt.datetime | str | None = None,
    last_run_at: dt.datetime | str | None = None,
    **policies: Any,
) -> JobRecord:
    """Store a new runtime schedule of the Celery task `task` and return it.

    `schedule`: seconds, a timedelta, Celery's schedule/crontab/solar, a `Schedule`, a crontab string
    ("*/5 * * * *", in `timezone`, else the app's), an aware datetime (clocked: once at that time, at once if
    past; implies `one_off`), or a stored spec ({"type": "clocked", "at": ISO}, ...). `options`: the message
    options of a beat_schedule entry (queue, routing_key, exchange, priority, headers, expires, ...).
    `one_off`: disabled once its run is claimed. `start_time`: no run before it. `expire_time`: no run after it
    (then disabled; also the message's `expires`). `last_run_at`: the first run is the schedule's first slot
    after it (importers: nothing fires twice or is skipped at a switch). `policies`: misfire, misfire_grace,
    max_active, retry_backoff, expires (see `JobPolicy`).

    NameTaken when the name is a job's already (a runtime one: edit it, or remove it with purge first; a code or
    beat_schedule one: choose another name); InvalidSchedule for bad input. Nothing is stored on an error."""
    given = {
        "task": task,
        "schedule": schedule,
        "args": args,
        "kwargs": kwargs,
        "options": options,
        "timezone": timezone,
        "description": description,
        "enabled": enabled,
        "one_off": one_off,
        "start_time": start_time,
        "expire_time": expire_time,
        "last_run_at": last_run_at,
        **policies,
    }
    entry = runtime_entry(app, name, given)
    _check_not_declared(app, entry.name)
    return repository_for(app).add_runtime_job(entry)


def update_schedule(app: Any, name: str, **changes: Any) -> JobRecord:
    """Change a runtime schedule: only the keywords given (those of `add_schedule`; None clears `expire_time`,
    `options`, `kwargs`, `description`, a policy). Changing `schedule` or `timezone` moves the next run to the
    new schedule's next slot; changing only args, kwargs, options, description or policies does not move it.
    `enabled=True` on a disabled schedule: its next slot after now. `start_time` / `last_run_at`: as in
    `add_schedule`. JobNotFound; DbschedError for a code or beat_schedule job; InvalidSchedule."""
    label = f"runtime schedule {name!r}"
    _check_keywords(label, changes)
    timing_given = any(changes.get(key) is not None for key in ("start_time", "last_run_at"))
    return repository_for(app).update_runtime_job(
        name, lambda current: runtime_entry(app, name, changes, current), timing_given=timing_given
    )


def remove_schedule(app: Any, name: str, *, purge: bool = False) -> JobRecord:
    """Disable a runtime schedule (never claimed again; its history kept; its name stays taken), or with `purge`
    delete it and its history (refused while a run of it is queued or running). Returns the job as it was
    (purged) or is (disabled). JobNotFound; DbschedError for a code or beat_schedule job."""
    return repository_for(app).remove_runtime_job(name, purge=purge)


def get_schedule(app: Any, name: str) -> JobRecord:
    """A runtime schedule; JobNotFound, or DbschedError for a job of another origin."""
    job = repository_for(app).lookup_job(name)
    if job.origin != Origin.RUNTIME:
        from .errors import DbschedError

        raise DbschedError(f"job {name!r} is a {job.origin} job, not a runtime schedule")
    return job


def list_schedules(app: Any) -> list[JobRecord]:
    """Every runtime schedule (enabled or not), by name."""
    return repository_for(app).list_jobs(Origin.RUNTIME)


def put_schedules(app: Any, entries: Sequence[Mapping[str, Any]], *, dry_run: bool = False) -> PutResult:
    """Bulk, for importers: each entry holds "name" and `add_schedule`'s keywords. Creates the missing, updates
    the changed (as `update_schedule` with every keyword: the next run moves only with the schedule), leaves the
    identical alone (a second call with the same entries changes nothing), and refuses, with the reason, an
    entry that is invalid, given twice, or named like a code or beat_schedule job. `last_run_at` and
    `start_time` place a created schedule's first run (they do not move an existing one's). In one transaction
    of bounded statements; `dry_run` writes nothing and says what it would do."""
    declared = _declared(app)
    zone = app_timezone(app)
    valid: list[RuntimeEntry] = []
    refused: list[tuple[str, str]] = []
    seen: set[str] = set()
    for given in entries:
        name = given.get("name") if isinstance(given, Mapping) else None
        label = str(name) if isinstance(name, str) else repr(name)
        try:
            if not isinstance(given, Mapping):
                raise InvalidSchedule(f"an entry must be a dict with a 'name', got {given!r}")
            fields = {key: value for key, value in given.items() if key != "name"}
            if name in seen:
                raise InvalidSchedule(f"runtime schedule {name!r} is given more than once")
            entry = runtime_entry(app, name, fields, zone=zone)
            if entry.name in declared:
                raise NameTaken(entry.name, declared[entry.name], Origin.RUNTIME)
        except (InvalidSchedule, NameTaken) as exc:
            refused.append((label, str(exc)))
            continue
        seen.add(entry.name)
        valid.append(entry)
    result = repository_for(app).put_runtime_jobs(valid, dry_run=dry_run)
    return dataclasses.replace(result, refused=refused + result.refused)


# -- validation at the door -------------------------------------------------------------------------------


def runtime_entry(
    app: Any, name: object, given: Mapping[str, Any], current: JobRecord | None = None, *, zone: str | None = None
) -> RuntimeEntry:
    """The schedule `given` describes (`add_schedule`'s keywords), over the stored `current` one for an update
    (only the given keywords change); InvalidSchedule naming the schedule and the wrong thing. `zone`: the
    app's timezone when the caller already read it (crontabs without a `timezone` follow it)."""
    try:
        checked_name = validate_name(name)
    except ValueError as exc:
        raise InvalidSchedule(f"runtime schedule name: {exc}") from None
    label = f"runtime schedule {checked_name!r}"
    _check_keywords(label, given)
    try:
        return _entry(zone or app_timezone(app), checked_name, label, given, current)
    except InvalidSchedule:
        raise
    except (ValueError, TypeError) as exc:
        message = str(exc)
        raise InvalidSchedule(message if message.startswith(label) else f"{label}: {message}") from None


def _check_keywords(label: str, given: Mapping[str, Any]) -> None:
    unknown = sorted(set(given) - KEYWORDS)
    if unknown:
        raise InvalidSchedule(f"{label}: unknown keyword(s) {', '.join(unknown)}; known: {', '.join(sorted(KEYWORDS))}")


def _entry(app_zone: str, name: str, label: str, given: Mapping[str, Any], current: JobRecord | None) -> RuntimeEntry:
    def value(key: str, default: Any) -> Any:
        return given.get(key, default)

    if current is None:
        for key in ("task", "schedule"):
            if given.get(key) is None:
                raise InvalidSchedule(f"{label}: {key!r} is required")
    zone = given.get("timezone")
    if zone is not None:
        zone = parse_timezone(zone).key
    schedule = _schedule(label, given, current, zone or app_zone)
    task = _task_name(label, value("task", current.task if current else None))
    args = _json_list(label, value("args", current.task_args if current else ()))
    kwargs = _json_dict(label, "kwargs", value("kwargs", current.task_kwargs if current else None))
    options = _json_dict(label, "options", value("options", current.task_options if current else None))
    unknown_options = sorted(set(options) - MESSAGE_OPTIONS)
    if unknown_options:
        known = ", ".join(sorted(MESSAGE_OPTIONS))
        raise InvalidSchedule(f"{label}: unknown message option(s) {', '.join(unknown_options)}; known: {known}")
    policies: dict[str, Any] = {}
    if current is not None:
        policies = {key: getattr(current.policy, key) for key in POLICY_NAMES}
    policies.update({key: given[key] for key in POLICY_NAMES if key in given})
    policies["enabled"] = parse_bool(f"{label} enabled", policies.get("enabled"), True)
    expires_option = options.get("expires")
    if "expires" not in given and isinstance(expires_option, (int, float)) and not isinstance(expires_option, bool):
        policies["expires"] = expires_option  # as a beat_schedule entry's options.expires
    policy = JobPolicy.parse(label, policies)
    one_off = _one_off(label, given, current, schedule)
    times = {key: _aware(label, key, given.get(key)) for key in _TIMES}
    expire_time = times["expire_time"] if "expire_time" in given else (current.expire_time if current else None)
    description = value("description", current.description if current else None) or f"runtime: {task}"
    definition = JobDefinition(
        name=name,
        description=description,
        kind=JobKind.TASK,
        schedule=schedule,
        queue=options.get("queue"),
        policy=policy,
        task=task,
        task_args=tuple(args),
        task_kwargs=kwargs,
        task_options=options,
        origin=Origin.RUNTIME,
        one_off=one_off,
        expire_time=expire_time,
    )
    return RuntimeEntry(definition, start_time=times["start_time"], last_run_at=times["last_run_at"])


def _schedule(label: str, given: Mapping[str, Any], current: JobRecord | None, zone: str) -> Schedule:
    if "schedule" in given:
        raw = given["schedule"]
        if raw is None:
            raise InvalidSchedule(f"{label}: 'schedule' cannot be None")
        if isinstance(raw, Mapping):
            schedule = schedule_from_spec(raw)
            if isinstance(schedule, CrontabSchedule) and "timezone" in given and "timezone" not in raw:
                schedule = dataclasses.replace(schedule, timezone=zone)
            return schedule
        return schedule_from(raw, timezone=zone)
    assert current is not None and current.schedule is not None
    if given.get("timezone") is not None and isinstance(current.schedule, CrontabSchedule):
        return dataclasses.replace(current.schedule, timezone=zone)
    return current.schedule


def _one_off(label: str, given: Mapping[str, Any], current: JobRecord | None, schedule: Schedule) -> bool:
    one_off = given.get("one_off")
    if one_off is not None and not isinstance(one_off, bool):
        one_off = parse_bool(f"{label} one_off", one_off, False)
    if isinstance(schedule, ClockedSchedule):
        if one_off is False:
            raise InvalidSchedule(
                f"{label}: a clocked schedule (once at a time) is one-off; leave one_off out or set it True, or use "
                "an interval or crontab schedule"
            )
        return True
    if one_off is None:  # unchanged, unless the schedule stops being a clocked one
        return current is not None and current.one_off and not isinstance(current.schedule, ClockedSchedule)
    return one_off


def _task_name(label: str, task: object) -> str:
    if not isinstance(task, str) or not task:
        raise InvalidSchedule(f"{label}: 'task' must be a Celery task name such as 'proj.tasks.add', got {task!r}")
    if len(task) > TASK_NAME_MAX_LENGTH:
        raise InvalidSchedule(f"{label}: task name is {len(task)} characters long; at most {TASK_NAME_MAX_LENGTH}")
    if any(ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Cs") for ch in task):
        raise InvalidSchedule(
            f"{label}: task name {task!r} holds whitespace or control characters; a Celery task name is its dotted "
            "path, such as 'proj.tasks.add'"
        )
    return task


def _json_list(label: str, args: object) -> list[Any]:
    if isinstance(args, (str, bytes)) or not isinstance(args, (list, tuple)):
        raise InvalidSchedule(f"{label}: 'args' must be a list, got {args!r}")
    _check_json(label, "args", list(args))
    return list(args)


def _json_dict(label: str, key: str, value: object) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidSchedule(f"{label}: {key!r} must be a dict, got {value!r}")
    if any(not isinstance(k, str) for k in value):
        raise InvalidSchedule(f"{label}: the keys of {key!r} must be strings, got {list(value)!r}")
    _check_json(label, key, dict(value))
    return dict(value)


def _check_json(label: str, key: str, value: object) -> None:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidSchedule(
            f"{label}: {key!r} must serialize to JSON (strings, numbers, booleans, None, lists, dicts): {exc}"
        ) from None


def _aware(label: str, key: str, value: object) -> dt.datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            example = "2026-01-31T08:00:00+00:00"
            raise InvalidSchedule(f"{label}: {key} {value!r} is not an ISO time such as {example}") from None
    if not isinstance(value, dt.datetime) or value.utcoffset() is None:
        raise InvalidSchedule(f"{label}: {key} must be an aware datetime (with a UTC offset), got {value!r}")
    return value.astimezone(dt.timezone.utc)


# -- names declared by the app ----------------------------------------------------------------------------


def _declared(app: Any) -> dict[str, Origin]:
    """The names the app declares, by owner: its beat_schedule entries (and Celery's own) and its `@job`s."""
    from .beat_schedule import entry_names  # not at import: beat_schedule reads the package's version

    declared = dict.fromkeys(entry_names(app), Origin.BEAT_SCHEDULE)
    registry = existing_registry(app)
    if registry is not None:
        declared.update((job.name, Origin.CODE) for job in registry)
    return declared


def _check_not_declared(app: Any, name: str) -> None:
    owner = _declared(app).get(name)
    if owner is not None:
        raise NameTaken(name, owner, Origin.RUNTIME)
