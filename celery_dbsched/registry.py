"""Registering jobs with an app: the `@job` decorator, `register_job`, and pulling a job's next run in.

Registration is recorded on the app at import time and written to the database (an upsert, DESIGN 8) when a
worker or beat starts, or at once when one is already running in this process: importing a module never
opens a connection.
"""

from __future__ import annotations

import datetime as dt
import inspect
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from .job import FunctionJob, Job, JobContext, validate_description, validate_name, validate_queue
from .repository import JobRecord, JobRepository, repository_for
from .settings import parse_duration

logger = logging.getLogger(__name__)

_REGISTRY_ATTRIBUTE = "_dbsched_registry"


class JobRegistry:
    """The jobs an app knows, by name; what a worker can run."""

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        self._first_run_in: dict[str, dt.timedelta | None] = {}
        self._lock = threading.Lock()
        self._repository: JobRepository | None = None

    def __contains__(self, name: object) -> bool:
        return name in self._jobs

    def __iter__(self) -> Iterator[Job]:
        return iter(list(self._jobs.values()))

    def __len__(self) -> int:
        return len(self._jobs)

    def get(self, name: str) -> Job | None:
        return self._jobs.get(name)

    def add(self, job: Job, next_run_in: dt.timedelta | None = None) -> None:
        with self._lock:
            self._jobs[job.name] = job
            self._first_run_in[job.name] = next_run_in
            repository = self._repository
        if repository is not None:
            self._upsert(repository, job)

    def _upsert(self, repository: JobRepository, job: Job) -> JobRecord:
        return repository.upsert_job(
            job.name,
            job.description,
            next_run_in=self._first_run_in.get(job.name),
            default_next_run_in=job.every,
            queue=job.queue,
            interrupt_threshold=job.interrupt_threshold,
        )

    def sync(self, repository: JobRepository) -> None:
        """Upsert every registered job; from now on `add` writes through."""
        with self._lock:
            self._repository = repository
        for job in self:
            self._upsert(repository, job)

    def detach(self) -> None:
        with self._lock:
            self._repository = None


def registry_for(app: Any) -> JobRegistry:
    """The app's job registry; the first call also installs the worker side on the app."""
    registry: JobRegistry | None = app.__dict__.get(_REGISTRY_ATTRIBUTE)
    if registry is None:
        registry = JobRegistry()
        setattr(app, _REGISTRY_ATTRIBUTE, registry)
        from .worker import install_worker

        install_worker(app)
    return registry


def existing_registry(app: Any) -> JobRegistry | None:
    """The app's registry if any job was registered on it (without installing anything)."""
    registry: JobRegistry | None = app.__dict__.get(_REGISTRY_ATTRIBUTE)
    return registry


def _check_job(job: object) -> Job:
    if not isinstance(job, Job):
        raise TypeError(f"expected a celery_dbsched.Job instance, got {job!r}")
    validate_name(getattr(job, "name", None))
    validate_description(job.name, getattr(job, "description", None))
    for attribute in ("every", "interrupt_threshold"):
        value = getattr(job, attribute, None)
        if value is not None and (not isinstance(value, dt.timedelta) or value < dt.timedelta(0)):
            raise ValueError(f"job {job.name!r}: {attribute} must be a non-negative timedelta, got {value!r}")
    validate_queue(job.name, getattr(job, "queue", None))
    return job


def register_job(app: Any, job: Job, *, next_run_in: dt.timedelta | float | None = None) -> Job:
    """Register a `Job` instance; its first run is due `next_run_in` after it is first stored (now if None).
    Registering again updates its description and settings, never its next run."""
    _check_job(job)
    first = parse_duration(f"job {job.name!r} next_run_in", next_run_in, None, zero_is_default=False)
    registry_for(app).add(job, first)
    return job


def job(
    app: Any,
    *,
    name: str | None = None,
    description: str | None = None,
    every: dt.timedelta | float | None = None,
    next_run_in: dt.timedelta | float | None = None,
    queue: str | None = None,
    interrupt_threshold: dt.timedelta | float | None = None,
) -> Callable[[Callable[[JobContext], Any]], FunctionJob]:
    """Decorator: `f(ctx) -> timedelta | None` becomes a registered job.

    The name defaults to the function's dotted path, the description to its docstring's first line. The
    returned delay, when not None, is the next run in; otherwise `every`. `next_run_in` is the delay before
    the very first run.
    """
    every_delta = parse_duration("every", every, None)
    threshold = parse_duration("interrupt_threshold", interrupt_threshold, None)
    first = parse_duration("next_run_in", next_run_in, None, zero_is_default=False)

    def decorate(func: Callable[[JobContext], Any]) -> FunctionJob:
        if not callable(func):
            raise TypeError(f"@job decorates a function, got {func!r}")
        job_name = name if name is not None else f"{func.__module__}.{func.__qualname__}"
        doc = inspect.getdoc(func)
        job_description = description if description is not None else (doc.splitlines()[0] if doc else None)
        if not job_description:
            raise ValueError(f"job {job_name!r}: give description= or a docstring")
        function_job = FunctionJob(
            func,
            name=validate_name(job_name),
            description=validate_description(job_name, job_description),
            every=every_delta,
            queue=queue,
            interrupt_threshold=threshold,
        )
        register_job(app, function_job, next_run_in=first)
        return function_job

    return decorate


def update_job_next_run_in_at_least(
    app: Any, name: str, delta: dt.timedelta | float, *, run_now: bool = False
) -> JobRecord:
    """Move a job's next run to `now + delta` if that is earlier (never later). A pull-in asked for while
    the job runs is honoured when the run ends. `run_now` also wakes sleeping beats (PostgreSQL)."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"job name must not be empty, got {name!r}")
    if delta is None:
        raise ValueError("delta must be a timedelta or seconds, got None")
    parsed = parse_duration("delta", delta, dt.timedelta(0))
    assert parsed is not None
    return repository_for(app).update_job_next_run_in_at_least(name, parsed, run_now=run_now)
