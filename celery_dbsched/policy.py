"""`JobPolicy`: how a job is run beside its cadence (enabled, misfire, misfire_grace, max_active, retry_backoff,
expires), defined once: its parser from what users write (a `Job`'s attributes, the `@job` keywords, a
`beat_schedule` entry), its validator, and its column values.

The job's `interrupt_threshold` is not a policy here: a beat_schedule entry does not take it (plain tasks are
not watched by the worker's monitor), and a job gives it beside its `queue`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from .settings import parse_backoff, parse_bool, parse_duration
from .states import Misfire

Backoff = tuple[dt.timedelta, dt.timedelta]


@dataclass(frozen=True)
class JobPolicy:
    enabled: bool = True
    misfire: Misfire = Misfire.RUN_ONCE
    misfire_grace: dt.timedelta | None = None  # None: the default grace (settings.DEFAULT_MISFIRE_GRACE)
    max_active: int = 1
    retry_backoff: Backoff | None = None  # None: the `dbsched_retry_backoff` setting
    expires: dt.timedelta | None = None

    @classmethod
    def parse(cls, label: str, values: Mapping[str, object]) -> JobPolicy:
        """From what a user wrote (`values` by policy name, other keys ignored; a missing or None value: the
        default): `enabled` a bool or its spelling, durations as seconds or timedeltas, `retry_backoff` as
        (base, cap) or a lone base. ValueError naming `label` and the key for a value it cannot read; `check`
        validates the rest."""
        backoff = values.get("retry_backoff")
        return cls(
            enabled=parse_bool(f"{label} enabled", values.get("enabled"), True),
            misfire=values.get("misfire", Misfire.RUN_ONCE),  # type: ignore[arg-type]  # checked by `check`
            misfire_grace=parse_duration(f"{label} misfire_grace", values.get("misfire_grace"), None),
            max_active=values.get("max_active", 1),  # type: ignore[arg-type]  # checked by `check`
            retry_backoff=None if backoff is None else parse_backoff(f"{label} retry_backoff", backoff),
            expires=parse_duration(f"{label} expires", values.get("expires"), None),
        )

    def check(self, label: str) -> None:
        """ValueError naming `label` and the policy when a value is out of range or of the wrong type."""
        if self.misfire not in set(Misfire):
            raise ValueError(f"{label}: misfire must be one of {', '.join(Misfire)}, got {self.misfire!r}")
        object.__setattr__(self, "misfire", Misfire(self.misfire))  # a str given by a user: the member
        if (
            isinstance(self.max_active, bool)
            or not isinstance(self.max_active, int)
            or not 1 <= self.max_active <= 1000
        ):
            raise ValueError(f"{label}: max_active must be a whole number from 1 to 1000, got {self.max_active!r}")
        for name in ("misfire_grace", "expires"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, dt.timedelta) or value < dt.timedelta(0)):
                raise ValueError(f"{label}: {name} must be a non-negative timedelta, got {value!r}")

    def columns(self) -> dict[str, Any]:
        """The policy as `dbsched_job` column values (durations in seconds; the backoff as two columns)."""
        backoff = self.retry_backoff
        return {
            "enabled": self.enabled,
            "misfire": self.misfire,
            "misfire_grace": seconds_of(self.misfire_grace),
            "max_active": self.max_active,
            "retry_backoff_base": None if backoff is None else backoff[0].total_seconds(),
            "retry_backoff_cap": None if backoff is None else backoff[1].total_seconds(),
            "expires": seconds_of(self.expires),
        }

    @classmethod
    def from_columns(cls, row: Mapping[Any, Any]) -> JobPolicy:
        """From a `dbsched_job` row (the inverse of `columns`)."""
        return cls(
            enabled=bool(row["enabled"]),
            misfire=Misfire(row["misfire"]),
            misfire_grace=delta_of(row["misfire_grace"]),
            max_active=row["max_active"],
            retry_backoff=backoff_of(row["retry_backoff_base"], row["retry_backoff_cap"]),
            expires=delta_of(row["expires"]),
        )


# The policy names, as users spell them (Job attributes, @job keywords, beat_schedule keys).
POLICY_NAMES: tuple[str, ...] = tuple(f.name for f in fields(JobPolicy))


def seconds_of(value: dt.timedelta | None) -> float | None:
    return None if value is None else value.total_seconds()


def delta_of(value: float | None) -> dt.timedelta | None:
    return None if value is None else dt.timedelta(seconds=value)


def backoff_of(base: float | None, cap: float | None) -> Backoff | None:
    """A backoff from its two columns (None: the repository's)."""
    return None if base is None or cap is None else (dt.timedelta(seconds=base), dt.timedelta(seconds=cap))
