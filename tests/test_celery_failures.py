"""Job failures and refused messages as Celery reports them, on a real (embedded) Celery worker.

What Sentry's Celery integration, Flower and `task_failure` alerting see: a run that fails is a Celery task
that fails (FAILURE, `task_failure` with the job's own exception and traceback, the traceback logged at ERROR
once), while the retry stays the job's backoff (the message is acknowledged, never redelivered); a run's task
shows under its job's name; an interrupted run is no failure. With `celery_dbsched.tracking` loaded, a plain
task that the worker does not have ends its run `failed`, naming the task and the worker.
"""

from __future__ import annotations

import collections
import datetime as dt
import json
import logging
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from celery import Celery, signals
from helpers.apps import memory_app, next_message
from helpers.polling import wait_for
from helpers.services import RABBITMQ_URL, Database, require_service

import celery_dbsched.tracking  # noqa: F401 - the tracking signals, as a worker loads them
from celery_dbsched import JobContext, job
from celery_dbsched.binding import forget_repository, repository_for
from celery_dbsched.errors import JobInterrupted, JobNotRegistered
from celery_dbsched.protocol import RUN_ID_HEADER, RUN_TASK_NAME
from celery_dbsched.records import RunRecord
from celery_dbsched.registry import registry_for
from celery_dbsched.runner import cancel_local_runs
from celery_dbsched.scheduler import Scheduler
from celery_dbsched.states import InterruptReason

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("shutdown_undone")]  # the worker's stop: a shutdown

BACKOFF = [300, 600]  # no retry comes during a test


class ReportFailed(RuntimeError):
    """The job's own exception type (what Sentry groups by)."""


@dataclass
class Seen:
    """What the Celery signals said, by task id."""

    received: dict[str, str] = field(default_factory=dict)  # the task name the worker shows (Flower's)
    failures: dict[str, tuple[type[BaseException], str]] = field(default_factory=dict)  # exception, traceback
    successes: dict[str, Any] = field(default_factory=dict)
    prerun: collections.Counter[str] = field(default_factory=collections.Counter)
    retries: list[str] = field(default_factory=list)

    def on_received(self, request: Any = None, **kwargs: Any) -> None:
        self.received[request.id] = request.name

    def on_failure(self, task_id: str = "", exception: Any = None, traceback: Any = None, **kwargs: Any) -> None:
        # As Sentry's integration does: the exception and its traceback, at the signal.
        self.failures[task_id] = (type(exception), "".join(_format_tb(traceback)))

    def on_success(self, sender: Any = None, result: Any = None, **kwargs: Any) -> None:
        self.successes[sender.request.id] = result

    def on_prerun(self, task_id: str = "", **kwargs: Any) -> None:
        self.prerun[task_id] += 1

    def on_retry(self, request: Any = None, **kwargs: Any) -> None:
        self.retries.append(request.id)


def _format_tb(tb: Any) -> list[str]:
    return traceback.format_tb(tb) if tb is not None else []


@pytest.fixture
def seen() -> Iterator[Seen]:
    seen = Seen()
    connections = [
        (signals.task_received, seen.on_received),
        (signals.task_failure, seen.on_failure),
        (signals.task_success, seen.on_success),
        (signals.task_prerun, seen.on_prerun),
        (signals.task_retry, seen.on_retry),
    ]
    for signal, handler in connections:
        signal.connect(handler, weak=False)
    yield seen
    for signal, handler in connections:
        signal.disconnect(handler)


def _broker_conf(kind: str) -> dict[str, Any]:
    if kind == "memory":
        return {"broker_url": "memory://", "broker_transport_options": {"polling_interval": 0.05}}
    require_service(kind)
    return {"broker_url": RABBITMQ_URL, "broker_connection_retry_on_startup": True}


@pytest.fixture(params=["memory", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
def broker_conf(request: pytest.FixtureRequest) -> dict[str, Any]:
    return _broker_conf(request.param)


@pytest.fixture
def app(broker_conf: dict[str, Any], sqlite_database: Database) -> Iterator[Celery]:
    """An app with a result backend (so that task states are stored) and a plain task no worker has."""
    app = memory_app(
        sqlite_database.url,
        main="failures",
        result_backend="cache+memory://",
        worker_hijack_root_logger=False,  # keep pytest's log capture
        dbsched_retry_backoff=BACKOFF,
        beat_schedule={"nightly.missing": {"task": "proj.not_on_any_worker", "schedule": 3600.0}},
        **broker_conf,
    )

    @job(app, name="report.fails", description="raises its own error", first_run_in=0)
    def fails(ctx: JobContext) -> None:
        raise ReportFailed("the report server said no")

    @job(app, name="report.stops", description="stops itself", first_run_in=0)
    def stops(ctx: JobContext) -> None:
        raise JobInterrupted("asked to stop")

    @job(app, name="report.works", description="completes", first_run_in=0)
    def works(ctx: JobContext) -> None:
        return None

    yield app
    if broker_conf["broker_url"] != "memory://":
        with app.connection_for_write() as conn:
            conn.default_channel.queue_delete(app.conf.task_default_queue)
    registry_for(app).detach()
    forget_repository(app)


def _final(app: Celery, *names: str) -> dict[str, RunRecord] | None:
    runs = {run.job_name: run for run in repository_for(app).list_runs()}
    done = all(name in runs and runs[name].status not in ("queued", "running", "dispatched") for name in names)
    return runs if done else None


def test_a_failed_run_is_a_failed_celery_task_and_an_unknown_task_fails_its_run(
    app: Celery, seen: Seen, caplog: pytest.LogCaptureFixture
) -> None:
    from celery.contrib.testing.worker import start_worker

    caplog.set_level(logging.INFO)
    repository = repository_for(app)
    scheduler = Scheduler(app=app)
    # A job of this deployment that this worker has no code for (another service's, or not deployed yet).
    repository.upsert_job("report.elsewhere", "registered by another service", first_run_in=dt.timedelta(0))
    names = ("report.fails", "report.stops", "report.works", "report.elsewhere", "nightly.missing")
    try:
        with start_worker(app, pool="solo", perform_ping_check=False, loglevel="INFO", shutdown_timeout=10) as worker:
            scheduler.tick()
            runs = wait_for(lambda: _final(app, *names), 30, message="every run to end")
            failed, stopped, worked = runs["report.fails"], runs["report.stops"], runs["report.works"]
            elsewhere, missing = runs["report.elsewhere"], runs["nightly.missing"]
            wait_for(lambda: len(seen.failures) >= 2 and len(seen.successes) >= 2, 10, message="the task signals")

            # Redelivered or retried messages would run again: the next message is run after them.
            repository.update_job_next_run_in_at_least("report.works", dt.timedelta(0), run_now=True)
            scheduler.tick()
            wait_for(lambda: len(repository.list_runs(job_name="report.works", status="completed")) == 2, 20)
            worker_name = worker.hostname
    finally:
        scheduler.close()

    # The failed run: failed with its traceback, retried after the job's backoff, not by Celery.
    assert failed.status == "failed" and "ReportFailed: the report server said no" in (failed.error or "")
    assert repository.lookup_job("report.fails").failure_count == 1
    assert repository.lookup_job("report.fails").next_scheduled_run - repository.database_now() > dt.timedelta(
        seconds=BACKOFF[0] - 60
    )
    # ... and its task failed, as Sentry's integration and alerting on task_failure see it.
    exception_type, tb = seen.failures[failed.task_id or ""]
    assert exception_type is ReportFailed
    assert "raise ReportFailed" in tb and "in fails" in tb, tb
    assert app.AsyncResult(failed.task_id).state == "FAILURE"
    # The traceback is logged once, at ERROR (Celery's line, naming the job), and a line names the run.
    with_traceback = [r for r in caplog.records if r.exc_info and r.exc_info[0] is ReportFailed]
    assert len(with_traceback) == 1 and with_traceback[0].levelno == logging.ERROR
    assert f"Task report.fails[{failed.task_id}] raised unexpected" in with_traceback[0].getMessage()
    assert caplog.text.count("ReportFailed: the report server said no") == 1
    assert f"run {failed.id} of job 'report.fails' (slot " in caplog.text

    # The run of a job this worker does not have: failed, and so is its task. (An embedded worker's tasks
    # see the host's name as their worker, where `celery worker` gives its node name.)
    expected = f"job 'report.elsewhere' is not registered on worker '{elsewhere.worker}'"
    assert elsewhere.status == "failed" and expected in (elsewhere.error or "")
    assert seen.failures[elsewhere.task_id or ""][0] is JobNotRegistered
    assert app.AsyncResult(elsewhere.task_id).state == "FAILURE"

    # An interrupted run is no failure: its task ends normally, saying so.
    assert stopped.status == "interrupted" and stopped.task_id not in seen.failures
    assert seen.successes[stopped.task_id or ""] == "interrupted"
    assert seen.successes[worked.task_id or ""] == "completed"

    # Flower and the worker's log show each run's task under its job's name.
    for run in (failed, stopped, worked, elsewhere):
        assert seen.received[run.task_id or ""] == run.job_name

    # No message ran twice, nothing was retried by Celery.
    assert max(seen.prerun.values()) == 1 and seen.retries == []

    # The plain task no worker has: its run failed, naming the task and the worker.
    assert missing.status == "failed", missing
    assert missing.error is not None and missing.start_time is None
    assert f"task 'proj.not_on_any_worker' is not registered on worker '{worker_name}'" in missing.error
    assert missing.worker == worker_name


def test_a_run_sent_to_a_worker_without_any_job_fails_at_once(
    app: Celery, broker_conf: dict[str, Any], sqlite_database: Database
) -> None:
    """A worker whose app registers no job has no run task: Celery discards the run's message. With tracking
    loaded the run fails at once, as on a worker without the job's code, instead of waiting to be found
    stalled."""
    from celery.contrib.testing.worker import start_worker

    jobless = memory_app(
        sqlite_database.url,
        main="jobless",
        task_default_queue=app.conf.task_default_queue,  # consumes the jobs' queue
        worker_hijack_root_logger=False,
        dbsched_retry_backoff=BACKOFF,
        **broker_conf,
    )
    repository = repository_for(app)
    scheduler = Scheduler(app=app)
    try:
        with start_worker(
            jobless, pool="solo", perform_ping_check=False, loglevel="INFO", shutdown_timeout=10
        ) as worker:
            scheduler.tick()
            runs = wait_for(lambda: _final(app, "report.works", "report.fails"), 30, message="the runs to end")
            worker_name = worker.hostname
    finally:
        scheduler.close()
        forget_repository(jobless)
    for name in ("report.works", "report.fails"):
        run = runs[name]
        assert run.status == "failed" and run.start_time is None and run.worker == worker_name
        assert run.error == str(JobNotRegistered(name, worker_name))
        assert repository.lookup_job(name).failure_count == 1  # retried after the backoff
        assert repository.lookup_job(name).next_scheduled_run - repository.database_now() > dt.timedelta(
            seconds=BACKOFF[0] - 60
        )


def a_registered_task() -> None:
    """A plain task this worker has."""


def test_a_plain_task_message_the_worker_rejects_fails_its_run(app: Celery) -> None:
    """A message the worker refuses as invalid (Celery's `task_rejected`: here an ETA that is no date)."""
    from celery.contrib.testing.worker import start_worker

    app.task(name="proj.registered")(a_registered_task)
    repository = repository_for(app)
    Scheduler(app=app).close()  # syncs the beat_schedule
    [run] = [run for run in repository.claim_runs("a-beat", 10).runs if run.job_name == "nightly.missing"]
    embedded = start_worker(app, pool="solo", perform_ping_check=False, loglevel="INFO", shutdown_timeout=10)
    with embedded as worker:
        sent = app.send_task("proj.registered", headers={RUN_ID_HEADER: run.id, "eta": "not a date"})
        failed = wait_for(lambda: _final(app, "nightly.missing"), 30, message="the run to end")["nightly.missing"]
        worker_name = worker.hostname
    assert failed.status == "failed" and failed.start_time is None and failed.task_id == sent.id
    rejected = (
        f"task 'proj.registered' was rejected by worker '{worker_name}' as invalid (invalid ETA value 'not a date'"
    )
    assert failed.error is not None and failed.error.startswith(rejected), failed.error
    assert failed.error.endswith(
        "): the worker discarded its message and logged it; fix what the log names in the entry's options"
    )


def test_a_run_handed_back_at_shutdown_still_shows_under_its_job_name(app: Celery) -> None:
    """A worker in warm shutdown sends a run's message again for another worker: the same run, the same name."""
    repository = repository_for(app)
    Scheduler(app=app).close()  # syncs the jobs
    [run] = [run for run in repository.claim_runs("a-beat", 10).runs if run.job_name == "report.works"]
    cancel_local_runs(InterruptReason.SHUTDOWN)  # this process is shutting down
    assert app.tasks[RUN_TASK_NAME].apply(args=[run.id, "report.works"]).get() is None
    message = next_message(app)
    assert message.headers["task"] == RUN_TASK_NAME and message.headers["shadow"] == "report.works"
    assert json.loads(message.body)[0] == [run.id, "report.works"]
    assert repository.lookup_run(run.id).status == "queued"  # left for another worker
