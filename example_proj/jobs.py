"""Four example jobs: progress through a list, a flaky one, one that stalls on purpose, and a class."""

from __future__ import annotations

import datetime as dt
import itertools
import logging

from celery.schedules import crontab

from celery_dbsched import Job, JobContext, JobStatus, job, register_job

from .celery_app import app

logger = logging.getLogger(__name__)

ITEMS = [f"invoice-{n:03d}" for n in range(12)]


@job(app, name="example.process_invoices", every=dt.timedelta(seconds=15))
def process_invoices(ctx: JobContext) -> None:
    """Works through a list of invoices, reporting progress."""
    for done, item in enumerate(ITEMS):
        ctx.progress(done, len(ITEMS))
        if ctx.wait(0.5):  # the "work"; returns early if the run is interrupted
            ctx.check_cancelled()
        logger.info("processed %s", item)
    ctx.progress(len(ITEMS), len(ITEMS))


_attempts = itertools.count(1)


@job(app, name="example.flaky_sync", every=10)
def flaky_sync(ctx: JobContext) -> dt.timedelta | None:
    """Syncs with a partner that fails every other run (retried with backoff)."""
    attempt = next(_attempts)
    ctx.progress(0, 1)
    if attempt % 2 == 0:
        raise ConnectionError(f"partner API timed out (attempt {attempt})")
    ctx.progress(1, 1)
    return None  # use `every`


@job(
    app,
    name="example.stuck_export",
    every=dt.timedelta(minutes=5),
    interrupt_threshold=dt.timedelta(seconds=8),
)
def stuck_export(ctx: JobContext) -> None:
    """Hangs on purpose: never reports progress, so the monitor interrupts it after 8 s."""
    ctx.progress(0, 100)
    while not ctx.wait(0.5):
        pass
    logger.warning("stuck_export cancelled: %s", ctx.cancel_reason)
    ctx.check_cancelled()


@job(app, name="example.minutely_digest", schedule=crontab())
def minutely_digest(ctx: JobContext) -> None:
    """Sends a digest at the start of every minute (a crontab in the app's timezone)."""
    ctx.progress(1, 1)


class DatabaseVacuum(Job):
    """A class-based job, as in Boundary's Job interface."""

    name = "example.vacuum"
    description = "Vacuums ten tables, one by one."
    every = dt.timedelta(seconds=20)

    def __init__(self) -> None:
        self._done = 0
        self._tables = 10

    def status(self) -> JobStatus:
        return JobStatus(self._done, self._tables)

    def run(self, ctx: JobContext) -> None:
        self._done = 0
        for _ in range(self._tables):
            ctx.check_cancelled()
            ctx.wait(0.3)
            self._done += 1

    def next_run_in(self) -> dt.timedelta:
        return self.every


register_job(app, DatabaseVacuum(), first_run_in=dt.timedelta(seconds=2))
