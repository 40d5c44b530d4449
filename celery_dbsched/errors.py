"""Typed errors: callers never see a bare database error for a scheduler condition."""

from __future__ import annotations


class DbschedError(Exception):
    """Base class of every error raised by celery_dbsched."""


class JobNotFound(DbschedError, LookupError):
    """No job with that name is registered in the database."""

    def __init__(self, name: str) -> None:
        super().__init__(f"job {name!r} not found")
        self.name = name


class RunNotFound(DbschedError, LookupError):
    """No run with that id exists (it may have been pruned)."""

    def __init__(self, run_id: object) -> None:
        super().__init__(f"run {run_id!r} not found")
        self.run_id = run_id


class InvalidRunState(DbschedError):
    """A run is not in the state the requested transition needs (e.g. it already ended)."""

    def __init__(self, run_id: int, status: str, wanted: str) -> None:
        super().__init__(f"run {run_id} is {status}, not {wanted}")
        self.run_id = run_id
        self.status = status
        self.wanted = wanted


class JobInterrupted(DbschedError):
    """Raised inside a job when its run was interrupted (stalled, cancelled or worker shutdown)."""


class SchemaMismatch(DbschedError):
    """The database schema is not the one this version of celery_dbsched needs."""


class DatabaseError(DbschedError):
    """The database refused a statement for a reason that is not a scheduler condition."""


class DatabaseUnavailable(DatabaseError):
    """The database could not be reached (down, restarting, network); the caller may retry later."""


class JobPaused(DbschedError):
    """The job is paused or disabled, so it cannot be triggered."""
