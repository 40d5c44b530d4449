"""The job model: `JobStatus`, `JobContext`, the `@job` decorator, `register_job` and the app-level pull-in."""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
import time
import warnings
from typing import Any

import pytest
from celery import Celery
from celery.schedules import crontab

import celery_dbsched
from celery_dbsched import (
    Job,
    JobContext,
    JobInterrupted,
    JobNotFound,
    JobStatus,
    job,
    register_job,
    update_job_next_run_in_at_least,
)
from celery_dbsched.errors import NoCadenceWarning
from celery_dbsched.job import FunctionJob
from celery_dbsched.registry import existing_registry, registry_for
from celery_dbsched.testing import TestScheduler

HOUR = dt.timedelta(hours=1)
MINUTE = dt.timedelta(minutes=1)


def sample(ctx: JobContext) -> None:
    """Do the sample work.

    More words that are not the description.
    """


class Counter(Job):
    """A class-based job with properties for name and description."""

    def __init__(self, name: str = "counter", every: dt.timedelta | None = None) -> None:
        self._name = name
        self.every = every
        self.count = 0

    @property
    def name(self) -> str:  # type: ignore[override]
        return self._name

    @property
    def description(self) -> str:  # type: ignore[override]
        return "counts"

    def status(self) -> JobStatus:
        return JobStatus(self.count, 10)

    def run(self, ctx: JobContext) -> None:
        self.count += 1

    def next_run_in(self) -> dt.timedelta:
        return HOUR


def test_the_public_names_are_importable() -> None:
    for name in celery_dbsched.__all__:
        assert getattr(celery_dbsched, name) is not None, name


# -- JobStatus --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("completed", "total"), [(0, 0), (0, 5), (5, 5), (2**31 - 1, 2**31 - 1)])
def test_job_status_accepts_valid_progress(completed: int, total: int) -> None:
    status = JobStatus(completed, total)
    assert (status.completed, status.total) == (completed, total)


@pytest.mark.parametrize(
    ("completed", "total", "message"),
    [
        pytest.param(-1, 5, "negative", id="negative-completed"),
        pytest.param(0, -1, "negative", id="negative-total"),
        pytest.param(6, 5, "larger than total", id="completed-over-total"),
        pytest.param(True, 5, "must be an int", id="bool"),
        pytest.param(1, False, "must be an int", id="bool-total"),
        pytest.param(1.0, 5, "must be an int", id="float"),
        pytest.param("1", 5, "must be an int", id="string"),
        pytest.param(None, 5, "must be an int", id="none"),
        pytest.param(0, 2**31, "too large", id="too-large"),
    ],
)
def test_job_status_rejects_invalid_progress(completed: Any, total: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        JobStatus(completed, total)


def test_job_status_is_immutable_and_comparable() -> None:
    status = JobStatus(1, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        status.completed = 2  # type: ignore[misc]
    assert status == JobStatus(1, 2)
    assert status != JobStatus(1, 3)
    assert hash(status) == hash(JobStatus(1, 2))


# -- JobContext -------------------------------------------------------------------------------------------------


def test_a_new_context_is_not_cancelled() -> None:
    ctx = JobContext(7, "j")
    assert (ctx.run_id, ctx.job_name) == (7, "j")
    assert ctx.cancelled is False
    assert ctx.cancel_reason is None
    ctx.check_cancelled()  # does not raise
    assert ctx.wait(0) is False
    assert ctx.wait(-5) is False  # a negative wait does not sleep or fail
    assert ctx.reported_progress is None
    assert "run=7" in repr(ctx) and "'j'" in repr(ctx)


def test_cancel_makes_check_cancelled_raise_naming_the_reason() -> None:
    ctx = JobContext(7, "j")
    ctx.cancel("stalled: no progress")
    assert ctx.cancelled is True
    assert ctx.cancel_reason == "stalled: no progress"
    with pytest.raises(JobInterrupted, match="stalled: no progress") as excinfo:
        ctx.check_cancelled()
    assert "run 7" in str(excinfo.value) and "'j'" in str(excinfo.value)
    assert isinstance(excinfo.value, celery_dbsched.DbschedError)
    assert ctx.wait(30) is True  # returns at once


def test_the_first_cancel_reason_stands() -> None:
    ctx = JobContext(1, "j")
    ctx.cancel("shutdown")
    ctx.cancel("run is interrupted")
    assert ctx.cancel_reason == "shutdown"


def test_wait_returns_true_early_when_another_thread_cancels() -> None:
    ctx = JobContext(1, "j")
    results: list[bool] = []
    entered = threading.Event()

    def job_thread() -> None:
        entered.set()
        results.append(ctx.wait(60))

    thread = threading.Thread(target=job_thread)
    started = time.monotonic()
    thread.start()
    assert entered.wait(10)
    ctx.cancel("cancelled")
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert results == [True]
    assert time.monotonic() - started < 10  # far less than the 60 s asked for


def test_wait_while_cancelled_from_another_thread() -> None:
    ctx = JobContext(1, "j")
    canceller = threading.Thread(target=ctx.cancel, args=("shutdown",))
    canceller.start()
    assert ctx.wait(60) is True
    canceller.join(timeout=10)
    assert ctx.cancel_reason == "shutdown"


def test_context_progress() -> None:
    ctx = JobContext(1, "j")
    ctx.progress(2, 5)
    assert ctx.reported_progress == JobStatus(2, 5)
    with pytest.raises(ValueError):
        ctx.progress(6, 5)
    assert ctx.reported_progress == JobStatus(2, 5)  # the bad report is not kept


# -- the Job class ----------------------------------------------------------------------------------------------


def test_a_job_class_must_implement_the_interface() -> None:
    class Incomplete(Job):
        name = "incomplete"
        description = "misses run() and next_run_in()"

        def status(self) -> JobStatus:
            return JobStatus(0, 0)

    with pytest.raises(TypeError):
        Incomplete()  # type: ignore[abstract]


# -- the @job decorator -----------------------------------------------------------------------------------------


def test_the_decorator_names_the_job_after_the_function_and_its_docstring(app: Celery) -> None:
    registered = job(app)(sample)
    assert isinstance(registered, FunctionJob)
    assert isinstance(registered, Job)
    assert registered.name == f"{__name__}.sample"
    assert registered.description == "Do the sample work."
    assert registered.every is None
    assert registered.queue is None
    assert registered.interrupt_threshold is None
    assert registry_for(app).get(registered.name) is registered


def test_the_default_name_is_the_qualified_name(app: Celery) -> None:
    @job(app)
    def inner(ctx: JobContext) -> None:
        """Inner."""

    assert inner.name == f"{__name__}.test_the_default_name_is_the_qualified_name.<locals>.inner"


def test_explicit_name_and_description_win(app: Celery) -> None:
    registered = job(app, name="reports.daily", description="Send the daily report")(sample)
    assert (registered.name, registered.description) == ("reports.daily", "Send the daily report")
    assert "reports.daily" in registry_for(app)


def test_a_job_without_description_or_docstring_fails_at_decoration(app: Celery) -> None:
    def undocumented(ctx: JobContext) -> None:
        pass

    with pytest.raises(ValueError, match="description"):
        job(app)(undocumented)
    with pytest.raises(ValueError, match="description"):
        job(app, name="named")(undocumented)
    assert existing_registry(app) is None


def test_a_description_alone_is_enough(app: Celery) -> None:
    def undocumented(ctx: JobContext) -> None:
        pass

    assert job(app, description="Works")(undocumented).description == "Works"


@pytest.mark.parametrize("name", ["", "  ", "x" * 129, "bad\nname"])
def test_the_decorator_rejects_a_bad_name(app: Celery, name: str) -> None:
    with pytest.raises(ValueError, match="job name"):
        job(app, name=name)(sample)


def test_the_decorator_options(app: Celery) -> None:
    registered = job(
        app,
        name="opts",
        every=90,
        first_run_in=dt.timedelta(minutes=5),
        queue="slow",
        interrupt_threshold="45",  # type: ignore[arg-type]  # numeric strings are accepted too
    )(sample)
    assert registered.every == dt.timedelta(seconds=90)
    assert registered.queue == "slow"
    assert registered.interrupt_threshold == dt.timedelta(seconds=45)


def test_zero_every_and_threshold_mean_unset(app: Celery) -> None:
    registered = job(app, name="zero", every=0, interrupt_threshold=0)(sample)
    assert registered.every is None
    assert registered.interrupt_threshold is None


@pytest.mark.parametrize("option", ["every", "first_run_in", "interrupt_threshold"])
@pytest.mark.parametrize("value", [-1, "soon", float("nan"), True, dt.timedelta(seconds=-1)])
def test_the_decorator_validates_its_durations(app: Celery, option: str, value: Any) -> None:
    with pytest.raises(ValueError, match=option):
        job(app, name="bad", **{option: value})
    assert existing_registry(app) is None


@pytest.mark.parametrize("queue", ["", "  ", 5, "q" * 256])
def test_the_decorator_validates_the_queue(app: Celery, queue: Any) -> None:
    with pytest.raises(ValueError, match="queue"):
        job(app, name="q", queue=queue)(sample)
    assert "q" not in registry_for(app)


def test_the_decorated_function_is_still_callable(app: Celery) -> None:
    calls: list[JobContext] = []

    @job(app, name="callable")
    def work(ctx: JobContext) -> dt.timedelta:
        """Work."""
        calls.append(ctx)
        return dt.timedelta(seconds=3)

    ctx = JobContext(1, "callable")
    assert work(ctx) == dt.timedelta(seconds=3)
    assert calls == [ctx]
    assert work.__wrapped__ is not None
    assert work.__doc__ == "Work."


def test_a_function_jobs_return_value_is_its_next_run(app: Celery) -> None:
    results: list[Any] = [dt.timedelta(minutes=2), 30, 0, None]

    @job(app, name="returns", every=HOUR)
    def work(ctx: JobContext) -> Any:
        """Work."""
        return results.pop(0)

    expected = [dt.timedelta(minutes=2), dt.timedelta(seconds=30), dt.timedelta(0), None]
    for want in expected:
        ctx = JobContext(1, "returns")
        work.run(ctx)
        assert ctx.next_run_in == want
    assert work.next_run_in() is None  # None returned: the next slot of `every`, on its fixed cadence


@pytest.mark.parametrize("value", ["soon", -5, dt.timedelta(seconds=-1), True])
def test_a_function_job_returning_a_bad_delay_fails(app: Celery, value: Any) -> None:
    @job(app, name="bad-return")
    def work(ctx: JobContext) -> Any:
        """Work."""
        return value

    with pytest.raises(ValueError, match="bad-return"):
        work.run(JobContext(1, "bad-return"))


def test_a_function_job_without_every_has_no_next_run_of_its_own(app: Celery) -> None:
    with pytest.warns(NoCadenceWarning):
        registered = job(app, name="no-every")(sample)
    assert registered.next_run_in() is None  # its return value decides, else its schedule


def test_function_job_progress_comes_from_the_context(app: Celery) -> None:
    registered = job(app, name="p")(sample)
    assert registered.status() == JobStatus(0, 0)


# -- register_job -----------------------------------------------------------------------------------------------


def test_register_job_registers_an_instance(app: Celery) -> None:
    counter = Counter()
    assert register_job(app, counter) is counter
    assert registry_for(app).get("counter") is counter
    assert [j.name for j in registry_for(app)] == ["counter"]


def test_registering_twice_is_fine(app: Celery) -> None:
    first, second = Counter(), Counter()
    register_job(app, first)
    register_job(app, first)
    register_job(app, second)
    assert len(registry_for(app)) == 1
    assert registry_for(app).get("counter") is second


def test_registrations_belong_to_their_app(app: Celery) -> None:
    other = Celery("other", set_as_current=False)
    register_job(app, Counter())
    assert "counter" in registry_for(app)
    assert "counter" not in registry_for(other)


@pytest.mark.parametrize("thing", [sample, "counter", Counter, None])
def test_register_job_needs_a_job_instance(app: Celery, thing: Any) -> None:
    with pytest.raises(TypeError, match="Job"):
        register_job(app, thing)


@pytest.mark.parametrize("name", ["", " ", "x" * 129, "tab\there"])
def test_register_job_rejects_a_bad_name(app: Celery, name: str) -> None:
    with pytest.raises(ValueError, match="job name"):
        register_job(app, Counter(name=name))
    assert existing_registry(app) is None


def test_register_job_needs_a_description(app: Celery) -> None:
    class Nameless(Counter):
        description = ""

    class Missing(Job):
        name = "missing"

        def status(self) -> JobStatus:
            return JobStatus(0, 0)

        def run(self, ctx: JobContext) -> None:
            pass

        def next_run_in(self) -> dt.timedelta:
            return HOUR

    for instance in (Nameless(), Missing()):
        with pytest.raises(ValueError, match="description"):
            register_job(app, instance)
    assert existing_registry(app) is None


@pytest.mark.parametrize("every", [dt.timedelta(seconds=-1), -60, "soon"])
def test_register_job_rejects_a_bad_every(app: Celery, every: Any) -> None:
    with pytest.raises(ValueError, match="every"):
        register_job(app, Counter(every=every))
    assert existing_registry(app) is None


def test_register_job_rejects_a_bad_first_run(app: Celery) -> None:
    with pytest.raises(ValueError, match="first_run_in"):
        register_job(app, Counter(), first_run_in=-1)
    assert existing_registry(app) is None


def test_registration_opens_no_database(app: Celery, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    register_job(app, Counter())
    job(app, name="f")(sample)
    assert list(tmp_path.iterdir()) == []  # no default SQLite file was created


# -- update_job_next_run_in_at_least(app, ...) ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "   ", None])
def test_pull_in_with_an_empty_name_is_a_value_error(app: Celery, name: Any) -> None:
    with pytest.raises(ValueError, match="name"):
        update_job_next_run_in_at_least(app, name, 0)


@pytest.mark.parametrize("delta", [None, -1, dt.timedelta(seconds=-1), "junk"])
def test_pull_in_with_a_bad_delta_is_a_value_error(app: Celery, delta: Any) -> None:
    with pytest.raises(ValueError, match="delta"):
        update_job_next_run_in_at_least(app, "j", delta)


def test_pull_in_of_an_unknown_job(app: Celery, dbsched_scheduler: TestScheduler) -> None:
    with pytest.raises(JobNotFound, match="'nope'"):
        update_job_next_run_in_at_least(app, "nope", 0)


def test_pull_in_moves_a_registered_job_earlier(app: Celery, dbsched_scheduler: TestScheduler) -> None:
    register_job(app, Counter(), first_run_in=HOUR)  # written through: the scheduler is open
    assert dbsched_scheduler.job("counter").next_scheduled_run > dbsched_scheduler.now() + dt.timedelta(minutes=59)
    record = update_job_next_run_in_at_least(app, "counter", dt.timedelta(minutes=5))
    assert record.next_scheduled_run <= dbsched_scheduler.now() + dt.timedelta(minutes=5)
    assert dbsched_scheduler.job("counter") == record
    later = update_job_next_run_in_at_least(app, "counter", 600.0)  # seconds work too; never later
    assert later.next_scheduled_run == record.next_scheduled_run
    update_job_next_run_in_at_least(app, "counter", 0, run_now=True)
    assert [run.job_name for run in dbsched_scheduler.tick()] == ["counter"]


# -- first_run_in, and next_run_in: its deprecated name ---------------------------------------------------------


def test_first_run_in_is_the_delay_before_the_first_run(app: Celery, dbsched_scheduler: TestScheduler) -> None:
    register_job(app, Counter(), first_run_in=HOUR)
    job(app, name="function", every=60, first_run_in=2 * HOUR)(sample)
    now = dbsched_scheduler.now()
    assert now + 59 * MINUTE < dbsched_scheduler.job("counter").next_scheduled_run <= now + HOUR
    assert now + 119 * MINUTE < dbsched_scheduler.job("function").next_scheduled_run <= now + 2 * HOUR


@pytest.mark.parametrize("register", ["register_job", "job"])
def test_next_run_in_still_works_with_a_deprecation_warning(
    app: Celery, dbsched_scheduler: TestScheduler, register: str
) -> None:
    with pytest.warns(DeprecationWarning, match=r"next_run_in=.*deprecated; use first_run_in=") as warned:
        if register == "register_job":
            register_job(app, Counter(), next_run_in=HOUR)
        else:
            job(app, name="counter", every=60, next_run_in=HOUR)(sample)
    assert [w.filename for w in warned] == [__file__]  # it points at the caller
    now = dbsched_scheduler.now()
    assert now + 59 * MINUTE < dbsched_scheduler.job("counter").next_scheduled_run <= now + HOUR


def test_a_bad_next_run_in_is_named_as_given(app: Celery) -> None:
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="job 'counter' next_run_in"):
        register_job(app, Counter(), next_run_in=-1)
    with pytest.warns(DeprecationWarning), pytest.raises(TypeError, match="first_run_in= only"):
        register_job(app, Counter(), first_run_in=HOUR, next_run_in=HOUR)
    assert existing_registry(app) is None


def test_a_bare_job_decorator_is_a_type_error_naming_the_right_form(app: Celery) -> None:
    with pytest.raises(TypeError, match=r"write @job\(app, every=...\) above the function, not a bare @job"):

        @job  # type: ignore[arg-type]
        def forgotten(ctx: JobContext) -> None:
            """Forgotten."""

    assert len(registry_for(app)) == 0


def test_a_function_job_with_neither_every_nor_schedule_warns_naming_the_fix(app: Celery) -> None:
    with pytest.warns(NoCadenceWarning) as warned:
        job(app, name="hourly-by-accident")(sample)
    [warning] = warned.list
    assert str(warning.message) == (
        "job 'hourly-by-accident' has neither every= nor schedule=: after a run whose function returns no delay it "
        "runs again only after the retry backoff's cap (dbsched_retry_backoff, 1 hour by default); give every= or "
        "schedule="
    )
    assert warning.filename == __file__  # points at the registration, not at celery_dbsched
    assert "hourly-by-accident" in registry_for(app)  # registered all the same, as documented


@pytest.mark.parametrize("cadence", [{"every": 60}, {"schedule": crontab(minute=0)}], ids=["every", "schedule"])
def test_a_function_job_with_a_cadence_does_not_warn(app: Celery, cadence: dict[str, Any]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoCadenceWarning)
        job(app, name="cadenced", **cadence)(sample)
