"""Goal 7 of issue 9: the run history stays bounded under sustained load.

    python bench/history.py                                   # 20,000 jobs every 20 s for 20 min (~25 min)
    python bench/history.py --minutes 3 --jobs 5000           # a short run (~5 min)

N `@job` jobs, each on an interval schedule of `--every` seconds, their due times spread evenly over the
interval (N / every runs per second on average), on PostgreSQL. One beat: the real `celery_dbsched.Scheduler`
in its own process, in Celery's beat loop, publishing on `memory://` (the in-process queue is emptied as it
fills). Its run retention is cut to `--retention` seconds (`dbsched_run_retention`), its monitor step runs
every `--monitor-interval` seconds, and it prunes at the cadence the scheduler derives from the retention
(`celery_dbsched.scheduler.prune_interval`: a tenth of it), so pruning runs all the time.

The runs are completed by a simulated worker pool, not by Celery workers: the beat process hands every run id
it published to `--worker-procs` processes of `--worker-threads` threads each (a multiprocessing queue stands
in for the broker), and each thread calls the real `JobRepository.start_run(run_id, ...)` and
`JobRepository.complete_run(run_id)` for it, i.e. the statements a worker's wrapper task issues, without
Celery's consumer around them.

Every `--sample` seconds the main process samples, on its own connection: the claim lag of the runs claimed
since the last sample (`create_time - scheduled_for`, p50/p99/max), the runs table's total size and each
index's size, live and dead tuples and the autovacuum count (`pg_stat_user_tables`), backends waiting on a
lock; the beat process logs every prune (rows, seconds) and every claim (seconds). The report is a Markdown
page with plots (`docs/benchmarks-history.md`, `.png`, raw `.json`).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/history.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import REPO_ROOT, Config, ensure_database, fresh_schema, log, percentile, template_columns

PREFIX = "hist.e"
STOP = -1


# -- setup ----------------------------------------------------------------------------------------------------


def setup(url: str, jobs: int, every: float) -> None:
    """Empty the database, migrate, store N jobs whose first due times are spread evenly over one interval."""
    from sqlalchemy import text

    from celery_dbsched import JobRepository
    from celery_dbsched.schedules import IntervalSchedule

    fresh_schema(url)
    repository = JobRepository(url)
    try:
        template = "hist.template"
        repository.upsert_job(template, "history benchmark job", schedule=IntervalSchedule(every))
        quoted, picked = template_columns(repository.engine, ("name", "next_scheduled_run"))
        with repository.engine.begin() as conn:
            # First due 2 s from now + i * every / N: a steady N / every runs per second.
            conn.execute(
                text(
                    f"INSERT INTO dbsched_job (name, next_scheduled_run, {quoted}) "
                    f"SELECT :prefix || g, now() + make_interval(secs => 2 + g * :every / :n), {picked} "
                    f"FROM dbsched_job t, generate_series(0, :n - 1) g WHERE t.name = :template"
                ),
                {"prefix": PREFIX, "n": jobs, "every": float(every), "template": template},
            )
            conn.execute(text("DELETE FROM dbsched_job WHERE name = :t"), {"t": template})
        with repository.engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("VACUUM ANALYZE dbsched_job"))
    finally:
        repository.close()


# -- the beat process ---------------------------------------------------------------------------------------


def beat_process(url: str, opts: dict[str, Any], runs: Any, events_path: str, stop: Any) -> None:
    """The real Scheduler in Celery's beat loop; every published run id goes to the worker pool."""
    import datetime as dt

    from celery import Celery, signals

    from bench.common import purge_memory_broker
    from celery_dbsched.scheduler import Scheduler

    app = Celery("bench-history", set_as_current=True)
    app.conf.update(
        broker_url="memory://",
        timezone="UTC",
        enable_utc=True,
        result_expires=None,
        dbsched_database_url=url,
        dbsched_server_id=f"history-beat-{os.getpid()}",
        dbsched_run_retention=dt.timedelta(seconds=opts["retention"]),
        dbsched_monitor_interval=dt.timedelta(seconds=opts["monitor_interval"]),
    )
    events = open(events_path, "w", buffering=1)  # noqa: SIM115 - closed at exit
    lock = threading.Lock()
    published = [0]

    def on_publish(sender: Any = None, body: Any = None, **kwargs: Any) -> None:
        args = body[0] if isinstance(body, (tuple, list)) and body else None
        if isinstance(args, (list, tuple)) and args and isinstance(args[0], int):
            runs.put(args[0])
            published[0] += 1
            if published[0] % 2000 == 0:
                purge_memory_broker()

    signals.after_task_publish.connect(on_publish, weak=False)
    scheduler = Scheduler(app=app)
    repository = scheduler.repository

    def timed(name: str, method: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.time()
            result = method(*args, **kwargs)
            t1 = time.time()
            runs = getattr(result, "runs", None)  # a Claim
            rows = result if isinstance(result, int) else len(runs) if isinstance(runs, list) else None
            with lock:
                events.write(json.dumps({"e": name, "t0": t0, "t1": t1, "rows": rows}) + "\n")
            return result

        return wrapper

    # Instrumentation only: the same methods, timed.
    repository.prune_runs = timed("prune", repository.prune_runs)  # type: ignore[method-assign]
    repository.claim_runs = timed("claim", repository.claim_runs)  # type: ignore[method-assign]
    captured: list[Any] = []

    from sqlalchemy import event

    def before(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        if not captured and statement.lstrip().upper().startswith("DELETE FROM DBSCHED_JOB_RUN"):
            captured.append((statement, parameters))
            with lock:
                events.write(json.dumps({"e": "prune_sql", "sql": statement, "params": parameters}, default=str) + "\n")

    event.listen(repository.engine, "before_cursor_execute", before)
    while not stop.is_set():
        interval = scheduler.tick()
        if interval and interval > 0:
            stop.wait(interval)
    scheduler.close()
    events.close()
    for _ in range(opts["worker_procs"] * opts["worker_threads"]):
        runs.put(STOP)


# -- the worker pool ----------------------------------------------------------------------------------------


def worker_process(url: str, threads: int, runs: Any, done: Any, index: int, sync_commit: bool = True) -> None:
    """Threads that start and complete every run id they are handed, with the real repository statements."""
    from celery_dbsched import JobRepository

    repository = JobRepository(url, engine_options={"pool_size": threads, "max_overflow": 0})
    if not sync_commit:
        from sqlalchemy import event

        @event.listens_for(repository.engine, "connect")
        def _async_commit(dbapi_connection: Any, record: Any) -> None:
            with dbapi_connection.cursor() as cursor:
                cursor.execute("SET synchronous_commit = off")
            dbapi_connection.commit()

    name = f"history-worker-{index}"

    def loop() -> None:
        while True:
            run_id = runs.get()
            if run_id == STOP:
                return
            try:
                repository.start_run(run_id, name)
                repository.complete_run(run_id)
            except Exception as exc:  # a run interrupted or pruned meanwhile: count it, go on
                with done.get_lock():
                    done[1] += 1
                log(f"worker: run {run_id}: {type(exc).__name__}: {exc}")
                continue
            with done.get_lock():
                done[0] += 1

    pool = [threading.Thread(target=loop, daemon=True) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    repository.close()


# -- sampling -------------------------------------------------------------------------------------------------

SAMPLE_SQL = {
    "table": "SELECT pg_total_relation_size('dbsched_job_run'), pg_relation_size('dbsched_job_run')",
    "indexes": (
        "SELECT c.relname, pg_relation_size(c.oid) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "WHERE i.indrelid = 'dbsched_job_run'::regclass ORDER BY c.relname"
    ),
    "stats": (
        "SELECT n_live_tup, n_dead_tup, autovacuum_count, n_tup_del, vacuum_count "
        "FROM pg_stat_user_tables WHERE relid = 'dbsched_job_run'::regclass"
    ),
    "lag": (
        "SELECT count(*), max(id), "
        "percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM create_time - scheduled_for)), "
        "percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM create_time - scheduled_for)), "
        "max(extract(epoch FROM create_time - scheduled_for)) "
        "FROM dbsched_job_run WHERE id > :last AND scheduled_for IS NOT NULL"
    ),
    "active": "SELECT count(*) FROM dbsched_job_run WHERE status IN ('queued', 'running')",
    # Jobs past their due time and not claimed: waiting for the beat, or for their previous run to end.
    "overdue": (
        "SELECT count(*), extract(epoch FROM now() - min(next_scheduled_run)) FROM dbsched_job "
        "WHERE next_scheduled_run < now() - interval '1 second'"
    ),
    "waiting": (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
    ),
}


def sample(conn: Any, last_id: int) -> dict[str, Any]:
    from sqlalchemy import text

    out: dict[str, Any] = {"t": time.time()}
    total, heap = conn.execute(text(SAMPLE_SQL["table"])).one()
    out["total_bytes"], out["heap_bytes"] = int(total), int(heap)
    out["index_bytes"] = {name: int(size) for name, size in conn.execute(text(SAMPLE_SQL["indexes"])).all()}
    live, dead, autovacuums, deleted, vacuums = conn.execute(text(SAMPLE_SQL["stats"])).one()
    out.update(live=live, dead=dead, autovacuums=autovacuums, deleted=deleted, vacuums=vacuums)
    count, max_id, p50, p99, worst = conn.execute(text(SAMPLE_SQL["lag"]), {"last": last_id}).one()

    def num(v: Any) -> float | None:
        return None if v is None else float(v)

    out.update(
        claimed=int(count), max_id=int(max_id or last_id), lag_p50=num(p50), lag_p99=num(p99), lag_max=num(worst)
    )
    out["active"] = int(conn.execute(text(SAMPLE_SQL["active"])).scalar_one())
    overdue, oldest = conn.execute(text(SAMPLE_SQL["overdue"])).one()
    out["overdue"], out["oldest_overdue_s"] = int(overdue), num(oldest)
    out["lock_waiters"] = int(conn.execute(text(SAMPLE_SQL["waiting"])).scalar_one())
    return out


# -- autovacuum's stand-in ------------------------------------------------------------------------------------


def autovacuum_settings(conn: Any) -> dict[str, Any]:
    from sqlalchemy import text

    rows = conn.execute(
        text(
            "SELECT name, setting FROM pg_settings WHERE name IN ('autovacuum', 'autovacuum_naptime', "
            "'autovacuum_vacuum_threshold', 'autovacuum_vacuum_scale_factor')"
        )
    ).all()
    return {name: value for name, value in rows}


class VacuumStandIn(threading.Thread):
    """When the server runs with `autovacuum = off` (the CI's PostgreSQL does, for speed), do what autovacuum
    would do with its default settings for the runs table, so that the figures are those of a production
    server: every `autovacuum_naptime`, VACUUM (ANALYZE) the table if its dead tuples exceed
    `autovacuum_vacuum_threshold + autovacuum_vacuum_scale_factor * live tuples`. VACUUM (not FULL) takes a
    SHARE UPDATE EXCLUSIVE lock, which no claim, start, completion or prune waits for."""

    def __init__(self, url: str, settings: dict[str, Any]) -> None:
        super().__init__(name="vacuum-stand-in", daemon=True)
        self.url = url
        self.naptime = float(settings.get("autovacuum_naptime", 60))
        self.threshold = float(settings.get("autovacuum_vacuum_threshold", 50))
        self.scale = float(settings.get("autovacuum_vacuum_scale_factor", 0.2))
        self.stopped = threading.Event()
        self.runs: list[dict[str, float]] = []

    def run(self) -> None:
        from sqlalchemy import text

        from celery_dbsched.engine import make_engine

        engine = make_engine(self.url)
        try:
            with engine.connect() as conn:
                conn = conn.execution_options(isolation_level="AUTOCOMMIT")
                while not self.stopped.wait(self.naptime):
                    live, dead = conn.execute(
                        text(
                            "SELECT n_live_tup, n_dead_tup FROM pg_stat_user_tables "
                            "WHERE relid = 'dbsched_job_run'::regclass"
                        )
                    ).one()
                    if dead > self.threshold + self.scale * live:
                        t0 = time.time()
                        conn.execute(text("VACUUM (ANALYZE) dbsched_job_run"))
                        self.runs.append({"t0": t0, "t1": time.time(), "dead": float(dead)})
        finally:
            engine.dispose()


# -- the run --------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    from sqlalchemy import text

    from celery_dbsched.engine import make_engine
    from celery_dbsched.scheduler import prune_interval

    cfg = Config(pg_admin=args.pg, db_prefix=args.db_prefix)
    url = args.url or ensure_database(cfg, "history", recreate=True)
    log(f"history: {args.jobs:,} jobs every {args.every:g} s for {args.minutes:g} min on {url.split('@')[-1]}")
    t0 = time.perf_counter()
    setup(url, args.jobs, args.every)
    log(f"history: set up in {time.perf_counter() - t0:.1f}s")
    ctx = mp.get_context("spawn")
    runs = ctx.Queue()
    done = ctx.Array("q", [0, 0])
    stop = ctx.Event()
    out_dir = Path(args.out).resolve().parent
    events_path = str(out_dir / f".history-events-{os.getpid()}.jsonl")
    opts = {
        "retention": args.retention,
        "monitor_interval": args.monitor_interval,
        "worker_procs": args.worker_procs,
        "worker_threads": args.worker_threads,
    }
    workers = [
        ctx.Process(
            target=worker_process, args=(url, args.worker_threads, runs, done, i, args.worker_sync_commit), daemon=True
        )
        for i in range(args.worker_procs)
    ]
    for w in workers:
        w.start()
    beat = ctx.Process(target=beat_process, args=(url, opts, runs, events_path, stop), daemon=True)
    started = time.time()
    beat.start()
    engine = make_engine(url)
    with engine.connect() as conn:
        av = autovacuum_settings(conn)
    stand_in = None
    if av.get("autovacuum") == "off" and args.vacuum_stand_in:
        stand_in = VacuumStandIn(url, av)
        stand_in.start()
        log(f"history: the server runs with autovacuum off: the harness stands in for it ({av})")
    samples: list[dict[str, Any]] = []
    last_id = 0
    last_done = 0
    plan: list[str] | str | None = None
    end = started + args.minutes * 60
    try:
        with engine.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            next_sample = started + args.sample
            while time.time() < end:
                time.sleep(max(0.0, next_sample - time.time()))
                next_sample += args.sample
                if not beat.is_alive():
                    raise RuntimeError(f"the beat process exited ({beat.exitcode})")
                s = sample(conn, last_id)
                s["elapsed"] = s["t"] - started
                s["completed"] = done[0] - last_done
                s["worker_errors"] = done[1]
                s["stand_in_vacuums"] = len(stand_in.runs) if stand_in else 0
                last_done = done[0]
                last_id = s["max_id"]
                samples.append(s)
                log(
                    f"history t={s['elapsed']:.0f}s claimed {s['claimed']:,} completed {s['completed']:,} "
                    f"active {s['active']:,} lag p50 {s['lag_p50'] or 0:.3f}s p99 {s['lag_p99'] or 0:.3f}s "
                    f"table {s['total_bytes'] / 2**20:.1f} MB live {s['live']:,} dead {s['dead']:,} "
                    f"autovacuums {s['autovacuums']} lock waiters {s['lock_waiters']}"
                )
    finally:
        if stand_in is not None:
            stand_in.stopped.set()
        stop.set()
        beat.join(timeout=60)
        for w in workers:
            w.join(timeout=60)
            if w.is_alive():
                w.kill()
        if beat.is_alive():
            beat.kill()
    events = [json.loads(line) for line in Path(events_path).read_text().splitlines() if line.strip()]
    Path(events_path).unlink(missing_ok=True)
    prune_sql = next((e for e in events if e["e"] == "prune_sql"), None)
    if prune_sql is not None:
        plan = explain_prune(engine, prune_sql)
    with engine.connect() as conn:
        indexes = [
            row[0]
            for row in conn.execute(
                text(
                    "SELECT indexdef FROM pg_indexes WHERE tablename = 'dbsched_job_run' "
                    "AND schemaname = current_schema() ORDER BY indexname"
                )
            )
        ]
    engine.dispose()
    if args.cleanup and not args.url:
        from bench.common import drop_database

        drop_database(cfg, "history")
    return {
        "meta": {
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.gmtime(started)),
            "host": socket.gethostname(),
            "cpus": os.cpu_count(),
            "argv": sys.argv,
            "jobs": args.jobs,
            "every_s": args.every,
            "minutes": args.minutes,
            "retention_s": args.retention,
            "monitor_interval_s": args.monitor_interval,
            "prune_interval_s": prune_interval(__import__("datetime").timedelta(seconds=args.retention)),
            "worker_procs": args.worker_procs,
            "worker_threads": args.worker_threads,
            "worker_sync_commit": args.worker_sync_commit,
            "sample_s": args.sample,
            "git": _git(),
        },
        "samples": samples,
        "prunes": [e for e in events if e["e"] == "prune"],
        # Claims are many (one per tick with something due): kept as a summary, not one by one.
        "claims": claims_summary([e for e in events if e["e"] == "claim"]),
        "prune_sql": prune_sql,
        "prune_plan": plan,
        "indexes": indexes,
        "autovacuum": av,
        "stand_in_vacuums": stand_in.runs if stand_in else None,
        "completed_total": int(done[0]),
        "worker_errors": int(done[1]),
    }


def explain_prune(engine: Any, captured: dict[str, Any]) -> list[str] | str:
    """EXPLAIN (not ANALYZE: nothing is deleted) of the first prune batch the beat sent, with its parameters."""
    try:
        raw = engine.raw_connection()
        try:
            cursor = raw.cursor()
            cursor.execute("EXPLAIN " + captured["sql"], captured["params"] or None)
            return [row[0] for row in cursor.fetchall()]
        finally:
            raw.rollback()
            raw.close()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def _git() -> str:
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
        return head.stdout.strip()
    except OSError:
        return "unknown"


# -- the report -----------------------------------------------------------------------------------------------


def _ok(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


def claims_summary(claims: list[dict[str, Any]]) -> dict[str, Any]:
    """How long the beat's claim calls took: count, p50, p99, max, and the claimed rows in all."""
    spans = [c["t1"] - c["t0"] for c in claims]
    return {
        "count": len(spans),
        "rows": sum(c["rows"] or 0 for c in claims),
        "p50_s": percentile(spans, 50) if spans else None,
        "p99_s": percentile(spans, 99) if spans else None,
        "max_s": max(spans) if spans else None,
    }


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    meta, samples = results["meta"], results["samples"]
    retention = meta["retention_s"]
    warm = [s for s in samples if s["elapsed"] > retention]  # after the first retention window
    lag99 = [s["lag_p99"] for s in warm if _ok(s["lag_p99"])]
    lag50 = [s["lag_p50"] for s in warm if _ok(s["lag_p50"])]
    lagmax = [s["lag_max"] for s in warm if _ok(s["lag_max"])]
    # "Flat": the table's size once pruning and vacuum have reached their steady state (one retention window, then
    # one autovacuum naptime or two prune intervals, whichever is longer) against its largest size after that.
    settle = retention + max(60.0, 2 * meta["prune_interval_s"])
    steady = [s for s in samples if s["elapsed"] > settle]
    size_at = steady[0]["total_bytes"] if steady else None
    size_max = max((s["total_bytes"] for s in steady), default=None)
    size_end = samples[-1]["total_bytes"] if samples else None
    prunes = results["prunes"]
    pruned = sum(p["rows"] or 0 for p in prunes)
    prune_s = [p["t1"] - p["t0"] for p in prunes if p["rows"]]
    claims = results["claims"]
    if isinstance(claims, list):  # the JSON of an earlier version kept every claim
        claims = claims_summary(claims)
    duration = (samples[-1]["t"] - samples[0]["t"] + meta["sample_s"]) if samples else 0
    claimed = sum(s["claimed"] for s in samples)
    return {
        "lag_p50_median": percentile(lag50, 50) if lag50 else None,
        "lag_p99_max": max(lag99) if lag99 else None,
        "lag_p99_median": percentile(lag99, 50) if lag99 else None,
        "lag_max": max(lagmax) if lagmax else None,
        "oldest_overdue_max": max((x.get("oldest_overdue_s") or 0 for x in warm), default=None),
        "settle_s": settle,
        "size_at_settle": size_at,
        "size_max_after": size_max,
        "size_end": size_end,
        "growth": (size_max / size_at) if size_at and size_max else None,
        "pruned": pruned,
        "prunes": len([p for p in prunes if p["rows"]]),
        "prune_rate": pruned / duration if duration else None,
        "prune_s_p50": percentile(prune_s, 50) if prune_s else None,
        "prune_s_max": max(prune_s) if prune_s else None,
        "prune_rows_max": max((p["rows"] or 0 for p in prunes), default=0),
        "claims": claims["count"],
        "claim_s_p99": claims["p99_s"],
        "claim_s_max": claims["max_s"],
        "lock_waiters_max": max((s["lock_waiters"] for s in samples), default=0),
        "claimed_per_s": claimed / duration if duration else None,
        "completed_per_s": results["completed_total"] / duration if duration else None,
        "dead_max": max((s["dead"] or 0 for s in samples), default=0),
        "autovacuums": (samples[-1]["autovacuums"] or 0) - (samples[0]["autovacuums"] or 0) if samples else 0,
        "stand_in_vacuums": len(results.get("stand_in_vacuums") or []),
        "stand_in_vacuum_s_max": max((v["t1"] - v["t0"] for v in results.get("stand_in_vacuums") or []), default=None),
    }


def write_report(results: dict[str, Any], out: Path) -> None:
    meta = results["meta"]
    s = summarize(results)
    results["summary"] = s
    plot = out.with_suffix(".png")
    plotted = _plot(results, plot)
    mb = lambda b: f"{b / 2**20:,.1f} MB" if _ok(b) else "-"  # noqa: E731
    sec = lambda v: f"{v * 1e3:,.0f} ms" if _ok(v) and v < 1 else (f"{v:,.2f} s" if _ok(v) else "-")  # noqa: E731
    yes = lambda ok: "-" if ok is None else ("**yes**" if ok else "**no**")  # noqa: E731
    rate_goal = meta["jobs"] / meta["every_s"]
    lines = [
        "# Benchmarks: the run history under sustained load (issue 9, goal 7)",
        "",
        f"Generated by `python bench/history.py` ({' '.join(meta['argv'][1:]) or 'defaults'}) on {meta['started']}, "
        f"{meta['cpus']} CPUs, code at {meta['git']}. How it runs: the docstring of "
        "[bench/history.py](../bench/history.py) and [bench/README.md](../bench/README.md).",
        "",
        *([f"**{meta['note']}**", ""] if meta.get("note") else []),
        f"{meta['jobs']:,} `@job` jobs on an interval of {meta['every_s']:g} s, due times spread evenly "
        f"({rate_goal:,.0f} runs/s asked for), for {meta['minutes']:g} minutes on PostgreSQL. One beat: the real "
        "`celery_dbsched.Scheduler` in Celery's beat loop, publishing on `memory://`. "
        f"Run retention {meta['retention_s']:g} s (`dbsched_run_retention`), monitor step every "
        f"{meta['monitor_interval_s']:g} s, prune every {meta['prune_interval_s']:g} s (derived from the retention). "
        "**The runs are completed by a simulated worker pool**, not by Celery workers: "
        f"{meta['worker_procs']} processes x {meta['worker_threads']} threads, handed each published run id, call "
        "the real `JobRepository.start_run` and `JobRepository.complete_run` for it"
        + (
            "."
            if meta.get("worker_sync_commit", True)
            else " (their sessions only run with `synchronous_commit = off`: they stand in for many worker hosts, "
            "whose commits a 2-core machine's WAL flushes would otherwise serialize; the beat commits durably)."
        ),
        "",
        "## Goals",
        "",
        "| goal | measured | met? |",
        "|---|---|---|",
        f"| claim lag p99 < 1 s (after the first retention window) | worst sample p99 {sec(s['lag_p99_max'])}, "
        f"median sample p99 {sec(s['lag_p99_median'])}, p50 {sec(s['lag_p50_median'])}, max {sec(s['lag_max'])}; "
        f"the oldest due job not claimed yet at any sample: {sec(s['oldest_overdue_max'])} "
        f"| {yes(None if s['lag_p99_max'] is None else s['lag_p99_max'] < 1 and (s['oldest_overdue_max'] or 0) < 1)} |",
        f"| runs table size flat after the first retention window | {mb(s['size_at_settle'])} at "
        f"{s['settle_s']:g} s, at most {mb(s['size_max_after'])} after, {mb(s['size_end'])} at the end "
        f"(x{s['growth']:.2f}) | {yes(None if s['growth'] is None else s['growth'] <= 1.25)} |"
        if s["growth"] is not None
        else "| runs table size flat after the first retention window | run too short to tell | - |",
        f"| pruning never blocks a claim | backends waiting on a lock at any sample: at most "
        f"{s['lock_waiters_max']}; the beat prunes between two claims in its own loop, so a prune can only delay "
        f"the next claim by its own duration: one prune took at most {sec(s['prune_s_max'])}; claim statement p99 "
        f"{sec(s['claim_s_p99'])}, max {sec(s['claim_s_max'])} | {yes(s['lock_waiters_max'] == 0)} |",
        "",
        "## Throughput and pruning",
        "",
        f"- Claimed {s['claimed_per_s'] or 0:,.0f} runs/s, completed {s['completed_per_s'] or 0:,.0f} runs/s "
        f"(asked: {rate_goal:,.0f}/s); worker errors: {results['worker_errors']}.",
        f"- Pruned {s['pruned']:,} runs in {s['prunes']:,} prunes ({s['prune_rate'] or 0:,.0f} rows/s on average); "
        f"one prune: p50 {sec(s['prune_s_p50'])}, max {sec(s['prune_s_max'])}, at most {s['prune_rows_max']:,} rows "
        "(in batches of at most 5,000 rows, one transaction each: `JobRepository.prune_runs`).",
        f"- Dead tuples at most {s['dead_max']:,}; autovacuum ran {s['autovacuums']} time(s) on the runs table"
        + (
            f"; the server runs with `autovacuum = off`, so the harness stood in for it with its default settings "
            f"(every {results['autovacuum'].get('autovacuum_naptime')} s, VACUUM (ANALYZE) when dead tuples exceed "
            f"{results['autovacuum'].get('autovacuum_vacuum_threshold')} + "
            f"{results['autovacuum'].get('autovacuum_vacuum_scale_factor')} x live): {s['stand_in_vacuums']} "
            f"VACUUM(s), the longest {sec(s['stand_in_vacuum_s_max'])}."
            if (results.get("autovacuum") or {}).get("autovacuum") == "off"
            and results.get("stand_in_vacuums") is not None
            else "."
        ),
        "",
        "Batched deletes, not time partitions: the one-active-run guarantee is a partial unique index on "
        "`(job_name, slot) WHERE status IN ('queued', 'running')`, which PostgreSQL can only enforce across a "
        "partitioned table if the partition key is part of it; a run moves from active to final in place, so a "
        "partition by end time would move rows between partitions on every completion. A batch picks the oldest "
        "final runs through the `end_time` index (`dbsched_job_run_end`, present since revision 0001: no "
        "migration), deletes at most 5,000 rows per transaction and skips rows another pruning beat holds. "
        "At the derived cadence a prune meets a tenth of the retention's runs (12,000 at 1,000 runs/s), which one "
        "DELETE would also handle quickly; batches matter for a backlog (a beat that was down, a retention cut, "
        "the first prune of a large history): `python bench/prune_compare.py` measured 300,000 old runs pruned by "
        "one DELETE in one 0.51 s transaction, and by `prune_runs` in 61 transactions of at most 75 ms (3.1 s in "
        "all: batches cost more per row, but no transaction holds vacuum's horizon or the beat's loop for long, "
        "and one prune stops after 50,000 rows so that the beat dispatches again).",
        "",
        "The prune batch statement and its plan (EXPLAIN, taken at the end of the run with the parameters the beat "
        "sent):",
        "",
        "```sql",
        (results.get("prune_sql") or {}).get("sql", "-").strip(),
        "```",
        "",
        "```",
        "\n".join(results["prune_plan"])
        if isinstance(results.get("prune_plan"), list)
        else str(results.get("prune_plan")),
        "```",
        "",
        "Indexes of the runs table:",
        "",
        *[f"- `{d}`" for d in results.get("indexes", [])],
        "",
        f"![claim lag, table and index size, prune rate, dead tuples over time]({plot.name})",
        "",
    ]
    if plotted:
        lines.append(f"*Plot not written: {plotted}.*")
        lines.append("")
    lines += [
        "## Samples",
        "",
        "| t (s) | claimed | completed | active | overdue jobs (oldest) | lag p50 | lag p99 | table (total) | live "
        "| dead | autovacuums | lock waiters |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for x in results["samples"]:
        lines.append(
            f"| {x['elapsed']:.0f} | {x['claimed']:,} | {x['completed']:,} | {x['active']:,} "
            f"| {x.get('overdue', 0):,} ({sec(x.get('oldest_overdue_s'))}) | {sec(x['lag_p50'])} "
            f"| {sec(x['lag_p99'])} | {mb(x['total_bytes'])} | {x['live'] or 0:,} | {x['dead'] or 0:,} "
            f"| {x['autovacuums']} | {x['lock_waiters']} |"
        )
    lines.append("")
    out.write_text("\n".join(lines))


def _plot(results: dict[str, Any], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed"
    samples = results["samples"]
    if not samples:
        return "no samples"
    meta = results["meta"]
    t = [s["elapsed"] for s in samples]
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5), sharex=True)
    (lag, size), (prune, dead) = axes
    lag.plot(t, [s["lag_p50"] for s in samples], label="p50")
    lag.plot(t, [s["lag_p99"] for s in samples], label="p99")
    lag.plot(
        t,
        [s.get("oldest_overdue_s") or 0 for s in samples],
        color="gray",
        linewidth=0.8,
        label="oldest due job not claimed yet (waits for the beat or for its previous run)",
    )
    lag.axhline(1.0, color="red", linestyle=":", label="goal: p99 < 1 s")
    lag.set_ylabel("claim lag (s): create_time - scheduled_for")
    lag.set_title("Claim lag of the runs claimed in each sample")
    size.plot(t, [s["total_bytes"] / 2**20 for s in samples], label="table + indexes + TOAST (total)", linewidth=2)
    size.plot(t, [s["heap_bytes"] / 2**20 for s in samples], label="table (heap)")
    names = sorted({n for s in samples for n in s["index_bytes"]})
    for name in names:
        size.plot(t, [s["index_bytes"].get(name, 0) / 2**20 for s in samples], label=name, linewidth=0.8)
    size.set_ylabel("MB")
    size.set_title("dbsched_job_run size")
    size.legend(fontsize=7)
    bucket = meta["sample_s"]
    rows = [0.0 for _ in samples]
    for p in results["prunes"]:
        k = min(len(samples) - 1, max(0, int((p["t1"] - samples[0]["t"] + bucket) // bucket)))
        rows[k] += p["rows"] or 0
    window = max(1, round(30 / bucket))  # prunes come every prune interval: show 30 s moving averages

    def smooth(values: list[float]) -> list[float]:
        return [
            sum(values[max(0, i - window + 1) : i + 1]) / (bucket * (i + 1 - max(0, i - window + 1)))
            for i in range(len(values))
        ]

    prune.plot(t, smooth(rows), label="pruned rows/s (30 s moving average)", linewidth=2)
    prune.plot(t, smooth([s["claimed"] for s in samples]), color="black", label="claimed runs/s (30 s moving average)")
    prune.set_ylabel("rows per second")
    prune.set_title("Prune rate against claim rate")
    dead.plot(t, [s["dead"] or 0 for s in samples], label="n_dead_tup")
    dead.plot(t, [s["live"] or 0 for s in samples], label="n_live_tup")
    ax2 = dead.twinx()
    ax2.step(
        t,
        [(s["autovacuums"] or 0) + s.get("stand_in_vacuums", 0) for s in samples],
        color="gray",
        where="post",
        label="autovacuum runs (or the harness's stand-in)",
    )
    ax2.set_ylabel("autovacuum runs (cumulative)")
    ax2.legend(fontsize=7, loc="upper right")
    dead.set_ylabel("tuples")
    dead.set_title("Live and dead tuples, autovacuum")
    for ax in (lag, size, prune, dead):
        ax.axvline(meta["retention_s"], color="gray", linestyle="--", linewidth=0.8)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    for ax in (prune, dead):
        ax.set_xlabel("seconds since the beat started (dashed: one retention window)")
    fig.suptitle(
        f"{meta['jobs']:,} jobs every {meta['every_s']:g} s, retention {meta['retention_s']:g} s, "
        f"{meta['minutes']:g} min, PostgreSQL"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=20.0, help="how long the load runs")
    parser.add_argument("--jobs", type=int, default=20000, help="number of jobs")
    parser.add_argument("--every", type=float, default=20.0, help="seconds: each job's interval")
    parser.add_argument("--retention", type=float, default=120.0, help="seconds: dbsched_run_retention")
    parser.add_argument("--monitor-interval", type=float, default=5.0, help="seconds: dbsched_monitor_interval")
    parser.add_argument("--worker-procs", type=int, default=2, help="simulated worker processes")
    parser.add_argument("--worker-threads", type=int, default=4, help="threads per simulated worker process")
    parser.add_argument(
        "--no-vacuum-stand-in",
        dest="vacuum_stand_in",
        action="store_false",
        help="on a server with autovacuum off, do not stand in for it (the table then only grows)",
    )
    parser.add_argument(
        "--worker-sync-commit",
        action="store_true",
        help="the simulated workers wait for each commit's WAL flush (default: synchronous_commit = off for their "
        "sessions only; they stand in for many worker hosts, which a 2-core machine's WAL flushes would serialize)",
    )
    parser.add_argument("--sample", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--out", default="docs/benchmarks-history.md", help="the Markdown report")
    parser.add_argument("--pg", default=Config.pg_admin, help="PostgreSQL server (any database on it)")
    parser.add_argument("--db-prefix", default="bench_", help="the run creates database <prefix>history")
    parser.add_argument("--url", default=None, help="use this database (or schema) as is")
    parser.add_argument("--cleanup", action="store_true", help="drop the database the run created at the end")
    parser.add_argument("--note", default=None, help="a paragraph to put under the page's title")
    parser.add_argument("--from-json", default=None, help="only rewrite the report from an earlier run's JSON")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(Path(args.from_json).read_text()) if args.from_json else run(args)
    if args.note:
        results["meta"]["note"] = args.note
    write_report(results, out)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str))
    print(f"wrote {out}, {out.with_suffix('.png')} and {out.with_suffix('.json')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
