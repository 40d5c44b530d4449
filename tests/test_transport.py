"""Tests for celery_dbsched.transport, the multi-process-safe ``filesystem://`` transport.

Measured on the dev machine (Linux, ext4, kombu 5.7) with run_load() below: 4 producers x 500
messages of ~2 KB, 4 consumers, one shared folder, 10 runs each (about 2 s a run):
- stock ``filesystem://``: 6 of 10 runs failed; 13 of 20,000 messages lost, each one a consumer
  JSONDecodeError on a still-empty .msg file. No duplicates. With the consumers' temp dir on
  another filesystem (TMPDIR=/dev/shm, tmpfs), 5 of 5 runs failed, 27 of 10,000 lost, and the
  consumers that lost the copy race left stray .msg copies in the temp dir (still no duplicates:
  the losing copy's unlink of the source fails, so it skips the message).
- stock, 16 processes binding distinct queues to one exchange at once, 30 rounds: 173
  JSONDecodeErrors and 259 of 480 bindings lost from the control table.
- this transport: no errors, duplicates, losses or lost bindings in any run.
The stock failures are random, so they are reported here and not asserted.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import queue as std_queue
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from kombu import Connection, Consumer, Exchange, Producer, Queue
from kombu.message import Message

from celery_dbsched import transport as fs_transport
from celery_dbsched.transport import FilesystemTransport, filesystem_broker_settings

LOAD_QUEUE = "load"
PAD = "x" * 2000


def _reader_sees(folder: Path, queue: str) -> list[str]:
    # The exact filter kombu's reader, _size and _purge apply to a folder listing.
    return [n for n in os.listdir(folder) if n.partition(".")[2] == f"{queue}.msg"]


def _connection(settings: dict[str, Any], *, stock: bool = False, **options: Any) -> Connection:
    transport_options = {**settings["broker_transport_options"], **options}
    transport = None if stock else settings["broker_transport"]
    return Connection(settings["broker_url"], transport=transport, transport_options=transport_options)


# --- unit tests ---------------------------------------------------------------------------------


def test_put_never_exposes_a_partial_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = filesystem_broker_settings(tmp_path)
    folder = tmp_path / "queue"
    seen_during_write: list[list[str]] = []
    real_fdopen = os.fdopen

    class SpyFile:
        def __init__(self, f: Any) -> None:
            self._f = f

        def __enter__(self) -> SpyFile:
            return self

        def __exit__(self, *exc: object) -> None:
            self._f.close()

        def write(self, data: bytes) -> int:
            # Half the payload is on disk: a reader must not be able to see this file yet.
            n: int = self._f.write(data[: len(data) // 2])
            self._f.flush()
            seen_during_write.append(_reader_sees(folder, "q"))
            return n + int(self._f.write(data[len(data) // 2 :]))

        def flush(self) -> None:
            self._f.flush()

    def spy_fdopen(fd: int, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        f = real_fdopen(fd, mode, *args, **kwargs)
        return SpyFile(f) if mode == "wb" else f

    monkeypatch.setattr(fs_transport.os, "fdopen", spy_fdopen)
    with _connection(settings) as conn:
        channel = conn.default_channel
        channel._put("q", {"body": "hello"})
        assert seen_during_write == [[]]
        # After the rename the complete message is visible under kombu's name scheme.
        (name,) = _reader_sees(folder, "q")
        assert name.endswith(".q.msg")
        assert json.loads((folder / name).read_text()) == {"body": "hello"}
        assert os.listdir(folder) == [name]  # no temp file left behind
        assert channel._get("q") == {"body": "hello"}
        assert os.listdir(folder) == []


def test_put_failure_cleans_up_and_raises_channel_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kombu.exceptions import ChannelError

    settings = filesystem_broker_settings(tmp_path)

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk on fire")

    with _connection(settings) as conn:
        channel = conn.default_channel
        monkeypatch.setattr(fs_transport.os, "replace", broken_replace)
        with pytest.raises(ChannelError):
            channel._put("q", {"body": "hello"})
        assert os.listdir(tmp_path / "queue") == []


def test_get_claims_in_order_and_skips_lost_races(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = filesystem_broker_settings(tmp_path)
    with _connection(settings) as conn:
        channel = conn.default_channel
        for i in range(3):
            channel._put("q", {"i": i})
            time.sleep(0.002)  # distinct millisecond prefixes so the order is defined
        channel._put("other", {"i": "other"})
        # Another consumer claims the oldest message between our listdir and our rename.
        real_rename = os.rename
        names = sorted(_reader_sees(tmp_path / "queue", "q"))

        def racing_rename(src: str, dst: str) -> None:
            if os.path.basename(src) == names[0]:
                os.remove(src)
            real_rename(src, dst)

        with monkeypatch.context() as m:
            m.setattr(fs_transport.os, "rename", racing_rename)
            assert channel._get("q") == {"i": 1}
        assert channel._get("q") == {"i": 2}
        with pytest.raises(std_queue.Empty):
            channel._get("q")
        assert channel._size("other") == 1
        assert channel._get("other") == {"i": "other"}


def test_store_processed_moves_consumed_messages(tmp_path: Path) -> None:
    settings = filesystem_broker_settings(tmp_path)
    with _connection(settings, store_processed=True) as conn:
        channel = conn.default_channel
        channel._put("q", {"i": 1})
        (name,) = _reader_sees(tmp_path / "queue", "q")
        assert channel._get("q") == {"i": 1}
        assert os.listdir(tmp_path / "processed") == [name]
        assert os.listdir(tmp_path / "queue") == []


def test_corrupt_file_is_set_aside_not_fatal(tmp_path: Path) -> None:
    settings = filesystem_broker_settings(tmp_path)
    with _connection(settings) as conn:
        channel = conn.default_channel
        (tmp_path / "queue" / "0_bad.q.msg").write_bytes(b"")  # what stock kombu can leave
        channel._put("q", {"i": 1})
        assert channel._get("q") == {"i": 1}
        assert os.listdir(tmp_path / "queue") == [".0_bad.q.msg.corrupt"]


def test_folders_are_created(tmp_path: Path) -> None:
    settings = filesystem_broker_settings(tmp_path / "deep" / "er")
    with _connection(settings, store_processed=True) as conn:
        conn.default_channel  # noqa: B018 - creating the channel is the action under test
    root = tmp_path / "deep" / "er"
    assert sorted(p.name for p in root.iterdir()) == ["control", "processed", "queue"]


def test_settings_select_this_transport_in_celery(tmp_path: Path) -> None:
    settings = filesystem_broker_settings(tmp_path)
    assert settings["broker_url"] == "filesystem://"
    assert settings["broker_transport_options"] == {
        "data_folder_in": str(tmp_path / "queue"),
        "data_folder_out": str(tmp_path / "queue"),
        "processed_folder": str(tmp_path / "processed"),
        "control_folder": str(tmp_path / "control"),
        "polling_interval": 0.1,
    }
    app = Celery("t", set_as_current=False)
    app.conf.update(settings)
    for conn in (app.connection_for_write(), app.connection_for_read()):
        with conn:
            assert isinstance(conn.transport, FilesystemTransport)
            assert isinstance(conn.default_channel, fs_transport.Channel)


def test_round_trip_through_exchange_and_bindings(tmp_path: Path) -> None:
    settings = filesystem_broker_settings(tmp_path)
    q = Queue("rt", Exchange("rt-ex", "direct"), routing_key="rt")
    fan = Exchange("rt-fan", "fanout")
    fq1, fq2 = Queue("f1", fan), Queue("f2", fan)
    got: list[Any] = []

    def on_message(body: Any, message: Message) -> None:
        got.append(body)
        message.ack()

    with _connection(settings, polling_interval=0.01) as conn:
        producer = Producer(conn)
        producer.publish({"n": 1}, exchange=q.exchange, routing_key="rt", declare=[q])
        producer.publish({"n": 2}, exchange=fan, declare=[fq1, fq2])
        with Consumer(conn, [q, fq1, fq2], callbacks=[on_message]):
            deadline = time.monotonic() + 10
            while len(got) < 3 and time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    conn.drain_events(timeout=0.2)
        # queue_delete drops the binding from the shared table without corrupting it.
        conn.default_channel.queue_delete("f2")
        assert conn.default_channel.get_table("rt-fan") == [("", "", "f1")]
    assert sorted(json.dumps(b, sort_keys=True) for b in got) == [
        '{"n": 1}',
        '{"n": 2}',
        '{"n": 2}',
    ]


def _bind(settings: dict[str, Any], barrier: Any, errors: Any, i: int) -> None:
    with _connection(settings) as conn:
        channel = conn.default_channel
        barrier.wait(timeout=30)
        try:
            Queue(f"q{i}", Exchange("shared", "direct"), routing_key=f"q{i}")(channel).declare()
        except Exception as exc:
            errors.put(repr(exc))


@pytest.mark.processes  # multiprocessing
@pytest.mark.timeout(60)
def test_concurrent_bindings_are_all_kept(tmp_path: Path) -> None:
    # Like a fleet of workers starting at once, each binding its own pidbox queue.
    settings = filesystem_broker_settings(tmp_path)
    ctx = multiprocessing.get_context("fork")
    barrier, errors = ctx.Barrier(16), ctx.Queue()
    procs = [ctx.Process(target=_bind, args=(settings, barrier, errors, i)) for i in range(16)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0
    assert errors.empty()
    with _connection(settings) as conn:
        table = conn.default_channel.get_table("shared")
    assert sorted(b.queue for b in table) == sorted(f"q{i}" for i in range(16))


# --- load test with real processes --------------------------------------------------------------


def _produce(settings: dict[str, Any], stock: bool, producer_id: int, count: int, errors: Any) -> None:
    q = Queue(LOAD_QUEUE, Exchange(LOAD_QUEUE, "direct"), routing_key=LOAD_QUEUE)
    sent = 0
    with _connection(settings, stock=stock) as conn:
        producer = Producer(conn)
        while sent < count:
            try:
                producer.publish(
                    {"p": producer_id, "i": sent, "pad": PAD},
                    exchange=q.exchange,
                    routing_key=LOAD_QUEUE,
                    declare=[q],
                    serializer="json",
                )
            except Exception as exc:  # stock kombu may fail to declare under contention
                errors.put(f"producer {producer_id}: {exc!r}")
                time.sleep(0.01)
                continue
            sent += 1


def _consume(settings: dict[str, Any], stock: bool, stop: Any, results: Any, errors: Any) -> None:
    q = Queue(LOAD_QUEUE, Exchange(LOAD_QUEUE, "direct"), routing_key=LOAD_QUEUE)
    received: list[tuple[int, int]] = []

    def on_message(body: Any, message: Message) -> None:
        if body.get("pad") != PAD:
            errors.put(f"truncated body {body!r:.80}")
        received.append((body["p"], body["i"]))
        message.ack()

    with _connection(settings, stock=stock, polling_interval=0.005) as conn:
        while True:
            try:
                with Consumer(conn, [q], callbacks=[on_message], accept=["json"]):
                    while True:
                        try:
                            conn.drain_events(timeout=0.1)
                        except TimeoutError:
                            if stop.is_set():
                                results.put(received)
                                return
            except Exception as exc:  # stock kombu: e.g. JSONDecodeError on an empty .msg file
                errors.put(f"consumer: {exc!r}")


@dataclass
class LoadResult:
    expected: int
    received: Counter[tuple[int, int]] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def duplicates(self) -> int:
        return sum(n - 1 for n in self.received.values() if n > 1)

    @property
    def lost(self) -> int:
        return self.expected - len(self.received)


def run_load(
    folder: Path,
    *,
    stock: bool = False,
    producers: int = 4,
    consumers: int = 4,
    per_producer: int = 500,
    deadline_s: float = 60.0,
) -> LoadResult:
    """Run producers and consumers as separate processes on one folder and tally deliveries."""
    settings = filesystem_broker_settings(folder)
    if stock:  # stock kombu needs its folders made beforehand
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context("fork")
    stop, results, errors = ctx.Event(), ctx.Queue(), ctx.Queue()
    result = LoadResult(expected=producers * per_producer)
    deadline = time.monotonic() + deadline_s
    started = time.monotonic()
    consumer_procs = [
        ctx.Process(target=_consume, args=(settings, stock, stop, results, errors), daemon=True)
        for _ in range(consumers)
    ]
    producer_procs = [
        ctx.Process(target=_produce, args=(settings, stock, p, per_producer, errors), daemon=True)
        for p in range(producers)
    ]
    for proc in consumer_procs + producer_procs:
        proc.start()
    try:
        for proc in producer_procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        # Every message is either still a visible .msg file or claimed by a consumer that will
        # deliver it before noticing `stop`, so an empty listing means all have been handed out.
        while _reader_sees(folder / "queue", LOAD_QUEUE) and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        for _ in consumer_procs:
            batch = results.get(timeout=max(0.1, deadline - time.monotonic()))
            result.received.update(batch)
        for proc in consumer_procs:
            proc.join(max(0.1, deadline - time.monotonic()))
    finally:
        for proc in consumer_procs + producer_procs:
            if proc.is_alive():
                proc.kill()
        while True:
            try:
                result.errors.append(errors.get(timeout=0.2))
            except std_queue.Empty:
                break
    result.seconds = time.monotonic() - started
    return result


@pytest.mark.processes  # multiprocessing
@pytest.mark.timeout(90)
def test_load_every_message_exactly_once(tmp_path: Path) -> None:
    result = run_load(tmp_path)
    assert result.errors == []
    assert result.duplicates == 0
    assert result.lost == 0
    assert len(result.received) == result.expected == 2000
    assert os.listdir(tmp_path / "queue") == []  # no stranded temp or claimed files
