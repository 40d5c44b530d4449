"""What the dashboard shows, as pure functions of records: a job's state, its success rate and sparkline, its
next slots, and the JSON shapes of the API (`job_json`, `run_json`; the fleet's is `observe`'s). No I/O."""

from __future__ import annotations

import base64
import datetime as dt
import json
from collections.abc import Sequence
from typing import Any

from .. import display
from ..records import JobRecord, RunRecord, RunSummary
from ..schedules import ClockedSchedule, CrontabSchedule, IntervalSchedule, SolarSchedule
from ..states import Origin, RunState

SPARK_WIDTH, SPARK_HEIGHT = 120, 24
OUTCOMES = (RunState.COMPLETED, RunState.FAILED, RunState.INTERRUPTED)


def iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.astimezone(dt.timezone.utc).isoformat()


def job_state(job: JobRecord, now: dt.datetime, late_after: dt.timedelta) -> str:
    """paused, disabled, running, late, failing or enabled (the first that holds), as the filter names them."""
    if job.paused:
        return "paused"
    if not job.policy.enabled:
        return "disabled"
    if job.active_runs > 0:
        return "running"
    if job.next_scheduled_run < now - late_after:
        return "late"
    return "failing" if job.failure_count > 0 else "enabled"


def success_rate(runs: Sequence[RunSummary]) -> float | None:
    """Completed among the runs that ended with an outcome (dispatched plain tasks have none); None: none."""
    ended = [run for run in runs if run.status in OUTCOMES]
    return None if not ended else sum(run.status == RunState.COMPLETED for run in ended) / len(ended)


def durations(runs: Sequence[RunSummary]) -> list[float]:
    """The seconds the runs took, oldest first (`runs` newest first, as read)."""
    return [d.total_seconds() for d in (run.duration for run in reversed(runs)) if d is not None]


def sparkline_points(values: Sequence[float]) -> str:
    """An SVG polyline's points for `values` in a SPARK_WIDTH x SPARK_HEIGHT box (empty for fewer than two)."""
    if len(values) < 2:
        return ""
    top = max(values) or 1.0
    step = SPARK_WIDTH / (len(values) - 1)
    return " ".join(
        f"{i * step:.1f},{SPARK_HEIGHT - 1 - (v / top) * (SPARK_HEIGHT - 2):.1f}" for i, v in enumerate(values)
    )


def next_slots(job: JobRecord, count: int = 5) -> list[dt.datetime]:
    """The job's next `count` slots from its next run (only the next run without a cadence)."""
    slots = [job.next_scheduled_run]
    cadence = job.cadence
    while cadence is not None and len(slots) < count:
        slots.append(cadence.next_after(slots[-1], job.next_scheduled_run))
    return slots


def schedule_field(job: JobRecord) -> tuple[str, str]:
    """The edit form's schedule (seconds, or five crontab fields) and time zone, as stored."""
    if isinstance(job.schedule, CrontabSchedule):
        return job.schedule.expression, job.schedule.timezone
    if isinstance(job.schedule, IntervalSchedule):
        return f"{job.schedule.seconds:g}", "UTC"
    return ("" if job.every is None else f"{job.every.total_seconds():g}"), "UTC"


ORIGIN_WORDS = {
    Origin.CODE: "code (@job / register_job)",
    Origin.BEAT_SCHEDULE: "the app's beat_schedule",
    Origin.RUNTIME: "run time (dbsched add, the dashboard or an import)",
}


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:g}"


def schedule_form(job: JobRecord, app_zone: str) -> dict[str, str]:
    """A run-time job's values as the schedule form's fields (`schedule_input.FIELDS`), text as typed."""
    schedule = job.schedule
    zone = schedule.timezone if isinstance(schedule, CrontabSchedule) else app_zone
    options = job.task_options
    values = {
        "task": job.task or "",
        "tz": zone,
        "args": json.dumps(list(job.task_args)) if job.task_args else "",
        "kwargs": json.dumps(job.task_kwargs) if job.task_kwargs else "",
        "description": job.description,
        "enabled": "on" if job.policy.enabled else "",
        "one_off": "on" if job.one_off else "",
        "expire_time": "" if job.expire_time is None else job.expire_time.isoformat(),
        "misfire": job.policy.misfire.value,
        "misfire_grace": _number(seconds(job.policy.misfire_grace)),
        "max_active": str(job.policy.max_active),
        "headers": json.dumps(options["headers"]) if options.get("headers") else "",
        **{key: str(options.get(key) or "") for key in ("queue", "routing_key", "exchange")},
        "priority": "" if options.get("priority") is None else str(options["priority"]),
        "expires": _number(options.get("expires")),
    }
    if isinstance(schedule, IntervalSchedule):
        values["every"] = _number(schedule.seconds)
    elif isinstance(schedule, CrontabSchedule):
        values["crontab"] = schedule.expression
    elif isinstance(schedule, ClockedSchedule):
        values["at"] = schedule.at.isoformat()
    elif isinstance(schedule, SolarSchedule):
        values.update(solar=schedule.event, lat=_number(schedule.latitude), lon=_number(schedule.longitude))
    return values


def seconds(value: dt.timedelta | None) -> float | None:
    return None if value is None else value.total_seconds()


def job_json(
    job: JobRecord, now: dt.datetime, late_after: dt.timedelta, recent: Sequence[RunSummary] | None = None
) -> dict[str, Any]:
    policy = job.policy
    out: dict[str, Any] = {
        "name": job.name,
        "description": job.description,
        "kind": job.kind.value,
        "origin": job.origin.value,  # code, beat_schedule or runtime
        "task": job.task,
        "one_off": job.one_off,
        "expire_time": iso(job.expire_time),
        "state": job_state(job, now, late_after),
        "schedule": display.schedule(job),
        "schedule_words": display.schedule_words(job),
        "schedule_spec": None if job.schedule is None else job.schedule.spec(),
        "every": seconds(job.every),
        "next_run": iso(job.next_scheduled_run),
        "enabled": policy.enabled,
        "paused": job.paused,
        "active_runs": job.active_runs,
        "failure_count": job.failure_count,
        "queue": job.queue,
        "interrupt_threshold": seconds(job.interrupt_threshold),
        "policy": {
            "misfire": policy.misfire.value,
            "misfire_grace": seconds(policy.misfire_grace),
            "max_active": policy.max_active,
            "retry_backoff": None if policy.retry_backoff is None else [seconds(d) for d in policy.retry_backoff],
            "expires": seconds(policy.expires),
        },
        "overrides": job.overrides_by_field(),
    }
    if recent is not None:
        last = recent[0] if recent else None
        out["last_run"] = (
            None if last is None else {"id": last.id, "status": last.status.value, "ended": iso(last.end_time)}
        )
        out["success_rate"] = success_rate(recent)
        out["durations"] = durations(recent)
    return out


def run_json(run: RunRecord, now: dt.datetime) -> dict[str, Any]:
    ended = run.end_time or now
    return {
        "id": run.id,
        "job": run.job_name,
        "status": run.status.value,
        "interrupt_reason": None if run.interrupt_reason is None else run.interrupt_reason.value,
        "progress": {"completed": run.completed, "total": run.total},
        "claimed": iso(run.create_time),
        "started": iso(run.start_time),
        "updated": iso(run.update_time),
        "ended": iso(run.end_time),
        "duration": None if run.start_time is None else (ended - run.start_time).total_seconds(),
        "claimed_by": run.claimed_by,
        "worker": run.worker,
        "queue": run.queue,
        "task_id": run.task_id,
        "scheduled_for": iso(run.scheduled_for),
        "error": run.error,
    }


def error_summary(error: str | None) -> str:
    """An error's last line (a traceback's exception), for a table cell."""
    return error.strip().splitlines()[-1][:200] if error and error.strip() else ""


def encode_cursor(values: Sequence[Any]) -> str:
    """A keyset cursor for a URL: the last row's sort key (times as ISO text)."""
    data = [iso(v) if isinstance(v, dt.datetime) else v for v in values]
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


def decode_cursor(text: str, sort: str) -> list[Any]:
    """The sort key of `encode_cursor` (ValueError when it is not one of `sort`'s)."""
    try:
        data = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except (ValueError, TypeError):
        raise ValueError("after: not a cursor of this page; follow the page's next link") from None
    size = 1 if sort == "name" else 2
    if not isinstance(data, list) or len(data) != size or not all(isinstance(v, str) for v in data):
        raise ValueError("after: not a cursor of this page; follow the page's next link")
    if sort == "next_run":
        try:
            return [dt.datetime.fromisoformat(data[0]), data[1]]
        except ValueError:
            raise ValueError("after: not a cursor of this page; follow the page's next link") from None
    return data


def job_cursor(job: JobRecord, sort: str) -> str:
    return encode_cursor([job.name] if sort == "name" else [job.next_scheduled_run, job.name])
