"""One run's life on a worker: start it (queued -> running, the at-most-once gate), run the job while a
monitor thread writes its progress and watches for interruption, then finish it.

Knows nothing of Celery: the worker task and `testing.TestScheduler` both drive it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import heapq
import itertools
import logging
import math
import os
import threading
import time
import traceback
from collections.abc import Callable
from typing import Protocol, TypeVar

from .errors import (
    DatabaseError,
    DatabaseUnavailable,
    DbschedError,
    InvalidRunState,
    JobInterrupted,
    JobNotRegistered,
    RunNotFound,
)
from .job import Job, JobContext, JobStatus
from .records import RunRecord
from .repository import JobRepository
from .states import InterruptReason, RunState

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Contexts of the runs executing in this process, so that shutdown can cancel them.
_active: set[JobContext] = set()
_active_lock = threading.Lock()


class _Process:
    shutting_down = False


def shutting_down() -> bool:
    """True once this process began a warm shutdown: it must not start new runs."""
    return _Process.shutting_down


def cancel_local_runs(reason: InterruptReason, detail: str = "") -> int:
    """Cancel every run executing in this process (not from a signal handler: see `shutdown_waker`); a run
    still ours ends `interrupted` for `reason`, its error text `reason: detail`."""
    if reason == InterruptReason.SHUTDOWN:
        _Process.shutting_down = True
    contexts = list(_active)
    for ctx in contexts:
        ctx.cancel(detail or str(reason), reason)
    return len(contexts)


class _ShutdownWaker:
    """Cancels this process's runs on behalf of a signal handler. A handler runs on the main thread, which
    may be inside the job's own `ctx.wait()` holding the event's lock, so the handler only writes a byte to a
    pipe and a thread started beforehand does the cancelling."""

    def __init__(self) -> None:
        self._pid = -1
        self._write_fd = -1
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                return
            read_fd, self._write_fd = os.pipe()
            self._pid = os.getpid()
        threading.Thread(target=self._wait, args=(read_fd,), name="dbsched-shutdown", daemon=True).start()

    def _wait(self, read_fd: int) -> None:
        while os.read(read_fd, 1):
            # `request` marked the process shutting down already, synchronously: only the runs are cancelled
            # here, so that nothing sets the mark late from this thread.
            for ctx in list(_active):
                ctx.cancel(str(InterruptReason.SHUTDOWN), InterruptReason.SHUTDOWN)

    def request(self) -> None:
        """Signal-safe: mark the process shutting down and wake the cancelling thread."""
        _Process.shutting_down = True
        if self._pid == os.getpid():
            with contextlib.suppress(OSError):
                os.write(self._write_fd, b"\0")


shutdown_waker = _ShutdownWaker()


def active_run_ids() -> list[int]:
    return sorted(ctx.run_id for ctx in list(_active))


def status_of(job: Job, ctx: JobContext, label: str) -> JobStatus | None:
    """What the run reports: `ctx.progress()` if used, else `job.status()`; None when that misbehaves."""
    reported = ctx.reported_progress
    if reported is not None:
        return reported
    try:
        status: object = job.status()
    except Exception:
        logger.exception("%s: status() raised; progress not written", label)
        return None
    if not isinstance(status, JobStatus):
        logger.error("%s: status() returned %r, not a JobStatus", label, status)
        return None
    return status


MAX_RETRY_DELAY = 4.0  # a write waiting out an outage lands within this long of the database's return


def _retrying(what: str, action: Callable[[], T], timeout: float = 60.0) -> T:
    """Starting and finishing writes wait out a database outage of up to `timeout` seconds (the interrupt
    threshold: past it a beat's monitor ends the run anyway) instead of leaving the run queued or running
    until the threshold, and a finished job's outcome lost. Said once at WARNING, then at DEBUG."""
    deadline = time.monotonic() + timeout
    delay = 0.5
    failures = 0
    while True:
        try:
            result = action()
        except DatabaseUnavailable as exc:  # only an outage is worth waiting for; other errors stay errors
            if time.monotonic() + delay > deadline or shutting_down():
                raise
            failures += 1
            log = logger.warning if failures == 1 else logger.debug
            log("%s failed (%s); retrying in %.1fs, for up to %.0fs", what, exc, delay, timeout)
            time.sleep(delay)
            delay = min(delay * 2, MAX_RETRY_DELAY)
            continue
        if failures:
            logger.warning("%s: done after %d failed attempt(s)", what, failures)
        return result


class ProgressMonitor:
    """Every monitor interval: write the job's progress if it changed, and cancel the job's context once
    its run is no longer `running` (interrupted by a beat's monitor, cancelled, or shut down).

    `start()` hands it to the process's one monitor thread (`_Watcher`), `stop()` takes it back (waiting out
    a check in progress, so that none runs after the run's finish): a thread of its own per run cost more than
    an empty job."""

    def __init__(
        self, repository: JobRepository, job: Job, ctx: JobContext, interval: float, *, label: str | None = None
    ) -> None:
        self.repository = repository
        self.label = label or f"run {ctx.run_id} of job {ctx.job_name!r}"
        self.job = job
        self.ctx = ctx
        self.interval = interval
        self.written = JobStatus(0, 0)
        self.stopped = False
        self._checking = threading.Lock()
        self._db_error_logged = False

    def start(self) -> None:
        _watcher.add(self)

    def stop(self) -> None:
        # Held by a check in progress: wait for it (as joining a monitor thread did), up to 30 s.
        acquired = self._checking.acquire(timeout=30)
        self.stopped = True
        if acquired:
            self._checking.release()

    def check_unless_stopped(self) -> None:
        with self._checking:
            if not self.stopped:
                self.check()

    def check(self) -> None:
        status = status_of(self.job, self.ctx, self.label)
        try:
            if status is not None and status != self.written:
                self.repository.update_progress(self.ctx.run_id, status.completed, status.total)
                self.written = status
            elif self.repository.run_status(self.ctx.run_id) != RunState.RUNNING:
                self._cancel()
            self._db_error_logged = False
        except InvalidRunState:
            self._cancel()
        except RunNotFound:
            self.ctx.cancel("the run no longer exists")
        except DatabaseError as exc:
            # Not the job's fault: keep running, try again next interval, say so once.
            if not self._db_error_logged:
                logger.warning("%s: progress not written (%s); retrying", self.label, exc)
                self._db_error_logged = True

    def _cancel(self) -> None:
        try:
            run = self.repository.lookup_run(self.ctx.run_id)
            reason = f"run is {run.status}" + (f" ({run.error})" if run.error else "")
        except Exception:
            reason = "run is no longer running"
        logger.warning("%s: %s; cancelling the job", self.label, reason)
        self.ctx.cancel(reason)


class _Watcher:
    """The process's monitor thread: runs each started ProgressMonitor's check every its interval (counted
    from the end of its previous check), until the monitor is stopped. Started with the first run in each
    process (a forked pool child starts its own)."""

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._cond = threading.Condition()
        self._due: list[tuple[float, int, ProgressMonitor]] = []
        self._order = itertools.count()
        self._pushes = itertools.count(1)
        self._wakes_at = -math.inf  # when the thread wakes next (inf: when notified; -inf: awake)
        self._started = False

    def add(self, monitor: ProgressMonitor) -> None:
        with self._cond:
            if not self._started:
                threading.Thread(target=self._run, name="dbsched-monitor", daemon=True).start()
                self._started = True
            entry = (time.monotonic() + monitor.interval, next(self._order), monitor)
            if next(self._pushes) % 1024 == 0:  # stopped monitors wait in the heap until due: drop them now and then
                self._due = [queued for queued in self._due if not queued[2].stopped]
                heapq.heapify(self._due)
            heapq.heappush(self._due, entry)
            if entry[0] < self._wakes_at:  # else the thread wakes in time anyway: waking it costs a switch
                self._cond.notify()

    def _run(self) -> None:
        while True:
            monitor = self._next_due()
            try:
                monitor.check_unless_stopped()
            except Exception:
                logger.exception("%s: progress check failed", monitor.label)
            with self._cond:
                if not monitor.stopped:
                    heapq.heappush(self._due, (time.monotonic() + monitor.interval, next(self._order), monitor))

    def _next_due(self) -> ProgressMonitor:
        with self._cond:
            while True:
                if not self._due:
                    self._wakes_at = math.inf
                    self._cond.wait()
                    continue
                when, _, monitor = self._due[0]
                if monitor.stopped:
                    heapq.heappop(self._due)
                    continue
                delay = when - time.monotonic()
                if delay <= 0:
                    self._wakes_at = -math.inf  # busy: an entry added meanwhile is looked at next
                    heapq.heappop(self._due)
                    return monitor
                self._wakes_at = when
                self._cond.wait(delay)


_watcher = _Watcher()


def next_delay(job: Job, ctx: JobContext, label: str) -> dt.timedelta | None:
    """design §6: the job's own delay (relative to now); None means its schedule's next slot. If asking
    raises, the error is logged and the job's configured cadence is used."""
    if ctx.next_run_in is not None:
        return ctx.next_run_in
    try:
        delay: object = job.next_run_in()
        if delay is None:
            return None
        if not isinstance(delay, dt.timedelta):
            raise TypeError(f"next_run_in() returned {delay!r}, not a timedelta")
        if delay < dt.timedelta(0):
            raise ValueError(f"next_run_in() returned a negative delay {delay}")
        return delay
    except Exception:
        logger.exception("%s: next_run_in() failed; using its schedule or `every`", label)
        return None


class RunObserver(Protocol):
    """Told of each run this process starts and of its final record (`metrics.RunMetrics`)."""

    def started(self, run: RunRecord) -> None: ...

    def ended(self, run: RunRecord) -> None: ...


def _observed(observer: RunObserver | None, run: RunRecord | None) -> RunRecord | None:
    """`run`, once `observer` was told it ended (when both are given)."""
    if observer is not None and run is not None:
        observer.ended(run)
    return run


# Why a broker delivers a run's message again while its run is running or over (said where it is refused).
REDELIVERED_HINT = (
    " (a redelivered message: the broker delivered it again, e.g. on Redis once the run outlasted "
    "broker_transport_options['visibility_timeout']; raise that timeout above the longest run)"
)


def execute_run(
    repository: JobRepository,
    jobs: Callable[[str], Job | None],
    run_id: int,
    worker: str,
    *,
    task_id: str | None = None,
    monitor_interval: float = 30.0,
    raise_failure: bool = False,
    observer: RunObserver | None = None,
    redelivered: bool = False,
) -> RunRecord | None:
    """Start, run and finish one run. Returns the final run, or None when the message was dropped because
    the run was not `queued` (a duplicate delivery, an expired or unknown run: design §3).

    A failed run is logged with its traceback at ERROR; with `raise_failure` (the worker's task) it is raised
    instead, once recorded: the job's own exception, or `JobNotRegistered`, so that Celery reports the task
    failed (and logs the traceback). An interrupted run is not raised: it is no failure of the job.

    `redelivered`: the broker says it delivered this message before; a refused start then says why that
    happens (the one line logged for the dropped message)."""
    outage = repository.interrupt_threshold.total_seconds()
    try:
        run = _retrying(f"starting run {run_id}", lambda: repository.start_run(run_id, worker, task_id), outage)
    except (RunNotFound, InvalidRunState) as exc:
        logger.warning("dropping the message for run %s: %s%s", run_id, exc, REDELIVERED_HINT if redelivered else "")
        return None
    if observer is not None:
        observer.started(run)
    label = run.label()
    job = jobs(run.job_name)
    if job is None:
        unknown = JobNotRegistered(run.job_name, worker)
        failed = _retrying(f"failing {label}", lambda: repository.fail_run(run_id, str(unknown)), outage)
        _observed(observer, failed)
        _log_failure(label, unknown, raise_failure)
        if raise_failure:
            raise unknown
        return failed

    ctx = JobContext(run.id, run.job_name)
    monitor = ProgressMonitor(repository, job, ctx, monitor_interval, label=label)
    with _active_lock:
        _active.add(ctx)
    monitor.start()
    logger.info("%s started on %s", label, worker)
    try:
        try:
            job.run(ctx)
        except BaseException as exc:
            monitor.stop()
            if ctx.cancelled or isinstance(exc, JobInterrupted):
                return _observed(observer, _finish_interrupted(repository, label, ctx))
            if not isinstance(exc, Exception):
                raise
            error = "".join(traceback.format_exception(exc)).strip()
            ended = _finish(
                repository,
                run.id,
                f"failing {label}",
                label,
                lambda: repository.fail_run(run.id, error, progress=status_of(job, ctx, label)),
                outage,
                RunState.FAILED,
            )
            if ended is None:  # interrupted meanwhile: that stands
                logger.warning("%s: the job raised after its run ended: %r", label, exc)
                return None
            _observed(observer, ended)
            _log_failure(label, exc, raise_failure)
            if raise_failure:
                raise
            return ended
        monitor.stop()
        if ctx.cancelled:
            return _observed(observer, _finish_interrupted(repository, label, ctx))
        delay = next_delay(job, ctx, label)
        completed = _finish(
            repository,
            run.id,
            f"completing {label}",
            label,
            lambda: repository.complete_run(run.id, delay, progress=status_of(job, ctx, label)),
            outage,
            RunState.COMPLETED,
        )
        return _observed(observer, completed)
    finally:
        monitor.stop()
        with _active_lock:
            _active.discard(ctx)


def _log_failure(label: str, exc: Exception, raised: bool) -> None:
    """A failed run, recorded. Its traceback is logged once, at ERROR: here, or by Celery when it is `raised`
    to fail the task (this line then says which run it was)."""
    if raised:
        logger.warning("%s failed: %s; its task fails with it", label, exc)
    else:
        logger.error("%s failed: %s", label, exc, exc_info=exc)


def _finish(
    repository: JobRepository,
    run_id: int,
    what: str,
    label: str,
    action: Callable[[], RunRecord],
    outage: float,
    ends: RunState,
) -> RunRecord | None:
    """`action` (the finish that ends the run `ends`), retried through an outage. A retry that finds the run
    already `ends` follows an attempt that was committed but whose answer was lost (the connection cut by the
    client timeout, a network black hole: issue 15): that finish is the run's outcome, returned as such. Only
    this worker ends its run `completed` or `failed` (the start gate made it the one running it)."""
    attempts = 0

    def attempt() -> RunRecord:
        nonlocal attempts
        attempts += 1
        return action()

    try:
        return _retrying(what, attempt, outage)
    except (InvalidRunState, RunNotFound) as exc:
        if attempts > 1 and isinstance(exc, InvalidRunState) and exc.status == ends:
            logger.warning("%s: the finish had been committed (its answer lost in the outage): %s", label, exc)
            return _retrying(f"reading {label}", lambda: repository.lookup_run(run_id), outage)
        # Interrupted (or its job deleted) while the job was finishing: that stands, the result is discarded.
        logger.warning("%s ended before the job did: %s", label, exc)
        _stopped(repository, run_id)
        return None


def _stopped(repository: JobRepository, run_id: int) -> None:
    """The code of a run ended under it has returned: say so for `dbsched cancel --wait` (best effort)."""
    try:
        repository.mark_run_stopped(run_id)
    except DbschedError as exc:
        logger.warning("run %s: its stop was not recorded: %s", run_id, exc)


def _finish_interrupted(repository: JobRepository, label: str, ctx: JobContext) -> RunRecord | None:
    """The job stopped because its run was cancelled. If the run is still ours (shutdown, or the job raised
    JobInterrupted on its own), end it `interrupted`; otherwise whoever interrupted it already did."""
    kind = ctx.interrupt_reason or InterruptReason.CANCELLED
    reason = ctx.cancel_reason or str(kind)
    detail = "" if reason == kind else reason
    logger.warning("%s stopped: %s", label, reason)
    try:
        return _retrying(
            f"interrupting {label}",
            lambda: repository.interrupt_run(ctx.run_id, kind, detail),
            repository.interrupt_threshold.total_seconds(),
        )
    except InvalidRunState:
        _stopped(repository, ctx.run_id)
        return repository.lookup_run(ctx.run_id)
    except RunNotFound:  # its job was deleted meanwhile (the runs go with it): nothing left to end
        return None
