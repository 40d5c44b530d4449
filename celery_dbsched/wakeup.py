"""How a beat sleeps: on PostgreSQL it waits on `LISTEN` on its schema's channel (`dbsched_wakeup_<hash of
the schema>`, `statements.wakeup_channel`), so a trigger, a newly registered due job or a run that ends with
its next run due sooner wakes it at once instead of at the end of its run-jobs interval (without polling
faster), and a deployment in another schema of the same database never does. Elsewhere (SQLite) the beat
just sleeps.

A listening connection only reads, so a server that went silent (its packets dropped) would leave it waiting
for ever: it makes a round trip (`SELECT 1`) at least every PING_EVERY seconds, which must come back within
PING_TIMEOUT (whatever dbsched_client_timeout), else the connection is dropped and listened again later.

A connection that answers but never gets a notification is one through a transaction-mode pooler (PgBouncer
with pool_mode = transaction accepts LISTEN on whichever server connection it picked, then hands that one to
other clients). So once listening, the beat sends a probe (a NOTIFY with a PROBE_PREFIX payload, on another
connection) and waits PING_TIMEOUT for it: when it does not come while the listening connection still answers,
it logs one error naming the pooler and the fix (dbsched_pooler) and sleeps its run-jobs interval from then on
(no LISTEN again in this process), as on MariaDB. Probes are not wake-ups: every listener ignores them.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
import uuid
from typing import Any

from sqlalchemy import Engine, select, text

from .engine import set_client_timeout
from .errors import POOLER_FIX
from .statements import wakeup_channel

logger = logging.getLogger(__name__)

RECONNECT_AFTER = 5.0  # seconds to wait before listening again after the listening connection failed
PING_EVERY = 30.0  # seconds between two round trips on the listening connection, at most
PING_TIMEOUT = 5.0  # seconds a round trip on it may take, and the probe notification after LISTEN
PROBE_PREFIX = "dbsched-probe:"  # the payload of a listener's probe NOTIFY: not a wake-up


class Wakeup:
    """A dedicated connection that LISTENs; opened on first use (never in the scheduler's __init__)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.enabled = engine.dialect.name == "postgresql"
        self._connection: Any = None  # the pool's proxy, kept checked out while listening
        self.channel: str | None = None  # the channel listened on, once listening (for log lines)
        self._retry_at = 0.0
        self._answered_at = 0.0  # when the listening connection last answered a round trip (monotonic)
        self._woken = False  # a wake-up came while the probe waited: the next wait returns at once

    def wait(self, seconds: float) -> bool | None:
        """Block up to `seconds` or until notified. True: notified; False: the time passed; None: not
        listening (the caller sleeps instead)."""
        if not self.enabled or seconds <= 0:
            return None
        driver = self._listen()
        if driver is None:
            return None
        if self._woken:
            self._woken = False
            return True
        deadline = time.monotonic() + seconds
        try:
            while True:
                if time.monotonic() - self._answered_at >= PING_EVERY:
                    self._ping(driver)
                now = time.monotonic()
                if now >= deadline:
                    return False
                step = min(deadline, self._answered_at + PING_EVERY) - now
                for notify in driver.notifies(timeout=step, stop_after=1):
                    if not notify.payload.startswith(PROBE_PREFIX):
                        return True
        except Exception as exc:  # the database went away: sleep normally, listen again later
            logger.warning("celery_dbsched: stopped listening for wake-ups (%s); retrying", exc)
            self._drop()
            return None

    def _listen(self) -> Any:
        if self._connection is not None:
            return self._connection.driver_connection
        if time.monotonic() < self._retry_at:
            return None
        try:
            connection = self.engine.raw_connection()
            driver: Any = connection.driver_connection
            driver.autocommit = True
            channel = driver.execute(self._channel_query()).fetchone()[0]
            if not re.fullmatch(r"[a-z0-9_]+", channel):
                raise ValueError(f"unexpected wake-up channel {channel!r}")
            driver.execute(f"LISTEN {channel}")
            self._answered_at = time.monotonic()
            self.channel = channel
        except Exception as exc:
            logger.debug("celery_dbsched: cannot listen for wake-ups yet: %s", exc)
            self._retry_at = time.monotonic() + RECONNECT_AFTER
            return None
        self._connection = connection
        try:
            delivered = self._probe(driver, channel)
        except Exception as exc:  # the database went away meanwhile: as a failed round trip
            logger.warning("celery_dbsched: stopped listening for wake-ups (%s); retrying", exc)
            self._drop()
            return None
        if not delivered:
            logger.error(
                "celery_dbsched: LISTEN %s gets no notifications although the connection answers: "
                "dbsched_database_url likely goes through a transaction-mode pooler such as PgBouncer "
                "(pool_mode = transaction); this beat polls every dbsched_run_jobs_interval from now on; %s",
                channel,
                POOLER_FIX,
            )
            self.enabled = False
            # Best effort: PgBouncer most likely hands back the server connection that ran LISTEN (it reuses the
            # last one freed); left subscribed, it would pass notifications to whichever client it serves next.
            with contextlib.suppress(Exception):
                driver.execute("UNLISTEN *")
            self._drop()
            return None
        return driver

    def _probe(self, driver: Any, channel: str) -> bool:
        """Whether a NOTIFY sent on another connection reaches the listening one within PING_TIMEOUT. A wake-up
        that comes meanwhile is kept for the next `wait`."""
        payload = f"{PROBE_PREFIX}{uuid.uuid4().hex}"
        with self.engine.begin() as conn, set_client_timeout(conn.connection.driver_connection, PING_TIMEOUT):
            conn.execute(text("SELECT pg_notify(:channel, :payload)"), {"channel": channel, "payload": payload})
        deadline = time.monotonic() + PING_TIMEOUT
        while (left := deadline - time.monotonic()) > 0:
            for notify in driver.notifies(timeout=left, stop_after=1):
                if notify.payload == payload:
                    self._answered_at = time.monotonic()
                    return True
                self._woken = self._woken or not notify.payload.startswith(PROBE_PREFIX)
        self._ping(driver)  # raises when the connection itself no longer answers
        return False

    def _ping(self, driver: Any) -> None:
        """One round trip, within PING_TIMEOUT (the statement watchdog's bound, lowered for it)."""
        with set_client_timeout(driver, PING_TIMEOUT):
            driver.execute("SELECT 1")
        self._answered_at = time.monotonic()

    def _channel_query(self) -> str:
        compiled = select(wakeup_channel()).compile(dialect=self.engine.dialect, compile_kwargs={"literal_binds": True})
        return str(compiled)

    def _drop(self) -> None:
        connection, self._connection = self._connection, None
        self._retry_at = time.monotonic() + RECONNECT_AFTER
        if connection is None:
            return
        # Never back into the pool: this connection is in autocommit mode and subscribed.
        with contextlib.suppress(Exception):
            connection.invalidate()

    def close(self) -> None:
        self._drop()
