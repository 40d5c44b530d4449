"""The README's quick start (`python -m example_proj`), and the local default (SQLite + celery_dbsched's
`filesystem://` transport in one folder) under several beats and workers at once."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from helpers.polling import wait_for
from helpers.processes import REPO_DIR, Processes
from helpers.proxy import closed_port

from celery_dbsched.repository import JobRepository

pytestmark = pytest.mark.e2e

EXAMPLE_WEB_TOKEN = "example-dashboard-token"  # example_proj/__main__.py


# What must never appear in a process's log under load.
FATAL_LOG_PATTERNS = [
    "JSONDecodeError",
    "Expecting value",  # json's message for an empty or truncated message file
    "database is locked",
    "locking protocol",
    "Unrecoverable error",
]
# At warm shutdown a worker gives back the run messages it still receives (Reject, requeue) and Celery logs
# that with a traceback; any other traceback is a failure.
ALLOWED_TRACEBACK_ENDINGS = [
    "celery.exceptions.Reject: ('worker shutting down; run ",
    # At the end of the test each beat gets SIGTERM: Celery's handler raises SystemExit wherever the beat is.
    # If that is inside SQLAlchemy closing a SQLite connection, SQLAlchemy logs it with a traceback before the
    # beat exits 0. Shutdown noise from Celery's own mechanism, not an error of ours (exit codes are checked).
    "SystemExit",
]


def _traceback_endings(log: str) -> list[str]:
    """The exception line that ends each traceback in `log`."""
    endings = []
    lines = log.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("Traceback (most recent call last):"):
            rest = (later for later in lines[i + 1 :] if later and not later.startswith((" ", "\t")))
            endings.append(next(rest, "<truncated traceback>"))
    return endings


def _example_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXAMPLE_")}
    env["PYTHONPATH"] = str(REPO_DIR)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _example_jobs_on_the_page(url: str) -> list[str] | None:
    """The job names the example's dashboard lists (its JSON API, with the example's token), or None while it
    does not answer."""
    request = urllib.request.Request(url + "/api/jobs", headers={"Authorization": f"Bearer {EXAMPLE_WEB_TOKEN}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return [job["name"] for job in json.load(response)["jobs"]]
    except OSError:
        return None


def test_quick_start(tmp_path: Path) -> None:
    started = time.monotonic()
    web = f"http://127.0.0.1:{closed_port()}"
    process = subprocess.Popen(
        [sys.executable, "-m", "example_proj", "--seconds", "25", "--web-port", web.rsplit(":", 1)[1]],
        cwd=tmp_path,
        env=_example_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # While it runs, the dashboard serves the example's jobs.
        on_page = wait_for(
            lambda: process.poll() is None and _example_jobs_on_the_page(web), 60, 0.5, f"the dashboard at {web}"
        )
        stdout, stderr = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    assert "example.process_invoices" in on_page, on_page
    assert f"dashboard: {web} (token: {EXAMPLE_WEB_TOKEN};" in result.stdout, result.stdout
    elapsed = time.monotonic() - started
    data = tmp_path / ".example_data"
    worker_log = (data / "worker.log").read_text(errors="replace") if (data / "worker.log").exists() else ""
    context = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}\nworker.log (tail):\n{worker_log[-6000:]}"
    assert result.returncode == 0, context
    assert elapsed < 120, context

    # Progress lines: a time header every two seconds and a bar for a running job.
    assert len(re.findall(r"^--- +\d+\.\ds ---$", result.stdout, re.M)) >= 5, context
    assert re.search(r"^example\.process_invoices +run \d+ running +\[#+\.*\] \d+/12", result.stdout, re.M), context
    assert "worker exited with 0" in result.stdout, context

    repository = JobRepository(f"sqlite:///{data / 'example.sqlite3'}")
    try:
        invoices = repository.list_runs(job_name="example.process_invoices", status="completed")
        assert invoices and all(run.completed == run.total == 12 for run in invoices), context
        flaky = repository.list_runs(job_name="example.flaky_sync", status="failed")
        assert flaky and "partner API timed out" in (flaky[0].error or ""), context
        assert repository.list_runs(job_name="example.flaky_sync", status="completed"), context
        vacuum = repository.list_runs(job_name="example.vacuum", status="completed")
        assert vacuum and all(run.completed == run.total == 10 for run in vacuum), context
        stuck = repository.list_runs(job_name="example.stuck_export", status="interrupted")
        assert any((run.error or "").startswith("stalled") for run in stuck), context
    finally:
        repository.close()
    for pattern in ("JSONDecodeError", "database is locked", "Unrecoverable error"):
        assert pattern not in worker_log, context


LOAD_JOBS = 20
LOAD_SECONDS = 20.0
BEATS = 3
WORKERS = 3


def _active_duplicates(db_path: Path) -> list[tuple[str, int]]:
    # A plain read-only connection: WAL readers never wait for, or block, the writers under test.
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
    try:
        return list(
            conn.execute(
                "SELECT job_name, count(*) FROM dbsched_job_run WHERE status IN ('queued', 'running') "
                "GROUP BY job_name HAVING count(*) > 1"
            )
        )
    finally:
        conn.close()


def test_several_beats_and_workers_share_the_local_default(tmp_path: Path, processes: Processes) -> None:
    db_path = tmp_path / "load.sqlite3"
    job_log = tmp_path / "jobs.log"
    env = {
        "DBSCHED_TEST_APP_DB": f"sqlite:///{db_path}",
        "DBSCHED_TEST_APP_BROKER_DIR": str(tmp_path / "broker"),
        "DBSCHED_TEST_APP_LOAD_JOBS": str(LOAD_JOBS),
        "DBSCHED_TEST_APP_JOB_LOG": str(job_log),
        # As in the example: a beat sleeps at most this long, and a job's next due time is only known once
        # its run ends, so with the 5 s default jobs due every second would run every ~5 s.
        "DBSCHED_TEST_APP_SETTINGS": json.dumps({"dbsched_run_jobs_interval": 1}),
    }
    workers = [processes.start_worker("cli_app", env=env, name=f"worker{n}") for n in range(1, WORKERS + 1)]
    beats = [processes.start_beat("cli_app", env=env, name=f"beat{n}") for n in range(1, BEATS + 1)]
    for worker in workers:
        worker.wait_ready(timeout=180)
    for beat in beats:
        beat.wait_for_log("beat: Starting...", timeout=180)

    # The load: every job is due every second. Watch the invariants while it runs.
    deadline = time.monotonic() + LOAD_SECONDS
    checks = 0
    while time.monotonic() < deadline:
        processes.check_alive()
        assert _active_duplicates(db_path) == []
        checks += 1
        time.sleep(0.25)  # the pace of the invariant checks, not a wait for anything
    processes.check_alive()
    alive_at_end = [p.name for p in processes.started if p.alive()]
    processes.stop_all(timeout=60)
    exit_codes = {p.name: p.returncode for p in processes.started}

    assert sorted(alive_at_end) == sorted(p.name for p in processes.started)
    logs = {p.name: p.log() for p in processes.started}
    for name, text in logs.items():
        for pattern in FATAL_LOG_PATTERNS:
            assert pattern not in text, f"{pattern!r} in the log of {name}:\n{text[-5000:]}"
        unexpected = [e for e in _traceback_endings(text) if not e.startswith(tuple(ALLOWED_TRACEBACK_ENDINGS))]
        assert not unexpected, f"tracebacks in the log of {name}: {unexpected}\n{text[-5000:]}"
    assert all(code == 0 for code in exit_codes.values()), exit_codes

    # The jobs' own record: each run started once, and a job's runs never overlap.
    events = [line.split() for line in job_log.read_text().splitlines()]
    starts = Counter(int(e[1]) for e in events if e[0] == "start")
    twice = {run_id: n for run_id, n in starts.items() if n > 1}
    assert not twice, f"runs started more than once: {twice}"
    by_job: dict[str, list[tuple[float, str, int]]] = defaultdict(list)
    for kind, run_id, job_name, _pid, at in events:
        by_job[job_name].append((float(at), kind, int(run_id)))
    for job_name, timeline in by_job.items():
        timeline.sort()
        open_run: int | None = None
        for _at, kind, run_id in timeline:
            if kind == "start":
                assert open_run is None, f"{job_name}: run {run_id} started while run {open_run} was running"
                open_run = run_id
            else:
                assert open_run == run_id, f"{job_name}: run {run_id} ended while {open_run} was the one running"
                open_run = None

    repository = JobRepository(f"sqlite:///{db_path}")
    try:
        runs = repository.list_runs(limit=100_000)
    finally:
        repository.close()
    assert _active_duplicates(db_path) == []
    completed = [run for run in runs if run.status == "completed"]
    assert all(run.id in starts for run in completed)  # nothing completed that no job started
    assert all(run.completed == run.total == 2 for run in completed)
    per_job = Counter(run.job_name for run in completed)
    assert len(per_job) == LOAD_JOBS and min(per_job.values()) >= 5, per_job
    assert not [run for run in runs if run.status == "failed"], [run.error for run in runs if run.status == "failed"]
    # The load really was shared: several beats claimed, several workers ran.
    assert len({run.claimed_by for run in runs}) >= 2
    assert len({run.worker for run in completed}) >= 2
    print(
        f"\nload: {len(runs)} runs ({len(completed)} completed) of {LOAD_JOBS} jobs in {LOAD_SECONDS:g}s, "
        f"{BEATS} beats, {WORKERS} workers, {checks} invariant checks; "
        f"claimed by {Counter(run.claimed_by for run in runs)}; run by {Counter(run.worker for run in completed)}"
    )
