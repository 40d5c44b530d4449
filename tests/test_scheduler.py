"""The beat side: `celery_dbsched.Scheduler`, built in-process as Celery beat builds it, and one real
`celery beat -S dbsched` process.

Messages are read back from the broker the scheduler published to: `memory://` where no real broker is needed,
and celery_dbsched's `filesystem://`, RabbitMQ and Redis (the `broker` fixture) for the publish path. Outages
(database, broker) are made with a TCP proxy in front of the real server that the test takes down and brings
back, so the errors are the ones a real outage raises.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import importlib.metadata
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from celery.utils.imports import load_extension_class_names
from helpers.polling import wait_for
from helpers.processes import REPO_DIR, TESTS_DIR, Processes
from helpers.proxy import TcpProxy, closed_port, host_port, with_port
from helpers.repository import queued_run
from helpers.services import POSTGRES_URL, RABBITMQ_URL, REDIS_URL, Broker, Database, require_service
from kombu.utils.imports import symbol_by_name

from celery_dbsched.clock import TestClock
from celery_dbsched.errors import CannotStart, DatabaseUnavailable
from celery_dbsched.protocol import RUN_TASK_NAME
from celery_dbsched.publisher import PUBLISH_TIMEOUT
from celery_dbsched.records import RunRecord
from celery_dbsched.registry import existing_registry
from celery_dbsched.scheduler import Scheduler
from celery_dbsched.transport import filesystem_broker_settings

MINUTE = dt.timedelta(minutes=1)
HOUR = dt.timedelta(hours=1)
DAY = dt.timedelta(days=1)


# --- helpers ------------------------------------------------------------------------------------------


@dataclass
class Published:
    task: str
    args: list[Any]
    queue: str


def drain(app: Celery, queue: str, expected: int, *, timeout: float = 60.0, quiet: float = 0.5) -> list[Published]:
    """Consume `expected` messages from `queue` (waiting up to `timeout`), then keep reading until the queue
    stays quiet for `quiet` seconds, so that extra messages show in the result; returns every message read."""
    found: list[Published] = []
    deadline = time.monotonic() + timeout
    with app.connection_for_read() as conn:
        simple = conn.SimpleQueue(app.amqp.queues[queue])
        try:
            while len(found) < expected and time.monotonic() < deadline:
                try:
                    message = simple.get(timeout=min(1.0, max(deadline - time.monotonic(), 0.05)))
                except simple.Empty:
                    continue
                message.ack()
                found.append(Published(message.headers["task"], list(message.payload[0]), queue))
            with contextlib.suppress(simple.Empty):
                while True:
                    message = simple.get(timeout=quiet)
                    message.ack()
                    found.append(Published(message.headers["task"], list(message.payload[0]), queue))
        finally:
            simple.close()
    return found


SchedulerFactory = Callable[..., Scheduler]


def default_queue(scheduler: Scheduler) -> str:
    return str(scheduler.app.conf.task_default_queue)


# --- construction ----------------------------------------------------------------------------------------


def test_lazy_construction_opens_nothing_and_close_twice_is_fine(
    tmp_path: Path, make_scheduler: SchedulerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # SQLite: a non-lazy scheduler creates the database's folder; a lazy one must not touch the disk.
    missing = tmp_path / "not" / "yet"
    lazy = make_scheduler(f"sqlite:///{missing / 'db.sqlite3'}", lazy=True)
    assert "db ->" in lazy.info  # the banner Celery prints from the lazy instance
    lazy.close()
    lazy.close()
    assert not (tmp_path / "not").exists()

    # PostgreSQL: a listening socket that counts connection attempts stands in for the server.
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setblocking(False)
        port = listener.getsockname()[1]
        url = f"postgresql+psycopg://postgres:hunter2@127.0.0.1:{port}/nowhere?connect_timeout=1"
        caplog.set_level(logging.DEBUG, logger="celery_dbsched")
        lazy = make_scheduler(url, lazy=True, dbsched_server_id="banner-only")
        info = lazy.info
        lazy.close()
        lazy.close()
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody connected
        assert "hunter2" not in info and "***" in info
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

    # The control: the same thing built for real does reach for the database (and survives it being down).
    eager = make_scheduler(f"sqlite:///{missing / 'db.sqlite3'}")
    assert (missing / "db.sqlite3").exists()
    eager.close()
    eager.close()


@pytest.mark.slow
def test_close_twice_after_publishing(database: Database, make_scheduler: SchedulerFactory) -> None:
    repository = database.migrated_repository()
    repository.upsert_job("a", "job a")
    scheduler = make_scheduler(database.url)
    scheduler.tick()
    assert [m.args[1] for m in drain(scheduler.app, default_queue(scheduler), 1)] == ["a"]
    scheduler.close()
    scheduler.close()


BAD_SETTINGS = [
    ("dbsched_run_jobs_interval", -1),
    ("dbsched_run_jobs_interval", "soon"),
    ("dbsched_run_jobs_limit", -5),
    ("dbsched_run_jobs_limit", "lots"),
    ("dbsched_monitor_interval", -0.5),
    ("dbsched_interrupt_threshold", "five minutes"),
    ("dbsched_interrupt_threshold", float("nan")),
    ("dbsched_retry_backoff", (60, 1)),
    ("dbsched_run_retention", -1),
    ("dbsched_auto_migrate", "maybe"),
    ("dbsched_engine_options", "pool_size=5"),
    ("dbsched_server_id", ""),
    ("dbsched_database_url", ""),
]


@pytest.mark.parametrize("lazy", [True, False], ids=["lazy", "eager"])
@pytest.mark.parametrize(("key", "value"), BAD_SETTINGS, ids=[f"{k}={v!r}" for k, v in BAD_SETTINGS])
def test_bad_settings_fail_at_construction_naming_the_key(
    tmp_path: Path, make_scheduler: SchedulerFactory, key: str, value: object, lazy: bool
) -> None:
    # Celery builds the lazy instance first (for the banner): the error comes at beat start, not first tick.
    conf = {key: value}
    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    if key == "dbsched_database_url":
        conf = {}
        url = str(value)
    with pytest.raises(CannotStart, match=f"the beat cannot start: {key}"):
        make_scheduler(url, lazy=lazy, **conf)
    assert not (tmp_path / "db.sqlite3").exists()


def test_without_auto_migrate_a_missing_schema_fails_at_start(tmp_path: Path, make_scheduler: SchedulerFactory) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    with pytest.raises(CannotStart, match="dbsched migrate"):
        make_scheduler(url, dbsched_auto_migrate=False)
    # With the default (auto-migrate on) the same start creates the schema.
    make_scheduler(url).tick()


def test_unsupported_database_fails_at_start(make_scheduler: SchedulerFactory) -> None:
    with pytest.raises(CannotStart, match="dbsched_database_url"):
        make_scheduler("mysql://root@127.0.0.1/x")


# --- tick: claiming and publishing ---------------------------------------------------------------------------


def test_each_claimed_batch_is_an_info_line_and_each_run_a_debug_line(
    database: Database, make_scheduler: SchedulerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """The audit trail (issue 11): what stock beat's "Sending due task" line gives, per batch and per run."""
    repository = database.migrated_repository()
    repository.upsert_job("audit.a", "job a")
    repository.upsert_job("audit.b", "job b", queue="elsewhere")
    scheduler = make_scheduler(database.url)
    caplog.set_level(logging.DEBUG, logger="celery_dbsched")
    scheduler.tick()
    runs = {run.job_name: run for run in repository.list_runs()}
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    [claimed] = [m for level, m in messages if level == logging.INFO and "claimed" in m]
    assert claimed in (
        "celery_dbsched: claimed 2 run(s): audit.a, audit.b",
        "celery_dbsched: claimed 2 run(s): audit.b, audit.a",
    )
    sent = sorted(m for level, m in messages if level == logging.DEBUG and m.startswith("celery_dbsched: sent "))
    assert sent == [
        f"celery_dbsched: sent {runs['audit.a'].label()}",
        f"celery_dbsched: sent {runs['audit.b'].label()} to queue elsewhere",
    ]
    assert sent[0].startswith(f"celery_dbsched: sent run {runs['audit.a'].id} of job 'audit.a'")


def test_the_per_run_debug_line_costs_nothing_when_debug_is_off(
    database: Database,
    make_scheduler: SchedulerFactory,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    repository = database.migrated_repository()
    repository.upsert_job("quiet", "job quiet")
    scheduler = make_scheduler(database.url)
    caplog.set_level(logging.INFO, logger="celery_dbsched")

    def label(run: RunRecord) -> str:
        raise AssertionError("a run's label was built for a log line that is off")

    monkeypatch.setattr(RunRecord, "label", label)
    scheduler.tick()
    assert [run.job_name for run in repository.list_runs()] == ["quiet"]
    assert "celery_dbsched: claimed 1 run(s): quiet" in caplog.messages


def test_a_run_label_names_its_id_job_and_slot_in_utc() -> None:
    slot = dt.datetime(2026, 12, 5, 9, 0, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    run = queued_run(12, "x", slot, slot, claimed_by="b")
    assert run.label() == "run 12 of job 'x' (slot 2026-12-05 08:00:00 UTC)"
    assert dataclasses.replace(run, scheduled_for=None).label() == "run 12 of job 'x'"


@pytest.mark.slow
def test_tick_publishes_one_message_per_claimed_run(database: Database, make_scheduler: SchedulerFactory) -> None:
    repository = database.migrated_repository()
    repository.upsert_job("a", "job a")
    repository.upsert_job("b", "job b")
    other = f"other-{uuid.uuid4().hex[:8]}"
    repository.upsert_job("routed", "job with a queue", queue=other)
    repository.upsert_job("later", "not due", first_run_in=HOUR)
    scheduler = make_scheduler(database.url, dbsched_server_id="beat-1")

    assert scheduler.tick() > 0
    runs = {run.job_name: run for run in repository.list_runs(status="queued")}
    assert sorted(runs) == ["a", "b", "routed"]
    assert {run.claimed_by for run in runs.values()} == {"beat-1"}

    queue = default_queue(scheduler)
    on_default = drain(scheduler.app, queue, 2)
    on_other = drain(scheduler.app, other, 1)
    assert sorted((m.task, tuple(m.args)) for m in on_default) == [
        (RUN_TASK_NAME, (runs["a"].id, "a")),
        (RUN_TASK_NAME, (runs["b"].id, "b")),
    ]
    assert [(m.task, m.args) for m in on_other] == [(RUN_TASK_NAME, [runs["routed"].id, "routed"])]

    # The active runs keep their jobs from being claimed again; nothing more is sent.
    assert scheduler.tick() > 0
    assert drain(scheduler.app, queue, 0, quiet=0.3) == []
    assert drain(scheduler.app, other, 0, quiet=0.3) == []
    assert len(repository.list_runs()) == 3


def test_tick_publishes_to_a_real_broker(
    broker: Broker, sqlite_database: Database, make_scheduler: SchedulerFactory
) -> None:
    repository = sqlite_database.migrated_repository()
    other = f"{broker.queue}-routed"
    repository.upsert_job("a", "job a")
    repository.upsert_job("routed", "job with a queue", queue=other)
    scheduler = make_scheduler(sqlite_database.url, **broker.conf())
    try:
        assert scheduler.tick() > 0
        runs = {run.job_name: run.id for run in repository.list_runs()}
        on_default = drain(scheduler.app, broker.queue, 1)
        on_other = drain(scheduler.app, other, 1)
        assert [(m.task, m.args) for m in on_default] == [(RUN_TASK_NAME, [runs["a"], "a"])]
        assert [(m.task, m.args) for m in on_other] == [(RUN_TASK_NAME, [runs["routed"], "routed"])]

        # A second claim of the same job (after its run ends) goes through the same producer.
        repository.start_run(runs["a"], "w1")
        repository.complete_run(runs["a"], dt.timedelta(0))
        assert scheduler.tick() > 0
        [again] = drain(scheduler.app, broker.queue, 1)
        assert again.args[1] == "a" and again.args[0] > runs["a"]
    finally:
        scheduler.close()
        if broker.kind != "filesystem":
            with contextlib.suppress(Exception), scheduler.app.connection_for_write() as conn:
                conn.default_channel.queue_delete(other)


@pytest.mark.slow
def test_claims_earliest_due_first(sqlite_database: Database, make_scheduler: SchedulerFactory) -> None:
    repository = sqlite_database.migrated_repository()
    for name, due_in in (("a", 30), ("b", 20), ("c", 10)):
        repository.upsert_job(name, f"job {name}", first_run_in=dt.timedelta(seconds=due_in))
    scheduler = make_scheduler(sqlite_database.url, clock=TestClock(offset=MINUTE), dbsched_run_jobs_limit=1)
    order = []
    for _ in range(3):
        assert scheduler.tick() == 0  # each tick claims a full batch of one
        [message] = drain(scheduler.app, default_queue(scheduler), 1)
        order.append(message.args[1])
    assert order == ["c", "b", "a"]


# --- tick: how long to sleep ---------------------------------------------------------------------------------


def test_tick_sleeps_the_run_jobs_interval_when_nothing_is_due(
    database: Database, make_scheduler: SchedulerFactory
) -> None:
    repository = database.migrated_repository()
    scheduler = make_scheduler(database.url, dbsched_run_jobs_interval=3)
    # An empty database, then jobs that are not due, then a due job whose run is still active: never 0.
    returns = [scheduler.tick() for _ in range(5)]
    repository.upsert_job("later", "not due", first_run_in=HOUR)
    returns += [scheduler.tick() for _ in range(5)]
    repository.upsert_job("busy", "due but its run is active")
    assert scheduler.tick() > 0  # claims it
    returns += [scheduler.tick() for _ in range(20)]
    assert all(0 < value <= 3 for value in returns), returns
    assert returns[-1] == pytest.approx(3)


@pytest.mark.slow
def test_tick_wakes_sooner_when_a_job_is_due_sooner(database: Database, make_scheduler: SchedulerFactory) -> None:
    repository = database.migrated_repository()
    repository.upsert_job("soon", "due in 2 s", first_run_in=dt.timedelta(seconds=2))
    repository.upsert_job("later", "due in an hour", first_run_in=HOUR)
    clock = TestClock()
    scheduler = make_scheduler(database.url, clock=clock, dbsched_run_jobs_interval=30, beat_max_loop_interval=300)
    first = scheduler.tick()
    assert 0 < first <= 2.0
    assert repository.list_runs() == []
    # Rather than sleep, move the scheduler's view of the database clock past the due time.
    clock.shift_to(dt.timedelta(seconds=3))
    assert 0 < scheduler.tick() <= 30
    assert [m.args[1] for m in drain(scheduler.app, default_queue(scheduler), 1)] == ["soon"]


def test_tick_is_bounded_by_the_monitor_interval_and_max_loop_interval(
    sqlite_database: Database, make_scheduler: SchedulerFactory
) -> None:
    sqlite_database.migrated_repository()
    by_monitor = make_scheduler(sqlite_database.url, dbsched_run_jobs_interval=30, dbsched_monitor_interval=2)
    assert all(0 < by_monitor.tick() <= 2 for _ in range(3))
    by_beat = make_scheduler(sqlite_database.url, dbsched_run_jobs_interval=30, beat_max_loop_interval=4)
    assert all(0 < by_beat.tick() <= 4 for _ in range(3))


@pytest.mark.slow
def test_tick_returns_zero_only_after_a_full_batch(database: Database, make_scheduler: SchedulerFactory) -> None:
    repository = database.migrated_repository()
    for n in range(5):
        repository.upsert_job(f"job-{n}", f"job {n}")
    scheduler = make_scheduler(database.url, dbsched_run_jobs_limit=2, dbsched_run_jobs_interval=3)
    returns = [scheduler.tick() for _ in range(4)]
    assert returns[:2] == [0.0, 0.0]  # 2 + 2 claimed: more may be due, claim again at once
    assert all(0 < value <= 3 for value in returns[2:])  # 1 claimed (< limit), then nothing due
    messages = drain(scheduler.app, default_queue(scheduler), 5)
    assert sorted(m.args[1] for m in messages) == [f"job-{n}" for n in range(5)]
    assert len({m.args[0] for m in messages}) == 5


# --- the monitor pass ----------------------------------------------------------------------------------------


def test_monitor_interrupts_stalled_runs(
    database: Database, make_scheduler: SchedulerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    repository = database.migrated_repository()
    repository.upsert_job("stalled-running", "x", interrupt_threshold=dt.timedelta(seconds=60))
    repository.upsert_job("stalled-queued", "x", interrupt_threshold=dt.timedelta(seconds=60))
    repository.upsert_job("fresh", "x")  # the global threshold: 10 minutes here
    runs = {run.job_name: run for run in repository.claim_runs("another-beat", 10).runs}
    repository.start_run(runs["stalled-running"].id, "w1")
    repository.start_run(runs["fresh"].id, "w1")

    caplog.set_level(logging.WARNING, logger="celery_dbsched")
    two_minutes_on = TestClock(offset=dt.timedelta(seconds=120))  # two minutes without progress
    scheduler = make_scheduler(
        database.url, clock=two_minutes_on, dbsched_interrupt_threshold=600, dbsched_run_jobs_interval=1
    )
    assert scheduler.tick() > 0

    after = {name: repository.lookup_run(run.id) for name, run in runs.items()}
    assert after["stalled-running"].status == "interrupted"
    assert after["stalled-running"].error == "stalled: no progress within the interrupt threshold"
    assert after["stalled-queued"].status == "interrupted"
    assert after["stalled-queued"].error == "stalled: no worker started it within the interrupt threshold"
    assert after["fresh"].status == "running"
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert f"{runs['stalled-running'].label()} interrupted" in logged


@pytest.mark.slow
def test_monitor_prunes_history_past_retention(database: Database, make_scheduler: SchedulerFactory) -> None:
    repository = database.migrated_repository()
    for name in ("done", "failed", "active"):
        repository.upsert_job(name, "x")
    runs = {run.job_name: run for run in repository.claim_runs("another-beat", 10).runs}
    for name in ("done", "failed", "active"):
        repository.start_run(runs[name].id, "w1")
    repository.complete_run(runs["done"].id, HOUR)
    repository.fail_run(runs["failed"].id, "boom")

    def kept() -> set[str]:
        # By id and creation time: SQLite hands a pruned run's id out again once no newer run holds it.
        present = {(run.id, run.create_time) for run in repository.list_runs()}
        return {name for name, run in runs.items() if (run.id, run.create_time) in present}

    # Six days on, with the default retention of 7 days: kept.
    keeps = make_scheduler(database.url, clock=TestClock(offset=DAY * 6), dbsched_interrupt_threshold=DAY * 30)
    keeps.tick()
    assert kept() == {"done", "failed", "active"}

    # Eight days on: the two finished runs go, the active one stays.
    prunes = make_scheduler(database.url, clock=TestClock(offset=DAY * 8), dbsched_interrupt_threshold=DAY * 30)
    prunes.tick()
    assert kept() == {"active"}

    # A shorter retention setting is honoured.
    repository.complete_run(runs["active"].id, HOUR)
    short = make_scheduler(
        database.url,
        clock=TestClock(offset=DAY * 2),
        dbsched_run_retention=DAY,
        dbsched_interrupt_threshold=DAY * 30,
    )
    short.tick()
    assert kept() == set()


# --- failures: publishing, the database ---------------------------------------------------------------------


@pytest.mark.slow
def test_publish_failure_fails_the_run_and_the_beat_keeps_going(
    database: Database, make_scheduler: SchedulerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    repository = database.migrated_repository()
    repository.upsert_job("a", "job a")
    repository.upsert_job("b", "job b")
    scheduler = make_scheduler(database.url)

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("broker said no")

    monkeypatch.setattr(scheduler.producer, "publish", refuse)
    assert scheduler.tick() > 0
    failed = repository.list_runs()
    assert sorted(run.job_name for run in failed) == ["a", "b"]
    assert {run.status for run in failed} == {"failed"}
    assert all("not published" in (run.error or "") and "broker said no" in (run.error or "") for run in failed)

    monkeypatch.undo()
    for name in ("a", "b"):
        repository.update_job_next_run_in_at_least(name, dt.timedelta(0))
    assert scheduler.tick() > 0
    messages = drain(scheduler.app, default_queue(scheduler), 2)
    assert sorted(m.args[1] for m in messages) == ["a", "b"]
    assert {run.status for run in repository.list_runs(status="queued")} == {"queued"}


@pytest.mark.slow
def test_a_broker_outage_is_logged_once_not_once_per_tick(
    sqlite_database: Database,
    make_scheduler: SchedulerFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue 4, scenario 6: while the broker is down every due run fails the same way; the beat says so once
    (it used to log an ERROR line per tick), and says when publishing works again."""
    repository = sqlite_database.migrated_repository()
    repository.upsert_job("a", "job a")
    repository.upsert_job("b", "job b")
    scheduler = make_scheduler(sqlite_database.url)
    caplog.set_level(logging.DEBUG, logger="celery_dbsched")

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("broker said no")

    monkeypatch.setattr(scheduler.producer, "publish", refuse)
    for _ in range(4):
        for name in ("a", "b"):
            repository.update_job_next_run_in_at_least(name, dt.timedelta(0))
        assert scheduler.tick() > 0
    assert len(repository.list_runs(status="failed")) == 8
    loud = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(loud) == 1 and "broker said no" in loud[0], loud
    assert not any(r.exc_info for r in caplog.records)

    monkeypatch.undo()
    caplog.clear()
    repository.update_job_next_run_in_at_least("a", dt.timedelta(0))
    assert scheduler.tick() > 0
    [back] = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "publishing works again" in back and "8 run(s) were not published" in back
    assert [m.args[1] for m in drain(scheduler.app, default_queue(scheduler), 1)] == ["a"]


def test_the_beats_publishing_connection_has_the_publish_timeouts(
    sqlite_database: Database, make_scheduler: SchedulerFactory
) -> None:
    """Issue 15, item 1: a publish to a silent broker fails within PUBLISH_TIMEOUT; the user's options win."""
    scheduler = make_scheduler(
        sqlite_database.url, broker_url="redis://127.0.0.1:1/0", broker_transport_options={"visibility_timeout": 9}
    )
    assert scheduler.connection.transport_options == {"visibility_timeout": 9, "socket_timeout": PUBLISH_TIMEOUT}
    mine = make_scheduler(
        sqlite_database.url, broker_url="redis://127.0.0.1:1/0", broker_transport_options={"socket_timeout": 1}
    )
    assert mine.connection.transport_options == {"socket_timeout": 1}


@pytest.mark.parametrize(
    "kind", [pytest.param("rabbitmq", marks=pytest.mark.rabbitmq), pytest.param("redis", marks=pytest.mark.redis)]
)
def test_broker_outage_fails_runs_then_publishing_resumes(
    kind: str, sqlite_database: Database, make_scheduler: SchedulerFactory
) -> None:
    require_service(kind)
    real_url = RABBITMQ_URL if kind == "rabbitmq" else REDIS_URL
    proxy = TcpProxy(host_port(real_url, 5672 if kind == "rabbitmq" else 6379))
    queue = f"dbsched-test-{uuid.uuid4().hex[:12]}"
    proxied = with_port(real_url, proxy.port)
    repository = sqlite_database.migrated_repository()
    for name in ("a", "b"):
        repository.upsert_job(name, f"job {name}")
    scheduler = make_scheduler(
        sqlite_database.url,
        broker_url=proxied,
        task_default_queue=queue,
        broker_connection_timeout=2,
        broker_connection_max_retries=1,
        task_publish_retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0.1, "interval_max": 0.1},
        redis_socket_connect_timeout=2,
        redis_socket_timeout=2,
    )
    direct = Celery("reader", set_as_current=False)
    direct.conf.update(broker_url=real_url, task_default_queue=queue)
    try:
        assert scheduler.tick() > 0
        assert sorted(m.args[1] for m in drain(direct, queue, 2)) == ["a", "b"]
        first = {run.job_name: run.id for run in repository.list_runs()}
        for name in ("a", "b"):
            repository.start_run(first[name], "w1")
            repository.complete_run(first[name], dt.timedelta(0))

        proxy.down()
        started = time.monotonic()
        assert scheduler.tick() > 0  # no exception, and not stuck retrying for long
        assert time.monotonic() - started < 60
        failed = repository.list_runs(status="failed")
        assert sorted(run.job_name for run in failed) == ["a", "b"]
        assert all((run.error or "").startswith("not published") for run in failed)

        proxy.up()
        for name in ("a", "b"):
            repository.update_job_next_run_in_at_least(name, dt.timedelta(0))
        deadline = time.monotonic() + 60
        while len(repository.list_runs(status="queued")) < 2 and time.monotonic() < deadline:
            # The first publish after the outage may still meet the cut connection: that run fails and its
            # job is retried; what matters is that the beat recovers without a restart.
            assert scheduler.tick() >= 0
            for run in repository.list_runs(status="failed"):
                if run.id not in {r.id for r in failed}:
                    repository.update_job_next_run_in_at_least(run.job_name, dt.timedelta(0))
        queued = repository.list_runs(status="queued")
        assert sorted(run.job_name for run in queued) == ["a", "b"]
        messages = drain(direct, queue, 2)
        assert sorted((m.args[1], m.args[0]) for m in messages) == sorted((r.job_name, r.id) for r in queued)
    finally:
        scheduler.close()
        proxy.close()
        with contextlib.suppress(Exception), direct.connection_for_write() as conn:
            conn.default_channel.queue_delete(queue)


@pytest.mark.slow
def test_unreachable_broker_fails_the_runs_without_raising(
    sqlite_database: Database, make_scheduler: SchedulerFactory
) -> None:
    repository = sqlite_database.migrated_repository()
    repository.upsert_job("a", "job a")
    scheduler = make_scheduler(
        sqlite_database.url,
        broker_url=f"amqp://guest:guest@127.0.0.1:{closed_port()}//",
        broker_connection_timeout=1,
        broker_connection_max_retries=1,
    )
    assert scheduler.tick() > 0
    [run] = repository.list_runs()
    assert run.status == "failed" and "not published" in (run.error or "")
    assert "refused" in (run.error or "").lower()
    assert scheduler.tick() > 0  # and the next tick is an ordinary one


def _proxied_postgres(database: Database, proxy: TcpProxy) -> str:
    return with_port(database.url, proxy.port)


@pytest.mark.postgres
def test_database_outage_backs_off_and_logs_once(
    postgres_database: Database, make_scheduler: SchedulerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    repository = postgres_database.migrated_repository()
    proxy = TcpProxy(host_port(POSTGRES_URL, 5432))
    try:
        caplog.set_level(logging.DEBUG, logger="celery_dbsched")
        scheduler = make_scheduler(
            _proxied_postgres(postgres_database, proxy), dbsched_run_jobs_interval=3, dbsched_listen=False
        )
        assert scheduler.tick() == pytest.approx(3)

        proxy.down()
        caplog.clear()
        backoffs = [scheduler.tick() for _ in range(8)]
        assert all(value > 0 for value in backoffs), backoffs
        assert backoffs == sorted(backoffs) and max(backoffs) <= 3
        errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(errors) == 1, [r.getMessage() for r in errors]
        assert "database unavailable" in errors[0].getMessage()
        assert not any(r.exc_info for r in caplog.records)

        # Jobs registered meanwhile are claimed once the database is back.
        repository.upsert_job("a", "job a")
        proxy.up()
        caplog.clear()
        assert 0 < scheduler.tick() <= 3
        assert any("database back" in r.getMessage() for r in caplog.records)
        assert [m.args[1] for m in drain(scheduler.app, default_queue(scheduler), 1)] == ["a"]
    finally:
        proxy.close()


@pytest.mark.postgres
def test_database_down_at_start_is_waited_for(
    postgres_database: Database, make_scheduler: SchedulerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = TcpProxy(host_port(POSTGRES_URL, 5432))
    proxy.down()
    try:
        caplog.set_level(logging.DEBUG, logger="celery_dbsched")
        scheduler = make_scheduler(_proxied_postgres(postgres_database, proxy), dbsched_run_jobs_interval=2)
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]  # said so, once
        assert all(0 < scheduler.tick() <= 2 for _ in range(4))
        assert not any(r.exc_info for r in caplog.records)
        # Back: the scheduler migrates the fresh schema itself and dispatches.
        proxy.up()
        assert scheduler.tick() > 0
        repository = postgres_database.repository()
        repository.upsert_job("a", "job a")
        assert scheduler.tick() > 0
        assert [m.args[1] for m in drain(scheduler.app, default_queue(scheduler), 1)] == ["a"]
    finally:
        proxy.close()


def test_database_down_is_a_typed_error_not_a_crash(tmp_path: Path, make_scheduler: SchedulerFactory) -> None:
    # Without PostgreSQL: a port nobody listens on. The scheduler starts, ticks back off, nothing raises.
    url = f"postgresql+psycopg://postgres@127.0.0.1:{closed_port()}/x?connect_timeout=2"
    scheduler = make_scheduler(url, dbsched_run_jobs_interval=2)
    assert all(0 < scheduler.tick() <= 2 for _ in range(3))
    with pytest.raises(DatabaseUnavailable):
        scheduler.repository.ping()


# --- start -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_start_ends_the_runs_this_server_id_left_queued(database: Database, make_scheduler: SchedulerFactory) -> None:
    repository = database.migrated_repository()
    repository.upsert_job("mine", "job mine")
    [mine] = repository.claim_runs("beat-1", 10).runs
    repository.upsert_job("theirs", "job theirs")
    [theirs] = repository.claim_runs("beat-2", 10).runs

    # A lazy instance (the banner) must not do it; the real start does.
    make_scheduler(database.url, lazy=True, dbsched_server_id="beat-1")
    assert repository.lookup_run(mine.id).status == "queued"
    scheduler = make_scheduler(database.url, dbsched_server_id="beat-1")
    ended = repository.lookup_run(mine.id)
    assert ended.status == "interrupted"
    assert ended.error == "restart: left behind by beat-1"
    assert repository.lookup_run(theirs.id).status == "queued"

    # Its job is due again at once: the first tick dispatches a new run.
    assert scheduler.tick() > 0
    [message] = drain(scheduler.app, default_queue(scheduler), 1)
    assert message.args[1] == "mine" and message.args[0] != mine.id


# --- the beat knows no job code ------------------------------------------------------------------------------


@pytest.mark.processes  # a fresh interpreter
def test_scheduler_module_imports_no_job_code() -> None:
    code = "import sys, celery_dbsched.scheduler\nprint('\\n'.join(sorted(sys.modules)))\n"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_DIR), str(TESTS_DIR)])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    modules = set(out.split())
    assert "celery_dbsched.scheduler" in modules
    assert not {m for m in modules if m.split(".")[0] in {"example_proj", "cli_app", "conftest", "helpers"}}


@pytest.mark.slow
def test_beat_for_an_app_without_jobs_dispatches_the_jobs_in_the_database(
    database: Database, make_scheduler: SchedulerFactory
) -> None:
    repository = database.migrated_repository()
    repository.upsert_job("only.in.the.database", "its code lives on the workers")
    scheduler = make_scheduler(database.url)
    assert scheduler.tick() > 0
    [message] = drain(scheduler.app, default_queue(scheduler), 1)
    assert message.args[1] == "only.in.the.database"
    # The beat installed nothing of the worker side on its app: no registry, no wrapper task.
    assert existing_registry(scheduler.app) is None
    assert RUN_TASK_NAME not in scheduler.app.tasks


def test_entry_point_resolves_to_the_scheduler() -> None:
    points = {ep.name: ep for ep in importlib.metadata.entry_points(group="celery.beat_schedulers")}
    assert points["dbsched"].load() is Scheduler
    # Exactly the lookup `celery beat -S dbsched` does.
    aliases = dict(load_extension_class_names("celery.beat_schedulers"))
    assert symbol_by_name("dbsched", aliases=aliases) is Scheduler
    assert symbol_by_name("celery_dbsched.Scheduler") is Scheduler


# --- a real `celery beat` ------------------------------------------------------------------------------------


def _app_env(database_url: str, broker_dir: Path, queue: str, **settings: Any) -> dict[str, str]:
    """The environment tests/cli_app.py reads (processes add PYTHONPATH)."""
    env = {
        "DBSCHED_TEST_APP_DB": database_url,
        "DBSCHED_TEST_APP_BROKER_DIR": str(broker_dir),
        "DBSCHED_TEST_APP_QUEUE": queue,
    }
    if settings:
        env["DBSCHED_TEST_APP_SETTINGS"] = json.dumps(settings)
    return env


def _reader(broker_dir: Path, queue: str) -> Celery:
    reader = Celery("reader", set_as_current=False)
    reader.conf.update(filesystem_broker_settings(broker_dir), task_default_queue=queue)
    return reader


@pytest.mark.e2e
def test_celery_beat_process_dispatches(sqlite_database: Database, tmp_path: Path, processes: Processes) -> None:
    repository = sqlite_database.migrated_repository()
    repository.upsert_job("first", "job one")
    repository.upsert_job("second", "job two", queue="routed")
    queue = f"q-{uuid.uuid4().hex[:8]}"
    broker_dir = tmp_path / "broker"
    beat = processes.start_beat("cli_app", env=_app_env(sqlite_database.url, broker_dir, queue), scheduler="dbsched")
    reader = _reader(broker_dir, queue)
    on_default = drain(reader, queue, 1, timeout=120)
    on_routed = drain(reader, "routed", 1, timeout=30)
    processes.check_alive(beat)
    code = beat.stop()
    output = beat.log()
    runs = {run.job_name: run for run in repository.list_runs()}
    assert [(m.task, m.args) for m in on_default] == [(RUN_TASK_NAME, [runs["first"].id, "first"])], output
    assert [(m.task, m.args) for m in on_routed] == [(RUN_TASK_NAME, [runs["second"].id, "second"])], output
    assert runs["first"].claimed_by.endswith(f":{beat.pid}")
    assert "celery_dbsched.scheduler.Scheduler" in output and "db -> sqlite:///" in output
    assert "Traceback" not in output, output
    assert code == 0, output


@pytest.mark.e2e
def test_celery_beat_with_bad_settings_exits_naming_the_key(
    sqlite_database: Database,
    tmp_path: Path,
    processes: Processes,
) -> None:
    env = _app_env(sqlite_database.url, tmp_path / "broker", "q", dbsched_run_jobs_interval=-1)
    beat = processes.start_beat("cli_app", env=env, scheduler="dbsched")
    wait_for(lambda: not beat.alive(), timeout=120, message="beat to exit")
    assert beat.returncode != 0
    assert "dbsched_run_jobs_interval: must not be negative" in beat.log()
    assert not Path(sqlite_database.url.removeprefix("sqlite:///")).exists()


@pytest.mark.e2e
@pytest.mark.postgres
def test_run_now_wakes_a_sleeping_beat(postgres_database: Database, tmp_path: Path, processes: Processes) -> None:
    repository = postgres_database.migrated_repository()
    repository.upsert_job("later", "due in an hour", first_run_in=HOUR)
    queue = f"q-{uuid.uuid4().hex[:8]}"
    broker_dir = tmp_path / "broker"
    env = _app_env(
        postgres_database.url, broker_dir, queue, dbsched_run_jobs_interval=120, dbsched_monitor_interval=120
    )
    beat = processes.start_beat("cli_app", env=env, scheduler="dbsched", loglevel="DEBUG")
    beat.wait_for_log("sleeping up to 1", timeout=120)  # it has ticked and sleeps up to two minutes, on LISTEN
    woken = time.monotonic()
    repository.update_job_next_run_in_at_least("later", dt.timedelta(0), run_now=True)
    messages = drain(_reader(broker_dir, queue), queue, 1, timeout=20, quiet=0.1)
    assert [m.args[1] for m in messages] == ["later"]
    assert time.monotonic() - woken < 10  # not the two minutes of its interval


@pytest.mark.postgres
def test_on_postgres_tick_sleeps_on_listen_and_a_notify_ends_it(
    postgres_database: Database, make_scheduler: SchedulerFactory
) -> None:
    scheduler = make_scheduler(postgres_database.url, dbsched_run_jobs_interval=5, dbsched_listen=True)
    repository = postgres_database.migrated_repository()
    repository.upsert_job("later", "due in an hour", first_run_in=HOUR)
    began = time.monotonic()
    assert scheduler.tick() == pytest.approx(0.01)  # it slept the interval itself, on LISTEN
    assert time.monotonic() - began >= 4.5

    done: list[float] = []
    thread = threading.Thread(target=lambda: done.append(scheduler.tick()))
    thread.start()
    wait_for(lambda: scheduler._wakeup is not None and scheduler._wakeup._connection is not None, 10)
    # Listening from here on: a NOTIFY that comes before the wait is queued on the connection and ends it too.
    notified = time.monotonic()
    repository.update_job_next_run_in_at_least("later", dt.timedelta(0), run_now=True)
    thread.join(10)
    assert done and time.monotonic() - notified < 1.0  # woken, not after the 5 s interval


def test_on_sqlite_tick_returns_the_sleep_for_celery(
    sqlite_database: Database, make_scheduler: SchedulerFactory
) -> None:
    scheduler = make_scheduler(sqlite_database.url, dbsched_run_jobs_interval=3, dbsched_listen=True)
    sqlite_database.migrated_repository().upsert_job("later", "due in an hour", first_run_in=HOUR)
    began = time.monotonic()
    assert scheduler.tick() == pytest.approx(3, abs=0.1)
    assert time.monotonic() - began < 2  # nothing to listen on: Celery's loop sleeps


@pytest.mark.mariadb
def test_on_mariadb_a_beat_polls_at_its_interval_and_honours_run_now_at_the_next_tick(
    mariadb_database: Database, make_scheduler: SchedulerFactory
) -> None:
    """MariaDB has no LISTEN/NOTIFY: the beat asks Celery to wake it within its run-jobs interval (not an hour
    later, when the job is due), and a `run_now` made meanwhile is claimed at that next tick."""
    scheduler = make_scheduler(mariadb_database.url, dbsched_run_jobs_interval=3, dbsched_listen=True)
    repository = mariadb_database.migrated_repository()
    repository.upsert_job("later", "due in an hour", first_run_in=HOUR)
    began = time.monotonic()
    assert scheduler.tick() == pytest.approx(3, abs=0.1)
    assert time.monotonic() - began < 2  # nothing to listen on: Celery's loop sleeps the interval
    assert repository.list_runs() == []

    repository.update_job_next_run_in_at_least("later", dt.timedelta(0), run_now=True)
    scheduler.tick()
    assert [(run.job_name, run.status) for run in repository.list_runs()] == [("later", "queued")]
    assert [m.args[1] for m in drain(scheduler.app, default_queue(scheduler), 1)] == ["later"]
