"""Registering jobs with an app: the `@job` decorator, `register_job`, and pulling a job's next run in.

Registration is recorded on the app at import time and written to the database (an upsert, design §8) when a
worker or beat starts, or at once when one is already running in this process: importing a module never
opens a connection. Registering a job also installs the worker side on the app (the wrapper task that runs
it and the bootstep), so that a worker of the app can run it.
"""

from __future__ import annotations

import datetime as dt
import inspect
import warnings
from collections.abc import Callable
from typing import Any

from .binding import repository_for
from .errors import NoCadenceWarning
from .job import FunctionJob, Job, JobContext, validate_description, validate_name
from .policy import POLICY_NAMES, JobPolicy
from .records import JobRecord
from .registry import app_timezone, definition_of, registry_for
from .settings import parse_duration
from .states import Misfire


def register_job(
    app: Any,
    job: Job,
    *,
    first_run_in: dt.timedelta | float | None = None,
    next_run_in: dt.timedelta | float | None = None,
) -> Job:
    """Register a `Job` instance; its first run is due `first_run_in` after it is first stored (None: now for
    intervals, the first slot for crontabs). Registering again updates its description and settings, never
    its next run. `next_run_in` is the deprecated name of `first_run_in`."""
    if not isinstance(job, Job):
        raise TypeError(f"expected a celery_dbsched.Job instance, got {job!r}")
    definition_of(job, app_timezone(app))  # validates now, at registration, not when a worker starts
    first = _first_run_in(f"job {job.name!r} ", first_run_in, next_run_in)
    # Deferred: importing the package must not load the worker side (a worker that only runs the plain
    # tasks of beat_schedule entries never does).
    from .worker import install_worker

    install_worker(app)
    registry_for(app).add(job, first)
    return job


def job(
    app: Any,
    *,
    name: str | None = None,
    description: str | None = None,
    every: dt.timedelta | float | None = None,
    schedule: Any = None,
    timezone: str | None = None,
    first_run_in: dt.timedelta | float | None = None,
    queue: str | None = None,
    interrupt_threshold: dt.timedelta | float | None = None,
    enabled: bool = True,
    misfire: str = Misfire.RUN_ONCE,
    misfire_grace: dt.timedelta | float | None = None,
    max_active: int = 1,
    retry_backoff: Any = None,
    expires: dt.timedelta | float | None = None,
    next_run_in: dt.timedelta | float | None = None,
) -> Callable[[Callable[[JobContext], Any]], FunctionJob]:
    """Decorator: `f(ctx) -> timedelta | None` becomes a registered job.

    The name defaults to the function's dotted path, the description to its docstring's first line. The
    returned delay, when not None, is the next run in (counted from completion); otherwise the next slot of
    `every` or `schedule` (a fixed cadence: a job due at T is next due at T + every). `first_run_in` is the
    delay before the very first run (`next_run_in`: its deprecated name). Policies: see README.
    """
    if not hasattr(app, "conf"):  # `@job` without parentheses passes the function as the app
        raise TypeError(
            f"job() takes the Celery app first, got {app!r}: write @job(app, every=...) above the function, "
            "not a bare @job"
        )
    arguments = locals()
    policies = {key: arguments[key] for key in POLICY_NAMES}  # the policy keywords, parsed by JobPolicy
    every_delta = parse_duration("every", every, None)
    threshold = parse_duration("interrupt_threshold", interrupt_threshold, None)
    first = _first_run_in("", first_run_in, next_run_in)

    def decorate(func: Callable[[JobContext], Any]) -> FunctionJob:
        if not callable(func):
            raise TypeError(f"@job decorates a function, got {func!r}")
        job_name = name if name is not None else f"{func.__module__}.{func.__qualname__}"
        doc = inspect.getdoc(func)
        job_description = description if description is not None else (doc.splitlines()[0] if doc else None)
        if not job_description:
            raise ValueError(f"job {job_name!r}: give description= or a docstring")
        policy = JobPolicy.parse(f"job {job_name!r}", policies)
        if every_delta is None and schedule is None:
            warnings.warn(
                f"job {job_name!r} has neither every= nor schedule=: after a run whose function returns no delay "
                "it runs again only after the retry backoff's cap (dbsched_retry_backoff, 1 hour by default); "
                "give every= or schedule=",
                NoCadenceWarning,
                stacklevel=2,
            )
        function_job = FunctionJob(
            func,
            name=validate_name(job_name),
            description=validate_description(job_name, job_description),
            every=every_delta,
            queue=queue,
            interrupt_threshold=threshold,
            schedule=schedule,
            timezone=timezone,
            policy=policy,
        )
        register_job(app, function_job, first_run_in=first)
        return function_job

    return decorate


def _first_run_in(
    label: str, first_run_in: dt.timedelta | float | None, next_run_in: dt.timedelta | float | None
) -> dt.timedelta | None:
    """The delay before a new job's first run, from `first_run_in` or its old name `next_run_in` (deprecated:
    `next_run_in` is the delay after a run, `Job.next_run_in()`); ValueError naming the keyword given."""
    key, value = "first_run_in", first_run_in
    if next_run_in is not None:
        warnings.warn(
            "next_run_in= (the delay before a job's first run) is deprecated; use first_run_in=",
            DeprecationWarning,
            stacklevel=3,
        )
        if first_run_in is not None:
            raise TypeError("give first_run_in= only, not next_run_in= as well")
        key, value = "next_run_in", next_run_in
    return parse_duration(f"{label}{key}", value, None, zero_is_default=False)


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
