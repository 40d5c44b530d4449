"""Start-up errors as a user meets them (issue 11): `celery beat`, `celery worker` and `celery dbsched` started
as subprocesses on a missing driver, a database that is down and a database that refuses for good. Each says
what is wrong and the fix in one line, without a traceback or a flood of log lines; an outage is waited out,
a permanent error exits 1."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import pytest
from helpers.polling import wait_for
from helpers.processes import CeleryProcess, Processes
from helpers.proxy import TcpProxy, closed_port, host_port, with_port
from helpers.services import POSTGRES_URL, Database

from celery_dbsched.engine import POSTGRES_INSTALL

pytestmark = [pytest.mark.processes, pytest.mark.postgres]

WORKER_LINES = 45  # the worker's banner (about 25 lines) and a few lines of its own
BEAT_LINES = 25  # the beat's banner (about 13 lines) and a few lines of its own
COMMANDS = ["beat", "worker", "cli"]


def start(processes: Processes, command: str, url: str, env: dict[str, str] | None = None) -> CeleryProcess:
    """`command` on tests/cli_app.py pointed at `url`; the worker's app registers a job (so that the
    celery_dbsched bootstep is installed)."""
    env = {"DBSCHED_TEST_APP_DB": url, "DBSCHED_TEST_APP_LOAD_JOBS": "1", **(env or {})}
    if command == "beat":
        return processes.start_beat("cli_app", env=env)
    if command == "worker":
        return processes.start_worker("cli_app", env=env, concurrency=1)
    return processes.start_celery(["-A", "cli_app", "dbsched", "jobs"], env=env, name="cli")


def exit_code(process: CeleryProcess, timeout: float = 60) -> int:
    wait_for(lambda: not process.alive(), timeout, message=lambda: f"the exit of {process.describe()}")
    return process.stop(None)


def problem_lines(process: CeleryProcess) -> list[str]:
    """The log lines that say something went wrong."""
    return [
        line
        for line in process.log().splitlines()
        if re.search(r"ERROR|CRITICAL|Error:|Traceback|Exception|cannot start", line)
    ]


def assert_one_line(process: CeleryProcess, expected: str, command: str) -> None:
    log = process.log()
    problems = problem_lines(process)
    assert len(problems) == 1 and expected in problems[0], log
    limit = {"beat": BEAT_LINES, "worker": WORKER_LINES, "cli": 1}[command]
    assert len(log.splitlines()) <= limit, log


@pytest.fixture
def no_psycopg(tmp_path: Path, processes: Processes) -> dict[str, str]:
    """An environment in which `import psycopg` fails as it does where the driver was never installed."""
    shadow = tmp_path / "shadow" / "psycopg"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text('raise ModuleNotFoundError("No module named \'psycopg\'", name="psycopg")\n')
    return {"PYTHONPATH": os.pathsep.join([str(shadow.parent), processes.env["PYTHONPATH"]])}


@pytest.mark.parametrize("command", COMMANDS)
def test_a_missing_driver_is_one_line_with_the_install_command(
    processes: Processes, no_psycopg: dict[str, str], command: str
) -> None:
    process = start(processes, command, POSTGRES_URL, no_psycopg)
    assert exit_code(process) == 1
    assert_one_line(
        process, f"the PostgreSQL driver psycopg is not installed (no module 'psycopg'): {POSTGRES_INSTALL}", command
    )
    assert 'pip install "celery-dbsched[postgres]" (from a checkout: pip install -e ".[postgres]")' in process.log()


def _role_missing(database: Database) -> tuple[str, str]:
    url = POSTGRES_URL.replace("postgres@", f"no_such_role_{uuid.uuid4().hex[:8]}@", 1)
    assert url != POSTGRES_URL
    return url, "FATAL: role"


def _schema_missing(database: Database) -> tuple[str, str]:
    separator = "&" if "?" in POSTGRES_URL else "?"
    url = f"{POSTGRES_URL}{separator}options={quote(f'-csearch_path=no_such_schema_{uuid.uuid4().hex[:8]}')}"
    return url, "the database has no schema to use"


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("refusal", [_role_missing, _schema_missing], ids=["role", "schema"])
def test_a_permanent_refusal_exits_1_in_one_line(
    processes: Processes, postgres_database: Database, command: str, refusal: Callable[[Database], tuple[str, str]]
) -> None:
    url, expected = refusal(postgres_database)
    if command == "cli" and "schema" in expected:
        expected = "the celery_dbsched tables are missing: run `celery -A proj dbsched migrate`"
    process = start(processes, command, url)
    assert exit_code(process) == 1
    assert_one_line(process, expected, command)
    if command != "cli":
        assert f"CRITICAL/MainProcess] celery_dbsched: the {command} cannot start: " in process.log()
        assert "not an outage" in process.log() or "no schema" in process.log()


@pytest.mark.parametrize("command", ["beat", "worker"])
def test_a_database_down_at_start_is_waited_out_in_one_line(
    processes: Processes, postgres_database: Database, command: str
) -> None:
    proxy = TcpProxy(("127.0.0.1", closed_port()))  # takes each connection and drops it: the server is down
    try:
        process = start(processes, command, with_port(postgres_database.url, proxy.port))
        process.wait_for_log("(an outage is waited out)")
        # Three more tries (backing off from half a second): still the one line, and the process waits.
        tries = proxy.accepted
        wait_for(lambda: proxy.accepted >= tries + 3, 60, message="three more connection attempts")
        assert process.alive()
        assert_one_line(process, "celery_dbsched: database unavailable: ", command)
        proxy.target = host_port(POSTGRES_URL, 5432)  # the server is back
        process.wait_for_log("celery_dbsched: database back after")
        if command == "worker":
            process.wait_ready()
        assert len(problem_lines(process)) == 1, process.log()
        assert process.stop() == 0
    finally:
        proxy.close()


def test_the_cli_on_a_database_down_is_one_line(processes: Processes) -> None:
    process = start(processes, "cli", f"postgresql+psycopg://postgres@127.0.0.1:{closed_port()}/test")
    assert exit_code(process) == 1
    assert_one_line(process, "Error: database unavailable: connection failed", "cli")


def test_a_beat_that_waited_out_an_outage_then_meets_a_permanent_error_exits_1(
    processes: Processes, postgres_database: Database
) -> None:
    url, expected = _schema_missing(postgres_database)
    proxy = TcpProxy(("127.0.0.1", closed_port()))
    try:
        beat = start(processes, "beat", with_port(url, proxy.port))
        beat.wait_for_log("(an outage is waited out)")
        proxy.target = host_port(POSTGRES_URL, 5432)
        assert exit_code(beat) == 1
    finally:
        proxy.close()
    log = beat.log()
    assert "CRITICAL/MainProcess] celery_dbsched: the beat cannot start: " + expected in log, log
    assert len(problem_lines(beat)) == 2 and "Traceback" not in log, log  # the outage, then the refusal


@pytest.mark.parametrize("command", COMMANDS)
def test_a_misspelt_setting_is_one_line_naming_the_right_key(
    processes: Processes, postgres_database: Database, command: str
) -> None:
    settings = '{"dbsched_run_job_interval": 2}'
    process = start(processes, command, postgres_database.url, {"DBSCHED_TEST_APP_SETTINGS": settings})
    assert exit_code(process) == 1
    expected = "dbsched_run_job_interval: not a celery_dbsched setting; did you mean dbsched_run_jobs_interval?"
    assert_one_line(process, expected, command)
