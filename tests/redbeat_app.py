"""The Celery app of the RedBeat switch test (tests/test_import_redbeat.py): the same app runs under RedBeat's beat
(`-S redbeat.RedBeatScheduler`), then, after `dbsched import redbeat`, under celery_dbsched's. Configured by the
environment:

    REDBEAT_APP_DB        dbsched_database_url
    REDBEAT_APP_BROKER    broker_url (the test's Redis) ; REDBEAT_APP_QUEUE the default queue
    REDBEAT_APP_PREFIX    redbeat_key_prefix (redbeat_redis_url is the broker's Redis)
    REDBEAT_APP_LOG       the file `tick` appends one JSON line to per execution: {"name", "time"}
"""

from __future__ import annotations

import json
import os
import time

from celery import Celery
from helpers.prompt_stop import stop_promptly

app = stop_promptly(Celery("redbeat_app"))  # workers stop within 0.1 s (helpers/prompt_stop.py)
app.conf.update(
    dbsched_database_url=os.environ["REDBEAT_APP_DB"],
    broker_url=os.environ["REDBEAT_APP_BROKER"],
    task_default_queue=os.environ["REDBEAT_APP_QUEUE"],
    redbeat_redis_url=os.environ["REDBEAT_APP_BROKER"],
    redbeat_key_prefix=os.environ["REDBEAT_APP_PREFIX"],
    task_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    dbsched_run_jobs_interval=0.3,
    dbsched_monitor_interval=0.3,
)


@app.task(name="redbeat_app.tick")
def tick(name: str) -> None:
    line = json.dumps({"name": name, "time": time.time()}) + "\n"
    fd = os.open(os.environ["REDBEAT_APP_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())  # one small O_APPEND write: lines never interleave
    finally:
        os.close(fd)
