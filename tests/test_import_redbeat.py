"""`celery -A proj dbsched import redbeat` (issue 13 §2): RedBeat's schedule, as the real celery-redbeat writes it
to Redis (`RedBeatSchedulerEntry(...).save()`, `reschedule()`), moved into runtime schedules; every field checked,
and each next run compared with what RedBeat's own `is_due()` says for the same entry at the same time.

Keys live under a prefix of the test's own on the shared Redis (`i13-redbeat-test:<hex>:`), deleted after."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from celery import Celery
from celery.schedules import crontab, schedule, solar
from helpers.apps import make_app
from helpers.cluster import LATENESS
from helpers.polling import wait_for
from helpers.processes import Processes
from helpers.services import REDIS_URL, Database, require_service
from redbeat import RedBeatSchedulerEntry
from redbeat.schedules import rrule
from test_cli import clean_error, ok
from test_cli import dbsched as run_cli

from celery_dbsched import put_schedules
from celery_dbsched.beat_schedule import entry_names
from celery_dbsched.binding import forget_repository, repository_for
from celery_dbsched.errors import DbschedError
from celery_dbsched.importers.redbeat import read_redbeat, redis_client
from celery_dbsched.records import JobRecord
from celery_dbsched.states import Origin

pytestmark = pytest.mark.redis

UTC = dt.timezone.utc
ZONE = "Europe/Berlin"
BERLIN = ZoneInfo(ZONE)
SECOND = dt.timedelta(seconds=1)


@dataclass
class RedBeat:
    """RedBeat on the shared Redis under a prefix of this test's, and an app on the test's database."""

    app: Celery
    prefix: str
    client: Any
    saved: dict[str, RedBeatSchedulerEntry] = field(default_factory=dict)

    def save(self, name: str, task: str, sched: Any, *, last_run_at: dt.datetime | None = None, **kw: Any) -> None:
        """Through RedBeat's own API: save() (which sets last_run_at to now), then reschedule(last_run_at)."""
        entry = RedBeatSchedulerEntry(name, task, sched, app=self.app, **kw).save()
        if last_run_at is not None:
            entry.reschedule(last_run_at)
        self.saved[name] = entry

    def entry(self, name: str) -> RedBeatSchedulerEntry:
        """The entry as RedBeat's beat loads it, its schedule on this app (the beat's current app)."""
        loaded = RedBeatSchedulerEntry.from_key(self.prefix + name, app=self.app)
        loaded.schedule.app = self.app
        return loaded

    def read(self) -> Any:
        return read_redbeat(self.client, key_prefix=self.prefix, timezone=ZONE, declared=entry_names(self.app))

    def cli_args(self) -> list[str]:
        return ["import", "redbeat", "--redis-url", REDIS_URL, "--key-prefix", self.prefix]


@pytest.fixture
def redbeat(database: Database) -> Iterator[RedBeat]:
    require_service("redis")
    database.migrated_repository()
    prefix = f"i13-redbeat-test:{uuid.uuid4().hex[:10]}:"
    app = make_app(redbeat_redis_url=REDIS_URL, redbeat_key_prefix=prefix, timezone=ZONE, **database.conf())
    client = redis_client(REDIS_URL)
    try:
        yield RedBeat(app, prefix, client)
    finally:
        keys = list(client.scan_iter(match=prefix.replace("[", "\\[") + "*", count=1000))
        if keys:
            client.delete(*keys)
        forget_repository(app)
        app.close()


def _import(rb: RedBeat, *, dry_run: bool = False) -> Any:
    reading = rb.read()
    return reading, put_schedules(rb.app, reading.entries, dry_run=dry_run)


def _jobs(rb: RedBeat) -> dict[str, JobRecord]:
    return {job.name: job for job in repository_for(rb.app).list_jobs(Origin.RUNTIME)}


# -- every schedule type, field by field ---------------------------------------------------------------------


def _save_dozens(rb: RedBeat, now: dt.datetime) -> dict[str, str]:
    """Entries of every type RedBeat stores; returns the skipped names and the word their reason holds."""
    options = {"queue": "reports", "routing_key": "rk.reports", "exchange": "ex", "priority": 7, "headers": {"h": 1}}
    for i, every in enumerate((5, 30, 60, 90, 300, 3_600, 7_200, 86_400, 0.5, 45.25)):
        # run a moment ago, long ago (overdue: RedBeat runs it at once), or just saved (last_run_at = now)
        last = [now - dt.timedelta(seconds=every / 3), now - dt.timedelta(days=3), None][i % 3]
        rb.save(
            f"interval-{i}",
            f"proj.tasks.interval_{i}",
            schedule(dt.timedelta(seconds=every)),
            last_run_at=last,
            args=[i, "x", {"n": [1, 2]}],
            kwargs={"i": i, "nested": {"a": None}},
            options={**options, "expires": 30 + i} if i % 2 else {},
        )
    for i, every in enumerate((60, 120, 3_600, 10_800, 86_400)):
        rb.save(
            f"relative-{i}",
            "proj.tasks.relative",
            schedule(dt.timedelta(seconds=every), relative=True),
            last_run_at=now - dt.timedelta(seconds=every / 4 + 7.5),
        )
    crontabs = [
        crontab(),
        crontab(minute="*/5"),
        crontab(minute=0, hour="*/3"),
        crontab(minute=30, hour=7, day_of_week="mon-fri"),
        crontab(minute="15,45", hour="8-18", day_of_week="1,3,5"),
        crontab(minute=0, hour=0, day_of_month=1),
        crontab(minute=0, hour=12, day_of_month="1-7", month_of_year="3,6,9,12"),
        crontab(minute=5, hour=2, day_of_week="sun"),
        crontab(minute=[0, 20, 40], hour=[9, 17]),
        crontab(minute=59, hour=23, day_of_month=31),
        crontab(minute=0, hour=10, day_of_month=29, month_of_year=2),
        crontab(minute="*/10", hour="0-6", day_of_week="sat,sun"),
    ]
    for i, cron in enumerate(crontabs):
        last = [now - dt.timedelta(minutes=3), now - dt.timedelta(days=40), None, now.astimezone(UTC)][i % 4]
        rb.save(f"crontab-{i}", "proj.tasks.crontab", cron, last_run_at=last, kwargs={"i": i})
    rb.save("disabled-interval", "proj.tasks.off", schedule(600), enabled=False, last_run_at=now - SECOND)
    rb.save("disabled-crontab", "proj.tasks.off", crontab(minute=1), enabled=False)
    rb.save(
        "expires-at",
        "proj.tasks.expiring",
        schedule(60),
        options={"expires": dt.datetime(2031, 1, 2, 3, 4, 5, tzinfo=UTC), "queue": "q"},
    )
    skipped = {}
    for i, rule in enumerate((rrule("MINUTELY", interval=5), rrule("DAILY", byhour=[6]), rrule("WEEKLY", count=3))):
        rb.save(f"rrule-{i}", "proj.tasks.rrule", rule)
        skipped[f"rrule-{i}"] = "rrule"
    rb.save("relative-odd", "proj.tasks.relative", schedule(dt.timedelta(minutes=90), relative=True))
    skipped["relative-odd"] = "relative interval of 5400 s"
    return skipped


def test_redbeat_cannot_store_a_solar_schedule_so_there_is_none_to_import(redbeat: RedBeat) -> None:
    """RedBeat's JSON encoder knows interval, crontab and rrule only: save() of a solar entry fails in RedBeat."""
    with pytest.raises(TypeError, match="solar"):
        redbeat.save("sunrise", "proj.tasks.sun", solar("sunrise", 52.5, 13.4))


def test_every_type_lands_field_by_field_and_each_next_run_is_redbeats(redbeat: RedBeat) -> None:
    now = dt.datetime.now(BERLIN)
    skipped = _save_dozens(redbeat, now)
    reading, result = _import(redbeat)

    assert {s.name: s.reason for s in reading.skipped}.keys() == skipped.keys()
    for item in reading.skipped:
        assert skipped[item.name] in item.reason, item
    assert result.refused == []
    jobs = _jobs(redbeat)
    assert sorted(result.created) == sorted(jobs) == sorted(set(redbeat.saved) - set(skipped))
    assert len(jobs) >= 30

    for name, job in jobs.items():
        saved = redbeat.saved[name]
        loaded = redbeat.entry(name)
        assert job.origin == Origin.RUNTIME and not job.one_off
        assert job.task == saved.task
        assert list(job.task_args) == list(saved.args or [])
        assert job.task_kwargs == (saved.kwargs or {})
        options = dict(saved.options or {})
        expires = options.pop("expires", None)
        if isinstance(expires, dt.datetime):
            assert job.expire_time == expires
        else:
            assert job.expire_time is None
            if expires is not None:
                options["expires"] = expires
                assert job.policy.expires == dt.timedelta(seconds=expires)
        assert job.task_options == options
        assert job.queue == options.get("queue")
        assert job.policy.enabled is saved.enabled
        spec = job.schedule.spec() if job.schedule else {}
        if isinstance(saved.schedule, crontab):
            assert spec["type"] == "crontab" and spec["timezone"] == ZONE
            assert job.schedule is not None
            assert crontab(
                **{k: spec[k] for k in ("minute", "hour", "day_of_week", "day_of_month", "month_of_year")}
            ) == (saved.schedule)
        else:
            assert spec == {"type": "interval", "seconds": saved.schedule.run_every.total_seconds()}
        if saved.enabled:
            _assert_next_run_is_redbeats(loaded, job.next_scheduled_run)


def _assert_next_run_is_redbeats(entry: RedBeatSchedulerEntry, next_run: dt.datetime) -> None:
    """RedBeat's is_due() for the same entry: not due a second before our next run, due at it."""

    def due_at(moment: dt.datetime) -> bool:
        entry.schedule.nowfun = lambda: moment
        return bool(entry.is_due()[0])

    assert not due_at(next_run - SECOND), f"{entry.name}: RedBeat is due before our next run {next_run}"
    assert due_at(next_run), f"{entry.name}: RedBeat is not due at our next run {next_run}"


# -- the second run, --dry-run, and what is left out ---------------------------------------------------------


def test_dry_run_stores_nothing_and_a_second_import_changes_nothing(redbeat: RedBeat) -> None:
    now = dt.datetime.now(UTC)
    for i in range(6):
        redbeat.save(f"e-{i}", "proj.tasks.t", schedule(60 + i), last_run_at=now - dt.timedelta(seconds=10 * i))
    redbeat.save("cron", "proj.tasks.t", crontab(minute="*/15"))

    _, planned = _import(redbeat, dry_run=True)
    assert planned.dry_run and len(planned.created) == 7
    assert _jobs(redbeat) == {}

    _, first = _import(redbeat)
    assert sorted(first.created) == sorted(planned.created)
    before = _jobs(redbeat)

    _, second = _import(redbeat)
    assert (second.created, second.updated, sorted(second.unchanged)) == ([], [], sorted(before))
    assert _jobs(redbeat) == before

    # RedBeat changes an entry's args and ran it since: the import updates the args, not the next run.
    redbeat.save("e-1", "proj.tasks.t", schedule(61), args=[42], last_run_at=now)
    _, third = _import(redbeat)
    assert third.updated == ["e-1"] and len(third.unchanged) == 6
    after = _jobs(redbeat)
    assert after["e-1"].task_args == (42,)
    assert after["e-1"].next_scheduled_run == before["e-1"].next_scheduled_run


def _raw(rb: RedBeat, name: str, definition: Any, meta: Any = None) -> None:
    """A hash written as RedBeat writes it (or as it would be found damaged), listed in the sorted set."""
    key = rb.prefix + name
    rb.client.hset(key, "definition", definition if isinstance(definition, str) else json.dumps(definition))
    if meta is not None:
        rb.client.hset(key, "meta", meta if isinstance(meta, str) else json.dumps(meta))
    rb.client.zadd(rb.prefix + ":schedule", {key: 0})


def _datetime(**fields: Any) -> dict[str, Any]:
    return {"__type__": "datetime", "year": 2026, "month": 3, "day": 4, "hour": 5, "minute": 6, "second": 7,
            "microsecond": 8, **fields}  # fmt: skip


def test_damaged_and_unrepresentable_entries_are_skipped_with_their_reason(redbeat: RedBeat) -> None:
    interval = {"__type__": "interval", "every": 60, "relative": False}
    _raw(redbeat, "no-json", "{not json")
    redbeat.client.zadd(redbeat.prefix + ":schedule", {redbeat.prefix + "no-hash": 1})
    _raw(redbeat, "eta", {"name": "eta", "task": "t.t", "schedule": interval, "options": {"eta": _datetime()}})
    _raw(redbeat, "unknown", {"name": "unknown", "task": "t.t", "schedule": {"__type__": "solar", "event": "dawn"}})
    _raw(redbeat, "list-options", {"name": "list-options", "task": "t.t", "schedule": interval, "options": [1]})
    _raw(redbeat, "zero", {"name": "zero", "task": "t.t", "schedule": {"__type__": "interval", "every": 0}})
    _raw(redbeat, "bad-cron", {"name": "bad-cron", "task": "t.t", "schedule": {"__type__": "crontab", "minute": "99"}})
    _raw(redbeat, "bad-zone", {"name": "bad-zone", "task": "t.t", "schedule": interval},
         {"last_run_at": _datetime(timezone="Mars/Olympus")})  # fmt: skip
    # RedBeat before 2.0 wrote naive datetimes (UTC); an offset is stored in seconds.
    _raw(redbeat, "no-meta", {"task": "t.t", "schedule": interval})  # never run (due at once); named by its key
    _raw(redbeat, "naive", {"name": "naive", "task": "t.t", "schedule": interval}, {"last_run_at": _datetime()})
    _raw(redbeat, "offset", {"name": "offset", "task": "t.t", "schedule": interval},
         {"last_run_at": _datetime(timezone=-18_000.0)})  # fmt: skip

    reading = redbeat.read()
    reasons = {s.name: s.reason for s in reading.skipped}
    assert "not RedBeat's JSON" in reasons.pop("no-json")
    assert "no 'definition'" in reasons.pop("no-hash")
    assert "option 'eta' is a fixed time" in reasons.pop("eta")
    assert "none RedBeat writes" in reasons.pop("unknown")
    assert "positive number of seconds" in reasons.pop("zero")
    assert "not a JSON object" in reasons.pop("list-options")
    assert "crontab" in reasons.pop("bad-cron")
    assert "Mars/Olympus" in reasons.pop("bad-zone")
    assert reasons == {}
    last = {e["name"]: e["last_run_at"] for e in reading.entries}
    assert last == {
        "no-meta": None,
        "naive": dt.datetime(2026, 3, 4, 5, 6, 7, 8, tzinfo=UTC),
        "offset": dt.datetime(2026, 3, 4, 10, 6, 7, 8, tzinfo=UTC),
    }


def test_statics_this_app_declares_are_left_to_beat_schedule_and_the_others_imported(redbeat: RedBeat) -> None:
    redbeat.app.conf.beat_schedule = {"static-kept": {"task": "proj.tasks.t", "schedule": 60}}
    # No result backend (one without auto-expiry): every beat installs Celery's own celery.backend_cleanup.
    for name in ("static-kept", "static-gone", "dynamic", "celery.backend_cleanup"):
        redbeat.save(name, "proj.tasks.t", schedule(60))
    redbeat.client.sadd(redbeat.prefix + ":statics", "static-kept", "static-gone")
    reading = redbeat.read()
    left_out = sorted((s.name, "beat_schedule" in s.reason) for s in reading.left_out)
    assert left_out == [("celery.backend_cleanup", True), ("static-kept", True)]
    assert sorted(e["name"] for e in reading.entries) == ["dynamic", "static-gone"]
    assert reading.skipped == []
    # A static no longer declared here is imported; a dynamic entry named like a beat_schedule one is refused.
    redbeat.app.conf.beat_schedule = {"dynamic": {"task": "proj.tasks.t", "schedule": 60}}
    reading = redbeat.read()
    assert sorted(e["name"] for e in reading.entries) == ["dynamic", "static-gone", "static-kept"]
    refused = put_schedules(redbeat.app, reading.entries, dry_run=True).refused
    assert [name for name, _ in refused] == ["dynamic"]


def test_a_wrong_prefix_or_an_unreachable_redis_is_one_clear_error(redbeat: RedBeat) -> None:
    with pytest.raises(DbschedError, match=r"no RedBeat schedule at key 'nope:schedule'.*--key-prefix"):
        read_redbeat(redbeat.client, key_prefix="nope")
    redbeat.save("one", "proj.tasks.t", schedule(60))
    without_colon = redbeat.prefix.rstrip(":")
    with pytest.raises(DbschedError, match=rf"there is one under --key-prefix '{without_colon}:'"):
        read_redbeat(redbeat.client, key_prefix=without_colon)
    with pytest.raises(DbschedError, match=r"cannot read Redis at redis://127\.0\.0\.1:1/0.*--redis-url"):
        redis_client("redis://127.0.0.1:1/0")
    with pytest.raises(DbschedError, match=r"--redis-url http://x is not a Redis URL"):
        redis_client("http://x")


# -- the command, as users run it ----------------------------------------------------------------------------


@pytest.mark.processes
def test_the_command_plans_imports_and_exits_1_on_a_skip_unless_allowed(redbeat: RedBeat, database: Database) -> None:
    now = dt.datetime.now(UTC)
    for i in range(3):
        redbeat.save(f"cmd-{i}", "proj.tasks.t", schedule(30), last_run_at=now)
    redbeat.save("cmd-rrule", "proj.tasks.t", rrule("HOURLY"))
    settings = {"timezone": ZONE}

    def cli(*extra: str) -> Any:
        return run_cli(database.url, *redbeat.cli_args(), *extra, settings=settings)

    planned = cli("--dry-run")
    assert planned.returncode == 1, planned
    assert f"crontabs in {ZONE}" in planned.stdout and "dry run: nothing stored" in planned.stdout
    assert "would create 3: cmd-0, cmd-1, cmd-2" in planned.stdout
    assert "cmd-rrule: an rrule schedule" in planned.stdout and "--allow-skip" in planned.stdout
    assert _jobs(redbeat) == {}

    imported = ok(cli("--allow-skip"))
    assert "created 3" in imported.stdout and "skipped 1" in imported.stdout
    assert sorted(_jobs(redbeat)) == ["cmd-0", "cmd-1", "cmd-2"]
    again = ok(cli("--allow-skip"))
    assert "unchanged 3" in again.stdout and "created" not in again.stdout

    missing = clean_error(run_cli(database.url, "import", "redbeat", "--redis-url", REDIS_URL, "--key-prefix",
                                  redbeat.prefix + "typo:", settings=settings))  # fmt: skip
    assert "--key-prefix" in missing.stderr
    zone = clean_error(run_cli(database.url, *redbeat.cli_args(), settings={"timezone": "Mars/Olympus"}))
    assert "timezone" in zone.stderr and "Mars/Olympus" in zone.stderr


# -- a real switch: RedBeat's beat, the import, celery_dbsched's beat; one worker throughout ----------------


def _ticks(log: Path) -> dict[str, list[float]]:
    """When `redbeat_app.tick` ran, per entry (unix times, in order)."""
    ticks: dict[str, list[float]] = {}
    if log.exists():
        for line in log.read_text().splitlines():
            item = json.loads(line)
            ticks.setdefault(item["name"], []).append(item["time"])
    return ticks


@pytest.mark.e2e
@pytest.mark.postgres
def test_a_real_switch_fires_each_entry_at_redbeats_next_slot_none_twice_none_skipped(
    processes: Processes, postgres_database: Database, tmp_path: Path
) -> None:
    """RedBeat's beat runs three entries once, celery_dbsched's beat idling beside it; RedBeat's is stopped and
    the entries imported: each next run is RedBeat's next slot (last_run_at + every, exactly), then every
    `every`, each slot sent once (one worker execution per run, spaced by `every`), none skipped. The intervals
    are longer than the switch takes on a loaded machine, so that no slot falls in it (a slot missed while no
    beat runs is the misfire policy's, not the import's)."""
    require_service("redis")
    repo = postgres_database.migrated_repository()
    tag = uuid.uuid4().hex[:10]
    prefix, log = f"i13-redbeat-test:{tag}:", tmp_path / "ticks.jsonl"
    env = {
        "REDBEAT_APP_DB": postgres_database.url,
        "REDBEAT_APP_BROKER": REDIS_URL,
        "REDBEAT_APP_QUEUE": f"i13-redbeat-test-{tag}",
        "REDBEAT_APP_PREFIX": prefix,
        "REDBEAT_APP_LOG": str(log),
    }
    app = make_app(redbeat_redis_url=REDIS_URL, redbeat_key_prefix=prefix)
    client = redis_client(REDIS_URL)
    every = {"every-9": 9.0, "every-10": 10.0, "every-12": 12.0}  # short (CI time), longer than the switch

    def ran(counts: dict[str, int]) -> bool:
        ticks = _ticks(log)
        return all(len(ticks.get(name, ())) >= count for name, count in counts.items())

    try:
        now = dt.datetime.now(UTC)
        for name, seconds in every.items():  # all due at once, a few seconds from now
            entry = RedBeatSchedulerEntry(name, "redbeat_app.tick", schedule(seconds), args=[name], app=app).save()
            entry.reschedule(now - dt.timedelta(seconds=seconds - 5))
        worker = processes.start_worker("redbeat_app", env=env, name="worker")
        worker.wait_ready()
        old_beat = processes.start_beat(
            "redbeat_app",
            env=env,
            name="redbeat",
            scheduler="redbeat.RedBeatScheduler",
            extra_args=["--max-interval", "1"],
        )
        new_beat = processes.start_beat("redbeat_app", env=env, name="dbsched")  # idle: no job yet
        new_beat.wait_for_log("beat: Starting", 60)
        wait_for(lambda: ran(dict.fromkeys(every, 1)), 90, 0.1, lambda: f"{_ticks(log)}\n{old_beat.log_tail()}")
        assert old_beat.stop() == 0
        last = {name: RedBeatSchedulerEntry.from_key(prefix + name, app=app).last_run_at for name in every}
        assert all(len(times) == 1 for times in _ticks(log).values()), _ticks(log)

        # The import, in this process (the command itself is tested above): PostgreSQL's NOTIFY wakes the beat.
        app.conf.dbsched_database_url = postgres_database.url
        reading = read_redbeat(client, key_prefix=prefix, timezone="UTC", declared=entry_names(app))
        assert sorted(put_schedules(app, reading.entries).created) == sorted(every)
        assert [item.name for item in reading.left_out] == ["celery.backend_cleanup"]  # ours has its own
        imported = dt.datetime.now(UTC)
        assert all(imported < last[name] + dt.timedelta(seconds=s) for name, s in every.items()), "the switch was slow"
        wait_for(lambda: ran({"every-9": 3, "every-10": 3, "every-12": 2}), 120, 0.2, lambda: new_beat.log_tail())
        processes.check_alive(worker, new_beat)
        assert new_beat.stop() == 0

        def one_execution_per_run() -> bool:  # the worker executes what the beat sent before it stopped
            ticks = _ticks(log)
            return all(len(ticks[name]) == 1 + len(repo.list_runs(job_name=name, limit=1000)) for name in every)

        wait_for(one_execution_per_run, 30, 0.2, lambda: f"executions {_ticks(log)} for runs {repo.list_runs()}")
    finally:
        keys = list(client.scan_iter(match=prefix + "*"))
        if keys:
            client.delete(*keys)
        queue_keys = list(client.scan_iter(match=f"*{env['REDBEAT_APP_QUEUE']}*"))  # the queue, kombu's bindings
        if queue_keys:
            client.delete(*queue_keys)
        forget_repository(app)

    ticks = _ticks(log)
    for name, seconds in every.items():
        step = dt.timedelta(seconds=seconds)
        runs = sorted(repo.list_runs(job_name=name, limit=1000), key=lambda r: r.id)
        slots = [run.scheduled_for for run in runs]
        # RedBeat's cadence goes on from its last run: last_run_at + 1, 2, 3... steps, each slot once.
        assert slots == [last[name] + k * step for k in range(1, len(slots) + 1)], (name, last[name], slots)
        times = ticks[name]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert all(seconds - 0.5 <= gap <= seconds + LATENESS for gap in gaps), (name, gaps)
