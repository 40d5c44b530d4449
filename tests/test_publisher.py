"""RunPublisher sends, message for message, what `app.send_task(RUN_TASK_NAME, ...)` would send.

Each case publishes one run both ways on the same producer and compares everything kombu is asked to
publish: body, headers, properties, exchange, routing key, serializer, delivery mode, declared queues,
retry policy. Only the task id (and what derives from it) differs.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest
from amqp.exceptions import MessageNacked
from celery import Celery, signals
from helpers.apps import make_app
from kombu import Exchange, Queue
from kombu.transport import memory

from celery_dbsched import publisher as publisher_module
from celery_dbsched.protocol import RUN_TASK_NAME
from celery_dbsched.publisher import (
    PUBLISH_TIMEOUT,
    NotConfirmed,
    RunPublisher,
    publish_transport_options,
    unpublished_error,
)

PER_MESSAGE = {"id", "root_id", "correlation_id"}


@pytest.fixture(autouse=True)
def _empty_memory_broker() -> Iterator[None]:
    """These tests publish real messages on the in-process `memory://` broker, whose queues every test in the
    process shares (`reports`, the default queue): empty them afterwards, so that no other test drains them."""
    yield
    memory.Channel.queues.clear()


def json_app(**conf: Any) -> Celery:
    """An app on `memory://` that sends JSON, so the tests read the messages as sent."""
    return make_app("publisher-test", **{"task_serializer": "json", "accept_content": ["json"], **conf})


class Recorder:
    def __init__(self, producer: Any) -> None:
        self.calls: list[dict[str, Any]] = []
        self._publish = producer.publish
        producer.publish = self.publish

    def publish(self, body: Any, **kwargs: Any) -> Any:
        self.calls.append({"body": body, **kwargs})
        return self._publish(body, **kwargs)


def normalised(call: dict[str, Any]) -> dict[str, Any]:
    call = dict(call)
    task_id = call["headers"]["id"]
    assert call["headers"]["root_id"] == task_id and call.get("correlation_id") == task_id
    call["headers"] = {k: v for k, v in call["headers"].items() if k not in PER_MESSAGE}
    call.pop("correlation_id", None)
    call["body"] = [list(part) if isinstance(part, tuple) else part for part in call["body"]]
    call["declare"] = [(q.name, q.exchange.name, q.routing_key) for q in call.get("declare") or []]
    for key in ("timeout", "confirm_timeout"):  # send_task passes None explicitly; absent is the same
        if call.get(key) is None:
            call.pop(key, None)
    # Retrying is decided apart (a plain first attempt, then kombu's retrying publish on a connection error):
    # see test_a_failed_publish_is_made_again_through_kombus_retrying_publish.
    call.pop("retry")
    return call


def both_ways(app: Celery, queue: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    with app.producer_or_acquire() as producer:
        recorder = Recorder(producer)
        options = {"queue": queue} if queue else {}
        app.send_task(
            RUN_TASK_NAME,
            args=[7, "jobs.report"],
            shadow="jobs.report",  # a run's task shows under its job's name
            producer=producer,
            serializer="json",
            **options,
        )
        RunPublisher(app).publish(producer, 7, "jobs.report", queue)
    stock, ours = recorder.calls
    return normalised(stock), normalised(ours)


CASES = {
    "defaults": ({}, None),
    "the job's queue": ({}, "reports"),
    "task_routes": ({"task_routes": {RUN_TASK_NAME: {"queue": "routed"}}}, None),
    "task_routes with a priority": ({"task_routes": {RUN_TASK_NAME: {"queue": "routed", "priority": 7}}}, None),
    "a custom default queue": ({"task_default_queue": "beat-runs"}, None),
    "declared task_queues": (
        {"task_queues": [Queue("reports", Exchange("reports-x", type="topic"), routing_key="reports.#")]},
        "reports",
    ),
    "transient delivery": ({"task_default_delivery_mode": "transient"}, None),
    "compression": ({"task_compression": "gzip"}, None),
    "a retry policy": ({"task_publish_retry_policy": {"max_retries": 2, "interval_start": 0.5}}, None),
    "results ignored": ({"task_ignore_result": True}, None),
}


@pytest.mark.parametrize(("conf", "queue"), list(CASES.values()), ids=list(CASES))
def test_the_message_is_the_one_send_task_sends(conf: dict[str, Any], queue: str | None) -> None:
    stock, ours = both_ways(json_app(**conf), queue)
    assert ours == stock
    assert ours["headers"]["shadow"] == "jobs.report"  # Flower and Celery's log lines name the job


def test_each_message_has_its_own_task_id() -> None:
    app = json_app()
    publisher = RunPublisher(app)
    with app.producer_or_acquire() as producer:
        recorder = Recorder(producer)
        ids = [publisher.publish(producer, n, "j", None) for n in range(3)]
    assert len(set(ids)) == 3
    assert [call["headers"]["id"] for call in recorder.calls] == ids
    assert [call["body"][0] for call in recorder.calls] == [[0, "j"], [1, "j"], [2, "j"]]
    assert all(call["serializer"] == "json" for call in recorder.calls)


@pytest.fixture
def publish_signals() -> Iterator[list[tuple[str, dict[str, Any]]]]:
    seen: list[tuple[str, dict[str, Any]]] = []

    def before(**kwargs: Any) -> None:
        seen.append(("before", kwargs))

    def after(**kwargs: Any) -> None:
        seen.append(("after", kwargs))

    signals.before_task_publish.connect(before, weak=False)
    signals.after_task_publish.connect(after, weak=False)
    try:
        yield seen
    finally:
        signals.before_task_publish.disconnect(before)
        signals.after_task_publish.disconnect(after)


def test_publish_signals_are_sent_as_send_task_sends_them(publish_signals: list[tuple[str, dict[str, Any]]]) -> None:
    app = json_app()
    with app.producer_or_acquire() as producer:
        task_id = RunPublisher(app).publish(producer, 3, "j", "q")
    assert [kind for kind, _ in publish_signals] == ["before", "after"]
    for _, kwargs in publish_signals:
        assert kwargs["sender"] == RUN_TASK_NAME
        assert kwargs["routing_key"] == "q"
    assert publish_signals[0][1]["headers"]["id"] == task_id == publish_signals[1][1]["headers"]["id"]
    assert list(publish_signals[1][1]["body"][0]) == [3, "j"]


@pytest.mark.parametrize(
    "conf", [{"task_protocol": 1}, {"task_send_sent_event": True}], ids=["protocol 1", "sent events"]
)
def test_messages_go_through_send_task_when_the_settings_need_it(conf: dict[str, Any]) -> None:
    app = json_app(**conf)
    publisher = RunPublisher(app)
    assert not publisher.direct
    sent: list[tuple[Any, ...]] = []
    real = app.send_task

    def send_task(*args: Any, **kwargs: Any) -> Any:
        sent.append(args)
        return real(*args, **kwargs)

    app.send_task = send_task  # type: ignore[method-assign]
    with app.producer_or_acquire() as producer:
        task_id = publisher.publish(producer, 5, "j", None)
    assert sent == [(RUN_TASK_NAME,)] and task_id


def test_the_direct_path_is_the_default() -> None:
    assert RunPublisher(json_app()).direct


def test_each_queue_is_declared_at_its_first_message_of_a_batch() -> None:
    app = json_app()
    publisher = RunPublisher(app)
    with app.producer_or_acquire() as producer:
        recorder = Recorder(producer)
        publisher.new_batch()
        for queue in ("a", "a", "b", "a"):
            publisher.publish(producer, 1, "j", queue)
        publisher.new_batch()
        publisher.publish(producer, 2, "j", "a")
    declared = [[q.name for q in call["declare"]] if call["declare"] else None for call in recorder.calls]
    assert declared == [["a"], None, ["b"], None, ["a"]]


class FlakyProducer:
    """Fails its first `failures` publishes with `error`."""

    def __init__(self, error: BaseException, failures: int = 1) -> None:
        self.error = error
        self.failures = failures
        self.calls: list[bool] = []

    def publish(self, body: Any, retry: bool = False, **kwargs: Any) -> None:
        self.calls.append(retry)
        if len(self.calls) <= self.failures:
            raise self.error


def test_a_failed_publish_is_made_again_through_kombus_retrying_publish() -> None:
    """As send_task publishes: kombu's retrying publish revives the channel and retries connection errors."""
    producer = FlakyProducer(ConnectionError("reset"))
    RunPublisher(json_app()).publish(producer, 1, "j", None)
    assert producer.calls == [False, True]


def test_what_the_retrying_publish_raises_is_raised() -> None:
    producer = FlakyProducer(ValueError("cannot serialize"), failures=2)
    with pytest.raises(ValueError, match="cannot serialize"):
        RunPublisher(json_app()).publish(producer, 1, "j", None)
    assert producer.calls == [False, True]


def test_without_publish_retries_the_first_error_is_raised() -> None:
    producer = FlakyProducer(ConnectionError("reset"))
    with pytest.raises(ConnectionError):
        RunPublisher(json_app(task_publish_retry=False)).publish(producer, 1, "j", None)
    assert producer.calls == [False]


def test_with_confirms_a_nack_is_not_published_again_and_says_the_broker_did_not_confirm_it() -> None:
    """py-amqp raises MessageNacked when the broker nacks: its answer, not a connection error (tested against
    RabbitMQ in tests/test_publisher_confirms.py)."""
    producer = FlakyProducer(MessageNacked(), failures=2)
    publisher = RunPublisher(json_app(broker_transport_options={"confirm_publish": True}))
    with pytest.raises(NotConfirmed) as raised:
        publisher.publish(producer, 1, "j", None)
    assert producer.calls == [False]
    assert unpublished_error(raised.value) == "not published: the broker did not confirm it (it nacked the message)"


def test_with_confirms_a_connection_lost_before_the_confirm_says_the_broker_did_not_confirm_it() -> None:
    producer = FlakyProducer(ConnectionError("reset"), failures=2)
    publisher = RunPublisher(json_app(broker_transport_options={"confirm_publish": True}))
    with pytest.raises(NotConfirmed) as raised:
        publisher.publish(producer, 1, "j", None)
    assert producer.calls == [False, True]
    assert unpublished_error(raised.value) == (
        "not published: the broker did not confirm it (ConnectionError('reset'))"
    )
    assert unpublished_error(ConnectionError("reset")) == "not published: ConnectionError('reset')"


def test_a_publish_that_timed_out_is_not_retried_at_once() -> None:
    """A broker silent for the publish timeout (a black hole) would hold the beat's tick for one more timeout
    per retry: the error is raised (the run is retried with the backoff)."""
    import redis.exceptions

    for error in (TimeoutError("timed out"), redis.exceptions.TimeoutError("Timeout reading from socket")):
        producer = FlakyProducer(error)
        with pytest.raises(type(error)):
            RunPublisher(json_app()).publish(producer, 1, "j", None)
        assert producer.calls == [False]


@pytest.mark.parametrize(
    ("url", "user", "added"),
    [
        ("redis://127.0.0.1:6379/0", {}, {"socket_timeout": PUBLISH_TIMEOUT}),
        ("redis://127.0.0.1:6379/0", {"socket_timeout": 30, "visibility_timeout": 9}, {}),
        ("amqp://guest@127.0.0.1//", {}, {"read_timeout": PUBLISH_TIMEOUT, "write_timeout": PUBLISH_TIMEOUT}),
        ("amqp://guest@127.0.0.1//", {"write_timeout": None}, {"read_timeout": PUBLISH_TIMEOUT}),
        ("memory://", {}, {}),
    ],
)
def test_the_beats_publishing_connection_gets_timeouts_the_user_did_not_set(
    url: str, user: dict[str, Any], added: dict[str, float]
) -> None:
    assert publish_transport_options(make_app(broker_url=url, broker_transport_options=user)) == added


# -- plain tasks (beat_schedule entries): publish_task sends what send_task sends ------------------------

RUN_HEADER = {"dbsched_run_id": 7}
NOW = dt.datetime(2030, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
ALL_OPTIONS = {
    "queue": "reports",
    "priority": 4,
    "expires": 90,
    "headers": {"x-tenant": "acme"},
    "serializer": "pickle",
    "compression": "zlib",
    "countdown": 15,
    "time_limit": 60,
    "soft_time_limit": 50,
    "ignore_result": True,
    "shadow": "report (shadowed)",
}
TASK_CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "no options": ({}, {}),
    "a queue": ({}, {"queue": "reports"}),
    "task_routes": ({"task_routes": {"tasks.report": {"queue": "routed", "priority": 7}}}, {}),
    "task_routes and a queue option": ({"task_routes": {"tasks.report": {"queue": "routed"}}}, {"queue": "mine"}),
    "declared task_queues": (
        {"task_queues": [Queue("reports", Exchange("reports-x", type="topic"), routing_key="reports.#")]},
        {"queue": "reports"},
    ),
    "exchange and routing key": ({}, {"exchange": "events", "routing_key": "events.report", "exchange_type": "topic"}),
    "a direct exchange": ({}, {"exchange": "direct-x", "routing_key": "rk"}),
    "a priority": ({}, {"priority": 9}),
    "expires in seconds": ({}, {"expires": 3600}),
    "expires at an absolute time": ({}, {"expires": "2030-01-01T13:00:00+00:00"}),
    "expires in the past": ({}, {"expires": "2030-01-01T11:00:00+00:00"}),
    "headers": ({}, {"headers": {"x-tenant": "acme", "x-n": 3}}),
    "a serializer": ({}, {"serializer": "pickle"}),
    "compression": ({}, {"compression": "gzip"}),
    "the app's compression": ({"task_compression": "zlib"}, {}),
    "the app's serializer": ({"task_serializer": "pickle", "accept_content": ["json", "pickle"]}, {}),
    "a countdown": ({}, {"countdown": 30}),
    "an eta": ({}, {"eta": "2030-01-01T12:30:00+00:00"}),
    "time limits": ({}, {"time_limit": 60, "soft_time_limit": 45}),
    "ignore_result": ({}, {"ignore_result": True}),
    "ignore_result false": ({}, {"ignore_result": False}),
    "shadow": ({}, {"shadow": "report for acme"}),
    "transient delivery": ({"task_default_delivery_mode": "transient"}, {}),
    "a retry policy": ({"task_publish_retry_policy": {"max_retries": 2, "interval_start": 0.5}}, {}),
    "a timezone": ({"timezone": "Europe/Paris"}, {"countdown": 5, "expires": 60}),
    "every option at once": ({}, ALL_OPTIONS),
}


def plain_both_ways(
    app: Celery, options: dict[str, Any], name: str = "tasks.report"
) -> tuple[dict[str, Any], dict[str, Any]]:
    app.now = lambda: NOW  # type: ignore[method-assign]  # eta and expires derive from now: the same for both
    args, kwargs = [1, "two", {"three": 3}], {"region": "eu", "n": [1, 2]}
    with app.producer_or_acquire() as producer:
        recorder = Recorder(producer)
        stock_options = dict(options)
        headers = {**(stock_options.pop("headers", None) or {}), **RUN_HEADER}
        app.send_task(name, args=args, kwargs=kwargs, producer=producer, headers=headers, **stock_options)
        publisher = RunPublisher(app)
        publisher.publish_task(producer, name, tuple(args), kwargs, options, RUN_HEADER)
    stock, ours = recorder.calls
    return normalised(stock), normalised(ours)


@pytest.mark.parametrize(("conf", "options"), list(TASK_CASES.values()), ids=list(TASK_CASES))
def test_a_plain_task_message_is_the_one_send_task_sends(conf: dict[str, Any], options: dict[str, Any]) -> None:
    stock, ours = plain_both_ways(json_app(**conf), options)
    assert ours == stock
    assert ours["headers"]["dbsched_run_id"] == 7


def test_a_registered_tasks_execution_options_apply_as_send_task_applies_them() -> None:
    app = json_app()

    @app.task(name="tasks.report", queue="from-task", time_limit=30, priority=2, expires=600)
    def report(*args: Any, **kwargs: Any) -> None:  # pragma: no cover (never run)
        pass

    for options in ({}, {"queue": "entry-queue", "time_limit": 5}):
        stock, ours = plain_both_ways(app, options)
        assert ours == stock


def test_a_changed_entry_is_published_with_its_new_options() -> None:
    app = json_app()
    publisher = RunPublisher(app)
    with app.producer_or_acquire() as producer:
        recorder = Recorder(producer)
        publisher.publish_task(producer, "tasks.report", (), {}, {"queue": "a"}, RUN_HEADER)
        publisher.publish_task(producer, "tasks.report", (), {}, {"queue": "b"}, RUN_HEADER)
        publisher.publish_task(producer, "tasks.report", (1,), {}, {"queue": "b"}, RUN_HEADER)
    assert [call["routing_key"] for call in recorder.calls] == ["a", "b", "b"]
    assert [call["body"][0] for call in recorder.calls] == [[], [], [1]]


def test_the_entries_kept_are_bounded_and_a_dropped_entry_is_planned_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(publisher_module, "TASK_PLANS_KEPT", 3)
    app = json_app()
    publisher = RunPublisher(app)
    with app.producer_or_acquire() as producer:
        recorder = Recorder(producer)
        for _ in range(2):
            for i in range(5):
                publisher.publish_task(
                    producer, "tasks.report", (i,), {}, {"queue": f"q{i}"}, RUN_HEADER, entry=f"e{i}"
                )
                assert len(publisher._task_plans) <= 3
    assert [call["routing_key"] for call in recorder.calls] == [f"q{i}" for i in range(5)] * 2
    assert [call["body"][0] for call in recorder.calls] == [[i] for i in range(5)] * 2


@pytest.mark.parametrize(
    ("conf", "options"),
    [
        ({}, {"link": "tasks.after"}),
        ({}, {"group_id": "g"}),
        ({"task_protocol": 1}, {}),
        ({"task_send_sent_event": True}, {}),
    ],
    ids=["a link", "a group id", "protocol 1", "sent events"],
)
def test_what_the_direct_path_does_not_cover_goes_through_send_task(
    conf: dict[str, Any], options: dict[str, Any]
) -> None:
    app = json_app(**conf)
    sent: list[tuple[Any, dict[str, Any]]] = []
    real = app.send_task

    def send_task(name: Any, **kwargs: Any) -> Any:
        sent.append((name, kwargs))
        return real(name, **kwargs)

    app.send_task = send_task  # type: ignore[method-assign]
    with app.producer_or_acquire() as producer:
        task_id = RunPublisher(app).publish_task(producer, "tasks.report", (1,), {}, options, RUN_HEADER)
    assert [name for name, _ in sent] == ["tasks.report"] and task_id
    assert sent[0][1]["headers"] == RUN_HEADER


@pytest.mark.parametrize("backend", ["redis://127.0.0.1:6379/0", "rpc://"])
def test_a_result_backend_does_not_take_the_direct_path_away(backend: str) -> None:
    """send_task also calls the backend's on_task_call (readying the caller for the result): the beat never
    reads results, so the direct path skips it; the message is the same."""
    app = json_app(result_backend=backend)
    stock, ours = plain_both_ways(app, {})
    assert ours == stock
    called: list[str] = []
    real = app.send_task
    app.send_task = lambda *a, **k: called.append("send_task") or real(*a, **k)  # type: ignore[method-assign]
    with app.producer_or_acquire() as producer:
        RunPublisher(app).publish_task(producer, "tasks.report", (), {}, {}, RUN_HEADER)
    assert called == []


@pytest.mark.parametrize(
    "value",
    [
        [],
        ["bench.e1"],
        [1, "two", {"three": 3}],
        ["it's"],
        ['say "hi"'],
        ["back\\slash"],
        ["é"],
        ["line\nbreak"],
        [1.5, True, None, -3],
        {"a": "b", "n": [1, 2]},
        ["x" * 2000],
        [[[[1]]]],
        [[[1]]],
        {"deep": {"deeper": {"deepest": 1}}},
        list(range(600)),
        {1: "int key"},
    ],
)
def test_argument_reprs_are_celerys_saferepr(value: Any) -> None:
    from celery.utils.saferepr import saferepr

    from celery_dbsched.publisher import _saferepr

    assert _saferepr(value, 1024, 3) == saferepr(value, 1024, maxlevels=3)
