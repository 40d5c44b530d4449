"""The worker side in Celery: the wrapper task that carries a run, and a worker bootstep that prepares the
database at start, ends the runs this node left behind, and interrupts running runs on shutdown.

Cancellation is cooperative (revoke(terminate=True) does nothing on the threads and solo pools): shutdown
cancels the runs' contexts in this process, and in prefork children through SIGURG.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import weakref
from typing import Any

from celery import bootsteps, signals
from celery.exceptions import InvalidTaskError, Reject
from celery.worker.request import Request

from .binding import repository_for
from .errors import (
    DatabaseError,
    DatabaseUnavailable,
    DbschedError,
    Outage,
    SchemaMismatch,
    cannot_start,
    metrics_not_installed,
)
from .migrate import prepare_schema
from .protocol import JSON_CONTENT_TYPE, RUN_SERIALIZER, RUN_TASK_NAME, run_args, run_shadow, valid_run_id
from .registry import registry_for
from .repository import JobRepository
from .runner import RunObserver, execute_run, shutdown_waker, shutting_down
from .settings import PROMETHEUS_MULTIPROC_ENV, Settings, default_server_id, settings_for
from .states import InterruptReason

logger = logging.getLogger(__name__)

# Not SIGUSR1/SIGUSR2: billiard resets those (and the other terminating signals) to its own exit handler in
# each pool child after worker_process_init, so a child would die instead of cancelling its run. SIGURG is
# left alone and ignored by default, so a child that has not installed our handler yet is not hurt by it.
_CHILD_CANCEL_SIGNAL = signal.SIGURG
_pools: list[Any] = []  # the worker's pool, to find prefork children at shutdown
# The run metrics of each app whose worker serves metrics (dbsched_metrics_port); made before the pool forks.
_observers: weakref.WeakKeyDictionary[Any, RunObserver] = weakref.WeakKeyDictionary()


class JsonOnlyRequest(Request):  # type: ignore[misc]
    """The run task's request: run messages are JSON (the beat publishes nothing else), so any other content
    type is refused before it is decoded, whatever `accept_content` allows: unpickling a forged message would
    run its code. Celery logs the refusal and discards the message."""

    def __init__(self, message: Any, *args: Any, **kwargs: Any) -> None:
        if not kwargs.get("decoded") and message.content_type != JSON_CONTENT_TYPE:
            raise InvalidTaskError(
                f"{RUN_TASK_NAME}: refused a run message of content type {message.content_type!r}; "
                "run messages are JSON only"
            )
        super().__init__(message, *args, **kwargs)


def _run_job(task: Any, run_id: object, job_name: object = None) -> str | None:
    """The task body. `job_name` in the message is informational: the job that runs is the one the
    database says the run belongs to, looked up in this worker's registry (never code named by a message).

    A failed run fails the task with the job's exception (or `JobNotRegistered`), once the run is recorded
    `failed`: Celery logs its traceback, sends `task_failure` and, with a result backend, stores FAILURE. The
    retry is the job's backoff, never Celery's: the message is acknowledged, not redelivered. An interrupted
    run (cancelled, shut down, stalled) ends the task normally, returning "interrupted"."""
    checked = valid_run_id(run_id)
    if checked is None:
        logger.error("dropping a run message with a malformed run id %.100r (job %.100r)", run_id, job_name)
        return None
    run_id = checked
    if shutting_down():
        _hand_back(task, run_id, job_name)
        return None
    app = task.app
    settings = settings_for(app)
    registry = registry_for(app)
    worker = task.request.hostname or default_server_id()
    result = execute_run(
        repository_for(app, settings),
        registry.get,
        run_id,
        worker,
        task_id=task.request.id,
        monitor_interval=settings.monitor_interval.total_seconds(),
        raise_failure=True,
        observer=_observers.get(app),
        redelivered=bool((task.request.delivery_info or {}).get("redelivered")),
    )
    return None if result is None else result.status


def _hand_back(task: Any, run_id: int, job_name: object) -> None:
    """A run message that reached a worker in warm shutdown: leave the run queued and send the message again
    for another worker (or this one, restarted). Reject(requeue) would do the same with a traceback each."""
    queue = (task.request.delivery_info or {}).get("routing_key")
    try:
        task.apply_async(
            args=run_args(run_id, job_name),
            shadow=run_shadow(job_name),
            queue=queue or None,
            serializer=RUN_SERIALIZER,
        )
    except Exception as exc:
        raise Reject(
            f"worker shutting down; run {run_id} of job {job_name!r} left for another worker ({exc})", requeue=True
        ) from exc
    logger.info("worker shutting down: run %s of job %r handed back to the queue", run_id, job_name)


def heartbeat_interval(settings: Settings) -> float:
    """Seconds between a worker's heartbeats: its monitor interval, at most a third of the interrupt threshold
    (a plain task's run is interrupted when its worker is silent for the threshold)."""
    return min(settings.monitor_interval, settings.interrupt_threshold / 3).total_seconds()


class _Heartbeat(threading.Thread):
    """Writes the worker's server row every `heartbeat_interval` (role, host, pid, version, runs in flight)."""

    def __init__(self, app: Any, hostname: str) -> None:
        super().__init__(name="dbsched-heartbeat", daemon=True)
        self.app, self.hostname = app, hostname
        self.stopped = threading.Event()

    def run(self) -> None:
        failing = False
        settings = settings_for(self.app)
        interval = heartbeat_interval(settings)
        while True:
            try:
                repository = repository_for(self.app, settings)
                with _no_fork_during(repository):
                    repository.heartbeat(self.hostname, "worker", socket.gethostname(), os.getpid(), interval=interval)
                failing = False
            except DbschedError as exc:
                if not failing:
                    logger.warning("celery_dbsched heartbeat not written (%s); retrying", exc)
                failing = True
            if self.stopped.wait(interval):
                return


# A fork in the middle of a SQLite write by this thread (a prefork pool replacing a child) would copy SQLite's
# in-process lock table with the write lock held by a thread the child does not have: the child's every
# transaction would then wait on it until the busy timeout, again and again. Forks wait for the write to end.
_sqlite_writing = threading.Lock()
os.register_at_fork(
    before=_sqlite_writing.acquire, after_in_parent=_sqlite_writing.release, after_in_child=_sqlite_writing.release
)


def _no_fork_during(repository: JobRepository) -> contextlib.AbstractContextManager[Any]:
    return _sqlite_writing if repository.dialect == "sqlite" else contextlib.nullcontext()


_heartbeats: dict[tuple[int, str], _Heartbeat] = {}
_heartbeats_lock = threading.Lock()


def start_heartbeat(app: Any, hostname: str) -> None:
    """Start writing this worker's heartbeat (once per app and node: the bootstep and `celery_dbsched.tracking`
    both ask)."""
    with _heartbeats_lock:
        running = _heartbeats.get((id(app), hostname))
        if running is not None and running.is_alive() and not running.stopped.is_set():
            return
        heartbeat = _heartbeats[(id(app), hostname)] = _Heartbeat(app, hostname)
    heartbeat.start()


def stop_heartbeats() -> None:
    with _heartbeats_lock:
        for heartbeat in _heartbeats.values():
            heartbeat.stopped.set()
        _heartbeats.clear()


PREFETCH_REDUCTION = "worker_enable_prefetch_count_reduction"


def keep_the_connection_whole(worker: Any) -> None:
    """On a threads pool, turn off Celery's prefetch-count reduction after a broker reconnect, unless the app
    sets it.

    After a reconnect with tasks in flight, Celery lowers the prefetch count and raises it again on each ack,
    with a `basic.qos` chained on the ack's promise. Our task acks late, so that ack is made in the pool thread
    that ran the run, and the `basic.qos` (a write and a read of its answer) runs there too, while the
    consumer's event loop reads the same AMQP socket in the main thread. The two readers split a frame; the
    consumer then waits for a frame that never ends and takes no message until the connection fails (measured:
    90 s; tests/test_faults_outages.py, the RabbitMQ node stopped with 4 runs in flight). Without the reduction
    the worker consumes at its full prefetch count at once after a reconnect: at most `concurrency` messages
    more while the old runs end, which for our runs is harmless (a run only starts if it is still queued)."""
    pool = getattr(worker, "pool_cls", None)
    module = f"{getattr(pool, '__module__', '')}.{getattr(pool, '__name__', '')}"
    if "thread" not in module:
        return
    conf = worker.app.conf
    if any(PREFETCH_REDUCTION in layer for layer in conf.maps[:-1]):  # the app's own value (the last: defaults)
        return
    conf[PREFETCH_REDUCTION] = False
    logger.debug("celery_dbsched: %s = False on the threads pool (see keep_the_connection_whole)", PREFETCH_REDUCTION)


class DbschedWorkerStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Starts after the pool, stops before it: at stop the pool is still waiting for our runs."""

    requires = {"celery.worker.components:Pool"}
    label = "celery_dbsched"

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        # Bad settings stop the worker here, at start, in one line naming the key (CannotStart: exit 1).
        try:
            self.settings = settings_for(worker.app)
        except ValueError as exc:
            cannot_start("worker", exc, logger)
        self.repository: JobRepository | None = None
        self.metrics_server: Any = None
        keep_the_connection_whole(worker)
        if self.settings.metrics_port is not None:
            self._prepare_metrics(worker)

    def _prepare_metrics(self, worker: Any) -> None:
        """Before the pool forks (steps are made before any starts): prometheus-client in multiprocess mode,
        and the run metrics the children inherit. The exporter itself starts with the step."""
        prepare_metrics_dir()
        try:
            from .metrics import JobLabels, RunMetrics, multiprocess_mode, worker_serves
        except ImportError as exc:
            cannot_start("worker", metrics_not_installed(exc), logger)
        pool = getattr(worker, "pool_cls", None)
        if not multiprocess_mode() and "prefork" in f"{getattr(pool, '__module__', '')}":
            cannot_start(
                "worker",
                "dbsched_metrics_port: prometheus_client was imported before the worker started, without "
                f"{PROMETHEUS_MULTIPROC_ENV}: the runs of the prefork pool's children would not be counted; set "
                f"{PROMETHEUS_MULTIPROC_ENV} to an empty directory in the worker's environment",
                logger,
            )
        worker_serves()
        app = worker.app
        limit = self.settings.metrics_job_labels
        _observers[app] = RunMetrics(JobLabels(lambda: [job.name for job in registry_for(app)], limit))

    def start(self, worker: Any) -> None:
        """Prepare the schema, store the jobs, end the runs this node left behind. A database that is down is
        waited for (one ERROR line, then DEBUG per try, WARNING when it is back; the worker consumes once it
        is); anything that retrying cannot fix is one CRITICAL line and exit 1."""
        app = worker.app
        shutdown_waker.start()
        if self.settings.metrics_port is not None and self.metrics_server is None:
            from .metrics import serve

            try:
                self.metrics_server = serve(self.settings, None)
            except ValueError as exc:
                cannot_start("worker", exc, logger)
        outage = Outage(logger, "the worker waits for it before it consumes, trying again with a backoff")
        while True:
            try:
                repository = repository_for(app, self.settings)
                prepare_schema(repository.engine, self.settings.auto_migrate)
                registry_for(app).sync(repository)
                repository.mark_registered([job.name for job in registry_for(app)])  # for `dbsched jobs`: orphaned
                left = repository.interrupt_runs(server_id=worker.hostname, reason=InterruptReason.RESTART)
                break
            except DatabaseUnavailable as exc:
                _sleep_unless_stopping(outage.failed(exc, self.settings.run_jobs_interval.total_seconds()))
            except (DatabaseError, SchemaMismatch, ValueError) as exc:
                cannot_start("worker", exc, logger)
        outage.ended()
        self.repository = repository
        if left:
            logger.warning(
                "ended %d run(s) that %s left running: %s",
                len(left),
                worker.hostname,
                ", ".join(run.label() for run in left),
            )
        _pools[:] = [worker.pool] if getattr(worker, "pool", None) is not None else []
        logger.info("celery_dbsched: %d job(s) registered on %s", len(registry_for(app)), worker.hostname)

    def stop(self, worker: Any) -> None:
        """Warm shutdown: the runs still running on this node end `interrupted` (shutdown) so that another
        worker takes their jobs at once (design §9)."""
        _signal_runs_to_stop()
        stop_heartbeats()
        if self.repository is None:
            return
        try:
            ended = self.repository.interrupt_runs(server_id=worker.hostname, reason=InterruptReason.SHUTDOWN)
        except Exception as exc:
            logger.warning("could not end this worker's runs at shutdown (%s); the monitor will", exc)
            return
        for run in ended:
            logger.warning("%s interrupted: worker shutdown", run.label())

    def shutdown(self, worker: Any) -> None:
        self.stop(worker)
        server, self.metrics_server = self.metrics_server, None
        if server is not None:
            server.shutdown()
            server.server_close()


def prepare_metrics_dir() -> None:
    """With the metrics exporter on, a worker runs prometheus-client in multiprocess mode, so that its main
    process serves what prefork children count: PROMETHEUS_MULTIPROC_DIR when set (wiping it between runs is
    the deployment's), else a private directory made here, before prometheus-client is imported (it reads the
    variable once, at import), and removed when the worker exits."""
    named = {PROMETHEUS_MULTIPROC_ENV, PROMETHEUS_MULTIPROC_ENV.lower()} & set(os.environ)
    if named or "prometheus_client" in sys.modules:
        return
    path = tempfile.mkdtemp(prefix="dbsched-metrics-")
    os.environ[PROMETHEUS_MULTIPROC_ENV] = path
    owner = os.getpid()

    def remove() -> None:
        if os.getpid() == owner:  # not in a forked child that exits through atexit
            shutil.rmtree(path, ignore_errors=True)

    atexit.register(remove)


def _sleep_unless_stopping(seconds: float) -> None:
    """Sleep, in short steps; a warm or cold shutdown asked meanwhile (Celery's signal handlers only set a flag)
    ends the worker's start with its exit code."""
    from celery.worker import state

    deadline = time.monotonic() + seconds
    while True:
        for flag in (state.should_terminate, state.should_stop):
            if flag is not None and flag is not False:
                raise SystemExit(0 if flag is True else flag)
        if time.monotonic() >= deadline:
            return
        time.sleep(min(0.1, max(deadline - time.monotonic(), 0.0)))


def _signal_runs_to_stop() -> None:
    """Signal-safe: cancel this process's runs (through the waker thread) and tell the pool children."""
    shutdown_waker.request()
    for pid in _child_pids():
        with contextlib.suppress(OSError):
            os.kill(pid, _CHILD_CANCEL_SIGNAL)


def _child_pids() -> list[int]:
    """The prefork pool's current children (they come and go: read them when needed)."""
    pids: list[int] = []
    for pool in _pools:
        processes = getattr(getattr(pool, "_pool", None), "_pool", None) or []
        pids.extend(pid for pid in (getattr(p, "pid", None) for p in processes) if pid and pid != os.getpid())
    return pids


def _on_shutting_down(sender: Any = None, **kwargs: Any) -> None:
    # Runs inside the worker's signal handler: only set events and send signals here, no database I/O.
    _signal_runs_to_stop()


def _on_child_cancel(signum: int, frame: Any) -> None:
    shutdown_waker.request()


def _on_pool_process_init(**kwargs: Any) -> None:
    shutdown_waker.start()
    signal.signal(_CHILD_CANCEL_SIGNAL, _on_child_cancel)
    # Prefork children are forked before the bootstep starts: make this child's repository now (imports the
    # driver and builds the engine; no connection yet), not in its first run.
    for app in list(_apps):
        try:
            repository_for(app, settings_for(app))
        except Exception as exc:  # its first run reports it
            logger.debug("celery_dbsched: repository not prepared in the pool process: %s", exc)


def _on_worker_ready(sender: Any = None, **kwargs: Any) -> None:
    """The heartbeat starts once every bootstep has started: after the embedded beat (`-B`) has forked, so that
    no fork copies a write of it in progress (see `_sqlite_writing`)."""
    if sender is not None and sender.app in _apps:
        start_heartbeat(sender.app, sender.hostname)


_signals_connected = False
_apps: weakref.WeakSet[Any] = weakref.WeakSet()  # the apps install_worker put the wrapper task on


def install_worker(app: Any) -> None:
    """Put the wrapper task and the bootstep on `app`; called where a job is registered on it (again: nothing
    more is done)."""
    global _signals_connected
    if app in _apps:
        return
    app.task(
        name=RUN_TASK_NAME,
        bind=True,
        acks_late=True,
        # A failure is acknowledged (never redelivered: the job's backoff retries it), and stored as FAILURE
        # where a result backend is configured; without one nothing is stored.
        acks_on_failure_or_timeout=True,
        acks_on_failure=True,
        ignore_result=True,
        store_errors_even_if_ignored=True,
        serializer=RUN_SERIALIZER,
        shared=False,
        Request=JsonOnlyRequest,
    )(_run_job)
    app.steps["worker"].add(DbschedWorkerStep)
    _apps.add(app)
    if not _signals_connected:
        signals.worker_shutting_down.connect(_on_shutting_down, weak=False)
        signals.worker_process_init.connect(_on_pool_process_init, weak=False)
        signals.worker_ready.connect(_on_worker_ready, weak=False)
        _signals_connected = True
