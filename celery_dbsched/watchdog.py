"""PostgreSQL connections that cannot hang on a silent server (issue 15: a network black hole).

psycopg 3 runs every statement, commit and rollback as a generator that `Connection.wait` drives: the generator
yields what it waits for on the socket, and the wait function sends back what became ready, or nothing
(READY_NONE) each time its polling interval (0.1 s) passes without news; by default it waits without end.
`WatchedConnection.wait` hands it the generator wrapped by `_bounded`, which raises `ClientTimeout` once the
socket has been silent (neither readable nor writable) for `dbsched_client_timeout` seconds. The connection is
then closed, so that SQLAlchemy sees a disconnect and discards it, and `errors.classify` maps the error to
`DatabaseUnavailable`. The statement is not sent again here (the server may or may not have run it): the
caller's retry decides; a claim is one transaction, which the server rolls back when the session ends.

Only psycopg's public generator protocol is relied on (psycopg 3.2 to 3.3 at least: from 3.3.6 `wait` also
takes a `timeout`, which `notifies(timeout=...)` passes; such a wait is left alone, running out is its normal
end). Only imported for a PostgreSQL engine (psycopg is optional): `engine.make_engine` connects through
`connect` (SQLAlchemy's `do_connect` event); `engine.set_client_timeout` changes the bound of one connection
(migrations run without it, the beat's LISTEN round trip with a shorter one).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg.abc import PQGen

RV = TypeVar("RV")

# Set on connect when the server's value is 0 (off): a transaction whose client vanished mid-transaction (its
# packets dropped, so the server never sees the socket close) is ended by the server, and its row locks freed.
IDLE_IN_TRANSACTION_TIMEOUT = "60s"
_SET_IDLE_IN_TRANSACTION_TIMEOUT = (
    "SELECT set_config('idle_in_transaction_session_timeout', %s, false) "
    "WHERE current_setting('idle_in_transaction_session_timeout') = '0'"
)


class ClientTimeout(psycopg.OperationalError):
    """The server stayed silent for dbsched_client_timeout seconds during a statement; the connection is closed."""

    dbsched_client_timeout = True  # what errors.is_client_timeout looks for (errors.py does not import psycopg)


def _bounded(gen: PQGen[RV], limit: float) -> PQGen[RV]:
    """`gen`, raising ClientTimeout when it is resumed with nothing ready `limit` seconds after the socket was
    last ready (each byte the server sends, or accepts, starts the count again)."""
    try:
        waiting = next(gen)
    except StopIteration as done:
        result: RV = done.value
        return result
    deadline = time.monotonic() + limit
    while True:
        ready = yield waiting
        if ready:
            deadline = time.monotonic() + limit
        elif time.monotonic() >= deadline:
            raise ClientTimeout(
                f"no answer from the database server for {limit:g}s (dbsched_client_timeout): the connection is closed"
            )
        try:
            waiting = gen.send(ready)
        except StopIteration as done:
            result = done.value
            return result


class WatchedConnection(psycopg.Connection[Any]):
    """A psycopg connection whose statements (and commits, rollbacks) fail with ClientTimeout after
    `dbsched_client_timeout` seconds of silence from the server (None: they wait without end)."""

    dbsched_client_timeout: float | None = None

    def wait(self, gen: PQGen[RV], *args: Any, **kwargs: Any) -> RV:
        limit = self.dbsched_client_timeout
        # (gen, interval, timeout): a wait with a timeout of its own (notifies) is left as it is.
        if limit is not None and kwargs.get("timeout") is None and len(args) < 2:
            gen = _bounded(gen, limit)
        try:
            return super().wait(gen, *args, **kwargs)
        except ClientTimeout:
            # The statement may or may not have reached the server: the connection's state is unknown, so it is
            # closed, never reused. (No cancel request: it would need a new connection to the silent server.)
            self.pgconn.finish()
            raise


def connect(
    cargs: Sequence[Any], cparams: Mapping[str, Any], client_timeout: float | None, *, session_settings: bool = True
) -> WatchedConnection:
    """A new connection (SQLAlchemy's arguments for psycopg.connect) under the watchdog, with the server's
    idle-in-transaction session timeout set to IDLE_IN_TRANSACTION_TIMEOUT if it is off (0). Not with
    `session_settings` False (a transaction-mode pooler, dbsched_pooler): there the SET would change whichever
    server connection the pooler picked, shared with other clients, and not this connection's next ones; set it
    for the role instead (ALTER ROLE ... SET idle_in_transaction_session_timeout, docs/deployment.md)."""
    conn = WatchedConnection.connect(*cargs, **cparams)
    conn.dbsched_client_timeout = client_timeout
    if not session_settings:
        return conn
    try:
        # Autocommit, so that the SET is not undone by a rollback (changing it on an idle connection sends
        # nothing to the server); SQLAlchemy expects a new connection out of autocommit.
        conn.autocommit = True
        conn.execute(_SET_IDLE_IN_TRANSACTION_TIMEOUT, (IDLE_IN_TRANSACTION_TIMEOUT,))
        conn.autocommit = False
    except BaseException:
        conn.close()
        raise
    return conn
