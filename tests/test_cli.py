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
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import pytest
from helpers.processes import REPO_DIR, TESTS_DIR
from helpers.services import Database

from celery_dbsched.migrate import head_revision
from celery_dbsched.repository import JobRepository

pytestmark = pytest.mark.processes  # every command runs `celery ... dbsched` as a subprocess


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
        lines = self.stdout.strip().splitlines()
        assert lines and lines[0].startswith(("ID", "NAME")), self.output
        return [line.split() for line in lines[1:]]


def dbsched(database_url: str, *args: str, settings: dict[str, Any] | None = None, cwd: Path | None = None) -> Result:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DBSCHED_TEST_APP_")}
    env.update(PYTHONPATH=os.pathsep.join([str(TESTS_DIR), str(REPO_DIR)]), DBSCHED_TEST_APP_DB=database_url)
    if settings:
        env["DBSCHED_TEST_APP_SETTINGS"] = json.dumps(settings)
    completed = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "cli_app", "dbsched", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd or tempfile.gettempdir(),  # nothing the CLI might write lands in the repository
        timeout=120,
    )
    return Result(args, completed.returncode, completed.stdout, completed.stderr)


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


def test_jobs_lists_names_next_runs_and_descriptions(database: Database) -> None:
    repository = database.migrated_repository()
    repository.upsert_job(
        "reports.daily",
        "Builds the daily report",
        first_run_in=dt.timedelta(hours=1),
        every=dt.timedelta(days=1),
        queue="reports",
    )
    repository.upsert_job("cleanup", "Deletes old files", every=dt.timedelta(seconds=60))
    result = ok(dbsched(database.url, "jobs"))
    lines = result.stdout.strip().splitlines()
    assert lines[0].split() == ["NAME", "STATE", "NEXT", "RUN", "SCHEDULE", "QUEUE", "FAILURES", "DESCRIPTION"]
    assert [line.split()[0] for line in lines[1:]] == ["cleanup", "reports.daily"]  # by name

    def next_run(name: str) -> str:
        when = repository.lookup_job(name).next_scheduled_run
        return when.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")

    cleanup, daily = lines[1], lines[2]
    assert next_run("cleanup") in cleanup and " due " in cleanup
    assert re.search(r"\benabled\b", cleanup), cleanup
    assert re.search(r"\bevery 60s\s+-\s+0\s+Deletes old files$", cleanup), cleanup
    assert next_run("reports.daily") in daily
    assert re.search(r"in 3[56]\d\ds", daily), daily
    assert re.search(r"\bevery 86400s\s+reports\s+0\s+Builds the daily report$", daily), daily


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
    result = clean_error(dbsched("mysql://root@127.0.0.1/app", "migrate"))
    assert "dbsched_database_url: 'mysql' is not supported" in result.stderr


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
        dbsched(url, "jobs"),
        dbsched(url, "runs"),
        dbsched(url, "runs", "--job", "nope"),
        dbsched(url, "runs", "--status", "bogus"),
        dbsched(url, "jobs", settings={"dbsched_run_jobs_limit": -1}),
        dbsched(down, "migrate"),
        dbsched(down, "jobs"),
        dbsched(down, "runs"),
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
