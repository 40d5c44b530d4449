"""Issue 13 §2: `celery -A proj dbsched import django-celery-beat --url ...` on data django-celery-beat wrote itself.

tests/dcb_source.py (a subprocess: Django is configured once per process) runs django-celery-beat's migrations
on SQLite or on a PostgreSQL database of the test's own, and creates PeriodicTasks of every kind with its ORM.
The import runs as a user runs it (`celery -A cli_app dbsched import ...`). Every field must land, and each
imported schedule's next run must be what django-celery-beat's own `ModelEntry(...).is_due()` says for the same
entry at the same time. A live test switches a real beat and worker over and checks the slots.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from helpers.apps import memory_app
from helpers.polling import wait_for
from helpers.processes import Processes
from helpers.services import POSTGRES_URL, Database, require_service
from sqlalchemy import create_engine, text
from test_cli import dbsched, ok
from test_stock_beat_migration import Project

from celery_dbsched.binding import forget_repository
from celery_dbsched.importers import PEERS, Reading, Skipped, exit_status, plan_lines
from celery_dbsched.importers.django_celery_beat import read_django_celery_beat
from celery_dbsched.records import JobRecord, PutResult
from celery_dbsched.runtime import list_schedules
from celery_dbsched.states import Origin
from celery_dbsched.transport import filesystem_broker_settings

UTC = dt.timezone.utc
TESTS_DIR = Path(__file__).parent
NEVER_CHECK = 100_000_000  # django-celery-beat's NEVER_CHECK_TIMEOUT: "disabled, do not check again"
IMPORT = ("import", "django-celery-beat")


# -- the django-celery-beat database --------------------------------------------------------------------------


def source(action: str, url: str, *args: str, env: dict[str, str] | None = None) -> str:
    """tests/dcb_source.py ACTION URL ARGS: its stdout."""
    import os

    completed = subprocess.run(
        [sys.executable, str(TESTS_DIR / "dcb_source.py"), action, url, *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


def postgres_source() -> Iterator[str]:
    """A PostgreSQL database of its own (django-celery-beat's tables live in the public schema)."""
    require_service("postgres")
    name = f"i13_dcb_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def dcb_url(kind: str, tmp_path: Path) -> Iterator[str]:
    """An empty django-celery-beat database: SQLite, or PostgreSQL (then celery_dbsched's is PostgreSQL too)."""
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'django.sqlite3'}"
    else:
        yield from postgres_source()


@pytest.fixture
def target(kind: str, request: pytest.FixtureRequest) -> Database:
    """celery_dbsched's database, migrated, on the same kind of server as the source."""
    database: Database = request.getfixturevalue(f"{kind}_database")
    database.migrated_repository()
    return database


@pytest.fixture
def created(dcb_url: str) -> dict[str, dict[str, Any]]:
    """The few dozen PeriodicTasks tests/dcb_source.py creates, by name, as the ORM reads them back."""
    return {row["name"]: row for row in json.loads(source("create", dcb_url))}


def schedules(database: Database) -> dict[str, JobRecord]:
    app = memory_app(database.url)
    try:
        return {job.name: job for job in list_schedules(app)}
    finally:
        forget_repository(app)


def when(value: str | None) -> dt.datetime | None:
    return None if value is None else dt.datetime.fromisoformat(value)


# -- every field lands ----------------------------------------------------------------------------------------


def expected_schedule(row: dict[str, Any]) -> dict[str, Any]:
    spec = dict(row["schedule"])
    if spec["type"] == "interval":
        return {"type": "interval", "seconds": dt.timedelta(**{spec["period"]: spec["every"]}).total_seconds()}
    if spec["type"] == "clocked":
        return {"type": "clocked", "at": when(spec["at"]).astimezone(UTC).isoformat()}  # type: ignore[union-attr]
    return spec


def test_import_carries_every_field(dcb_url: str, target: Database, created: dict[str, dict[str, Any]]) -> None:
    result = ok(dbsched(target.url, *IMPORT, "--url", dcb_url))
    imported = schedules(target)
    assert "celery.backend_cleanup" not in imported  # celery_dbsched's beat adds its own
    assert "left out 1:\n    celery.backend_cleanup: Celery's own entry" in result.stdout
    assert f"created {len(created) - 1}:" in result.stdout
    assert sorted(imported) == sorted(set(created) - {"celery.backend_cleanup"})
    for name, job in imported.items():
        row = created[name]
        options = dict(job.task_options)
        assert job.origin == Origin.RUNTIME
        assert job.task == row["task"]
        assert list(job.task_args) == json.loads(row["args"])
        assert job.task_kwargs == json.loads(row["kwargs"])
        assert options.pop("headers") == {**json.loads(row["headers"] or "{}"), "periodic_task_name": name}
        for key in ("queue", "exchange", "routing_key", "priority"):
            assert options.pop(key, None) == row[key], (name, key)
        assert options.pop("expires", None) == row["expire_seconds"], name
        assert options == {}, name
        assert job.expire_time == when(row["expires"]), name
        assert job.one_off == row["one_off"], name
        # A one-off that ran, or one past its expires: django-celery-beat disables it at its next check.
        ran_once = row["one_off"] and row["total_run_count"] > 0
        expired = job.expire_time is not None and job.expire_time < job.create_time
        assert job.policy.enabled == (row["enabled"] and not ran_once and not expired), name
        if row["description"]:  # else the runtime API's default description
            assert job.description == row["description"], name
        assert job.schedule is not None and job.schedule.spec() == expected_schedule(row), name
    assert imported["all-options"].task_options["priority"] == 7  # the one with every option set
    assert imported["crontab-berlin-weekdays"].schedule.spec()["timezone"] == "Europe/Berlin"  # type: ignore[union-attr]
    # start_time: no run before it.
    start = when(created["start-future-interval"]["start_time"])
    assert imported["start-future-interval"].next_scheduled_run == start


def test_next_runs_are_django_celery_beats(dcb_url: str, target: Database, created: dict[str, dict[str, Any]]) -> None:
    """For each enabled entry, django-celery-beat's ModelEntry.is_due() at time T, and our stored next run:
    due at T <=> our next run <= T; not due, next check in N s <=> our next run = T + N."""
    ok(dbsched(target.url, *IMPORT, "--url", dcb_url))
    imported = schedules(target)
    peer = json.loads(source("due", dcb_url))
    assert len(peer) >= 50
    compared = []
    for name, state in peer.items():
        if name == "celery.backend_cleanup":
            continue
        job, at = imported[name], when(state["at"])
        assert at is not None
        if state["due"]:  # (a clocked one says "due, never check again")
            assert job.policy.enabled, name
            assert job.next_scheduled_run <= at + dt.timedelta(seconds=1), (name, state, job.next_scheduled_run)
        elif state["next"] >= NEVER_CHECK:  # django-celery-beat disables it now (ran one-off, or expired)
            assert not job.policy.enabled, name
        else:
            expected = at + dt.timedelta(seconds=state["next"])
            # django-celery-beat rounds a start_time's wait up to whole seconds; solar events differ by ephem's search.
            slack = 60 if name.startswith("solar") else 2
            assert abs((job.next_scheduled_run - expected).total_seconds()) <= slack, (name, state, job)
        compared.append(name)
    assert len(compared) >= 50


# -- dry run, twice, updates ----------------------------------------------------------------------------------


def test_dry_run_stores_nothing_and_a_second_import_changes_nothing(
    dcb_url: str, target: Database, created: dict[str, dict[str, Any]]
) -> None:
    count = len(created) - 1
    dry = ok(dbsched(target.url, *IMPORT, "--url", dcb_url, "--dry-run"))
    assert "(dry run: nothing stored)" in dry.stdout and f"would create {count}:" in dry.stdout
    assert schedules(target) == {}

    ok(dbsched(target.url, *IMPORT, "--url", dcb_url))
    first = schedules(target)
    again = ok(dbsched(target.url, *IMPORT, "--url", dcb_url))
    assert f"unchanged {count:,}" in again.stdout
    assert "created" not in again.stdout and "updated" not in again.stdout
    assert schedules(target) == first

    # Edited at the source (kwargs): a new import updates just those, and does not move their next runs.
    source("touch", dcb_url, "interval-hours-ran", "crontab-utc-daily-ran")
    updated = ok(dbsched(target.url, *IMPORT, "--url", dcb_url))
    assert "updated 2: interval-hours-ran, crontab-utc-daily-ran" in updated.stdout, updated.stdout
    assert f"unchanged {count - 2:,}" in updated.stdout
    after = schedules(target)
    for name in ("interval-hours-ran", "crontab-utc-daily-ran"):
        assert after[name].task_kwargs == {"touched": True}
        assert after[name].next_scheduled_run == first[name].next_scheduled_run


# -- what cannot be imported ----------------------------------------------------------------------------------


def test_skipped_and_refused_entries_are_listed_and_exit_1_unless_allow_skip(
    dcb_url: str, target: Database, created: dict[str, dict[str, Any]]
) -> None:
    engine = create_engine(dcb_url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.begin() as conn:  # rows django-celery-beat's ORM would refuse, written behind its back
        conn.execute(text("UPDATE django_celery_beat_periodictask SET args = '[1,' WHERE name = 'interval-days'"))
        conn.execute(text("UPDATE django_celery_beat_periodictask SET kwargs = '[]' WHERE name = 'interval-hours'"))
        conn.execute(
            text("UPDATE django_celery_beat_periodictask SET interval_id = NULL WHERE name = 'interval-minutes'")
        )
        # The name of a @job of the app: refused (code owns it).
        conn.execute(text("UPDATE django_celery_beat_periodictask SET name = 'load.00' WHERE name = 'disabled'"))
    engine.dispose()
    # An entry of the app's beat_schedule (django-celery-beat's beat copies them into its table): left out, not
    # refused; celery_dbsched's beat syncs it from the config.
    settings = {"beat_schedule": {"interval-seconds": {"task": "proj.tasks.work", "schedule": 30.0}}}
    code_job = {"DBSCHED_TEST_APP_LOAD_JOBS": "1"}  # registers the @job load.00

    failed = dbsched(target.url, *IMPORT, "--url", dcb_url, settings=settings, env=code_job)
    assert failed.returncode == 1, failed
    out = failed.stdout
    assert "skipped 2:" in out and "refused 2:" in out and "left out 2:" in out, out
    assert "    interval-days: args is not JSON" in out
    assert "    interval-minutes: no schedule: none of interval, crontab, solar or clocked is set" in out
    assert "    interval-hours: " in out and "kwargs" in out.split("    interval-hours: ")[1].splitlines()[0]
    assert "    load.00: " in out and "code" in out.split("    load.00: ")[1].splitlines()[0]
    assert "    interval-seconds: an entry of this app's beat_schedule" in out
    assert "4 entries not imported (above)" in out and "--allow-skip" in out
    imported = schedules(target)
    assert len(imported) == len(created) - 6  # the rest is imported all the same
    assert not {"interval-days", "interval-minutes", "interval-hours", "load.00", "interval-seconds"} & set(imported)

    allowed = dbsched(target.url, *IMPORT, "--url", dcb_url, "--allow-skip", settings=settings, env=code_job)
    assert allowed.returncode == 0, allowed
    assert "skipped 2:" in allowed.stdout and f"unchanged {len(created) - 6}" in allowed.stdout


def test_a_wrong_url_is_one_clear_error(target: Database, tmp_path: Path) -> None:
    missing = dbsched(target.url, *IMPORT, "--url", f"sqlite:///{tmp_path / 'nope.sqlite3'}")
    assert missing.returncode == 1 and "Traceback" not in missing.output
    assert f"no SQLite database at {tmp_path / 'nope.sqlite3'}" in missing.stderr
    assert not (tmp_path / "nope.sqlite3").exists()

    (tmp_path / "empty.sqlite3").touch()  # a database without django-celery-beat's tables
    empty = dbsched(target.url, *IMPORT, "--url", f"sqlite:///{tmp_path / 'empty.sqlite3'}")
    assert empty.returncode == 1 and "Traceback" not in empty.output
    assert "cannot read django-celery-beat's tables" in empty.stderr
    assert "migrations were applied" in empty.stderr

    bad = dbsched(target.url, *IMPORT, "--url", "not a url")
    assert bad.returncode == 1 and "--url: not a database URL" in bad.stderr

    zone = dbsched(target.url, *IMPORT, "--url", "sqlite:///x", "--naive-timezone", "Mars/Olympus")
    assert zone.returncode == 2 and "unknown timezone 'Mars/Olympus'" in zone.stderr
    assert schedules(target) == {}


def test_naive_times_are_read_in_the_given_zone(tmp_path: Path, sqlite_database: Database) -> None:
    """A project with USE_TZ = False stores local times without a zone (SQLite): --naive-timezone reads them."""
    url = f"sqlite:///{tmp_path / 'django.sqlite3'}"
    zone = {"DCB_USE_TZ": "0", "DCB_TIME_ZONE": "America/New_York"}
    rows = {row["name"]: row for row in json.loads(source("create", url, env=zone))}
    sqlite_database.migrated_repository()
    before = hashlib.sha256((tmp_path / "django.sqlite3").read_bytes()).hexdigest()
    ok(dbsched(sqlite_database.url, *IMPORT, "--url", url, "--naive-timezone", "America/New_York"))
    assert hashlib.sha256((tmp_path / "django.sqlite3").read_bytes()).hexdigest() == before  # only read
    job = schedules(sqlite_database)["clocked-future"]
    local = dt.datetime.fromisoformat(rows["clocked-future"]["schedule"]["at"])  # naive New York time
    from zoneinfo import ZoneInfo

    assert job.next_scheduled_run == local.replace(tzinfo=ZoneInfo("America/New_York"))

    # DJANGO_CELERY_BEAT_TZ_AWARE = False: every crontab in Celery's zone instead of its own.
    reading = read_django_celery_beat(url, crontab_timezone="Asia/Tokyo")
    crontabs = [e["schedule"] for e in reading.entries if e["schedule"]["type"] == "crontab"]
    assert len(crontabs) >= 18 and {spec["timezone"] for spec in crontabs} == {"Asia/Tokyo"}


# -- the shared plan and exit status (unit) ---------------------------------------------------------------------


def test_plan_lists_everything_and_exit_status_follows_skips() -> None:
    reading = Reading(
        entries=[{"name": "a"}, {"name": "b"}, {"name": "c"}],
        skipped=[Skipped("d", "solar needs ephem")],
        left_out=[Skipped("e", "built in")],
    )
    result = PutResult(created=["a"], updated=["b"], unchanged=["c"], refused=[], dry_run=True)
    lines = plan_lines("peer at x", reading, result)
    assert lines == [
        "peer at x: 5 entries read (dry run: nothing stored)",
        "  would create 1: a",
        "  would update 1: b",
        "  unchanged 1 (already imported as they are)",
        "  skipped 1:",
        "    d: solar needs ephem",
        "  left out 1:",
        "    e: built in",
        "1 entries not imported (above): fix them at the source and run the import again, or pass --allow-skip to "
        "accept that",
    ]
    assert exit_status(reading, result, allow_skip=False) == 1
    assert exit_status(reading, result, allow_skip=True) == 0
    clean = Reading(entries=reading.entries)
    assert exit_status(clean, result, allow_skip=False) == 0
    refused = PutResult(refused=[("a", "taken")])
    assert exit_status(clean, refused, allow_skip=False) == 1
    many = PutResult(created=[f"n{i}" for i in range(60)])
    assert plan_lines("p", Reading(), many)[1].endswith("n49 and 10 more")


def test_the_import_group_lists_its_peers() -> None:
    from celery_dbsched.importers import import_group

    ctx = click.Context(import_group)
    listed = import_group.list_commands(ctx)
    assert "django-celery-beat" in listed and set(listed) <= set(PEERS)
    assert import_group.get_command(ctx, "nope") is None
    for name in listed:
        command = import_group.get_command(ctx, name)
        assert command is not None and command.name == name


# -- live: a real beat and worker after the switch ------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_imported_entries_fire_at_their_slots_and_never_twice_across_the_switch(
    processes: Processes, tmp_path: Path
) -> None:
    """Short-interval entries whose last run was their last slot under django-celery-beat: after the import a real
    beat and worker run each at its next slots (none at once, none twice), and the clocked one once, at its time."""
    url = f"sqlite:///{tmp_path / 'django.sqlite3'}"
    broker = {**filesystem_broker_settings(tmp_path / "broker"), "task_default_queue": "dcb"}
    project = Project(processes, broker, f"sqlite:///{tmp_path / 'dbsched.sqlite3'}")
    dbsched_settings = {"beat_scheduler": "celery_dbsched.Scheduler", "dbsched_run_jobs_interval": 0.3}
    worker = project.worker(dbsched_settings)
    source("live", url)  # live-a ran at T0 (every 8 s), live-b at T0 - 3 s (every 10 s), live-once at T0 + 12 s
    migrated = Database("sqlite", project.database_url).migrated_repository()
    migrated.close()
    imported = ok(dbsched(project.database_url, *IMPORT, "--url", url))
    assert "created 3: live-a, live-b, live-once" in imported.stdout, imported.stdout
    jobs = schedules(Database("sqlite", project.database_url))
    firsts = {name: job.next_scheduled_run for name, job in jobs.items()}
    beat = project.beat(dbsched_settings, name="beat")
    started = dt.datetime.now(UTC)

    def enough() -> bool:
        return len(project.runs("live-a")) >= 3 and len(project.runs("live-b")) >= 2 and bool(project.runs("live-once"))

    wait_for(enough, 120, interval=0.3, message=lambda: f"runs of the imported entries; beat: {beat.log_tail()}")
    processes.check_alive(worker, beat)
    beat.stop()
    wait_for(lambda: len(project.events()) >= sum(len(project.runs(n)) for n in firsts), 60, interval=0.2)
    for name, every in (("live-a", 8.0), ("live-b", 10.0)):
        runs = project.runs(name)
        slots = [run.scheduled_for for run in runs]
        assert all(slot is not None for slot in slots)
        # Each at its next slot: the first is the slot after the last one django-celery-beat ran (not at once, not
        # skipped), then every `every` seconds; none twice.
        assert slots[0] == firsts[name], (name, slots, firsts[name])
        steps = [(b - a).total_seconds() for a, b in itertools.pairwise(slots)]  # type: ignore[operator]
        assert all(abs(step - every) < 0.01 or (step > every and step % every < 0.01) for step in steps), (name, steps)
        assert len(set(slots)) == len(slots), (name, slots)
        claimed = [run.create_time for run in runs]
        late = [(c, s) for c, s in zip(claimed, slots, strict=True) if c < s - dt.timedelta(seconds=0.1)]  # type: ignore[operator]
        assert not late, (name, late)  # none before its slot
    once = project.runs("live-once")
    assert len(once) == 1 and once[0].scheduled_for == firsts["live-once"]
    labels = [e["label"] for e in project.events() if e["label"].startswith("live")]
    assert labels.count("live-once") == 1
    assert started < firsts["live-a"] + dt.timedelta(seconds=30)  # the switch happened within the entries' cadence
