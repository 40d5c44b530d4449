"""Celery apps for the in-process tests, and durations."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from celery import Celery

from celery_dbsched import JobContext

from .prompt_stop import stop_promptly

if TYPE_CHECKING:  # imported here, celery_dbsched.testing would be loaded before pytest loads it as a plugin
    from celery_dbsched.testing import TestScheduler

# The `scheduler` fixture (conftest.py): `scheduler(app, now=..., **settings) -> TestScheduler`.
TestSchedulerFactory = Callable[..., "TestScheduler"]


def seconds(n: float) -> dt.timedelta:
    return dt.timedelta(seconds=n)


def noop(ctx: JobContext) -> None:
    """A job that does nothing."""
    return None


def make_app(main: str = "dbsched-tests", **conf: Any) -> Celery:
    """A fresh app (never the current one) with a name of its own, on the in-process `memory://` broker unless
    `conf` says otherwise. Its embedded workers stop within 0.1 s of being asked (helpers/prompt_stop.py) and have no
    remote control, which no test uses."""
    app = Celery(f"{main}-{uuid.uuid4().hex[:8]}", set_as_current=False)
    stop_promptly(app)
    app.conf.update({"broker_url": "memory://", "worker_enable_remote_control": False, **conf})
    return app


def memory_app(database_url: str, *, main: str = "test", **conf: Any) -> Celery:
    """A fresh app on `database_url` and the in-process `memory://` broker, with a name and a queue of its own;
    a beat built for it returns its sleep from tick() instead of sleeping on LISTEN (PostgreSQL; the tests of
    that opt in). `conf` overrides any of that."""
    return make_app(
        main,
        **{
            "task_default_queue": f"q-{uuid.uuid4().hex[:12]}",
            "dbsched_database_url": database_url,
            "dbsched_listen": False,
            **conf,
        },
    )


def next_message(app: Celery, timeout: float = 10.0) -> Any:
    """The next message on the app's default queue (kombu's Message), acknowledged."""
    with app.connection_for_read() as conn:
        queue = conn.SimpleQueue(app.amqp.queues[app.conf.task_default_queue])
        try:
            message = queue.get(timeout=timeout)
            message.ack()
        finally:
            queue.close()
    return message
