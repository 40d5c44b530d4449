"""A plain Celery task for the end-to-end tests, on tests/e2e_app.py's app: a worker loads it through
`imports` (E2E_SETTINGS: {"imports": ["celery_dbsched.tracking", "e2e_plain_tasks"]}) and a `beat_schedule`
entry sends it.

Each execution appends JSON lines to `<E2E_EVENTS_DIR>/plain-<run id>.jsonl`: `start` and `end`, with the
process name and the task id, so that a test sees how many times Celery executed a run's message.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from e2e_app import EVENTS_DIR, PROCESS_NAME, app

from celery_dbsched.protocol import header_run_id


def _record(task: Any, event: str) -> None:
    EVENTS_DIR.mkdir(parents=True, exist_ok=True)
    line = json.dumps(
        {
            "event": event,
            "process": PROCESS_NAME,
            "pid": os.getpid(),
            "task_id": task.request.id,
            "redelivered": bool((task.request.delivery_info or {}).get("redelivered")),
            "time": time.time(),
        }
    )
    with open(EVENTS_DIR / f"plain-{header_run_id(task.request)}.jsonl", "a") as f:
        f.write(line + "\n")


@app.task(name="e2e.plain_sleep", bind=True)
def plain_sleep(self: Any, seconds: float) -> None:
    """Sleeps `seconds`, reporting nothing."""
    _record(self, "start")
    time.sleep(seconds)
    _record(self, "end")
