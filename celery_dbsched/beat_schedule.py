"""`beat_schedule` entries as database jobs: switching a project from stock beat is one setting.

Each entry (and Celery's own `celery.backend_cleanup`) becomes a job of kind "task" named by its key. Beats
send the entry's task unchanged, with its args, kwargs and options; workers need nothing from us. Entries
removed from `beat_schedule` are disabled (their history stays); changed ones are updated without resetting
a next run whose schedule did not change.

A beat start costs O(changes), not O(entries): the sync stores a fingerprint of the schedule it synced, and a
beat whose `beat_schedule` has the same fingerprint (and finds as many entries stored as that sync left) does
one read. Otherwise every entry is compared with its stored row in one read and only the differences are
written, in bounded chunks.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from collections.abc import Mapping
from typing import Any

from . import __version__
from .job import MESSAGE_OPTIONS, JobDefinition
from .policy import POLICY_NAMES, JobPolicy
from .registry import app_timezone
from .repository import JobRepository
from .schedules import Schedule, parse_timezone, schedule_from
from .settings import parse_bool, parse_duration
from .states import JobKind, Origin

logger = logging.getLogger(__name__)

# Keys of an entry that stock beat understands, and the policies we add (stock beat rejects unknown keys in
# an entry, so policies for a project that may go back to stock beat belong in options["dbsched"]). An entry's
# `expires` policy is its message option options["expires"], not a key of its own.
_CELERY_KEYS = {"task", "schedule", "args", "kwargs", "options", "relative"}
_POLICY_KEYS = (set(POLICY_NAMES) - {"expires"}) | {"timezone", "description"}


def default_entries(app: Any) -> dict[str, dict[str, Any]]:
    """Celery's own entries, as stock beat installs them."""
    from celery.schedules import crontab

    try:
        needs_cleanup = bool(app.conf.result_expires) and not app.backend.supports_autoexpire
    except Exception:  # a backend that cannot be built here: stock beat would fail too; skip quietly
        needs_cleanup = False
    if not needs_cleanup:
        return {}
    return {
        "celery.backend_cleanup": {
            "task": "celery.backend_cleanup",
            "schedule": crontab("0", "4", "*"),
            "options": {"expires": 12 * 3600},
        }
    }


SYNC_SOURCE = "beat_schedule"
# Bump when the way an entry becomes a definition changes, so that every stored fingerprint is stale.
FINGERPRINT_FORMAT = 1
_MARK = "\x00celery_dbsched\x00"  # tags encoded objects: no JSON value in a real entry looks like it


def _encode(value: object) -> object:
    """JSON for the non-JSON values an entry may hold (schedules, timedeltas); TypeError for anything else."""
    from celery.schedules import BaseSchedule

    if isinstance(value, dt.timedelta):
        return [_MARK, "timedelta", value.days, value.seconds, value.microseconds]
    if isinstance(value, (Schedule, BaseSchedule)):
        # Through the same conversion the definition uses; the zone is the entry's or the app's (both hashed).
        return [_MARK, type(value).__module__, type(value).__qualname__, schedule_from(value, timezone="UTC").to_json()]
    raise TypeError(f"not fingerprinted: {type(value).__name__}")


def fingerprint(app: Any) -> str | None:
    """A digest of everything the definitions of the app's entries are built from (the entries, Celery's own
    entries, the app's timezone, this code's version); None when an entry holds a value it cannot digest
    faithfully (then every start compares every entry)."""
    try:
        payload = json.dumps(
            [FINGERPRINT_FORMAT, __version__, app_timezone(app), _entries(app)],
            sort_keys=True,
            separators=(",", ":"),
            default=_encode,
        )
    except (TypeError, ValueError):
        return None
    return hashlib.sha256(payload.encode("utf-8", "surrogatepass")).hexdigest()


def definition_from_entry(name: str, entry: object, timezone: str) -> JobDefinition:
    """One `beat_schedule` entry as a job definition; ValueError naming the entry and what is wrong."""
    label = f"beat_schedule entry {name!r}"
    if not isinstance(entry, Mapping):
        raise ValueError(f"{label}: expected a dict, got {entry!r}")
    unknown = set(entry) - _CELERY_KEYS - _POLICY_KEYS
    if unknown:
        raise ValueError(f"{label}: unknown key(s) {', '.join(sorted(unknown))}")
    task = entry.get("task")
    if not isinstance(task, str) or not task.strip():
        raise ValueError(f"{label}: 'task' must be a task name, got {task!r}")
    if "schedule" not in entry:
        raise ValueError(f"{label}: 'schedule' is missing")
    options = dict(entry.get("options") or {})
    options.pop("dbsched", None)
    policies = _policies(entry)
    unknown_options = set(options) - MESSAGE_OPTIONS
    if unknown_options:
        logger.warning("%s: options %s are passed to send_task as they are", label, sorted(unknown_options))
    zone = policies.get("timezone") or timezone
    try:
        schedule = schedule_from(entry["schedule"], timezone=parse_timezone(zone).key)
        args = entry.get("args") or ()
        kwargs = entry.get("kwargs") or {}
        expires_option = options.get("expires")
        expires = None
        if isinstance(expires_option, (int, float, dt.timedelta)) and not isinstance(expires_option, bool):
            expires = parse_duration(f"{label} options.expires", expires_option, None)
            options["expires"] = expires.total_seconds() if expires is not None else None
        policy = JobPolicy.parse(label, {**policies, "expires": expires})
        return JobDefinition(
            name=name,
            description=str(policies.get("description") or f"beat_schedule: {task}"),
            kind=JobKind.TASK,
            schedule=schedule,
            queue=options.get("queue"),
            policy=policy,
            task=task,
            task_args=tuple(args),
            task_kwargs=dict(kwargs),
            task_options=options,
        )
    except ValueError as exc:
        message = str(exc)
        raise ValueError(message if message.startswith(label) else f"{label}: {message}") from None


def _entries(app: Any) -> dict[str, Any]:
    return {**default_entries(app), **dict(app.conf.beat_schedule or {})}


def entry_names(app: Any) -> set[str]:
    """The names of the jobs a beat of `app` syncs from its `beat_schedule` (and Celery's own entries)."""
    return set(_entries(app))


def definitions(app: Any) -> list[JobDefinition]:
    timezone = app_timezone(app)
    return [definition_from_entry(name, entry, timezone) for name, entry in _entries(app).items()]


def _policies(entry: Mapping[str, Any]) -> dict[str, Any]:
    """An entry's policies: its own keys, overridden by those in options["dbsched"]."""
    policies = {key: entry[key] for key in _POLICY_KEYS if key in entry}
    policies.update((entry.get("options") or {}).get("dbsched") or {})
    return policies


def _enabled(name: str, entry: Mapping[str, Any]) -> bool:
    return parse_bool(f"beat_schedule entry {name!r} enabled", _policies(entry).get("enabled"), True)


def sync_beat_schedule(app: Any, repository: JobRepository) -> list[str]:
    """Store every entry, disable the entries that are gone; returns the names of the enabled entries.

    With the same schedule as the last sync stored (its fingerprint), one read; otherwise one read to compare
    and writes for the differences only (see `JobRepository.sync_jobs`)."""
    digest = fingerprint(app)
    entries = _entries(app)
    if digest is not None and repository.sync_is_current(SYNC_SOURCE, digest, Origin.BEAT_SCHEDULE):
        return [name for name, entry in entries.items() if _enabled(name, entry)]
    found = definitions(app)
    result = repository.sync_jobs(found, disable_missing=Origin.BEAT_SCHEDULE, source=SYNC_SOURCE, fingerprint=digest)
    if result.refused:
        # Left alone; no fingerprint is kept while any is (sync_jobs), so that every start looks again.
        logger.error(
            "celery_dbsched: beat_schedule entries not synced, a runtime schedule has their name: %s; rename the "
            "entry, or remove the runtime schedule (dbsched remove NAME --purge)",
            summarize_names(result.refused),
        )
    if result.added or result.changed:
        logger.info(
            "celery_dbsched: beat_schedule synced: %d added, %d changed", len(result.added), len(result.changed)
        )
    if result.disabled:
        logger.warning("celery_dbsched: beat_schedule entries removed, disabled: %s", summarize_names(result.disabled))
    return [d.name for d in found if d.policy.enabled and d.name not in result.refused]


def summarize_names(names: list[str], shown: int = 20) -> str:
    """At most `shown` names for a log line (a schedule may have 100,000 entries)."""
    if len(names) <= shown:
        return ", ".join(names)
    return f"{', '.join(names[:shown])} and {len(names) - shown:,} more"
