"""Operator controls, as Python functions and as `celery -A proj dbsched pause|resume|trigger|cancel|remove NAME`."""

from __future__ import annotations

import datetime as dt
from typing import Any

from .binding import repository_for
from .errors import DbschedError, JobPaused
from .records import JobRecord, RunRecord
from .registry import existing_registry
from .repository import JobRepository


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
    return trigger(repository_for(app), name)


def trigger(repository: JobRepository, name: str) -> JobRecord:
    """`trigger_job` on a repository (the dashboard's): JobPaused for a paused or disabled job."""
    job = repository.lookup_job(_name(name))
    if job.paused or not job.policy.enabled:
        raise JobPaused(f"job {name!r} is {'paused' if job.paused else 'disabled'}; resume it to run it")
    return repository.update_job_next_run_in_at_least(name, dt.timedelta(0), run_now=True)


def cancel_job(app: Any, name: str) -> list[RunRecord]:
    """Interrupt the job's queued and running runs (the worker cancels the job's context)."""
    return repository_for(app).interrupt_job_runs(_name(name))


def cancel_run(app: Any, run_id: int) -> RunRecord:
    """Interrupt one queued or running run (the worker cancels the job's context)."""
    return repository_for(app).cancel_run(run_id)


def remove_job(app: Any, name: str, *, purge: bool = False) -> JobRecord:
    """Take a job that is no longer declared out of the schedule: disable it (never claimed again, history
    kept), or with `purge` delete it and its history (refused while it has a queued or running run). A job
    this app still declares is refused: the next worker or beat start would enable it again."""
    from .beat_schedule import entry_names  # not at import: beat_schedule reads the package's version

    _name(name)
    if name in entry_names(app):
        raise DbschedError(
            f"{name!r} is a beat_schedule entry of this app: the next beat start recreates it; delete it from "
            f"beat_schedule first, or pause it: celery -A proj dbsched pause {name}"
        )
    registry = existing_registry(app)
    if registry is not None and name in registry:
        raise DbschedError(
            f"job {name!r} is still in this app's code (@job / register_job): the next worker start enables it "
            f"again; delete it from the code first, or pause it: celery -A proj dbsched pause {name}"
        )
    return repository_for(app).remove_job(name, purge=purge)
