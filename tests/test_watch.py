"""`celery -A proj dbsched watch` (issue 12 §2): the fleet line, active runs with progress bars, the latest
outcomes; `--job`, `--once`; Ctrl-C ends it cleanly; and one refresh stays cheap at scale (four statements in
one transaction, each through an index: the plans are stated here on PostgreSQL)."""

from __future__ import annotations

import datetime as dt
import io
import os
import pty
import signal
import subprocess
import sys
import tempfile
import threading

import pytest
from helpers.polling import wait_for
from helpers.processes import REPO_DIR
from helpers.proxy import TcpProxy, host_port, with_port
from helpers.repository import claim, claim_one
from helpers.services import Database
from rich.console import Console
from sqlalchemy import event
from test_cli import clean_error, cli_env, dbsched, ok

from celery_dbsched import watch
from celery_dbsched.clock import TestClock
from celery_dbsched.repository import JobRepository
from celery_dbsched.states import InterruptReason, JobKind

sys.path.insert(0, str(REPO_DIR))

from bench import dashboard

UTC = dt.timezone.utc
ERROR = 'Traceback (most recent call last):\n  File "jobs.py", line 3, in sync\nValueError: user 42 has no email'


def busy(repository: JobRepository) -> dict[str, int]:
    """report.daily running at 3/10 on w1@host; sync.users completed once, then failed; export.csv cancelled
    (ended last); a worker row for w1@host. Returns the run ids by what they are."""
    for name in ("report.daily", "sync.users", "export.csv"):
        repository.upsert_job(name, f"the {name} job")
    first = {run.job_name: run.id for run in claim(repository)}
    repository.start_run(first["report.daily"], "w1@host")
    repository.update_progress(first["report.daily"], 3, 10)
    repository.start_run(first["sync.users"], "w1@host")
    repository.complete_run(first["sync.users"], dt.timedelta(0))
    again = {run.job_name: run.id for run in claim(repository)}
    repository.start_run(again["sync.users"], "w1@host")
    repository.fail_run(again["sync.users"], ERROR)
    repository.interrupt_run(first["export.csv"], InterruptReason.CANCELLED, "by an operator")
    repository.heartbeat("w1@host", "worker", "host", 4242)
    return {
        "running": first["report.daily"],
        "completed": first["sync.users"],
        "failed": again["sync.users"],
        "cancelled": first["export.csv"],
    }


def shown(repository: JobRepository, job_name: str | None = None, **limits: int) -> str:
    """One frame as `--once` prints it to a file, 160 columns wide."""
    out = io.StringIO()
    console = Console(file=out, width=160, color_system=None, highlight=False)
    read = lambda: watch.render(repository.watch_frame(job_name, **limits), UTC, job_name)  # noqa: E731
    watch.watch(read, interval=1, once=True, console=console)
    return out.getvalue()


def line_of(text: str, *cells: str | int) -> str:
    """The one line of `text` holding all of `cells` (run ids, job names) as words."""
    lines = [line for line in text.splitlines() if all(str(cell) in line.split() for cell in cells)]
    assert len(lines) == 1, f"expected one line with {cells} in:\n{text}"
    return lines[0]


class Watching:
    """`celery -A cli_app dbsched watch --interval 0.2` on `database_url`, its output on a pty (`terminal`: as in a
    terminal) or a pipe, read by a thread as it comes (`seen`). A context manager: killed at the end if running."""

    def __init__(self, database_url: str, *, terminal: bool) -> None:
        self.seen = bytearray()
        env = cli_env(database_url, env={"COLUMNS": "160", "LINES": "40", "TERM": "xterm-256color"})
        env.pop("NO_COLOR", None)
        self.fd, writer = pty.openpty() if terminal else os.pipe()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "cli_app", "dbsched", "watch", "--interval", "0.2"],
            stdin=writer if terminal else subprocess.DEVNULL,
            stdout=writer,
            stderr=writer,
            env=env,
            cwd=tempfile.gettempdir(),
        )
        os.close(writer)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except OSError:  # the process closed the terminal
                return
            if not chunk:
                return
            self.seen.extend(chunk)

    def __enter__(self) -> Watching:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.thread.join(10)
        os.close(self.fd)

    def interrupt(self) -> int:
        """Ctrl-C (SIGINT, as the terminal sends it); the exit status."""
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(30)

    def text(self) -> str:
        """All it wrote, checked clean: no traceback, no `Aborted!`, no `Error:` line."""
        text = self.seen.decode(errors="replace")
        assert "Traceback" not in text and "Aborted" not in text, text[-3000:]
        assert not [line for line in text.splitlines() if line.startswith("Error:")], text[-3000:]
        return text


# -- what a frame shows ---------------------------------------------------------------------------------------


@pytest.mark.processes
def test_once_shows_the_fleet_the_active_run_with_its_bar_and_the_recent_outcomes(database: Database) -> None:
    ids = busy(database.migrated_repository())

    out = ok(dbsched(database.url, "watch", "--once", env={"COLUMNS": "160"})).stdout

    fleet = out.splitlines()[0]
    assert "beats: none seen" in fleet and "workers: 1 alive" in fleet and "active runs: 1" in fleet, fleet
    assert out.index("Active runs") < out.index("Recent outcomes")
    running = line_of(out, ids["running"], "report.daily")
    assert "running" in running and "3/10 30%" in running and "w1@host" in running and "━" in running, running
    recent = out[out.index("Recent outcomes") :]
    cancelled = line_of(recent, ids["cancelled"], "export.csv")
    failed = line_of(recent, ids["failed"], "sync.users")
    completed = line_of(recent, ids["completed"], "sync.users")
    assert "interrupted (cancelled)" in cancelled
    assert "failed" in failed and "ValueError: user 42 has no email" in failed and "w1@host" in failed
    assert "completed" in completed
    # Newest first: the cancellation ended last, the first sync run first.
    assert recent.index(cancelled) < recent.index(failed) < recent.index(completed)


@pytest.mark.processes
def test_once_with_job_shows_only_that_jobs_runs(sqlite_database: Database) -> None:
    ids = busy(sqlite_database.migrated_repository())

    out = ok(dbsched(sqlite_database.url, "watch", "--once", "--job", "sync.users", env={"COLUMNS": "160"})).stdout

    assert "job: sync.users" in out.splitlines()[0]
    assert "no active runs" in out
    assert "report.daily" not in out and "export.csv" not in out
    assert str(ids["failed"]) in out.split() and str(ids["completed"]) in out.split()

    unknown = clean_error(dbsched(sqlite_database.url, "watch", "--once", "--job", "nope"))
    assert "nope" in unknown.stderr and "not found" in unknown.stderr.lower(), unknown.stderr


def test_a_stalled_run_and_a_silent_worker_are_named(database: Database) -> None:
    clock = TestClock()
    repository = database.migrated_repository(clock=clock)
    ids = busy(repository)
    repository.heartbeat("w2@host", "worker", "host", 4343)
    repository.upsert_job("nightly.export", "a plain task", kind=JobKind.TASK, task="proj.export")
    task_run = claim_one(repository, "nightly.export")  # with export.csv, due again after its cancel
    repository.dispatch_run(task_run.id, "task-1")
    repository.track_start(task_run.id, "w2@host", "task-1")
    clock.advance(dt.timedelta(minutes=10))  # past the 5 min interrupt threshold: no progress, no heartbeat
    repository.heartbeat("w2@host", "worker", "host", 4343)

    out = shown(repository)

    fleet = out.splitlines()[0]
    assert "workers: 1 alive, 1 silent (w1@host since " in fleet and "active runs: 3 (2 stalled)" in fleet, fleet
    assert "STALLED: no progress for 10 min" in line_of(out, ids["running"], "report.daily")
    assert "STALLED: not started for 10 min" in line_of(out, "export.csv", "queued")
    # A running plain task reports no progress: its worker's heartbeat says it is alive.
    assert "STALLED" not in line_of(out, task_run.id, "nightly.export")
    assert "w2@host" in line_of(out, task_run.id, "nightly.export")


def test_more_active_runs_than_shown_are_said(repository: JobRepository) -> None:
    for index in range(3):
        repository.upsert_job(f"job.{index}", "a job")
    claim(repository)

    out = shown(repository, active_limit=2)

    assert "active runs: 2+" in out.splitlines()[0]
    assert "(the oldest 2 shown; more are active: narrow with --job)" in out
    assert "job.0" in out and "job.1" in out and "job.2" not in out
    assert "queued" in line_of(out, "job.0") and "claimed by beat-1" in line_of(out, "job.0")


def test_an_empty_schedule_says_so(repository: JobRepository) -> None:
    out = shown(repository)

    assert "beats: none seen  workers: none seen  active runs: 0" in out.splitlines()[0]
    assert "no active runs" in out and "no ended runs" in out


# -- Ctrl-C -----------------------------------------------------------------------------------------------------


@pytest.mark.processes
def test_ctrl_c_ends_the_live_view_cleanly(sqlite_database: Database) -> None:
    """On a terminal (a pty) the view is redrawn in place; SIGINT, as Ctrl-C sends it, ends it with status 0,
    no traceback and no `Aborted!`."""
    busy(sqlite_database.migrated_repository())
    with Watching(sqlite_database.url, terminal=True) as watching:
        seen = watching.seen
        # Redrawn in place: the cursor moves up over the last frame before the next one is drawn.
        wait_for(lambda: seen.count(b"report.daily") >= 3 and b"\x1b[" in seen, 60, message="three frames")
        assert watching.interrupt() == 0
    assert "report.daily" in watching.text().rsplit("\x1b[?25h", 1)[0], "the last frame stays on the screen"


@pytest.mark.processes
@pytest.mark.postgres
def test_an_outage_is_shown_and_waited_out(postgres_database: Database) -> None:
    """PostgreSQL behind a proxy that goes down and comes back: the view says the database is unavailable,
    keeps trying, shows frames again once it answers, and still ends with status 0 on Ctrl-C."""
    busy(postgres_database.migrated_repository())
    proxy = TcpProxy(host_port(postgres_database.url, 5432))
    try:
        with Watching(with_port(postgres_database.url, proxy.port), terminal=False) as watching:
            seen = watching.seen
            wait_for(lambda: b"report.daily" in seen, 60, message="a first frame")
            proxy.down()
            wait_for(lambda: b"database unavailable" in seen, 60, message="the outage shown")
            assert watching.process.poll() is None
            proxy.up()
            wait_for(lambda: b"Active runs" in seen[seen.rindex(b"database unavailable") :], 60, message="frames again")
            assert watching.interrupt() == 0
    finally:
        proxy.close()
    assert "trying again every 0.2 s (Ctrl-C ends)" in watching.text()


# -- cost at scale ----------------------------------------------------------------------------------------------


def test_one_refresh_is_four_statements_in_one_transaction(database: Database) -> None:
    repository = database.migrated_repository()
    busy(repository)
    statements: list[str] = []
    commits: list[object] = []
    # SQLite's BEGIN IMMEDIATE (engine.py) is the transaction's, counted by its commit.
    event.listen(repository.engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    event.listen(repository.engine, "commit", commits.append)

    for job_name in (None, "sync.users"):
        statements.clear()
        commits.clear()
        repository.watch_frame(job_name)
        assert len([text for text in statements if not text.startswith("BEGIN")]) == 4, (
            statements
        )  # the time, the servers, the active runs, the latest outcomes
        assert len(commits) == 1


@pytest.mark.postgres
def test_each_refresh_statement_reads_through_an_index_at_scale(postgres_database: Database) -> None:
    """With 2,000 jobs and 200,000 runs analysed, no statement of a refresh scans the runs table: the active
    runs come from the partial indexes of active runs, the latest outcomes from the end-time index (of one job:
    the runs-by-job index), each bounded by its LIMIT."""
    dashboard.fill(postgres_database.url, 2_000, 200_000, log=lambda line: None)
    repository = postgres_database.repository()
    # Either partial index of active runs serves them: which one the planner takes depends on ANALYZE's sample
    # (seen to change between runs), and both are bounded by the active runs, never by the history.
    active = ("Index Scan using dbsched_job_run_active_update on", "Index Scan using dbsched_job_run_active_slot on")
    expected = {
        "watch: active runs": active,
        "watch --job: active runs": active,
        "watch: recent outcomes": ("Index Scan Backward using dbsched_job_run_end on dbsched_job_run",),
        "watch --job: recent outcomes": ("Index Scan Backward using dbsched_job_run_job on dbsched_job_run",),
    }
    now = repository.database_now()
    with repository.engine.connect() as conn:
        for name, (_, statement) in dashboard.statements(2_000, now).items():
            if not name.startswith("watch"):
                continue
            plan = dashboard.plan(conn, statement)
            assert "Seq Scan on dbsched_job_run" not in plan, f"{name}:\n{plan}"
            assert "Seq Scan on dbsched_job " not in plan, f"{name}:\n{plan}"
            if name in expected:
                assert any(scan in plan for scan in expected[name]), f"{name}:\n{plan}"
    assert "watch: servers" in dashboard.statements(2_000, now)  # the fifth: the small server table
