"""What the status, watch and dashboard paths cost at scale (issue 12 §2, §3): server-side times and plans.

    python bench/dashboard.py                              # 100,000 jobs, 5,000,000 runs (a few minutes)
    python bench/dashboard.py --jobs 10000 --runs 500000   # on a shared machine

Fills a PostgreSQL database of its own (`<prefix>dashboard`, dropped at the end unless --keep) with JOBS jobs and
RUNS runs in a few INSERT ... SELECT generate_series statements (the history: completed, some failed with a
traceback, some interrupted, ending over the last 30 days; one job in 100 has a running or queued run; a few
beats and workers, one silent), then runs each read statement of those paths REPEAT times under EXPLAIN
ANALYZE and reports the server-side time (planning + execution) p50 and max, the rows, the wall time of the
statement as the repository runs it (with the rows fetched), and each plan. Statements are built by
celery_dbsched.statements as the repository builds them: what is measured is what runs.

It is a benchmark, not a test: `tests/test_bench_smoke.py` runs it at a tiny size; tests/test_watch.py reuses
`fill` and `plan` to state the plans of `dbsched watch`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

if __package__ in (None, ""):  # `python bench/dashboard.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import Config, drop_database, ensure_database, fresh_schema, template_columns

DATABASE = "dashboard"
BUDGET_MS = 300.0  # issue 12 §3: every page and JSON endpoint answers in < 300 ms server-side
ACTIVE_EVERY = 100  # one job in ACTIVE_EVERY has an active run
JOB_PREFIX = "bench.job."


def job_name(index: int) -> str:
    """The name of job `index` (1-based), as `fill` stores it."""
    return f"{JOB_PREFIX}{index:06d}"


def _name_sql(expression: str) -> str:
    return f"'{JOB_PREFIX}' || lpad(({expression})::text, 6, '0')"


def fill(url: str, jobs: int, runs: int, *, log: Callable[[str], None] = print) -> dict[str, float]:
    """Make the schema at `url` (a database or a test schema) hold `jobs` jobs, `runs` ended runs and an active
    run for one job in ACTIVE_EVERY; returns the seconds each step took."""
    from sqlalchemy import text

    from celery_dbsched import JobRepository
    from celery_dbsched.schedules import IntervalSchedule
    from celery_dbsched.schema import run_table

    took: dict[str, float] = {}
    started = time.monotonic()
    fresh_schema(url)
    repository = JobRepository(url)
    try:
        template = "bench.template"
        repository.upsert_job(template, "dashboard benchmark job", schedule=IntervalSchedule(300.0))
        varied = ("name", "next_scheduled_run", "paused", "enabled", "failure_count", "registered_time")
        quoted, picked = template_columns(repository.engine, varied)
        with repository.engine.begin() as conn:
            # Due over the next hour; one in 1,000 overdue by 5 min; 1 % paused, 0.5 % disabled, 2 % failing.
            conn.execute(
                text(
                    f"INSERT INTO dbsched_job (name, next_scheduled_run, paused, enabled, failure_count, "
                    f"registered_time, {quoted}) "
                    f"SELECT {_name_sql('g')}, "
                    "CASE WHEN g % 1000 = 1 THEN now() - interval '5 minutes' "
                    "ELSE now() + (g % 3600) * interval '1 second' END, "
                    "g % 100 = 0, g % 200 <> 0, CASE WHEN g % 50 = 0 THEN 2 ELSE 0 END, now(), "
                    f"{picked} FROM dbsched_job t, generate_series(1, :jobs) g WHERE t.name = :template"
                ),
                {"jobs": jobs, "template": template},
            )
            conn.execute(text("DELETE FROM dbsched_job WHERE name = :t"), {"t": template})
        took["jobs"] = time.monotonic() - started
        log(f"dashboard bench: {jobs:,} jobs stored in {took['jobs']:.1f} s")

        started = time.monotonic()
        indexes = [index for index in run_table.indexes]
        with repository.engine.begin() as conn:
            for index in indexes:  # built once after the load: faster than kept up row by row
                index.drop(conn)
            # The history is final runs: the active-run counting triggers and the foreign key have nothing to
            # check (every job exists), so they are skipped for the load.
            conn.execute(text("SET LOCAL session_replication_role = replica"))
            conn.execute(
                text(
                    "INSERT INTO dbsched_job_run (job_name, status, claimed_by, worker, task_id, completed, total, "
                    "error, create_time, start_time, update_time, end_time, kind, slot, scheduled_for, "
                    "interrupt_reason) "
                    f"SELECT {_name_sql('1 + g % :jobs')}, "
                    "CASE WHEN k < 95 THEN 'completed' WHEN k < 98 THEN 'failed' ELSE 'interrupted' END, "
                    "'beat-' || (g % 2), 'worker' || (g % 8) || '@bench', NULL, 10, 10, "
                    "CASE WHEN k BETWEEN 95 AND 97 THEN 'Traceback (most recent call last):' || chr(10) || "
                    "'  File \"jobs.py\", line 1, in run' || chr(10) || 'ValueError: bench failure ' || g "
                    "WHEN k >= 98 THEN 'stalled: no progress within the interrupt threshold' END, "
                    "e - interval '40 seconds', e - interval '39 seconds', e, e, 'job', 0, "
                    "e - interval '40 seconds', CASE WHEN k >= 98 THEN 'stalled' END "
                    # k: a run's outcome, varying along each job's history.
                    "FROM (SELECT g, (g / :jobs + g) % 100 AS k, "
                    "now() - interval '1 minute' - (:runs - g) * (interval '30 days' / :runs) AS e "
                    "FROM generate_series(1, :runs) g) AS history"
                ),
                {"jobs": jobs, "runs": runs},
            )
        took["runs"] = time.monotonic() - started
        log(f"dashboard bench: {runs:,} ended runs stored in {took['runs']:.1f} s")
        started = time.monotonic()
        with repository.engine.begin() as conn:
            for index in indexes:
                index.create(conn)
            # Active runs through the triggers (they count them on their jobs): running with progress, or queued.
            conn.execute(
                text(
                    "INSERT INTO dbsched_job_run (job_name, status, claimed_by, worker, completed, total, "
                    "create_time, start_time, update_time, kind, slot, scheduled_for) "
                    f"SELECT {_name_sql('g')}, CASE WHEN g % 3 = 0 THEN 'queued' ELSE 'running' END, 'beat-0', "
                    "CASE WHEN g % 3 = 0 THEN NULL ELSE 'worker' || (g % 8) || '@bench' END, "
                    "CASE WHEN g % 3 = 0 THEN 0 ELSE g % 10 END, CASE WHEN g % 3 = 0 THEN 0 ELSE 10 END, "
                    "now() - (g % 600) * interval '1 second', "
                    "CASE WHEN g % 3 = 0 THEN NULL ELSE now() - (g % 600) * interval '1 second' END, "
                    "now() - (g % 7) * interval '1 second', 'job', 0, now() - (g % 600) * interval '1 second' "
                    "FROM generate_series(CAST(:every AS integer), CAST(:jobs AS integer), CAST(:every AS integer)) g"
                ),
                {"jobs": jobs, "every": ACTIVE_EVERY},
            )
            conn.execute(
                text(
                    "INSERT INTO dbsched_server (id, kind, hostname, pid, start_time, last_seen) "
                    "SELECT k || g || '@bench', k, 'bench', 1000 + g, now() - interval '1 day', "
                    "CASE WHEN k = 'worker' AND g = 0 THEN now() - interval '1 hour' ELSE now() END "
                    "FROM (VALUES ('beat'), ('worker')) AS kinds(k), generate_series(0, 7) g "
                    "WHERE k = 'worker' OR g < 2"
                )
            )
        with repository.engine.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            for table in ("dbsched_job", "dbsched_job_run", "dbsched_server"):
                conn.execute(text(f"VACUUM ANALYZE {table}"))
        took["indexes_active_analyze"] = time.monotonic() - started
        log(f"dashboard bench: indexes, active runs and ANALYZE in {took['indexes_active_analyze']:.1f} s")
    finally:
        repository.close()
    return took


# -- the measured statements ----------------------------------------------------------------------------------


def statements(jobs: int, now: dt.datetime) -> dict[str, tuple[str, Any]]:
    """The read statements of `dbsched jobs`, `dbsched runs` and `dbsched watch` (the status and web queries
    join them when they exist on this branch), by name: (what runs it, the statement)."""
    from celery_dbsched import statements as sql
    from celery_dbsched.repository import SERVER_LIMIT
    from celery_dbsched.settings import DEFAULT_INTERRUPT_THRESHOLD

    some_job = job_name(max(1, jobs // 2))
    active_job = job_name(max(ACTIVE_EVERY, (jobs // 2) // ACTIVE_EVERY * ACTIVE_EVERY))
    grace = DEFAULT_INTERRUPT_THRESHOLD.total_seconds()
    return {
        "jobs: all jobs (unpaged)": ("dbsched jobs", sql.all_jobs()),
        "jobs: last run of each job": ("dbsched jobs", sql.last_runs("postgresql")),
        "jobs: orphaned": ("dbsched jobs", sql.orphaned_jobs(grace)),
        "runs: latest 50": ("dbsched runs", sql.runs(None, None, 50)),
        "runs: latest 50 of a job": ("dbsched runs --job", sql.runs(some_job, None, 50)),
        "runs: latest 50 failed": ("dbsched runs --status failed", sql.runs(None, "failed", 50)),
        "runs: latest 50 queued": ("dbsched runs --status queued", sql.runs(None, "queued", 50)),
        "runs: latest 50 dispatched (none)": ("dbsched runs --status dispatched", sql.runs(None, "dispatched", 50)),
        "runs: latest 50 failed of a job": ("dbsched runs --job --status", sql.runs(some_job, "failed", 50)),
        "runs: claimed in the last hour": (
            "dbsched runs --since 1h",
            sql.runs(None, None, 50, now - dt.timedelta(hours=1)),
        ),
        "runs: failed, claimed in the last minute (none)": (
            "dbsched runs --status failed --since 1m",
            sql.runs(None, "failed", 50, now - dt.timedelta(minutes=1)),
        ),
        "watch: servers": ("dbsched watch", sql.servers(SERVER_LIMIT)),
        "watch: active runs": ("dbsched watch", sql.watch_active_runs(None, 31)),
        "watch: recent outcomes": ("dbsched watch", sql.watch_recent_runs(None, 15)),
        "watch --job: active runs": ("dbsched watch --job", sql.watch_active_runs(active_job, 31)),
        "watch --job: recent outcomes": ("dbsched watch --job", sql.watch_recent_runs(active_job, 15)),
    }


def _compiled(conn: Any, statement: Any) -> tuple[str, dict[str, Any]]:
    compiled = statement.compile(dialect=conn.dialect, compile_kwargs={"render_postcompile": True})
    return str(compiled), dict(compiled.params)  # no bind processing needed on PostgreSQL (aware datetimes)


def plan(conn: Any, statement: Any, *, analyze: bool = False) -> str:
    """The plan PostgreSQL chooses for `statement` (a SQLAlchemy statement), as text; `analyze`: run it."""
    sql_text, params = _compiled(conn, statement)
    options = "ANALYZE, BUFFERS, COSTS OFF" if analyze else "COSTS OFF"
    rows = conn.exec_driver_sql(f"EXPLAIN ({options}) {sql_text}", params).all()
    return "\n".join(row[0] for row in rows)


@dataclass
class Sampled:
    """What was measured (`name`, used by `path`), its samples in ms, p50 and max, and a plan."""

    name: str
    path: str
    p50_ms: float = 0.0
    max_ms: float = 0.0
    plan: str = ""
    samples_ms: list[float] = field(default_factory=list)

    @property
    def slow(self) -> bool:
        return self.max_ms > BUDGET_MS


@dataclass
class Timing(Sampled):
    """A statement: also its wall time through SQLAlchemy and its rows."""

    wall_p50_ms: float = 0.0
    rows: int = 0


def measure(url: str, jobs: int, repeat: int) -> list[Timing]:
    """Each statement `repeat` times under EXPLAIN ANALYZE (planning + execution, server-side) and `repeat`
    times as the repository runs it (wall, rows fetched), after one warm-up."""
    from sqlalchemy import create_engine

    engine = create_engine(url)
    timings = []
    try:
        with engine.connect() as conn:
            now = conn.exec_driver_sql("SELECT now()").scalar_one()
            for name, (path, statement) in statements(jobs, now).items():
                sql_text, params = _compiled(conn, statement)
                conn.execute(statement).all()  # warm-up: the pages in the cache, as on a page that is used
                timing = Timing(name, path)
                for _ in range(repeat):
                    raw = conn.exec_driver_sql(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql_text}", params).scalar_one()
                    result = (json.loads(raw) if isinstance(raw, str) else raw)[0]
                    timing.samples_ms.append(result["Planning Time"] + result["Execution Time"])
                    timing.rows = int(result["Plan"]["Actual Rows"])
                walls = []
                for _ in range(repeat):
                    started = time.perf_counter()
                    conn.execute(statement).all()
                    walls.append((time.perf_counter() - started) * 1000)
                timing.p50_ms = statistics.median(timing.samples_ms)
                timing.max_ms = max(timing.samples_ms)
                timing.wall_p50_ms = statistics.median(walls)
                timing.plan = plan(conn, statement, analyze=True)
                timings.append(timing)
                conn.rollback()
    finally:
        engine.dispose()
    return timings


def report(timings: list[Timing], jobs: int, runs: int, took: dict[str, float], note: str = "") -> str:
    """The results as markdown: a table, then each plan."""
    fill_text = ", ".join(f"{step} {seconds:.1f} s" for step, seconds in took.items())
    lines = [
        f"# dbsched read paths at {jobs:,} jobs / {runs:,} runs (PostgreSQL)",
        "",
        *([note, ""] if note else []),
        f"Fill: {fill_text}. Server-side time = planning + execution (EXPLAIN ANALYZE); wall = the statement run",
        f"through SQLAlchemy with its rows fetched. Over budget ({BUDGET_MS:g} ms server-side, max): **SLOW**.",
        "",
        "| statement | used by | server p50 ms | server max ms | wall p50 ms | rows | |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for t in timings:
        flag = "**SLOW**" if t.slow else ""
        lines.append(
            f"| {t.name} | `{t.path}` | {t.p50_ms:.2f} | {t.max_ms:.2f} | {t.wall_p50_ms:.2f} | {t.rows} | {flag} |"
        )
    lines.append("")
    for t in timings:
        lines += [f"## {t.name}", "", "```", t.plan, "```", ""]
    return "\n".join(lines)


def arguments(description: str | None, repeat_help: str) -> argparse.ArgumentParser:
    """The options of the benchmarks on this fill (this one and bench/pages.py): its size, where, the report."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=5_000_000)
    parser.add_argument("--repeat", type=int, default=5, help=repeat_help)
    parser.add_argument("--pg", default=Config.pg_admin, help="the server (any database on it)")
    parser.add_argument("--db-prefix", default=Config.db_prefix)
    parser.add_argument("--url", default=None, help="fill this database or schema instead (kept: its owner drops it)")
    parser.add_argument("--keep", action="store_true", help="keep the filled database")
    parser.add_argument("--note", default="", help="a line under the title (where and how it was measured)")
    parser.add_argument("--out", default=None, help="write the markdown here (and the numbers as .json beside it)")
    return parser


def write(path: str, text: str, numbers: dict[str, Any]) -> None:
    """The report at `path` and its numbers as JSON beside it (`.json`)."""
    with open(path, "w") as out:
        out.write(text + "\n")
    with open(os.path.splitext(path)[0] + ".json", "w") as out:
        json.dump(numbers, out, indent=1, default=str)


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__, "EXPLAIN ANALYZE samples per statement")
    args = parser.parse_args(argv)

    cfg = Config(pg_admin=args.pg, db_prefix=args.db_prefix)
    url = args.url or ensure_database(cfg, DATABASE, recreate=True)
    try:
        took = fill(url, args.jobs, args.runs)
        timings = measure(url, args.jobs, args.repeat)
    finally:
        if args.url is None and not args.keep:
            drop_database(cfg, DATABASE)
    text = report(timings, args.jobs, args.runs, took, args.note)
    print(text)
    if args.out:
        numbers = {"jobs": args.jobs, "runs": args.runs, "fill_seconds": took, "timings": [asdict(t) for t in timings]}
        write(args.out, text, numbers)
    slow = [t.name for t in timings if t.slow]
    if slow:
        print(f"over {BUDGET_MS:g} ms server-side: {', '.join(slow)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
