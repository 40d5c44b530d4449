"""The Celery app of the real `celery worker` / `celery beat` processes that bench/extras.py starts.

Configured from the environment:

    BENCH_BROKER       broker URL (RabbitMQ)
    BENCH_DB           dbsched_database_url
    BENCH_QUEUE        the queue everything goes to
    BENCH_ROLE         "worker" registers the jobs; "beat" registers nothing (a beat never imports job code)
    BENCH_RECORD_DIR   where jobs and tasks write what they did
    BENCH_E2E_JOBS     how many `bench.e2e.<i>` jobs (first line: append "<time.time()> <name>")
    BENCH_WORKER_JOBS  how many empty `bench.w.<i>` jobs

Every job is first due in an hour; the measurement pulls them in. Every task (the dbsched wrapper and the
plain `bench.empty`) appends "s <time>" before and "e <time>" after it runs to a file of its own process.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from pathlib import Path
from typing import Any

from celery import Celery, signals

import celery_dbsched

RECORD_DIR = Path(os.environ.get("BENCH_RECORD_DIR", "."))
ROLE = os.environ.get("BENCH_ROLE", "worker")
QUEUE = os.environ.get("BENCH_QUEUE", "bench")
HOUR = dt.timedelta(hours=1)

app = Celery("bench_worker_app")
app.conf.update(
    broker_url=os.environ.get("BENCH_BROKER", "amqp://guest:guest@127.0.0.1:5672//"),
    dbsched_database_url=os.environ.get("BENCH_DB"),
    task_default_queue=QUEUE,
    task_serializer="json",
    accept_content=["json"],
    timezone="UTC",
    enable_utc=True,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    result_expires=None,
    dbsched_run_jobs_interval=float(os.environ.get("BENCH_RUN_JOBS_INTERVAL", "5")),
)


@app.task(name="bench.empty", ignore_result=True)
def empty() -> None:
    """The plain Celery task the wrapper is compared with."""


def _first_line_job(name: str) -> Any:
    def first_line(ctx: celery_dbsched.JobContext) -> None:
        stamp = time.time()
        with open(RECORD_DIR / "e2e.txt", "a") as f:
            f.write(f"{stamp} {name}\n")

    return first_line


def _empty_job(ctx: celery_dbsched.JobContext) -> None:
    """An empty job."""


if ROLE == "worker":
    for i in range(int(os.environ.get("BENCH_E2E_JOBS", "0"))):
        name = f"bench.e2e.{i}"
        celery_dbsched.job(app, name=name, description="e2e latency", every=HOUR, first_run_in=HOUR)(
            _first_line_job(name)
        )
    for i in range(int(os.environ.get("BENCH_WORKER_JOBS", "0"))):
        celery_dbsched.job(app, name=f"bench.w.{i}", description="empty", every=HOUR, first_run_in=HOUR)(_empty_job)


_records: dict[int, Any] = {}


def _record(kind: str) -> None:
    pid = os.getpid()
    f = _records.get(pid)
    if f is None:
        f = _records[pid] = open(RECORD_DIR / f"tasks-{pid}.txt", "a", buffering=1)  # noqa: SIM115
    f.write(f"{kind} {time.time()}\n")


@signals.task_prerun.connect
def _on_prerun(**kwargs: Any) -> None:
    _record("s")


@signals.task_postrun.connect
def _on_postrun(**kwargs: Any) -> None:
    _record("e")


@signals.worker_ready.connect
def _on_ready(**kwargs: Any) -> None:
    (RECORD_DIR / f"ready-worker-{os.getpid()}").touch()


@signals.beat_init.connect
def _on_beat(**kwargs: Any) -> None:
    (RECORD_DIR / f"ready-beat-{os.getpid()}").touch()
