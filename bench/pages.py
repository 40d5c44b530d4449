"""What every dashboard page, JSON endpoint and status read costs at scale (issue 12 §3), server-side.

    python bench/pages.py                              # 100,000 jobs, 5,000,000 runs (a few minutes)
    python bench/pages.py --jobs 10000 --runs 500000   # on a shared machine

Fills a PostgreSQL database of its own (`<prefix>pages`, dropped at the end unless --keep) with bench/dashboard.py's
`fill`, then times each request of the dashboard (celery_dbsched.web.create_app, through Starlette's TestClient
in this process: the time is the server's, routing to rendered body, with no network) and each read of
`dbsched status`, `dbsched jobs` and one frame of `dbsched watch`: one warm-up, then REPEAT times; p50 and max.
Every statement a request issues is recorded (SQLAlchemy cursor events on the repository's engine): how many,
their total time, and the slowest one with its plan (EXPLAIN ANALYZE of that statement with its parameters).
Over the budget (300 ms, max): SLOW. Then, on the same fill, bench/dashboard.py's read statements under EXPLAIN
ANALYZE (--no-statements skips them).

It is a benchmark, not a test: `tests/test_bench_smoke.py` runs it at a tiny size.
"""

from __future__ import annotations

import datetime as dt
import io
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

if __package__ in (None, ""):  # `python bench/pages.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import dashboard
from bench.common import Config, drop_database, ensure_database
from bench.dashboard import ACTIVE_EVERY, BUDGET_MS, fill, job_name

DATABASE = "pages"


@dataclass
class Statement:
    sql: str
    params: Any
    ms: float


class Recorder:
    """The statements run on an engine between `start()` and `stop()` (any thread: the app reads on its pool)."""

    def __init__(self, engine: Any) -> None:
        from sqlalchemy import event

        self.lock = threading.Lock()
        self.recording = False
        self.statements: list[Statement] = []
        self.started: dict[int, float] = {}

        def before(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
            self.started[id(cursor)] = time.perf_counter()

        def after(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
            began = self.started.pop(id(cursor), None)
            if began is None or not self.recording:
                return
            with self.lock:
                self.statements.append(Statement(statement, parameters, (time.perf_counter() - began) * 1000))

        event.listen(engine, "before_cursor_execute", before)
        event.listen(engine, "after_cursor_execute", after)

    def start(self) -> None:
        with self.lock:
            self.statements = []
            self.recording = True

    def stop(self) -> list[Statement]:
        with self.lock:
            self.recording = False
            return list(self.statements)


@dataclass
class Timing(dashboard.Sampled):
    """A request: also the statements it issued (their count and time, the slowest one; `plan` is its plan)."""

    statements: int = 0
    statements_ms: float = 0.0
    slowest_ms: float = 0.0
    slowest_sql: str = ""


def targets(client: Any, repository: Any, jobs: int) -> dict[str, tuple[str, Callable[[], Any]]]:
    """What is measured, by name: (the page, endpoint or command; a call that makes the request once). Every
    page and JSON endpoint of the dashboard with each filter, sort and search, deep keyset pages, and the reads
    of `dbsched status`, `dbsched jobs` and `dbsched watch`."""
    from rich.console import Console

    from celery_dbsched import observe
    from celery_dbsched.statements import JOB_FILTERS
    from celery_dbsched.watch import render
    from celery_dbsched.web import present

    some_job = job_name(max(1, jobs // 2))
    active_job = job_name(max(ACTIVE_EVERY, (jobs // 2) // ACTIVE_EVERY * ACTIVE_EVERY))
    deep_job = repository.lookup_job(job_name(max(1, jobs * 9 // 10)))
    with repository.engine.connect() as conn:
        top = conn.exec_driver_sql("SELECT max(id) FROM dbsched_job_run").scalar_one()
    deep_run = max(1, top * 9 // 10)

    def get(path: str, **params: Any) -> Callable[[], Any]:
        def call() -> Any:
            response = client.get(path, params=params)
            if response.status_code != 200:
                raise RuntimeError(f"GET {path} {params}: {response.status_code} {response.text[:300]}")
            return response

        return call

    def cli_jobs() -> Any:
        return (repository.list_jobs(), repository.database_now(), repository.last_runs(), repository.orphaned_jobs())

    def watch_frame() -> Any:
        console = Console(file=io.StringIO(), width=160, highlight=False)
        console.print(render(repository.watch_frame(None), dt.timezone.utc))

    calls: dict[str, tuple[str, Callable[[], Any]]] = {
        "jobs page": ("/jobs", get("/jobs")),
        "jobs page, by name descending": ("/jobs?sort=-name", get("/jobs", sort="-name")),
        "jobs page, by next run": ("/jobs?sort=next_run", get("/jobs", sort="next_run")),
        "jobs page, by next run descending": ("/jobs?sort=-next_run", get("/jobs", sort="-next_run")),
        **{f"jobs page, {state}": (f"/jobs?state={state}", get("/jobs", state=state)) for state in JOB_FILTERS},
        "jobs page, search one job": ("/jobs?q=", get("/jobs", q=some_job[-6:])),
        "jobs page, search many": ("/jobs?q=", get("/jobs", q="bench.job")),
        "jobs page, search nothing": ("/jobs?q=", get("/jobs", q="no-such-job")),
        "jobs page, search, paused": ("/jobs?q=&state=paused", get("/jobs", q="bench", state="paused")),
        "jobs page, deep keyset (90 %)": (
            "/jobs?after=",
            get("/jobs", after=present.job_cursor(deep_job, "name")),
        ),
        "jobs page, deep keyset by next run": (
            "/jobs?sort=next_run&after=",
            get("/jobs", sort="next_run", after=present.job_cursor(deep_job, "next_run")),
        ),
        "job page": ("/job?name=", get("/job", name=some_job)),
        "job page, an active job": ("/job?name=", get("/job", name=active_job)),
        "job page, older history": ("/job?name=&before=", get("/job", name=some_job, before=deep_run)),
        "runs page": ("/runs", get("/runs")),
        **{
            f"runs page, {status}": (f"/runs?status={status}", get("/runs", status=status))
            for status in ("completed", "failed", "interrupted", "running", "queued", "dispatched")
        },
        "runs page, a job": ("/runs?job=", get("/runs", job=some_job)),
        "runs page, a job, failed": ("/runs?job=&status=failed", get("/runs", job=some_job, status="failed")),
        "runs page, a worker": ("/runs?worker=", get("/runs", worker="worker3@bench")),
        "runs page, last hour": ("/runs?since=1h", get("/runs", since="1h")),
        "runs page, a day two weeks ago": ("/runs?since=15d&until=14d", get("/runs", since="15d", until="14d")),
        "runs page, failed, last minute (none)": (
            "/runs?status=failed&since=1m",
            get("/runs", status="failed", since="1m"),
        ),
        "runs page, dispatched, a day (none)": (
            "/runs?status=dispatched&since=15d&until=14d",
            get("/runs", status="dispatched", since="15d", until="14d"),
        ),
        "runs page, deep keyset (10 % from the start)": ("/runs?before=", get("/runs", before=top // 10)),
        "fleet page": ("/fleet", get("/fleet")),
        "api jobs": ("/api/jobs", get("/api/jobs")),
        "api jobs, failing, 500": ("/api/jobs?state=failing&limit=500", get("/api/jobs", state="failing", limit=500)),
        "api job": ("/api/job?name=", get("/api/job", name=some_job)),
        "api runs": ("/api/runs", get("/api/runs")),
        "api runs, failed, 500": ("/api/runs?status=failed&limit=500", get("/api/runs", status="failed", limit=500)),
        "api runs, dispatched (none)": ("/api/runs?status=dispatched", get("/api/runs", status="dispatched")),
        "api active runs": ("/api/runs/active", get("/api/runs/active")),
        "api active runs of a job": ("/api/runs/active?job=", get("/api/runs/active", job=active_job)),
        "api status": ("/api/status", get("/api/status")),
        "metrics": ("/metrics", get("/metrics")),
        "dbsched status": ("observe.status", lambda: observe.status(repository)),
        "dbsched jobs": ("list_jobs, last_runs, orphaned_jobs", cli_jobs),
        "dbsched watch (one frame)": ("watch_frame + render", watch_frame),
    }
    return calls


def _plan(engine: Any, statement: Statement) -> str:
    if not isinstance(statement.params, (dict, tuple, list)) or (
        isinstance(statement.params, (tuple, list)) and statement.params and isinstance(statement.params[0], dict)
    ):
        return "(no plan: an executemany)"
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(f"EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) {statement.sql}", statement.params).all()
        conn.rollback()
    return "\n".join(row[0] for row in rows)


def measure(url: str, jobs: int, repeat: int, only: str | None = None) -> list[Timing]:
    """Each target once to warm up, then `repeat` times: the wall time in this process (the server's) and the
    statements of the slowest repetition."""
    from starlette.testclient import TestClient

    from celery_dbsched import JobRepository
    from celery_dbsched.web import create_app

    repository = JobRepository(url)
    recorder = Recorder(repository.engine)
    timings: list[Timing] = []
    try:
        with TestClient(create_app(repository)) as client:
            for name, (path, call) in targets(client, repository, jobs).items():
                if only is not None and only not in name:
                    continue
                call()  # warm-up: the pages in the cache, the templates compiled
                timing = Timing(name, path)
                worst: list[Statement] = []
                for _ in range(repeat):
                    recorder.start()
                    started = time.perf_counter()
                    call()
                    elapsed = (time.perf_counter() - started) * 1000
                    issued = recorder.stop()
                    if not timing.samples_ms or elapsed >= max(timing.samples_ms):
                        worst = issued
                    timing.samples_ms.append(elapsed)
                timing.p50_ms = statistics.median(timing.samples_ms)
                timing.max_ms = max(timing.samples_ms)
                timing.statements = len(worst)
                timing.statements_ms = sum(s.ms for s in worst)
                if worst:
                    slowest = max(worst, key=lambda s: s.ms)
                    timing.slowest_ms = slowest.ms
                    timing.slowest_sql = slowest.sql
                    timing.plan = _plan(repository.engine, slowest)
                timings.append(timing)
    finally:
        repository.close()
    return timings


def report(timings: list[Timing], jobs: int, runs: int, took: dict[str, float], repeat: int, note: str = "") -> str:
    """The results as markdown: a table, then the slowest statement of each request with its plan."""
    fill_text = ", ".join(f"{step} {seconds:.1f} s" for step, seconds in took.items()) or "(a kept database)"
    slow = [t.name for t in timings if t.slow]
    lines = [
        f"# Dashboard pages, API and status reads at {jobs:,} jobs / {runs:,} runs (PostgreSQL)",
        "",
        *([note, ""] if note else []),
        f"Fill (bench/dashboard.py's): {fill_text}. Time = the request handled in process (Starlette TestClient:",
        f"routing, reads, rendering; no network), one warm-up then {repeat} repetitions. Statements: those of the",
        "slowest repetition (count, total ms as the driver ran them, the slowest one's ms).",
        f"Over budget ({BUDGET_MS:g} ms, max): **SLOW**.",
        "",
        f"Over budget: {', '.join(slow) if slow else 'none'}.",
        "",
        "| request | path | p50 ms | max ms | statements | their ms | slowest ms | |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for t in timings:
        flag = "**SLOW**" if t.slow else ""
        lines.append(
            f"| {t.name} | `{t.path}` | {t.p50_ms:.1f} | {t.max_ms:.1f} | {t.statements} | "
            f"{t.statements_ms:.1f} | {t.slowest_ms:.1f} | {flag} |"
        )
    lines.append("")
    for t in timings:
        lines += [f"## {t.name}", "", f"Slowest statement ({t.slowest_ms:.1f} ms):", "", "```sql", t.slowest_sql, "```"]
        lines += ["", "```", t.plan, "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = dashboard.arguments(__doc__, "timed repetitions per request (after a warm-up)")
    parser.add_argument("--filled", action="store_true", help="--url already holds the fill of --jobs/--runs")
    parser.add_argument("--only", default=None, help="measure only the requests whose name contains this")
    parser.add_argument(
        "--no-statements", action="store_true", help="skip bench/dashboard.py's statements under EXPLAIN ANALYZE"
    )
    args = parser.parse_args(argv)
    if args.filled and args.url is None:
        parser.error("--filled needs --url (the database that holds the fill)")

    cfg = Config(pg_admin=args.pg, db_prefix=args.db_prefix)
    url = args.url or ensure_database(cfg, DATABASE, recreate=True)
    try:
        took = {} if args.filled else fill(url, args.jobs, args.runs)
        timings = measure(url, args.jobs, args.repeat, args.only)
        statements = [] if args.no_statements else dashboard.measure(url, args.jobs, args.repeat)
    finally:
        if args.url is None and not args.keep:
            drop_database(cfg, DATABASE)
    text = report(timings, args.jobs, args.runs, took, args.repeat, args.note)
    if statements:  # the same fill's statements, one heading level down
        below = dashboard.report(statements, args.jobs, args.runs, took)
        text += "\n" + "\n".join("#" + line if line.startswith("#") else line for line in below.splitlines())
    print(text)
    if args.out:
        numbers = {
            "jobs": args.jobs,
            "runs": args.runs,
            "repeat": args.repeat,
            "budget_ms": BUDGET_MS,
            "fill_seconds": took,
            "timings": [asdict(t) for t in timings],
            "statements": [asdict(t) for t in statements],
        }
        dashboard.write(args.out, text, numbers)
    slow = [t.name for t in timings if t.slow]
    if slow:
        print(f"over {BUDGET_MS:g} ms: {', '.join(slow)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
