"""The job model: what a user writes (a `Job` subclass or a decorated function) and what a run receives."""

from __future__ import annotations

import abc
import datetime as dt
import json
import threading
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import timing
from .errors import JobInterrupted
from .policy import POLICY_NAMES, JobPolicy
from .schedules import Schedule
from .schema import NAME_MAX_LENGTH, QUEUE_MAX_LENGTH
from .settings import parse_duration
from .states import InterruptReason, JobKind, Misfire, Origin

# The message options a plain task's job sends with its task (a beat_schedule entry's `options`, a runtime
# schedule's): send_task's keywords that a schedule may fix.
MESSAGE_OPTIONS = frozenset({
    "queue", "routing_key", "exchange", "priority", "expires", "headers", "serializer", "compression",
    "countdown", "eta", "time_limit", "soft_time_limit", "ignore_result", "shadow", "exchange_type",
})  # fmt: skip


@dataclass(frozen=True)
class JobStatus:
    """A run's progress: `completed` of `total` units of work."""

    completed: int
    total: int

    def __post_init__(self) -> None:
        for field_name in ("completed", "total"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"JobStatus.{field_name} must be an int, got {value!r}")
            if value < 0:
                raise ValueError(f"JobStatus.{field_name} must not be negative, got {value}")
            if value > 2**31 - 1:
                raise ValueError(f"JobStatus.{field_name} is too large: {value}")
        if self.completed > self.total:
            raise ValueError(f"JobStatus.completed ({self.completed}) is larger than total ({self.total})")


class JobContext:
    """What `Job.run()` receives: the run's identity, its cancellation and a way to report progress.

    Cancellation is cooperative (revoke cannot stop a thread): a job checks `cancelled`, calls
    `check_cancelled()`, or sleeps with `wait()`, which returns early once the run is interrupted.
    """

    def __init__(self, run_id: int, job_name: str) -> None:
        self.run_id = run_id
        self.job_name = job_name
        self.cancel_reason: str | None = None  # why, for people (the first cancel's)
        self.interrupt_reason: InterruptReason | None = None  # how its run ends if it is still ours to end
        self._cancelled = threading.Event()
        self._progress: JobStatus | None = None
        self.next_run_in: dt.timedelta | None = None  # set by function jobs from their return value

    def __repr__(self) -> str:
        return f"<JobContext run={self.run_id} job={self.job_name!r} cancelled={self.cancelled}>"

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def check_cancelled(self) -> None:
        """Raise `JobInterrupted` if the run was interrupted."""
        if self._cancelled.is_set():
            raise JobInterrupted(
                f"run {self.run_id} of job {self.job_name!r} was interrupted: {self.cancel_reason or 'cancelled'}"
            )

    def wait(self, seconds: float) -> bool:
        """Sleep up to `seconds`; return True (early) when the run is cancelled."""
        return self._cancelled.wait(max(0.0, seconds))

    def progress(self, completed: int, total: int) -> None:
        """Report progress (the monitor writes it to the database every monitor interval)."""
        self._progress = JobStatus(completed, total)

    @property
    def reported_progress(self) -> JobStatus | None:
        return self._progress

    def cancel(self, reason: str, interrupt: InterruptReason = InterruptReason.CANCELLED) -> None:
        """Interrupt the run (called by the worker's monitor and shutdown paths, not by jobs): `reason` is the
        text a job sees, `interrupt` the reason its run ends with. The first cancel's stand."""
        if self.cancel_reason is None:
            self.cancel_reason = reason
            self.interrupt_reason = interrupt
        self._cancelled.set()


class Job(abc.ABC):
    """A recurring job, as in Boundary's scheduler `Job` interface.

    Subclasses provide `name` and `description` (attributes or properties) and the three methods.
    `status()` is called from the worker's monitor thread while `run()` executes. Optional class
    attributes: `every` or `schedule` (seconds, a timedelta, or Celery's crontab/solar/schedule: the
    cadence used when `next_run_in()` returns None or raises), `timezone` (for crontabs; default the app's),
    `queue`, `interrupt_threshold`, and the policies `enabled`, `misfire`, `misfire_grace`, `max_active`,
    `retry_backoff`, `expires` (see `JobPolicy`).
    """

    name: str
    description: str
    every: dt.timedelta | None = None
    schedule: Any = None
    timezone: str | None = None
    queue: str | None = None
    interrupt_threshold: dt.timedelta | None = None
    enabled: bool = True
    misfire: str = Misfire.RUN_ONCE
    misfire_grace: dt.timedelta | None = None
    max_active: int = 1
    retry_backoff: tuple[dt.timedelta, dt.timedelta] | None = None
    expires: dt.timedelta | None = None

    @abc.abstractmethod
    def status(self) -> JobStatus:
        """The current progress of the running job."""

    @abc.abstractmethod
    def run(self, ctx: JobContext) -> None:
        """Do the work; return normally on success, raise on failure; honour `ctx` cancellation."""

    @abc.abstractmethod
    def next_run_in(self) -> dt.timedelta | None:
        """After a successful run: how long until the next one (zero: at once), counted from now; None:
        the next slot of `schedule`/`every` (a fixed cadence)."""


class FunctionJob(Job):
    """A job made by the `@job` decorator from `f(ctx) -> timedelta | None`."""

    def __init__(
        self,
        func: Callable[[JobContext], Any],
        *,
        name: str,
        description: str,
        every: dt.timedelta | None,
        queue: str | None,
        interrupt_threshold: dt.timedelta | None,
        schedule: Any = None,
        timezone: str | None = None,
        policy: JobPolicy | None = None,
    ) -> None:
        self.func = func
        self.name = name
        self.description = description
        self.every = every
        self.queue = queue
        self.interrupt_threshold = interrupt_threshold
        self.schedule = schedule
        self.timezone = timezone
        for attribute in POLICY_NAMES:  # read back like a Job subclass's attributes
            setattr(self, attribute, getattr(policy or JobPolicy(), attribute))
        self.__doc__ = func.__doc__
        self.__wrapped__ = func

    def __repr__(self) -> str:
        return f"<FunctionJob {self.name!r}>"

    def __call__(self, ctx: JobContext) -> Any:
        return self.func(ctx)

    def status(self) -> JobStatus:
        # Function jobs report through ctx.progress(); the runner reads that first.
        return JobStatus(0, 0)

    def run(self, ctx: JobContext) -> None:
        result = self.func(ctx)
        if result is not None:
            ctx.next_run_in = coerce_next_run_in(self.name, result)

    def next_run_in(self) -> dt.timedelta | None:
        return None  # the function's return value (ctx.next_run_in), else the schedule or `every`


def coerce_next_run_in(job_name: str, value: object) -> dt.timedelta:
    """A next-run delay from a job: a timedelta or seconds, zero or more."""
    if isinstance(value, bool) or not isinstance(value, (dt.timedelta, int, float)):
        raise ValueError(f"job {job_name!r}: next run delay must be a timedelta, got {value!r}")
    parsed = parse_duration(f"job {job_name!r} next run delay", value, dt.timedelta(0))
    assert parsed is not None
    return parsed


def validate_name(name: object) -> str:
    if not isinstance(name, str):
        raise ValueError(f"job name must be a string, got {type(name).__name__}")
    if not name.strip():
        raise ValueError(f"job name must not be empty or blank, got {name!r}")
    if len(name) > NAME_MAX_LENGTH:
        raise ValueError(f"job name is {len(name)} characters long; at most {NAME_MAX_LENGTH} are allowed")
    # Control characters (C0 and C1) and line separators would break log lines and the CLI's tables.
    if any(unicodedata.category(ch) in ("Cc", "Zl", "Zp") for ch in name):
        raise ValueError(f"job name must not contain control characters or line breaks: {name!r}")
    _check_encodable("job name", name)
    return name


def _check_encodable(what: str, text: str) -> None:
    """Lone surrogates cannot be stored (the drivers encode UTF-8): a clear ValueError, not a codec error."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} is not valid Unicode text (lone surrogate at position {exc.start})") from None


def validate_description(name: str, description: object) -> str:
    if not isinstance(description, str) or not description.strip():
        raise ValueError(f"job {name!r}: description must be a non-empty string, got {description!r}")
    if "\x00" in description:
        raise ValueError(f"job {name!r}: description must not contain NUL characters")
    _check_encodable(f"job {name!r}: description", description)
    return description


def validate_queue(name: str, queue: object) -> str | None:
    if queue is None:
        return None
    if not isinstance(queue, str) or not queue.strip():
        raise ValueError(f"job {name!r}: queue must be a non-empty string, got {queue!r}")
    if len(queue) > QUEUE_MAX_LENGTH:
        raise ValueError(f"job {name!r}: queue name is {len(queue)} characters long; at most {QUEUE_MAX_LENGTH}")
    return queue


@dataclass(frozen=True)
class JobDefinition:
    """Everything stored about a job except its state: what registration (code or beat_schedule) says."""

    name: str
    description: str
    kind: JobKind = JobKind.JOB
    schedule: Schedule | None = None
    every: dt.timedelta | None = None  # stored in the `default_next_run_in` column
    queue: str | None = None
    interrupt_threshold: dt.timedelta | None = None
    policy: JobPolicy = field(default_factory=JobPolicy)
    task: str | None = None
    task_args: tuple[Any, ...] = ()
    task_kwargs: Mapping[str, Any] = field(default_factory=dict)
    task_options: Mapping[str, Any] = field(default_factory=dict)
    # Who owns it (None: by its kind, code for "job", beat_schedule for "task"); runtime jobs say so.
    origin: Origin | None = None
    one_off: bool = False  # disabled once a run of it is claimed (django-celery-beat's one_off)
    expire_time: dt.datetime | None = None  # no slot after it is claimed (django-celery-beat's `expires`)

    def __post_init__(self) -> None:
        validate_name(self.name)
        validate_description(self.name, self.description)
        label = f"job {self.name!r}"
        if self.kind not in set(JobKind):
            raise ValueError(f"{label}: kind must be 'job' or 'task', got {self.kind!r}")
        object.__setattr__(self, "kind", JobKind(self.kind))  # as given (a str) or the member: stored as the member
        if self.origin is None:
            object.__setattr__(self, "origin", Origin.CODE if self.kind == JobKind.JOB else Origin.BEAT_SCHEDULE)
        elif self.origin not in set(Origin):
            raise ValueError(f"{label}: origin must be one of {', '.join(Origin)}, got {self.origin!r}")
        object.__setattr__(self, "origin", Origin(self.origin))
        if not isinstance(self.one_off, bool):
            raise ValueError(f"{label}: one_off must be True or False, got {self.one_off!r}")
        if self.expire_time is not None and (
            not isinstance(self.expire_time, dt.datetime) or self.expire_time.utcoffset() is None
        ):
            raise ValueError(f"{label}: expire_time must be an aware datetime, got {self.expire_time!r}")
        if self.kind == JobKind.TASK and (not isinstance(self.task, str) or not self.task.strip()):
            raise ValueError(f"{label}: a beat_schedule entry needs a task name, got {self.task!r}")
        if self.schedule is not None and not isinstance(self.schedule, Schedule):
            raise ValueError(f"{label}: schedule must be a Schedule, got {self.schedule!r}")
        if not isinstance(self.policy, JobPolicy):
            raise ValueError(f"{label}: policy must be a JobPolicy, got {self.policy!r}")
        self.policy.check(label)
        if self.policy.max_active > 1 and self.schedule is None and self.every is None:
            raise ValueError(f"{label}: max_active > 1 needs a schedule or `every`")
        for attribute in ("every", "interrupt_threshold"):
            value = getattr(self, attribute)
            if value is not None and (not isinstance(value, dt.timedelta) or value < dt.timedelta(0)):
                raise ValueError(f"{label}: {attribute} must be a non-negative timedelta, got {value!r}")
        validate_queue(self.name, self.queue)
        for attribute, kind in (("task_args", (tuple, list)), ("task_kwargs", Mapping), ("task_options", Mapping)):
            value = getattr(self, attribute)
            if not isinstance(value, kind):
                raise ValueError(f"{label}: {attribute} has the wrong type: {value!r}")
            try:
                json.dumps(list(value) if attribute == "task_args" else dict(value))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{label}: {attribute} must be JSON-serialisable ({exc})") from None

    @property
    def advances_at_claim(self) -> bool:
        """Runs that nobody waits for (plain tasks) or that may overlap move the schedule when claimed;
        other jobs are rescheduled when their run ends."""
        return timing.advances_at_claim(self.kind, self.policy.max_active)
