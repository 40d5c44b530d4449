"""Issue 13 §1: schedules created at run time (celery_dbsched.runtime), on SQLite and PostgreSQL.

The API runs against a migrated database on a frozen test clock (exact schedule math); the sync of a
beat_schedule and of the code's jobs run as a beat and a worker run them.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from celery.schedules import crontab
from helpers.apps import make_app, noop
from helpers.repository import claim
from helpers.services import Database

from celery_dbsched import (
    DbschedError,
    InvalidSchedule,
    JobNotFound,
    NameTaken,
    add_schedule,
    get_schedule,
    job,
    list_schedules,
    put_schedules,
    remove_schedule,
    update_schedule,
)
from celery_dbsched.beat_schedule import sync_beat_schedule
from celery_dbsched.binding import bind_repository
from celery_dbsched.clock import TestClock
from celery_dbsched.records import RunRecord
from celery_dbsched.registry import registry_for
from celery_dbsched.repository import JobRepository
from celery_dbsched.schedules import NEVER, ClockedSchedule, CrontabSchedule, IntervalSchedule
from celery_dbsched.states import JobKind, Origin, RunState

UTC = dt.timezone.utc
T0 = dt.datetime(2026, 3, 2, 9, 0, tzinfo=UTC)  # a Monday


@pytest.fixture
def app(repository: JobRepository, clock: TestClock) -> Iterator[Celery]:
    """An app whose repository is the test's (migrated, on the frozen clock at T0)."""
    clock.freeze(T0)
    app = make_app()
    bind_repository(app, repository)
    yield app
    bind_repository(app, None)


def _sent(repository: JobRepository) -> list[RunRecord]:
    """Claim the due runs and mark them sent, as a beat does (a queued run holds its job's slot)."""
    runs = claim(repository)
    repository.dispatch_runs([(run.id, None) for run in runs])
    return runs


def _at(repository: JobRepository, name: str) -> dt.datetime:
    return repository.lookup_job(name).next_scheduled_run


# -- add, get, list ---------------------------------------------------------------------------------------


def test_add_stores_a_runtime_task_job(app: Celery, repository: JobRepository) -> None:
    record = add_schedule(
        app,
        "report",
        task="proj.tasks.report",
        schedule=300,
        args=[1, "a"],
        kwargs={"to": "ops"},
        options={"queue": "reports", "priority": 5},
        misfire="skip",
    )
    assert record.origin == Origin.RUNTIME and record.kind == JobKind.TASK
    assert record.task == "proj.tasks.report" and record.task_args == (1, "a") and record.task_kwargs == {"to": "ops"}
    assert record.task_options == {"queue": "reports", "priority": 5} and record.queue == "reports"
    assert record.schedule == IntervalSchedule(300.0) and record.policy.misfire == "skip"
    assert record.next_scheduled_run == T0  # an interval's first slot is now, as for beat_schedule entries
    assert record.description == "runtime: proj.tasks.report"
    assert get_schedule(app, "report") == record
    assert [job.name for job in list_schedules(app)] == ["report"]


def test_a_crontab_string_and_a_timezone(app: Celery, repository: JobRepository) -> None:
    record = add_schedule(app, "cron", task="t", schedule="30 7 * * 1-5", timezone="Europe/Berlin")
    assert record.schedule == CrontabSchedule("30", "7", "1-5", "*", "*", "Europe/Berlin")
    assert record.next_scheduled_run == dt.datetime(2026, 3, 3, 6, 30, tzinfo=UTC)  # 07:30 CET on Tuesday
    crontab_record = add_schedule(app, "cron2", task="t", schedule=crontab(minute="0", hour="12"))
    assert crontab_record.next_scheduled_run == dt.datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


def test_list_holds_only_runtime_jobs(app: Celery, repository: JobRepository) -> None:
    repository.upsert_job("code-job", "from code", every=dt.timedelta(seconds=60))
    add_schedule(app, "b", task="t", schedule=60)
    add_schedule(app, "a", task="t", schedule=60)
    assert [j.name for j in list_schedules(app)] == ["a", "b"]
    with pytest.raises(DbschedError, match="code job, not a runtime schedule"):
        get_schedule(app, "code-job")
    with pytest.raises(JobNotFound):
        get_schedule(app, "nope")


# -- validation at the door ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keywords", "message"),
    [
        ({"schedule": "*/5 * * *"}, r"a crontab string of 5 fields"),
        ({"schedule": "*/5 * * * mo-fry"}, r"invalid crontab"),
        ({"schedule": "every day"}, r"crontab string of 5 fields"),
        ({"schedule": object()}, r"unsupported schedule"),
        ({"schedule": {"type": "weekly"}}, r"unknown schedule spec"),
        ({"schedule": dt.datetime(2026, 3, 2, 10, 0)}, r"aware datetime"),
        ({"task": ""}, r"'task' must be a Celery task name"),
        ({"task": "proj.tasks add"}, r"whitespace or control characters"),
        ({"task": "proj.tasks\x00add"}, r"whitespace or control characters"),
        ({"task": "t" * 256}, r"at most 255"),
        ({"task": 42}, r"'task' must be a Celery task name"),
        ({"args": [object()]}, r"'args' must serialize to JSON"),
        ({"args": "abc"}, r"'args' must be a list"),
        ({"kwargs": {"when": dt.date(2026, 1, 1)}}, r"'kwargs' must serialize to JSON"),
        ({"kwargs": {"x": float("nan")}}, r"'kwargs' must serialize to JSON"),
        ({"options": {"queue": "q", "link": "x"}}, r"unknown message option\(s\) link"),
        ({"timezone": "Mars/Olympus"}, r"unknown timezone 'Mars/Olympus'"),
        ({"misfire": "sometimes"}, r"misfire must be one of"),
        ({"max_active": 0}, r"max_active must be"),
        ({"shedule": 60}, r"unknown keyword\(s\) shedule"),
        ({"start_time": "tomorrow"}, r"start_time 'tomorrow' is not an ISO time"),
        ({"expire_time": dt.datetime(2026, 3, 2)}, r"expire_time must be an aware datetime"),
        ({"schedule": T0, "one_off": False}, r"a clocked schedule .* is one-off"),
    ],
)
def test_bad_input_is_one_clear_error_and_stores_nothing(
    app: Celery, repository: JobRepository, keywords: dict[str, Any], message: str
) -> None:
    given: dict[str, Any] = {"task": "proj.tasks.report", "schedule": 60, **keywords}
    with pytest.raises(InvalidSchedule, match=message) as raised:
        add_schedule(app, "bad", **given)
    assert "runtime schedule 'bad'" in str(raised.value) or "runtime schedule name" in str(raised.value)
    assert repository.list_jobs() == []


@pytest.mark.parametrize("name", ["", "  ", "a\nb", "x" * 129])
def test_a_bad_name_is_refused(app: Celery, repository: JobRepository, name: str) -> None:
    with pytest.raises(InvalidSchedule, match="runtime schedule name"):
        add_schedule(app, name, task="t", schedule=60)
    assert repository.list_jobs() == []


def test_an_update_with_bad_input_changes_nothing(app: Celery, repository: JobRepository) -> None:
    before = add_schedule(app, "r", task="t", schedule=60, kwargs={"a": 1})
    with pytest.raises(InvalidSchedule, match="'kwargs' must serialize to JSON"):
        update_schedule(app, "r", kwargs={"a": object()}, schedule=30)
    with pytest.raises(InvalidSchedule, match=r"unknown keyword\(s\) nme"):
        update_schedule(app, "r", nme="x")
    assert repository.lookup_job("r") == before


# -- names and owners ---------------------------------------------------------------------------------------


def test_adding_an_existing_runtime_name_says_edit_or_purge(app: Celery, repository: JobRepository) -> None:
    add_schedule(app, "r", task="t", schedule=60)
    with pytest.raises(NameTaken, match=r"taken by a runtime job; use edit for it, or remove --purge it first"):
        add_schedule(app, "r", task="t2", schedule=30)
    remove_schedule(app, "r")  # disabled: the name stays taken
    with pytest.raises(NameTaken):
        add_schedule(app, "r", task="t2", schedule=30)
    remove_schedule(app, "r", purge=True)
    assert add_schedule(app, "r", task="t2", schedule=30).task == "t2"


def test_a_runtime_schedule_cannot_take_a_declared_name(app: Celery, repository: JobRepository) -> None:
    app.conf.beat_schedule = {"nightly": {"task": "proj.nightly", "schedule": 3600}}
    job(app, name="code-job", description="code", every=60)(noop)
    with pytest.raises(NameTaken, match=r"'nightly' is taken by a beat_schedule job; choose another name"):
        add_schedule(app, "nightly", task="t", schedule=60)
    with pytest.raises(NameTaken, match=r"'code-job' is taken by a code job"):
        add_schedule(app, "code-job", task="t", schedule=60)
    assert repository.list_jobs() == []
    # Stored by another app (not declared here): the rows say who owns them.
    repository.upsert_job("stored-code", "code", every=dt.timedelta(seconds=60))
    with pytest.raises(NameTaken, match=r"'stored-code' is taken by a code job"):
        add_schedule(app, "stored-code", task="t", schedule=60)


def test_update_and_remove_refuse_jobs_of_other_origins(app: Celery, repository: JobRepository) -> None:
    repository.upsert_job("code-job", "code", every=dt.timedelta(seconds=60))
    with pytest.raises(DbschedError, match=r"'code-job' is a code job, not a runtime schedule; change it in"):
        update_schedule(app, "code-job", args=[1])
    with pytest.raises(DbschedError, match="not a runtime schedule"):
        remove_schedule(app, "code-job")
    with pytest.raises(JobNotFound):
        update_schedule(app, "nope", args=[1])
    assert repository.lookup_job("code-job").policy.enabled


def test_a_beat_schedule_sync_leaves_a_runtime_job_alone(
    app: Celery, repository: JobRepository, caplog: pytest.LogCaptureFixture
) -> None:
    runtime = add_schedule(app, "shared", task="runtime.task", schedule=60, kwargs={"k": 1})
    add_schedule(app, "other", task="runtime.task", schedule=60)
    app.conf.beat_schedule = {
        "shared": {"task": "config.task", "schedule": 10},
        "mine": {"task": "config.task", "schedule": 10},
    }
    with caplog.at_level(logging.ERROR, logger="celery_dbsched.beat_schedule"):
        enabled = sync_beat_schedule(app, repository)
    assert "mine" in enabled and "shared" not in enabled
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "shared" in errors[0] and "rename the entry" in errors[0], errors
    assert repository.lookup_job("shared") == runtime  # neither overwritten nor disabled
    assert repository.lookup_job("other").policy.enabled  # a runtime job is not a removed entry
    assert repository.lookup_job("mine").origin == Origin.BEAT_SCHEDULE
    # Entries removed: only beat_schedule jobs are disabled.
    app.conf.beat_schedule = {}
    caplog.clear()
    assert "mine" not in sync_beat_schedule(app, repository)
    assert not repository.lookup_job("mine").policy.enabled
    assert repository.lookup_job("shared").policy.enabled and repository.lookup_job("other").policy.enabled


def test_a_code_job_colliding_with_a_runtime_name_is_refused(
    app: Celery, repository: JobRepository, caplog: pytest.LogCaptureFixture
) -> None:
    runtime = add_schedule(app, "shared", task="runtime.task", schedule=60)
    job(app, name="shared", description="code", every=60)(noop)
    job(app, name="fine", description="code", every=60)(noop)
    with caplog.at_level(logging.ERROR, logger="celery_dbsched.registry"):
        registry_for(app).sync(repository)  # as a worker's start does
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "code job 'shared' is not stored: a runtime schedule has that name" in errors[0]
    assert repository.lookup_job("shared") == runtime
    assert repository.lookup_job("fine").origin == Origin.CODE
    # Registered while the repository is bound (define_job): refused with the same error.
    with pytest.raises(NameTaken, match="code job 'shared' is not stored"):
        job(app, name="shared", description="code again", every=30)(noop)
    registry_for(app).detach()


# -- editing -----------------------------------------------------------------------------------------------


def test_editing_args_does_not_move_the_next_run_editing_the_schedule_does(
    app: Celery, repository: JobRepository, clock: TestClock
) -> None:
    add_schedule(app, "r", task="t", schedule="0 12 * * *")
    assert _at(repository, "r") == dt.datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
    clock.advance(dt.timedelta(hours=1))
    record = update_schedule(
        app, "r", args=[2], kwargs={"x": 1}, options={"queue": "q2"}, description="d", misfire="skip", max_active=2
    )
    assert record.task_args == (2,) and record.task_kwargs == {"x": 1} and record.queue == "q2"
    assert record.description == "d" and record.policy.max_active == 2
    assert record.next_scheduled_run == dt.datetime(2026, 3, 2, 12, 0, tzinfo=UTC)  # not moved
    record = update_schedule(app, "r", schedule="0 11 * * *")
    assert record.next_scheduled_run == dt.datetime(2026, 3, 2, 11, 0, tzinfo=UTC)  # the new schedule's next slot
    assert record.task_args == (2,)  # the rest kept
    record = update_schedule(app, "r", timezone="Europe/Berlin")  # 11:00 Berlin = 10:00 UTC: passed today
    assert record.schedule == CrontabSchedule("0", "11", timezone="Europe/Berlin")
    assert record.next_scheduled_run == dt.datetime(2026, 3, 3, 10, 0, tzinfo=UTC)
    record = update_schedule(app, "r", schedule=600)
    assert record.next_scheduled_run == T0 + dt.timedelta(hours=1, minutes=10)
    assert update_schedule(app, "r", schedule=600) == record  # the same: nothing written


def test_disable_and_enable_again(app: Celery, repository: JobRepository, clock: TestClock) -> None:
    add_schedule(app, "r", task="t", schedule=60, enabled=False)
    assert not repository.lookup_job("r").policy.enabled
    assert claim(repository) == []
    clock.advance(dt.timedelta(seconds=150))
    record = update_schedule(app, "r", enabled=True)
    assert record.policy.enabled and record.next_scheduled_run == T0 + dt.timedelta(seconds=180)


# -- one-off, clocked, expire_time, start_time, last_run_at ----------------------------------------------


def test_a_clocked_schedule_fires_once_then_is_disabled_with_its_history(
    app: Celery, repository: JobRepository, clock: TestClock
) -> None:
    at = T0 + dt.timedelta(minutes=5)
    record = add_schedule(app, "once", task="t", schedule=at)
    assert record.schedule == ClockedSchedule(at) and record.one_off and record.next_scheduled_run == at
    assert _sent(repository) == []
    clock.advance(dt.timedelta(minutes=5))
    [run] = _sent(repository)
    assert run.job_name == "once" and run.scheduled_for == at
    after = repository.lookup_job("once")
    assert not after.policy.enabled
    clock.advance(dt.timedelta(days=400))
    assert _sent(repository) == []
    assert [r.id for r in repository.list_runs("once")] == [run.id]  # history kept


def test_a_clocked_schedule_in_the_past_fires_at_once(app: Celery, repository: JobRepository) -> None:
    record = add_schedule(app, "late", task="t", schedule={"type": "clocked", "at": "2026-03-01T08:00:00+01:00"})
    assert record.next_scheduled_run == dt.datetime(2026, 3, 1, 7, 0, tzinfo=UTC)
    [run] = _sent(repository)
    assert run.job_name == "late" and not repository.lookup_job("late").policy.enabled


def test_a_one_off_interval_fires_once(app: Celery, repository: JobRepository, clock: TestClock) -> None:
    add_schedule(app, "r", task="t", schedule=60, one_off=True)
    assert len(_sent(repository)) == 1
    for _ in range(3):
        clock.advance(dt.timedelta(seconds=61))
        assert _sent(repository) == []
    assert not repository.lookup_job("r").policy.enabled
    assert len(repository.list_runs("r")) == 1


def test_expire_time_disables_and_is_sent_as_expires(app: Celery, repository: JobRepository, clock: TestClock) -> None:
    expire = T0 + dt.timedelta(seconds=150)
    record = add_schedule(app, "r", task="t", schedule=60, expire_time=expire)
    assert record.expire_time == expire
    assert record.message_options["expires"] == expire.isoformat()
    slots = []
    for _ in range(5):
        slots.extend(run.scheduled_for for run in _sent(repository))
        clock.advance(dt.timedelta(seconds=60))
    assert slots == [T0, T0 + dt.timedelta(seconds=60), T0 + dt.timedelta(seconds=120)]
    assert not repository.lookup_job("r").policy.enabled
    # Added when already past its expire_time: stored disabled.
    gone = add_schedule(app, "gone", task="t", schedule=60, expire_time=T0)
    assert not gone.policy.enabled


def test_start_time_delays_the_first_run(app: Celery, repository: JobRepository) -> None:
    start = T0 + dt.timedelta(hours=2)
    assert add_schedule(app, "i", task="t", schedule=60, start_time=start).next_scheduled_run == start
    c = add_schedule(app, "c", task="t", schedule="0 * * * *", start_time=start.isoformat())
    assert c.next_scheduled_run == start + dt.timedelta(hours=1)
    assert add_schedule(app, "p", task="t", schedule=60, start_time=T0 - dt.timedelta(days=1)).next_scheduled_run == T0


def test_last_run_at_gives_the_next_slot_after_it(app: Celery, repository: JobRepository) -> None:
    last = T0 - dt.timedelta(seconds=20)
    assert add_schedule(app, "i", task="t", schedule=60, last_run_at=last).next_scheduled_run == last + dt.timedelta(
        seconds=60
    )
    cron = add_schedule(app, "c", task="t", schedule="0 * * * *", last_run_at=dt.datetime(2026, 3, 2, 8, 0, tzinfo=UTC))
    assert cron.next_scheduled_run == T0  # 09:00: not 08:00 again, not skipped to 10:00
    missed = add_schedule(app, "m", task="t", schedule="0 * * * *", last_run_at=T0 - dt.timedelta(hours=3))
    assert missed.next_scheduled_run == T0 - dt.timedelta(hours=2)  # a missed slot runs once, at once
    once = add_schedule(app, "o", task="t", schedule=T0 - dt.timedelta(hours=1), last_run_at=T0 - dt.timedelta(hours=1))
    assert once.next_scheduled_run == NEVER  # a clocked schedule that already ran does not run again


# -- put_schedules ------------------------------------------------------------------------------------------


def test_put_schedules_creates_updates_and_leaves_the_identical_alone(
    app: Celery, repository: JobRepository, clock: TestClock
) -> None:
    app.conf.beat_schedule = {"declared": {"task": "x", "schedule": 60}}
    repository.upsert_job("code-job", "code", every=dt.timedelta(seconds=60))
    entries: list[dict[str, Any]] = [
        {"name": f"e{i}", "task": "proj.t", "schedule": 60 + i, "kwargs": {"i": i}} for i in range(5)
    ]
    entries += [
        {"name": "declared", "task": "t", "schedule": 60},
        {"name": "code-job", "task": "t", "schedule": 60},
        {"name": "bad", "task": "t t", "schedule": 60},
        {"name": "e0", "task": "dup", "schedule": 60},
    ]
    dry = put_schedules(app, entries, dry_run=True)
    assert dry.dry_run and dry.created == [f"e{i}" for i in range(5)]
    assert list_schedules(app) == []
    first = put_schedules(app, entries)
    assert first.created == [f"e{i}" for i in range(5)] and first.updated == [] and first.unchanged == []
    assert sorted(name for name, _ in first.refused) == ["bad", "code-job", "declared", "e0"]
    reasons = dict(first.refused)
    assert "beat_schedule job" in reasons["declared"] and "code job" in reasons["code-job"]
    assert "whitespace" in reasons["bad"] and "more than once" in reasons["e0"]
    second = put_schedules(app, entries)
    assert second.created == [] and second.updated == [] and second.unchanged == [f"e{i}" for i in range(5)]
    before = {job.name: job for job in list_schedules(app)}
    clock.advance(dt.timedelta(seconds=30))
    entries[0] = {**entries[0], "kwargs": {"i": 100}}
    entries[1] = {**entries[1], "schedule": 600}
    third = put_schedules(app, entries)
    assert third.updated == ["e0", "e1"] and third.unchanged == ["e2", "e3", "e4"]
    after = {job.name: job for job in list_schedules(app)}
    assert after["e0"].task_kwargs == {"i": 100} and after["e0"].next_scheduled_run == before["e0"].next_scheduled_run
    assert after["e1"].next_scheduled_run == T0 + dt.timedelta(seconds=630)


def test_put_schedules_places_the_first_run_after_last_run_at(app: Celery, repository: JobRepository) -> None:
    last = T0 - dt.timedelta(seconds=10)
    result = put_schedules(app, [{"name": "r", "task": "t", "schedule": 60, "last_run_at": last.isoformat()}])
    assert result.created == ["r"]
    assert _at(repository, "r") == last + dt.timedelta(seconds=60)


# -- what a beat sends, and the listing ---------------------------------------------------------------------


def test_a_claimed_runtime_job_advances_like_a_beat_schedule_entry(
    app: Celery, repository: JobRepository, clock: TestClock
) -> None:
    add_schedule(app, "r", task="t", schedule=60, args=[1])
    claim_ = repository.claim_runs("beat-1", 10)
    [run] = claim_.runs
    assert run.status == RunState.QUEUED and claim_.jobs["r"].task_args == (1,)
    assert _at(repository, "r") == T0 + dt.timedelta(seconds=60)


def test_the_json_listing_shows_the_origin(app: Celery, repository: JobRepository) -> None:
    from celery_dbsched.observe import job_json

    record = add_schedule(app, "r", task="t", schedule=T0 + dt.timedelta(hours=1))
    listed = job_json(record, "enabled", None, T0)
    assert listed["origin"] == "runtime" and listed["one_off"] is True
    assert listed["expire_time"] is None
    json.dumps(listed)


# -- at scale ---------------------------------------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.slow
def test_put_schedules_with_10000_entries_on_postgresql(postgres_database: Database) -> None:
    """Bounded statements: 10,000 entries (far over 65,535 parameters at ~30 columns each) go in chunks; a second
    put finds every entry unchanged; one changed kwargs updates only it."""
    import resource
    import time

    repository = postgres_database.migrated_repository()
    app = make_app(dbsched_database_url=postgres_database.url)
    bind_repository(app, repository)
    try:
        entries: list[dict[str, Any]] = [
            {
                "name": f"import.{n:05d}",
                "task": "proj.tasks.work",
                "schedule": "*/5 * * * *" if n % 2 else 300 + n,
                "args": [n],
                "kwargs": {"n": n, "text": "x" * 40},
                "options": {"queue": f"q{n % 7}", "priority": n % 10},
                "last_run_at": T0 - dt.timedelta(seconds=n),
                "misfire": "skip" if n % 3 else "run_once",
            }
            for n in range(10_000)
        ]
        began = time.perf_counter()
        first = put_schedules(app, entries)
        created_in = time.perf_counter() - began
        assert len(first.created) == 10_000 and not first.refused
        began = time.perf_counter()
        second = put_schedules(app, entries)
        unchanged_in = time.perf_counter() - began
        assert len(second.unchanged) == 10_000 and not second.created and not second.updated
        entries[1234] = {**entries[1234], "kwargs": {"n": -1}}
        third = put_schedules(app, entries)
        assert third.updated == ["import.01234"] and len(third.unchanged) == 9_999
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(
            f"\nput_schedules, 10,000 entries, PostgreSQL: created in {created_in:.2f} s, "
            f"all unchanged in {unchanged_in:.2f} s; peak RSS of the test process {peak:.0f} MiB"
        )
        assert len(list_schedules(app)) == 10_000
    finally:
        bind_repository(app, None)
