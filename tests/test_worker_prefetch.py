"""The worker keeps its AMQP connection whole after a reconnect on the threads pool
(`celery_dbsched.worker.keep_the_connection_whole`): Celery's prefetch-count reduction is off there unless the
app sets it, and left alone on the other pools. The process scenario that needs it is
tests/test_faults_outages.py::test_broker_down_during_dispatch[rabbitmq] (a RabbitMQ node stopped with runs in
flight): with the reduction on, the worker took no message for 90 s after the node came back."""

from __future__ import annotations

from pathlib import Path

import pytest
from celery import Celery

from celery_dbsched.worker import PREFETCH_REDUCTION, install_worker


def _worker_conf(tmp_path: Path, pool: str, app_value: bool | None) -> bool:
    app = Celery("prefetch", broker="memory://", set_as_current=False)
    app.conf.dbsched_database_url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    if app_value is not None:
        app.conf[PREFETCH_REDUCTION] = app_value
    install_worker(app)
    worker = app.WorkController(pool=pool, concurrency=1, hostname=f"prefetch-{pool}@test")
    try:
        return bool(worker.app.conf[PREFETCH_REDUCTION])
    finally:
        worker.pool = None


@pytest.mark.parametrize(
    ("pool", "app_value", "expected"),
    [
        ("threads", None, False),  # turned off: the app said nothing
        ("threads", True, True),  # the app's own value stands
        ("threads", False, False),
        ("prefork", None, True),  # acks in the main process's loop: Celery's default stays
        ("solo", None, True),
    ],
)
def test_prefetch_reduction_is_off_on_the_threads_pool_unless_the_app_sets_it(
    tmp_path: Path, pool: str, app_value: bool | None, expected: bool
) -> None:
    assert _worker_conf(tmp_path, pool, app_value) is expected
