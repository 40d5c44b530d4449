"""`runner.execute_run`: one run's life on a worker, driven directly against a repository (no Celery)."""

from __future__ import annotations

import datetime as dt
import logging
import pickle
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import pytest
from helpers.polling import wait_for
from helpers.repository import claim_one
from sqlalchemy import delete

from celery_dbsched import (
    DatabaseUnavailable,
    Job,
    JobContext,
    JobInterrupted,
    JobRepository,
    JobStatus,
    RunRecord,
    runner,
)
from celery_dbsched.clock import TestClock
from celery_dbsched.errors import JobNotRegistered
from celery_dbsched.job import FunctionJob
from celery_dbsched.runner import ProgressMonitor, active_run_ids, cancel_local_runs, execute_run
from celery_dbsched.schema import job_table
from celery_dbsched.states import InterruptReason

HOUR = dt.timedelta(hours=1)
MINUTE = dt.timedelta(minutes=1)
FAST = 0.05  # monitor interval for the threaded tests
DEADLINE = 15.0
POLL = 0.01  # the runs here finish in milliseconds


class Background:
    """`execute_run` in a thread, as a worker's pool would run it."""

    def __init__(self, target: Callable[[], RunRecord | None]) -> None:
        self.result: RunRecord | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, args=(target,), daemon=True)
        self._thread.start()

    def _main(self, target: Callable[[], RunRecord | None]) -> None:
        try:
            self.result = target()
        except BaseException as exc:
            self.error = exc

    def join(self) -> RunRecord | None:
        self._thread.join(timeout=DEADLINE)
        assert not self._thread.is_alive(), "execute_run did not return"
        if self.error is not None:
            raise self.error
        return self.result


class Recorder(Job):
    """A class-based job that records its calls; behaviour set per test."""

    def __init__(
        self,
        name: str = "recorder",
        *,
        every: dt.timedelta | None = None,
        next_run: dt.timedelta | Exception | object = HOUR,
        body: Callable[[Recorder, JobContext], None] | None = None,
    ) -> None:
        self.name = name
        self.description = f"the {name} job"
        self.every = every
        self._next_run = next_run
        self._body = body
        self.runs: list[JobContext] = []
        self.progress = JobStatus(0, 0)
        self.started = threading.Event()
        self.release = threading.Event()

    def status(self) -> JobStatus:
        return self.progress

    def run(self, ctx: JobContext) -> None:
        self.runs.append(ctx)
        self.started.set()
        if self._body is not None:
            self._body(self, ctx)

    def next_run_in(self) -> dt.timedelta:
        if isinstance(self._next_run, Exception):
            raise self._next_run
        return self._next_run  # type: ignore[return-value]


def register_and_claim(repository: JobRepository, job: Job, **kwargs: Any) -> RunRecord:
    """Register `job` (due now) and claim its run as a beat would."""
    repository.upsert_job(job.name, job.description, every=job.every, **kwargs)
    return claim_one(repository, job.name)


def execute(
    repository: JobRepository, jobs: dict[str, Job], run_id: int, *, monitor_interval: float = FAST, **kwargs: Any
) -> RunRecord | None:
    return execute_run(repository, jobs.get, run_id, "worker-1", monitor_interval=monitor_interval, **kwargs)


def delay_of(repository: JobRepository, run: RunRecord) -> dt.timedelta:
    assert run.end_time is not None
    return repository.lookup_job(run.job_name).next_scheduled_run - run.end_time


def assert_delay(repository: JobRepository, run: RunRecord, expected: dt.timedelta) -> None:
    assert abs(delay_of(repository, run) - expected) <= dt.timedelta(seconds=1), delay_of(repository, run)


# -- the happy path -------------------------------------------------------------------------------------------


def test_a_run_completes_and_schedules_the_next(repository: JobRepository) -> None:
    def body(job: Recorder, ctx: JobContext) -> None:
        job.progress = JobStatus(3, 3)

    job = Recorder(body=body, next_run=dt.timedelta(minutes=10))
    run = register_and_claim(repository, job)
    done = execute_run(repository, {job.name: job}.get, run.id, "worker-7", task_id="task-1", monitor_interval=FAST)
    assert done is not None
    assert done.status == "completed"
    assert (done.worker, done.task_id) == ("worker-7", "task-1")
    assert done.progress == JobStatus(3, 3)
    assert done.start_time is not None and done.end_time is not None
    assert len(job.runs) == 1
    assert (job.runs[0].run_id, job.runs[0].job_name) == (run.id, job.name)
    assert_delay(repository, done, dt.timedelta(minutes=10))
    assert repository.lookup_run(run.id) == done
    assert run.id not in active_run_ids()


def test_a_next_run_of_zero_makes_the_job_due_at_once(repository: JobRepository) -> None:
    job = Recorder(next_run=dt.timedelta(0))
    run = register_and_claim(repository, job)
    execute(repository, {job.name: job}, run.id)
    [again] = repository.claim_runs("beat-1", 10).runs
    assert again.job_name == job.name and again.id > run.id


def test_a_function_job_reports_progress_through_its_context(repository: JobRepository) -> None:
    def work(ctx: JobContext) -> None:
        ctx.progress(4, 7)

    job = FunctionJob(work, name="f", description="f", every=HOUR, queue=None, interrupt_threshold=None)
    run = register_and_claim(repository, job)
    done = execute(repository, {job.name: job}, run.id)
    assert done is not None and done.status == "completed"
    assert done.progress == JobStatus(4, 7)
    assert_delay(repository, done, HOUR)


def test_a_function_jobs_returned_delay_wins_over_every(repository: JobRepository) -> None:
    job = FunctionJob(
        lambda ctx: dt.timedelta(minutes=3), name="f", description="f", every=HOUR, queue=None, interrupt_threshold=None
    )
    run = register_and_claim(repository, job)
    done = execute(repository, {job.name: job}, run.id)
    assert done is not None and done.status == "completed"
    assert_delay(repository, done, dt.timedelta(minutes=3))


def test_a_function_job_returning_none_runs_again_after_every(repository: JobRepository) -> None:
    job = FunctionJob(lambda ctx: None, name="f", description="f", every=MINUTE, queue=None, interrupt_threshold=None)
    run = register_and_claim(repository, job)
    done = execute(repository, {job.name: job}, run.id)
    assert done is not None
    assert_delay(repository, done, MINUTE)


# -- next_run_in() failing (design §6) ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "next_run",
    [
        pytest.param(RuntimeError("no idea"), id="raises"),
        pytest.param("in an hour", id="not-a-timedelta"),
        pytest.param(dt.timedelta(seconds=-5), id="negative"),
    ],
)
def test_a_failing_next_run_in_falls_back_to_every(repository: JobRepository, next_run: Any) -> None:
    job = Recorder(every=dt.timedelta(minutes=7), next_run=next_run)
    run = register_and_claim(repository, job)
    done = execute(repository, {job.name: job}, run.id)
    assert done is not None and done.status == "completed"
    assert_delay(repository, done, dt.timedelta(minutes=7))


@pytest.mark.settings(retry_backoff=(dt.timedelta(seconds=5), dt.timedelta(minutes=11)))
def test_a_failing_next_run_in_without_every_uses_the_backoff_cap(repository: JobRepository) -> None:
    job = Recorder(next_run=RuntimeError("no idea"))
    run = register_and_claim(repository, job)
    done = execute(repository, {job.name: job}, run.id)
    assert done is not None and done.status == "completed"
    assert_delay(repository, done, dt.timedelta(minutes=11))


@pytest.mark.settings(retry_backoff=(dt.timedelta(seconds=5), dt.timedelta(minutes=13)))
def test_a_function_job_without_every_returning_none_uses_the_backoff_cap(repository: JobRepository) -> None:
    job = FunctionJob(lambda ctx: None, name="f", description="f", every=None, queue=None, interrupt_threshold=None)
    run = register_and_claim(repository, job)
    done = execute(repository, {job.name: job}, run.id)
    assert done is not None and done.status == "completed"
    assert_delay(repository, done, dt.timedelta(minutes=13))


# -- failures (design §7) --------------------------------------------------------------------------------------


def test_a_job_the_worker_does_not_know_fails_the_run_saying_so(repository: JobRepository) -> None:
    job = Recorder(name="elsewhere")
    run = register_and_claim(repository, job)
    done = execute(repository, {}, run.id)
    assert done is not None
    assert done.status == "failed"
    assert done.error is not None
    assert "'elsewhere'" in done.error and "'worker-1'" in done.error and "not registered" in done.error
    assert repository.lookup_job("elsewhere").failure_count == 1


@pytest.mark.settings(retry_backoff=(dt.timedelta(seconds=20), HOUR))
def test_a_failing_job_ends_failed_with_its_traceback_and_final_progress(repository: JobRepository) -> None:

    def explode_halfway(job: Recorder, ctx: JobContext) -> None:
        job.progress = JobStatus(2, 5)
        raise RuntimeError("boom at item 3")

    job = Recorder(body=explode_halfway)
    run = register_and_claim(repository, job)
    done = execute(repository, {job.name: job}, run.id)
    assert done is not None
    assert done.status == "failed"
    assert done.error is not None
    assert done.error.startswith("Traceback (most recent call last):")
    assert "explode_halfway" in done.error
    assert done.error.endswith("RuntimeError: boom at item 3")
    assert done.progress == JobStatus(2, 5)
    assert repository.lookup_run(run.id).progress == JobStatus(2, 5)
    assert repository.lookup_job(job.name).failure_count == 1
    assert_delay(repository, done, dt.timedelta(seconds=20))


def test_a_failure_is_logged_once_with_its_traceback_and_names_the_run(
    repository: JobRepository, caplog: pytest.LogCaptureFixture
) -> None:
    def explode(job: Recorder, ctx: JobContext) -> None:
        raise RuntimeError("boom")

    job = Recorder(body=explode)
    run = register_and_claim(repository, job)
    caplog.set_level(logging.INFO, logger="celery_dbsched")
    done = execute(repository, {job.name: job}, run.id)
    assert done is not None and done.status == "failed"
    [failure] = [r for r in caplog.records if r.exc_info]
    assert failure.levelno == logging.ERROR and failure.exc_info is not None and failure.exc_info[0] is RuntimeError
    assert failure.getMessage() == f"{done.label()} failed: boom"
    assert done.scheduled_for is not None
    assert done.label() == f"run {done.id} of job 'recorder' (slot {done.scheduled_for:%Y-%m-%d %H:%M:%S} UTC)"


def test_with_raise_failure_the_failure_is_raised_once_recorded(
    repository: JobRepository, caplog: pytest.LogCaptureFixture
) -> None:
    """The worker's task: the job's own exception fails the task (Celery logs its traceback, not us)."""

    def explode(job: Recorder, ctx: JobContext) -> None:
        raise KeyError("item 3")

    job = Recorder(body=explode)
    run = register_and_claim(repository, job)
    caplog.set_level(logging.INFO, logger="celery_dbsched")
    with pytest.raises(KeyError, match="item 3") as raised:
        execute(repository, {job.name: job}, run.id, raise_failure=True)
    assert any(frame.name == "explode" for frame in traceback.extract_tb(raised.tb))
    recorded = repository.lookup_run(run.id)
    assert recorded.status == "failed" and "KeyError: 'item 3'" in (recorded.error or "")
    assert repository.lookup_job(job.name).failure_count == 1
    assert not any(r.exc_info for r in caplog.records)
    assert f"{recorded.label()} failed: 'item 3'; its task fails with it" in caplog.text

    # A job this worker does not have: JobNotRegistered, picklable (a prefork child sends it to its parent).
    unknown = register_and_claim(repository, Recorder(name="elsewhere"))
    with pytest.raises(JobNotRegistered) as not_here:
        execute(repository, {}, unknown.id, raise_failure=True)
    assert repository.lookup_run(unknown.id).error == str(not_here.value)
    again = pickle.loads(pickle.dumps(not_here.value))
    assert (
        str(again)
        == str(not_here.value)
        == (
            "job 'elsewhere' is not registered on worker 'worker-1'; import the module that registers it on this "
            "worker, or route the job's queue to workers that do"
        )
    )

    # An interrupted run is not raised.
    def stop(job: Recorder, ctx: JobContext) -> None:
        raise JobInterrupted("asked to stop")

    stopping = Recorder(name="stops", body=stop)
    stopped = execute(
        repository, {stopping.name: stopping}, register_and_claim(repository, stopping).id, raise_failure=True
    )
    assert stopped is not None and stopped.status == "interrupted"


def test_a_job_failing_with_a_nul_in_its_message_ends_failed(repository: JobRepository) -> None:
    def binary_garbage(job: Recorder, ctx: JobContext) -> None:
        raise ValueError("cannot parse b'\\x00' -> \x00")

    job = Recorder(body=binary_garbage)
    run = register_and_claim(repository, job)
    done = execute(repository, {job.name: job}, run.id)
    assert done is not None and done.status == "failed"
    assert done.error is not None and "ValueError: cannot parse" in done.error


def test_a_failing_function_job_keeps_its_reported_progress(repository: JobRepository) -> None:
    def work(ctx: JobContext) -> None:
        ctx.progress(1, 4)
        raise ValueError("bad row")

    job = FunctionJob(work, name="f", description="f", every=None, queue=None, interrupt_threshold=None)
    run = register_and_claim(repository, job)
    done = execute(repository, {job.name: job}, run.id)
    assert done is not None and done.status == "failed"
    assert done.progress == JobStatus(1, 4)
    assert done.error is not None and "ValueError: bad row" in done.error


def test_a_status_that_misbehaves_does_not_fail_the_run(repository: JobRepository) -> None:
    class BrokenStatus(Recorder):
        def status(self) -> JobStatus:
            raise RuntimeError("status broke")

    class WrongStatus(Recorder):
        def status(self) -> JobStatus:
            return (1, 2)  # type: ignore[return-value]

    for job in (BrokenStatus(name="broken"), WrongStatus(name="wrong")):
        run = register_and_claim(repository, job)
        done = execute(repository, {job.name: job}, run.id)
        assert done is not None and done.status == "completed", job.name
        assert done.progress == JobStatus(0, 0)


def test_finishing_survives_a_short_database_outage(repository: JobRepository, monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr(runner.time, "sleep", sleeps.append)  # type: ignore[attr-defined]
    real_complete = repository.complete_run
    failures = iter([DatabaseUnavailable("down"), DatabaseUnavailable("still down")])

    def flaky_complete(*args: Any, **kwargs: Any) -> RunRecord:
        error = next(failures, None)
        if error is not None:
            raise error
        return real_complete(*args, **kwargs)

    monkeypatch.setattr(repository, "complete_run", flaky_complete)
    job = Recorder()
    run = register_and_claim(repository, job)
    done = execute(repository, {job.name: job}, run.id, monitor_interval=60)
    assert done is not None and done.status == "completed"
    assert sleeps == [0.5, 1.0]


def _answer_lost(action: Callable[..., RunRecord]) -> Callable[..., RunRecord]:
    """`action` whose first call is committed but its answer lost (the connection cut before the reply: a network
    black hole, issue 15): it raises DatabaseUnavailable after the write; later calls are the real thing."""
    calls = [0]

    def lost(*args: Any, **kwargs: Any) -> RunRecord:
        calls[0] += 1
        result = action(*args, **kwargs)
        if calls[0] == 1:
            raise DatabaseUnavailable("database unavailable: no answer from the database server for 5s")
        return result

    return lost


def test_a_finish_committed_but_unanswered_is_the_runs_outcome(
    repository: JobRepository, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The retry finds the run completed by its first attempt: that is the outcome (returned, the run kept as it
    was), not a run "ended before the job did" whose result is discarded."""
    monkeypatch.setattr(runner.time, "sleep", lambda seconds: None)  # type: ignore[attr-defined]
    monkeypatch.setattr(repository, "complete_run", _answer_lost(repository.complete_run))
    job = Recorder()
    run = register_and_claim(repository, job)
    caplog.set_level(logging.INFO, logger="celery_dbsched")
    done = execute(repository, {job.name: job}, run.id, monitor_interval=60)
    assert done is not None and done.status == "completed"
    assert done == repository.lookup_run(run.id)
    assert "the finish had been committed" in caplog.text and "ended before the job did" not in caplog.text
    assert repository.run_stopped_time(run.id) is None  # not a run ended under its code


def test_a_failure_committed_but_unanswered_still_fails_the_task(
    repository: JobRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner.time, "sleep", lambda seconds: None)  # type: ignore[attr-defined]
    monkeypatch.setattr(repository, "fail_run", _answer_lost(repository.fail_run))

    def explode(job: Recorder, ctx: JobContext) -> None:
        raise KeyError("item 3")

    job = Recorder(body=explode)
    run = register_and_claim(repository, job)
    with pytest.raises(KeyError, match="item 3"):
        execute(repository, {job.name: job}, run.id, raise_failure=True, monitor_interval=60)
    recorded = repository.lookup_run(run.id)
    assert recorded.status == "failed" and "KeyError: 'item 3'" in (recorded.error or "")
    assert repository.lookup_job(job.name).failure_count == 1


def _down_for(count: int, action: Callable[..., RunRecord]) -> Callable[..., RunRecord]:
    failures = iter([DatabaseUnavailable("database unavailable: connection refused")] * count)

    def flaky(*args: Any, **kwargs: Any) -> RunRecord:
        error = next(failures, None)
        if error is not None:
            raise error
        return action(*args, **kwargs)

    return flaky


def test_starting_and_finishing_wait_out_a_30s_outage(
    repository: JobRepository, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 4, scenario 5: a run whose message arrives while the database is down starts when it is back,
    and a job that ends during the outage is completed then, not left `running` to be interrupted as stalled
    at the threshold (the retries used to give up after ~15 s). Said once at WARNING."""
    sleeps: list[float] = []
    monkeypatch.setattr(runner.time, "sleep", sleeps.append)  # type: ignore[attr-defined]
    monkeypatch.setattr(repository, "start_run", _down_for(10, repository.start_run))
    monkeypatch.setattr(repository, "complete_run", _down_for(10, repository.complete_run))
    job = Recorder()
    run = register_and_claim(repository, job)
    with caplog.at_level("DEBUG", logger="celery_dbsched.runner"):
        done = execute(repository, {job.name: job}, run.id, monitor_interval=60)
    assert done is not None and done.status == "completed"
    assert len(job.runs) == 1
    # Waits double up to MAX_RETRY_DELAY: the write lands within that long of the database's return.
    assert sleeps == 2 * [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0]
    assert sum(sleeps) / 2 >= 30
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "failed (" in r.getMessage()]
    assert len(warnings) == 2, warnings  # once for starting, once for completing
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]


@pytest.mark.usefixtures("shutdown_undone")
def test_retrying_gives_up_after_its_budget_and_at_shutdown(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(runner.time, "monotonic", lambda: clock[0])  # type: ignore[attr-defined]
    advance = lambda seconds: clock.__setitem__(0, clock[0] + seconds)  # noqa: E731
    monkeypatch.setattr(runner.time, "sleep", advance)  # type: ignore[attr-defined]
    calls: list[float] = []

    def down() -> None:
        calls.append(clock[0])
        raise DatabaseUnavailable("database unavailable: connection refused")

    with pytest.raises(DatabaseUnavailable):
        runner._retrying("writing", down, timeout=10)
    assert clock[0] - 1000.0 <= 10 and len(calls) >= 4  # 0.5 + 1 + 2 + 4 < 10
    calls.clear()
    runner.shutdown_waker.request()  # a warm shutdown is not held up by an outage
    with pytest.raises(DatabaseUnavailable):
        runner._retrying("writing", down, timeout=300)
    assert len(calls) == 1


# -- at most once (design §3) ---------------------------------------------------------------------------------


def test_a_second_delivery_of_a_run_is_dropped(repository: JobRepository) -> None:
    job = Recorder()
    run = register_and_claim(repository, job)
    first = execute(repository, {job.name: job}, run.id)
    assert first is not None and first.status == "completed"
    assert execute(repository, {job.name: job}, run.id) is None
    assert len(job.runs) == 1
    assert repository.lookup_run(run.id) == first


def test_a_delivery_while_the_run_is_running_is_dropped(repository: JobRepository) -> None:
    def hold(job: Recorder, ctx: JobContext) -> None:
        assert job.release.wait(DEADLINE)

    job = Recorder(body=hold)
    run = register_and_claim(repository, job)
    first = Background(lambda: execute(repository, {job.name: job}, run.id))
    assert job.started.wait(DEADLINE)
    assert execute_run(repository, {job.name: job}.get, run.id, "worker-2", monitor_interval=FAST) is None
    job.release.set()
    done = first.join()
    assert done is not None and done.status == "completed" and done.worker == "worker-1"
    assert len(job.runs) == 1


def test_a_message_for_an_unknown_or_ended_run_is_dropped(repository: JobRepository) -> None:
    job = Recorder()
    assert execute(repository, {job.name: job}, 987654) is None
    run = register_and_claim(repository, job)
    repository.interrupt_run(run.id, InterruptReason.STALLED, "no worker started it")
    assert execute(repository, {job.name: job}, run.id) is None
    assert job.runs == []


# -- the progress monitor (design §5) -------------------------------------------------------------------------


def test_the_monitor_writes_progress_while_the_job_runs(repository: JobRepository) -> None:
    seen: list[tuple[int, int]] = []

    def steps(job: Recorder, ctx: JobContext) -> None:
        for done in range(1, 4):
            job.progress = JobStatus(done, 3)
            stored = wait_for(
                lambda: (run := repository.lookup_run(ctx.run_id)).progress == job.progress and run,
                DEADLINE,
                interval=POLL,
                message=f"progress {done}/3 in the database",
            )
            seen.append((stored.completed, stored.total))

    job = Recorder(body=steps)
    run = register_and_claim(repository, job)
    done = execute(repository, {job.name: job}, run.id)
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert done is not None and done.status == "completed"


def test_the_monitor_cancels_the_job_when_its_run_is_interrupted(database: Any) -> None:
    worker_repository = database.migrated_repository()
    six_minutes_on = TestClock(offset=dt.timedelta(minutes=6))  # past the interrupt threshold
    beat_repository = database.repository(clock=six_minutes_on)  # another process's view: its own engine

    def wait_to_be_cancelled(job: Recorder, ctx: JobContext) -> None:
        if ctx.wait(DEADLINE):
            ctx.check_cancelled()

    job = Recorder(body=wait_to_be_cancelled)
    run = register_and_claim(worker_repository, job)
    background = Background(lambda: execute(worker_repository, {job.name: job}, run.id))
    assert job.started.wait(DEADLINE)
    # A beat's monitor finds the run stalled (its clock is past the threshold) and interrupts it.
    [stalled] = beat_repository.interrupt_runs()
    assert stalled.id == run.id
    done = background.join()
    ctx = job.runs[0]
    assert ctx.cancelled
    assert ctx.cancel_reason is not None and "interrupted" in ctx.cancel_reason
    assert done is not None and done.status == "interrupted"
    assert done.error == stalled.error  # the interruption's reason stands
    assert worker_repository.lookup_run(run.id).status == "interrupted"


def test_a_job_that_ignores_cancellation_cannot_complete_an_interrupted_run(repository: JobRepository) -> None:
    def ignore_and_return(job: Recorder, ctx: JobContext) -> None:
        ctx.wait(DEADLINE)  # returns early; the job then returns as if it had finished

    job = Recorder(body=ignore_and_return, next_run=dt.timedelta(0))
    run = register_and_claim(repository, job)
    scheduled = repository.lookup_job(job.name).next_scheduled_run
    background = Background(lambda: execute(repository, {job.name: job}, run.id))
    assert job.started.wait(DEADLINE)
    repository.interrupt_run(run.id, InterruptReason.CANCELLED, "by an operator")
    done = background.join()
    assert done is not None and done.status == "interrupted"
    assert done.error == "cancelled: by an operator"
    assert repository.lookup_job(job.name).next_scheduled_run == scheduled  # not rescheduled by a completion


def test_a_run_interrupted_between_monitor_checks_keeps_its_interruption(repository: JobRepository) -> None:
    """The job finishes before the monitor noticed: the completion is refused and the run stays interrupted."""

    def interrupted_meanwhile(job: Recorder, ctx: JobContext) -> None:
        repository.interrupt_run(ctx.run_id, InterruptReason.STALLED, "no progress")

    job = Recorder(body=interrupted_meanwhile)
    run = register_and_claim(repository, job)
    execute(repository, {job.name: job}, run.id, monitor_interval=600)
    stored = repository.lookup_run(run.id)
    assert stored.status == "interrupted"
    assert stored.error == "stalled: no progress"


def test_interrupting_one_run_cancels_only_that_job(repository: JobRepository) -> None:
    def wait_for_cancel_or_release(job: Recorder, ctx: JobContext) -> None:
        deadline = time.monotonic() + DEADLINE
        while not job.release.is_set() and time.monotonic() < deadline:
            if ctx.wait(0.01):
                ctx.check_cancelled()
        job.progress = JobStatus(1, 1)

    doomed = Recorder("doomed", body=wait_for_cancel_or_release)
    survivor = Recorder("survivor", body=wait_for_cancel_or_release)
    jobs: dict[str, Job] = {"doomed": doomed, "survivor": survivor}
    doomed_run = register_and_claim(repository, doomed)
    survivor_run = register_and_claim(repository, survivor)
    runs = {
        name: Background(lambda run_id=run.id: execute(repository, jobs, run_id))
        for name, run in (("doomed", doomed_run), ("survivor", survivor_run))
    }
    assert doomed.started.wait(DEADLINE) and survivor.started.wait(DEADLINE)
    repository.interrupt_run(doomed_run.id, InterruptReason.CANCELLED, "only this one")
    doomed_done = runs["doomed"].join()
    assert doomed_done is not None and doomed_done.status == "interrupted"
    # Several monitor intervals later the other job is still running, uncancelled.
    wait_for(
        lambda: repository.run_status(survivor_run.id) == "running",
        DEADLINE,
        interval=POLL,
        message="the survivor to keep running",
    )
    assert not survivor.runs[0].cancelled
    survivor.release.set()
    survivor_done = runs["survivor"].join()
    assert survivor_done is not None and survivor_done.status == "completed"
    assert survivor_done.progress == JobStatus(1, 1)
    assert not survivor.runs[0].cancelled


def test_a_job_raising_job_interrupted_by_itself_ends_interrupted(repository: JobRepository) -> None:
    def give_up(job: Recorder, ctx: JobContext) -> None:
        raise JobInterrupted("gave up")

    job = Recorder(body=give_up)
    run = register_and_claim(repository, job)
    done = execute(repository, {job.name: job}, run.id)
    assert done is not None and done.status == "interrupted"
    assert done.error == "cancelled"
    assert repository.lookup_job(job.name).failure_count == 0


def test_a_job_whose_run_disappears_ends_quietly(repository: JobRepository) -> None:
    """The job (and with it, by cascade, its runs) is deleted while a run executes."""

    def wait_to_be_cancelled(job: Recorder, ctx: JobContext) -> None:
        if ctx.wait(DEADLINE):
            ctx.check_cancelled()

    job = Recorder(body=wait_to_be_cancelled)
    run = register_and_claim(repository, job)
    background = Background(lambda: execute(repository, {job.name: job}, run.id))
    assert job.started.wait(DEADLINE)
    with repository.engine.begin() as conn:
        conn.execute(delete(job_table).where(job_table.c.name == job.name))
    assert background.join() is None
    assert job.runs[0].cancel_reason == "the run no longer exists"


# -- ProgressMonitor.check(), one pass at a time --------------------------------------------------------------


def running(repository: JobRepository, job: Job) -> RunRecord:
    return repository.start_run(register_and_claim(repository, job).id, "worker-1")


def test_monitor_check_writes_changed_progress_only(repository: JobRepository, clock: TestClock) -> None:
    job = Recorder()
    run = running(repository, job)
    ctx = JobContext(run.id, job.name)
    monitor = ProgressMonitor(repository, job, ctx, 60)
    monitor.check()
    assert repository.lookup_run(run.id).update_time == run.update_time
    clock.shift_to(dt.timedelta(seconds=30))
    job.progress = JobStatus(1, 2)
    monitor.check()
    stored = repository.lookup_run(run.id)
    assert stored.progress == JobStatus(1, 2)
    assert stored.update_time > run.update_time
    assert not ctx.cancelled


def test_monitor_check_prefers_the_contexts_progress(repository: JobRepository) -> None:
    job = Recorder()
    job.progress = JobStatus(1, 9)
    run = running(repository, job)
    ctx = JobContext(run.id, job.name)
    ctx.progress(5, 6)
    ProgressMonitor(repository, job, ctx, 60).check()
    assert repository.lookup_run(run.id).progress == JobStatus(5, 6)


@pytest.mark.parametrize("changed_progress", [False, True])
def test_monitor_check_cancels_an_interrupted_run(repository: JobRepository, changed_progress: bool) -> None:
    job = Recorder()
    run = running(repository, job)
    ctx = JobContext(run.id, job.name)
    monitor = ProgressMonitor(repository, job, ctx, 60)
    repository.interrupt_run(run.id, InterruptReason.STALLED, "no progress")
    if changed_progress:
        job.progress = JobStatus(1, 2)  # the write is refused: the run is no longer running
    monitor.check()
    assert ctx.cancelled
    assert ctx.cancel_reason == "run is interrupted (stalled: no progress)"
    assert repository.lookup_run(run.id).progress == JobStatus(0, 0)


def test_monitor_check_keeps_going_when_the_database_is_down(
    repository: JobRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = Recorder()
    run = running(repository, job)
    ctx = JobContext(run.id, job.name)
    monitor = ProgressMonitor(repository, job, ctx, 60)

    def down(*args: Any, **kwargs: Any) -> Any:
        raise DatabaseUnavailable("database unavailable: connection refused")

    monkeypatch.setattr(repository, "run_status", down)
    monkeypatch.setattr(repository, "update_progress", down)
    monitor.check()
    job.progress = JobStatus(1, 2)
    monitor.check()
    assert not ctx.cancelled
    monkeypatch.undo()
    monitor.check()  # back: the pending progress is written
    assert repository.lookup_run(run.id).progress == JobStatus(1, 2)


# -- shutdown (design §9) ---------------------------------------------------------------------------------------


@pytest.mark.usefixtures("shutdown_undone")
def test_cancel_local_runs_at_shutdown_ends_the_run_interrupted(repository: JobRepository) -> None:
    def wait_to_be_cancelled(job: Recorder, ctx: JobContext) -> None:
        job.progress = JobStatus(1, 10)
        if ctx.wait(DEADLINE):
            ctx.check_cancelled()

    job = Recorder(body=wait_to_be_cancelled)
    run = register_and_claim(repository, job)
    assert not runner.shutting_down()
    background = Background(lambda: execute(repository, {job.name: job}, run.id))
    wait_for(lambda: run.id in active_run_ids(), DEADLINE, interval=POLL, message="the run to be active")
    wait_for(
        lambda: repository.lookup_run(run.id).progress == JobStatus(1, 10),
        DEADLINE,
        interval=POLL,
        message="the progress to be written",
    )
    assert cancel_local_runs(InterruptReason.SHUTDOWN) >= 1
    assert runner.shutting_down()
    done = background.join()
    assert done is not None
    assert done.status == "interrupted"
    assert done.interrupt_reason is InterruptReason.SHUTDOWN
    assert done.error == "shutdown"
    assert done.progress == JobStatus(1, 10)  # the last progress written is kept
    assert job.runs[0].cancel_reason == "shutdown"
    assert run.id not in active_run_ids()
    # Due again at once for another worker: no failure, no backoff.
    assert repository.lookup_job(job.name).failure_count == 0
    assert [r.job_name for r in repository.claim_runs("beat-1", 10).runs] == [job.name]


def test_cancel_local_runs_for_another_reason_is_not_a_shutdown(repository: JobRepository) -> None:
    def wait_to_be_cancelled(job: Recorder, ctx: JobContext) -> None:
        ctx.wait(DEADLINE)

    job = Recorder(body=wait_to_be_cancelled)
    run = register_and_claim(repository, job)
    background = Background(lambda: execute(repository, {job.name: job}, run.id))
    wait_for(lambda: run.id in active_run_ids(), DEADLINE, interval=POLL, message="the run to be active")
    assert cancel_local_runs(InterruptReason.CANCELLED, "operator asked") >= 1
    assert not runner.shutting_down()
    done = background.join()
    assert done is not None and done.status == "interrupted"
    assert done.interrupt_reason is InterruptReason.CANCELLED
    assert done.error == "cancelled: operator asked"
    assert job.runs[0].cancel_reason == "operator asked"


@pytest.mark.usefixtures("shutdown_undone")
def test_cancel_local_runs_without_runs() -> None:
    assert cancel_local_runs(InterruptReason.SHUTDOWN) == 0
    assert runner.shutting_down()
