"""Run messages, built and published directly through the beat's producer.

A beat publishes thousands of messages of one task (`celery_dbsched.run_job`, args `[run id, job name]`).
`app.send_task` rebuilds the routing, the message and an AsyncResult for each, and costs about four times
kombu's own publish. Here the route of each queue is resolved once (Celery's router, so `task_routes` and
`task_queues` apply as they would to `send_task`), and each message is the Celery protocol 2 message that
`send_task` would send: same headers, properties and JSON body, same publish retry policy, and the
`before_task_publish` / `after_task_publish` signals are sent when something listens to them. With
`task_protocol = 1` or `task_send_sent_event`, messages go through `send_task` instead.

Plain tasks (`beat_schedule` entries) are published the same way by `publish_task`: the message
`app.send_task(task, args, kwargs, **options, headers={..., RUN_ID_HEADER: run id})` would send, with the
entry's routing (`task_routes`, queue, exchange, routing_key, exchange_type), priority, expires (seconds, or an
absolute time), headers, serializer, compression, countdown, eta, time_limit, soft_time_limit, ignore_result
and shadow options, and the execution options of the task when it is registered in the beat's app. What is
resolved once per entry is cached (the route, the argument reprs); only the task id and the times derived
from now are made per message. Through `send_task` instead (`SEND_TASK_FALLBACK`): any other option (link,
link_error, chain, group_id, stamped_headers, retry ...), and a countdown or eta when a queue is a quorum queue
(Celery's native delayed delivery). Unlike send_task, the result backend's `on_task_call` is not called: it
readies the caller to receive the result (a redis subscription, an rpc reply queue), and the beat never
reads results (the message is the same).

With publisher confirms (`broker_transport_options={"confirm_publish": True}`, py-amqp), each publish waits for
the broker's ack. A message the broker nacked (py-amqp raises `MessageNacked`: a full queue with
`x-overflow: reject-publish`, a broker that could not store it) or whose confirm never came (the connection was
lost first) raises `NotConfirmed`: the beat ends its run `failed` ("not published: the broker did not confirm
it"), never `queued` or `dispatched` as if it had been sent.
"""

from __future__ import annotations

import datetime as dt
import numbers
import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from amqp.exceptions import MessageNacked  # type: ignore[import-untyped]
from celery import signals
from celery.app.routes import MapRoute
from celery.utils.nodenames import anon_nodename
from celery.utils.saferepr import saferepr
from celery.utils.time import add_seconds_to_datetime, maybe_make_aware, subtract_datetimes
from dateutil.parser import isoparse  # type: ignore[import-untyped]
from kombu.common import Broadcast

from .protocol import RUN_SERIALIZER, RUN_TASK_NAME, run_args, run_shadow

_MISSING: Any = object()
_EMBED: dict[str, None] = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


# The options of a plain task published directly; anything else goes through send_task.
DIRECT_OPTIONS = frozenset(
    {
        "queue", "routing_key", "exchange", "exchange_type", "priority", "expires", "headers", "serializer",
        "compression", "countdown", "eta", "time_limit", "soft_time_limit", "ignore_result", "shadow",
        "delivery_mode",
    }
)  # fmt: skip
# The entries whose send_task decisions are kept (about 4 KB each). Beyond that the cache starts over, so
# that a beat's memory stays flat in the number of entries: 100,000 entries kept every plan, 0.5 GB.
TASK_PLANS_KEPT = 10_000
# The beat's publishing connection (`publish_transport_options`): a broker that stops answering without refusing
# (a network black hole) fails a publish after this many seconds instead of freezing the beat's tick. Redis:
# `socket_timeout` (kombu's default is none: an LPUSH waits forever). RabbitMQ: py-amqp's `read_timeout` and
# `write_timeout` (a publish without confirms does not wait for the broker, but a declaration, a confirm and a
# send buffer that fills up do). Each is set only where the user's broker_transport_options do not set it.
PUBLISH_TIMEOUT = 5.0
_TIMEOUT_OPTIONS = {"redis": ("socket_timeout",), "amqp": ("read_timeout", "write_timeout")}
SEND_TASK_FALLBACK = (
    "options other than DIRECT_OPTIONS (link, link_error, chain, chord, group_id, stamped_headers, retry, ...); "
    "countdown/eta with a quorum queue; task_protocol 1; task_send_sent_event"
)


@dataclass(frozen=True)
class _Route:
    exchange: Any
    routing_key: str
    declare: list[Any]
    delivery_mode: int | None
    properties: dict[str, Any]
    serializer: str | None = None
    compression: str | None = None
    headers: Mapping[str, Any] | None = None
    retry_policy: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class _TaskPlan:
    """What send_task decides for one entry, apart from the task id and the times derived from now."""

    task: str
    args: Sequence[Any]
    kwargs: Mapping[str, Any]
    options: Mapping[str, Any]
    route: _Route
    declare_key: tuple[str, ...]
    countdown: float | None
    eta: Any
    expires: Any
    time_limit: Any
    soft_time_limit: Any
    ignore_result: Any
    shadow: Any
    argsrepr: str
    kwargsrepr: str


class NotConfirmed(Exception):
    """With publisher confirms on, the broker did not confirm the message: it nacked it, or the connection was
    lost (or never made) before its confirm. The message is not known to be queued."""

    def __init__(self, cause: BaseException) -> None:
        reason = "it nacked the message" if isinstance(cause, MessageNacked) else repr(cause)
        super().__init__(f"the broker did not confirm it ({reason})")


def unpublished_error(exc: BaseException) -> str:
    """The error text of a run whose message could not be published."""
    return f"not published: {exc}" if isinstance(exc, NotConfirmed) else f"not published: {exc!r}"


def confirms_publish(app: Any) -> bool:
    """Whether the app's broker connections wait for publisher confirms (py-amqp's `confirm_publish`)."""
    return bool((app.conf.broker_transport_options or {}).get("confirm_publish"))


def publish_transport_options(app: Any) -> dict[str, float]:
    """The transport options the beat adds to its publishing connection (`connection_for_write`): the
    timeouts of PUBLISH_TIMEOUT that the broker's transport knows (by its driver type) and that the user's
    `broker_transport_options` leave unset. Opens nothing: kombu connects at the first use."""
    connection = app.connection_for_write()
    try:
        driver = connection.transport.driver_type
    finally:
        connection.release()
    user = app.conf.broker_transport_options or {}
    return {key: PUBLISH_TIMEOUT for key in _TIMEOUT_OPTIONS.get(driver, ()) if key not in user}


class RunPublisher:
    """Publishes one message per claimed run, as `app.send_task(RUN_TASK_NAME, ...)` would."""

    def __init__(self, app: Any) -> None:
        self.app = app
        conf = app.conf
        self.confirms = confirms_publish(app)
        self.direct = int(conf.task_protocol or 2) == 2 and not conf.task_send_sent_event
        self._origin = anon_nodename()
        self._retry = bool(conf.task_publish_retry)
        self._retry_policy = dict(conf.task_publish_retry_policy or {})
        self._compression = conf.task_compression
        self._serializer = conf.task_serializer
        self._routes: dict[str | None, _Route] = {}
        self._declared: set[Any] = set()
        self._task_plans: dict[str, _TaskPlan | None] = {}  # by entry: None = through send_task
        self._task_routes: dict[Any, _Route] = {}
        self._defaults: dict[str, tuple[Any, dict[str, Any] | None]] = {}
        self._reprs: tuple[int, int, int] | None = None
        self._shared_routes = True
        self._quorum: bool | None = None
        self._ids: list[str] = []
        # Called with the error when a plain publish fails, before it is tried again under the retry policy.
        self.on_retry: Callable[[Exception], None] = _ignore

    def new_batch(self) -> None:
        """A batch of messages begins: each queue is declared again at its first message."""
        self._declared.clear()

    def publish(self, producer: Any, run_id: int, job_name: str, queue: str | None) -> str:
        """Publish the message of one run on `producer`; returns its task id. With confirms on, raises
        `NotConfirmed` for a message the broker did not confirm."""
        return self._confirmed(self._publish, producer, run_id, job_name, queue)

    def _confirmed(self, publish: Callable[..., str], *args: Any) -> str:
        """`publish(*args)`; with confirms on, any error of it is NotConfirmed (the message is not known to be
        queued)."""
        if not self.confirms:
            return publish(*args)
        try:
            return publish(*args)
        except Exception as exc:
            raise NotConfirmed(exc) from exc

    def _publish(self, producer: Any, run_id: int, job_name: str, queue: str | None) -> str:
        if not self.direct:
            return self._send_task(producer, run_id, job_name, queue)
        route = self._route(queue)
        task_id = self._task_id()
        args = run_args(run_id, job_name)
        # ignore_result None: as send_task without the option (the worker's task decides).
        headers = _message_headers(RUN_TASK_NAME, task_id, self._origin, repr(args), "{}", shadow=run_shadow(job_name))
        body: tuple[list[Any], dict[str, Any], dict[str, None]] = (args, {}, _EMBED)
        properties = {"correlation_id": task_id, "reply_to": self.app.thread_oid, **route.properties}
        self._send(producer, RUN_TASK_NAME, route, queue, RUN_SERIALIZER, body, headers, properties)
        return task_id

    def _send(
        self,
        producer: Any,
        name: str,
        route: _Route,
        declare_key: Any,
        serializer: str,
        body: Any,
        headers: dict[str, Any],
        properties: dict[str, Any],
    ) -> None:
        # Declared at the first message of each queue in a batch, not at every message: kombu's per-message
        # check costs more than the publish itself. A batch starts after any reconnect between batches.
        declare = (route.declare or None) if declare_key not in self._declared else None
        retry_policy = route.retry_policy if route.retry_policy is not None else self._retry_policy
        before = bool(signals.before_task_publish.receivers)
        after = bool(signals.after_task_publish.receivers)
        if before:
            signals.before_task_publish.send(
                sender=name,
                body=body,
                exchange=route.exchange,
                routing_key=route.routing_key,
                declare=declare,
                headers=headers,
                properties=properties,
                retry_policy=retry_policy,
            )
        publish_kwargs = {
            "exchange": route.exchange,
            "routing_key": route.routing_key,
            "serializer": serializer,
            "compression": route.compression or self._compression,
            "retry_policy": retry_policy,
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
        except MessageNacked:
            raise  # the broker's answer, not a connection error: kombu's retrying publish would not retry it
        except Exception as exc:
            if not self._retry or timed_out(exc):
                # A broker that did not answer within the publish timeout is silent (a black hole): each retry
                # would hold the beat's tick for another timeout. The run ends `failed` (not published) and is
                # retried with the backoff, and the beat's database work goes on.
                raise
            self.on_retry(exc)
            producer.publish(body, retry=True, **publish_kwargs)
        self._declared.add(declare_key)
        if after:
            signals.after_task_publish.send(
                sender=name,
                body=body,
                headers=headers,
                exchange=route.exchange,
                routing_key=route.routing_key,
            )

    def _route(self, queue: str | None) -> _Route:
        route = self._routes.get(queue)
        if route is None:
            route = self._routes[queue] = self._resolve(queue)
        return route

    def _resolve(self, queue: str | None) -> _Route:
        """What Celery's router and `send_task_message` decide for this task and queue."""
        routed = self.app.amqp.router.route({"queue": queue} if queue else {}, RUN_TASK_NAME, (), {})
        return self._route_of(routed)

    def _route_of(self, routed: Mapping[str, Any]) -> _Route:
        """`send_task_message`'s routing of the options the router returned."""
        amqp, conf = self.app.amqp, self.app.conf
        options = dict(routed)
        queue = options.pop("queue", None)
        exchange = options.pop("exchange", None)
        routing_key = options.pop("routing_key", None)
        exchange_type = options.pop("exchange_type", None)
        delivery_mode = options.pop("delivery_mode", None)
        declare = options.pop("declare", None)
        serializer = options.pop("serializer", None)
        compression = options.pop("compression", None)
        headers = options.pop("headers", None)
        retry_policy = options.pop("retry_policy", None)
        for unused in ("event_dispatcher", "retry", "timeout", "confirm_timeout"):
            options.pop(unused, None)
        qname = queue
        if queue is None and exchange is None:
            queue = amqp.default_queue
        if queue is not None:
            if isinstance(queue, str):
                qname, queue = queue, amqp.queues[queue]
            else:
                qname = queue.name
        if delivery_mode is None:
            delivery_mode = getattr(getattr(queue, "exchange", None), "delivery_mode", None)
            delivery_mode = delivery_mode or conf.task_default_delivery_mode
        if exchange_type is None:
            exchange_type = getattr(getattr(queue, "exchange", None), "type", "direct")
        if (not exchange or not routing_key) and exchange_type == "direct":
            exchange, routing_key = "", qname
        elif exchange is None:
            exchange = queue.exchange.name or amqp.default_exchange
            routing_key = routing_key or queue.routing_key or conf.task_default_routing_key
        if declare is None and queue is not None and not isinstance(queue, Broadcast):
            declare = [queue]
        policy = dict(self._retry_policy, **retry_policy) if retry_policy else self._retry_policy
        return _Route(
            exchange,
            routing_key,
            list(declare or []),
            delivery_mode,
            {key: value for key, value in options.items() if key != "priority" or value is not None},
            serializer,
            compression,
            headers,
            policy,
        )

    # -- plain tasks ----------------------------------------------------------------------------------

    def publish_task(
        self,
        producer: Any,
        name: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        options: Mapping[str, Any],
        headers: Mapping[str, Any],
        *,
        entry: str | None = None,
    ) -> str:
        """Publish a plain task as `app.send_task(name, args, kwargs, **options)` would, with `headers` added
        to the entry's own; returns its task id. What send_task decides for these values is cached by `entry`
        (the job's name; else by task) and made again when any of them changed. With confirms on, raises
        `NotConfirmed` for a message the broker did not confirm."""
        return self._confirmed(self._publish_task, producer, name, args, kwargs, options, headers, entry)

    def _publish_task(
        self,
        producer: Any,
        name: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        options: Mapping[str, Any],
        headers: Mapping[str, Any],
        entry: str | None,
    ) -> str:
        plan = self._cached_plan(name, args, kwargs, options, entry if entry is not None else name)
        if plan is None or not self.direct:
            return self._send_plain_task(producer, name, args, kwargs, options, headers)
        assert isinstance(plan, _TaskPlan)
        task_id = self._task_id()
        route = plan.route
        eta, expires, properties = self._times(plan)
        message_headers = _message_headers(
            name,
            task_id,
            self._origin,
            plan.argsrepr,
            plan.kwargsrepr,
            shadow=plan.shadow,
            eta=eta,
            expires=expires,
            timelimit=[plan.time_limit, plan.soft_time_limit],
            ignore_result=plan.ignore_result,
        )
        if route.headers:
            message_headers.update(route.headers)
        message_headers.update(headers)
        body = (list(args), dict(kwargs), _EMBED)
        properties = {
            "correlation_id": task_id,
            "reply_to": self.app.thread_oid,
            **properties,
            **route.properties,
        }
        serializer = route.serializer or self._serializer
        self._send(producer, name, route, plan.declare_key, serializer, body, message_headers, properties)
        return task_id

    def _cached_plan(
        self, name: str, args: Sequence[Any], kwargs: Mapping[str, Any], options: Mapping[str, Any], key: str
    ) -> _TaskPlan | None:
        """The plan of entry `key`, made again when any of its values changed (bounded: `TASK_PLANS_KEPT`)."""
        plan = self._task_plans.get(key, _MISSING)
        if plan is _MISSING or (
            plan is not None
            and (plan.task != name or plan.args != args or plan.kwargs != kwargs or plan.options != options)
        ):
            if len(self._task_plans) >= TASK_PLANS_KEPT:
                self._task_plans.clear()
            plan = self._task_plans[key] = self._plan(name, args, kwargs, options)
        return plan  # type: ignore[no-any-return]

    def _times(self, plan: _TaskPlan) -> tuple[str | None, str | None, dict[str, Any]]:
        """The message's eta and expires (ISO text) and its `expiration` property, from now, as send_task
        derives them from countdown, eta and expires."""
        now: dt.datetime | None = None
        eta = plan.eta
        if plan.countdown:
            now = self.app.now()
            eta = maybe_make_aware(add_seconds_to_datetime(now, plan.countdown), tz=self.app.timezone)
        if eta is not None and not isinstance(eta, str):
            eta = eta.isoformat()
        properties: dict[str, Any] = {}
        expires = plan.expires
        if expires is not None:
            if isinstance(expires, dt.datetime):
                expires_s = subtract_datetimes(expires, self.app.now()).total_seconds()
            elif isinstance(expires, str):
                expires_s = subtract_datetimes(isoparse(expires), self.app.now()).total_seconds()
            else:
                expires_s = expires
            properties["expiration"] = max(expires_s, 0)
            if isinstance(expires, numbers.Real):
                now = now or self.app.now()
                expires = maybe_make_aware(add_seconds_to_datetime(now, expires), tz=self.app.timezone)
            if not isinstance(expires, str):
                expires = expires.isoformat()
        return eta, expires, properties

    def _plan(
        self,
        name: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        options: Mapping[str, Any],
    ) -> _TaskPlan | None:
        """send_task's decisions for this entry, or None when it must go through send_task."""
        if set(options) - DIRECT_OPTIONS:
            return None
        task_type, defaults = self._task_defaults(name)
        if defaults is None:
            return None
        merged = dict(defaults, **options) if defaults else dict(options)
        time_limit = merged.pop("time_limit", None)
        soft_time_limit = merged.pop("soft_time_limit", None)
        expires = merged.pop("expires", None)
        ignore_result = merged.pop("ignore_result", None)
        countdown = merged.pop("countdown", None)
        eta = merged.pop("eta", None)
        shadow = merged.pop("shadow", None)
        if (countdown or eta) and self._quorum_queues():
            return None
        if self._reprs is None:
            amqp = self.app.amqp
            # Routers given as maps (task_routes dicts, the default) do not look at args: one route per task and
            # options, shared by entries. A function router may: each entry is routed on its own.
            self._shared_routes = all(isinstance(router, MapRoute) for router in amqp.router.routes)
            self._reprs = (amqp.argsrepr_maxsize, amqp.kwargsrepr_maxsize, self.app.conf.task_repr_maxlevels)
        args_max, kwargs_max, maxlevels = self._reprs
        route_key = (name, _frozen(merged)) if self._shared_routes else None
        route = self._task_routes.get(route_key) if route_key is not None else None
        if route is None:
            router = self.app.amqp.router
            route = self._route_of(router.route(merged, name, list(args), dict(kwargs), task_type))
            if route_key is not None:
                self._task_routes[route_key] = route
        return _TaskPlan(
            task=name,
            args=args,
            kwargs=kwargs,
            options=options,
            route=route,
            declare_key=tuple(queue.name for queue in route.declare),
            countdown=countdown,
            eta=eta,
            expires=expires,
            time_limit=time_limit,
            soft_time_limit=soft_time_limit,
            ignore_result=ignore_result,
            shadow=shadow,
            argsrepr=_saferepr(list(args), args_max, maxlevels),
            kwargsrepr=_saferepr(dict(kwargs), kwargs_max, maxlevels),
        )

    def _task_defaults(self, name: str) -> tuple[Any, dict[str, Any] | None]:
        """The task registered under `name` in this app (or None) and the execution options send_task takes
        from it; None for the options when one of them needs send_task."""
        found = self._defaults.get(name)
        if found is None:
            task_type = self.app._tasks.get(name)
            defaults: dict[str, Any] | None = {}
            if task_type is not None and hasattr(task_type, "_get_exec_options"):
                defaults = {k: v for k, v in (task_type._get_exec_options() or {}).items() if v is not None}
                if set(defaults) - DIRECT_OPTIONS:
                    defaults = None
            found = self._defaults[name] = (task_type, defaults)
        return found

    def _task_id(self) -> str:
        """A random (version 4) UUID, as send_task makes, drawn from one urandom call per 512 ids: a call
        to the system's random source per message cost more than the rest of the message."""
        if not self._ids:
            pool = os.urandom(16 * 512)
            self._ids = [str(uuid.UUID(bytes=pool[i : i + 16], version=4)) for i in range(0, len(pool), 16)]
        return self._ids.pop()

    def _quorum_queues(self) -> bool:
        if self._quorum is None:
            from celery.utils.quorum_queues import detect_quorum_queues

            driver = self.app.producer_pool.connections.connection.transport.driver_type
            self._quorum = bool(detect_quorum_queues(self.app, driver)[0])
        return self._quorum

    def _send_plain_task(
        self,
        producer: Any,
        name: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        options: Mapping[str, Any],
        headers: Mapping[str, Any],
    ) -> str:
        options = dict(options)
        merged_headers = dict(options.pop("headers", None) or {})
        merged_headers.update(headers)
        result = self.app.send_task(
            name, args=list(args), kwargs=dict(kwargs), producer=producer, headers=merged_headers, **options
        )
        return str(result.id)

    def _send_task(self, producer: Any, run_id: int, job_name: str, queue: str | None) -> str:
        options: dict[str, Any] = {"queue": queue} if queue else {}
        result = self.app.send_task(
            RUN_TASK_NAME,
            args=run_args(run_id, job_name),
            shadow=run_shadow(job_name),
            producer=producer,
            serializer=RUN_SERIALIZER,
            **options,
        )
        return str(result.id)


def timed_out(exc: BaseException) -> bool:
    """A socket timeout, as the standard library (py-amqp) or redis-py (its own TimeoutError) raises it."""
    return any(cls.__name__ == "TimeoutError" for cls in type(exc).__mro__)


def _ignore(exc: Exception) -> None:
    return None


def _message_headers(
    name: str,
    task_id: str,
    origin: str,
    argsrepr: str,
    kwargsrepr: str,
    *,
    shadow: Any = None,
    eta: str | None = None,
    expires: str | None = None,
    timelimit: list[Any] | None = None,
    ignore_result: Any = None,
) -> dict[str, Any]:
    """The headers of a Celery protocol 2 message, as `app.amqp.as_task_v2` makes them for a task sent
    from outside a task (no parent, no group)."""
    return {
        "lang": "py",
        "task": name,
        "id": task_id,
        "shadow": shadow,
        "eta": eta,
        "expires": expires,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": timelimit if timelimit is not None else [None, None],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": argsrepr,
        "kwargsrepr": kwargsrepr,
        "origin": origin,
        "ignore_result": ignore_result,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
    }


def _frozen(value: Any) -> Any:
    """A hashable, comparable form of JSON-like values (the cache key of an entry)."""
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _frozen(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


_PLAIN_TEXT = frozenset(" !#$%&()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[]^_`abcdefghijklmnopqrstuvwxyz{|}~")


def _plain(value: Any, levels: int) -> bool:
    """Values whose saferepr is their repr: numbers, None, ASCII text without quotes or backslashes, and
    lists and str-keyed dicts of them, nested less deep than saferepr's `maxlevels`."""
    if value is None or isinstance(value, (bool, int, float)):
        return True
    if isinstance(value, str):
        return _PLAIN_TEXT.issuperset(value)
    if levels <= 1:
        return False
    if isinstance(value, list):
        return all(_plain(item, levels - 1) for item in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(k, 1) and _plain(v, levels - 1) for k, v in value.items())
    return False


def _saferepr(value: Any, maxsize: int, maxlevels: int) -> str:
    """Celery's saferepr of task arguments, by plain repr where that is the same (most beat entries)."""
    if _plain(value, maxlevels):
        text = repr(value)
        if len(text) < maxsize // 2:
            return text
    return str(saferepr(value, maxsize, maxlevels=maxlevels))
