"""The beat side: `celery beat -S celery_dbsched.Scheduler` (or `-S dbsched`).

Each tick asks the database when the next job is due (one indexed query when idle), claims what is due in
batches and publishes one message per claimed run. Every monitor interval it interrupts stalled runs and
prunes old history. It never imports or runs job code; several beats can run at once without a leader.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import statistics
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from functools import cached_property
from typing import TYPE_CHECKING, Any

from celery import beat

from .beat_schedule import summarize_names, sync_beat_schedule
from .binding import repository_for
from .errors import (
    CannotStart,
    DatabaseError,
    DatabaseUnavailable,
    Outage,
    SchemaMismatch,
    cannot_start,
    metrics_not_installed,
)
from .migrate import prepare_schema
from .protocol import run_headers
from .publisher import RunPublisher, publish_transport_options, unpublished_error
from .records import Claim, ClaimStats, JobRecord, RunRecord
from .registry import existing_registry
from .repository import JobRepository
from .settings import mask_database_url, settings_for
from .states import JobKind
from .wakeup import Wakeup

if TYPE_CHECKING:
    from .metrics import BeatMetrics

logger = logging.getLogger(__name__)

REFUSED_RETRY = 60.0  # seconds between tries (each logged at ERROR) while the database refuses a tick's statement
PRUNE_EVERY = dt.timedelta(minutes=10)  # the longest between two prunes; shorter when the retention is short
PRUNE_MAX_ROWS = 50_000  # runs one prune deletes at most before the beat dispatches again (in batches)


def prune_interval(retention: dt.timedelta) -> float:
    """Seconds between two prunes: a tenth of the retention (history overshoots it by at most 10%), at most
    PRUNE_EVERY, at least one second. Pruning only runs in the monitor step, so also at most that often."""
    return max(1.0, min(PRUNE_EVERY.total_seconds(), retention.total_seconds() / 10))


MIN_SLEEP = 0.01  # never return 0 from tick unless a full batch says more is due at once
# A claim takes at most this many runs (or the run-jobs limit, if lower) while more is due: beats share a
# backlog batch by batch, and the next batch is claimed while this one is published.
CLAIM_BATCH = 2000


CLAIM_WINDOW = 60.0  # seconds of claims a beat's heartbeat reports (claims and claim lag "in the last minute")
_CLAIM_WINDOW_KEPT = 10_000  # lags kept at most: the median and maximum of a busier minute are of its latest


class ClaimWindow:
    """The claim lags of the runs a beat claimed over the last minute, kept in memory from its claims (the
    runs' claim and slot times, both the database's): its heartbeat reports them, so no statement is added per
    claim and no runs are read back."""

    def __init__(self, seconds: float = CLAIM_WINDOW) -> None:
        self.seconds = seconds
        self._lags: deque[tuple[float, float]] = deque(maxlen=_CLAIM_WINDOW_KEPT)
        self._count: deque[tuple[float, int]] = deque()

    def add(self, runs: list[RunRecord], at: float) -> None:
        if not runs:
            return
        self._count.append((at, len(runs)))
        for run in runs:
            if run.scheduled_for is not None:
                self._lags.append((at, max(0.0, (run.create_time - run.scheduled_for).total_seconds())))

    def stats(self, at: float) -> ClaimStats:
        start = at - self.seconds
        while self._lags and self._lags[0][0] < start:
            self._lags.popleft()
        while self._count and self._count[0][0] < start:
            self._count.popleft()
        lags = [lag for _, lag in self._lags]
        count = sum(n for _, n in self._count)
        if not lags:
            return ClaimStats(count)
        return ClaimStats(count, statistics.median(lags), max(lags))


class Scheduler(beat.Scheduler):  # type: ignore[misc]
    """A Celery beat scheduler whose schedule lives in the database."""

    def __init__(self, app: Any, *args: Any, lazy: bool = False, **kwargs: Any) -> None:
        # Celery also builds a lazy instance just for the banner: parse settings (no I/O), open nothing. A bad
        # setting stops the beat there, in one line (CannotStart: no traceback).
        try:
            self.settings = settings_for(app)
        except ValueError as exc:
            cannot_start("beat", exc, logger)
        self.server_id = self.settings.beat_server_id()
        self._repository: JobRepository | None = None
        self._prepared = False  # the start-up (`prepare`) has run to its end
        self._next_monitor = 0.0
        self._next_prune = 0.0
        self._next_heartbeat = 0.0
        self._claims = ClaimWindow()
        self._outage = Outage(logger, "the beat keeps trying, backing off up to the run-jobs interval")
        self._fatal: CannotStart | None = None  # a start-up that failed for good on a tick: the beat exits 1
        self._db_refused_since: float | None = None
        self._broker_failing_since: float | None = None  # the first publish that failed in this outage
        self._broker_down_logged = False
        self._unpublished = 0
        self._publisher = RunPublisher(app)
        self._publisher.on_retry = self._publish_retrying
        # The next batch, claimed on a thread of its own (its own connection) while this one is published.
        self._claimer: ThreadPoolExecutor | None = None
        self._next_claim: Future[Claim] | None = None
        self._marks: list[Future[None]] = []  # `dispatched` marks made on the claim threads
        self._wakeup: Wakeup | None = None
        self._metrics: BeatMetrics | None = None
        self._metrics_server: Any = None
        self._closed = False
        super().__init__(app, *args, lazy=lazy, **kwargs)

    # -- Celery's scheduler interface -------------------------------------------------------------------

    def setup_schedule(self) -> None:
        """At start: `prepare`. A database that is down is waited for (each tick tries the start-up again); a
        missing driver, a refused connection, a wrong schema, a bad entry or a statement the database refuses
        is fatal: one line at CRITICAL, and the beat exits 1 (`CannotStart`). So is a metrics exporter
        (`dbsched_metrics_port`) that cannot start."""
        self._start_metrics()
        try:
            self.prepare()
        except DatabaseUnavailable as exc:
            self._outage.failed(exc, self._interval())

    def prepare(self) -> None:
        """The start-up: prepare the schema, register the jobs this app knows and its `beat_schedule` entries,
        end the runs a previous life of this server id left queued. Called by `setup_schedule`, and by `tick`
        until it has succeeded once. An outage raises DatabaseUnavailable; anything that retrying cannot fix
        raises CannotStart, logged."""
        try:
            self._start(self.repository)
        except DatabaseUnavailable:
            raise
        except (DatabaseError, SchemaMismatch, ValueError) as exc:
            # Not an outage: every retry of the start-up would fail the same way. Say so and stop.
            cannot_start("beat", exc, logger)

    def _start(self, repository: JobRepository) -> None:
        prepare_schema(repository.engine, self.settings.auto_migrate)
        registry = existing_registry(self.app)
        if registry is not None:
            registry.sync(repository)
        entries = sync_beat_schedule(self.app, repository)
        if entries:
            logger.info("celery_dbsched: %d beat_schedule entries: %s", len(entries), summarize_names(entries))
        left = repository.interrupt_runs(server_id=self.server_id)
        if left:
            logger.warning("ended %d run(s) that %s claimed but left queued", len(left), self.server_id)
        self._prepared = True
        if self.settings.listen and self._wakeup is None:
            self._wakeup = Wakeup(repository.engine)

    def _start_metrics(self) -> None:
        if self.settings.metrics_port is None or self._metrics is not None:
            return
        try:
            from .metrics import BeatMetrics, serve, served_by_worker
        except ImportError as exc:
            cannot_start("beat", metrics_not_installed(exc), logger)
        if not served_by_worker():  # else embedded in a worker (`-B`), whose exporter serves its counts
            try:
                self._metrics_server = serve(self.settings, self.repository)
            except ValueError as exc:
                cannot_start("beat", exc, logger)
        self._metrics = BeatMetrics(self.server_id)

    @property
    def repository(self) -> JobRepository:
        """The app's repository in this process; getting it opens no connection (`prepare` does the I/O)."""
        if self._repository is None:
            self._repository = repository_for(self.app, self.settings)
        return self._repository

    def _interval(self) -> float:
        return min(self.settings.run_jobs_interval.total_seconds(), float(self.max_interval))

    def tick(self, *args: Any, **kwargs: Any) -> float:
        """Claim and publish what is due; return the seconds to sleep (at most the run-jobs interval)."""
        interval = self._interval()
        if self._metrics is not None:
            self._metrics.ticked()
        try:
            if not self._prepared:
                self.prepare()  # the database was down at start
            self._maybe_monitor()
            sleep = self._dispatch_due(interval)
            self._maybe_heartbeat(interval)
        except DatabaseUnavailable as exc:
            return self._outage.failed(exc, interval)
        except CannotStart as exc:
            # The start-up, retried after an outage at start, failed for good (logged). Celery's loop ends on
            # a SystemExit but exits 0: `close` raises it again so that the beat exits 1.
            self._fatal = exc
            raise
        except (DatabaseError, SchemaMismatch) as exc:
            return self._database_refused(exc)
        self._db_refused_since = None
        self._outage.ended()
        return self._sleep(sleep)

    def _sleep(self, seconds: float) -> float:
        """On PostgreSQL, do the sleeping here, on LISTEN, so that a NOTIFY ends it at once; Celery's loop
        then only sleeps MIN_SLEEP. Elsewhere return the time for Celery's loop to sleep."""
        if self._wakeup is None or seconds <= MIN_SLEEP:
            return seconds
        logger.debug("celery_dbsched: sleeping up to %.2fs on LISTEN %s", seconds, self._wakeup.channel or "(not yet)")
        woken = self._wakeup.wait(seconds)
        if woken is None:
            return seconds
        if woken:
            logger.debug("celery_dbsched: woken by a notification")
        return MIN_SLEEP

    def sync(self) -> None:
        """Nothing to save: every change is written when it happens."""

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._finish_next_claim()
        if self._wakeup is not None:
            self._wakeup.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        super().close()
        if self._fatal is not None:
            raise self._fatal

    def _finish_next_claim(self) -> None:
        """At shutdown: publish a batch claimed ahead (left queued, it would wait for this server id's next
        start or the monitor to be ended `interrupted` and run again)."""
        claimer, self._claimer = self._claimer, None
        future, self._next_claim = self._next_claim, None
        if future is not None:
            try:
                self._publish(future.result())
            except Exception as exc:
                logger.error("celery_dbsched: could not publish the batch claimed ahead (%s); restart ends it", exc)
        if claimer is not None:
            claimer.shutdown(wait=True)  # the marks still queued on it are made
        for mark in self._marks:
            if mark.exception() is not None:
                logger.error("celery_dbsched: could not mark runs dispatched: %s", mark.exception())
        self._marks = []

    @property
    def info(self) -> str:
        url = mask_database_url(self.settings.database_url)
        return (
            f"    . db -> {url}\n"
            f"    . server id -> {self.server_id}\n"
            f"    . run-jobs interval -> {self.settings.run_jobs_interval.total_seconds():g}s, "
            f"monitor -> {self.settings.monitor_interval.total_seconds():g}s, "
            f"interrupt threshold -> {self.settings.interrupt_threshold.total_seconds():g}s"
        )

    def get_schedule(self) -> dict[str, Any]:
        return {}

    def set_schedule(self, schedule: Any) -> None:
        """The schedule lives in the database; Celery's in-memory one is not used."""

    schedule = property(get_schedule, set_schedule)

    # -- the work --------------------------------------------------------------------------------------

    def _dispatch_due(self, interval: float) -> float:
        repository = self.repository
        batch = min(self.settings.run_jobs_limit, CLAIM_BATCH)
        claim = self._take_next_claim()
        if claim is None:
            due_in = repository.next_due_in()
            if due_in is None or due_in > 0:
                return self._sleep_until(due_in, interval)
            claim = repository.claim_runs(self.server_id, batch)
        if len(claim.runs) >= batch:
            # A full batch: more may be due. Claim the next batch now, on the claim thread, while this one
            # is published; the next tick publishes it (at once: tick returns 0).
            self._claim_ahead(batch)
            self._publish(claim)
            return 0.0
        self._publish(claim)
        # Fewer than asked: nothing else was due, or another beat holds the rest of what is due (its claim is
        # not committed yet). Ask again: a beat that lost a claim race comes back at once while jobs are due,
        # and otherwise sleeps until the next slot, never its whole interval past it.
        return self._sleep_until(repository.next_due_in(), interval)

    def _sleep_until(self, due_in: float | None, interval: float) -> float:
        sleep = interval if due_in is None else min(max(due_in, MIN_SLEEP), interval)
        return min(sleep, max(self._next_monitor - time.monotonic(), MIN_SLEEP))

    def _claim_ahead(self, batch: int) -> None:
        if self._claimer is None:  # two threads: the claim ahead, and the mark of the batch being published
            self._claimer = ThreadPoolExecutor(max_workers=2, thread_name_prefix="dbsched-claim")
        self._next_claim = self._claimer.submit(self.repository.claim_runs, self.server_id, batch)

    def _take_next_claim(self) -> Claim | None:
        """The batch claimed ahead, if any (its database error is raised here, in the beat's thread), once the
        marks of the batches before it are made."""
        future, self._next_claim = self._next_claim, None
        if future is None:
            return None
        claim = future.result()
        marks, self._marks = self._marks, []
        for mark in marks:
            error = mark.exception()  # waits for it
            if error is not None:  # published but left `queued`: the monitor ends them (stalled) later
                logger.error("celery_dbsched: could not mark a published batch dispatched: %s", error)
        return claim

    def _publish(self, claim: Claim) -> None:
        """Publish each claimed run (on the beat's thread: the producer is never shared), then mark the plain
        tasks sent `dispatched` in one statement for the whole batch."""
        runs = claim.runs
        self._claims.add(runs, time.monotonic())
        if runs:  # the audit trail: one line per batch; one per run at DEBUG, looked up once per batch
            logger.info(
                "celery_dbsched: claimed %d run(s): %s", len(runs), summarize_names([r.job_name for r in runs], 10)
            )
        each = logger.isEnabledFor(logging.DEBUG)
        sent = unpublished = 0
        broker_error: Exception | None = None
        dispatched: list[tuple[int, str | None]] = []
        self._publisher.new_batch()
        for run in runs:
            if broker_error is None:
                try:
                    if run.kind == JobKind.TASK:
                        task_id = self._send_task(run, claim.jobs.get(run.job_name))
                        if task_id is not None:
                            dispatched.append((run.id, task_id))
                            sent += 1
                    else:
                        self._send(run)
                        sent += 1
                    if each:
                        logger.debug(
                            "celery_dbsched: sent %s%s", run.label(), f" to queue {run.queue}" if run.queue else ""
                        )
                    continue
                except Exception as exc:
                    broker_error = exc
                    self._broker_down(run, exc)
            self._unpublished += 1
            unpublished += 1
            try:
                self.repository.fail_run(run.id, unpublished_error(broker_error))
            except DatabaseError as exc:
                logger.error("celery_dbsched: could not end unpublished %s (%s); the monitor will", run.label(), exc)
        if dispatched:
            self._mark_dispatched(dispatched)
        if self._metrics is not None and runs:
            self._metrics.published(runs, sent, unpublished)
        if broker_error is None and runs and self._broker_failing_since is not None:
            # WARNING after an outage that was logged at ERROR; INFO after one the publish retries got over.
            logger.log(
                logging.WARNING if self._broker_down_logged else logging.INFO,
                "celery_dbsched: publishing works again after %.1fs; %d run(s) were not published meanwhile "
                "(ended `failed`, retried with the backoff)",
                time.monotonic() - self._broker_failing_since,
                self._unpublished,
            )
            self._broker_failing_since = None
            self._broker_down_logged = False
            self._unpublished = 0

    def _mark_dispatched(self, sent: list[tuple[int, str | None]]) -> None:
        """One statement for the batch. While a claim runs ahead it is made on the other claim thread (its own
        connection; it touches the runs of this batch, the claim the jobs due next), so that the beat's thread
        goes on publishing (an error is logged with the next claim, whose batch is published all the same)."""
        if self._claimer is not None and self._next_claim is not None:
            self._marks.append(self._claimer.submit(self.repository.dispatch_runs, sent))
        else:
            self.repository.dispatch_runs(sent)

    @cached_property
    def connection(self) -> Any:
        """The beat's publishing connection (Celery's `connection_for_write`), with the timeouts that bound a
        publish to a silent broker (`publish_transport_options`) where the user's options set none."""
        return self.app.connection_for_write(transport_options=publish_transport_options(self.app))

    def _publish_retrying(self, exc: Exception) -> None:
        """A plain publish failed and is tried again under the retry policy (a broker that does not answer
        fails each try after the publish timeout): said once per outage, when it is first noticed, at INFO (the
        ERROR line follows if the retries fail too; a blip that one retry gets over needs no more)."""
        if self._broker_failing_since is None:
            self._broker_failing_since = time.monotonic()
            logger.info("celery_dbsched: a publish failed (%r); trying again under task_publish_retry_policy", exc)

    def _broker_down(self, run: RunRecord, exc: Exception) -> None:
        """Said once per outage, not once per tick: every run due meanwhile fails the same way."""
        if not self._broker_down_logged:
            self._broker_down_logged = True
            if self._broker_failing_since is None:
                self._broker_failing_since = time.monotonic()
            logger.error(
                "celery_dbsched: could not publish %s: %s; until publishing works again, runs that cannot be "
                "published end `failed` (not published) and are retried with the backoff",
                run.label(),
                exc,
            )
        else:
            logger.debug("celery_dbsched: could not publish %s: %s", run.label(), exc)

    def _send(self, run: RunRecord) -> None:
        self._publisher.publish(self.producer, run.id, run.job_name, run.queue)

    def _send_task(self, run: RunRecord, job: JobRecord | None) -> str | None:
        """A beat_schedule entry: its own task, args, kwargs and options, as stock beat sends it, plus a
        header naming the run (for workers that track runs). Returns the task id (the caller marks the batch
        `dispatched`), or None when there is nothing to send (the run is ended `failed`)."""
        if job is None or not job.task:
            self.repository.fail_run(run.id, f"{run.job_name!r} has no task to send")
            return None
        return self._publisher.publish_task(
            self.producer,
            job.task,
            job.task_args,
            job.task_kwargs,
            job.message_options,
            run_headers(run.id),
            entry=job.name,
        )

    def _maybe_heartbeat(self, interval: float) -> None:
        """The beat's server row, from its tick, at most once per run-jobs interval (one statement): alive now,
        and what it claimed over the last minute. Ticks are at most an interval apart, so rows are at most two
        intervals apart; the row records the interval (`dbsched status`: silent after three)."""
        now = time.monotonic()
        if now < self._next_heartbeat:
            return
        self.repository.heartbeat(
            self.server_id,
            "beat",
            socket.gethostname(),
            os.getpid(),
            interval=interval,
            claims=self._claims.stats(now),
        )
        self._next_heartbeat = now + interval

    def _maybe_monitor(self) -> None:
        now = time.monotonic()
        if now < self._next_monitor:
            return
        repository = self.repository
        for run in repository.interrupt_runs() + repository.expire_runs() + repository.interrupt_orphaned():
            logger.warning("celery_dbsched: %s interrupted: %s", run.label(), run.error)
        if now >= self._next_prune:
            pruned = repository.prune_runs(self.settings.run_retention, max_rows=PRUNE_MAX_ROWS)
            if pruned:
                logger.info("celery_dbsched: pruned %d finished run(s)", pruned)
            servers = repository.prune_servers(self.settings.server_retention)
            if servers:
                logger.info(
                    "celery_dbsched: pruned %d server row(s) silent for over %s",
                    servers,
                    self.settings.server_retention,
                )
            # More left than one prune may take (a backlog): go on at the next monitor step.
            self._next_prune = now + (0.0 if pruned >= PRUNE_MAX_ROWS else prune_interval(self.settings.run_retention))
        self._next_monitor = now + self.settings.monitor_interval.total_seconds()

    def _database_refused(self, exc: Exception) -> float:
        """The database refused a statement for a reason that retrying cannot fix (not an outage): logged at
        ERROR each time, tried again only every REFUSED_RETRY seconds (in case an operator fixes the data)."""
        now = time.monotonic()
        if self._db_refused_since is None:
            self._db_refused_since = now
        logger.error(
            "celery_dbsched: %s (failing for %.0fs; trying again in %.0fs)",
            exc,
            now - self._db_refused_since,
            REFUSED_RETRY,
        )
        return REFUSED_RETRY
