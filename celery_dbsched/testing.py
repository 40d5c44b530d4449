"""Test helpers for users' own tests: an in-process scheduler and worker, plus pytest fixtures.

    pytest_plugins = ["celery_dbsched.testing"]

    def test_cleanup_runs(dbsched_scheduler_factory):
        scheduler = dbsched_scheduler_factory(app)
        [run] = scheduler.tick()
        assert run.status == "completed"
        scheduler.advance(timedelta(hours=1))   # move the database clock, no sleeping
        assert [r.job_name for r in scheduler.tick()] == ["myproj.cleanup"]

`TestScheduler.tick()` claims the due jobs exactly as a beat does and runs each run at once in this
process, through the same code as the worker's task, without a broker or a worker.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .binding import bind_repository
from .clock import TestClock
from .migrate import migrate
from .records import JobRecord, RunRecord
from .registry import registry_for
from .repository import JobRepository
from .runner import execute_run
from .settings import Settings
from .worker import install_worker


class TestScheduler:
    """A beat and a worker in one object, bound to a database (a temporary SQLite file by default).

    `options` are the `dbsched_*` settings without the prefix (`interrupt_threshold=10`, ...); the app's
    own settings fill the rest. While it is open, the app's API (`update_job_next_run_in_at_least(app, ...)`)
    talks to the same database and clock. `clock` (a `TestClock`) is that clock: `advance` and `freeze` move it.
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self, app: Any, database_url: str | None = None, *, now: dt.datetime | None = None, **options: Any
    ) -> None:
        """`now` freezes the database clock from the start (see `freeze`)."""
        self.app = app
        self._tmpdir: str | None = None
        conf = {key: app.conf.get(key) for key in app.conf if str(key).startswith("dbsched_")}
        for key, value in options.items():
            conf[key if key.startswith("dbsched_") else f"dbsched_{key}"] = value
        # Validate before creating anything: a bad option must not leave a temporary database behind.
        conf["dbsched_database_url"] = "sqlite:///unused.sqlite3" if database_url is None else database_url
        settings = Settings.from_mapping(conf)
        if database_url is None:
            self._tmpdir = tempfile.mkdtemp(prefix="dbsched-test-")
            database_url = f"sqlite:///{Path(self._tmpdir) / 'dbsched.sqlite3'}"
            settings = dataclasses.replace(settings, database_url=database_url)
        self.settings = settings
        self.server_id = self.settings.server_id or "test-beat"
        self.worker_id = "test-worker"
        try:
            self.clock = TestClock() if now is None else TestClock(frozen_at=now)
            self.repository = JobRepository.from_settings(self.settings, clock=self.clock)
            try:
                migrate(self.repository.engine)
                install_worker(app)  # as registering a job does: the app's worker side, should a test start one
                self.registry = registry_for(app)
                self.registry.sync(self.repository)
            except BaseException:
                self.repository.close()
                raise
        except BaseException:
            self._remove_tmpdir()
            raise
        self._previous = bind_repository(app, self.repository)
        self._closed = False

    def __enter__(self) -> TestScheduler:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Detach from the app and delete the temporary database."""
        if self._closed:
            return
        self._closed = True
        bind_repository(self.app, self._previous)
        self.registry.detach()
        self.repository.close()
        self._remove_tmpdir()

    def _remove_tmpdir(self) -> None:
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def tick(self) -> list[RunRecord]:
        """Claim every due job and run each in this process; returns the finished runs (by run id)."""
        finished: list[RunRecord] = []
        while True:
            claimed = self.repository.claim_runs(self.server_id, self.settings.run_jobs_limit).runs
            for run in claimed:
                result = execute_run(
                    self.repository,
                    self.registry.get,
                    run.id,
                    self.worker_id,
                    monitor_interval=self.settings.monitor_interval.total_seconds(),
                )
                finished.append(result if result is not None else self.repository.lookup_run(run.id))
            if len(claimed) < self.settings.run_jobs_limit:
                return finished

    def claim(self) -> list[RunRecord]:
        """Claim the due jobs as a beat does, without running them (they stay `queued`)."""
        return self.repository.claim_runs(self.server_id, self.settings.run_jobs_limit).runs

    def run(self, run: RunRecord | int) -> RunRecord | None:
        """Run one claimed run in this process, as a worker would."""
        run_id = run if isinstance(run, int) else run.id
        return execute_run(
            self.repository,
            self.registry.get,
            run_id,
            self.worker_id,
            monitor_interval=self.settings.monitor_interval.total_seconds(),
        )

    def advance(self, delta: dt.timedelta | float) -> None:
        """Move the database clock forward (for this scheduler and the app's API while it is open)."""
        seconds = delta.total_seconds() if isinstance(delta, dt.timedelta) else float(delta)
        if seconds < 0:
            raise ValueError("the clock only moves forward")
        self.clock.advance(dt.timedelta(seconds=seconds))

    def freeze(self, at: dt.datetime) -> None:
        """Stop the database clock at `at` (aware); `advance` then moves it. For schedule math at exact times."""
        self.clock.freeze(at)

    def monitor(self) -> list[RunRecord]:
        """One pass of the beat's monitor: interrupt stalled runs."""
        return self.repository.interrupt_runs()

    def job(self, name: str) -> JobRecord:
        return self.repository.lookup_job(name)

    def runs(self, job_name: str | None = None, status: str | None = None) -> list[RunRecord]:
        """Runs, oldest first."""
        return list(reversed(self.repository.list_runs(job_name=job_name, status=status, limit=100_000)))

    def now(self) -> dt.datetime:
        return self.repository.database_now()


@pytest.fixture
def dbsched_scheduler_factory() -> Iterator[Callable[..., TestScheduler]]:
    """`factory(app, database_url=None, **options) -> TestScheduler`; closed after the test."""
    created: list[TestScheduler] = []

    def factory(app: Any, database_url: str | None = None, **options: Any) -> TestScheduler:
        scheduler = TestScheduler(app, database_url, **options)
        created.append(scheduler)
        return scheduler

    yield factory
    for scheduler in reversed(created):
        scheduler.close()


@pytest.fixture
def dbsched_app() -> Any:
    """Override in your conftest.py to return your Celery app; `dbsched_scheduler` uses it."""
    raise pytest.UsageError("define a `dbsched_app` fixture returning your Celery app to use `dbsched_scheduler`")


@pytest.fixture
def dbsched_scheduler(dbsched_app: Any, dbsched_scheduler_factory: Callable[..., TestScheduler]) -> TestScheduler:
    """A `TestScheduler` for the app returned by your `dbsched_app` fixture, on a temporary SQLite file."""
    return dbsched_scheduler_factory(dbsched_app)
