"""Test-only: a host clock that is off by DBSCHED_TEST_CLOCK_SKEW seconds, for the clock-skew fault test.

A process gets it by having this folder first on PYTHONPATH (Python imports `sitecustomize` at start-up, before
Celery or the app) and the variable set. libfaketime is not installed here, so the Python-level clocks are
shifted: `time.time`, `time.time_ns` (logging's timestamps too) and `datetime.datetime.now`/`utcnow`/`today`.
Monotonic clocks are left alone: a wrong wall clock does not make time run at another speed. Without the
variable this module does nothing.
"""

from __future__ import annotations

import datetime as _datetime
import os
import sys
import time as _time
from typing import Any

_SKEW = os.environ.get("DBSCHED_TEST_CLOCK_SKEW")

if _SKEW:
    skew = float(_SKEW)
    _delta = _datetime.timedelta(seconds=skew)
    _real_time, _real_time_ns, _real_datetime = _time.time, _time.time_ns, _datetime.datetime

    def _skewed_time() -> float:
        return _real_time() + skew

    def _skewed_time_ns() -> int:
        return _real_time_ns() + int(skew * 1_000_000_000)

    class _Meta(type):
        # Values made by C code (the database driver, datetime arithmetic) are real datetimes: still datetimes.
        def __instancecheck__(cls, obj: object) -> bool:
            return isinstance(obj, _real_datetime)

        def __subclasscheck__(cls, sub: type) -> bool:
            return issubclass(sub, _real_datetime)

    class _SkewedDatetime(_real_datetime, metaclass=_Meta):
        """`datetime.datetime` in this process; every value it makes is a real datetime. It keeps its own
        name: psycopg resolves the dumper it registered as "datetime.datetime" for the first class of that
        name it meets, and a real datetime would then be dumped by its `date` dumper (stored as midnight)."""

        __slots__ = ()  # the size of a real datetime: C extensions that import the type check it

        def __new__(cls, *args: Any, **kwargs: Any) -> Any:
            return _real_datetime(*args, **kwargs)

        @classmethod
        def now(cls, tz: Any = None) -> Any:
            return _real_datetime.now(tz) + _delta

        @classmethod
        def utcnow(cls) -> Any:
            return _real_datetime.utcnow() + _delta

        @classmethod
        def today(cls) -> Any:
            return _real_datetime.today() + _delta

    _time.time = _skewed_time
    _time.time_ns = _skewed_time_ns
    _datetime.datetime = _SkewedDatetime  # type: ignore[misc]
    print(
        f"dbsched test clock skew: {skew:+g}s (time.time()={_time.time():.3f}, real {_real_time():.3f}; "
        f"datetime.now()={_datetime.datetime.now().isoformat()})",
        file=sys.stderr,
        flush=True,
    )
