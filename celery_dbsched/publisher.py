"""Run messages, built and published directly through the beat's producer.

A beat publishes thousands of messages of one task (`celery_dbsched.run_job`, args `[run id, job name]`).
`app.send_task` rebuilds the routing, the message and an AsyncResult for each, and costs about four times
kombu's own publish. Here the route of each queue is resolved once (Celery's router, so `task_routes` and
`task_queues` apply as they would to `send_task`), and each message is the Celery protocol 2 message that
`send_task` would send: same headers, properties and JSON body, same publish retry policy, and the
`before_task_publish` / `after_task_publish` signals are sent when something listens to them. With
`task_protocol = 1` or `task_send_sent_event`, messages go through `send_task` instead.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from celery import signals
from celery.utils.nodenames import anon_nodename

from .worker import RUN_TASK_NAME

_EMBED: dict[str, None] = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


@dataclass(frozen=True)
class _Route:
    exchange: Any
    routing_key: str
    declare: list[Any]
    delivery_mode: int | None
    properties: dict[str, Any]


class RunPublisher:
    """Publishes one message per claimed run, as `app.send_task(RUN_TASK_NAME, ...)` would."""

    def __init__(self, app: Any) -> None:
        self.app = app
        conf = app.conf
        self.direct = int(conf.task_protocol or 2) == 2 and not conf.task_send_sent_event
        self._origin = anon_nodename()
        self._retry = bool(conf.task_publish_retry)
        self._retry_policy = dict(conf.task_publish_retry_policy or {})
        self._compression = conf.task_compression
        self._routes: dict[str | None, _Route] = {}
        self._declared: set[str | None] = set()

    def new_batch(self) -> None:
        """A batch of messages begins: each queue is declared again at its first message."""
        self._declared.clear()

    def publish(self, producer: Any, run_id: int, job_name: str, queue: str | None) -> str:
        """Publish the message of one run on `producer`; returns its task id."""
        if not self.direct:
            return self._send_task(producer, run_id, job_name, queue)
        route = self._route(queue)
        task_id = str(uuid.uuid4())
        args = [run_id, job_name]
        headers = {
            "lang": "py",
            "task": RUN_TASK_NAME,
            "id": task_id,
            "shadow": None,
            "eta": None,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": 0,
            "timelimit": [None, None],
            "root_id": task_id,
            "parent_id": None,
            "argsrepr": repr(args),
            "kwargsrepr": "{}",
            "origin": self._origin,
            "ignore_result": None,  # as send_task without the option: the worker's task decides
            "replaced_task_nesting": 0,
            "stamped_headers": None,
            "stamps": {},
        }
        body: tuple[list[Any], dict[str, Any], dict[str, None]] = (args, {}, _EMBED)
        properties = {"correlation_id": task_id, "reply_to": self.app.thread_oid, **route.properties}
        # Declared at the first message of each queue in a batch, not at every message: kombu's per-message
        # check costs more than the publish itself. A batch starts after any reconnect between batches.
        declare = route.declare if queue not in self._declared else None
        signalled = bool(signals.before_task_publish.receivers or signals.after_task_publish.receivers)
        if signalled:
            signals.before_task_publish.send(
                sender=RUN_TASK_NAME,
                body=body,
                exchange=route.exchange,
                routing_key=route.routing_key,
                declare=declare,
                headers=headers,
                properties=properties,
                retry_policy=self._retry_policy,
            )
        publish_kwargs = {
            "exchange": route.exchange,
            "routing_key": route.routing_key,
            "serializer": "json",
            "compression": self._compression,
            "retry_policy": self._retry_policy,
            "delivery_mode": route.delivery_mode,
            "declare": declare,
            "headers": headers,
            **properties,
        }
        try:
            # kombu wraps a retrying publish in a new `ensure` closure per message: try plainly first, and on
            # any failure publish as send_task would, through kombu's retrying publish: it revives the channel,
            # reconnects and retries connection errors under the publish retry policy, and raises the rest.
            producer.publish(body, retry=False, **publish_kwargs)
        except Exception:
            if not self._retry:
                raise
            producer.publish(body, retry=True, **publish_kwargs)
        self._declared.add(queue)
        if signalled:
            signals.after_task_publish.send(
                sender=RUN_TASK_NAME,
                body=body,
                headers=headers,
                exchange=route.exchange,
                routing_key=route.routing_key,
            )
        return task_id

    def _route(self, queue: str | None) -> _Route:
        route = self._routes.get(queue)
        if route is None:
            route = self._routes[queue] = self._resolve(queue)
        return route

    def _resolve(self, queue: str | None) -> _Route:
        """What Celery's router and `send_task_message` decide for this task and queue."""
        amqp = self.app.amqp
        options = dict(amqp.router.route({"queue": queue} if queue else {}, RUN_TASK_NAME, (), {}))
        target = options.pop("queue", None) or amqp.default_queue
        if isinstance(target, str):
            target = amqp.queues[target]
        exchange = options.pop("exchange", None)
        routing_key = options.pop("routing_key", None)
        exchange_type = options.pop("exchange_type", None) or getattr(target.exchange, "type", "direct")
        delivery_mode = options.pop("delivery_mode", None) or getattr(target.exchange, "delivery_mode", None)
        delivery_mode = delivery_mode or self.app.conf.task_default_delivery_mode
        if (not exchange or not routing_key) and exchange_type == "direct":
            exchange, routing_key = "", target.name
        elif exchange is None:
            exchange = target.exchange.name or amqp.default_exchange
            routing_key = routing_key or target.routing_key or self.app.conf.task_default_routing_key
        properties = {key: options[key] for key in ("priority",) if options.get(key) is not None}
        return _Route(exchange, routing_key, [target], delivery_mode, properties)

    def _send_task(self, producer: Any, run_id: int, job_name: str, queue: str | None) -> str:
        options: dict[str, Any] = {"queue": queue} if queue else {}
        result = self.app.send_task(
            RUN_TASK_NAME, args=[run_id, job_name], producer=producer, serializer="json", **options
        )
        return str(result.id)
