"""A plain Celery project with a stock `beat_schedule`, for `test_stock_beat_migration.py`.

It does not import celery_dbsched: switching it to the database scheduler is a matter of settings given
through the environment (the test sets `beat_scheduler` for its beats and, for the tracking variant,
`imports = ["celery_dbsched.tracking"]` for its worker).

    MIG_BROKER    JSON: broker settings (broker_url, broker_transport, ..., task_default_queue)
    MIG_SETTINGS  JSON: more settings (beat_scheduler, dbsched_*, imports)
    MIG_ENTRIES   JSON: more beat_schedule entries (schedules in seconds)
    MIG_EVENTS    the file each task execution appends one JSON line to
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from celery import Celery, Task
from celery.schedules import crontab, solar
from helpers.prompt_stop import stop_promptly

app = stop_promptly(Celery("migration_app"))  # workers stop within 0.1 s (helpers/prompt_stop.py)
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    timezone="Europe/Berlin",
    beat_schedule={
        "interval": {
            "task": "migration_app.record",
            "schedule": 1.0,
            "args": ["interval"],
            "kwargs": {"note": "every second"},
            "options": {"headers": {"x_source": "beat_schedule"}},
        },
        "every-minute": {"task": "migration_app.record", "schedule": crontab(), "args": ["every-minute"]},
        "nightly": {"task": "migration_app.record", "schedule": crontab(minute=30, hour=2), "args": ["nightly"]},
        "sunset": {"task": "migration_app.record", "schedule": solar("sunset", 52.52, 13.40), "args": ["sunset"]},
    },
)
app.conf.update(json.loads(os.environ.get("MIG_BROKER") or "{}"))
app.conf.update(json.loads(os.environ.get("MIG_SETTINGS") or "{}"))
app.conf.beat_schedule.update(json.loads(os.environ.get("MIG_ENTRIES") or "{}"))

EVENTS = os.environ.get("MIG_EVENTS", "migration-events.jsonl")


def _record(task: Task, label: str, event: str, **data: Any) -> None:
    request = task.request
    line = json.dumps(
        {
            "label": label,
            "event": event,
            "time": time.time(),
            "task": task.name,
            "task_id": request.id,
            "hostname": request.hostname,
            "run_id": getattr(request, "dbsched_run_id", None) or (request.headers or {}).get("dbsched_run_id"),
            "x_source": getattr(request, "x_source", None) or (request.headers or {}).get("x_source"),
            "pid": os.getpid(),
            "dbsched_modules": sorted(name for name in sys.modules if name.startswith("celery_dbsched")),
            "dbsched_registry": "_dbsched_registry" in task.app.__dict__,
            **data,
        }
    )
    with open(EVENTS, "a") as f:  # one small O_APPEND write: lines never interleave
        f.write(line + "\n")


@app.task(name="migration_app.record", bind=True)
def record(self: Task, label: str, **kwargs: Any) -> str:
    _record(self, label, "ran", kwargs=kwargs)
    return label


@app.task(name="migration_app.boom", bind=True)
def boom(self: Task, label: str) -> None:
    _record(self, label, "ran")
    raise ValueError(f"boom from {label}")


@app.task(name="migration_app.slow", bind=True)
def slow(self: Task, label: str, seconds: float = 600) -> None:
    """Reports no progress; only its worker's liveness says it is still going."""
    _record(self, label, "started")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.2)
    _record(self, label, "ended")
