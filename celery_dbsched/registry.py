"""The jobs an app knows: its `JobRegistry`, and what is stored for a job (`definition_of`).

The registry is filled at import time (see `registration`) and written to the database (an upsert, design §8)
when a worker or beat starts, or at once when one is already running in this process: importing a module never
opens a connection.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Iterator
from typing import Any

from .errors import NameTaken
from .job import Job, JobDefinition, validate_name
from .policy import POLICY_NAMES, JobPolicy
from .records import JobRecord
from .repository import JobRepository
from .schedules import IntervalSchedule, parse_timezone, schedule_from
from .settings import parse_duration
from .states import Origin

logger = logging.getLogger(__name__)

_REGISTRY_ATTRIBUTE = "_dbsched_registry"


class JobRegistry:
    """The jobs an app knows, by name; what a worker can run."""

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        self._first_run_in: dict[str, dt.timedelta | None] = {}
        self._lock = threading.Lock()
        self._repository: JobRepository | None = None
        self.app: Any = None  # its `conf.timezone` is read when a job is stored, not when it is declared
        self.timezone = "UTC"  # for crontabs without their own zone, when there is no app

    def __contains__(self, name: object) -> bool:
        return name in self._jobs

    def __iter__(self) -> Iterator[Job]:
        return iter(list(self._jobs.values()))

    def __len__(self) -> int:
        return len(self._jobs)

    def get(self, name: str) -> Job | None:
        return self._jobs.get(name)

    def add(self, job: Job, first_run_in: dt.timedelta | None = None) -> None:
        with self._lock:
            self._jobs[job.name] = job
            self._first_run_in[job.name] = first_run_in
            repository = self._repository
        if repository is not None:
            self._upsert(repository, job)

    def _upsert(self, repository: JobRepository, job: Job) -> JobRecord:
        return repository.define_job(self.definition(job), first_run_in=self._first_run_in.get(job.name))

    def definition(self, job: Job) -> JobDefinition:
        return definition_of(job, self.timezone if self.app is None else app_timezone(self.app))

    def sync(self, repository: JobRepository) -> None:
        """Store every registered job (one read when none changed; bounded bulk writes for those that did);
        from now on `add` writes through."""
        with self._lock:
            self._repository = repository
            jobs = list(self._jobs.values())
            first_run_in = dict(self._first_run_in)
        result = repository.sync_jobs([self.definition(job) for job in jobs], first_run_in=first_run_in)
        for name in result.refused:
            logger.error("celery_dbsched: %s", NameTaken(name, Origin.RUNTIME, Origin.CODE))

    def detach(self) -> None:
        with self._lock:
            self._repository = None


def registry_for(app: Any) -> JobRegistry:
    """The app's job registry, made at the first call (installs nothing: see `registration`)."""
    registry: JobRegistry | None = app.__dict__.get(_REGISTRY_ATTRIBUTE)
    if registry is None:
        registry = JobRegistry()
        registry.app = app
        setattr(app, _REGISTRY_ATTRIBUTE, registry)
    return registry


def existing_registry(app: Any) -> JobRegistry | None:
    """The app's registry if any job was registered on it (without making one)."""
    registry: JobRegistry | None = app.__dict__.get(_REGISTRY_ATTRIBUTE)
    return registry


def app_timezone(app: Any) -> str:
    """The zone crontabs follow by default: `app.conf.timezone`, else UTC."""
    configured = app.conf.timezone
    if not configured:
        return "UTC"
    return parse_timezone(configured).key


def definition_of(job: Job, timezone: str = "UTC") -> JobDefinition:
    """What is stored for a `Job`: its attributes, validated (ValueError naming the job and attribute)."""
    name = validate_name(getattr(job, "name", None))
    label = f"job {name!r}"
    schedule_value = getattr(job, "schedule", None)
    every = getattr(job, "every", None)
    if schedule_value is not None and every is not None:
        raise ValueError(f"{label}: give `every` or `schedule`, not both")
    zone = getattr(job, "timezone", None) or timezone
    try:
        zone_name = parse_timezone(zone).key  # validated even when no crontab uses it yet
        schedule = schedule_from(schedule_value, timezone=zone_name) if schedule_value is not None else None
    except ValueError as exc:
        raise ValueError(f"{label}: {exc}") from None
    if every is not None:
        every = parse_duration(f"{label} every", every, None)
    if isinstance(schedule, IntervalSchedule) and every is None:
        every = dt.timedelta(seconds=schedule.seconds)
    policy = JobPolicy.parse(label, {key: getattr(job, key) for key in POLICY_NAMES if hasattr(job, key)})
    return JobDefinition(
        name=name,
        description=getattr(job, "description", None),  # type: ignore[arg-type]  # validated there
        schedule=schedule if schedule is not None else (IntervalSchedule(every.total_seconds()) if every else None),
        every=every,
        queue=getattr(job, "queue", None),
        interrupt_threshold=parse_duration(
            f"{label} interrupt_threshold", getattr(job, "interrupt_threshold", None), None
        ),
        policy=policy,
    )
