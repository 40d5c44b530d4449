"""Hostile and bad input (issue 4): job names and descriptions, forged or stale run messages, every `dbsched_*`
setting with absurd values, database passwords in output, and a schema older or newer than the code.

Everything here runs in-process (the API, the beat's `Scheduler`, the worker's task and bootstep, the CLI through
click) on SQLite and PostgreSQL; one test runs an embedded Celery worker on `memory://` and on RabbitMQ.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
import traceback
import unicodedata
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from alembic import command
from celery import Celery
from celery.apps.beat import Beat
from celery.beat import Service
from click.testing import CliRunner
from helpers.apps import memory_app, next_message
from helpers.polling import wait_for
from helpers.services import RABBITMQ_URL, Database, require_service
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, inspect, select, text

from celery_dbsched import Job, JobContext, JobStatus, SchemaMismatch, job, register_job
from celery_dbsched.binding import forget_repository, repository_for
from celery_dbsched.cli import dbsched
from celery_dbsched.errors import CannotStart, DatabaseUnavailable, JobNotRegistered
from celery_dbsched.job import JobDefinition
from celery_dbsched.migrate import VERSION_TABLE, _config, check_schema, current_revision, head_revision, migrate
from celery_dbsched.protocol import MAX_RUN_ID, RUN_TASK_NAME, valid_run_id
from celery_dbsched.registry import registry_for
from celery_dbsched.repository import JobRepository
from celery_dbsched.scheduler import Scheduler
from celery_dbsched.schema import NAME_MAX_LENGTH, job_table, run_table
from celery_dbsched.settings import (
    DEFAULT_CLIENT_TIMEOUT,
    DEFAULT_INTERRUPT_THRESHOLD,
    DEFAULT_METRICS_ADDRESS,
    DEFAULT_METRICS_JOB_LABELS,
    DEFAULT_MONITOR_INTERVAL,
    DEFAULT_RETRY_BACKOFF,
    DEFAULT_RUN_JOBS_INTERVAL,
    DEFAULT_RUN_JOBS_LIMIT,
    DEFAULT_RUN_RETENTION,
    DEFAULT_SERVER_RETENTION,
    MAX_DURATION,
    MAX_METRICS_JOB_LABELS,
    MAX_RUN_JOBS_LIMIT,
    Settings,
    default_database_url,
)
from celery_dbsched.worker import DbschedWorkerStep, install_worker

pytestmark = pytest.mark.faults

PASSWORD = "s3cr3t-pw"
TABLES = {"dbsched_job", "dbsched_job_run"}


# --- helpers -----------------------------------------------------------------------------------------------


def _app(database_url: str, **conf: Any) -> Celery:
    return memory_app(database_url, main="hostile", **{"task_serializer": "json", "accept_content": ["json"], **conf})


@pytest.fixture
def apps() -> Iterator[Callable[..., Celery]]:
    """`apps(url, **conf)`: fresh apps whose repositories are closed after the test."""
    made: list[Celery] = []

    def factory(database_url: str, **conf: Any) -> Celery:
        app = _app(database_url, **conf)
        made.append(app)
        return app

    yield factory
    for app in made:
        if "_dbsched_registry" in app.__dict__:
            registry_for(app).detach()
        forget_repository(app)


def _cli(app: Celery, *args: str) -> Any:
    """`celery -A app dbsched ARGS` in-process (the same click commands; Celery passes its app as ctx.obj)."""
    return CliRunner().invoke(dbsched, list(args), obj=SimpleNamespace(app=app), catch_exceptions=True)


def _clean_cli_error(result: Any) -> str:
    """A failure the user can act on: exit code 1, an `Error:` line, no traceback (click's own handling)."""
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Error:" in result.output and "Traceback" not in result.output, result.output
    return str(result.output)


def _tables(repository: JobRepository) -> set[str]:
    return set(inspect(repository.engine).get_table_names()) & TABLES


def _job_count(repository: JobRepository) -> int:
    with repository.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(job_table)).scalar_one())


def _with_password(url: str, password: str = PASSWORD) -> str:
    scheme, rest = url.split("://", 1)
    host = rest.rpartition("@")[2]
    return f"{scheme}://postgres:{password}@{host}"


# --- job names and descriptions ------------------------------------------------------------------------------


def _name_is_valid(name: str) -> bool:
    """design §8 plus what keeps logs and tables readable: non-blank, at most 128 characters, no control
    characters (C0/C1), no line or paragraph separators, storable as UTF-8 (no lone surrogates)."""
    return (
        bool(name.strip())
        and len(name) <= NAME_MAX_LENGTH
        and not any(unicodedata.category(ch) in ("Cc", "Zl", "Zp", "Cs") for ch in name)
    )


def _description_is_valid(description: str) -> bool:
    return (
        bool(description.strip())
        and "\x00" not in description
        and not any(unicodedata.category(ch) == "Cs" for ch in description)
    )


HOSTILE_NAMES = [
    pytest.param("", id="empty"),
    pytest.param(" ", id="space"),
    pytest.param("\t\n ", id="whitespace"),
    pytest.param("\u3000", id="ideographic-space"),
    pytest.param("x" * 10_000, id="10000-chars"),
    pytest.param("x" * NAME_MAX_LENGTH, id="128-chars"),
    pytest.param("x" * (NAME_MAX_LENGTH + 1), id="129-chars"),
    pytest.param("\U0001f642" * NAME_MAX_LENGTH, id="128-emoji"),
    pytest.param("é" * (NAME_MAX_LENGTH + 1), id="129-accented"),
    pytest.param("ジョブ.毎晩の掃除", id="japanese"),
    pytest.param("عمل-ليلي", id="arabic"),
    pytest.param("\u202eevil\u202c.txt", id="rtl-override"),
    pytest.param("e\u0301", id="combining-accent"),
    pytest.param("\u00e9", id="precomposed-accent"),
    pytest.param("'; drop table dbsched_job; --", id="sql-drop-job"),
    pytest.param("Robert'); DROP TABLE dbsched_job_run;--", id="sql-drop-run"),
    pytest.param('x" OR "1"="1', id="sql-double-quote"),
    pytest.param("x' OR '1'='1", id="sql-single-quote"),
    pytest.param("%s %(name)s {0} {name} \\ \\\\ %%", id="format-strings"),
    pytest.param("_%", id="like-wildcards"),
    pytest.param(" padded ", id="padded"),
    pytest.param("a\x00b", id="nul"),
    pytest.param("a\nb", id="newline"),
    pytest.param("a\x1bb", id="escape"),
    pytest.param("a\x85b", id="c1-next-line"),
    pytest.param("a\u2028b", id="line-separator"),
    pytest.param("a\ud800b", id="lone-surrogate"),
]


class NamedJob(Job):
    def __init__(self, name: str, description: str = "a hostile job") -> None:
        self.name = name
        self.description = description

    def status(self) -> JobStatus:
        return JobStatus(0, 0)

    def run(self, ctx: JobContext) -> None:
        pass

    def next_run_in(self) -> dt.timedelta | None:
        return None


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_a_hostile_job_name_round_trips_or_is_a_clear_value_error(
    database: Database, apps: Callable[..., Celery], name: str
) -> None:
    """Through every door a name comes in: `@job`, `register_job`, `JobRepository.upsert_job`; then lookups,
    claiming, pull-in, the CLI's `jobs`, `pause`, `resume`, `trigger`; the tables survive either way."""
    repository = database.migrated_repository()
    app = apps(database.url)
    registry = registry_for(app)
    registry.sync(repository_for(app))
    repository.upsert_job("bystander", "a job that must survive")
    doors: list[Callable[[], object]] = [
        lambda: repository.upsert_job(name, "a hostile job"),
        lambda: register_job(app, NamedJob(name)),
        lambda: job(app, name=name, description="a hostile job")(lambda ctx: None),
        lambda: JobDefinition(name=name, description="a hostile job"),
    ]
    if not _name_is_valid(name):
        for door in doors:
            with pytest.raises(ValueError, match="job name") as excinfo:
                door()
            assert "Traceback" not in str(excinfo.value)
            assert type(excinfo.value) is ValueError  # ours, not a codec or driver error that happens to be one
        assert name not in registry
        assert [j.name for j in repository.list_jobs()] == ["bystander"]
    else:
        for door in doors:
            door()
        record = repository.lookup_job(name)
        assert record.name == name and record.description == "a hostile job"
        assert list(repository.lookup_jobs([name])) == [name]
        assert sorted(j.name for j in repository.list_jobs()) == sorted(["bystander", name])
        assert repository.update_job_next_run_in_at_least(name, dt.timedelta(0)).name == name
        runs = {run.job_name: run for run in repository.claim_runs("beat", 10).runs}
        assert set(runs) == {"bystander", name}
        assert repository.start_run(runs[name].id, "w").job_name == name
        assert repository.lookup_run(runs[name].id).job_name == name
        assert [run.job_name for run in repository.list_runs(job_name=name)] == [name]
        listing = _cli(app, "jobs")
        assert listing.exit_code == 0, listing.output
        assert name.strip() in listing.output
        for command_name in ("pause", "resume", "trigger"):
            result = _cli(app, command_name, "--", name)
            assert result.exit_code == 0, result.output
        assert not repository.lookup_job(name).paused
    # Unknown names are looked up safely too (a clear "not found", never SQL).
    unknown = name + "-unknown" if _name_is_valid(name + "-unknown") else "unknown'; --"
    assert "not found" in _clean_cli_error(_cli(app, "pause", "--", unknown))
    assert _tables(repository) == TABLES
    assert repository.lookup_job("bystander").description == "a job that must survive"


HYPOTHESIS_EXAMPLES = 200
SPECIAL = ["", " ", "'; drop table dbsched_job; --", "x" * 10_000, "x" * 128, "x" * 129, "a\ud800", "\x00"]
# Any code point at all (controls, lone surrogates, separators, NUL), and printable text that is mostly valid.
any_text = st.text(st.characters(exclude_categories=()), max_size=140)
printable = st.text(st.characters(exclude_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=128)
names = st.one_of(st.sampled_from(SPECIAL), any_text, printable, printable, st.text(min_size=120, max_size=135))
descriptions = st.one_of(st.sampled_from(SPECIAL), any_text, printable, st.text(min_size=1, max_size=2000))


@dataclass
class Tally:
    stored: int = 0
    rejected: int = 0
    names: set[str] = field(default_factory=set)


def _check_name_and_description(repository: JobRepository, tally: Tally, name: str, description: str) -> None:
    expected_ok = _name_is_valid(name) and _description_is_valid(description)
    try:
        JobDefinition(name=name, description=description)
    except ValueError as exc:
        assert not expected_ok, (name, description, exc)
        assert type(exc) is ValueError and ("job name" in str(exc) or "description" in str(exc)), exc
        with pytest.raises(ValueError):
            repository.upsert_job(name, description)
        with pytest.raises(ValueError):
            register_job(Celery(set_as_current=False), NamedJob(name, description))
        tally.rejected += 1
        return
    assert expected_ok, (name, description)
    stored = repository.upsert_job(name, description)
    looked_up = repository.lookup_job(name)
    assert stored.name == looked_up.name == name
    assert stored.description == looked_up.description == description
    tally.stored += 1
    tally.names.add(name)


@pytest.mark.slow
@pytest.mark.parametrize(
    "db",
    [
        "sqlite",
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("mariadb", marks=pytest.mark.mariadb),
    ],
)
def test_hypothesis_names_and_descriptions_round_trip_or_are_rejected(request: pytest.FixtureRequest, db: str) -> None:
    database: Database = request.getfixturevalue(f"{db}_database")
    repository = database.migrated_repository()
    tally = Tally()

    @settings(
        max_examples=HYPOTHESIS_EXAMPLES,
        deadline=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(name=names, description=descriptions)
    def check(name: str, description: str) -> None:
        _check_name_and_description(repository, tally, name, description)

    check()
    # The tables survived every example and hold exactly the jobs that were accepted.
    assert _tables(repository) == TABLES
    assert _job_count(repository) == len(tally.names)
    assert {j.name for j in repository.list_jobs()} == tally.names
    assert tally.stored > 0 and tally.rejected > 0, tally  # both outcomes were exercised
    print(f"{db}: {tally.stored} stored, {tally.rejected} rejected, {len(tally.names)} distinct names")


# --- run messages --------------------------------------------------------------------------------------------


@dataclass
class WorkerSide:
    app: Celery
    repository: JobRepository
    ran: list[int]

    def deliver(self, *args: Any) -> Any:
        """The run task's body, as the worker runs it for a message with these args."""
        return self.app.tasks[RUN_TASK_NAME].apply(args=list(args), serializer="json").get(propagate=True)

    def queued_run(self, name: str = "hostile.registered") -> int:
        self.repository.update_job_next_run_in_at_least(name, dt.timedelta(0))
        [run] = [run for run in self.repository.claim_runs("beat", 10).runs if run.job_name == name]
        return run.id


@pytest.fixture
def worker_side(database: Database, apps: Callable[..., Celery]) -> WorkerSide:
    app = apps(database.url, dbsched_monitor_interval=0.2)
    ran: list[int] = []

    @job(app, name="hostile.registered", description="the only code this worker runs", first_run_in=3600)
    def registered(ctx: JobContext) -> None:
        ran.append(ctx.run_id)

    repository = repository_for(app)
    migrate(repository.engine)
    registry_for(app).sync(repository)
    return WorkerSide(app, repository, ran)


MALFORMED_RUN_IDS = ["1", "", None, 0, -1, True, False, 1.0, 1.5, float("nan"), [1], {"id": 1}, MAX_RUN_ID + 1, 2**70]


def test_a_run_message_with_a_malformed_run_id_is_dropped_and_logged(
    worker_side: WorkerSide, caplog: pytest.LogCaptureFixture
) -> None:
    queued = worker_side.queued_run()
    caplog.set_level(logging.DEBUG)
    for run_id in MALFORMED_RUN_IDS:
        assert valid_run_id(run_id) is None  # the check the run task and beat_schedule run tracking share
        caplog.clear()
        assert worker_side.deliver(run_id, "hostile.registered") is None
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and "malformed run id" in errors[0], (run_id, errors)
    assert worker_side.ran == []
    assert worker_side.repository.lookup_run(queued).status == "queued"  # untouched


def test_a_run_message_for_an_unknown_run_is_dropped_and_logged(
    worker_side: WorkerSide, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    for run_id in (987654, MAX_RUN_ID):
        caplog.clear()
        assert worker_side.deliver(run_id, "hostile.registered") is None
        assert any(f"run {run_id} not found" in r.getMessage() for r in caplog.records), caplog.text
    assert worker_side.ran == []
    assert worker_side.repository.list_runs() == []


def test_a_run_message_for_a_finished_run_is_dropped_and_logged(
    worker_side: WorkerSide, caplog: pytest.LogCaptureFixture
) -> None:
    repository = worker_side.repository
    completed = worker_side.queued_run()
    assert worker_side.deliver(completed, "hostile.registered") == "completed"
    assert worker_side.ran == [completed]
    cancelled = worker_side.queued_run()
    repository.interrupt_run(cancelled)
    caplog.set_level(logging.WARNING)
    for run_id, status in ((completed, "completed"), (completed, "completed"), (cancelled, "interrupted")):
        caplog.clear()
        assert worker_side.deliver(run_id, "hostile.registered") is None
        assert any(f"is {status}, not queued" in r.getMessage() for r in caplog.records), caplog.text
        assert repository.lookup_run(run_id).status == status
    assert worker_side.ran == [completed]  # a run starts at most once (design §3)


def test_the_job_named_in_a_message_never_chooses_the_code(
    worker_side: WorkerSide, caplog: pytest.LogCaptureFixture
) -> None:
    repository = worker_side.repository
    # A message naming other code for a real run: the database's job runs, nothing else.
    run_id = worker_side.queued_run()
    assert worker_side.deliver(run_id, "os.system") == "completed"
    assert worker_side.ran == [run_id]
    # A run of a job that exists in the database but not in this worker's code: failed, named, nothing ran.
    repository.upsert_job("hostile.not-in-code", "registered by another deployment")
    foreign = worker_side.queued_run("hostile.not-in-code")
    caplog.set_level(logging.ERROR)
    with pytest.raises(JobNotRegistered, match=r"'hostile\.not-in-code' is not registered on worker"):
        worker_side.deliver(foreign, "hostile.registered")  # its task fails
    run = repository.lookup_run(foreign)
    assert run.status == "failed" and "'hostile.not-in-code' is not registered on worker" in (run.error or "")
    assert any("not registered on worker" in r.getMessage() for r in caplog.records)
    assert worker_side.ran == [run_id]


def _broker_conf(kind: str) -> dict[str, Any]:
    if kind == "memory":
        return {"broker_url": "memory://", "broker_transport_options": {"polling_interval": 0.05}}
    require_service(kind)
    return {"broker_url": RABBITMQ_URL, "broker_connection_retry_on_startup": True}


@pytest.mark.slow
@pytest.mark.parametrize("broker_kind", ["memory", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
@pytest.mark.usefixtures("shutdown_undone")  # the embedded worker's stop marks this process shutting down
def test_a_real_worker_runs_only_json_run_messages_of_registered_jobs(
    sqlite_database: Database, apps: Callable[..., Celery], broker_kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An embedded Celery worker that even accepts pickle for other tasks: a pickled run message is refused
    before it is decoded, a message for a task that is not registered is refused, a JSON run message runs."""
    from celery.contrib.testing.worker import start_worker
    from celery.worker import state as worker_state

    app = apps(
        sqlite_database.url,
        accept_content=["json", "pickle"],
        worker_hijack_root_logger=False,  # keep pytest's log capture
        **_broker_conf(broker_kind),
    )
    ran: list[int] = []

    @job(app, name="hostile.registered", description="the only code this worker runs", first_run_in=3600)
    def registered(ctx: JobContext) -> None:
        ran.append(ctx.run_id)

    repository = repository_for(app)
    caplog.set_level(logging.INFO)
    queue = app.conf.task_default_queue
    try:
        with start_worker(app, pool="solo", perform_ping_check=False, loglevel="INFO", shutdown_timeout=10):
            repository.update_job_next_run_in_at_least("hostile.registered", dt.timedelta(0))
            [run] = repository.claim_runs("beat", 10).runs
            app.send_task(RUN_TASK_NAME, args=[run.id, "hostile.registered"], serializer="pickle")
            app.send_task("os.system", args=["echo pwned"], serializer="json")
            app.send_task("celery_dbsched.not_a_task", args=[run.id], serializer="json")
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not (
                "run messages are JSON only" in caplog.text and caplog.text.count("unregistered task") >= 2
            ):
                time.sleep(0.05)
            assert "run messages are JSON only" in caplog.text, caplog.text
            assert "unregistered task of type 'os.system'" in caplog.text, caplog.text
            assert "unregistered task of type 'celery_dbsched.not_a_task'" in caplog.text, caplog.text
            assert ran == [] and repository.lookup_run(run.id).status == "queued"
            # The same run, sent as the beat sends it (JSON), runs once.
            app.send_task(RUN_TASK_NAME, args=[run.id, "hostile.registered"], serializer="json")
            while time.monotonic() < deadline and repository.lookup_run(run.id).status != "completed":
                time.sleep(0.05)
            assert repository.lookup_run(run.id).status == "completed"
            assert ran == [run.id]
            stopping = time.monotonic()
            # Stop now rather than after the worker loop's 2 s wait for messages: ask, then wake it up.
            worker_state.should_terminate = 0
            app.send_task("hostile.wake-up", serializer="json")
    finally:
        if broker_kind != "memory":
            with app.connection_for_write() as conn:
                conn.default_channel.queue_delete(queue)
    print(f"{broker_kind}: worker stopped in {time.monotonic() - stopping:.2f}s")


def test_the_beat_publishes_run_messages_as_json_whatever_the_task_serializer(
    sqlite_database: Database, apps: Callable[..., Celery]
) -> None:
    app = apps(sqlite_database.url, task_serializer="pickle", accept_content=["json", "pickle"])
    scheduler = Scheduler(app=app)
    try:
        scheduler.repository.upsert_job("hostile.'; drop table dbsched_job; --", "due now")
        scheduler.tick()
        message = next_message(app, timeout=5)
    finally:
        scheduler.close()
    assert message.headers["task"] == RUN_TASK_NAME
    assert message.content_type == "application/json"
    args, kwargs, _ = json.loads(message.body)
    [run] = scheduler.repository.list_runs()
    assert args == [run.id, "hostile.'; drop table dbsched_job; --"] and kwargs == {}


# --- settings: every key x every kind of bad value -----------------------------------------------------------

NAN, INF = float("nan"), float("inf")
MAX_SECONDS = MAX_DURATION.total_seconds()

# The kinds of value every setting is tried with.
VALUES: dict[str, Any] = {
    "unset": None,
    "zero": 0,
    "negative": -1,
    "huge": 10**12,
    "beyond-float": 10**400,
    "bool-true": True,
    "bool-false": False,
    "nan": NAN,
    "inf": INF,
    "-inf": -INF,
    "junk-string": "soon",
    "list": [1],
    "dict": {"a": 1},
    "object": object(),
}

ERROR = object()  # expected: a ValueError naming the key


def _durations(default: Any) -> dict[str, Any]:
    return {
        "unset": default,
        "zero": default,
        "negative": ERROR,
        "huge": ERROR,
        "beyond-float": ERROR,
        "bool-true": ERROR,
        "bool-false": ERROR,
        "nan": ERROR,
        "inf": ERROR,
        "-inf": ERROR,
        "junk-string": ERROR,
        "list": ERROR,
        "dict": ERROR,
        "object": ERROR,
    }


def _booleans() -> dict[str, Any]:
    return {**_durations(True), "zero": False, "bool-true": True, "bool-false": False}


def _strings(unset: Any) -> dict[str, Any]:
    return {**_durations(unset), "zero": ERROR}


# What each setting does with each kind of value (documented in design §10 and docs/reliability.md):
# numbers: 0/unset = the default, negative/non-finite/wrong type/bool = ValueError, beyond the cap = ValueError;
# booleans: 0/1 and true/false strings are booleans; strings and dicts: 0 is a wrong type like any number.
EXPECTED: dict[str, tuple[str, dict[str, Any]]] = {
    "dbsched_run_jobs_interval": ("run_jobs_interval", _durations(DEFAULT_RUN_JOBS_INTERVAL)),
    "dbsched_monitor_interval": ("monitor_interval", _durations(DEFAULT_MONITOR_INTERVAL)),
    "dbsched_interrupt_threshold": ("interrupt_threshold", _durations(DEFAULT_INTERRUPT_THRESHOLD)),
    "dbsched_run_retention": ("run_retention", _durations(DEFAULT_RUN_RETENTION)),
    "dbsched_server_retention": ("server_retention", _durations(DEFAULT_SERVER_RETENTION)),
    "dbsched_run_jobs_limit": ("run_jobs_limit", _durations(DEFAULT_RUN_JOBS_LIMIT)),
    # A zero backoff base is kept (retry at once, Boundary's behaviour); the cap stays the default.
    "dbsched_retry_backoff": (
        "retry_backoff",
        {**_durations(DEFAULT_RETRY_BACKOFF), "zero": (dt.timedelta(0), DEFAULT_RETRY_BACKOFF[1])},
    ),
    "dbsched_auto_migrate": ("auto_migrate", _booleans()),
    "dbsched_listen": ("listen", _booleans()),
    "dbsched_server_id": ("server_id", {**_strings(None), "junk-string": "soon"}),
    "dbsched_database_url": ("database_url", _strings(default_database_url())),
    "dbsched_engine_options": ("engine_options", {**_strings({}), "dict": {"a": 1}}),
    "dbsched_metrics_port": ("metrics_port", _durations(None)),  # 0/unset: no exporter
    "dbsched_metrics_address": ("metrics_address", {**_strings(DEFAULT_METRICS_ADDRESS), "junk-string": "soon"}),
    "dbsched_metrics_job_labels": ("metrics_job_labels", _durations(DEFAULT_METRICS_JOB_LABELS)),
    # The dashboard's token: a string of at least 16 characters ("soon" is too short).
    "dbsched_web_token": ("web_token", _strings(None)),
    # The statement watchdog: 0 turns it off (timedelta(0)) rather than meaning the default.
    "dbsched_client_timeout": ("client_timeout", {**_durations(DEFAULT_CLIENT_TIMEOUT), "zero": dt.timedelta(0)}),
    # "pgbouncer" or "transaction" (test_pgbouncer.py), else a ValueError naming the accepted values.
    "dbsched_pooler": ("pooler", _strings(None)),
}

# Per key, the largest accepted value and what it becomes.
LARGEST: dict[str, tuple[Any, Any]] = {
    "dbsched_run_jobs_interval": (MAX_SECONDS, MAX_DURATION),
    "dbsched_monitor_interval": (MAX_SECONDS, MAX_DURATION),
    "dbsched_interrupt_threshold": (MAX_SECONDS, MAX_DURATION),
    "dbsched_run_retention": (MAX_SECONDS, MAX_DURATION),
    "dbsched_server_retention": (MAX_SECONDS, MAX_DURATION),
    "dbsched_run_jobs_limit": (MAX_RUN_JOBS_LIMIT, MAX_RUN_JOBS_LIMIT),
    "dbsched_retry_backoff": ((MAX_SECONDS, MAX_SECONDS), (MAX_DURATION, MAX_DURATION)),
    "dbsched_server_id": ("s" * 255, "s" * 255),
    "dbsched_database_url": ("sqlite:///" + "d" * 10_000, "sqlite:///" + "d" * 10_000),
    "dbsched_metrics_port": (65535, 65535),
    "dbsched_metrics_job_labels": (MAX_METRICS_JOB_LABELS, MAX_METRICS_JOB_LABELS),
    "dbsched_web_token": ("t" * 10_000, "t" * 10_000),
    "dbsched_client_timeout": (MAX_SECONDS, MAX_DURATION),
}

SETTING_CASES = [
    pytest.param(key, kind, id=f"{key.removeprefix('dbsched_')}-{kind}") for key in EXPECTED for kind in VALUES
]


def test_the_table_covers_every_setting() -> None:
    assert {f"dbsched_{name}" for name in Settings.__dataclass_fields__} == set(EXPECTED)
    assert all(set(expected) == set(VALUES) for _, expected in EXPECTED.values())


@pytest.mark.parametrize(("key", "kind"), SETTING_CASES)
def test_every_setting_with_every_kind_of_bad_value(key: str, kind: str) -> None:
    attribute, expected = EXPECTED[key]
    outcome = expected[kind]
    value = VALUES[kind]
    if outcome is ERROR:
        with pytest.raises(ValueError, match=f"^{key}") as excinfo:
            Settings.from_mapping({key: value})
        assert type(excinfo.value) is ValueError
        # The same refusal, naming the key, where the settings are read: beat, worker, CLI.
        app = _app("sqlite:////nonexistent/never-opened.sqlite3", **{key: value})
        with pytest.raises(CannotStart, match=f"the beat cannot start: {key}"):
            Scheduler(app=app, lazy=True)
        with pytest.raises(CannotStart, match=f"the worker cannot start: {key}"):
            DbschedWorkerStep(SimpleNamespace(app=app, hostname="w"))
        assert f"{key}" in _clean_cli_error(_cli(app, "jobs"))
    else:
        assert getattr(Settings.from_mapping({key: value}), attribute) == outcome


@pytest.mark.parametrize("key", sorted(LARGEST))
def test_the_largest_accepted_value_of_each_setting(key: str) -> None:
    value, parsed = LARGEST[key]
    attribute, _ = EXPECTED[key]
    assert getattr(Settings.from_mapping({key: value}), attribute) == parsed


def test_huge_but_accepted_settings_work_without_overflow(database: Database, apps: Callable[..., Celery]) -> None:
    """Every duration at its cap (100 years) and the largest claim batch: the beat claims, publishes, runs its
    monitor and prunes; a worker runs a failing job and backs off: no timedelta, float or SQL overflow."""
    app = apps(
        database.url,
        dbsched_run_jobs_interval=MAX_SECONDS,
        dbsched_monitor_interval=MAX_SECONDS,
        dbsched_interrupt_threshold=MAX_SECONDS,
        dbsched_run_retention=MAX_SECONDS,
        dbsched_retry_backoff=(MAX_SECONDS, MAX_SECONDS),
        dbsched_run_jobs_limit=MAX_RUN_JOBS_LIMIT,
    )

    @job(app, name="hostile.fails", description="always fails", every=MAX_SECONDS)
    def fails(ctx: JobContext) -> None:
        raise RuntimeError("boom")

    scheduler = Scheduler(app=app)
    try:
        sleep = scheduler.tick()
        assert 0 < sleep <= scheduler.max_interval
        repository = scheduler.repository
        [run] = repository.list_runs()
        with pytest.raises(RuntimeError, match="boom"):  # the task fails with the job's exception
            app.tasks[RUN_TASK_NAME].apply(args=[run.id, run.job_name]).get()
        assert repository.lookup_run(run.id).status == "failed"
        record = repository.lookup_job("hostile.fails")
        assert record.failure_count == 1
        assert record.next_scheduled_run - repository.database_now() > dt.timedelta(days=365)
        assert repository.interrupt_runs() == [] and repository.prune_runs(MAX_DURATION) == 0
        repository.update_job_next_run_in_at_least("hostile.fails", MAX_DURATION)
        scheduler.tick()
    finally:
        scheduler.close()


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"no_such_option": 1}, "dbsched_engine_options"),
        ({"connect_args": 5}, "dbsched_engine_options"),
        ({"pool_size": "x"}, "dbsched_engine_options"),
    ],
)
def test_engine_options_sqlalchemy_refuses_are_a_value_error_naming_the_key(
    sqlite_database: Database, apps: Callable[..., Celery], options: dict[str, Any], key: str
) -> None:
    app = apps(sqlite_database.url, dbsched_engine_options=options)
    with pytest.raises(CannotStart, match=f"cannot start: {key}"):
        Scheduler(app=app)
    assert key in _clean_cli_error(_cli(app, "jobs"))


def test_an_unknown_database_driver_is_a_value_error_naming_the_url_key(apps: Callable[..., Celery]) -> None:
    app = apps(f"postgresql+nosuchdriver://postgres:{PASSWORD}@127.0.0.1/test")
    with pytest.raises(CannotStart, match=r"cannot start: dbsched_database_url") as excinfo:
        Scheduler(app=app)
    output = _clean_cli_error(_cli(app, "migrate"))
    assert "dbsched_database_url" in output
    assert PASSWORD not in output + str(excinfo.value)


# --- a password in the database URL never shows ---------------------------------------------------------------


def _leaks(text_: str) -> bool:
    return PASSWORD in text_


def _all_log_text(caplog: pytest.LogCaptureFixture) -> str:
    parts = []
    for record in caplog.records:
        parts.append(record.getMessage())
        if record.exc_info:
            parts.append("".join(traceback.format_exception(*record.exc_info)))
    return "\n".join(parts)


def test_settings_and_repository_never_show_the_password() -> None:
    url = f"postgresql+psycopg://postgres:{PASSWORD}@127.0.0.1:5432/test"
    settings_ = Settings.from_mapping({"dbsched_database_url": url})
    assert settings_.database_url == url  # kept for connecting
    for shown in (repr(settings_), str(settings_)):
        assert not _leaks(shown) and "postgres:***@127.0.0.1" in shown
    repository = JobRepository(url)
    try:
        assert not _leaks(repr(repository)) and not _leaks(repr(repository.engine))
    finally:
        repository.close()
    # A sqlalchemy URL object keeps its real password for connecting (str() of it would mask it as ***).
    from sqlalchemy.engine import make_url

    from_object = Settings.from_mapping({"dbsched_database_url": make_url(url)})
    assert from_object.database_url == url and not _leaks(repr(from_object))
    # Refused URLs are not echoed back.
    for bad in (url.encode(), f"not a url {PASSWORD}", f"postgresql://postgres:{PASSWORD}@h:notaport/db"):
        with pytest.raises(ValueError, match=r"^dbsched_database_url") as excinfo:
            Settings.from_mapping({"dbsched_database_url": bad})
        assert not _leaks(str(excinfo.value))


def test_the_beat_banner_masks_the_password(apps: Callable[..., Celery]) -> None:
    url = f"postgresql+psycopg://postgres:{PASSWORD}@127.0.0.1:1/test"
    app = apps(url, broker_url=f"amqp://guest:{PASSWORD}@127.0.0.1:1//")
    banner = Beat(app=app, scheduler="celery_dbsched.Scheduler").startup_info(Service(app=app, scheduler_cls=Scheduler))
    assert "db -> postgresql+psycopg://postgres:***@127.0.0.1:1/test" in banner, banner
    assert not _leaks(banner), banner


def wait_out_at_worker_start(app: Celery, caplog: pytest.LogCaptureFixture) -> None:
    """Start the worker's bootstep against a database that is down: it waits (one ERROR line) until a warm
    shutdown is asked (Celery's signal handler sets `state.should_stop`), then ends the start with exit 0."""
    from celery.worker import state

    step = DbschedWorkerStep(SimpleNamespace(app=app, hostname="w@host"))
    ended: list[BaseException] = []

    def start() -> None:
        try:
            step.start(SimpleNamespace(app=app, hostname="w@host", pool=None))
        except BaseException as exc:
            ended.append(exc)

    thread = threading.Thread(target=start)
    thread.start()
    try:
        wait_for(lambda: "the worker waits for it" in caplog.text, 30, message="the worker's outage line")
        assert thread.is_alive()
    finally:
        state.should_stop = 0
        thread.join(30)
        state.should_stop = None
    [exit_] = ended
    assert isinstance(exit_, SystemExit) and exit_.code == 0


@pytest.mark.postgres
def test_an_unreachable_database_never_logs_the_password(
    apps: Callable[..., Celery], caplog: pytest.LogCaptureFixture
) -> None:
    """Beat start and tick, worker start and a run message, the CLI: each fails clearly, password masked."""
    require_service("postgres")
    url = f"postgresql+psycopg://postgres:{PASSWORD}@127.0.0.1:1/test?connect_timeout=3"
    app = apps(url, dbsched_interrupt_threshold=1)  # a worker waits out an outage up to the threshold
    caplog.set_level(logging.DEBUG)
    shown: list[str] = []
    scheduler = Scheduler(app=app)  # logs "database unavailable at start" and keeps going
    try:
        scheduler.tick()
        scheduler.tick()
        shown.append(scheduler.info)
    finally:
        scheduler.close()
    wait_out_at_worker_start(app, caplog)  # the worker's start waits the outage out, saying so (logged)
    install_worker(app)  # the run task
    with pytest.raises(DatabaseUnavailable) as excinfo:
        app.tasks[RUN_TASK_NAME].apply(args=[1, "x"]).get()
    shown.append("".join(traceback.format_exception(excinfo.value)))
    cli: dict[str, str] = {}
    for args in (["migrate"], ["jobs"], ["runs"], ["pause", "x"], ["resume", "x"], ["trigger", "x"], ["cancel", "x"]):
        cli[args[0]] = _clean_cli_error(_cli(app, *args))
    shown.extend(cli.values())
    logged = _all_log_text(caplog)
    assert "database unavailable" in logged
    assert "postgres:***@127.0.0.1:1" in cli["migrate"]  # `migrate` names the (masked) URL it could not reach
    for text_ in [*shown, logged]:
        assert not _leaks(text_), text_


@pytest.mark.postgres
def test_a_reachable_database_with_a_password_never_shows_it(
    postgres_database: Database, apps: Callable[..., Celery], caplog: pytest.LogCaptureFixture
) -> None:
    # The test server trusts local connections and ignores the password.
    url = _with_password(postgres_database.url)
    app = apps(url)
    caplog.set_level(logging.DEBUG)
    outputs = [_clean_cli_error(_cli(app, "jobs"))]  # before migrate: a clear error
    for args in (["migrate"], ["migrate"], ["jobs"], ["runs"], ["runs", "--job", "nope"], ["trigger", "nope"]):
        outputs.append(_cli(app, *args).output)
    assert "postgres:***@127.0.0.1" in outputs[1]
    scheduler = Scheduler(app=app)
    try:
        scheduler.tick()
        outputs.append(scheduler.info)
    finally:
        scheduler.close()
    for text_ in [*outputs, _all_log_text(caplog)]:
        assert not _leaks(text_), text_


# --- a schema older or newer than the code ----------------------------------------------------------------------


def _migrate_to(repository: JobRepository, revision: str) -> None:
    with repository.engine.begin() as conn:
        command.upgrade(_config(conn), revision)
    assert current_revision(repository.engine) == revision


def _fake_worker(app: Celery) -> Any:
    return SimpleNamespace(app=app, hostname=f"w-{uuid.uuid4().hex[:6]}@host", pool=None)


MIGRATE_HINT = "celery -A proj dbsched migrate"


def test_an_older_schema_asks_for_migrate_everywhere(database: Database, apps: Callable[..., Celery]) -> None:
    """Migrated to 0001 only, code at a later head: the beat, the worker, the repository and the CLI each
    say to run the migrate command; nothing reports it as an outage or shows SQL."""
    assert head_revision() != "0001"
    repository = database.repository()
    _migrate_to(repository, "0001")
    with pytest.raises(SchemaMismatch) as excinfo:
        check_schema(repository.engine)
    assert f"schema revision '0001', this celery_dbsched needs '{head_revision()}'" in str(excinfo.value)
    assert MIGRATE_HINT in str(excinfo.value)

    app = apps(database.url, dbsched_auto_migrate=False)
    with pytest.raises(CannotStart, match="schema revision '0001'") as start:
        Scheduler(app=app)  # beat start
    assert MIGRATE_HINT in str(start.value) and isinstance(start.value.__cause__, SchemaMismatch)
    with pytest.raises(CannotStart, match="schema revision '0001'") as start:
        DbschedWorkerStep(_fake_worker(app)).start(_fake_worker(app))  # worker start
    assert MIGRATE_HINT in str(start.value) and isinstance(start.value.__cause__, SchemaMismatch)

    # Code that skips the check (a running process, a script) gets the hint too, not "database unavailable".
    operations: list[Callable[[], object]] = [
        repository.list_jobs,
        lambda: repository.lookup_job("x"),
        lambda: repository.upsert_job("x", "y"),
        lambda: repository.claim_runs("beat", 10).runs,
        lambda: repository.start_run(1, "w"),
        repository.next_due_in,
    ]
    for operation in operations:
        with pytest.raises(SchemaMismatch) as excinfo:
            operation()
        assert MIGRATE_HINT in str(excinfo.value) and "older than this celery_dbsched" in str(excinfo.value)
        assert "SELECT" not in str(excinfo.value) and "LINE" not in str(excinfo.value)
    install_worker(app)
    with pytest.raises(SchemaMismatch, match="dbsched migrate"):
        app.tasks[RUN_TASK_NAME].apply(args=[1, "x"]).get()  # a run message reaching a worker

    for args in (["jobs"], ["runs"], ["runs", "--job", "x"], ["pause", "x"], ["trigger", "x"], ["cancel", "x"]):
        output = _clean_cli_error(_cli(app, *args))
        assert "dbsched migrate" in output and "SELECT" not in output, (args, output)

    result = _cli(app, "migrate")
    assert result.exit_code == 0, result.output
    assert f"schema migrated from 0001 to {head_revision()}" in result.output
    assert current_revision(repository.engine) == head_revision()
    Scheduler(app=app).close()  # starts now


def test_a_beat_with_auto_migrate_upgrades_an_older_schema(database: Database, apps: Callable[..., Celery]) -> None:
    repository = database.repository()
    _migrate_to(repository, "0001")
    scheduler = Scheduler(app=apps(database.url))
    try:
        scheduler.tick()
    finally:
        scheduler.close()
    assert current_revision(repository.engine) == head_revision()


def test_a_newer_schema_says_the_code_is_too_old_everywhere(database: Database, apps: Callable[..., Celery]) -> None:
    repository = database.migrated_repository()
    with repository.engine.begin() as conn:
        conn.execute(text(f"UPDATE {VERSION_TABLE} SET version_num = '9999_from_the_future'"))
    for auto_migrate in (True, False):
        app = apps(database.url, dbsched_auto_migrate=auto_migrate)
        starts: list[Callable[[], object]] = [
            lambda app=app: Scheduler(app=app),
            lambda app=app: DbschedWorkerStep(_fake_worker(app)).start(_fake_worker(app)),
        ]
        for start in starts:
            with pytest.raises(CannotStart, match="newer than this celery_dbsched") as excinfo:
                start()
            assert "upgrade celery_dbsched" in str(excinfo.value)
    output = _clean_cli_error(_cli(app, "migrate"))
    assert "newer than this celery_dbsched" in output and "upgrade celery_dbsched" in output
    with repository.engine.connect() as conn:
        assert conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar_one() == "9999_from_the_future"


def test_deleting_a_job_row_under_a_queued_run_is_not_a_traceback(
    worker_side: WorkerSide, caplog: pytest.LogCaptureFixture
) -> None:
    """A run whose job row vanished (deleted by hand) is dropped like an unknown run."""
    run_id = worker_side.queued_run()
    with worker_side.repository.engine.begin() as conn:
        conn.execute(run_table.delete().where(run_table.c.id == run_id))
        conn.execute(job_table.delete().where(job_table.c.name == "hostile.registered"))
    caplog.set_level(logging.WARNING)
    assert worker_side.deliver(run_id, "hostile.registered") is None
    assert "not found" in caplog.text
    assert worker_side.ran == []
