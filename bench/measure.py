"""The per-system measurements, each run in a fresh subprocess by bench/run.py:

    python -m bench.measure populate SYSTEM N idle|due CONFIG_JSON   empty the store, store N schedules
    python -m bench.measure make-due SYSTEM CONFIG_JSON              make every bench schedule due now
    python -m bench.measure beat SYSTEM N CONFIG_JSON                start-up, idle tick, pickup, dispatch, RSS
    python -m bench.measure instance SYSTEM DIR N CONFIG_JSON        one of several beats on one store

`beat` runs in its own process so that its peak RSS is the beat's: the schedules are stored, and later made
due, by other processes.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .common import (
    BeatThread,
    Config,
    Sent,
    current_rss_mb,
    emit,
    log,
    median,
    peak_rss_mb,
    percentile,
    run_beat_until,
)
from .systems import SYSTEMS, System, is_dbsched, is_mariadb

PREFIX = "bench.e"


def subprocess_env() -> dict[str, str]:
    from .common import REPO_ROOT

    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_step(args: list[str], cfg: Config, timeout: float = 1800) -> dict[str, Any]:
    """Run `python -m bench.measure ARGS CONFIG` (or another bench module) and return its result line."""
    from .common import REPO_ROOT

    module = "bench.measure"
    if args and args[0].startswith("bench."):
        module, args = args[0], args[1:]
    proc = subprocess.run(
        [sys.executable, "-m", module, *args, cfg.to_json()],
        cwd=REPO_ROOT,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=None,  # measurement progress goes straight to our stderr
        text=True,
        timeout=timeout,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH-RESULT "):
            return dict(json.loads(line[len("BENCH-RESULT ") :]))
    tail = "\n".join(proc.stdout.splitlines()[-20:])
    raise RuntimeError(f"{module} {' '.join(args)} exited {proc.returncode} without a result\n{tail}")


# -- steps --------------------------------------------------------------------------------------------------


def populate(system: System, n: int, state: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    system.reset()
    extra = system.populate(n, due=(state == "due"))
    return {"populate_s": time.perf_counter() - t0, **(extra or {})}


def make_due(system: System) -> dict[str, Any]:
    t0 = time.perf_counter()
    system.make_due()
    return {"make_due_s": time.perf_counter() - t0}


class SqlCapture:
    """The SQL statements this process sends (SQLAlchemy `before_cursor_execute` on every engine)."""

    def __init__(self) -> None:
        self.statements: list[tuple[str, Any]] = []
        self.active = False

    def install(self) -> SqlCapture:
        from sqlalchemy import event
        from sqlalchemy.engine import Engine

        def before(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
            if self.active:
                self.statements.append((statement, parameters))

        event.listen(Engine, "before_cursor_execute", before)
        return self

    def capture(self, action: Any) -> list[tuple[str, Any]]:
        self.statements = []
        self.active = True
        try:
            action()
        finally:
            self.active = False
        return list(self.statements)


def beat(system: System, n: int, cfg: Config) -> dict[str, Any]:
    result: dict[str, Any] = {"system": system.key, "n": n}
    sent = Sent().connect()
    sql = SqlCapture().install() if is_dbsched(system.key) else None
    app = system.app(**system.tick_only)

    # start-up: scheduler construction + first tick, N schedules stored
    t0 = time.perf_counter()
    scheduler = system.build(app)
    system.start(scheduler)
    scheduler.tick()
    result["startup_s"] = time.perf_counter() - t0
    log(f"{system.key} N={n}: start-up {result['startup_s']:.3f}s")

    # idle tick: back to back, nothing due
    budget = 1.0 if cfg.quick else 10.0
    ticks: list[float] = []
    deadline = time.perf_counter() + budget
    while len(ticks) < 5 or (time.perf_counter() < deadline and len(ticks) < 300):
        t = time.perf_counter()
        scheduler.tick()
        ticks.append(time.perf_counter() - t)
    result["idle_tick_s"] = median(ticks)
    result["idle_tick_p90_s"] = percentile(ticks, 90)
    result["idle_ticks"] = len(ticks)
    result["idle_sent"] = sent.total
    if sql is not None:
        result["idle_tick_sql"] = [s for s, _ in sql.capture(scheduler.tick)]
        statements = sql.capture(scheduler.tick)
        result["idle_explain"] = explain(system, statements)
    result["rss_after_idle_mb"] = current_rss_mb()
    log(f"{system.key} N={n}: idle tick {result['idle_tick_s'] * 1e3:.2f}ms over {len(ticks)} ticks")

    if system.tick_only:  # from here on, the scheduler as deployed (celery_dbsched: sleeping on LISTEN)
        scheduler.close()
        app = system.app()
        scheduler = system.build(app)
        system.start(scheduler)

    # change pickup: a new due schedule added while the beat loop runs
    samples = cfg.samples(5, 1)
    pickup: list[float] = []
    thread = BeatThread(scheduler)
    thread.start()
    pickup_deadline = time.perf_counter() + max(cfg.cap, 30.0)
    try:
        for k in range(samples):
            if time.perf_counter() > pickup_deadline:
                break
            time.sleep(random.uniform(0.2, 0.2 + 0.6 * cfg.loop_bound))
            name = f"bench.pickup{k}"
            system.insert_due(app, name)
            inserted = time.perf_counter()
            seen = sent.wait_for(name, timeout=max(5.0, pickup_deadline - inserted + 30))
            if seen is None:
                pickup.append(float("inf"))
                result["pickup_waited_s"] = time.perf_counter() - inserted
                break
            pickup.append(seen - inserted)
    finally:
        thread.stop()
    if thread.error is not None:
        raise thread.error
    result["pickup_s"] = pickup
    result["pickup_median_s"] = median(pickup)
    log(f"{system.key} N={n}: pickup {[round(p, 3) for p in pickup]}")

    # dispatch of N due schedules
    run_step(["make-due", system.key], cfg)

    def on_sent() -> bool:
        return sent.schedules >= n

    cap = cfg.cap * (10 if is_dbsched(system.key) else 1)
    first_sql: list[tuple[str, Any]] = []
    started = time.perf_counter()
    sent_before = sent.total
    if sql is not None:
        first_sql = sql.capture(scheduler.tick)  # the first dispatch tick, its SQL kept for EXPLAIN
    elapsed, capped, dispatch_ticks = run_beat_until(scheduler, on_sent, cap - (time.perf_counter() - started))
    end = sent.last_time if not capped else time.perf_counter()
    elapsed = max(end - started, 1e-9)
    done = sent.schedules
    result.update(
        dispatch_sent=done,
        dispatch_messages=sent.total - sent_before,
        dispatch_s=elapsed,
        dispatch_rate=done / elapsed,
        dispatch_capped=capped,
        dispatch_ticks=len(dispatch_ticks) + (1 if sql is not None else 0),
        dispatch_cap_s=cap,
    )
    log(
        f"{system.key} N={n}: dispatched {done}/{n} in {elapsed:.2f}s ({done / elapsed:.0f}/s){' CAPPED' if capped else ''}"  # noqa: E501
    )

    if sql is not None:
        # an idle tick while all N runs are queued (a backlog: every job has an active run)
        if system.tick_only:
            scheduler.close()
            scheduler = system.build(system.app(**system.tick_only))
        backlog: list[float] = []
        for _ in range(5):
            t = time.perf_counter()
            scheduler.tick()
            backlog.append(time.perf_counter() - t)
        result["backlog_tick_s"] = median(backlog)
        result["dispatch_sql"] = [clip_sql(s) for s, _ in first_sql]
        result["dispatch_explain"] = explain_claims(system, first_sql)
        # the other statements of a claiming tick (explained after the dispatch: all N runs queued)
        result["dispatch_select_explain"] = explain(system, first_sql)
        result["backlog_explain"] = explain(system, sql.capture(scheduler.tick))

    result["peak_rss_mb"] = peak_rss_mb()
    scheduler.close()
    return result


SQL_KEPT = 2000


def clip_sql(statement: str) -> str:
    """A statement as kept in the results: whole up to SQL_KEPT characters. MariaDB's claim is an INSERT IGNORE
    ... VALUES of the whole batch (about 340,000 characters of placeholders), which would bloat the JSON."""
    if len(statement) <= SQL_KEPT:
        return statement
    return f"{statement[:SQL_KEPT]} ... ({len(statement):,} characters in all)"


def _selects(statements: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    return [(s, p) for s, p in statements if s.lstrip().upper().startswith(("SELECT", "WITH"))]


def _explain_engine(system: System) -> tuple[Any, str]:
    """An engine on the system's database and the prefix that explains a statement there, running it:
    PostgreSQL `EXPLAIN (ANALYZE, BUFFERS)`; MariaDB `ANALYZE FORMAT=JSON` (its EXPLAIN ANALYZE), on the
    package's engine so that the session's time zone is UTC as the beat's."""
    from sqlalchemy import create_engine

    from celery_dbsched.engine import make_engine

    url = system.url  # type: ignore[attr-defined]
    if is_mariadb(system.key):
        return make_engine(url), "ANALYZE FORMAT=JSON "
    return create_engine(url), "EXPLAIN (ANALYZE, BUFFERS) "


def _plan(rows: list[Any]) -> list[str]:
    """The plan's lines: a row each on PostgreSQL, one JSON document on MariaDB."""
    return [line for row in rows for line in str(row[0]).splitlines()]


def explain(system: System, statements: list[tuple[str, Any]]) -> list[dict[str, Any]]:
    """EXPLAIN (ANALYZE, BUFFERS) each SELECT the tick issued, with the parameters it used (MariaDB: ANALYZE
    FORMAT=JSON)."""
    out = []
    engine, prefix = _explain_engine(system)
    try:
        raw = engine.raw_connection()
        try:
            cursor = raw.cursor()
            for statement, parameters in _selects(statements):
                cursor.execute(prefix + statement, parameters or None)
                out.append({"sql": clip_sql(statement), "plan": _plan(cursor.fetchall())})
            raw.rollback()
        finally:
            raw.close()
    except Exception as exc:  # diagnostic only: never fail the run for it
        out.append({"error": repr(exc)})
    finally:
        engine.dispose()
    return out


def explain_claims(system: System, statements: list[tuple[str, Any]]) -> list[dict[str, Any]]:
    """EXPLAIN ANALYZE the claim statement (the INSERT ... SELECT) in two states, inside a transaction that is
    rolled back: nothing claimed yet (the first batch) and all but the last batch claimed (the last batch).
    MariaDB: ANALYZE FORMAT=JSON, which runs the statement too (rolled back the same way)."""
    claims = [(s, p) for s, p in statements if s.lstrip().upper().startswith("INSERT")]
    out: list[dict[str, Any]] = []
    if not claims:
        return out
    statement, parameters = claims[0]
    engine, prefix = _explain_engine(system)
    try:
        raw = engine.raw_connection()
        try:
            cursor = raw.cursor()
            limit = None
            for key, value in (parameters or {}).items():
                if key.startswith("param") and isinstance(value, int) and "limit" in statement.lower():
                    limit = value
            for state, reset in (
                ("first batch (nothing claimed)", "DELETE FROM dbsched_job_run"),
                (
                    "last batch (all but the last batch claimed)",
                    f"DELETE FROM dbsched_job_run WHERE id > (SELECT max(id) FROM dbsched_job_run) - {int(limit or 1000)}",  # noqa: E501
                ),
            ):
                cursor.execute(reset)
                cursor.execute(prefix + statement, parameters or None)
                out.append({"state": state, "sql": clip_sql(statement), "plan": _plan(cursor.fetchall())})
                raw.rollback()
        finally:
            raw.rollback()
            raw.close()
    except Exception as exc:
        out.append({"error": repr(exc)})
    finally:
        engine.dispose()
    return out


def instance(system: System, folder: Path, cfg: Config) -> dict[str, Any]:
    """One beat among several on one store: build, say ready, wait for go, then tick until told to stop,
    writing `<time> <key>` for every message sent. The loop runs in a thread so that a beat blocked on a lock
    (RedBeat's standby) still stops when told."""
    me = f"{os.getpid()}"
    sent = Sent().connect()
    sent.log = []
    app = system.app()
    scheduler = system.build(app)
    (folder / f"ready-{me}").touch()
    while not (folder / "go").exists():
        time.sleep(0.005)
    state = {"started": False}

    def loop() -> None:
        system.start(scheduler)  # RedBeat: blocks while the other instance holds the lock
        state["started"] = True
        thread = BeatThread(scheduler)
        thread.run()

    threading.Thread(target=loop, daemon=True).start()
    out = open(folder / f"sent-{me}.txt", "w")  # noqa: SIM115
    written = 0
    while not (folder / "stop").exists():
        time.sleep(0.1)
        with sent.lock:
            batch = sent.log[written:]
        written += len(batch)
        out.writelines(f"{time.time() - (time.perf_counter() - t)} {k}\n" for t, k in batch)
        out.flush()
    with sent.lock:
        batch = sent.log[written:]
    out.writelines(f"{time.time() - (time.perf_counter() - t)} {k}\n" for t, k in batch)
    out.close()
    result = {"pid": me, "started": state["started"], "sent": sent.total}
    emit(result)
    os._exit(0)  # a beat blocked on a lock is not waited for


def main(argv: list[str]) -> None:
    command = argv[0]
    cfg = Config.from_json(argv[-1])
    system = SYSTEMS[argv[1]](cfg)
    if command in ("populate", "beat"):
        system.n = int(argv[2])
    elif command == "instance":
        system.n = int(argv[3])
    if command == "populate":
        emit(populate(system, int(argv[2]), argv[3]))
    elif command == "make-due":
        emit(make_due(system))
    elif command == "beat":
        emit(beat(system, int(argv[2]), cfg))
    elif command == "instance":
        instance(system, Path(argv[2]), cfg)
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
