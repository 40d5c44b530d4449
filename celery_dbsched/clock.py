"""The clock a `JobRepository` computes times with, given at construction.

Every persisted time is computed by the database, from an SQL expression the clock builds (`now`): in
production the database's own clock (`DatabaseClock`); in tests the database's clock plus an offset that the
test moves on, or a fixed instant (`TestClock`), so that time passes without sleeping.
"""

from __future__ import annotations

import datetime as dt
import time
from abc import ABC, abstractmethod
from collections.abc import Hashable
from typing import Any

from sqlalchemy import Float, literal
from sqlalchemy.sql.elements import ColumnElement

from .schema import UTCDateTime, db_now, db_time_at


class Clock(ABC):
    """The interface: the SQL time expressions, and what the one-statement finish needs to know."""

    @abstractmethod
    def now(self, offset: float | ColumnElement[Any] | None = None) -> ColumnElement[dt.datetime]:
        """The clock's time (plus `offset` seconds, a number or an SQL expression), as an SQL expression."""

    @property
    @abstractmethod
    def key(self) -> Hashable:
        """What the expressions of `now` embed beyond the database's clock: statements built from them are
        cached under it (a statement built before the clock moved is not reused after)."""

    @abstractmethod
    def expected_now(
        self, start_time: dt.datetime | None, started: float, key_at_start: Hashable
    ) -> dt.datetime | None:
        """The clock's time now, as told by a run's start: its `start_time` (by this clock), this host's
        `time.monotonic()` then (`started`) and the clock's `key` then. None when it cannot be told."""


class DatabaseClock(Clock):
    """The database's clock (production): `statement_timestamp()` on PostgreSQL, `'now'` on SQLite."""

    def __repr__(self) -> str:
        return "DatabaseClock()"

    def now(self, offset: float | ColumnElement[Any] | None = None) -> ColumnElement[dt.datetime]:
        if offset is None:
            return db_now()
        if isinstance(offset, (int, float)):
            return db_now(literal(float(offset), Float))
        return db_now(offset)

    @property
    def key(self) -> Hashable:
        return None

    def expected_now(
        self, start_time: dt.datetime | None, started: float, key_at_start: Hashable
    ) -> dt.datetime | None:
        if start_time is None:
            return None
        return start_time + dt.timedelta(seconds=time.monotonic() - started)


class TestClock(Clock):
    """A clock for tests: the database's clock plus `offset` (shifted), or a fixed instant `frozen_at`
    (frozen: schedule math at exact instants). `advance` moves it on in either mode; `shift_to` and `freeze`
    switch between them. A repository built with it reads the clock at each statement it builds."""

    __test__ = False  # not a pytest test class

    def __init__(self, *, offset: dt.timedelta = dt.timedelta(0), frozen_at: dt.datetime | None = None) -> None:
        self._offset = dt.timedelta(0)
        self._frozen_at: dt.datetime | None = None
        if frozen_at is not None:
            self.freeze(frozen_at)
        else:
            self.shift_to(offset)

    def __repr__(self) -> str:
        if self._frozen_at is not None:
            return f"TestClock(frozen_at={self._frozen_at!r})"
        return f"TestClock(offset={self._offset!r})"

    @property
    def offset(self) -> dt.timedelta:
        """How far ahead of the database's clock it is (zero while frozen)."""
        return self._offset

    @property
    def frozen_at(self) -> dt.datetime | None:
        return self._frozen_at

    def advance(self, delta: dt.timedelta) -> None:
        """Move the clock by `delta`: the offset, or the frozen instant."""
        if self._frozen_at is not None:
            self._frozen_at += delta
        else:
            self._offset += delta

    def shift_to(self, offset: dt.timedelta) -> None:
        """From now on: the database's clock plus `offset` (unfreezes)."""
        self._frozen_at = None
        self._offset = offset

    def freeze(self, at: dt.datetime) -> None:
        """From now on: the fixed instant `at` (aware), until moved."""
        if at.tzinfo is None:
            raise ValueError("freeze() needs an aware datetime")
        self._frozen_at = at
        self._offset = dt.timedelta(0)

    def now(self, offset: float | ColumnElement[Any] | None = None) -> ColumnElement[dt.datetime]:
        shift = self._offset.total_seconds()
        if self._frozen_at is not None:
            base = literal(self._frozen_at, UTCDateTime())
            total: Any = 0.0 if offset is None else offset
            return db_time_at(base, literal(float(total), Float) if isinstance(total, (int, float)) else total)
        if offset is None:
            return db_now(literal(shift, Float)) if shift else db_now()
        if isinstance(offset, (int, float)):
            return db_now(literal(float(offset) + shift, Float))
        return db_now(offset + shift) if shift else db_now(offset)

    @property
    def key(self) -> Hashable:
        return (self._offset, self._frozen_at)

    def expected_now(
        self, start_time: dt.datetime | None, started: float, key_at_start: Hashable
    ) -> dt.datetime | None:
        if self._frozen_at is not None:
            return self._frozen_at  # exact
        assert isinstance(key_at_start, tuple)
        offset_at_start: dt.timedelta = key_at_start[0]
        if key_at_start[1] is not None or start_time is None:
            return None  # frozen at the start: its time by this host's clock says nothing
        elapsed = dt.timedelta(seconds=time.monotonic() - started)
        return start_time + elapsed + (self._offset - offset_at_start)
