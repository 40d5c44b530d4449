"""Publisher confirms (issue 15, item 4): with `broker_transport_options={"confirm_publish": True}` a run whose
message RabbitMQ did not confirm ends `failed` ("not published: the broker did not confirm it"), never
`dispatched` (or `queued`) as if it had been sent.

A beat (in process, the subject is its messages) claims plain tasks from PostgreSQL and publishes them to a
real RabbitMQ:

- the broker nacks: the queue is declared (through the app's `task_queues`, so the beat's own declare matches)
  with `x-max-length` and `x-overflow: reject-publish`, so RabbitMQ nacks every message once it is full. Without
  confirms the same messages are dropped silently and their runs look dispatched: the test shows both.
- the connection is lost: a private node (tests/helpers/rabbitmq.py) is stopped in the middle of a batch. The
  runs published before the stop are confirmed and their messages are still in the durable queue when the node
  is started again; every later run of the batch ends `failed`, not published.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import signals
from helpers.rabbitmq import PrivateRabbitMQ
from helpers.repository import add_due_tasks
from helpers.services import RABBITMQ_URL, Database, require_service
from kombu import Connection, Queue
from test_faults_outages import report

from celery_dbsched import Scheduler
from celery_dbsched.states import RunState

pytestmark = [pytest.mark.faults, pytest.mark.postgres]

CONFIRMS = {"confirm_publish": True}
NOT_CONFIRMED = "not published: the broker did not confirm it"
Factory = Callable[..., Scheduler]


def queue_depth(url: str, name: str) -> int:
    """The messages ready in queue `name` (a passive declare: it must exist)."""
    with Connection(url, connect_timeout=5) as conn:
        channel = conn.channel()
        try:
            _, count, _ = channel.queue_declare(name, passive=True)
            return int(count)
        finally:
            channel.close()


def delete_queue(url: str, name: str) -> None:
    with Connection(url, connect_timeout=5) as conn:
        channel = conn.channel()
        try:
            channel.queue_delete(name)
        finally:
            channel.close()


def statuses(scheduler: Scheduler) -> Counter[str]:
    return Counter(run.status for run in scheduler.repository.list_runs(limit=1000))


@pytest.fixture
def bounded_queue() -> Iterator[str]:
    require_service("rabbitmq")
    name = f"dbsched-confirms-{uuid.uuid4().hex[:12]}"
    yield name
    delete_queue(RABBITMQ_URL, name)


CAPACITY = 3
DUE = 10


@pytest.mark.rabbitmq
@pytest.mark.parametrize("confirm", [True, False], ids=["confirms", "no-confirms"])
def test_a_message_the_broker_nacks_ends_its_run_not_published(
    confirm: bool, postgres_database: Database, make_scheduler: Factory, bounded_queue: str
) -> None:
    repository = postgres_database.migrated_repository()
    add_due_tasks(repository, DUE)
    bounded = Queue(
        bounded_queue,
        routing_key=bounded_queue,
        queue_arguments={"x-max-length": CAPACITY, "x-overflow": "reject-publish"},
    )
    scheduler = make_scheduler(
        postgres_database.url,
        broker_url=RABBITMQ_URL,
        broker_transport_options=CONFIRMS if confirm else {},
        task_queues=[bounded],
        task_default_queue=bounded_queue,
    )
    scheduler.tick()
    scheduler.close()
    counts = statuses(scheduler)
    runs = repository.list_runs(limit=1000)
    in_queue = queue_depth(RABBITMQ_URL, bounded_queue)
    report(
        f"confirms-nack-{'on' if confirm else 'off'}",
        due=DUE,
        queue_capacity=CAPACITY,
        messages_in_queue=in_queue,
        dispatched=counts[RunState.DISPATCHED],
        not_confirmed=sum(NOT_CONFIRMED in (run.error or "") for run in runs),
        failed=counts["failed"],
    )
    assert in_queue == CAPACITY
    if confirm:
        # Every run that looks sent has its message in the queue; the others say why they were not sent.
        assert counts == {RunState.DISPATCHED: CAPACITY, "failed": DUE - CAPACITY}, counts
        failed = [run for run in runs if run.status == "failed"]
        assert all((run.error or "").startswith(NOT_CONFIRMED) for run in failed), [run.error for run in failed]
        assert "nacked" in (failed[0].error or "")
        assert all(run.start_time is None for run in failed)
    else:
        # What confirms prevent: the broker dropped DUE - CAPACITY messages and every run looks dispatched.
        assert counts == {RunState.DISPATCHED: DUE}, counts


@pytest.mark.rabbitmq
def test_a_node_stopped_in_the_middle_of_a_batch_leaves_no_run_looking_dispatched(
    postgres_database: Database, make_scheduler: Factory, private_rabbitmq: PrivateRabbitMQ
) -> None:
    node = private_rabbitmq
    queue = f"dbsched-confirms-{uuid.uuid4().hex[:12]}"
    repository = postgres_database.migrated_repository()
    add_due_tasks(repository, DUE)
    scheduler = make_scheduler(
        postgres_database.url,
        broker_url=node.url,
        broker_transport_options=CONFIRMS,
        task_default_queue=queue,
        broker_connection_timeout=2,
    )
    published_before_stop = 4
    seen: list[str] = []
    stopped: list[float] = []

    def stop_the_node(sender: Any = None, headers: Any = None, **kwargs: Any) -> None:
        seen.append(headers["id"])
        if len(seen) == published_before_stop + 1:
            stopped.append(node.stop())

    signals.before_task_publish.connect(stop_the_node, weak=False)
    try:
        started = time.monotonic()
        scheduler.tick()
        tick_s = time.monotonic() - started
    finally:
        signals.before_task_publish.disconnect(stop_the_node)
    scheduler.close()
    assert stopped, "the node was not stopped during the batch"
    runs = repository.list_runs(limit=1000)
    counts = Counter(run.status for run in runs)
    failed = [run for run in runs if run.status == "failed"]
    restart_s = node.start()
    in_queue = queue_depth(node.url, queue)
    report(
        "confirms-node-stopped-mid-batch",
        due=DUE,
        published_before_stop=published_before_stop,
        dispatched=counts[RunState.DISPATCHED],
        not_confirmed=sum((run.error or "").startswith(NOT_CONFIRMED) for run in failed),
        messages_kept_across_stop=in_queue,
        node_stop_s=round(stopped[0], 1),
        node_start_s=round(restart_s, 1),
        tick_s=round(tick_s, 1),
        error=(failed[0].error or "")[:120] if failed else None,
    )
    assert counts == {RunState.DISPATCHED: published_before_stop, "failed": DUE - published_before_stop}, counts
    assert all((run.error or "").startswith(NOT_CONFIRMED) for run in failed), [run.error for run in failed]
    # The confirmed messages were persisted (durable queue, persistent messages): all of them, and only them.
    assert in_queue == published_before_stop
