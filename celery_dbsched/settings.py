"""The `dbsched_*` Celery settings: defaults in one place, parsed and validated when beat or a worker starts.

`0` or unset means the default; a negative, malformed or absurd value is a `ValueError` naming the setting
(design §10).
"""

from __future__ import annotations

import datetime as dt
import difflib
import math
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

DEFAULT_DATABASE_FILE = "celery_dbsched.sqlite3"
DEFAULT_RUN_JOBS_INTERVAL = dt.timedelta(seconds=5)
DEFAULT_RUN_JOBS_LIMIT = 1000
DEFAULT_MONITOR_INTERVAL = dt.timedelta(seconds=30)
DEFAULT_INTERRUPT_THRESHOLD = dt.timedelta(minutes=5)
DEFAULT_RETRY_BACKOFF = (dt.timedelta(seconds=10), dt.timedelta(hours=1))
DEFAULT_RUN_RETENTION = dt.timedelta(days=7)
DEFAULT_SERVER_RETENTION = dt.timedelta(days=1)
# A slot that is later than this counts as missed for the `skip` misfire policy (per job: misfire_grace).
DEFAULT_MISFIRE_GRACE = dt.timedelta(minutes=1)
# PostgreSQL: how long a statement waits for the server's answer before its connection is given up (a server
# black-holed behind a dropped network); 0 turns the watchdog off. Migrations are exempt.
DEFAULT_CLIENT_TIMEOUT = dt.timedelta(seconds=20)
MIN_CLIENT_TIMEOUT = dt.timedelta(seconds=1)

MAX_DURATION = dt.timedelta(days=36500)
MAX_RUN_JOBS_LIMIT = 100_000
# Distinct job names a process gives a metric label of their own; the others share the label "other".
DEFAULT_METRICS_JOB_LABELS = 200  # a histogram of 12 buckets per job: about 3,000 series a worker at most
MAX_METRICS_JOB_LABELS = 100_000
DEFAULT_METRICS_ADDRESS = "0.0.0.0"
# prometheus-client's multiprocess directory, read from the environment once, when it is imported.
PROMETHEUS_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def parse_duration(
    key: str, value: object, default: dt.timedelta | None, *, zero_is_default: bool = True
) -> dt.timedelta | None:
    """Seconds (int, float, numeric string) or a timedelta; None (and 0 unless told otherwise) -> default."""
    if value is None:
        return default
    if isinstance(value, bool):
        raise ValueError(f"{key}: expected seconds or a timedelta, got {value!r}")
    if isinstance(value, dt.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)):
        try:
            seconds = float(value)
        except OverflowError:  # an int beyond any float: a ValueError naming the key, like any absurd value
            raise ValueError(
                f"{key}: "
                + ("must not be negative" if value < 0 else f"at most {MAX_DURATION.days} days")
                + ", got a number too large for a duration"
            ) from None
    elif isinstance(value, str):
        try:
            seconds = float(value.strip())
        except ValueError:
            raise ValueError(f"{key}: expected seconds or a timedelta, got {value!r}") from None
    else:
        raise ValueError(f"{key}: expected seconds or a timedelta, got {type(value).__name__} {value!r}")
    if math.isnan(seconds) or math.isinf(seconds):
        raise ValueError(f"{key}: expected a finite duration, got {value!r}")
    if seconds < 0:
        raise ValueError(f"{key}: must not be negative, got {value!r}")
    if seconds == 0 and zero_is_default:
        return default
    if seconds > MAX_DURATION.total_seconds():
        raise ValueError(f"{key}: at most {MAX_DURATION.days} days, got {value!r}")
    return dt.timedelta(seconds=seconds)


def _required_duration(key: str, value: object, default: dt.timedelta) -> dt.timedelta:
    parsed = parse_duration(key, value, default)
    assert parsed is not None
    return parsed


def parse_positive_int(key: str, value: object, default: int, maximum: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{key}: expected a whole number, got {value!r}")
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{key}: expected a whole number, got {value!r}") from None
    if number < 0:
        raise ValueError(f"{key}: must not be negative, got {value!r}")
    if number == 0:
        return default
    if number > maximum:
        raise ValueError(f"{key}: at most {maximum}, got {value!r}")
    return number


def parse_backoff(key: str, value: object) -> tuple[dt.timedelta, dt.timedelta]:
    """`(base, cap)` or a lone base; unlike other durations a base of 0 is kept: it retries at once."""
    if value is None:
        return DEFAULT_RETRY_BACKOFF
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{key}: expected (base, cap), got {value!r}")
        base_value, cap_value = value
    else:
        base_value, cap_value = value, None
    base = parse_duration(f"{key} base", base_value, dt.timedelta(0), zero_is_default=False)
    assert base is not None
    # A lone base above the default cap raises the cap to it rather than being an error.
    cap = parse_duration(f"{key} cap", cap_value, max(DEFAULT_RETRY_BACKOFF[1], base))
    assert cap is not None
    if base > cap:
        raise ValueError(f"{key}: base {base} is larger than cap {cap}")
    return base, cap


def parse_client_timeout(key: str, value: object) -> dt.timedelta:
    """Seconds or a timedelta; unset: the default; 0: off (timedelta(0)); else at least MIN_CLIENT_TIMEOUT, so
    that an ordinary statement on a busy server is not taken for a silent one."""
    parsed = parse_duration(key, value, DEFAULT_CLIENT_TIMEOUT, zero_is_default=False)
    assert parsed is not None
    if parsed and parsed < MIN_CLIENT_TIMEOUT:
        raise ValueError(
            f"{key}: at least {MIN_CLIENT_TIMEOUT.total_seconds():g} second(s), or 0 to turn the watchdog off, "
            f"got {value!r}; it bounds how long a statement waits for the database's answer"
        )
    return parsed


def parse_bool(key: str, value: object, default: bool) -> bool:
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in {
        "1",
        "true",
        "yes",
        "on",
        "0",
        "false",
        "no",
        "off",
    }:
        return value.strip().lower() in {"1", "true", "yes", "on"}
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"{key}: expected true or false, got {value!r}")


WEB_TOKEN_MIN_LENGTH = 16


# dbsched_pooler: the values accepted (lower case) and the pooling mode each means. Only transaction pooling
# (PgBouncer's `pool_mode = transaction`, the way most large deployments run it) needs anything turned off; a
# session-mode pooler behaves as a direct connection and needs no setting.
POOLERS = {"pgbouncer": "transaction", "transaction": "transaction"}


def parse_pooler(key: str, value: object) -> str | None:
    """None (a direct connection, or a session-mode pooler) or "transaction" (a transaction-mode pooler)."""
    if value is None or value == "":
        return None
    if isinstance(value, str) and value.strip().lower() in POOLERS:
        return POOLERS[value.strip().lower()]
    accepted = ", ".join(repr(name) for name in POOLERS)
    raise ValueError(
        f"{key}: expected {accepted} or None, got {value!r}; set it when dbsched_database_url goes through a "
        "transaction-mode pooler such as PgBouncer with pool_mode = transaction, leave it unset otherwise"
    )


def parse_web_token(key: str, value: object) -> str | None:
    """The dashboard's token: None, or a string of at least 16 characters (it guards the actions); the error
    never repeats the value."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError(f"{key}: expected a string, got {type(value).__name__}")
    if len(value.strip()) < WEB_TOKEN_MIN_LENGTH or value != value.strip():
        raise ValueError(
            f"{key}: at least {WEB_TOKEN_MIN_LENGTH} characters, without leading or trailing blanks; make one with: "
            "python -c 'import secrets; print(secrets.token_urlsafe(24))'"
        )
    return value


def parse_database_url(key: str, value: object) -> str | None:
    """A URL string or a `sqlalchemy.URL` (its password kept); the error never repeats the value, which may hold
    a password."""
    if value is None:
        return None
    from sqlalchemy.engine import URL, make_url
    from sqlalchemy.exc import ArgumentError

    if isinstance(value, URL):
        return value.render_as_string(hide_password=False)  # str(URL) would replace the password with ***
    if not isinstance(value, str):
        raise ValueError(f"{key}: expected a database URL string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{key}: must not be empty")
    try:
        make_url(value)
    except (ArgumentError, ValueError):
        if re.match(r"[^:/]+://[^/?]*,", value):  # host1:5432,host2:5432 in the netloc: SQLAlchemy takes one host
            raise ValueError(
                f"{key}: several hosts must go in the URL's query, not before the database name; e.g. "
                "postgresql+psycopg://user:password@/db?host=host1:5432&host=host2:5432&target_session_attrs=read-write"
            ) from None
        raise ValueError(
            f"{key}: not a database URL; expected e.g. postgresql+psycopg://user:password@host/db or "
            "sqlite:///path/to/file.sqlite3"
        ) from None
    return value


def mask_database_url(url: str | URL) -> str:
    """The URL (a string or a `sqlalchemy.URL`) with its password replaced by ***, for anything shown to
    people; the one place that masks a database URL."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable database url>"


def default_database_url() -> str:
    return "sqlite:///" + os.path.abspath(DEFAULT_DATABASE_FILE)


def default_server_id() -> str:
    """Host and process: unique among beats on a machine. Workers use their node name instead."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class Settings:
    database_url: str = field(default_factory=default_database_url)
    engine_options: Mapping[str, Any] = field(default_factory=dict)
    server_id: str | None = None
    run_jobs_interval: dt.timedelta = DEFAULT_RUN_JOBS_INTERVAL
    run_jobs_limit: int = DEFAULT_RUN_JOBS_LIMIT
    monitor_interval: dt.timedelta = DEFAULT_MONITOR_INTERVAL
    interrupt_threshold: dt.timedelta = DEFAULT_INTERRUPT_THRESHOLD
    retry_backoff: tuple[dt.timedelta, dt.timedelta] = DEFAULT_RETRY_BACKOFF
    run_retention: dt.timedelta = DEFAULT_RUN_RETENTION
    server_retention: dt.timedelta = DEFAULT_SERVER_RETENTION
    auto_migrate: bool = True
    listen: bool = True
    metrics_port: int | None = None  # a beat or worker serves Prometheus metrics on it (celery_dbsched.metrics)
    metrics_address: str = DEFAULT_METRICS_ADDRESS
    metrics_job_labels: int = DEFAULT_METRICS_JOB_LABELS
    # PostgreSQL: the statement watchdog (engine.make_engine); timedelta(0): off.
    client_timeout: dt.timedelta = DEFAULT_CLIENT_TIMEOUT
    # The dashboard's (`dbsched web`) token: actions need it; None: read-only (env DBSCHED_WEB_TOKEN also sets it).
    web_token: str | None = None
    # PostgreSQL through a transaction-mode pooler (dbsched_pooler): "transaction", or None (a direct
    # connection). It turns off what cannot work through one: server-side prepared statements, session SETs
    # and LISTEN (the beat polls at its run-jobs interval, as on MariaDB).
    pooler: str | None = None

    @classmethod
    def from_mapping(cls, conf: Mapping[str, Any]) -> Settings:
        """Read `dbsched_*` keys (e.g. `app.conf`); raises ValueError naming the first bad key."""

        def get(key: str) -> Any:
            return conf.get(key)

        _refuse_unknown_keys(conf)
        url = parse_database_url("dbsched_database_url", get("dbsched_database_url"))
        engine_options = get("dbsched_engine_options")
        if engine_options is None:
            engine_options = {}
        if not isinstance(engine_options, Mapping):
            raise ValueError(f"dbsched_engine_options: expected a dict, got {engine_options!r}")
        server_id = get("dbsched_server_id")
        if server_id is not None and (not isinstance(server_id, str) or not server_id.strip()):
            raise ValueError(f"dbsched_server_id: expected a non-empty string, got {server_id!r}")
        if server_id is not None and len(server_id) > 255:
            raise ValueError("dbsched_server_id: at most 255 characters")
        pooler = parse_pooler("dbsched_pooler", get("dbsched_pooler"))
        listen = parse_bool("dbsched_listen", get("dbsched_listen"), pooler is None)
        if pooler is not None and listen:
            raise ValueError(
                "dbsched_listen: LISTEN does not work through a transaction-mode pooler (dbsched_pooler is set): "
                "notifications never arrive; leave dbsched_listen unset (it is off with dbsched_pooler), and the "
                "beats poll at dbsched_run_jobs_interval"
            )
        metrics_address = get("dbsched_metrics_address")
        if metrics_address is not None and (not isinstance(metrics_address, str) or not metrics_address.strip()):
            raise ValueError(f"dbsched_metrics_address: expected a host name or IP address, got {metrics_address!r}")
        return cls(
            database_url=url or default_database_url(),
            engine_options=dict(engine_options),
            server_id=server_id,
            run_jobs_interval=_required_duration(
                "dbsched_run_jobs_interval", get("dbsched_run_jobs_interval"), DEFAULT_RUN_JOBS_INTERVAL
            ),
            run_jobs_limit=parse_positive_int(
                "dbsched_run_jobs_limit",
                get("dbsched_run_jobs_limit"),
                DEFAULT_RUN_JOBS_LIMIT,
                MAX_RUN_JOBS_LIMIT,
            ),
            monitor_interval=_required_duration(
                "dbsched_monitor_interval", get("dbsched_monitor_interval"), DEFAULT_MONITOR_INTERVAL
            ),
            interrupt_threshold=_required_duration(
                "dbsched_interrupt_threshold", get("dbsched_interrupt_threshold"), DEFAULT_INTERRUPT_THRESHOLD
            ),
            retry_backoff=parse_backoff("dbsched_retry_backoff", get("dbsched_retry_backoff")),
            run_retention=_required_duration(
                "dbsched_run_retention", get("dbsched_run_retention"), DEFAULT_RUN_RETENTION
            ),
            server_retention=_required_duration(
                "dbsched_server_retention", get("dbsched_server_retention"), DEFAULT_SERVER_RETENTION
            ),
            auto_migrate=parse_bool("dbsched_auto_migrate", get("dbsched_auto_migrate"), True),
            listen=listen,
            pooler=pooler,
            # 0 or unset: no exporter.
            metrics_port=parse_positive_int("dbsched_metrics_port", get("dbsched_metrics_port"), 0, 65535) or None,
            metrics_address=(metrics_address or DEFAULT_METRICS_ADDRESS).strip(),
            metrics_job_labels=parse_positive_int(
                "dbsched_metrics_job_labels",
                get("dbsched_metrics_job_labels"),
                DEFAULT_METRICS_JOB_LABELS,
                MAX_METRICS_JOB_LABELS,
            ),
            web_token=parse_web_token("dbsched_web_token", get("dbsched_web_token")),
            client_timeout=parse_client_timeout("dbsched_client_timeout", get("dbsched_client_timeout")),
        )

    def __repr__(self) -> str:
        # The URL's password and the web token are masked: settings end up in logs and tracebacks.
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["database_url"] = mask_database_url(self.database_url)
        values["web_token"] = None if self.web_token is None else "***"
        return f"Settings({', '.join(f'{name}={value!r}' for name, value in values.items())})"

    def client_timeout_seconds(self) -> float | None:
        """The watchdog's bound as `make_engine` takes it: seconds, or None when it is off."""
        return self.client_timeout.total_seconds() or None

    def beat_server_id(self) -> str:
        return self.server_id or default_server_id()


SETTING_PREFIX = "dbsched_"
KNOWN_KEYS = tuple(SETTING_PREFIX + f.name for f in fields(Settings))


def _refuse_unknown_keys(conf: Mapping[str, Any]) -> None:
    """A `dbsched_*` key that is not a setting is a typo, not something to ignore: ValueError naming the
    closest setting."""
    for key in conf:
        if isinstance(key, str) and key.lower().startswith(SETTING_PREFIX) and key not in KNOWN_KEYS:
            # Compared without the prefix, which every key shares and which would make any two look alike.
            names = [known[len(SETTING_PREFIX) :] for known in KNOWN_KEYS]
            close = difflib.get_close_matches(key.lower()[len(SETTING_PREFIX) :], names, n=1, cutoff=0.6)
            hint = f"did you mean {SETTING_PREFIX}{close[0]}?" if close else f"the settings are {', '.join(KNOWN_KEYS)}"
            raise ValueError(f"{key}: not a celery_dbsched setting; {hint}")


_SETTINGS_ATTRIBUTE = "_dbsched_settings"


def settings_for(app: Any) -> Settings:
    """The app's settings, parsed from `app.conf` at the first call and kept on the app (ValueError naming
    the first bad key)."""
    cached: Settings | None = app.__dict__.get(_SETTINGS_ATTRIBUTE)
    if cached is None:
        cached = Settings.from_mapping(app.conf)
        setattr(app, _SETTINGS_ATTRIBUTE, cached)
    return cached


def backoff_delay(
    failure_count: int, backoff: tuple[dt.timedelta, dt.timedelta], ceiling: dt.timedelta | None
) -> dt.timedelta:
    """Delay before retry number `failure_count` (1 = first retry): base * 2^(n-1), capped; never later
    than the job's own interval, so a failing job is retried no later than it would have run anyway."""
    base, cap = backoff
    exponent = min(max(failure_count - 1, 0), 62)
    delay = dt.timedelta(seconds=min(base.total_seconds() * 2.0**exponent, cap.total_seconds()))
    if ceiling is not None:
        delay = min(delay, ceiling)
    return delay
