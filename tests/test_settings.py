"""`Settings.from_mapping`: the `dbsched_*` keys, their defaults and their validation (design §10)."""

from __future__ import annotations

import datetime as dt
import os
import re
import socket
from typing import Any

import pytest

from celery_dbsched.settings import (
    DEFAULT_DATABASE_FILE,
    Settings,
    backoff_delay,
    default_database_url,
    default_server_id,
    mask_database_url,
)

S = dt.timedelta(seconds=1)

DURATION_KEYS = {
    "dbsched_run_jobs_interval": ("run_jobs_interval", dt.timedelta(seconds=5)),
    "dbsched_monitor_interval": ("monitor_interval", dt.timedelta(seconds=30)),
    "dbsched_interrupt_threshold": ("interrupt_threshold", dt.timedelta(minutes=5)),
    "dbsched_run_retention": ("run_retention", dt.timedelta(days=7)),
}


def test_defaults() -> None:
    settings = Settings.from_mapping({})
    assert settings.database_url == "sqlite:///" + os.path.abspath(DEFAULT_DATABASE_FILE)
    assert settings.database_url == default_database_url()
    assert settings.engine_options == {}
    assert settings.server_id is None
    assert settings.run_jobs_interval == dt.timedelta(seconds=5)
    assert settings.run_jobs_limit == 1000
    assert settings.monitor_interval == dt.timedelta(seconds=30)
    assert settings.interrupt_threshold == dt.timedelta(minutes=5)
    assert settings.retry_backoff == (dt.timedelta(seconds=10), dt.timedelta(hours=1))
    assert settings.run_retention == dt.timedelta(days=7)
    assert settings.auto_migrate is True
    assert settings.client_timeout == dt.timedelta(seconds=20)
    assert settings.client_timeout_seconds() == 20.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, 20.0),
        (0, None),  # off
        ("0", None),
        (dt.timedelta(0), None),
        (1, 1.0),
        ("2.5", 2.5),
        (dt.timedelta(minutes=2), 120.0),
    ],
)
def test_client_timeout(value: Any, expected: float | None) -> None:
    assert Settings.from_mapping({"dbsched_client_timeout": value}).client_timeout_seconds() == expected


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (0.5, "at least 1 second(s), or 0 to turn the watchdog off, got 0.5"),
        (-1, "must not be negative"),
        ("soon", "expected seconds or a timedelta"),
        (True, "expected seconds or a timedelta"),
        (10**12, "at most 36500 days"),
    ],
)
def test_a_bad_client_timeout_is_a_value_error_naming_the_key_and_the_fix(value: Any, why: str) -> None:
    with pytest.raises(ValueError, match=f"^dbsched_client_timeout: {re.escape(why)}"):
        Settings.from_mapping({"dbsched_client_timeout": value})


def test_unrelated_keys_are_ignored() -> None:
    assert Settings.from_mapping({"broker_url": "memory://", "beat_dbsched_x": 1}) == Settings.from_mapping({})


@pytest.mark.parametrize(
    ("key", "hint"),
    [
        ("dbsched_run_job_interval", "did you mean dbsched_run_jobs_interval?"),
        ("dbsched_databse_url", "did you mean dbsched_database_url?"),
        ("DBSCHED_MONITOR_INTERVAL", "did you mean dbsched_monitor_interval?"),
        ("dbsched_unknown", "the settings are dbsched_database_url, dbsched_engine_options,"),
    ],
)
def test_an_unknown_dbsched_key_is_a_value_error_naming_the_closest_setting(key: str, hint: str) -> None:
    with pytest.raises(ValueError, match=f"^{key}: not a celery_dbsched setting; {re.escape(hint)}"):
        Settings.from_mapping({"broker_url": "memory://", key: 1})


def test_settings_are_immutable() -> None:
    settings = Settings.from_mapping({})
    with pytest.raises(AttributeError):
        settings.run_jobs_limit = 5  # type: ignore[misc]


# -- durations ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", DURATION_KEYS)
@pytest.mark.parametrize("value", [None, 0, 0.0, "0", dt.timedelta(0)])
def test_a_zero_or_unset_duration_is_the_default(key: str, value: Any) -> None:
    attribute, default = DURATION_KEYS[key]
    assert getattr(Settings.from_mapping({key: value}), attribute) == default


@pytest.mark.parametrize("key", DURATION_KEYS)
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (7, 7 * S),
        (2.5, dt.timedelta(seconds=2.5)),
        ("12", 12 * S),
        (" 0.25 ", dt.timedelta(seconds=0.25)),
        (dt.timedelta(minutes=2), dt.timedelta(minutes=2)),
    ],
)
def test_a_duration_accepts_seconds_or_a_timedelta(key: str, value: Any, expected: dt.timedelta) -> None:
    attribute, _ = DURATION_KEYS[key]
    assert getattr(Settings.from_mapping({key: value}), attribute) == expected


@pytest.mark.parametrize("key", DURATION_KEYS)
@pytest.mark.parametrize(
    ("value", "why"),
    [
        pytest.param(-1, "negative", id="negative"),
        pytest.param(-0.5, "negative", id="negative-float"),
        pytest.param("-3", "negative", id="negative-string"),
        pytest.param(-S, "negative", id="negative-timedelta"),
        pytest.param(float("nan"), "finite", id="nan"),
        pytest.param(float("inf"), "finite", id="inf"),
        pytest.param("inf", "finite", id="inf-string"),
        pytest.param("five", "seconds or a timedelta", id="junk"),
        pytest.param("", "seconds or a timedelta", id="empty-string"),
        pytest.param(True, "seconds or a timedelta", id="bool"),
        pytest.param([5], "seconds or a timedelta", id="list"),
        pytest.param(10**12, "at most", id="huge"),
        pytest.param(10**400, "at most", id="beyond-float"),
        pytest.param(-(10**400), "negative", id="negative-beyond-float"),
        pytest.param("1e400", "finite", id="beyond-float-string"),
        pytest.param(dt.timedelta(days=40000), "at most", id="huge-timedelta"),
    ],
)
def test_a_bad_duration_is_a_value_error_naming_the_key(key: str, value: Any, why: str) -> None:
    with pytest.raises(ValueError, match=key) as excinfo:
        Settings.from_mapping({key: value})
    assert why in str(excinfo.value)


def test_the_first_bad_key_is_reported_even_among_good_ones() -> None:
    with pytest.raises(ValueError, match="dbsched_monitor_interval"):
        Settings.from_mapping({"dbsched_run_jobs_interval": 1, "dbsched_monitor_interval": "soon"})


# -- run_jobs_limit -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [(None, 1000), (0, 1000), ("0", 1000), (1, 1), (50, 50), ("20", 20)])
def test_run_jobs_limit(value: Any, expected: int) -> None:
    assert Settings.from_mapping({"dbsched_run_jobs_limit": value}).run_jobs_limit == expected


def test_run_jobs_limit_maximum() -> None:
    assert Settings.from_mapping({"dbsched_run_jobs_limit": 100_000}).run_jobs_limit == 100_000


@pytest.mark.parametrize(
    ("value", "why"),
    [
        pytest.param(-1, "negative", id="negative"),
        pytest.param("-5", "negative", id="negative-string"),
        pytest.param(100_001, "at most", id="huge"),
        pytest.param(2.5, "whole number", id="float"),
        pytest.param("2.5", "whole number", id="float-string"),
        pytest.param("many", "whole number", id="junk"),
        pytest.param(True, "whole number", id="bool"),
        pytest.param([3], "whole number", id="list"),
    ],
)
def test_a_bad_run_jobs_limit_is_a_value_error_naming_the_key(value: Any, why: str) -> None:
    with pytest.raises(ValueError, match="dbsched_run_jobs_limit") as excinfo:
        Settings.from_mapping({"dbsched_run_jobs_limit": value})
    assert why in str(excinfo.value)


# -- retry backoff --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(None, (10 * S, dt.timedelta(hours=1)), id="unset"),
        pytest.param((5, 60), (5 * S, 60 * S), id="tuple"),
        pytest.param([5, 60], (5 * S, 60 * S), id="list"),
        pytest.param((dt.timedelta(seconds=2), "30"), (2 * S, 30 * S), id="mixed"),
        pytest.param(20, (20 * S, dt.timedelta(hours=1)), id="lone-base"),
        pytest.param(dt.timedelta(seconds=3), (3 * S, dt.timedelta(hours=1)), id="lone-timedelta"),
        pytest.param(0, (dt.timedelta(0), dt.timedelta(hours=1)), id="zero-base-kept"),
        pytest.param((0, 60), (dt.timedelta(0), 60 * S), id="zero-base-with-cap"),
        pytest.param((5, 0), (5 * S, dt.timedelta(hours=1)), id="zero-cap-is-default"),
        pytest.param((5, 5), (5 * S, 5 * S), id="base-equals-cap"),
    ],
)
def test_retry_backoff_forms(value: Any, expected: tuple[dt.timedelta, dt.timedelta]) -> None:
    assert Settings.from_mapping({"dbsched_retry_backoff": value}).retry_backoff == expected


@pytest.mark.parametrize(
    ("value", "why"),
    [
        pytest.param((60, 5), "larger than cap", id="base-over-cap"),
        pytest.param((1, 2, 3), "expected (base, cap)", id="three"),
        pytest.param((), "expected (base, cap)", id="empty"),
        pytest.param(-1, "negative", id="negative-base"),
        pytest.param((1, -1), "negative", id="negative-cap"),
        pytest.param("soon", "seconds or a timedelta", id="junk"),
        pytest.param((float("nan"), 5), "finite", id="nan"),
        pytest.param(True, "seconds or a timedelta", id="bool"),
    ],
)
def test_a_bad_retry_backoff_is_a_value_error_naming_the_key(value: Any, why: str) -> None:
    with pytest.raises(ValueError, match="dbsched_retry_backoff") as excinfo:
        Settings.from_mapping({"dbsched_retry_backoff": value})
    assert why in str(excinfo.value)


@pytest.mark.parametrize(
    ("failure_count", "expected"),
    [(0, 10), (1, 10), (2, 20), (3, 40), (4, 80), (5, 100), (6, 100), (1000, 100)],
)
def test_backoff_delay_doubles_up_to_the_cap(failure_count: int, expected: float) -> None:
    assert backoff_delay(failure_count, (10 * S, 100 * S), None) == dt.timedelta(seconds=expected)


def test_backoff_delay_never_exceeds_the_ceiling() -> None:
    backoff = (10 * S, 100 * S)
    assert backoff_delay(1, backoff, 25 * S) == 10 * S
    assert backoff_delay(2, backoff, 25 * S) == 20 * S
    assert backoff_delay(3, backoff, 25 * S) == 25 * S
    assert backoff_delay(9, backoff, 25 * S) == 25 * S
    assert backoff_delay(3, backoff, dt.timedelta(0)) == dt.timedelta(0)


def test_backoff_delay_with_a_zero_base_is_immediate() -> None:
    for failure_count in (1, 2, 10, 10**6):
        assert backoff_delay(failure_count, (dt.timedelta(0), 100 * S), None) == dt.timedelta(0)


# -- auto_migrate ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, True),
        (True, True),
        (False, False),
        (1, True),
        (0, False),
        ("true", True),
        ("Yes", True),
        (" on ", True),
        ("1", True),
        ("false", False),
        ("NO", False),
        ("off", False),
        ("0", False),
    ],
)
def test_auto_migrate(value: Any, expected: bool) -> None:
    assert Settings.from_mapping({"dbsched_auto_migrate": value}).auto_migrate is expected


@pytest.mark.parametrize("value", ["maybe", "", 2, -1, 1.0, [True]])
def test_a_bad_auto_migrate_is_a_value_error_naming_the_key(value: Any) -> None:
    with pytest.raises(ValueError, match="dbsched_auto_migrate"):
        Settings.from_mapping({"dbsched_auto_migrate": value})


# -- identity and database ------------------------------------------------------------------------------------


def test_server_id() -> None:
    assert Settings.from_mapping({"dbsched_server_id": "beat-a"}).server_id == "beat-a"
    assert Settings.from_mapping({"dbsched_server_id": "beat-a"}).beat_server_id() == "beat-a"
    assert Settings.from_mapping({"dbsched_server_id": "x" * 255}).server_id == "x" * 255


def test_the_default_server_id_names_host_and_process() -> None:
    assert default_server_id() == f"{socket.gethostname()}:{os.getpid()}"
    assert Settings.from_mapping({}).beat_server_id() == default_server_id()


@pytest.mark.parametrize("value", ["", "   ", 42, ["beat"], "x" * 256])
def test_a_bad_server_id_is_a_value_error_naming_the_key(value: Any) -> None:
    with pytest.raises(ValueError, match="dbsched_server_id"):
        Settings.from_mapping({"dbsched_server_id": value})


@pytest.mark.parametrize("value", ["", "   "])
def test_an_empty_database_url_is_a_value_error_naming_the_key(value: str) -> None:
    with pytest.raises(ValueError, match="dbsched_database_url"):
        Settings.from_mapping({"dbsched_database_url": value})


def test_database_url_is_kept() -> None:
    url = "postgresql+psycopg://u@db/prod"
    assert Settings.from_mapping({"dbsched_database_url": url}).database_url == url


def test_a_multi_host_url_is_kept_and_masked() -> None:
    """Failover (docs/deployment.md): several hosts in the query, libpq keeps the one that accepts writes."""
    url = "postgresql+psycopg://u:secret@/prod?host=a:5432&host=b:5433&target_session_attrs=read-write"
    assert Settings.from_mapping({"dbsched_database_url": url}).database_url == url
    masked = mask_database_url(url)
    assert "secret" not in masked and "a%3A5432" in masked and "b%3A5433" in masked, masked


def test_several_hosts_before_the_database_name_is_one_clear_error() -> None:
    with pytest.raises(ValueError) as error:
        Settings.from_mapping({"dbsched_database_url": "postgresql+psycopg://u:secret@a:5432,b:5432/prod"})
    message = str(error.value)
    assert (
        message.startswith("dbsched_database_url: several hosts must go in the URL's query") and "secret" not in message
    )
    assert "?host=host1:5432&host=host2:5432&target_session_attrs=read-write" in message


def test_a_sqlalchemy_url_object_is_accepted() -> None:
    from sqlalchemy.engine import make_url

    url = make_url("sqlite:////tmp/x.sqlite3")
    assert Settings.from_mapping({"dbsched_database_url": url}).database_url == "sqlite:////tmp/x.sqlite3"


def test_engine_options() -> None:
    options = {"pool_size": 3}
    settings = Settings.from_mapping({"dbsched_engine_options": options})
    assert settings.engine_options == {"pool_size": 3}
    options["pool_size"] = 99
    assert settings.engine_options == {"pool_size": 3}  # a copy, not the caller's dict


@pytest.mark.parametrize("value", ["pool_size=3", [("pool_size", 3)], 5])
def test_bad_engine_options_are_a_value_error_naming_the_key(value: Any) -> None:
    with pytest.raises(ValueError, match="dbsched_engine_options"):
        Settings.from_mapping({"dbsched_engine_options": value})


def test_settings_read_a_celery_app_conf() -> None:
    from celery import Celery

    app = Celery("t", set_as_current=False)
    app.conf.update(dbsched_run_jobs_limit=7, dbsched_interrupt_threshold=dt.timedelta(minutes=1))
    settings = Settings.from_mapping(app.conf)
    assert settings.run_jobs_limit == 7
    assert settings.interrupt_threshold == dt.timedelta(minutes=1)


def test_a_lone_backoff_base_above_the_default_cap_raises_the_cap() -> None:
    settings = Settings.from_mapping({"dbsched_retry_backoff": 7200})
    assert settings.retry_backoff == (dt.timedelta(hours=2), dt.timedelta(hours=2))


def test_listen_defaults_on_and_takes_booleans() -> None:
    assert Settings.from_mapping({}).listen is True
    assert Settings.from_mapping({"dbsched_listen": False}).listen is False
    assert Settings.from_mapping({"dbsched_listen": "off"}).listen is False
    with pytest.raises(ValueError, match="dbsched_listen"):
        Settings.from_mapping({"dbsched_listen": "sometimes"})


def test_the_pooler_setting_accepts_pgbouncer_or_transaction_and_turns_listen_off() -> None:
    assert Settings.from_mapping({}).pooler is None
    assert Settings.from_mapping({}).listen is True
    for value in ("pgbouncer", "PgBouncer", " transaction "):
        settings = Settings.from_mapping({"dbsched_pooler": value})
        assert settings.pooler == "transaction" and settings.listen is False
    assert Settings.from_mapping({"dbsched_pooler": "pgbouncer", "dbsched_listen": False}).listen is False
    for bad in ("session", "pgpool", 1, True):
        with pytest.raises(ValueError, match="dbsched_pooler: expected 'pgbouncer', 'transaction' or None"):
            Settings.from_mapping({"dbsched_pooler": bad})
    with pytest.raises(ValueError, match="dbsched_listen: LISTEN does not work through a transaction-mode pooler"):
        Settings.from_mapping({"dbsched_pooler": "pgbouncer", "dbsched_listen": True})
