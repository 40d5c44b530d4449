"""Issue 3: operator controls, as functions and as `celery -A proj dbsched pause|resume|trigger|cancel NAME`.

The functions run on a frozen database clock (TestScheduler); the commands run in real `celery`
subprocesses against the same database as the test, on the database's own clock.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from celery.schedules import crontab
from helpers.apps import TestSchedulerFactory, make_app, noop, seconds
from helpers.processes import REPO_DIR, TESTS_DIR
from helpers.services import Database

from celery_dbsched import (
    DbschedError,
    InvalidRunState,
    JobContext,
    JobNotFound,
    JobPaused,
    cancel_job,
    cancel_run,
    job,
    pause_job,
    remove_job,
    resume_job,
    trigger_job,
)
from celery_dbsched.registry import registry_for

UTC = dt.timezone.utc
T0 = dt.datetime(2026, 2, 2, 9, 0, tzinfo=UTC)
CONTROLS = {
    "pause": pause_job,
    "resume": resume_job,
    "trigger": trigger_job,
    "cancel": cancel_job,
    "remove": remove_job,
}


# --- the functions ------------------------------------------------------------------------------------


def test_paused_job_is_not_claimed(scheduler: TestSchedulerFactory) -> None:
    app = make_app()
    job(app, name="paused", description="paused", every=60)(noop)
    job(app, name="control", description="not paused", every=60)(noop)
    s = scheduler(app)
    record = pause_job(app, "paused")
    assert record.paused is True
    for minute in range(5):
        s.freeze(T0 + dt.timedelta(minutes=minute, seconds=1))
        assert [r.job_name for r in s.tick()] == ["control"]
    assert s.runs("paused") == []
    assert s.job("paused").paused is True
    assert s.job("paused").policy.enabled is True  # paused is the operator's, not the code's `enabled`


def test_pause_lets_the_active_run_finish(scheduler: TestSchedulerFactory) -> None:
    app = make_app()
    job(app, name="p", description="p", every=60)(noop)
    s = scheduler(app)
    [run] = s.claim()
    pause_job(app, "p")
    finished = s.run(run)
    assert finished is not None and finished.status == "completed"


def test_resume_moves_a_passed_slot_to_the_next_slot(scheduler: TestSchedulerFactory) -> None:
    app = make_app()
    job(app, name="interval", description="every minute", every=60)(noop)
    job(app, name="daily", description="06:00", schedule=crontab(minute=0, hour=6))(noop)
    s = scheduler(app)
    pause_job(app, "interval")
    pause_job(app, "daily")
    s.freeze(T0 + dt.timedelta(days=1, seconds=150))  # both slots passed while paused
    assert s.tick() == []

    resumed = resume_job(app, "interval")
    assert resumed.paused is False
    assert resumed.next_scheduled_run == T0 + dt.timedelta(days=1, seconds=180)  # on its cadence
    assert resume_job(app, "daily").next_scheduled_run == dt.datetime(2026, 2, 4, 6, 0, tzinfo=UTC)
    assert s.tick() == []  # no immediate fire for the slots missed while paused

    s.freeze(T0 + dt.timedelta(days=1, seconds=180))
    assert [r.job_name for r in s.tick()] == ["interval"]


def test_resume_keeps_a_slot_that_has_not_passed(scheduler: TestSchedulerFactory) -> None:
    app = make_app()
    job(app, name="j", description="hourly", every=3600)(noop)
    s = scheduler(app)
    s.tick()
    pause_job(app, "j")
    s.freeze(T0 + seconds(60))
    assert resume_job(app, "j").next_scheduled_run == T0 + seconds(3600)
    assert resume_job(app, "j").next_scheduled_run == T0 + seconds(3600)  # resuming twice is harmless


def test_trigger_makes_a_job_due_now(scheduler: TestSchedulerFactory) -> None:
    app = make_app()
    job(app, name="hourly", description="hourly", every=3600)(noop)
    s = scheduler(app)
    s.tick()
    s.freeze(T0 + seconds(10))
    assert s.tick() == []
    assert trigger_job(app, "hourly").next_scheduled_run == T0 + seconds(10)
    [run] = s.tick()
    assert run.job_name == "hourly" and run.status == "completed"
    assert s.tick() == []  # once


def test_trigger_while_running_runs_again_when_the_run_ends(scheduler: TestSchedulerFactory) -> None:
    app = make_app()
    job(app, name="hourly", description="hourly", every=3600)(noop)
    s = scheduler(app)
    [run] = s.claim()
    trigger_job(app, "hourly")
    assert s.claim() == []  # still one active run at a time
    s.freeze(T0 + seconds(30))
    s.run(run)
    assert s.job("hourly").next_scheduled_run <= T0 + seconds(30)  # the trigger was kept, not lost
    assert [r.status for r in s.tick()] == ["completed"]


def test_trigger_refuses_paused_and_disabled_jobs(scheduler: TestSchedulerFactory) -> None:
    app = make_app()
    job(app, name="paused", description="paused", every=3600)(noop)
    job(app, name="disabled", description="disabled", every=3600, enabled=False)(noop)
    s = scheduler(app)
    s.tick()
    pause_job(app, "paused")
    with pytest.raises(JobPaused, match="paused"):
        trigger_job(app, "paused")
    with pytest.raises(JobPaused, match="disabled"):
        trigger_job(app, "disabled")
    s.freeze(T0 + seconds(10))
    assert s.tick() == []
    assert s.job("paused").next_scheduled_run == T0 + seconds(3600)


def _two_queued(scheduler: TestSchedulerFactory) -> tuple[Any, Any, dict[str, Any]]:
    """An app with jobs `c` and `control`, its TestScheduler, and their queued runs by job name."""
    app = make_app()
    job(app, name="c", description="c", every=60)(noop)
    job(app, name="control", description="control", every=60)(noop)
    s = scheduler(app)
    return app, s, {r.job_name: r for r in s.claim()}


def test_cancel_interrupts_a_queued_run(scheduler: TestSchedulerFactory) -> None:
    app, s, runs = _two_queued(scheduler)
    [cancelled] = cancel_job(app, "c")
    assert cancelled.id == runs["c"].id
    assert cancelled.status == "interrupted"
    assert cancelled.error is not None and cancelled.error.startswith("cancelled")
    assert s.run(runs["c"]) is None  # a worker that receives the message now drops it
    assert s.repository.lookup_run(runs["control"].id).status == "queued"
    assert cancel_job(app, "c") == []  # nothing active any more


def test_cancel_run_interrupts_one_run(scheduler: TestSchedulerFactory) -> None:
    app, s, runs = _two_queued(scheduler)
    cancelled = cancel_run(app, runs["c"].id)
    assert cancelled.status == "interrupted" and cancelled.error == "cancelled: by an operator"
    assert s.repository.lookup_run(runs["control"].id).status == "queued"
    assert s.job("c").next_scheduled_run > T0  # its next slot, not due again at once
    with pytest.raises(InvalidRunState, match=f"run {runs['c'].id} is interrupted, not queued or running"):
        cancel_run(app, runs["c"].id)


def test_cancel_stops_a_running_job_and_it_waits_for_its_next_slot(scheduler: TestSchedulerFactory) -> None:
    app = make_app()
    started = threading.Event()
    outcome: list[str] = []

    @job(app, name="long", description="runs until cancelled", every=60)
    def long(ctx: JobContext) -> None:
        started.set()
        if ctx.wait(120):
            outcome.append(ctx.cancel_reason or "?")
            ctx.check_cancelled()
        outcome.append("ran to the end")

    s = scheduler(app, monitor_interval=0.05)
    [run] = s.claim()
    worker = threading.Thread(target=s.run, args=(run,))
    worker.start()
    try:
        assert started.wait(60)
        [cancelled] = cancel_job(app, "long")
        assert cancelled.id == run.id
        worker.join(timeout=60)
        assert not worker.is_alive()
    finally:
        if worker.is_alive():
            cancel_job(app, "long")
            worker.join(timeout=60)
    assert len(outcome) == 1 and "cancelled" in outcome[0]  # the job's context was cancelled
    final = s.repository.lookup_run(run.id)
    assert final.status == "interrupted"
    assert final.error is not None and final.error.startswith("cancelled")
    # Cancelled means "not now": not claimed again at once for the same slot, but at the next one.
    assert s.claim() == []
    assert s.job("long").next_scheduled_run == T0 + seconds(60)


def test_remove_job_takes_out_a_job_gone_from_the_code(scheduler: TestSchedulerFactory) -> None:
    old = make_app()
    job(old, name="gone", description="deleted from the code since", every=60)(noop)
    scheduler(old)  # a worker of the old code registered it
    new = make_app()
    job(new, name="kept", description="still in the code", every=60)(noop)
    s = scheduler(new)
    with pytest.raises(DbschedError, match=r"^job 'kept' is still in this app's code \(@job / register_job\)"):
        remove_job(new, "kept")
    assert remove_job(new, "gone").policy.enabled is False
    assert [run.job_name for run in s.tick()] == ["kept"]  # "gone" is never claimed again
    assert s.repository.list_runs(job_name="gone") == []
    # A worker that still has it in its code enables it again: what `remove` refuses a declared job for.
    registry_for(old).sync(s.repository)
    assert s.job("gone").policy.enabled is True


@pytest.mark.parametrize("control", list(CONTROLS))
def test_unknown_and_empty_names(scheduler: TestSchedulerFactory, control: str) -> None:
    app = make_app()
    scheduler(app)
    function = CONTROLS[control]
    with pytest.raises(JobNotFound, match=r"'no\.such\.job' not found"):
        function(app, "no.such.job")
    for empty in ("", "   "):
        with pytest.raises(ValueError, match="empty"):
            function(app, empty)


# --- the commands -------------------------------------------------------------------------------------


def dbsched_cli(database: Database, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), str(REPO_DIR)]),
        "CONTROLS_DATABASE_URL": database.url,
    }
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "controls_app", "dbsched", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=cwd,
        check=False,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result.stdout


@pytest.mark.processes  # the CLI, as subprocesses
def test_commands_pause_resume_trigger_cancel(
    database: Database, scheduler: TestSchedulerFactory, tmp_path: Path
) -> None:
    app = make_app()
    job(app, name="reports.hourly", description="hourly", every=3600)(noop)
    job(app, name="sync", description="every minute", every=60)(noop)
    s = scheduler(app, now=None)  # the database's own clock: the commands run in other processes
    assert sorted(r.job_name for r in s.tick()) == ["reports.hourly", "sync"]
    next_sync = s.job("sync").next_scheduled_run

    assert "paused sync" in ok(dbsched_cli(database, tmp_path, "pause", "sync"))
    assert s.job("sync").paused is True
    s.clock.freeze(next_sync + seconds(150))  # (only this process's view) slots passed
    assert s.tick() == []
    s.clock.shift_to(dt.timedelta(0))
    s.repository.update_job_next_run_in_at_least("sync", dt.timedelta(0))  # due now, but paused
    assert s.tick() == []

    out = ok(dbsched_cli(database, tmp_path, "resume", "sync"))
    assert "resumed sync" in out
    resumed = s.job("sync")
    assert resumed.paused is False
    assert resumed.next_scheduled_run > s.now()  # no immediate fire
    assert resumed.next_scheduled_run.strftime("%Y-%m-%d %H:%M:%S") in out
    assert s.tick() == []

    ok(dbsched_cli(database, tmp_path, "pause", "reports.hourly"))
    refused = dbsched_cli(database, tmp_path, "trigger", "reports.hourly")
    assert refused.returncode != 0
    assert "paused" in refused.stderr and "reports.hourly" in refused.stderr
    ok(dbsched_cli(database, tmp_path, "resume", "reports.hourly"))
    assert s.tick() == []  # hourly: not due for an hour
    assert "triggered reports.hourly" in ok(dbsched_cli(database, tmp_path, "trigger", "reports.hourly"))
    [run] = s.tick()
    assert run.job_name == "reports.hourly" and run.status == "completed"

    s.repository.update_job_next_run_in_at_least("reports.hourly", dt.timedelta(0))
    [queued] = s.claim()
    out = ok(dbsched_cli(database, tmp_path, "cancel", "reports.hourly"))
    assert out == f"cancelled run {queued.id} of reports.hourly: it was queued and will not start\n"
    cancelled = s.repository.lookup_run(queued.id)
    assert cancelled.status == "interrupted"
    assert cancelled.error is not None and cancelled.error.startswith("cancelled")
    assert "reports.hourly has no active run" in ok(dbsched_cli(database, tmp_path, "cancel", "reports.hourly"))


@pytest.mark.processes  # the CLI, as subprocesses
@pytest.mark.parametrize("command", list(CONTROLS))
def test_commands_refuse_unknown_and_empty_names(sqlite_database: Database, tmp_path: Path, command: str) -> None:
    sqlite_database.migrated_repository()
    unknown = dbsched_cli(sqlite_database, tmp_path, command, "no.such.job")
    assert unknown.returncode != 0
    assert "job 'no.such.job' not found" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    empty = dbsched_cli(sqlite_database, tmp_path, command, "")
    assert empty.returncode != 0
    assert "empty" in empty.stderr
    assert "Traceback" not in empty.stderr
