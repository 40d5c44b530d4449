"""`beat_schedule` entries as database jobs: switching a project from stock beat is one setting.

Each entry (and Celery's own `celery.backend_cleanup`) becomes a job of kind "task" named by its key. Beats
send the entry's task unchanged, with its args, kwargs and options; workers need nothing from us. Entries
removed from `beat_schedule` are disabled (their history stays); changed ones are updated without resetting
a next run whose schedule did not change.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping
from typing import Any

from .job import JobDefinition
from .registry import app_timezone
from .repository import JobRepository
from .schedules import parse_timezone, schedule_from
from .schema import KIND_TASK, MISFIRE_RUN_ONCE
from .settings import parse_backoff, parse_bool, parse_duration

logger = logging.getLogger(__name__)

# Keys of an entry that stock beat understands, and the policies we add (stock beat rejects unknown keys in
# an entry, so policies for a project that may go back to stock beat belong in options["dbsched"]).
_CELERY_KEYS = {"task", "schedule", "args", "kwargs", "options", "relative"}
_POLICY_KEYS = {"enabled", "misfire", "misfire_grace", "max_active", "retry_backoff", "timezone", "description"}
_MESSAGE_OPTIONS = {
    "queue", "routing_key", "exchange", "priority", "expires", "headers", "serializer", "compression",
    "countdown", "eta", "time_limit", "soft_time_limit", "ignore_result", "shadow", "exchange_type",
}  # fmt: skip


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
    policies = {key: entry[key] for key in _POLICY_KEYS if key in entry}
    policies.update(options.pop("dbsched", None) or {})
    unknown_options = set(options) - _MESSAGE_OPTIONS
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
        backoff = policies.get("retry_backoff")
        return JobDefinition(
            name=name,
            description=str(policies.get("description") or f"beat_schedule: {task}"),
            kind=KIND_TASK,
            schedule=schedule,
            queue=options.get("queue"),
            enabled=parse_bool(f"{label} enabled", policies.get("enabled"), True),
            misfire=policies.get("misfire", MISFIRE_RUN_ONCE),
            misfire_grace=parse_duration(f"{label} misfire_grace", policies.get("misfire_grace"), None),
            max_active=policies.get("max_active", 1),
            retry_backoff=None if backoff is None else parse_backoff(f"{label} retry_backoff", backoff),
            expires=expires,
            task=task,
            task_args=tuple(args),
            task_kwargs=dict(kwargs),
            task_options=options,
        )
    except ValueError as exc:
        message = str(exc)
        raise ValueError(message if message.startswith(label) else f"{label}: {message}") from None


def definitions(app: Any) -> list[JobDefinition]:
    entries: dict[str, Any] = {**default_entries(app), **dict(app.conf.beat_schedule or {})}
    timezone = app_timezone(app)
    return [definition_from_entry(name, entry, timezone) for name, entry in entries.items()]


def sync_beat_schedule(app: Any, repository: JobRepository) -> list[str]:
    """Upsert every entry, disable the entries that are gone; returns the names of the enabled entries."""
    found = definitions(app)
    for definition in found:
        repository.define_job(definition)
    disabled = repository.disable_jobs_not_in(KIND_TASK, [d.name for d in found])
    if disabled:
        logger.warning("celery_dbsched: beat_schedule entries removed, disabled: %s", ", ".join(disabled))
    return [d.name for d in found if d.enabled]
