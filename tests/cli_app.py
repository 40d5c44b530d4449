"""A small Celery app for the subprocess tests (`celery -A cli_app ...`), configured by environment variables.

- DBSCHED_TEST_APP_DB: the database URL (required).
- DBSCHED_TEST_APP_BROKER_DIR: a folder for celery_dbsched's `filesystem://` transport; else
  DBSCHED_TEST_APP_BROKER_URL (e.g. amqp://...); else memory://.
- DBSCHED_TEST_APP_QUEUE: the default queue.
- DBSCHED_TEST_APP_SETTINGS: a JSON object merged into the app's conf (e.g. bad dbsched_* values).
- DBSCHED_TEST_APP_LOAD_JOBS=N: register N jobs `load.NN`, due every second, that log each start and end (with
  run id, pid and a monotonic time) to DBSCHED_TEST_APP_JOB_LOG. Without it the app registers no job: the
  beat tests rely on a beat that knows no job code.
- DBSCHED_TEST_APP_SLOW_JOB=1: register `slow.job` (hourly), which waits until its run is cancelled.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time

from celery import Celery
from helpers.prompt_stop import stop_promptly

from celery_dbsched import JobContext, job
from celery_dbsched.transport import filesystem_broker_settings

app = stop_promptly(Celery("cli_app"))  # workers stop within 0.1 s (helpers/prompt_stop.py)

app.conf.update(
    dbsched_database_url=os.environ["DBSCHED_TEST_APP_DB"],
    task_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=True,
)
if os.environ.get("DBSCHED_TEST_APP_BROKER_DIR"):
    app.conf.update(filesystem_broker_settings(os.environ["DBSCHED_TEST_APP_BROKER_DIR"]))
else:
    app.conf.broker_url = os.environ.get("DBSCHED_TEST_APP_BROKER_URL", "memory://")
if os.environ.get("DBSCHED_TEST_APP_QUEUE"):
    app.conf.task_default_queue = os.environ["DBSCHED_TEST_APP_QUEUE"]
if os.environ.get("DBSCHED_TEST_APP_SETTINGS"):
    app.conf.update(json.loads(os.environ["DBSCHED_TEST_APP_SETTINGS"]))


def _log(line: str) -> None:
    # One small O_APPEND write per line: lines from several processes never interleave.
    fd = os.open(os.environ["DBSCHED_TEST_APP_JOB_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def _make_load_job(index: int) -> None:
    name = f"load.{index:02d}"

    @job(app, name=name, description=f"load job {index}", every=dt.timedelta(seconds=1))
    def load_job(ctx: JobContext) -> None:
        _log(f"start {ctx.run_id} {ctx.job_name} {os.getpid()} {time.monotonic():.6f}")
        ctx.progress(0, 2)
        ctx.wait(0.05)
        ctx.progress(1, 2)
        ctx.wait(0.05)
        ctx.progress(2, 2)
        _log(f"end {ctx.run_id} {ctx.job_name} {os.getpid()} {time.monotonic():.6f}")


for _index in range(int(os.environ.get("DBSCHED_TEST_APP_LOAD_JOBS", "0"))):
    _make_load_job(_index)


if os.environ.get("DBSCHED_TEST_APP_SLOW_JOB"):

    @job(app, name="slow.job", description="waits until cancelled", every=dt.timedelta(hours=1))
    def slow_job(ctx: JobContext) -> None:
        while not ctx.wait(0.1):
            pass
