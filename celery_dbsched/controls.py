"""Operator controls, as Python functions and as `celery -A proj dbsched pause|resume|trigger|cancel NAME`."""

from __future__ import annotations

import datetime as dt
from typing import Any

from .binding import repository_for
from .errors import JobPaused
from .records import JobRecord, RunRecord


def _name(name: object) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"job name must not be empty, got {name!r}")
    return name


def pause_job(app: Any, name: str) -> JobRecord:
    """Stop claiming the job (a running run goes on; `cancel_job` stops it)."""
    return repository_for(app).set_paused(_name(name), True)


def resume_job(app: Any, name: str) -> JobRecord:
    """Claim the job again, from its next slot after now: no burst for the time it was paused."""
    return repository_for(app).set_paused(_name(name), False)


def trigger_job(app: Any, name: str) -> JobRecord:
    """Run the job now (once its current run, if any, has ended), and wake the beats."""
    repository = repository_for(app)
    job = repository.lookup_job(_name(name))
    if job.paused or not job.policy.enabled:
        raise JobPaused(f"job {name!r} is {'paused' if job.paused else 'disabled'}; resume it to run it")
    return repository.update_job_next_run_in_at_least(name, dt.timedelta(0), run_now=True)


def cancel_job(app: Any, name: str) -> list[RunRecord]:
    """Interrupt the job's queued and running runs (the worker cancels the job's context)."""
    return repository_for(app).interrupt_job_runs(_name(name))
