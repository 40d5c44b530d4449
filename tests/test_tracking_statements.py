"""The repository side of `celery_dbsched.tracking`: a tracked plain task's start and end, and the worker's
heartbeat, each one statement (on both databases; `repository` runs each test on SQLite and PostgreSQL)."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import select

from celery_dbsched import InvalidRunState, JobRepository, RunNotFound, RunRecord
from celery_dbsched.clock import TestClock
from celery_dbsched.job import JobDefinition
from celery_dbsched.schema import server_table
from celery_dbsched.states import JobKind

HOUR = dt.timedelta(hours=1)


def dispatched(repository: JobRepository, name: str = "entry") -> RunRecord:
    repository.define_job(JobDefinition(name=name, description=name, kind=JobKind.TASK, task="proj.t", every=HOUR))
    [run] = [run for run in repository.claim_runs("beat-1", 10).runs if run.job_name == name]
    return repository.dispatch_run(run.id)


def test_a_tracked_task_runs_then_completes(repository: JobRepository) -> None:
    run = dispatched(repository)
    started = repository.track_start(run.id, "worker-1", "task-1")
    assert (started.status, started.worker, started.task_id, started.end_time) == (
        "running",
        "worker-1",
        "task-1",
        None,
    )
    assert started.slot == -run.id  # holds no slot
    assert started.start_time is not None and started.start_time == started.update_time
    ended = repository.track_end(run.id)
    assert ended.status == "completed" and ended.error is None
    assert ended.end_time is not None and ended.end_time >= started.start_time
    assert repository.lookup_run(run.id) == ended


def test_a_tracked_task_that_raised_fails_with_its_error(repository: JobRepository) -> None:
    run = dispatched(repository)
    repository.track_start(run.id, "worker-1", None)
    ended = repository.track_end(run.id, "Traceback ...\nValueError: bad \x00 byte" + "x" * 20_000)
    assert ended.status == "failed"
    assert ended.error is not None and ended.error.startswith("Traceback ...\nValueError: bad \\x00 byte")
    assert len(ended.error) == 10_000


def test_tracking_a_run_in_the_wrong_state_says_why(repository: JobRepository) -> None:
    run = dispatched(repository)
    with pytest.raises(InvalidRunState, match="is dispatched, not running"):
        repository.track_end(run.id)
    repository.track_start(run.id, "worker-1", None)
    with pytest.raises(InvalidRunState, match="is running, not dispatched"):
        repository.track_start(run.id, "worker-2", None)
    repository.track_end(run.id)
    with pytest.raises(InvalidRunState, match="is completed, not running"):
        repository.track_end(run.id, "late")
    with pytest.raises(RunNotFound):
        repository.track_start(run.id + 1000, "worker-1", None)
    with pytest.raises(RunNotFound):
        repository.track_end(run.id + 1000)
    assert repository.lookup_run(run.id).status == "completed"


def test_a_job_run_is_not_tracked_as_a_plain_task(repository: JobRepository) -> None:
    repository.upsert_job("job", "a @job", every=HOUR)
    [run] = repository.claim_runs("beat-1", 10).runs
    with pytest.raises(InvalidRunState):
        repository.track_start(run.id, "worker-1", None)
    assert repository.lookup_run(run.id).status == "queued"


def test_heartbeat_records_a_server_then_moves_its_last_seen(repository: JobRepository, clock: TestClock) -> None:
    def servers() -> list[tuple[object, ...]]:
        with repository.engine.begin() as conn:
            columns = ("id", "kind", "hostname", "pid", "start_time", "last_seen")
            rows = conn.execute(select(*(server_table.c[c] for c in columns)).order_by(server_table.c.id)).all()
        return [tuple(row) for row in rows]

    repository.heartbeat("worker@a", "worker", "host-a", 101)
    [(server_id, kind, hostname, pid, start_time, first_seen)] = servers()
    assert (server_id, kind, hostname, pid) == ("worker@a", "worker", "host-a", 101)
    assert start_time == first_seen
    clock.shift_to(dt.timedelta(seconds=30))
    repository.heartbeat("worker@a", "worker", "host-a", 101)
    repository.heartbeat("beat@b", "beat", "host-b", 7)
    [beat, worker] = servers()
    assert beat[:4] == ("beat@b", "beat", "host-b", 7)
    assert worker[:5] == ("worker@a", "worker", "host-a", 101, start_time)  # the same process: same start
    assert worker[5] - first_seen >= dt.timedelta(seconds=29)  # type: ignore[operator]
    repository.heartbeat("worker@a", "worker", "host-a", 202)  # restarted under the same node name
    [_, restarted] = servers()
    assert restarted[3] == 202 and restarted[4] == restarted[5] > start_time  # type: ignore[operator]
