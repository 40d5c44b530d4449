"""The example's Celery app.

Defaults need nothing installed: SQLite and celery_dbsched's safe `filesystem://` broker, both under
`./.example_data`. Switch with environment variables:

    EXAMPLE_DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:5432/test
    EXAMPLE_BROKER_URL=amqp://guest:guest@127.0.0.1:5672//   (or redis://127.0.0.1:6379/0)
"""

from __future__ import annotations

import os
from pathlib import Path

from celery import Celery
from celery.schedules import crontab

from celery_dbsched.transport import filesystem_broker_settings

DATA_DIR = Path(os.environ.get("EXAMPLE_DATA_DIR", ".example_data")).resolve()

app = Celery("example_proj", include=["example_proj.jobs", "example_proj.tasks"])

broker_url = os.environ.get("EXAMPLE_BROKER_URL")
if broker_url:
    app.conf.broker_url = broker_url
else:
    app.conf.update(filesystem_broker_settings(DATA_DIR / "broker"))

app.conf.update(
    dbsched_database_url=os.environ.get("EXAMPLE_DATABASE_URL", f"sqlite:///{DATA_DIR / 'example.sqlite3'}"),
    # Short intervals so that the example shows interruption within a minute; production keeps the defaults.
    dbsched_run_jobs_interval=1,
    dbsched_monitor_interval=2,
    dbsched_interrupt_threshold=60,
    dbsched_retry_backoff=(2, 30),
    beat_scheduler="celery_dbsched.Scheduler",
    # A stock beat_schedule keeps working: each entry becomes a database job of its own.
    beat_schedule={
        "example.rotate_logs": {"task": "example_proj.tasks.rotate_logs", "schedule": 5.0, "args": (3,)},
        "example.nightly_report": {
            "task": "example_proj.tasks.rotate_logs",
            "schedule": crontab(minute=0, hour=2),
            "args": (30,),
            "options": {"dbsched": {"misfire": "skip"}},
        },
    },
    # The one line that lets workers report how beat_schedule runs end (else they stay "dispatched").
    imports=["celery_dbsched.tracking"],
    timezone="Europe/Berlin",
    task_serializer="json",
    accept_content=["json"],
    worker_hijack_root_logger=True,
    broker_connection_retry_on_startup=True,
)
