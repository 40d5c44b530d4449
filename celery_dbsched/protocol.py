"""The messages between beat and worker: what a beat publishes for a run and what a worker accepts.

A job's run is the task `RUN_TASK_NAME` with args `[run id, job name]`, serialized as JSON, shown under its
job's name (Celery's `shadow`). A plain task sent for a `beat_schedule` entry is the entry's own task, with the
run id in the header `RUN_ID_HEADER` (read by workers that load `celery_dbsched.tracking`). Both sides import
this module; it imports nothing of theirs.
"""

from __future__ import annotations

from typing import Any

RUN_TASK_NAME = "celery_dbsched.run_job"
RUN_ID_HEADER = "dbsched_run_id"  # on plain tasks sent for beat_schedule entries
MAX_RUN_ID = 2**63 - 1  # the id column is a 64-bit integer on both databases
RUN_SERIALIZER = "json"  # run messages are JSON only: a worker refuses any other content type
JSON_CONTENT_TYPE = "application/json"


def run_args(run_id: int, job_name: object) -> list[Any]:
    """The args of a run message. The job name is informational: a worker runs the job the database says the
    run belongs to."""
    return [run_id, job_name]


def run_shadow(job_name: object) -> str | None:
    """The name Celery shows for a run's task in its logs, events and monitors (Flower, `inspect active`): the
    job's name, as Celery's `shadow` option (None when the message's job name is not a name)."""
    return job_name if isinstance(job_name, str) and job_name else None


def run_headers(run_id: int) -> dict[str, int]:
    """The headers that name the run on a plain task sent for a `beat_schedule` entry."""
    return {RUN_ID_HEADER: run_id}


def valid_run_id(value: object) -> int | None:
    """A run id from a message, or None when it cannot be one (a forged or corrupt message)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_RUN_ID:
        return None
    return value


def header_run_id(request: Any) -> int | None:
    """The run id a task's request carries in `RUN_ID_HEADER` (Celery copies headers onto the request, or
    keeps them in `request.headers`), or None when there is none or it cannot be one."""
    value = getattr(request, RUN_ID_HEADER, None)
    if value is None:
        headers = getattr(request, "headers", None) or {}
        value = headers.get(RUN_ID_HEADER)
    return valid_run_id(value)
