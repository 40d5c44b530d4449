"""A TCP proxy that stands in for a server going down and coming back, or going silent (`TcpProxy`), and URL
helpers to point a client at it or at a port nobody listens on."""

from __future__ import annotations

import contextlib
import datetime
import socket
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit


class TcpProxy:
    """127.0.0.1:<port> forwarded to a real server. `down()` closes the port and cuts every open connection,
    as a crashed server does; `up()` listens on the same port again. `accepted` counts the connections it
    took; with a `target` nobody listens on, it closes each at once (a server that is down, tries counted).

    `blackhole()` stands in for a network that drops every packet: connections stay open, the port still accepts
    new ones, but no byte is forwarded either way. What is sent meanwhile is dropped (as by the network: the
    server never sees a query sent into the black hole, the client never sees an answer sent back), and a side
    that closes its end is told to the other only after `restore()`, which forwards again.

    `blackhole_on(pattern)` starts the black hole at an exact point of a conversation instead: when the bytes
    sent one way on one connection contain `pattern` (e.g. the SQL text of a statement), optionally followed by
    `then` later on that connection (the COMMIT of the transaction it is in)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.port = 0
        self.accepted = 0
        self.dropped = 0  # bytes dropped while black-holed
        self._flowing = threading.Event()
        self._flowing.set()
        self._trigger: _Trigger | None = None
        self.hole_started = threading.Event()  # set when a `blackhole_on` trigger fired
        self.hole_started_at: datetime.datetime | None = None  # local time, to compare with processes' logs
        self.up()

    def up(self) -> None:
        assert self._listener is None
        listener = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        listener.settimeout(0.1)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def blackhole(self) -> None:
        self._flowing.clear()

    def blackhole_on(
        self,
        pattern: bytes,
        *,
        direction: str = "to_server",
        forward_trigger: bool,
        then: bytes | None = None,
    ) -> None:
        """Black-hole at the first chunk sent `direction` ("to_server": client to target, or "to_client") that
        contains `pattern` (or, with `then`, at the first chunk after it on the same connection and direction
        that contains `then`). `forward_trigger`: that chunk is still delivered (the server runs the request,
        its answer is lost) or dropped with everything after it (the server never sees the request). Fires once;
        `hole_started` is set then. A pattern split across two chunks is seen (the previous chunk's tail is
        kept)."""
        if direction not in ("to_server", "to_client"):
            raise ValueError(f"direction: 'to_server' or 'to_client', not {direction!r}")
        self.hole_started.clear()
        self.hole_started_at = None
        self._trigger = _Trigger(pattern, direction == "to_server", forward_trigger, then)

    def restore(self) -> None:
        self._flowing.set()

    @property
    def blackholed(self) -> bool:
        return not self._flowing.is_set()

    def down(self) -> None:
        """Also ends a black hole: the connections are cut, not silent."""
        self._flowing.set()
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            connections = list(self._connections)
            self._connections.clear()
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    close = down

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            client.settimeout(None)
            with self._lock:
                self._connections.update((client, upstream))
            for src, dst, to_server in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pump, args=(src, dst, to_server), daemon=True).start()

    def _fires(self, data: bytes, to_server: bool, seen: dict[str, Any]) -> bool | None:
        """Whether this chunk starts the black hole: None (no), or whether the chunk itself is forwarded."""
        trigger = self._trigger
        if trigger is None or trigger.to_server != to_server or not data:
            return None
        if seen.get("trigger") is not trigger:  # a new trigger: this connection's state starts again
            seen.clear()
            seen["trigger"] = trigger
        window = seen.get("tail", b"") + data
        wanted = trigger.then if seen.get("armed") else trigger.pattern
        if wanted is None or wanted not in window:
            seen["tail"] = window[-64:]
            return None
        if trigger.then is not None and not seen.get("armed"):
            seen["armed"] = True
            after = window[window.index(trigger.pattern) + len(trigger.pattern) :]
            seen["tail"] = after[-64:]
            if trigger.then not in after:
                return None
        with self._lock:
            if self._trigger is not trigger:  # another connection fired it first
                return None
            self._trigger = None
        self._flowing.clear()
        self.hole_started_at = datetime.datetime.now()
        self.hole_started.set()
        return trigger.forward

    def _pump(self, src: socket.socket, dst: socket.socket, to_server: bool) -> None:
        seen: dict[str, Any] = {}
        try:
            while True:
                data = src.recv(65536)
                fired = self._fires(data, to_server, seen)
                if fired:
                    dst.sendall(data)  # the request reaches the server; what follows (its answer too) does not
                    continue
                if not self._flowing.is_set():
                    if data:
                        self.dropped += len(data)
                        continue
                    self._flowing.wait()  # an end closed in the black hole: said once it is over
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


@dataclass(frozen=True)
class _Trigger:
    pattern: bytes
    to_server: bool
    forward: bool
    then: bytes | None


def host_port(url: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or default_port


def with_port(url: str, port: int) -> str:
    """The same URL (credentials, path, query) pointed at 127.0.0.1:port."""
    parts = urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0]
    netloc = f"{credentials}@127.0.0.1:{port}" if credentials else f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


def closed_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return int(s.getsockname()[1])
