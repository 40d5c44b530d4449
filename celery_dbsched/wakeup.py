"""How a beat sleeps: on PostgreSQL it waits on `LISTEN` on its schema's channel (`dbsched_wakeup_<hash of
the schema>`, `statements.wakeup_channel`), so a trigger, a newly registered due job or a run that ends with
its next run due sooner wakes it at once instead of at the end of its run-jobs interval (without polling
faster), and a deployment in another schema of the same database never does. Elsewhere (SQLite) the beat
just sleeps.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from typing import Any

from sqlalchemy import Engine, select

from .statements import wakeup_channel

logger = logging.getLogger(__name__)

RECONNECT_AFTER = 5.0  # seconds to wait before listening again after the listening connection failed


class Wakeup:
    """A dedicated connection that LISTENs; opened on first use (never in the scheduler's __init__)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.enabled = engine.dialect.name == "postgresql"
        self._connection: Any = None  # the pool's proxy, kept checked out while listening
        self.channel: str | None = None  # the channel listened on, once listening (for log lines)
        self._retry_at = 0.0

    def wait(self, seconds: float) -> bool | None:
        """Block up to `seconds` or until notified. True: notified; False: the time passed; None: not
        listening (the caller sleeps instead)."""
        if not self.enabled or seconds <= 0:
            return None
        driver = self._listen()
        if driver is None:
            return None
        try:
            for _notify in driver.notifies(timeout=seconds, stop_after=1):
                return True
            return False
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
            self.channel = channel
        except Exception as exc:
            logger.debug("celery_dbsched: cannot listen for wake-ups yet: %s", exc)
            self._retry_at = time.monotonic() + RECONNECT_AFTER
            return None
        self._connection = connection
        return driver

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
