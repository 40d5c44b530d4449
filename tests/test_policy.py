"""`JobPolicy` (celery_dbsched.policy), without a database: its parser, its validator, its columns, and that
every place a user gives a policy takes the same names."""

from __future__ import annotations

import datetime as dt
import inspect
from typing import Any

import pytest

from celery_dbsched import Job, JobRecord
from celery_dbsched.beat_schedule import _POLICY_KEYS
from celery_dbsched.job import JobDefinition
from celery_dbsched.policy import POLICY_NAMES, JobPolicy
from celery_dbsched.registration import job
from celery_dbsched.settings import DEFAULT_RETRY_BACKOFF

S = dt.timedelta(seconds=1)


def test_the_defaults() -> None:
    assert JobPolicy.parse("job 'j'", {}) == JobPolicy()
    assert JobPolicy.parse("job 'j'", dict.fromkeys(("enabled", "misfire_grace", "retry_backoff", "expires"))) == (
        JobPolicy()
    )
    assert JobPolicy() == JobPolicy(True, "run_once", None, 1, None, None)


def test_parse_reads_what_users_write() -> None:
    policy = JobPolicy.parse(
        "job 'j'",
        {
            "enabled": "off",
            "misfire": "skip",
            "misfire_grace": "5",
            "max_active": 3,
            "retry_backoff": (2, 30),
            "expires": dt.timedelta(minutes=1),
            "timezone": "UTC",  # not a policy: ignored
        },
    )
    assert policy == JobPolicy(False, "skip", 5 * S, 3, (2 * S, 30 * S), 60 * S)
    assert JobPolicy.parse("job 'j'", {"retry_backoff": 7}).retry_backoff == (7 * S, DEFAULT_RETRY_BACKOFF[1])
    assert JobPolicy.parse("job 'j'", {"misfire_grace": 0, "expires": 0}) == JobPolicy()  # 0: unset


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"enabled": "maybe"}, "job 'j' enabled: expected true or false"),
        ({"misfire_grace": -1}, "job 'j' misfire_grace: must not be negative"),
        ({"expires": "soon"}, "job 'j' expires: expected seconds or a timedelta"),
        ({"retry_backoff": (100, 10)}, "job 'j' retry_backoff: base 0:01:40 is larger than cap 0:00:10"),
    ],
)
def test_parse_names_the_label_and_the_key(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as caught:
        JobPolicy.parse("job 'j'", values)
    assert str(caught.value).startswith(message)


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        (JobPolicy(misfire="later"), "job 'j': misfire must be one of run_once, skip, got 'later'"),
        (JobPolicy(max_active=0), "job 'j': max_active must be a whole number from 1 to 1000, got 0"),
        (JobPolicy(max_active=True), "job 'j': max_active must be a whole number from 1 to 1000, got True"),
        (JobPolicy(misfire_grace=-S), "job 'j': misfire_grace must be a non-negative timedelta"),
        (JobPolicy(expires=5), "job 'j': expires must be a non-negative timedelta, got 5"),  # type: ignore[arg-type]
    ],
)
def test_check_names_the_label_and_the_key(policy: JobPolicy, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        policy.check("job 'j'")
    assert str(caught.value).startswith(message)
    with pytest.raises(ValueError, match=r"^job 'j': "):
        JobDefinition(name="j", description="d", policy=policy)


@pytest.mark.parametrize(
    "policy",
    [JobPolicy(), JobPolicy(False, "skip", 5 * S, 3, (2 * S, 30 * S), 60 * S), JobPolicy(retry_backoff=(0 * S, S))],
)
def test_columns_and_back(policy: JobPolicy) -> None:
    assert JobPolicy.from_columns(policy.columns()) == policy


def test_every_place_a_user_gives_a_policy_takes_the_same_names() -> None:
    decorator = inspect.signature(job).parameters
    assert all(decorator[name].kind is inspect.Parameter.KEYWORD_ONLY for name in POLICY_NAMES)
    assert all(hasattr(Job, name) for name in POLICY_NAMES)
    assert set(POLICY_NAMES) - _POLICY_KEYS == {"expires"}  # an entry's expires is its options["expires"]
    assert JobRecord.__dataclass_fields__["policy"].type in ("JobPolicy", JobPolicy)
