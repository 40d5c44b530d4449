"""The Celery app that the end-to-end tests run in real `celery worker` and `celery beat` processes.

Configured from the environment, so that each test chooses its database, broker, settings and jobs:

    E2E_DATABASE_URL   dbsched_database_url
    E2E_BROKER         JSON: broker settings (broker_url, broker_transport_options, task_default_queue, ...)
    E2E_SETTINGS       JSON: more Celery settings, typically dbsched_* (lists stand for tuples)
    E2E_JOBS           JSON: a list of job specs to register, e.g. {"kind": "quick", "name": "e2e.a", "every": 1}
    E2E_EVENTS_DIR     folder where jobs record what happened to each run (see `record`)
    E2E_PROCESS_NAME   who is recording (the test's name for this process)

Job kinds (all deterministic; times in seconds):

    quick        reports progress over `steps` steps of `step` seconds and completes
    quick_class  the same as a class-based `Job` whose progress the worker reads through `status()`
    fail         reports 1 of 3 done, then always raises RuntimeError(`message`, "{run_id}" replaced)
    stall        reports 0 of 10 once and never again; waits until its run is cancelled
    progress     `steps` steps of `step` seconds, reporting each, so values can be seen while it runs
    long         `seconds` long, progress changing every `step` (never stalled); stops when cancelled
    instant      records its start and end and completes at once (load tests: the wrapper's own cost)

Spec keys besides `kind`: `name` (default `e2e.<kind>`), `every`, `next_run_in`, `interrupt_threshold`,
`queue` and the kind's own parameters above.

Every run appends JSON lines to `<E2E_EVENTS_DIR>/<run id>.jsonl`: `start` when the job begins, then `end`,
`fail` or `cancelled` (with the context's cancel reason). A run that started twice would show two `start`s.

Fault injection: the setting `e2e_publish_delay` (seconds, in E2E_SETTINGS) makes every message this process
publishes wait that long first, so that a beat spends most of its time inside a claim batch (claimed, not yet
all published) and a SIGKILL at a random moment lands there.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from pathlib import Path
from typing import Any

from celery import Celery
from helpers.prompt_stop import stop_promptly

from celery_dbsched import Job, JobContext, JobStatus, job, register_job

EVENTS_DIR = Path(os.environ.get("E2E_EVENTS_DIR", "e2e-events"))
PROCESS_NAME = os.environ.get("E2E_PROCESS_NAME", "unknown")

app = stop_promptly(Celery("e2e_app"))  # workers stop within 0.1 s (helpers/prompt_stop.py)
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    # One message at a time per pool slot: a busy worker must not sit on runs another worker could start.
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    beat_scheduler="celery_dbsched.Scheduler",
)
app.conf.update(json.loads(os.environ.get("E2E_BROKER") or "{}"))
if os.environ.get("E2E_DATABASE_URL"):
    app.conf.dbsched_database_url = os.environ["E2E_DATABASE_URL"]
app.conf.update(json.loads(os.environ.get("E2E_SETTINGS") or "{}"))


def record(ctx: JobContext, event: str, **data: Any) -> None:
    """Append one event of this run (a single small O_APPEND write: lines never interleave)."""
    EVENTS_DIR.mkdir(parents=True, exist_ok=True)
    line = json.dumps(
        {
            "event": event,
            "run_id": ctx.run_id,
            "job": ctx.job_name,
            "process": PROCESS_NAME,
            "pid": os.getpid(),
            "time": time.time(),
            **data,
        }
    )
    with open(EVENTS_DIR / f"{ctx.run_id}.jsonl", "a") as f:
        f.write(line + "\n")


def _stop_if_cancelled(ctx: JobContext) -> None:
    if ctx.cancelled:
        record(ctx, "cancelled", reason=ctx.cancel_reason)
        ctx.check_cancelled()


def _quick(spec: dict[str, Any]) -> Any:
    steps, step = int(spec.get("steps", 3)), float(spec.get("step", 0.1))

    def run(ctx: JobContext) -> None:
        record(ctx, "start")
        for done in range(steps):
            ctx.progress(done, steps)
            ctx.wait(step)
            _stop_if_cancelled(ctx)
        ctx.progress(steps, steps)
        record(ctx, "end")

    return run


class QuickCounter(Job):
    """A class-based job: the worker's monitor thread reads its progress through `status()`."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.name = spec["name"]
        self.description = "e2e: counts to a few, class-based"
        self.every = _seconds(spec.get("every"))
        self.queue = spec.get("queue")
        self.interrupt_threshold = _seconds(spec.get("interrupt_threshold"))
        self.steps = int(spec.get("steps", 3))
        self.step = float(spec.get("step", 0.1))
        self._done = 0

    def status(self) -> JobStatus:
        return JobStatus(self._done, self.steps)

    def run(self, ctx: JobContext) -> None:
        record(ctx, "start")
        self._done = 0
        for _ in range(self.steps):
            ctx.wait(self.step)
            _stop_if_cancelled(ctx)
            self._done += 1
        record(ctx, "end")

    def next_run_in(self) -> dt.timedelta:
        assert self.every is not None
        return self.every


def _fail(spec: dict[str, Any]) -> Any:
    message = spec.get("message", "e2e failure in run {run_id}")

    def run(ctx: JobContext) -> None:
        record(ctx, "start")
        ctx.progress(1, 3)
        record(ctx, "fail")
        raise RuntimeError(message.replace("{run_id}", str(ctx.run_id)))

    return run


def _stall(spec: dict[str, Any]) -> Any:
    def run(ctx: JobContext) -> None:
        record(ctx, "start")
        ctx.progress(0, 10)
        while not ctx.wait(0.1):
            pass
        _stop_if_cancelled(ctx)

    return run


def _progress(spec: dict[str, Any]) -> Any:
    steps, step = int(spec.get("steps", 6)), float(spec.get("step", 0.5))

    def run(ctx: JobContext) -> None:
        record(ctx, "start")
        for done in range(steps):
            ctx.progress(done, steps)
            ctx.wait(step)
            _stop_if_cancelled(ctx)
        ctx.progress(steps, steps)
        record(ctx, "end")

    return run


def _long(spec: dict[str, Any]) -> Any:
    seconds, step = float(spec.get("seconds", 120)), float(spec.get("step", 0.2))
    total = max(int(seconds / step), 1)

    def run(ctx: JobContext) -> None:
        record(ctx, "start")
        for done in range(total):
            ctx.progress(done, total)
            ctx.wait(step)
            _stop_if_cancelled(ctx)
        ctx.progress(total, total)
        record(ctx, "end")

    return run


def _instant(spec: dict[str, Any]) -> Any:
    def run(ctx: JobContext) -> None:
        record(ctx, "start")
        ctx.progress(1, 1)
        record(ctx, "end")

    return run


_FUNCTION_KINDS = {
    "quick": _quick,
    "fail": _fail,
    "stall": _stall,
    "progress": _progress,
    "long": _long,
    "instant": _instant,
}


def _seconds(value: object) -> dt.timedelta | None:
    return None if value is None else dt.timedelta(seconds=float(value))  # type: ignore[arg-type]


def register(spec: dict[str, Any]) -> None:
    spec = {"name": f"e2e.{spec['kind']}", **spec}
    kind = spec["kind"]
    if kind == "quick_class":
        register_job(app, QuickCounter(spec), first_run_in=_seconds(spec.get("next_run_in")))
        return
    job(
        app,
        name=spec["name"],
        description=f"e2e: {kind}",
        every=spec.get("every"),
        first_run_in=spec.get("next_run_in"),
        queue=spec.get("queue"),
        interrupt_threshold=spec.get("interrupt_threshold"),
    )(_FUNCTION_KINDS[kind](spec))


for _spec in json.loads(os.environ.get("E2E_JOBS") or "[]"):
    register(_spec)

_PUBLISH_DELAY = float(app.conf.get("e2e_publish_delay") or 0)
if _PUBLISH_DELAY > 0:
    from celery import signals

    @signals.before_task_publish.connect(weak=False)
    def _slow_publish(**kwargs: Any) -> None:
        time.sleep(_PUBLISH_DELAY)
