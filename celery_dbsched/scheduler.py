"""The beat side: `celery beat -S celery_dbsched.Scheduler` (or `-S dbsched`).

Each tick asks the database when the next job is due (one indexed query when idle), claims what is due in
batches and publishes one message per claimed run. Every monitor interval it interrupts stalled runs and
prunes old history. It never imports or runs job code; several beats can run at once without a leader.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from typing import Any

from celery import beat

from .beat_schedule import sync_beat_schedule
from .errors import DatabaseError, DatabaseUnavailable
from .migrate import prepare_schema
from .publisher import RunPublisher
from .registry import existing_registry
from .repository import WAKEUP_CHANNEL, JobRecord, JobRepository, RunRecord, repository_for
from .schema import KIND_TASK
from .settings import Settings
from .wakeup import Wakeup
from .worker import RUN_ID_HEADER

logger = logging.getLogger(__name__)

PRUNE_EVERY = dt.timedelta(minutes=10)  # the longest between two prunes; shorter when the retention is short
PRUNE_MAX_ROWS = 50_000  # runs one prune deletes at most before the beat dispatches again (in batches)


def prune_interval(retention: dt.timedelta) -> float:
    """Seconds between two prunes: a tenth of the retention (history overshoots it by at most 10%), at most
    PRUNE_EVERY, at least one second. Pruning only runs in the monitor step, so also at most that often."""
    return max(1.0, min(PRUNE_EVERY.total_seconds(), retention.total_seconds() / 10))


MIN_SLEEP = 0.01  # never return 0 from tick unless a full batch says more is due at once


class Scheduler(beat.Scheduler):  # type: ignore[misc]
    """A Celery beat scheduler whose schedule lives in the database."""

    def __init__(self, app: Any, *args: Any, lazy: bool = False, **kwargs: Any) -> None:
        # Celery also builds a lazy instance just for the banner: parse settings (no I/O), open nothing.
        self.settings = Settings.from_mapping(app.conf)
        self.server_id = self.settings.beat_server_id()
        self._repository: JobRepository | None = None
        self._next_monitor = 0.0
        self._next_prune = 0.0
        self._db_failing_since: float | None = None
        self._db_backoff = 0.0
        self._broker_failing_since: float | None = None
        self._unpublished = 0
        self._declared_queues: set[str] = set()
        self._publisher = RunPublisher(app)
        self._more_due = False  # the last claim filled a batch: claim again without asking what is due
        self._wakeup: Wakeup | None = None
        self._closed = False
        super().__init__(app, *args, lazy=lazy, **kwargs)

    # -- Celery's scheduler interface -------------------------------------------------------------------

    def setup_schedule(self) -> None:
        """At start: prepare the schema, register the jobs this app knows and its `beat_schedule` entries,
        end the runs a previous life of this server id left queued. A database that is down is waited for;
        a wrong schema or a bad entry is fatal."""
        try:
            self._prepare()
        except DatabaseUnavailable as exc:
            logger.error("celery_dbsched: database unavailable at start, will keep trying: %s", exc)

    def _prepare(self) -> JobRepository:
        repository = repository_for(self.app, self.settings)
        prepare_schema(repository.engine, self.settings.auto_migrate)
        registry = existing_registry(self.app)
        if registry is not None:
            registry.sync(repository)
        entries = sync_beat_schedule(self.app, repository)
        if entries:
            logger.info("celery_dbsched: %d beat_schedule entries: %s", len(entries), ", ".join(entries))
        left = repository.interrupt_runs(server_id=self.server_id)
        if left:
            logger.warning("ended %d run(s) that %s claimed but left queued", len(left), self.server_id)
        self._repository = repository
        if self.settings.listen and self._wakeup is None:
            self._wakeup = Wakeup(repository.engine)
        return repository

    @property
    def repository(self) -> JobRepository:
        return self._repository if self._repository is not None else self._prepare()

    def tick(self, *args: Any, **kwargs: Any) -> float:
        """Claim and publish what is due; return the seconds to sleep (at most the run-jobs interval)."""
        interval = min(self.settings.run_jobs_interval.total_seconds(), float(self.max_interval))
        try:
            self._maybe_monitor()
            sleep = self._dispatch_due(interval)
        except DatabaseError as exc:
            return self._database_down(exc, interval)
        if self._db_failing_since is not None:
            logger.warning("celery_dbsched: database back after %.1fs", time.monotonic() - self._db_failing_since)
            self._db_failing_since = None
            self._db_backoff = 0.0
        return self._sleep(sleep)

    def _sleep(self, seconds: float) -> float:
        """On PostgreSQL, do the sleeping here, on LISTEN, so that a NOTIFY ends it at once; Celery's loop
        then only sleeps MIN_SLEEP. Elsewhere return the time for Celery's loop to sleep."""
        if self._wakeup is None or seconds <= MIN_SLEEP:
            return seconds
        logger.debug("celery_dbsched: sleeping up to %.2fs on LISTEN %s", seconds, WAKEUP_CHANNEL)
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
        if self._wakeup is not None:
            self._wakeup.close()
        super().close()

    @property
    def info(self) -> str:
        url = self._masked_url()
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

    def _masked_url(self) -> str:
        from sqlalchemy.engine import make_url

        try:
            return make_url(self.settings.database_url).render_as_string(hide_password=True)
        except Exception:
            return "<unparseable database url>"

    def _dispatch_due(self, interval: float) -> float:
        repository = self.repository
        limit = self.settings.run_jobs_limit
        due_in = None if self._more_due else repository.next_due_in()
        if self._more_due or (due_in is not None and due_in <= 0):
            self._more_due = False
            claimed = repository.run_jobs(self.server_id, limit)
            self._publish(claimed)
            if len(claimed) >= limit:
                self._more_due = True
                return 0.0  # a full batch: more may be due, claim again at once
            due_in = repository.next_due_in()
        sleep = interval if due_in is None else min(max(due_in, MIN_SLEEP), interval)
        return min(sleep, max(self._next_monitor - time.monotonic(), MIN_SLEEP))

    def _publish(self, runs: list[RunRecord]) -> None:
        task_names = [run.job_name for run in runs if run.kind == KIND_TASK]
        tasks = self.repository.lookup_jobs(task_names) if task_names else {}
        broker_error: Exception | None = None
        self._publisher.new_batch()
        for run in runs:
            if broker_error is None:
                try:
                    if run.kind == KIND_TASK:
                        self._send_task(run, tasks.get(run.job_name))
                    else:
                        self._send(run)
                    continue
                except Exception as exc:
                    broker_error = exc
                    self._broker_down(run, exc)
            self._unpublished += 1
            try:
                self.repository.fail_run(run.id, f"not published: {broker_error!r}")
            except DatabaseError as exc:
                logger.error("could not end unpublished run %s (%s); the monitor will", run.id, exc)
        if broker_error is None and runs and self._broker_failing_since is not None:
            logger.warning(
                "celery_dbsched: publishing works again after %.1fs; %d run(s) were not published meanwhile "
                "(ended `failed`, retried with the backoff)",
                time.monotonic() - self._broker_failing_since,
                self._unpublished,
            )
            self._broker_failing_since = None
            self._unpublished = 0

    def _broker_down(self, run: RunRecord, exc: Exception) -> None:
        """Said once per outage, not once per tick: every run due meanwhile fails the same way."""
        if self._broker_failing_since is None:
            self._broker_failing_since = time.monotonic()
            logger.error(
                "celery_dbsched: could not publish run %s of %r: %s; until publishing works again, runs that "
                "cannot be published end `failed` (not published) and are retried with the backoff",
                run.id,
                run.job_name,
                exc,
            )
        else:
            logger.debug("celery_dbsched: could not publish run %s of %r: %s", run.id, run.job_name, exc)

    def _queue_options(self, queue: str | None) -> dict[str, Any]:
        if not queue:
            return {}
        options: dict[str, Any] = {"queue": queue}
        if queue not in self._declared_queues:
            options["declare"] = [self.app.amqp.queues[queue]]
        return options

    def _send(self, run: RunRecord) -> None:
        self._publisher.publish(self.producer, run.id, run.job_name, run.queue)

    def _send_task(self, run: RunRecord, job: JobRecord | None) -> None:
        """A beat_schedule entry: its own task, args, kwargs and options, as stock beat sends it, plus a
        header naming the run (for workers that track runs). The run is then `dispatched`."""
        if job is None or not job.task:
            self.repository.fail_run(run.id, f"{run.job_name!r} has no task to send")
            return
        options = dict(job.task_options)
        queue = options.pop("queue", None)
        headers = dict(options.pop("headers", None) or {})
        headers[RUN_ID_HEADER] = run.id
        result = self.app.send_task(
            job.task,
            args=list(job.task_args),
            kwargs=dict(job.task_kwargs),
            producer=self.producer,
            headers=headers,
            **options,
            **self._queue_options(queue),
        )
        if queue:
            self._declared_queues.add(queue)
        self.repository.dispatch_run(run.id, getattr(result, "id", None))

    def _maybe_monitor(self) -> None:
        now = time.monotonic()
        if now < self._next_monitor:
            return
        repository = self.repository
        for run in repository.interrupt_runs() + repository.expire_runs() + repository.interrupt_orphaned():
            logger.warning("run %s of job %r interrupted: %s", run.id, run.job_name, run.error)
        if now >= self._next_prune:
            pruned = repository.prune_runs(self.settings.run_retention, max_rows=PRUNE_MAX_ROWS)
            if pruned:
                logger.info("celery_dbsched: pruned %d finished run(s)", pruned)
            # More left than one prune may take (a backlog): go on at the next monitor step.
            self._next_prune = now + (0.0 if pruned >= PRUNE_MAX_ROWS else prune_interval(self.settings.run_retention))
        self._next_monitor = now + self.settings.monitor_interval.total_seconds()

    def _database_down(self, exc: Exception, interval: float) -> float:
        if self._db_failing_since is None:
            self._db_failing_since = time.monotonic()
            logger.error("celery_dbsched: database unavailable, backing off: %s", exc)
        else:
            logger.debug("celery_dbsched: database still unavailable: %s", exc)
        self._db_backoff = min(max(self._db_backoff * 2, 0.5), interval)
        return self._db_backoff
