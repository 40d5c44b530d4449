"""Run tracking for plain tasks sent for `beat_schedule` entries, on workers that opt in with one line:

    app.conf.imports = [..., "celery_dbsched.tracking"]      # or: import celery_dbsched.tracking

Workers without it run the tasks as they always did; their runs stay `dispatched`. With it, Celery's task
signals move the run `running` when the task starts and `completed`/`failed` when it ends, a message the
worker refuses (`task_unknown`: no such task on this worker; `task_rejected`: an invalid message) ends its
run `failed` naming the task and the worker, and the worker writes a heartbeat: a run whose worker stops
answering for the interrupt threshold ends `interrupted`.
Tasks may report progress with `celery_dbsched.progress(completed, total)`.
"""

from __future__ import annotations

import logging
import socket
import traceback
from typing import Any

from celery import current_task, signals

from .binding import repository_for
from .errors import DbschedError, InvalidRunState, JobNotRegistered, RunNotFound
from .job import JobStatus
from .protocol import JSON_CONTENT_TYPE, RUN_TASK_NAME, header_run_id, valid_run_id
from .runner import REDELIVERED_HINT
from .settings import settings_for
from .worker import start_heartbeat, stop_heartbeats

logger = logging.getLogger(__name__)


def _run_id(task: Any) -> int | None:
    return header_run_id(getattr(task, "request", None))


# Set on the request of an execution whose run was not `dispatched` (or `queued`) when it began: a second
# delivery of its message (a broker redelivery), whose end must not end the run of the first.
_NOT_OURS = "dbsched_not_tracked"


def _on_task_prerun(sender: Any = None, task_id: str | None = None, task: Any = None, **kwargs: Any) -> None:
    run_id = _run_id(task)
    if run_id is None:
        return
    try:
        repository_for(task.app, settings_for(task.app)).track_start(
            run_id, task.request.hostname or socket.gethostname(), task_id
        )
    except (InvalidRunState, RunNotFound) as exc:
        # Celery runs it anyway (a signal cannot stop a task): say so once, and leave the run to its first start.
        setattr(task.request, _NOT_OURS, True)
        redelivered = bool((task.request.delivery_info or {}).get("redelivered"))
        logger.warning(
            "run %s of task %r: %s; this execution is not tracked (a plain task is not guarded against a second "
            "delivery of its message: Celery runs it again)%s",
            run_id,
            task.name,
            exc,
            REDELIVERED_HINT if redelivered else "",
        )
    except DbschedError as exc:
        logger.warning("run %s of task %r not tracked: %s", run_id, task.name, exc)


def _on_task_success(sender: Any = None, **kwargs: Any) -> None:
    _end(sender, None)


def _on_task_failure(sender: Any = None, exception: BaseException | None = None, **kwargs: Any) -> None:
    text = "".join(traceback.format_exception(exception)).strip() if exception is not None else "failed"
    _end(sender, text)


def _end(task: Any, error: str | None) -> None:
    run_id = _run_id(task)
    if run_id is None or getattr(task.request, _NOT_OURS, False):
        return
    try:
        repository_for(task.app, settings_for(task.app)).track_end(run_id, error)
    except DbschedError as exc:
        logger.warning("run %s of task %r: end not recorded: %s", run_id, getattr(task, "name", "?"), exc)


def _on_task_unknown(sender: Any = None, message: Any = None, name: object = None, **kwargs: Any) -> None:
    worker = _worker(sender)
    if name == RUN_TASK_NAME:  # a job's run, on a worker with no job registered on its app
        _refused_job_run(sender, message, worker)
    else:
        _refused(sender, message, f"task {name!r} is not registered on worker {worker!r}: {UNKNOWN_TASK_FIX}")


def _on_task_rejected(sender: Any = None, message: Any = None, exc: object = None, **kwargs: Any) -> None:
    headers = getattr(message, "headers", None) or {}
    why = f" ({exc})" if exc is not None else ""
    rejected = f"task {headers.get('task')!r} was rejected by worker {_worker(sender)!r} as invalid{why}"
    _refused(sender, message, f"{rejected}: {REJECTED_TASK_FIX}")


UNKNOWN_TASK_FIX = "the worker discarded its message; import the task's module on the workers of its queue"
REJECTED_TASK_FIX = "the worker discarded its message and logged it; fix what the log names in the entry's options"


def _worker(consumer: Any) -> str:
    return str(getattr(consumer, "hostname", None) or socket.gethostname())


def _refused(consumer: Any, message: Any, error: str) -> None:
    """A worker refused a plain task's message without running it (Celery discards it): its run fails."""
    run_id = header_run_id(message)
    if run_id is None or consumer is None:
        return
    headers = getattr(message, "headers", None) or {}
    logger.warning("run %s of task %r failed: %s", run_id, headers.get("task"), error)
    try:
        repository_for(consumer.app, settings_for(consumer.app)).track_refused(
            run_id, _worker(consumer), headers.get("id"), error
        )
    except DbschedError as exc:
        logger.warning("run %s of task %r: failure not recorded: %s", run_id, headers.get("task"), exc)


def _refused_job_run(consumer: Any, message: Any, worker: str) -> None:
    """A job's run message on a worker without the run task (Celery discards it): the run, still queued, fails
    as on a worker without the job's code, and is retried after the backoff."""
    run = _run_of_message(message)
    if run is None or consumer is None:
        return
    run_id, job_name = run
    error = str(JobNotRegistered(job_name, worker))
    logger.warning("run %s of job %r failed: %s", run_id, job_name, error)
    try:
        repository_for(consumer.app, settings_for(consumer.app)).refuse_run(run_id, worker, error)
    except DbschedError as exc:
        logger.warning("run %s of job %r: failure not recorded: %s", run_id, job_name, exc)


def _run_of_message(message: Any) -> tuple[int, str] | None:
    """The run id and job name a run message carries (JSON only, as run messages are), or None."""
    if getattr(message, "content_type", None) != JSON_CONTENT_TYPE:
        return None
    try:
        args = message.decode()[0]  # JSON (checked above): nothing is unpickled; decompressed if need be
        run_id, job_name = valid_run_id(args[0]), args[1]
    except Exception:  # a malformed message: Celery has logged it; nothing to fail
        return None
    return None if run_id is None else (run_id, str(job_name))


def progress(completed: int, total: int) -> None:
    """From inside a tracked plain task: record its progress now (a no-op outside such a task)."""
    status = JobStatus(completed, total)
    task = current_task
    run_id = _run_id(task) if task else None
    if run_id is None:
        return
    try:
        repository_for(task.app, settings_for(task.app)).update_progress(run_id, status.completed, status.total)
    except DbschedError as exc:
        logger.warning("run %s of task %r: progress not recorded: %s", run_id, task.name, exc)


def _on_worker_ready(sender: Any = None, **kwargs: Any) -> None:
    # A worker with jobs writes its heartbeat from its bootstep already; one without (plain tasks only) from here.
    start_heartbeat(sender.app, sender.hostname)


def _on_worker_shutdown(sender: Any = None, **kwargs: Any) -> None:
    stop_heartbeats()


signals.task_prerun.connect(_on_task_prerun, weak=False)
signals.task_success.connect(_on_task_success, weak=False)
signals.task_failure.connect(_on_task_failure, weak=False)
signals.task_unknown.connect(_on_task_unknown, weak=False)
signals.task_rejected.connect(_on_task_rejected, weak=False)
signals.worker_ready.connect(_on_worker_ready, weak=False)
signals.worker_shutdown.connect(_on_worker_shutdown, weak=False)
