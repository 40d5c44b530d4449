"""The measures only celery_dbsched gets, each in a fresh subprocess started by bench/run.py:

python -m bench.extras raw-kombu N BROKER CONFIG   raw kombu publish rate of N run messages
python -m bench.extras dispatch N BROKER [SYSTEM [confirm]] CONFIG
                                                   dbsched dispatch of N due jobs on BROKER (store made due);
                                                   `confirm`: with publisher confirms (confirm_publish)
python -m bench.extras wakeup N CONFIG             trigger (run_now) latency while a beat sleeps
python -m bench.extras worker CONFIG               real worker + beat over RabbitMQ: e2e latency, runs/s
python -m bench.extras profile N CONFIG            pyinstrument of the dispatch of N due jobs
"""

from __future__ import annotations

import datetime as dt
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from .common import (
    REPO_ROOT,
    BeatThread,
    Config,
    Sent,
    emit,
    log,
    percentile,
    purge_memory_broker,
    run_beat_until,
)
from .measure import subprocess_env
from .systems import SYSTEMS, Dbsched

RUN_TASK = "celery_dbsched.run_job"


def _delete_queue(broker: str, queue: str) -> None:
    if broker.startswith("memory"):
        purge_memory_broker()
        return
    from kombu import Connection

    try:
        with Connection(broker, connect_timeout=5) as conn:
            channel = conn.channel()
            channel.queue_delete(queue)
            channel.close()
    except Exception as exc:
        log(f"could not delete queue {queue}: {exc}")


def raw_kombu(n: int, broker: str) -> dict[str, Any]:
    """N messages shaped like celery_dbsched's run messages (Celery protocol 2 headers, JSON body), through
    one kombu producer on one connection: the broker's and kombu's own limit."""
    from kombu import Connection, Exchange, Queue

    queue_name = f"bench-raw-{uuid.uuid4().hex[:8]}"
    queue = Queue(queue_name, Exchange(queue_name), routing_key=queue_name)
    with Connection(broker) as conn:
        producer = conn.Producer(serializer="json")
        producer.publish(["warm", 0], exchange=queue.exchange, routing_key=queue_name, declare=[queue])
        start = time.perf_counter()
        for i in range(n):
            task_id = str(uuid.uuid4())
            name = f"bench.e{i}"
            producer.publish(
                [[i + 1, name], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}],
                exchange=queue.exchange,
                routing_key=queue_name,
                headers={
                    "lang": "py",
                    "task": RUN_TASK,
                    "id": task_id,
                    "shadow": None,
                    "eta": None,
                    "expires": None,
                    "group": None,
                    "group_index": None,
                    "retries": 0,
                    "timelimit": [None, None],
                    "root_id": task_id,
                    "parent_id": None,
                    "argsrepr": repr([i + 1, name]),
                    "kwargsrepr": "{}",
                    "origin": "bench@raw",
                    "ignore_result": True,
                },
                correlation_id=task_id,
                delivery_mode=2,
            )
            if broker.startswith("memory") and i % 1000 == 999:
                purge_memory_broker()
        elapsed = time.perf_counter() - start
    _delete_queue(broker, queue_name)
    return {"n": n, "broker": broker.split(":")[0], "raw_s": elapsed, "raw_rate": n / elapsed}


def dispatch(n: int, broker: str, cfg: Config, system_key: str = "dbsched", confirm: str = "") -> dict[str, Any]:
    """celery_dbsched's dispatch of N due jobs (the store was made due by the caller) to BROKER, on the `@job`
    path (`dbsched`) or the `beat_schedule` path (`dbsched_bs`: N plain-task entries in the app); with
    `confirm`, each message waits for the broker's publisher confirm (`confirm_publish`)."""
    system = SYSTEMS[system_key](cfg)
    system.n = n
    queue = f"bench-dispatch-{uuid.uuid4().hex[:8]}"
    sent = Sent().connect()
    options = {"confirm_publish": True} if confirm == "confirm" else {}
    app = system.app(broker, task_default_queue=queue, broker_transport_options=options)
    scheduler = system.build(app)
    start = time.perf_counter()
    _elapsed, capped, _ticks = run_beat_until(scheduler, lambda: sent.distinct >= n, cfg.cap * 10)
    end = sent.last_time if not capped else time.perf_counter()
    scheduler.close()
    _delete_queue(broker, queue)
    return {
        "n": n,
        "broker": broker.split(":")[0],
        "confirm_publish": bool(options),
        "dispatch_s": end - start,
        "dispatch_rate": sent.distinct / (end - start),
        "dispatch_capped": capped,
    }


def wakeup(n: int, cfg: Config) -> dict[str, Any]:
    """`update_job_next_run_in_at_least(app, name, 0, run_now=True)` from another app (as another process
    would) while a beat with N idle jobs sleeps: the time until the run is published."""
    import celery_dbsched

    system = Dbsched(cfg)
    samples = cfg.samples(20, 3)
    names = [f"bench.wake{k}" for k in range(samples)]
    writer = celery_dbsched.JobRepository(system.url)
    for name in names:
        writer.upsert_job(name, "woken up", first_run_in=dt.timedelta(hours=1), every=dt.timedelta(hours=1))
    sent = Sent().connect()
    beat_app = system.app()
    scheduler = system.build(beat_app)
    trigger_app = system.app()
    thread = BeatThread(scheduler)
    thread.start()
    latencies: list[float] = []
    try:
        for name in names:
            time.sleep(random.uniform(0.3, 0.3 + 0.4 * cfg.loop_bound))
            t0 = time.perf_counter()
            celery_dbsched.update_job_next_run_in_at_least(trigger_app, name, 0, run_now=True)
            seen = sent.wait_for(name, timeout=60)
            latencies.append(float("inf") if seen is None else seen - t0)
    finally:
        thread.stop()
        writer.close()
    interval = scheduler.settings.run_jobs_interval.total_seconds() if hasattr(scheduler, "settings") else None
    return {
        "n": n,
        "samples": latencies,
        "p50_s": percentile(latencies, 50),
        "p99_s": percentile(latencies, 99),
        "max_s": max(latencies),
        "run_jobs_interval_s": interval,
    }


# -- real processes ---------------------------------------------------------------------------------------


class Proc:
    def __init__(self, name: str, args: list[str], env: dict[str, str], cwd: Path) -> None:
        self.log_path = cwd / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "bench.worker_app", *args],
            env=env,
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def stop(self, timeout: float = 30) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        self._log.close()

    def tail(self) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-30:])


def _wait(predicate: Any, timeout: float, what: str, procs: list[Proc]) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        for proc in procs:
            if proc.popen.poll() is not None:
                raise RuntimeError(f"{what}: a process exited early:\n{proc.tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def _task_times(folder: Path, since: float) -> tuple[list[float], list[float]]:
    """Task start and end times recorded at or after `since` (the pool's files stay open across phases)."""
    starts: list[float] = []
    ends: list[float] = []
    for path in folder.glob("tasks-*.txt"):
        for line in path.read_text().splitlines():
            kind, _, stamp = line.partition(" ")
            try:
                value = float(stamp)
            except ValueError:
                continue
            if value >= since:
                (starts if kind == "s" else ends).append(value)
    return starts, ends


def worker(cfg: Config) -> dict[str, Any]:
    """A real `celery worker` (prefork, 2 processes: the machine's cores) and a real `celery beat -S
    celery_dbsched.Scheduler` over RabbitMQ: due time -> the job's first line, then runs/s of an empty job
    through the wrapper against the same empty plain Celery task."""
    from celery import Celery

    import celery_dbsched

    system = Dbsched(cfg)
    e2e_jobs = cfg.samples(40, 6)
    worker_jobs = cfg.samples(2000, 200)
    spacing = 0.25
    folder = Path(tempfile.mkdtemp(prefix="bench-worker-"))
    queue = f"bench-worker-{uuid.uuid4().hex[:8]}"
    env = subprocess_env()
    env.update(
        BENCH_BROKER=cfg.amqp_url,
        BENCH_DB=system.url,
        BENCH_QUEUE=queue,
        BENCH_RECORD_DIR=str(folder),
        BENCH_E2E_JOBS=str(e2e_jobs),
        BENCH_WORKER_JOBS=str(worker_jobs),
        BENCH_RUN_JOBS_INTERVAL=str(cfg.loop_bound),
    )
    common = ["-l", "warning"]
    procs: list[Proc] = []
    result: dict[str, Any] = {"e2e_samples_n": e2e_jobs, "worker_tasks": worker_jobs, "pool": "prefork -c 2"}
    repository = celery_dbsched.JobRepository(system.url)
    try:
        w = Proc(
            "worker",
            [
                "worker",
                "-Q",
                queue,
                "-c",
                "2",
                "-P",
                "prefork",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                *common,
            ],
            {**env, "BENCH_ROLE": "worker"},
            folder,
        )
        procs.append(w)
        _wait(lambda: list(folder.glob("ready-worker-*")), 180, "the worker", procs)
        b = Proc(
            "beat",
            ["beat", "-S", "celery_dbsched.Scheduler", "-s", str(folder / "beat-schedule"), *common],
            {**env, "BENCH_ROLE": "beat"},
            folder,
        )
        procs.append(b)
        _wait(lambda: list(folder.glob("ready-beat-*")), 60, "the beat", procs)
        time.sleep(2.0)

        # e2e: pull each job in to a due time a little in the future, spaced so the workers are idle
        due: dict[str, float] = {}
        for i in range(e2e_jobs):
            record = repository.update_job_next_run_in_at_least(
                f"bench.e2e.{i}", dt.timedelta(seconds=cfg.loop_bound + 1 + i * spacing)
            )
            due[record.name] = record.next_scheduled_run.timestamp()
        record_file = folder / "e2e.txt"

        def e2e_done() -> bool:
            return record_file.exists() and len(record_file.read_text().splitlines()) >= e2e_jobs

        _wait(e2e_done, 60 + e2e_jobs * spacing, "the e2e runs", procs)
        latencies = []
        for line in record_file.read_text().splitlines():
            stamp, name = line.split()
            latencies.append(float(stamp) - due[name])
        result.update(
            e2e_samples=latencies,
            e2e_p50_s=percentile(latencies, 50),
            e2e_p99_s=percentile(latencies, 99),
            e2e_max_s=max(latencies),
        )
        log(f"e2e: p50 {result['e2e_p50_s'] * 1e3:.1f}ms p99 {result['e2e_p99_s'] * 1e3:.1f}ms")
        b.stop()
        procs.remove(b)

        # runs/s through the wrapper: make the empty jobs due, dispatch them from an in-process beat
        since = time.time()
        for i in range(worker_jobs):
            repository.update_job_next_run_in_at_least(f"bench.w.{i}", dt.timedelta(0))
        beat_app = system.app(cfg.amqp_url, task_default_queue=queue)
        sent = Sent().connect()
        scheduler = system.build(beat_app)
        run_beat_until(scheduler, lambda: sent.distinct >= worker_jobs, 120)
        scheduler.close()
        _wait(lambda: len(_task_times(folder, since)[1]) >= worker_jobs, 300, "the wrapper runs", procs)
        starts, ends = _task_times(folder, since)
        result["wrapper_runs_per_s"] = worker_jobs / (max(ends) - min(starts))
        log(f"worker: wrapper {result['wrapper_runs_per_s']:.0f} runs/s")

        # the same number of the plain empty task
        since = time.time()
        plain_app = Celery("bench-plain", set_as_current=False)
        plain_app.conf.update(broker_url=cfg.amqp_url, task_default_queue=queue)
        with plain_app.producer_or_acquire() as producer:
            for _ in range(worker_jobs):
                plain_app.send_task("bench.empty", producer=producer, ignore_result=True)
        _wait(lambda: len(_task_times(folder, since)[1]) >= worker_jobs, 300, "the plain tasks", procs)
        starts, ends = _task_times(folder, since)
        result["plain_runs_per_s"] = worker_jobs / (max(ends) - min(starts))
        result["wrapper_over_plain"] = result["wrapper_runs_per_s"] / result["plain_runs_per_s"]
        log(f"worker: plain {result['plain_runs_per_s']:.0f} tasks/s")
    finally:
        for proc in procs:
            proc.stop()
        repository.close()
        _delete_queue(cfg.amqp_url, queue)
        shutil.rmtree(folder, ignore_errors=True)
    return result


# -- profile -----------------------------------------------------------------------------------------------

# (label, file path fragment, function): time under the outermost matching frame, per category
CATEGORIES = [
    ("claim: JobRepository.claim_runs (SQL + rows)", "celery_dbsched/repository.py", "claim_runs"),
    ("idle query: JobRepository.next_due_in", "celery_dbsched/repository.py", "next_due_in"),
    ("publish: Scheduler._publish (all sends)", "celery_dbsched/scheduler.py", "_publish"),
    ("  of which Celery app.send_task (incl. kombu)", "celery/app/base.py", "send_task"),
    ("  of which kombu Producer.publish", "kombu/messaging.py", "publish"),
    ("  of which after_task_publish handlers (harness counter)", "bench/common.py", "_on_publish"),
    ("SQL: psycopg cursor execute/fetch", "psycopg/cursor.py", "*"),
    ("SQL: SQLAlchemy statement compile", "sqlalchemy/sql/compiler.py", "*"),
    ("rows -> RunRecord.from_row", "celery_dbsched/repository.py", "from_row"),
]


def _category_times(root: Any) -> dict[str, float]:
    totals = {label: 0.0 for label, _, _ in CATEGORIES}

    def walk(frame: Any, inside: set[str]) -> None:
        matched = set()
        path = (getattr(frame, "file_path", "") or "").replace("\\", "/")
        function = getattr(frame, "function", "") or ""
        for label, fragment, name in CATEGORIES:
            if label in inside:
                continue
            if fragment in path and (name == "*" or function == name):
                totals[label] += frame.time
                matched.add(label)
        for child in frame.children:
            walk(child, inside | matched)

    walk(root, set())
    return totals


def profile(n: int, cfg: Config) -> dict[str, Any]:
    from pyinstrument import Profiler

    system = Dbsched(cfg)
    sent = Sent().connect()
    app = system.app(**system.tick_only)  # the last tick must not sleep on LISTEN under the profiler
    scheduler = system.build(app)
    profiler = Profiler(interval=0.0005)
    profiler.start()
    start = time.perf_counter()
    run_beat_until(scheduler, lambda: sent.distinct >= n, cfg.cap * 10)
    elapsed = time.perf_counter() - start
    session = profiler.stop()
    text = profiler.output_text(unicode=False, color=False, show_all=False)
    out = Path(cfg.out_dir) / "benchmarks-profile.txt"
    out.write_text(text)
    root = session.root_frame()
    totals = _category_times(root) if root is not None else {}
    total = root.time if root is not None else elapsed
    return {
        "n": n,
        "elapsed_s": elapsed,
        "rate": n / elapsed,
        "profiled_s": total,
        "categories": {k: {"s": v, "share": v / total if total else 0.0} for k, v in totals.items()},
        "text_file": str(out),
    }


def main(argv: list[str]) -> None:
    command = argv[0]
    cfg = Config.from_json(argv[-1])
    if command == "raw-kombu":
        emit(raw_kombu(int(argv[1]), argv[2]))
    elif command == "dispatch":
        emit(dispatch(int(argv[1]), argv[2], cfg, *argv[3:-1]))
    elif command == "wakeup":
        emit(wakeup(int(argv[1]), cfg))
    elif command == "worker":
        emit(worker(cfg))
    elif command == "profile":
        emit(profile(int(argv[1]), cfg))
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    os.chdir(REPO_ROOT)
    main(sys.argv[1:])
