'''`celery_dbsched.testing`: the in-process `TestScheduler` and the pytest fixtures users get with
`pytest_plugins = ["celery_dbsched.testing"]`.

The README example (kept in step with the pytester test below, which runs exactly these files):

# proj.py
from datetime import timedelta

from celery import Celery

import celery_dbsched

app = Celery("proj")


@celery_dbsched.job(app, name="proj.cleanup", every=timedelta(hours=1))
def cleanup(ctx):
    """Delete expired sessions."""
    ctx.progress(1, 1)


# conftest.py
import pytest

from proj import app

pytest_plugins = ["celery_dbsched.testing"]


@pytest.fixture
def dbsched_app():
    return app


# test_proj.py
from datetime import timedelta


def test_cleanup_runs_every_hour(dbsched_scheduler):
    [run] = dbsched_scheduler.tick()  # claims the due jobs and runs them here, no broker or worker
    assert (run.job_name, run.status) == ("proj.cleanup", "completed")
    assert dbsched_scheduler.tick() == []  # not due again yet
    dbsched_scheduler.advance(timedelta(hours=1))  # moves the database clock: no sleeping
    assert [run.status for run in dbsched_scheduler.tick()] == ["completed"]
'''

from __future__ import annotations

import datetime as dt
import os
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from celery_dbsched import JobContext, JobNotFound, JobStatus, job, update_job_next_run_in_at_least
from celery_dbsched.binding import bind_repository
from celery_dbsched.testing import TestScheduler

pytest_plugins = ["pytester"]

HOUR = dt.timedelta(hours=1)
SLACK = dt.timedelta(seconds=1)

PROJ_PY = '''\
from datetime import timedelta

from celery import Celery

import celery_dbsched

app = Celery("proj")


@celery_dbsched.job(app, name="proj.cleanup", every=timedelta(hours=1))
def cleanup(ctx):
    """Delete expired sessions."""
    ctx.progress(1, 1)
'''

CONFTEST_PY = """\
import pytest

from proj import app

pytest_plugins = ["celery_dbsched.testing"]


@pytest.fixture
def dbsched_app():
    return app
"""

TEST_PROJ_PY = """\
from datetime import timedelta


def test_cleanup_runs_every_hour(dbsched_scheduler):
    [run] = dbsched_scheduler.tick()  # claims the due jobs and runs them here, no broker or worker
    assert (run.job_name, run.status) == ("proj.cleanup", "completed")
    assert dbsched_scheduler.tick() == []  # not due again yet
    dbsched_scheduler.advance(timedelta(hours=1))  # moves the database clock: no sleeping
    assert [run.status for run in dbsched_scheduler.tick()] == ["completed"]
"""


def add_jobs(app: Celery) -> dict[str, list[int]]:
    """`hourly` (progress 3/3, every hour) and `flaky` (fails), registered on `app`; returns their call log."""
    calls: dict[str, list[int]] = {"hourly": [], "flaky": []}

    @job(app, name="hourly", every=HOUR)
    def hourly(ctx: JobContext) -> None:
        """Runs every hour."""
        calls["hourly"].append(ctx.run_id)
        ctx.progress(3, 3)

    @job(app, name="flaky", every=HOUR)
    def flaky(ctx: JobContext) -> None:
        """Always fails."""
        calls["flaky"].append(ctx.run_id)
        ctx.progress(1, 2)
        raise RuntimeError("flaky failed")

    return calls


# -- tick ------------------------------------------------------------------------------------------------------


def test_tick_runs_the_due_jobs_in_process(app: Celery) -> None:
    calls = add_jobs(app)
    with TestScheduler(app) as scheduler:
        runs = scheduler.tick()
        assert [run.id for run in runs] == sorted(run.id for run in runs)
        by_name = {run.job_name: run for run in runs}
        hourly, flaky = by_name["hourly"], by_name["flaky"]
        assert (len(runs), hourly.status, flaky.status) == (2, "completed", "failed")
        assert calls == {"hourly": [hourly.id], "flaky": [flaky.id]}
        assert hourly.progress == JobStatus(3, 3)
        assert hourly.claimed_by == "test-beat" and hourly.worker == "test-worker"
        assert flaky.error is not None and "RuntimeError: flaky failed" in flaky.error
        assert flaky.progress == JobStatus(1, 2)
        assert scheduler.runs() == runs  # oldest first
        assert scheduler.runs("hourly") == [hourly]
        assert scheduler.runs(status="failed") == [flaky]


def test_next_run_times_are_on_the_database_clock(app: Celery) -> None:
    add_jobs(app)
    with TestScheduler(app) as scheduler:
        before = scheduler.now()
        [hourly] = [run for run in scheduler.tick() if run.job_name == "hourly"]
        assert hourly.end_time is not None
        next_run = scheduler.job("hourly").next_scheduled_run
        assert hourly.scheduled_for is not None
        assert next_run == hourly.scheduled_for + HOUR  # a fixed cadence: its slot + every, not its end + every
        assert hourly.scheduled_for <= before <= hourly.end_time  # registered, then ticked
        assert next_run > hourly.end_time
        assert scheduler.tick() == []  # nothing else is due: the flaky job backs off


def test_advance_makes_the_next_run_due(app: Celery) -> None:
    calls = add_jobs(app)
    with TestScheduler(app, retry_backoff=(HOUR * 2, HOUR * 3)) as scheduler:
        scheduler.tick()
        scheduler.advance(dt.timedelta(minutes=59))
        assert scheduler.tick() == []
        scheduler.advance(61)  # seconds work too
        # Both: a failing job's backoff is never longer than its own interval.
        assert sorted(run.job_name for run in scheduler.tick()) == ["flaky", "hourly"]
        assert len(calls["hourly"]) == 2
        assert scheduler.now() >= scheduler.repository.database_now() - SLACK


def test_advance_only_moves_forward(dbsched_scheduler: TestScheduler) -> None:
    with pytest.raises(ValueError, match="forward"):
        dbsched_scheduler.advance(-1)
    with pytest.raises(ValueError, match="forward"):
        dbsched_scheduler.advance(dt.timedelta(seconds=-1))
    assert dbsched_scheduler.clock.offset == dt.timedelta(0)


def test_a_failing_jobs_backoff_is_visible(app: Celery) -> None:
    calls = add_jobs(app)
    with TestScheduler(app, retry_backoff=(10, 60)) as scheduler:
        scheduler.tick()
        flaky = scheduler.job("flaky")
        assert flaky.failure_count == 1
        assert 9 <= (flaky.next_scheduled_run - scheduler.now()).total_seconds() <= 10
        scheduler.advance(8)
        assert scheduler.tick() == []
        scheduler.advance(3)
        assert [(run.job_name, run.status) for run in scheduler.tick()] == [("flaky", "failed")]
        assert scheduler.job("flaky").failure_count == 2
        assert 19 <= (scheduler.job("flaky").next_scheduled_run - scheduler.now()).total_seconds() <= 20
        assert len(calls["flaky"]) == 2


def test_tick_claims_in_batches_of_the_run_jobs_limit(app: Celery) -> None:
    for index in range(5):
        job(app, name=f"job-{index}", description="a job", every=HOUR)(lambda ctx: None)
    with TestScheduler(app, run_jobs_limit=2) as scheduler:
        assert scheduler.settings.run_jobs_limit == 2
        assert sorted(run.job_name for run in scheduler.tick()) == [f"job-{index}" for index in range(5)]


def test_a_job_unknown_to_the_app_fails_its_run(app: Celery, dbsched_scheduler: TestScheduler) -> None:
    dbsched_scheduler.repository.upsert_job("foreign", "registered by another app")
    [run] = dbsched_scheduler.tick()
    assert run.status == "failed"
    assert run.error is not None and "'foreign'" in run.error and "'test-worker'" in run.error


def test_a_job_registered_while_open_is_written_through(app: Celery, dbsched_scheduler: TestScheduler) -> None:
    job(app, name="late", description="registered after the scheduler opened", first_run_in=HOUR)(lambda ctx: None)
    assert dbsched_scheduler.job("late").description == "registered after the scheduler opened"
    assert dbsched_scheduler.tick() == []
    dbsched_scheduler.advance(HOUR)
    assert [run.job_name for run in dbsched_scheduler.tick()] == ["late"]


# -- claim, run, monitor ---------------------------------------------------------------------------------------


def test_claim_then_run(app: Celery) -> None:
    calls = add_jobs(app)
    with TestScheduler(app) as scheduler:
        claimed = {run.job_name: run for run in scheduler.claim()}
        assert sorted(claimed) == ["flaky", "hourly"]
        assert {run.status for run in claimed.values()} == {"queued"}
        assert calls == {"hourly": [], "flaky": []}
        assert scheduler.claim() == []  # one active run per job
        done = scheduler.run(claimed["hourly"])
        assert done is not None and done.status == "completed"
        failed = scheduler.run(claimed["flaky"].id)  # a run id works too
        assert failed is not None and failed.status == "failed"
        assert scheduler.run(claimed["hourly"]) is None  # a second delivery is dropped
        assert len(calls["hourly"]) == 1


def test_monitor_interrupts_a_stalled_run_after_the_threshold(app: Celery) -> None:
    add_jobs(app)
    with TestScheduler(app, interrupt_threshold=10) as scheduler:
        claimed = {run.job_name: run for run in scheduler.claim()}
        queued, other = claimed["hourly"], claimed["flaky"]
        scheduler.repository.start_run(other.id, "a-worker-that-died")
        scheduler.advance(9)
        assert scheduler.monitor() == []
        scheduler.advance(2)
        stalled = scheduler.monitor()
        # (Registered together, both are first due at the same instant: claimed in name order.)
        assert sorted(run.id for run in stalled) == sorted([queued.id, other.id])
        assert {run.status for run in stalled} == {"interrupted"}
        assert scheduler.run(queued) is None  # too late: the message is dropped
        assert scheduler.job("hourly").failure_count == 1


# -- options ---------------------------------------------------------------------------------------------------


def test_options_override_the_app_settings(app: Celery) -> None:
    app.conf.update(dbsched_run_jobs_limit=3, dbsched_interrupt_threshold=99, dbsched_monitor_interval=7)
    with TestScheduler(app, interrupt_threshold=10, dbsched_monitor_interval=dt.timedelta(seconds=2)) as scheduler:
        assert scheduler.settings.interrupt_threshold == dt.timedelta(seconds=10)
        assert scheduler.repository.interrupt_threshold == dt.timedelta(seconds=10)
        assert scheduler.settings.monitor_interval == dt.timedelta(seconds=2)
        assert scheduler.settings.run_jobs_limit == 3  # from the app
        assert scheduler.settings.database_url.startswith("sqlite:///")


def test_the_app_database_url_is_not_used_unless_given(app: Celery, tmp_path: Path) -> None:
    app.conf.dbsched_database_url = f"sqlite:///{tmp_path / 'production.sqlite3'}"
    with TestScheduler(app) as scheduler:
        assert "production" not in scheduler.settings.database_url
    assert not (tmp_path / "production.sqlite3").exists()


@pytest.mark.parametrize(
    ("option", "value", "key"),
    [
        ("interrupt_threshold", -1, "dbsched_interrupt_threshold"),
        ("run_jobs_limit", "many", "dbsched_run_jobs_limit"),
        ("dbsched_retry_backoff", (60, 5), "dbsched_retry_backoff"),
    ],
)
def test_a_bad_option_is_a_value_error_naming_the_key(
    app: Celery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, option: str, value: Any, key: str
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(ValueError, match=key):
        TestScheduler(app, **{option: value})
    assert list(tmp_path.iterdir()) == []  # no temporary database left behind


# -- binding and cleanup ---------------------------------------------------------------------------------------


def test_the_apps_api_uses_the_schedulers_database_and_clock(app: Celery) -> None:
    job(app, name="hourly", description="runs hourly", every=HOUR)(lambda ctx: None)
    with TestScheduler(app) as scheduler:
        scheduler.tick()
        scheduler.advance(dt.timedelta(minutes=30))
        record = update_job_next_run_in_at_least(app, "hourly", dt.timedelta(minutes=5))
        assert abs(record.next_scheduled_run - (scheduler.now() + dt.timedelta(minutes=5))) <= SLACK
        update_job_next_run_in_at_least(app, "hourly", 0)
        assert [run.job_name for run in scheduler.tick()] == ["hourly"]


def test_close_unbinds_the_app_and_deletes_the_temporary_database(app: Celery) -> None:
    scheduler = TestScheduler(app)
    database = Path(scheduler.settings.database_url.removeprefix("sqlite:///"))
    assert database.exists()
    scheduler.close()
    scheduler.close()  # idempotent
    assert not database.parent.exists()
    assert bind_repository(app, None) is None  # nothing left bound to the app


def test_a_previous_binding_is_restored_on_close(app: Celery) -> None:
    with TestScheduler(app) as outer:
        with TestScheduler(app) as inner:
            assert inner.repository is not outer.repository
            inner.repository.upsert_job("inner-only", "in the inner database")
        with pytest.raises(JobNotFound, match="inner-only"):
            update_job_next_run_in_at_least(app, "inner-only", 0)  # the outer database again: not found


def test_a_given_database_url(app: Celery, database: Any) -> None:
    add_jobs(app)
    with TestScheduler(app, database.url) as scheduler:
        assert scheduler.repository.dialect == ("postgresql" if database.kind == "postgres" else "sqlite")
        assert sorted(run.job_name for run in scheduler.tick()) == ["flaky", "hourly"]
    # The given database is the user's: it is kept, with its history.
    repository = database.repository()
    assert [job.name for job in repository.list_jobs()] == ["flaky", "hourly"]
    assert len(repository.list_runs()) == 2


# -- the pytest plugin -----------------------------------------------------------------------------------------


def test_the_readme_example_is_this_modules_docstring() -> None:
    assert __doc__ is not None
    for text in (PROJ_PY, CONFTEST_PY, TEST_PROJ_PY):
        assert text in __doc__


@pytest.mark.slow
def test_the_plugin_gives_users_a_scheduler_for_their_app(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(proj=PROJ_PY, test_proj=TEST_PROJ_PY)
    pytester.makeconftest(CONFTEST_PY)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=1)
    assert not [path for path in os.listdir(pytester.path) if path.endswith((".sqlite3", "-wal"))]


def test_the_plugins_factory_and_its_error_without_dbsched_app(pytester: pytest.Pytester) -> None:
    pytester.makeconftest('pytest_plugins = ["celery_dbsched.testing"]\n')
    pytester.makepyfile(
        test_factory=textwrap.dedent(
            """
            from celery import Celery

            import celery_dbsched

            app = Celery("factory", set_as_current=False)
            celery_dbsched.job(app, name="j", description="a job")(lambda ctx: None)

            def test_factory(dbsched_scheduler_factory):
                scheduler = dbsched_scheduler_factory(app, interrupt_threshold=10)
                assert scheduler.settings.interrupt_threshold.total_seconds() == 10
                assert [run.status for run in scheduler.tick()] == ["completed"]

            def test_needs_an_app(dbsched_scheduler):
                pass
            """
        )
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*define a `dbsched_app` fixture*"])
