"""Issue 3: a stock `beat_schedule` as database jobs, and the beat scheduler sending its plain tasks.

Unit level: entries -> kind "task" jobs, Celery's `celery.backend_cleanup` as stock beat installs it,
re-syncing, then `celery_dbsched.Scheduler` ticking in this process on the `memory://` broker (each message
is read back from the broker) with the database clock frozen, one beat and two.
"""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, beat
from celery.schedules import crontab, schedule, solar
from helpers.apps import make_app, seconds
from helpers.services import Database
from kombu import Connection

from celery_dbsched.beat_schedule import default_entries, definitions, sync_beat_schedule
from celery_dbsched.binding import bind_repository
from celery_dbsched.clock import TestClock
from celery_dbsched.errors import DbschedError
from celery_dbsched.policy import JobPolicy
from celery_dbsched.protocol import RUN_ID_HEADER
from celery_dbsched.repository import JobRepository
from celery_dbsched.scheduler import Scheduler
from celery_dbsched.schedules import CrontabSchedule, IntervalSchedule, SolarSchedule

UTC = dt.timezone.utc
T0 = dt.datetime(2026, 6, 1, 8, 0, tzinfo=UTC)


def frozen_repository(database: Database, at: dt.datetime = T0) -> JobRepository:
    return database.migrated_repository(clock=TestClock(frozen_at=at))


ENTRIES: dict[str, dict[str, Any]] = {
    "every-30-seconds": {"task": "proj.tasks.ping", "schedule": 30},
    "every-5-minutes": {
        "task": "proj.tasks.sync",
        "schedule": dt.timedelta(minutes=5),
        "args": (1, "two"),
        "kwargs": {"full": True, "ids": [1, 2]},
    },
    "celery-schedule": {"task": "proj.tasks.poll", "schedule": schedule(run_every=dt.timedelta(seconds=45))},
    "office-hours": {
        "task": "proj.tasks.report",
        "schedule": crontab(minute="*/15", hour="9-17", day_of_week="mon-fri"),
        "args": ["daily"],
        "options": {
            "queue": "reports",
            "routing_key": "reports.daily",
            "priority": 7,
            "expires": 600,
            "headers": {"tenant": "acme"},
        },
    },
    "sunrise": {"task": "proj.tasks.lights_off", "schedule": solar("sunrise", 52.52, 13.40)},
}


# --- entries as jobs ----------------------------------------------------------------------------------


def test_entries_become_task_jobs_named_by_their_key(database: Database) -> None:
    pytest.importorskip("ephem", reason="solar schedules need the 'ephem' package")
    app = make_app(beat_schedule=ENTRIES, timezone="Europe/Berlin", result_expires=None)
    repository = frozen_repository(database)
    assert sorted(sync_beat_schedule(app, repository)) == sorted(ENTRIES)
    jobs = {job.name: job for job in repository.list_jobs()}
    assert sorted(jobs) == sorted(ENTRIES)
    for name, entry in ENTRIES.items():
        assert jobs[name].kind == "task"
        assert jobs[name].task == entry["task"]
        assert jobs[name].policy.enabled

    assert jobs["every-30-seconds"].schedule == IntervalSchedule(30)
    assert jobs["every-30-seconds"].next_scheduled_run == T0  # an interval's first slot is at once
    assert jobs["every-5-minutes"].schedule == IntervalSchedule(300)
    assert jobs["every-5-minutes"].task_args == (1, "two")
    assert jobs["every-5-minutes"].task_kwargs == {"full": True, "ids": [1, 2]}
    assert jobs["celery-schedule"].schedule == IntervalSchedule(45)

    office = jobs["office-hours"]
    assert office.schedule == CrontabSchedule(
        minute="*/15", hour="9-17", day_of_week="mon-fri", timezone="Europe/Berlin"
    )
    # Monday 08:00 UTC is 10:00 in Berlin, within 9-17 there (in UTC the next slot would be 09:00).
    assert office.next_scheduled_run == dt.datetime(2026, 6, 1, 8, 15, tzinfo=UTC)
    assert office.task_args == ("daily",)
    assert office.queue == "reports"
    assert office.task_options == {
        "queue": "reports",
        "routing_key": "reports.daily",
        "priority": 7,
        "expires": 600,
        "headers": {"tenant": "acme"},
    }

    sunrise = jobs["sunrise"]
    assert sunrise.schedule == SolarSchedule("sunrise", 52.52, 13.40)
    # Berlin's sunrise on 2 June 2026 is about 04:45 CEST (02:45 UTC): the next one after T0.
    assert (
        dt.datetime(2026, 6, 2, 2, 30, tzinfo=UTC)
        < sunrise.next_scheduled_run
        < dt.datetime(2026, 6, 2, 3, 0, tzinfo=UTC)
    )
    celery_says = T0 + solar("sunrise", 52.52, 13.40, nowfun=lambda: T0).remaining_estimate(T0)
    assert abs(sunrise.next_scheduled_run - celery_says) < dt.timedelta(minutes=1)


def test_entry_policies_in_the_entry_or_in_options_dbsched(database: Database) -> None:
    app = make_app(
        beat_schedule={
            "a": {"task": "t.a", "schedule": 60, "misfire": "skip", "misfire_grace": 5, "enabled": False},
            "b": {
                "task": "t.b",
                "schedule": crontab(minute=0),
                "options": {"queue": "q", "dbsched": {"max_active": 3, "timezone": "Asia/Tokyo"}},
            },
        },
        result_expires=None,
    )
    repository = frozen_repository(database)
    assert sync_beat_schedule(app, repository) == ["b"]  # "a" is disabled
    a, b = repository.lookup_job("a"), repository.lookup_job("b")
    assert (a.policy.enabled, a.policy.misfire, a.policy.misfire_grace) == (False, "skip", seconds(5))
    assert b.policy.max_active == 3
    assert b.schedule is not None and b.schedule.spec()["timezone"] == "Asia/Tokyo"
    assert "dbsched" not in b.task_options  # ours, not sent with the task
    assert b.task_options == {"queue": "q"}


# --- celery.backend_cleanup ---------------------------------------------------------------------------


def _stock_default_entries(app: Celery) -> set[str]:
    stock = beat.Scheduler(app, lazy=True)
    stock.install_default_entries(stock.data)
    return set(stock.data)


@pytest.mark.parametrize(
    ("backend", "result_expires", "expected"),
    [
        ("db+sqlite:///{tmp}/results.sqlite3", dt.timedelta(days=1), True),  # no autoexpire: cleanup needed
        ("db+sqlite:///{tmp}/results.sqlite3", None, False),
        (None, dt.timedelta(days=1), True),  # stock beat installs it even without a result backend
        ("redis://127.0.0.1:6379/15", dt.timedelta(days=1), False),  # Redis expires keys itself
        ("rpc://", dt.timedelta(days=1), False),
    ],
)
def test_backend_cleanup_is_added_when_stock_beat_adds_it(
    tmp_path: Path, backend: str | None, result_expires: dt.timedelta | None, expected: bool
) -> None:
    app = make_app(result_backend=backend and backend.format(tmp=tmp_path), result_expires=result_expires)
    assert ("celery.backend_cleanup" in _stock_default_entries(app)) is expected  # the reference
    names = [d.name for d in definitions(app)]
    assert ("celery.backend_cleanup" in names) is expected
    if expected:
        [cleanup] = [d for d in definitions(app) if d.name == "celery.backend_cleanup"]
        assert cleanup.kind == "task" and cleanup.task == "celery.backend_cleanup"
        assert cleanup.schedule == CrontabSchedule(minute="0", hour="4", timezone="UTC")
        assert cleanup.task_options == {"expires": 12 * 3600}


def test_backend_cleanup_follows_app_timezone_and_a_user_entry_wins(tmp_path: Path) -> None:
    backend = f"db+sqlite:///{tmp_path}/results.sqlite3"
    app = make_app(result_backend=backend, timezone="Europe/Berlin")
    [cleanup] = [d for d in definitions(app) if d.name == "celery.backend_cleanup"]
    assert cleanup.schedule == CrontabSchedule(minute="0", hour="4", timezone="Europe/Berlin")
    own = {"task": "celery.backend_cleanup", "schedule": crontab(minute=30, hour=1)}
    app = make_app(result_backend=backend, beat_schedule={"celery.backend_cleanup": own})
    [cleanup] = [d for d in definitions(app) if d.name == "celery.backend_cleanup"]
    assert cleanup.schedule == CrontabSchedule(minute="30", hour="1")
    assert set(default_entries(make_app(result_backend=backend))) == {"celery.backend_cleanup"}


# --- re-sync ------------------------------------------------------------------------------------------


def test_resync_disables_removed_updates_changed_and_keeps_unchanged_next_runs(database: Database) -> None:
    app = make_app(
        result_expires=None,
        beat_schedule={
            "keep": {"task": "t.keep", "schedule": 60},
            "change-args": {"task": "t.args", "schedule": 600, "args": [1]},
            "change-schedule": {"task": "t.sched", "schedule": 600},
            "remove": {"task": "t.remove", "schedule": 60},
        },
    )
    clock = TestClock(frozen_at=T0)
    repository = database.migrated_repository(clock=clock)
    sync_beat_schedule(app, repository)
    claimed = repository.claim_runs("beat", 100).runs  # every interval entry is due at once
    assert sorted(run.job_name for run in claimed) == ["change-args", "change-schedule", "keep", "remove"]
    for run in claimed:
        repository.dispatch_run(run.id)
    before = {job.name: job for job in repository.list_jobs()}
    assert before["keep"].next_scheduled_run == T0 + seconds(60)  # advanced at claim

    clock.freeze(T0 + seconds(20))
    app.conf.beat_schedule = {
        "keep": {"task": "t.keep", "schedule": 60},
        "change-args": {"task": "t.args", "schedule": 600, "args": [2], "options": {"priority": 1}},
        "change-schedule": {"task": "t.sched", "schedule": 900},
        "new": {"task": "t.new", "schedule": crontab(minute=0, hour=12)},
    }
    assert sorted(sync_beat_schedule(app, repository)) == ["change-args", "change-schedule", "keep", "new"]
    after = {job.name: job for job in repository.list_jobs()}

    assert after["keep"] == before["keep"]  # untouched, not even its update_time
    assert after["change-args"].task_args == (2,)
    assert after["change-args"].task_options == {"priority": 1}
    assert after["change-args"].next_scheduled_run == before["change-args"].next_scheduled_run
    assert after["change-schedule"].next_scheduled_run == T0 + seconds(20 + 900)  # recomputed
    assert after["new"].next_scheduled_run == dt.datetime(2026, 6, 1, 12, 0, tzinfo=UTC)

    assert after["remove"].policy.enabled is False
    assert [run.status for run in repository.list_runs("remove")] == ["dispatched"]  # history kept
    clock.freeze(T0 + seconds(3600))
    assert "remove" not in {run.job_name for run in repository.claim_runs("beat", 100).runs}

    # Put back later: enabled again, from its next slot (not at once for the hour it was gone).
    app.conf.beat_schedule = {**app.conf.beat_schedule, "remove": {"task": "t.remove", "schedule": 60}}
    sync_beat_schedule(app, repository)
    back = repository.lookup_job("remove")
    assert back.policy.enabled is True
    assert back.next_scheduled_run > T0 + seconds(3600)


def test_resync_of_an_unchanged_schedule_is_idempotent(database: Database) -> None:
    app = make_app(beat_schedule=ENTRIES | {"sunrise": {"task": "t", "schedule": 3600}}, timezone="Asia/Tokyo")
    clock = TestClock(frozen_at=T0)
    repository = database.migrated_repository(clock=clock)
    sync_beat_schedule(app, repository)
    first = repository.list_jobs()
    clock.freeze(T0 + dt.timedelta(hours=5))
    sync_beat_schedule(app, repository)
    assert repository.list_jobs() == first


def test_an_operators_edit_of_an_entry_holds_across_beat_starts_until_reverted(database: Database) -> None:
    """A beat start with a changed beat_schedule keeps an edit of an entry (its fingerprint changed: every entry
    is compared) and still applies the code's changes; "revert to code" brings the code's latest values back."""
    entries = {"edited": {"task": "t.edited", "schedule": 600}, "other": {"task": "t.other", "schedule": 60}}
    app = make_app(result_expires=None, beat_schedule=entries)
    clock = TestClock(frozen_at=T0)
    repository = database.migrated_repository(clock=clock)
    sync_beat_schedule(app, repository)
    edited = repository.edit_job("edited", schedule=IntervalSchedule(120.0), policy=JobPolicy(max_active=2))
    assert edited.next_scheduled_run == T0 + seconds(120)  # the edited schedule's next slot

    clock.freeze(T0 + seconds(30))
    app.conf.beat_schedule = {**entries, "other": {"task": "t.other", "schedule": 90}}
    sync_beat_schedule(app, repository)
    assert repository.lookup_job("edited") == edited  # untouched, not even its update_time
    assert repository.lookup_job("other").schedule == IntervalSchedule(90.0)

    app.conf.beat_schedule = {**entries, "edited": {"task": "t.edited", "schedule": 900, "args": [1]}}
    sync_beat_schedule(app, repository)
    held = repository.lookup_job("edited")
    assert held.schedule == IntervalSchedule(120.0) and held.policy.max_active == 2 and held.task_args == (1,)
    assert held.next_scheduled_run == T0 + seconds(120)
    assert held.edited_fields == ["max_active", "schedule"]

    clock.freeze(T0 + seconds(60))
    reverted = repository.revert_job("edited")
    assert reverted.schedule == IntervalSchedule(900.0) and reverted.policy.max_active == 1
    assert reverted.next_scheduled_run == T0 + seconds(60 + 900) and reverted.overrides == {}
    sync_beat_schedule(app, repository)
    assert repository.lookup_job("edited") == reverted


# --- the beat scheduler, in this process ----------------------------------------------------------------


@dataclass
class Sent:
    task: str
    args: list[Any]
    kwargs: dict[str, Any]
    queue: str
    headers: dict[str, Any]
    properties: dict[str, Any]

    @property
    def run_id(self) -> int:
        value = self.headers[RUN_ID_HEADER]
        assert isinstance(value, int)
        return value


def drain(*queues: str) -> list[Sent]:
    """Every message waiting on `queues` of the in-process memory broker."""
    sent = []
    with Connection("memory://") as conn:
        channel = conn.channel()
        try:
            for queue in queues:
                while (message := channel.basic_get(queue, no_ack=True)) is not None:
                    args, kwargs, _embed = message.payload
                    sent.append(
                        Sent(
                            message.headers["task"],
                            args,
                            kwargs,
                            message.delivery_info["routing_key"],
                            dict(message.headers),
                            dict(message.properties),
                        )
                    )
        finally:
            channel.close()
    return sent


BeatFactory = Callable[..., Scheduler]


@pytest.fixture
def beats(database: Database) -> Iterator[BeatFactory]:
    """`beats(beat_schedule, server_id=...)`: a `celery_dbsched.Scheduler` on its own app and repository (two
    calls: two beats on one database), the database clock frozen at T0 (`freeze_all` moves every beat's)."""
    made: list[tuple[Celery, Scheduler]] = []
    queue = f"default-{uuid.uuid4().hex[:8]}"

    def factory(beat_schedule: dict[str, Any], server_id: str = "beat-a", **conf: Any) -> Scheduler:
        app = make_app(
            dbsched_database_url=database.url,
            beat_schedule=beat_schedule,
            dbsched_server_id=server_id,
            task_default_queue=queue,
            result_expires=None,
            # Ticked in a loop on a frozen clock: tick() must return, not sleep on LISTEN until notified.
            dbsched_listen=False,
            **conf,
        )
        repository = frozen_repository(database)
        bind_repository(app, repository)
        scheduler = Scheduler(app=app)
        made.append((app, scheduler))
        return scheduler

    factory.queue = queue  # type: ignore[attr-defined]
    factory.made = made  # type: ignore[attr-defined]
    yield factory
    for app, scheduler in made:
        scheduler.close()
        bind_repository(app, None)
    drain(queue, "reports")


def freeze_all(*schedulers: Scheduler, at: dt.datetime) -> None:
    for scheduler in schedulers:
        clock = scheduler.repository.clock
        assert isinstance(clock, TestClock)
        clock.freeze(at)


def test_tick_sends_the_entry_task_as_stock_beat_would_and_marks_it_dispatched(beats: BeatFactory) -> None:
    entry = {
        "task": "proj.tasks.report",
        "schedule": 60,
        "args": [1, "x"],
        "kwargs": {"k": [1, 2]},
        "options": {"queue": "reports", "priority": 5, "headers": {"tenant": "acme"}},
    }
    scheduler = beats({"report": entry})
    drain("reports")
    sleep = scheduler.tick()
    assert 0 < sleep <= 5
    [message] = drain("reports", beats.queue)  # type: ignore[attr-defined]
    assert message.task == "proj.tasks.report"
    assert message.args == [1, "x"]
    assert message.kwargs == {"k": [1, 2]}
    assert message.queue == "reports"
    assert message.properties["priority"] == 5
    assert message.headers["tenant"] == "acme"
    run = scheduler.repository.lookup_run(message.run_id)
    assert run.job_name == "report"
    assert run.status == "dispatched"  # final: nobody reports the outcome of a plain task
    assert run.end_time is not None
    assert run.task_id == message.headers["id"]
    assert run.scheduled_for == T0
    assert scheduler.repository.lookup_job("report").next_scheduled_run == T0 + seconds(60)

    scheduler.tick()
    assert drain("reports") == []  # not due again before its next slot

    # Nobody consumed or reported the first message: the next slot is sent all the same.
    freeze_all(scheduler, at=T0 + seconds(60))
    scheduler.tick()
    [again] = drain("reports")
    assert again.run_id != message.run_id
    assert scheduler.repository.lookup_run(again.run_id).scheduled_for == T0 + seconds(60)


def test_tick_after_downtime_sends_one_catch_up_not_a_burst(beats: BeatFactory) -> None:
    scheduler = beats({"ping": {"task": "proj.ping", "schedule": 10}})
    scheduler.tick()
    freeze_all(scheduler, at=T0 + seconds(95))  # eight slots missed
    scheduler.tick()
    scheduler.tick()
    sent = drain(beats.queue)  # type: ignore[attr-defined]
    slots = [scheduler.repository.lookup_run(m.run_id).scheduled_for for m in sent]
    assert slots == [T0, T0 + seconds(10)]  # the catch-up is for the first slot it missed
    assert scheduler.repository.lookup_job("ping").next_scheduled_run == T0 + seconds(100)


@pytest.mark.slow
def test_two_beats_ticking_alternately_never_send_a_slot_twice(beats: BeatFactory) -> None:
    schedule_ = {"ping": {"task": "proj.ping", "schedule": 10}, "pong": {"task": "proj.pong", "schedule": 25}}
    a = beats(schedule_, server_id="beat-a")
    b = beats(schedule_, server_id="beat-b")
    t = T0
    for step in range(60):
        freeze_all(a, b, at=t)
        first, second = (a, b) if step % 2 else (b, a)
        first.tick()
        second.tick()
        if step % 3 == 0:
            second.tick()
        t += seconds(3)
    sent = drain(beats.queue)  # type: ignore[attr-defined]
    runs = {run.id: run for run in a.repository.list_runs(limit=1000)}
    assert Counter(m.run_id for m in sent).most_common(1)[0][1] == 1  # one message per run
    assert set(runs) == {m.run_id for m in sent}
    for name, every in (("ping", 10), ("pong", 25)):
        slots = sorted(run.scheduled_for for run in runs.values() if run.job_name == name)  # type: ignore[type-var]
        assert len(slots) == len(set(slots)), f"{name}: a slot was sent twice"
        expected = [T0 + seconds(every * k) for k in range(0, 177 // every + 1)]
        assert slots == expected, name
    assert {run.claimed_by for run in runs.values()} == {"beat-a", "beat-b"}
    assert {run.status for run in runs.values()} == {"dispatched"}


@pytest.mark.slow
def test_two_beats_ticking_at_the_same_instant_never_send_a_slot_twice(beats: BeatFactory) -> None:
    schedule_ = {f"entry-{i}": {"task": "proj.ping", "schedule": 5, "args": [i]} for i in range(5)}
    a = beats(schedule_, server_id="beat-a")
    b = beats(schedule_, server_id="beat-b")
    rounds = 20
    barrier = threading.Barrier(3, timeout=120)
    errors: list[BaseException] = []

    def loop(scheduler: Scheduler) -> None:
        try:
            for _ in range(rounds):
                barrier.wait()  # the clock is set
                scheduler.tick()
                barrier.wait()  # both ticked
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=loop, args=(s,)) for s in (a, b)]
    for thread in threads:
        thread.start()
    for k in range(rounds):
        freeze_all(a, b, at=T0 + seconds(5 * k))
        barrier.wait()
        barrier.wait()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    sent = drain(beats.queue)  # type: ignore[attr-defined]
    assert len(sent) == 5 * rounds  # every entry at every slot, exactly once
    per_slot = Counter((run.job_name, run.scheduled_for) for run in (a.repository.lookup_run(m.run_id) for m in sent))
    assert set(per_slot.values()) == {1}
    assert {key[1] for key in per_slot} == {T0 + seconds(5 * k) for k in range(rounds)}


def test_solar_slots_match_celerys_own_solar_schedule() -> None:
    pytest.importorskip("ephem", reason="solar schedules need the 'ephem' package")
    for event in sorted(solar._all_events):
        for lat, lon, at in ((52.52, 13.40, T0), (-33.87, 151.21, dt.datetime(2026, 12, 10, 3, 0, tzinfo=UTC))):
            ours = SolarSchedule(event, lat, lon).next_after(at)
            celerys = at + solar(event, lat, lon, nowfun=lambda at=at: at).remaining_estimate(at)
            assert abs(ours - celerys) < dt.timedelta(seconds=1), (event, lat, lon, ours, celerys)


# --- a tracking worker faster than the beat -------------------------------------------------------------


def test_worker_that_starts_the_task_before_the_beat_marks_it_dispatched_still_tracks_it(
    beats: BeatFactory,
) -> None:
    """The beat publishes, then marks the run `dispatched`; a worker with `celery_dbsched.tracking` may
    receive the message and start the task in between (RabbitMQ delivers in a millisecond)."""
    scheduler = beats({"report": {"task": "proj.report", "schedule": 60}})
    repository = scheduler.repository
    publisher = scheduler._publisher  # plain tasks are published directly, as send_task would send them
    real_publish = publisher.publish_task
    started: list[int] = []
    errors: list[DbschedError] = []

    def publish_and_start_at_once(*args: Any, **kwargs: Any) -> Any:
        task_id = real_publish(*args, **kwargs)
        run_id = args[-1][RUN_ID_HEADER]
        started.append(run_id)
        try:
            repository.track_start(run_id, "fast-worker", task_id)  # what task_prerun does on the worker
        except DbschedError as exc:  # ... which logs "not tracked" and lets the task run untracked
            errors.append(exc)
        return task_id

    publisher.publish_task = publish_and_start_at_once  # type: ignore[method-assign]
    scheduler.tick()
    [run_id] = started
    assert errors == []
    run = repository.lookup_run(run_id)
    assert run.status == "running", run  # tracked, and not failed as "not published"
    assert run.worker == "fast-worker"
    repository.track_end(run_id)
    assert repository.lookup_run(run_id).status == "completed"
    [message] = drain(beats.queue)  # type: ignore[attr-defined]
    assert message.run_id == run_id


def test_a_slot_claimed_by_a_beat_that_died_before_sending_it_is_not_lost(database: Database) -> None:
    """A plain task's schedule moves on when it is claimed; if its beat dies before publishing and restarts
    with the same server id, the run it left queued is ended and the entry is due again at once."""
    repository = database.migrated_repository()
    repository.upsert_job("entry", "beat_schedule: t", kind="task", task="t", schedule=IntervalSchedule(3600))
    [claimed] = repository.claim_runs("beat-1", 10).runs
    assert repository.lookup_job("entry").next_scheduled_run > repository.database_now()  # moved on at claim
    [ended] = repository.interrupt_runs(server_id="beat-1")  # the beat's restart
    assert ended.id == claimed.id and ended.status == "interrupted"
    due_in = repository.next_due_in()
    assert due_in is not None and due_in <= 0
    [again] = repository.claim_runs("beat-1", 10).runs
    assert again.job_name == "entry" and again.id > claimed.id
