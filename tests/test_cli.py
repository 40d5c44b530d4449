"""`celery -A proj dbsched migrate|jobs|runs`, run as a user runs it: a `celery` subprocess on a small app
(tests/cli_app.py) pointed at the test database through environment variables."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit
from zoneinfo import ZoneInfo

import pytest
from helpers.polling import wait_for
from helpers.processes import REPO_DIR, TESTS_DIR, Processes
from helpers.services import Database
from helpers.shapes import BEAT_KEYS, JOB_KEYS, RUN_KEYS, STATUS_KEYS, WORKER_KEYS
from sqlalchemy import select

from celery_dbsched import display
from celery_dbsched.clock import TestClock
from celery_dbsched.migrate import head_revision
from celery_dbsched.records import ClaimStats
from celery_dbsched.repository import JobRepository
from celery_dbsched.schedules import ClockedSchedule, CrontabSchedule, IntervalSchedule
from celery_dbsched.schema import job_table
from celery_dbsched.states import JobKind, Origin

pytestmark = pytest.mark.processes  # every command runs `celery ... dbsched` as a subprocess

# The commands are a thin layer over the repository, whose suite runs on every database; each call here is a
# `celery` subprocess. Most tests therefore run on SQLite only (this overrides the `database` fixture's
# params); those where the database shows through (migrate, status with real processes, JSON and a run's every
# field, cancel with a worker) run on PostgreSQL too. It keeps about a minute of subprocesses out of CI.
ON_SQLITE = pytest.mark.parametrize("database", ["sqlite"], indirect=True)


@dataclass
class Result:
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def rows(self) -> list[list[str]]:
        """The table's data rows, split on whitespace (ids, names and states hold no spaces)."""
        lines = self.stdout.strip().split("\n\n")[0].splitlines()  # the notes after a blank line are not rows
        assert lines and lines[0].startswith(("ID", "NAME")), self.output
        return [line.split() for line in lines[1:]]

    @property
    def notes(self) -> list[str]:
        """The lines after the table's blank line."""
        _, _, notes = self.stdout.strip().partition("\n\n")
        return notes.splitlines()


def dbsched(
    database_url: str,
    *args: str,
    settings: dict[str, Any] | None = None,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> Result:
    """`celery -A cli_app dbsched ARGS` on `database_url`, with `settings` merged into the app's conf and `env`
    (other DBSCHED_TEST_APP_* variables, see tests/cli_app.py)."""
    completed = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "cli_app", "dbsched", *args],
        capture_output=True,
        text=True,
        env=cli_env(database_url, settings, env),
        cwd=cwd or tempfile.gettempdir(),  # nothing the CLI might write lands in the repository
        timeout=120,
    )
    return Result(args, completed.returncode, completed.stdout, completed.stderr)


def in_parallel(calls: list[Callable[[], Result]]) -> list[Result]:
    """Independent CLI processes, four at a time (each spends most of its second importing: CI time), their
    results in the order of `calls`."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda call: call(), calls))


def cli_env(
    database_url: str, settings: dict[str, Any] | None = None, env: dict[str, str] | None = None
) -> dict[str, str]:
    """The environment of `celery -A cli_app ...` on `database_url` (see `dbsched`)."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("DBSCHED_TEST_APP_")}, **(env or {})}
    env.update(PYTHONPATH=os.pathsep.join([str(TESTS_DIR), str(REPO_DIR)]), DBSCHED_TEST_APP_DB=database_url)
    if settings:
        env["DBSCHED_TEST_APP_SETTINGS"] = json.dumps(settings)
    return env


def ok(result: Result) -> Result:
    assert result.returncode == 0, result
    assert "Traceback" not in result.output, result.output
    return result


def clean_error(result: Result) -> Result:
    """A failure the user can act on: non-zero exit, an `Error:` line, no traceback."""
    assert result.returncode != 0, result
    assert "Error:" in result.stderr, result
    assert "Traceback" not in result.output, result.output
    return result


# --- migrate ------------------------------------------------------------------------------------------------


def test_migrate_applies_the_schema_once(database: Database) -> None:
    head = head_revision()
    first = ok(dbsched(database.url, "migrate"))
    assert f"schema migrated from nothing to {head}" in first.stdout
    again = ok(dbsched(database.url, "migrate"))
    assert f"schema already at revision {head}" in again.stdout
    assert ok(dbsched(database.url, "jobs")).stdout.strip() == "no jobs registered"
    assert ok(dbsched(database.url, "runs")).stdout.strip() == "no runs"


def test_listing_before_migrate_says_to_migrate(sqlite_database: Database) -> None:
    for command in ("jobs", "runs"):
        result = clean_error(dbsched(sqlite_database.url, command))
        assert "dbsched migrate" in result.stderr


# --- jobs ---------------------------------------------------------------------------------------------------


@ON_SQLITE
def test_jobs_lists_names_next_runs_and_descriptions(database: Database) -> None:
    repository = database.migrated_repository()
    repository.upsert_job(
        "reports.daily",
        "Builds the daily report",
        first_run_in=dt.timedelta(hours=13, minutes=55),
        every=dt.timedelta(days=1),
        queue="reports",
    )
    repository.upsert_job("cleanup", "Deletes old files", every=dt.timedelta(seconds=60))
    repository.upsert_job("paused.job", "Paused", every=dt.timedelta(seconds=60))
    repository.set_paused("paused.job", True)
    repository.upsert_job("off.job", "Disabled", every=dt.timedelta(seconds=60), enabled=False)
    result = ok(dbsched(database.url, "jobs"))
    lines = result.stdout.strip().splitlines()
    assert re.split(r"\s{2,}", lines[0]) == [
        "NAME", "STATE", "ORIGIN", "NEXT RUN (UTC)", "DUE", "LAST RUN", "SCHEDULE", "QUEUE", "FAILURES", "DESCRIPTION"
    ]  # fmt: skip
    assert [line.split()[0] for line in lines[1:]] == ["cleanup", "off.job", "paused.job", "reports.daily"]

    def next_run(name: str, zone: str = "UTC") -> str:
        when = repository.lookup_job(name).next_scheduled_run
        return when.astimezone(ZoneInfo(zone)).strftime("%Y-%m-%d %H:%M:%S")

    cleanup, off, paused, daily = (re.split(r"\s{2,}", line) for line in lines[1:])
    assert cleanup[:6] == ["cleanup", "enabled", "code", next_run("cleanup"), "due", "-"]
    assert cleanup[6:] == ["every 1 min", "-", "0", "Deletes old files"]
    assert off[:5] == ["off.job", "disabled", "code", next_run("off.job"), "disabled"]
    assert paused[:5] == ["paused.job", "paused", "code", next_run("paused.job"), "paused"]  # not "due"
    assert daily[:4] == ["reports.daily", "enabled", "code", next_run("reports.daily")]
    assert daily[4] in ("in 13 h 54 min", "in 13 h 55 min"), daily  # as people read it, not "in 50085s"
    assert daily[6:] == ["every 1 d", "reports", "0", "Builds the daily report"]

    berlin = ok(dbsched(database.url, "jobs", "--tz", "Europe/Berlin")).stdout.splitlines()
    assert "NEXT RUN (Europe/Berlin)" in berlin[0]
    assert next_run("reports.daily", "Europe/Berlin") in berlin[4]


def test_jobs_with_an_unknown_zone_is_a_usage_error(sqlite_database: Database) -> None:
    sqlite_database.migrated_repository()
    result = dbsched(sqlite_database.url, "jobs", "--tz", "Mars/Olympus")
    assert result.returncode == 2, result
    assert "Invalid value for '--tz': unknown timezone 'Mars/Olympus'" in result.stderr
    assert "Traceback" not in result.output


@ON_SQLITE
def test_jobs_shows_each_jobs_last_outcome(database: Database) -> None:
    repository = database.migrated_repository()
    _history(repository)
    repository.upsert_job("c", "job c", first_run_in=dt.timedelta(hours=1))
    result = ok(dbsched(database.url, "jobs"))
    last = {line.split()[0]: re.split(r"\s{2,}", line)[5] for line in result.stdout.splitlines()[1:]}
    assert re.fullmatch(r"queued for \d+(\.\d)? s", last["a"]), last  # its newest run; still active
    assert re.fullmatch(r"queued for \d+(\.\d)? s", last["b"]), last
    assert last["c"] == "-"
    [run] = repository.list_runs(job_name="b", limit=1)
    repository.start_run(run.id, "worker-3")
    repository.fail_run(run.id, "boom")
    last_b = re.split(r"\s{2,}", ok(dbsched(database.url, "jobs")).stdout.splitlines()[2])[5]
    assert re.fullmatch(r"failed \d+(\.\d)? s ago", last_b), last_b


@ON_SQLITE
def test_jobs_marks_a_job_edited_on_the_dashboard(database: Database) -> None:
    repository = database.migrated_repository()
    repository.upsert_job("edited", "edited on the dashboard", every=dt.timedelta(seconds=60))
    repository.upsert_job("plain", "as the code says", every=dt.timedelta(seconds=60))
    repository.edit_job("edited", every=dt.timedelta(seconds=300))
    result = ok(dbsched(database.url, "jobs"))
    lines = result.stdout.split("\n\n")[0].splitlines()[1:]
    schedules = {row[0]: row[6] for row in (re.split(r"\s{2,}", line) for line in lines)}
    assert schedules == {"edited": "every 5 min (edited)", "plain": "every 1 min"}
    assert result.notes == [
        "edited: edited: edited on the dashboard (overrides the code): every; "
        'its page\'s "revert to code" drops the edit'
    ]
    listed = {job["name"]: job for job in json_of(dbsched(database.url, "jobs", "--json"))["jobs"]}
    assert listed["edited"]["overrides"] == {"every": {"code": 60.0, "edited": 300.0}}
    assert listed["plain"]["overrides"] == {}


@ON_SQLITE
def test_jobs_flags_a_beat_schedule_entry_whose_task_the_app_does_not_know(database: Database) -> None:
    repository = database.migrated_repository()
    every = dt.timedelta(minutes=5)
    for name, task in (("entry.known", "celery.backend_cleanup"), ("entry.typo", "reports.tasks.nigthly")):
        repository.upsert_job(name, f"beat_schedule: {task}", every=every, kind=JobKind.TASK, task=task)
    repository.upsert_job("entry.off", "off", every=every, kind=JobKind.TASK, task="gone", enabled=False)
    result = ok(dbsched(database.url, "jobs"))
    assert {row[0]: row[1] for row in result.rows()} == {
        "entry.known": "enabled",
        "entry.off": "disabled",  # not sent anyway
        "entry.typo": "unknown-task",
    }
    assert result.notes == [
        "unknown-task: entry.typo: this app does not know the task 'reports.tasks.nigthly': its runs are sent and "
        "never run (check the task name and the workers' imports)"
    ]


@ON_SQLITE
def test_jobs_flags_a_job_no_worker_registered_since_the_latest_worker_start(database: Database) -> None:
    repository = database.migrated_repository()
    for name in ("kept", "gone", "before"):
        repository.upsert_job(name, name, every=dt.timedelta(minutes=5))
    assert repository.orphaned_jobs() == {}  # no worker has registered anything yet: nothing to judge by
    repository.mark_registered(["kept", "gone"])  # a worker started with both
    assert repository.orphaned_jobs() == {}  # "before" was created within the grace of that start
    an_hour_ago = repository.database_now() - dt.timedelta(hours=1)
    with repository.engine.begin() as conn:  # that worker started an hour ago; "before" predates it
        conn.execute(job_table.update().values(create_time=an_hour_ago))
        conn.execute(
            job_table.update().where(job_table.c.registered_time.is_not(None)).values(registered_time=an_hour_ago)
        )
    repository.mark_registered(["kept"])  # now a worker started without "gone" in its code
    assert repository.orphaned_jobs() == {"before": None, "gone": an_hour_ago}
    repository.set_paused("before", True)

    result = ok(dbsched(database.url, "jobs"))
    assert {row[0]: row[1] for row in result.rows()} == {"before": "paused", "gone": "orphaned", "kept": "enabled"}
    when = an_hour_ago.strftime("%Y-%m-%d %H:%M:%S")
    assert result.notes == [
        f"orphaned: gone: last registered {when}; the workers started since do not have it in their code, so its "
        "runs fail. Remove it: celery -A proj dbsched remove gone"
    ]
    ok(dbsched(database.url, "remove", "gone"))
    assert repository.orphaned_jobs() == {"before": None}  # disabled: no longer retried, no longer flagged


# --- runs ---------------------------------------------------------------------------------------------------


def _history(repository: JobRepository) -> dict[str, int]:
    """a: completed (3/3), failed, queued; b: queued. Returns the run ids by role."""
    repository.upsert_job("a", "job a")
    repository.upsert_job("b", "job b", first_run_in=dt.timedelta(hours=1))
    ids: dict[str, int] = {}
    [run] = repository.claim_runs("beat-1", 10).runs
    repository.start_run(run.id, "worker-1")
    repository.update_progress(run.id, 1, 3)
    repository.complete_run(run.id, dt.timedelta(0), progress=None)
    repository.update_job_next_run_in_at_least("a", dt.timedelta(0))
    ids["a-completed"] = run.id
    [run] = repository.claim_runs("beat-1", 10).runs
    repository.start_run(run.id, "worker-2")
    repository.fail_run(run.id, "Traceback (most recent call last):\n  ...\nValueError: bad thing\n")
    ids["a-failed"] = run.id
    repository.update_job_next_run_in_at_least("a", dt.timedelta(0))
    repository.update_job_next_run_in_at_least("b", dt.timedelta(0))
    for run in repository.claim_runs("beat-2", 10).runs:
        ids[f"{run.job_name}-queued"] = run.id
    return ids


@ON_SQLITE
def test_runs_lists_and_filters(database: Database) -> None:
    repository = database.migrated_repository()
    ids = _history(repository)

    everything = ok(dbsched(database.url, "runs")).rows()
    assert [int(row[0]) for row in everything] == sorted(ids.values(), reverse=True)  # newest first

    of_a = ok(dbsched(database.url, "runs", "--job", "a")).rows()
    assert {row[1] for row in of_a} == {"a"} and len(of_a) == 3

    failed = ok(dbsched(database.url, "runs", "--job", "a", "--status", "failed"))
    [row] = failed.rows()
    assert row[:4] == [str(ids["a-failed"]), "a", "failed", "0/0"]
    assert failed.stdout.rstrip().endswith("ValueError: bad thing")  # the error's last line
    assert "worker-2" in row and "beat-1" in row

    completed = ok(dbsched(database.url, "runs", "--status", "completed")).rows()
    assert [row[:4] for row in completed] == [[str(ids["a-completed"]), "a", "completed", "1/3"]]

    queued = ok(dbsched(database.url, "runs", "--status", "queued")).rows()
    assert sorted((row[1], int(row[0])) for row in queued) == [("a", ids["a-queued"]), ("b", ids["b-queued"])]

    assert ok(dbsched(database.url, "runs", "--job", "b", "--status", "completed")).stdout.strip() == "no runs"
    assert len(ok(dbsched(database.url, "runs", "--limit", "2")).rows()) == 2


def test_runs_of_an_unknown_job_is_an_error(sqlite_database: Database) -> None:
    sqlite_database.migrated_repository()
    result = clean_error(dbsched(sqlite_database.url, "runs", "--job", "no.such.job"))
    assert "job 'no.such.job' not found" in result.stderr


def test_runs_with_an_invalid_status_is_a_usage_error(sqlite_database: Database) -> None:
    sqlite_database.migrated_repository()
    result = dbsched(sqlite_database.url, "runs", "--status", "exploded")
    assert result.returncode == 2
    assert "Invalid value for '--status'" in result.stderr and "'exploded'" in result.stderr
    assert "Traceback" not in result.output


@ON_SQLITE
def test_runs_show_durations_and_filter_by_since(database: Database) -> None:
    repository = database.migrated_repository()
    ids = _history(repository)
    result = ok(dbsched(database.url, "runs"))
    header = re.split(r"\s{2,}", result.stdout.splitlines()[0])
    assert header == [
        "ID", "JOB", "STATUS", "PROGRESS", "CLAIMED (UTC)", "STARTED (UTC)", "ENDED (UTC)", "DURATION", "CLAIMED BY",
        "WORKER", "ERROR",
    ]  # fmt: skip
    durations = {int(line.split()[0]): re.split(r"\s{2,}", line)[7] for line in result.stdout.splitlines()[1:]}
    assert re.fullmatch(r"\d+\.\d s|\d s", durations[ids["a-completed"]]), durations  # started to ended
    assert durations[ids["b-queued"]] == "-"  # never started

    assert len(ok(dbsched(database.url, "runs", "--since", "1h")).rows()) == 4
    assert len(ok(dbsched(database.url, "runs", "--since", "90s", "--job", "a")).rows()) == 3
    tomorrow = (repository.database_now() + dt.timedelta(days=1)).strftime("%Y-%m-%dT%H:%M")
    assert ok(dbsched(database.url, "runs", "--since", tomorrow)).stdout.strip() == "no runs"
    yesterday = (repository.database_now() - dt.timedelta(days=1)).isoformat()
    assert len(ok(dbsched(database.url, "runs", "--since", yesterday)).rows()) == 4


def test_runs_since_something_else_is_a_usage_error(sqlite_database: Database) -> None:
    sqlite_database.migrated_repository()
    result = dbsched(sqlite_database.url, "runs", "--since", "yesterday")
    assert result.returncode == 2, result
    assert (
        "Invalid value for '--since': expected a duration such as 30m, 1h, 2d or an ISO time such as "
        "2026-12-05T08:00, got 'yesterday'"
    ) in result.stderr
    assert "Traceback" not in result.output


def test_run_shows_every_field_and_the_whole_traceback(database: Database) -> None:
    repository = database.migrated_repository()
    ids = _history(repository)
    failed = repository.lookup_run(ids["a-failed"])
    result = dbsched(database.url, "run", str(failed.id))
    assert (result.returncode, result.stderr) == (0, ""), result  # the traceback shown is the run's own
    fields = dict(re.split(r":\s+", line, maxsplit=1) for line in result.stdout.split("\nerror:")[0].splitlines())
    assert fields == {
        "run": str(failed.id),
        "job": "a (job)",
        "status": "failed",
        "progress": "0/0",
        "progress history": "not kept: a run stores its latest progress only (completed/total above)",
        "scheduled for (UTC)": _utc(failed.scheduled_for),
        "claimed (UTC)": _utc(failed.create_time),
        "started (UTC)": _utc(failed.start_time),
        "last progress (UTC)": _utc(failed.update_time),
        "ended (UTC)": _utc(failed.end_time),
        "code stopped (UTC)": "-",
        "duration": fields["duration"],
        "claimed by": "beat-1",
        "worker": "worker-2",
        "queue": "-",
        "task id": "-",
        "slot": "0",
        "pull-in requested (UTC)": "-",
    }
    assert re.fullmatch(r"\d+(\.\d)? s", fields["duration"]), fields
    assert result.stdout.endswith("error:\nTraceback (most recent call last):\n  ...\nValueError: bad thing\n")

    queued = ok(dbsched(database.url, "run", str(ids["b-queued"]), "--tz", "Asia/Tokyo")).stdout
    assert re.search(r"^status: +queued$", queued, re.M) and re.search(r"^duration: +- \(not started\)$", queued, re.M)
    assert "claimed (Asia/Tokyo):" in queued and queued.endswith("error: -\n")


def _utc(value: dt.datetime | None) -> str:
    assert value is not None
    return value.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


@ON_SQLITE
def test_run_of_an_unknown_id_is_an_error(database: Database) -> None:
    database.migrated_repository()
    assert "Error: run 424242 not found" in clean_error(dbsched(database.url, "run", "424242")).stderr


def test_read_only_commands_never_create_the_database(tmp_path: Path) -> None:
    path = tmp_path / "not" / "there.sqlite3"
    for args in (("jobs",), ("runs",), ("run", "1"), ("pause", "x"), ("cancel", "x"), ("remove", "x")):
        result = clean_error(dbsched(f"sqlite:///{path}", *args))
        assert result.stderr.strip() == (
            f"Error: no database at {path} (dbsched_database_url): nothing is stored there; check the setting, or "
            "create it with `celery -A proj dbsched migrate` (workers and beats also create it at start)"
        ), args
    assert not (tmp_path / "not").exists()


# --- remove and cancel --------------------------------------------------------------------------------------


@ON_SQLITE
def test_remove_disables_a_job_keeping_its_history_and_purge_deletes_it(database: Database) -> None:
    repository = database.migrated_repository()
    ids = _history(repository)
    repository.upsert_job("idle", "never ran", every=dt.timedelta(hours=1))
    removed = ok(dbsched(database.url, "remove", "a"))
    assert removed.stdout == (
        "removed a: disabled, never claimed again; its history is kept (celery -A proj dbsched runs --job a); "
        "--purge deletes it. Its active run goes on: celery -A proj dbsched cancel a stops it.\n"
    )
    assert not repository.lookup_job("a").policy.enabled
    assert len(ok(dbsched(database.url, "runs", "--job", "a")).rows()) == 3
    assert ok(dbsched(database.url, "remove", "idle")).stdout == (
        "removed idle: disabled, never claimed again; it has no runs; --purge deletes it.\n"
    )

    refused = clean_error(dbsched(database.url, "remove", "a", "--purge"))
    assert refused.stderr == "Error: job 'a' has a queued or running run; cancel it first: dbsched cancel a\n"
    ok(dbsched(database.url, "cancel", "a"))
    assert ok(dbsched(database.url, "remove", "a", "--purge")).stdout == "purged a and its run history\n"
    assert "job 'a' not found" in clean_error(dbsched(database.url, "runs", "--job", "a")).stderr
    assert [run.job_name for run in repository.list_runs()] == ["b"]
    assert ids["a-completed"] not in {run.id for run in repository.list_runs()}
    assert "job 'nope' not found" in clean_error(dbsched(database.url, "remove", "nope")).stderr


@ON_SQLITE
def test_remove_refuses_what_the_app_still_declares(database: Database) -> None:
    repository = database.migrated_repository()
    repository.upsert_job("load.00", "in the code", every=dt.timedelta(hours=1))
    repository.upsert_job("nightly", "an entry", every=dt.timedelta(hours=1), kind=JobKind.TASK, task="celery.ping")
    entry = {"beat_schedule": {"nightly": {"task": "celery.ping", "schedule": 3600}}}
    env = {"DBSCHED_TEST_APP_LOAD_JOBS": "1"}
    result = clean_error(dbsched(database.url, "remove", "nightly", settings=entry))
    assert result.stderr == (
        "Error: 'nightly' is a beat_schedule entry of this app: the next beat start recreates it; delete it from "
        "beat_schedule first, or pause it: celery -A proj dbsched pause nightly\n"
    )
    result = clean_error(dbsched(database.url, "remove", "load.00", env=env))
    assert result.stderr == (
        "Error: job 'load.00' is still in this app's code (@job / register_job): the next worker start enables it "
        "again; delete it from the code first, or pause it: celery -A proj dbsched pause load.00\n"
    )
    assert repository.lookup_job("load.00").policy.enabled and repository.lookup_job("nightly").policy.enabled


@ON_SQLITE
def test_cancel_says_what_happens_to_each_run(database: Database) -> None:
    repository = database.migrated_repository()
    ids = _history(repository)
    repository.start_run(ids["a-queued"], "worker-9")
    result = ok(dbsched(database.url, "cancel", "a", settings={"dbsched_monitor_interval": 45}))
    assert result.stdout == (
        f"cancelling run {ids['a-queued']} of a on worker-9: the worker notices within its monitor interval "
        "(45 s) and the job stops at its next check of ctx.cancelled\n"
    )
    result = ok(dbsched(database.url, "cancel", "b"))
    assert result.stdout == f"cancelled run {ids['b-queued']} of b: it was queued and will not start\n"
    assert ok(dbsched(database.url, "cancel", "b")).stdout == "b has no active run\n"


@ON_SQLITE
def test_cancel_wait_gives_up_after_its_timeout_when_no_worker_stops_the_run(database: Database) -> None:
    repository = database.migrated_repository()
    ids = _history(repository)
    repository.start_run(ids["a-queued"], "worker-gone")
    result = clean_error(dbsched(database.url, "cancel", "a", "--wait", "--timeout", "0.5"))
    assert result.stderr == (
        f"Error: run {ids['a-queued']} of a is still running on worker-gone after 0.5 s: the job does not check "
        "ctx.cancelled often enough, or its worker is gone (it is recorded interrupted either way)\n"
    )


@pytest.mark.slow
def test_cancel_wait_returns_once_the_worker_has_stopped_the_job(database: Database, processes: Processes) -> None:
    repository = database.migrated_repository()
    settings = {"dbsched_monitor_interval": 0.5}
    env = {
        "DBSCHED_TEST_APP_DB": database.url,
        "DBSCHED_TEST_APP_BROKER_DIR": str(processes.folder / "broker"),
        "DBSCHED_TEST_APP_SLOW_JOB": "1",
        "DBSCHED_TEST_APP_SETTINGS": json.dumps(settings),
    }
    worker = processes.start_worker("cli_app", env=env, embedded_beat="celery_dbsched.Scheduler")

    def running() -> list[Any]:
        processes.check_alive(worker)
        return repository.list_runs(job_name="slow.job", status="running")

    [run] = wait_for(running, 60, message="slow.job running")
    with repository.engine.begin() as conn:  # the worker stamped the jobs it registered at its start
        assert conn.execute(select(job_table.c.registered_time).where(job_table.c.name == "slow.job")).scalar()
    result = ok(dbsched(database.url, "cancel", "slow.job", "--wait", "--timeout", "60", settings=settings))
    first, second = result.stdout.splitlines()
    assert first == (
        f"cancelling run {run.id} of slow.job on {worker.node}: the worker notices within its monitor interval "
        "(0.5 s) and the job stops at its next check of ctx.cancelled"
    )
    assert re.fullmatch(rf"run {run.id} of slow.job stopped after \d+(\.\d)? s", second), second
    assert repository.run_stopped_time(run.id) is not None
    assert "code stopped (UTC):" in ok(dbsched(database.url, "run", str(run.id))).stdout


# --- status and --json ---------------------------------------------------------------------------------------

START_A_BEAT = "start one: celery -A proj beat -S celery_dbsched.Scheduler"


def unhealthy(result: Result) -> Result:
    """What a probe sees: exit status 69 (EX_UNAVAILABLE, as `celery inspect ping` with no reply), a reason
    per line on stderr, no traceback."""
    assert result.returncode == 69, result
    assert "Traceback" not in result.output and "Error:" not in result.stderr, result.output
    return result


def json_of(result: Result) -> Any:
    """The JSON a `--json` command printed (a run's error may hold a traceback: it is data there)."""
    assert (result.returncode, result.stderr) == (0, ""), result
    return json.loads(result.stdout)


@ON_SQLITE
def test_status_without_any_beat_is_unhealthy(database: Database) -> None:
    database.migrated_repository()
    result = unhealthy(dbsched(database.url, "status"))
    assert result.stderr == (
        f"unhealthy: no beat is alive: no beat has written a heartbeat (or its row was pruned); {START_A_BEAT}\n"
    )
    assert result.stdout.splitlines()[0] == "beats: 0 alive, 0 silent"
    assert result.stdout.splitlines()[-1] == "unhealthy: 1 problem(s)"


@ON_SQLITE
def test_status_with_a_job_waiting_past_max_lag_is_unhealthy(database: Database) -> None:
    repository = database.migrated_repository()
    # A job due ten minutes ago (the repository's clock ten minutes back), and a beat that just wrote its row.
    database.migrated_repository(clock=TestClock(offset=-dt.timedelta(minutes=10))).upsert_job("late", "late job")
    repository.heartbeat("beat-1", "beat", "host-b", 11, interval=60.0, claims=ClaimStats(3, 0.012, 1.5))

    result = unhealthy(dbsched(database.url, "status"))  # default --max-lag: threshold + monitor (5 min 30 s)
    [line] = result.stderr.splitlines()
    assert re.fullmatch(
        r"unhealthy: job 'late' has been due for 10 min( \d+ s)?, longer than --max-lag 5 min 30 s \(1 job\(s\) "
        r"due and not claimed\): the beats do not keep up, or cannot reach the database or the broker",
        line,
    ), line
    assert re.search(r"^due and not claimed: 1 job\(s\); the oldest, late, has waited 10 min", result.stdout, re.M)
    unhealthy(dbsched(database.url, "status", "--max-lag", "1m"))

    healthy = ok(dbsched(database.url, "status", "--max-lag", "1h"))
    assert healthy.stderr == "" and healthy.stdout.splitlines()[-1] == "healthy"
    assert re.search(r"^  beat-1 +host-b +11 +\S+ .* 3 +12 ms +1.5 s +alive$", healthy.stdout, re.M), healthy.stdout
    ok(dbsched(database.url, "status", "--max-lag", "off"))


def test_status_max_lag_that_is_no_duration_is_a_usage_error(sqlite_database: Database) -> None:
    sqlite_database.migrated_repository()
    result = dbsched(sqlite_database.url, "status", "--max-lag", "soon")
    assert result.returncode == 2, result
    assert "Invalid value for '--max-lag': expected a duration such as 90s, 5m or 1h (or off), got 'soon'" in (
        result.stderr
    )


@ON_SQLITE
def test_status_json_has_the_documented_shape(database: Database) -> None:
    repository = database.migrated_repository()
    ids = _history(repository)
    repository.heartbeat("beat-1", "beat", "host-b", 11, interval=60.0)
    repository.heartbeat("worker-1", "worker", "host-w", 12, interval=60.0)
    data = json_of(dbsched(database.url, "status", "--json", "--max-lag", "1h"))
    assert list(data) == STATUS_KEYS
    assert (data["healthy"], data["problems"]) == (True, [])
    assert [list(beat) for beat in data["beats"]] == [BEAT_KEYS]
    assert [list(worker) for worker in data["workers"]] == [WORKER_KEYS]
    assert data["due"]["count"] == 0
    assert {run["id"] for run in data["active"]["runs"]} == {ids["a-queued"], ids["b-queued"]}
    assert [run["id"] for run in data["failures_last_hour"]["runs"]] == [ids["a-failed"]]
    assert all(list(run) == RUN_KEYS for run in data["active"]["runs"])


@ON_SQLITE
def test_status_json_when_unhealthy_still_prints_the_json(database: Database) -> None:
    database.migrated_repository()
    result = unhealthy(dbsched(database.url, "status", "--json"))
    data = json.loads(result.stdout)
    assert data["healthy"] is False and data["problems"] == [result.stderr.removeprefix("unhealthy: ").rstrip("\n")]


def test_jobs_runs_and_run_as_json(database: Database) -> None:
    repository = database.migrated_repository()
    ids = _history(repository)
    jobs = json_of(dbsched(database.url, "jobs", "--json"))
    assert list(jobs) == ["now", "jobs"]
    assert [job["name"] for job in jobs["jobs"]] == ["a", "b"]
    assert all(list(job) == JOB_KEYS for job in jobs["jobs"])
    a = jobs["jobs"][0]
    assert (a["state"], a["schedule"], a["last_run"]["id"], a["last_run"]["status"]) == (
        "enabled",
        "-",
        ids["a-queued"],
        "queued",
    )
    runs = json_of(dbsched(database.url, "runs", "--json", "--job", "a"))
    assert list(runs) == ["now", "runs"]
    assert [run["id"] for run in runs["runs"]] == [ids["a-queued"], ids["a-failed"], ids["a-completed"]]
    assert all(list(run) == RUN_KEYS for run in runs["runs"])
    failed = json_of(dbsched(database.url, "run", str(ids["a-failed"]), "--json"))
    assert list(failed) == [*RUN_KEYS, "stopped"]
    assert (failed["status"], failed["worker"], failed["claimed_by"]) == ("failed", "worker-2", "beat-1")
    assert failed["error"] == "Traceback (most recent call last):\n  ...\nValueError: bad thing\n"
    assert failed["duration"] >= 0 and failed["ended"].endswith("+00:00")
    empty = json_of(dbsched(database.url, "runs", "--json", "--job", "b", "--status", "failed"))
    assert empty["runs"] == []


@pytest.mark.slow
def test_status_sees_a_real_beat_and_worker_and_a_killed_beat(database: Database, processes: Processes) -> None:
    repository = database.migrated_repository()
    settings = {"dbsched_monitor_interval": 0.5, "dbsched_run_jobs_interval": 0.5}
    env = {
        "DBSCHED_TEST_APP_DB": database.url,
        "DBSCHED_TEST_APP_BROKER_DIR": str(processes.folder / "broker"),
        "DBSCHED_TEST_APP_SLOW_JOB": "1",
        "DBSCHED_TEST_APP_SETTINGS": json.dumps(settings),
    }
    worker = processes.start_worker("cli_app", env=env)  # no celery_dbsched.tracking: the bootstep writes its row
    beat_env = {**env, "DBSCHED_TEST_APP_SETTINGS": json.dumps({**settings, "dbsched_server_id": "beat-under-test"})}
    beat = processes.start_beat("cli_app", env=beat_env)

    def servers() -> dict[str, Any] | None:
        processes.check_alive(worker, beat)
        data = json.loads(dbsched(database.url, "status", "--json", "--max-lag", "off", settings=settings).stdout)
        [beat_row] = data["beats"] or [None]
        workers = data["workers"]
        if beat_row is None or not beat_row["claims_last_minute"] or not workers or not workers[0]["runs_in_flight"]:
            return None
        return data

    data = wait_for(servers, 90, message="the beat's claims and the worker's run in flight in their rows")
    [beat_row], [worker_row] = data["beats"], data["workers"]
    assert (beat_row["id"], beat_row["pid"], beat_row["alive"], beat_row["version"]) == (
        "beat-under-test",
        beat.pid,
        True,
        "0.1.0",
    )
    assert beat_row["claim_lag_p50"] is not None and beat_row["claim_lag_max"] >= beat_row["claim_lag_p50"] >= 0
    assert beat_row["heartbeat_interval"] == 0.5
    assert (worker_row["id"], worker_row["role"], worker_row["runs_in_flight"]) == (worker.node, "worker", 1)
    assert [run["job"] for run in data["active"]["runs"]] == ["slow.job"]
    ok(dbsched(database.url, "status", settings=settings))

    beat.kill()
    result = wait_for(
        lambda: (lambda r: r if r.returncode == 69 else None)(dbsched(database.url, "status", settings=settings)),
        30,
        message="status unhealthy once the killed beat is silent",
    )
    assert re.fullmatch(
        rf"unhealthy: no beat is alive: the last one seen, beat-under-test, has been silent for \d+(\.\d)? s; "
        rf"{re.escape(START_A_BEAT)}\n",
        result.stderr,
    ), result.stderr
    assert repository.lookup_job("slow.job").active_runs == 1  # the worker goes on: only the beat is gone


# --- settings and secrets ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"dbsched_run_jobs_limit": "lots"}, "dbsched_run_jobs_limit: expected a whole number"),
        ({"dbsched_interrupt_threshold": -5}, "dbsched_interrupt_threshold: must not be negative"),
        ({"dbsched_engine_options": "pool_size=5"}, "dbsched_engine_options: expected a dict"),
        ({"dbsched_auto_migrate": "perhaps"}, "dbsched_auto_migrate: expected true or false"),
    ],
)
def test_bad_settings_are_a_clear_error_naming_the_key(
    sqlite_database: Database, settings: dict[str, Any], expected: str
) -> None:
    for command in ("migrate", "jobs"):
        result = clean_error(dbsched(sqlite_database.url, command, settings=settings))
        assert expected in result.stderr
    assert not Path(sqlite_database.url.removeprefix("sqlite:///")).exists()


def test_unsupported_database_url_is_a_clear_error(tmp_path: Path) -> None:
    result = clean_error(dbsched("oracle://root@127.0.0.1/app", "migrate"))
    assert "dbsched_database_url: 'oracle' is not supported" in result.stderr


def test_unreachable_database_is_a_clear_error() -> None:
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/test?connect_timeout=3"
    for command in ("migrate", "jobs", "runs"):
        result = clean_error(dbsched(url, command))
        assert "Connection refused" in result.stderr or "connection failed" in result.stderr


PASSWORD = "Sup3r-s3cret!pw"


def _with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    user = parts.username or "postgres"
    netloc = f"{user}:{quote(password, safe='')}@{parts.hostname}:{parts.port or 5432}"
    return urlunsplit(parts._replace(netloc=netloc))


@pytest.mark.postgres
def test_database_password_never_appears_in_output(postgres_database: Database) -> None:
    # The test server trusts local connections and ignores the password; the CLI must still never print it.
    url = _with_password(postgres_database.url, PASSWORD)
    encoded = quote(PASSWORD, safe="")
    with socket.create_server(("127.0.0.1", 0)) as s:
        closed_port = s.getsockname()[1]
    down = _with_password(f"postgresql+psycopg://postgres@127.0.0.1:{closed_port}/test?connect_timeout=3", PASSWORD)

    results = [
        dbsched(url, "jobs"),  # before migrate: the missing-tables error
        dbsched(url, "migrate"),
        dbsched(url, "migrate"),
        *in_parallel(
            [
                lambda: dbsched(url, "jobs"),
                lambda: dbsched(url, "runs"),
                lambda: dbsched(url, "runs", "--job", "nope"),
                lambda: dbsched(url, "runs", "--status", "bogus"),
                lambda: dbsched(url, "jobs", settings={"dbsched_run_jobs_limit": -1}),
                lambda: dbsched(down, "migrate"),
                lambda: dbsched(down, "jobs"),
                lambda: dbsched(down, "runs"),
            ]
        ),
    ]
    for result in results:
        assert PASSWORD not in result.output and encoded not in result.output, result
    migrated = results[1]
    assert migrated.returncode == 0, migrated
    assert "postgres:***@127.0.0.1" in migrated.stdout
    assert "postgres:***@127.0.0.1" in results[8].stderr  # the failed migrate names the (masked) URL
    # Celery's own `report` censors the setting too (its name contains DATABASE).
    env = {k: v for k, v in os.environ.items() if not k.startswith("DBSCHED_TEST_APP_")}
    env.update(PYTHONPATH=os.pathsep.join([str(TESTS_DIR), str(REPO_DIR)]), DBSCHED_TEST_APP_DB=url)
    report = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "cli_app", "report"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert report.returncode == 0, report.stderr
    assert "dbsched_database_url" in report.stdout
    assert PASSWORD not in report.stdout + report.stderr and encoded not in report.stdout + report.stderr


# --- web (issue 12 §3) -------------------------------------------------------------------------------------

WEB_TOKEN = "cli-test-token-0123456789"


def test_web_refuses_a_public_address_without_a_token(sqlite_database: Database) -> None:
    ok(dbsched(sqlite_database.url, "migrate"))
    result = clean_error(dbsched(sqlite_database.url, "web", "--host", "0.0.0.0"))
    assert (
        "Error: refusing to serve the dashboard on 0.0.0.0 without authentication: set dbsched_web_token (or "
        "DBSCHED_WEB_TOKEN), or bind a loopback address (--host 127.0.0.1)"
    ) in result.stderr
    short = clean_error(dbsched(sqlite_database.url, "web", env={"DBSCHED_WEB_TOKEN": "short"}))
    assert "DBSCHED_WEB_TOKEN: at least 16 characters" in short.stderr and "short" not in short.stderr.split(":")[-1]


def _get(url: str, token: str | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except OSError:
        return 0, None


def test_web_serves_the_dashboard(sqlite_database: Database, processes: Processes) -> None:
    ok(dbsched(sqlite_database.url, "migrate"))
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    env = {"DBSCHED_TEST_APP_DB": sqlite_database.url, "DBSCHED_WEB_TOKEN": WEB_TOKEN}
    web = processes.start_celery(["-A", "cli_app", "dbsched", "web", "--port", str(port)], env=env, name="web")
    base = f"http://127.0.0.1:{port}"

    def answered() -> Any:
        status, body = _get(f"{base}/api/status", WEB_TOKEN)
        return body if status == 200 else None

    body = wait_for(answered, timeout=60, message=web.describe)
    assert set(body) >= {"beats", "workers", "due", "active", "stalled", "failures_last_hour"}
    assert _get(f"{base}/api/jobs")[0] == 401
    assert f"celery_dbsched dashboard on http://127.0.0.1:{port}/ (actions need the token)" in web.log()


# --- run-time schedules: add, edit, remove (issue 13) --------------------------------------------------------


def _runtime(repository: JobRepository, name: str) -> Any:
    job = repository.lookup_job(name)
    assert job.origin == Origin.RUNTIME and job.kind == JobKind.TASK
    return job


def _not_stored(repository: JobRepository, name: str) -> None:
    assert name not in {job.name for job in repository.list_jobs()}


@ON_SQLITE
def test_add_stores_a_schedule_and_prints_it_with_its_next_run(database: Database) -> None:
    repository = database.migrated_repository()
    added = ok(
        dbsched(
            database.url,
            "add",
            "cleanup",
            "--task",
            "proj.tasks.cleanup",
            "--every",
            "5m",
            "--args",
            '[7, "old"]',
            "--kwargs",
            '{"dry_run": false}',
            "--queue",
            "maintenance",
            "--priority",
            "3",
            "--headers",
            '{"tenant": "acme"}',
            "--expires",
            "60",
            "--description",
            "Deletes old files",
        )
    )
    job = _runtime(repository, "cleanup")
    assert job.task == "proj.tasks.cleanup" and job.schedule == IntervalSchedule(300.0)
    assert job.task_args == (7, "old") and job.task_kwargs == {"dry_run": False}
    assert job.task_options == {"queue": "maintenance", "priority": 3, "headers": {"tenant": "acme"}, "expires": 60.0}
    assert job.description == "Deletes old files" and job.policy.enabled and not job.one_off
    lines = added.stdout.splitlines()
    assert lines[0] == (
        'added cleanup: proj.tasks.cleanup [7, "old"] {"dry_run": false} every 5 min, queue maintenance, '
        'priority 3, headers {"tenant": "acme"}, expires 60.0'
    )
    assert lines[1] == f"next run: {display.when(job.next_scheduled_run)} UTC (due)"  # an interval starts now
    assert added.stderr == (  # cli_app has no such task: stored, with a note on the typo it may be
        "note: this app does not know the task 'proj.tasks.cleanup': its runs are sent and never run unless the "
        "workers have it (check the name; fix it: celery -A proj dbsched edit cleanup --task NAME)\n"
    )
    listed = ok(dbsched(database.url, "jobs"))
    assert [row[:2] for row in listed.rows()] == [["cleanup", "unknown-task"]]
    known = ok(dbsched(database.url, "add", "cleanup2", "--task", "celery.backend_cleanup", "--every", "60"))
    assert known.stderr == ""


@ON_SQLITE
def test_add_a_crontab_in_a_zone_prints_the_next_run_in_it(database: Database) -> None:
    repository = database.migrated_repository()
    added = ok(
        dbsched(
            database.url, "add", "report", "--task", "proj.report", "--crontab", "0 7 * * 1-5", "--tz", "Asia/Tokyo"
        )
    )
    job = _runtime(repository, "report")
    assert job.schedule == CrontabSchedule(minute="0", hour="7", day_of_week="1-5", timezone="Asia/Tokyo")
    local = job.next_scheduled_run.astimezone(ZoneInfo("Asia/Tokyo"))
    assert (local.hour, local.minute, local.weekday() < 5) == (7, 0, True)
    assert added.stdout.splitlines()[1].startswith(f"next run: {local:%Y-%m-%d %H:%M:%S} Asia/Tokyo (in ")
    # Without --tz: the app's timezone, for the crontab and for what is printed.
    ok(dbsched(database.url, "add", "app-zone", "--task", "t.x", "--crontab", "30 2 * * *", settings=BERLIN))
    assert _runtime(repository, "app-zone").schedule == CrontabSchedule("30", "2", timezone="Europe/Berlin")


BERLIN = {"timezone": "Europe/Berlin"}


@ON_SQLITE
def test_add_at_a_time_runs_once(database: Database) -> None:
    repository = database.migrated_repository()
    added = ok(
        dbsched(
            database.url, "add", "launch", "--task", "proj.launch", "--at", "2030-12-24T18:00", "--tz", "Europe/Berlin"
        )
    )
    job = _runtime(repository, "launch")
    at = dt.datetime(2030, 12, 24, 17, 0, tzinfo=dt.timezone.utc)
    assert job.schedule == ClockedSchedule(at) and job.one_off and job.next_scheduled_run == at
    assert added.stdout.splitlines() == [
        "added launch: proj.launch once at 2030-12-24 17:00:00",
        f"next run: 2030-12-24 18:00:00 Europe/Berlin (in {display.duration(at - repository.database_now())})",
    ]


@ON_SQLITE
def test_add_disabled_one_off_with_policies(database: Database) -> None:
    repository = database.migrated_repository()
    added = ok(
        dbsched(
            database.url,
            "add",
            "later",
            "--task",
            "t.later",
            "--every",
            "60",
            "--disabled",
            "--one-off",
            "--misfire",
            "skip",
            "--misfire-grace",
            "30",
            "--max-active",
            "2",
            "--routing-key",
            "rk",
            "--exchange",
            "ex",
        )
    )
    job = _runtime(repository, "later")
    assert not job.policy.enabled and job.one_off
    assert (job.policy.misfire, job.policy.misfire_grace, job.policy.max_active) == (
        "skip",
        dt.timedelta(seconds=30),
        2,
    )
    assert job.task_options == {"routing_key": "rk", "exchange": "ex"}
    assert added.stdout.splitlines()[1] == "next run: none: disabled (celery -A proj dbsched edit later --enable)"


# Newcomer mistakes: (arguments after NAME, the option the error names, words of its fix). Each is a usage
# error (exit 2) naming the option, and stores nothing.
MISTAKES = [
    (["--every", "60"], "--task", "proj.tasks.cleanup"),
    (["--task", "t.x"], "--every / --crontab / --at / --solar", "give one schedule"),
    (
        ["--task", "t.x", "--every", "60", "--crontab", "* * * * *"],
        "--every / --crontab / --at / --solar",
        "every and crontab given",
    ),
    (["--task", "t.x", "--every", "sixty"], "--every", "90s, 5m or 1h"),
    (["--task", "t.x", "--every", "0"], "--every", "more than 0 seconds"),
    (["--task", "t.x", "--crontab", "*/5 * * *"], "--crontab", "expected five fields"),
    (["--task", "t.x", "--crontab", "61 * * * *"], "--crontab", "each field as in cron"),
    (["--task", "t.x", "--every", "60", "--tz", "Mars/Olympus"], "--tz", "IANA name such as Europe/Berlin"),
    (["--task", "t.x", "--every", "60", "--args", "[1, 2"], "--args", "not JSON"),
    (["--task", "t.x", "--every", "60", "--args", "1, 2"], "--args", "give a JSON array, such as"),
    (["--task", "t.x", "--every", "60", "--args", '{"a": 1}'], "--args", "expected a JSON array"),
    (["--task", "t.x", "--every", "60", "--kwargs", "days=7"], "--kwargs", "give a JSON object"),
    (["--task", "t.x", "--every", "60", "--kwargs", "[7]"], "--kwargs", "expected a JSON object"),
    (["--task", "t.x", "--every", "60", "--headers", "tenant: acme"], "--headers", "not JSON"),
    (["--task", "t.x", "--every", "60", "--priority", "300"], "--priority", "from 0 to 255"),
    (["--task", "t.x", "--every", "60", "--max-active", "0"], "--max-active", "from 1 to 1000"),
    (["--task", "t.x", "--at", "tomorrow"], "--at", "ISO time such as 2026-12-24T18:00"),
    (["--task", "t.x", "--solar", "sunrise"], "--solar", "needs lat and lon"),
    (["--task", "t.x", "--solar", "noon", "--lat", "52", "--lon", "13"], "--solar", "unknown solar event"),
    (["--task", "t.x", "--every", "60", "--lat", "52"], "--solar", "give the event too"),
    (["--task", "t.x", "--every", "60", "--start-time", "soon"], "--start-time", "ISO time"),
    (["--task", "t.x", "--every", "60", "--misfire", "later"], "--misfire", "'run_once', 'skip'"),
]


def test_add_mistakes_are_one_usage_error_naming_the_option_and_store_nothing(sqlite_database: Database) -> None:
    # On SQLite only: the options are read before any database is opened (22 CLI processes per database).
    database = sqlite_database
    repository = database.migrated_repository()
    results = in_parallel(
        [lambda arguments=arguments: dbsched(database.url, "add", "oops", *arguments) for arguments, _, _ in MISTAKES]
    )
    for (arguments, option, fix), raw in zip(MISTAKES, results, strict=True):
        result = clean_error(raw)
        assert result.returncode == 2, (arguments, result)
        assert f"'{option}'" in result.stderr and fix in result.stderr, (arguments, result.stderr)
        assert len(result.stderr.strip().splitlines()[-1:]) == 1
        _not_stored(repository, "oops")


@ON_SQLITE
def test_add_refuses_a_task_name_celery_cannot_send(database: Database) -> None:
    repository = database.migrated_repository()
    result = clean_error(dbsched(database.url, "add", "oops", "--task", "not a task", "--every", "60"))
    assert result.returncode == 2 and "task" in result.stderr, result
    _not_stored(repository, "oops")


@ON_SQLITE
def test_add_refuses_names_the_app_or_the_database_already_own(database: Database) -> None:
    repository = database.migrated_repository()
    entry = {"beat_schedule": {"nightly": {"task": "celery.ping", "schedule": 3600}}}
    result = clean_error(dbsched(database.url, "add", "nightly", "--task", "t.x", "--every", "60", settings=entry))
    assert result.returncode == 1 and "nightly" in result.stderr and "beat_schedule" in result.stderr, result
    code = clean_error(
        dbsched(
            database.url, "add", "load.00", "--task", "t.x", "--every", "60", env={"DBSCHED_TEST_APP_LOAD_JOBS": "1"}
        )
    )
    assert code.returncode == 1 and "load.00" in code.stderr, code
    _not_stored(repository, "nightly")
    _not_stored(repository, "load.00")
    repository.upsert_job("stored.code", "registered by a worker", every=dt.timedelta(hours=1))
    stored = clean_error(dbsched(database.url, "add", "stored.code", "--task", "t.x", "--every", "60"))
    assert stored.returncode == 1 and "stored.code" in stored.stderr, stored
    assert repository.lookup_job("stored.code").origin == Origin.CODE

    ok(dbsched(database.url, "add", "mine", "--task", "t.x", "--every", "60"))
    again = clean_error(dbsched(database.url, "add", "mine", "--task", "t.y", "--every", "90"))
    assert again.returncode == 1 and "edit" in again.stderr and "--purge" in again.stderr, again
    assert _runtime(repository, "mine").task == "t.x"  # the first one, unchanged


@ON_SQLITE
def test_edit_changes_only_the_options_given(database: Database) -> None:
    repository = database.migrated_repository()
    ok(
        dbsched(
            database.url,
            "add",
            "report",
            "--task",
            "t.report",
            "--crontab",
            "0 7 * * *",
            "--tz",
            "Asia/Tokyo",
            "--kwargs",
            '{"format": "pdf"}',
            "--queue",
            "reports",
            "--priority",
            "5",
        )
    )
    before = _runtime(repository, "report")

    edited = ok(dbsched(database.url, "edit", "report", "--kwargs", '{"format": "csv"}', "--priority", ""))
    job = _runtime(repository, "report")
    assert job.task_kwargs == {"format": "csv"} and job.task_options == {"queue": "reports"}  # priority removed
    assert job.next_scheduled_run == before.next_scheduled_run and job.schedule == before.schedule
    assert edited.stdout.splitlines()[0].startswith("edited report: changed kwargs, options; now t.report")
    assert edited.stdout.splitlines()[1].endswith("(unchanged)")

    ok(dbsched(database.url, "edit", "report", "--crontab", "30 8 * * *"))  # keeps the crontab's zone
    job = _runtime(repository, "report")
    assert job.schedule == CrontabSchedule("30", "8", timezone="Asia/Tokyo")
    local = job.next_scheduled_run.astimezone(ZoneInfo("Asia/Tokyo"))
    assert (local.hour, local.minute) == (8, 30)

    ok(dbsched(database.url, "edit", "report", "--tz", "America/New_York"))  # the zone alone: the same fields there
    job = _runtime(repository, "report")
    assert job.schedule == CrontabSchedule("30", "8", timezone="America/New_York")
    assert job.next_scheduled_run.astimezone(ZoneInfo("America/New_York")).hour == 8

    ok(dbsched(database.url, "edit", "report", "--every", "120"))
    assert _runtime(repository, "report").schedule == IntervalSchedule(120.0)
    same = ok(dbsched(database.url, "edit", "report", "--every", "2m"))
    assert "changed nothing (it already has these values)" in same.stdout

    disabled = ok(dbsched(database.url, "edit", "report", "--disable"))
    assert not _runtime(repository, "report").policy.enabled and "none: disabled" in disabled.stdout
    ok(dbsched(database.url, "edit", "report", "--enable", "--queue", ""))
    job = _runtime(repository, "report")
    assert job.policy.enabled and job.task_options == {} and job.task_kwargs == {"format": "csv"}


@ON_SQLITE
def test_edit_mistakes_are_clear_and_change_nothing(database: Database) -> None:
    repository = database.migrated_repository()
    ok(dbsched(database.url, "add", "tick", "--task", "t.tick", "--every", "60", "--args", "[1]"))
    before = _runtime(repository, "tick")
    usage = [
        ([], "nothing to change"),
        (["--args", "[1"], "'--args'"),
        (["--tz", "Europe/Berlin"], "has no zone"),
        (["--every", "60", "--crontab", "* * * * *"], "every and crontab given"),
        (["--crontab", "* * *"], "expected five fields"),
    ]
    for arguments, words in usage:
        result = clean_error(dbsched(database.url, "edit", "tick", *arguments))
        assert result.returncode == 2 and words in result.stderr, (arguments, result)
    assert _runtime(repository, "tick") == before

    missing = clean_error(dbsched(database.url, "edit", "nope", "--every", "60"))
    assert missing.returncode == 1 and "job 'nope' not found" in missing.stderr
    repository.upsert_job("coded", "in the code", every=dt.timedelta(hours=1))
    coded = clean_error(dbsched(database.url, "edit", "coded", "--every", "60"))
    assert coded.returncode == 1 and "comes from the app's code" in coded.stderr
    assert repository.lookup_job("coded").every == dt.timedelta(hours=1)


@ON_SQLITE
def test_remove_a_runtime_schedule_keeps_its_name_until_purged(database: Database) -> None:
    repository = database.migrated_repository()
    ok(dbsched(database.url, "add", "tick", "--task", "t.tick", "--every", "60"))
    removed = ok(dbsched(database.url, "remove", "tick"))
    assert removed.stdout == (
        "removed tick: disabled, never claimed again; it has no runs; --purge deletes it. The name stays taken: "
        "`dbsched edit tick --enable` brings it back.\n"
    )
    assert not _runtime(repository, "tick").policy.enabled
    taken = clean_error(dbsched(database.url, "add", "tick", "--task", "t.tick", "--every", "60"))
    assert taken.returncode == 1 and "--purge" in taken.stderr
    assert ok(dbsched(database.url, "remove", "tick", "--purge")).stdout == (
        "purged tick and its run history; the name is free again\n"
    )
    _not_stored(repository, "tick")
    ok(dbsched(database.url, "add", "tick", "--task", "t.other", "--every", "60"))
    assert _runtime(repository, "tick").task == "t.other"


def test_add_and_edit_help_explain_every_option(sqlite_database: Database) -> None:
    for command in ("add", "edit"):
        shown = ok(dbsched(sqlite_database.url, command, "--help")).stdout
        assert "Examples:" in shown and f"celery -A proj dbsched {command} " in shown
        for option in ("--task", "--every", "--crontab", "--at", "--solar", "--tz", "--args", "--kwargs", "--queue",
                       "--headers", "--expires", "--start-time", "--misfire", "--max-active"):  # fmt: skip
            assert re.search(rf"^\s+{option}\b.*\S", shown, re.MULTILINE), (command, option)
    assert "'[1, \"two\"]'" in ok(dbsched(sqlite_database.url, "add", "--help")).stdout
