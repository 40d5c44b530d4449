"""Claiming runs on a `JobRepository` as a beat does, and claimed runs made without one."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import text

from celery_dbsched.binding import bind_repository
from celery_dbsched.clock import Clock
from celery_dbsched.records import RunRecord
from celery_dbsched.repository import JobRepository
from celery_dbsched.settings import Settings
from celery_dbsched.states import RunState


def claim(repository: JobRepository, server_id: str = "beat-1", limit: int = 1000) -> list[RunRecord]:
    return repository.claim_runs(server_id, limit).runs


def claim_one(repository: JobRepository, name: str, server_id: str = "beat-1") -> RunRecord:
    """The one run of job `name` claimed now (other due jobs are claimed too)."""
    runs = [run for run in claim(repository, server_id) if run.job_name == name]
    assert len(runs) == 1, f"expected to claim {name!r}, claimed {runs}"
    return runs[0]


def queued_run(
    run_id: int, job_name: str, slot: dt.datetime | None, claimed: dt.datetime, claimed_by: str = "beat-1"
) -> RunRecord:
    """A run as a beat's claim returns it (queued, for `slot`, claimed at `claimed`), without a database."""
    return RunRecord(
        id=run_id,
        job_name=job_name,
        status=RunState.QUEUED,
        queue=None,
        claimed_by=claimed_by,
        worker=None,
        task_id=None,
        completed=0,
        total=0,
        error=None,
        requested_next_run=None,
        create_time=claimed,
        start_time=None,
        update_time=claimed,
        end_time=None,
        scheduled_for=slot,
    )


def bind_clock(app: Any, clock: Clock) -> JobRepository:
    """Bind to `app`, in this process, a repository built from its settings on `clock`, the way the beat and
    the worker build theirs: the app's beat, worker and API then compute times with that clock.
    `forget_repository(app)` closes it."""
    repository = JobRepository.from_settings(Settings.from_mapping(app.conf), clock=clock)
    bind_repository(app, repository)
    return repository


def add_due_tasks(repository: JobRepository, count: int, *, options: str = "{}") -> None:
    """`count` plain tasks (as beat_schedule entries become), every hour, all due now: one statement."""
    values = ", ".join(
        f"('t{n:06d}', 'bulk', 'task', 'tasks.noop', '[{n}]', '{{}}', '{options}', 3600, :due, :now, :now)"
        for n in range(count)
    )
    now = repository.database_now()
    with repository.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO dbsched_job (name, description, kind, task, task_args, task_kwargs, task_options, "
                f"default_next_run_in, next_scheduled_run, create_time, update_time) VALUES {values}"
            ),
            {"due": now - dt.timedelta(seconds=1), "now": now},
        )
