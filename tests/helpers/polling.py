"""Polling with a deadline. Never wait with a bare sleep: other test runs share the machine, so poll with
`wait_for` and a generous deadline; it returns as soon as the condition holds."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T],
    timeout: float,
    interval: float = 0.1,
    message: str | Callable[[], str] = "the condition",
) -> T:
    """Call `predicate` until it returns something truthy and return that; after `timeout` seconds raise
    AssertionError with `message` (a string or a callable producing one) and the last value seen."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"timed out after {timeout:g}s waiting for {text}; last value: {value!r}")
        time.sleep(interval)
