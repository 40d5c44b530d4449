"""celery_dbsched: a database-backed, leaderless replacement for Celery beat.

Jobs are registered with `@job(app, ...)` or `register_job(app, Job())`; any number of
`celery beat -S celery_dbsched.Scheduler` processes claim due runs from the database and send them to
workers, where the wrapper task runs the job, records its progress and schedules its next run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .controls import cancel_job, cancel_run, pause_job, remove_job, resume_job, trigger_job
from .errors import (
    DatabaseError,
    DatabaseUnavailable,
    DbschedError,
    InvalidRunState,
    InvalidSchedule,
    JobInterrupted,
    JobNotFound,
    JobNotRegistered,
    JobPaused,
    NameTaken,
    RunNotFound,
    SchemaMismatch,
)
from .job import Job, JobContext, JobStatus
from .policy import JobPolicy
from .records import JobRecord, RunRecord
from .registration import job, register_job, update_job_next_run_in_at_least
from .repository import JobRepository
from .runtime import add_schedule, get_schedule, list_schedules, put_schedules, remove_schedule, update_schedule

if TYPE_CHECKING:
    from .scheduler import Scheduler

__version__ = "0.1.0"

__all__ = [
    "DatabaseError",
    "DatabaseUnavailable",
    "DbschedError",
    "InvalidRunState",
    "InvalidSchedule",
    "Job",
    "JobContext",
    "JobInterrupted",
    "JobNotFound",
    "JobNotRegistered",
    "JobPaused",
    "JobPolicy",
    "JobRecord",
    "JobRepository",
    "JobStatus",
    "NameTaken",
    "RunNotFound",
    "RunRecord",
    "Scheduler",
    "SchemaMismatch",
    "add_schedule",
    "cancel_job",
    "cancel_run",
    "get_schedule",
    "job",
    "list_schedules",
    "pause_job",
    "progress",
    "put_schedules",
    "register_job",
    "remove_job",
    "remove_schedule",
    "resume_job",
    "trigger_job",
    "update_job_next_run_in_at_least",
    "update_schedule",
]


def __getattr__(name: str) -> Any:
    # The beat scheduler imports celery.beat; load it only when asked for.
    if name == "Scheduler":
        from .scheduler import Scheduler

        return Scheduler
    if name == "progress":
        from .tracking import progress

        return progress
    raise AttributeError(f"module 'celery_dbsched' has no attribute {name!r}")
