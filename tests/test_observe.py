"""The read model (`celery_dbsched.observe`, issue 12 §1): server rows, the fleet alive or silent, jobs due and
not claimed, active, stalled and failed runs, the health problems `dbsched status` exits on, the JSON shapes,
pruning dead servers' rows, and the statements' bounds (no count over the runs table)."""

from __future__ import annotations

import datetime as dt
import re

import pytest
from helpers.repository import claim, claim_one
from helpers.services import Database
from helpers.shapes import BEAT_KEYS, JOB_KEYS, RUN_KEYS, STATUS_KEYS, WORKER_KEYS
from sqlalchemy import text

from celery_dbsched import JobRepository, observe
from celery_dbsched import statements as sql
from celery_dbsched.clock import TestClock
from celery_dbsched.records import ClaimStats
from celery_dbsched.repository import PACKAGE_VERSION
from celery_dbsched.scheduler import ClaimWindow
from celery_dbsched.states import RunState

MIN = dt.timedelta(minutes=1)


def _beat(repository: JobRepository, server_id: str = "beat-1", pid: int = 11, **stats: float) -> None:
    claims = ClaimStats(int(stats.get("count", 0)), stats.get("p50"), stats.get("max"))
    repository.heartbeat(server_id, "beat", "host-b", pid, interval=5.0, claims=claims)


def test_server_rows_say_role_host_version_and_a_beats_claims(repository: JobRepository) -> None:
    _beat(repository, count=3, p50=0.25, max=1.5)
    repository.heartbeat("celery@w1", "worker", "host-w", 22, interval=10.0)
    fleet = observe.fleet(repository)
    [beat], [worker] = fleet.beats, fleet.workers
    assert (beat.id, beat.role, beat.host, beat.pid, beat.version, beat.alive) == (
        "beat-1",
        "beat",
        "host-b",
        11,
        PACKAGE_VERSION,
        True,
    )
    assert (beat.claims_last_minute, beat.claim_lag_p50, beat.claim_lag_max) == (3, 0.25, 1.5)
    assert (worker.role, worker.runs_in_flight, worker.heartbeat_interval) == ("worker", 0, 10.0)
    assert list(beat.as_json()) == BEAT_KEYS
    assert list(worker.as_json()) == WORKER_KEYS
    assert beat.as_json()["last_tick"] == beat.as_json()["last_seen"]


def test_a_server_is_silent_after_three_missed_heartbeats(repository: JobRepository, clock: TestClock) -> None:
    _beat(repository)
    clock.advance(dt.timedelta(seconds=14))
    assert observe.fleet(repository).beats[0].alive
    clock.advance(dt.timedelta(seconds=2))
    [beat] = observe.fleet(repository).beats
    assert not beat.alive and beat.silent_for >= 16


def test_a_workers_runs_in_flight_are_its_running_runs(repository: JobRepository) -> None:
    for name in ("a", "b", "c"):
        repository.upsert_job(name, "in flight")
    runs = {run.job_name: run for run in claim(repository)}
    for name, worker in (("a", "celery@w1"), ("b", "celery@w1"), ("c", "celery@w2")):
        repository.start_run(runs[name].id, worker)
    repository.heartbeat("celery@w1", "worker", "host-w", 22, interval=10.0)
    assert observe.fleet(repository).workers[0].runs_in_flight == 2


def test_a_new_process_under_the_same_id_gets_a_new_start_time(repository: JobRepository, clock: TestClock) -> None:
    repository.heartbeat("celery@w1", "worker", "host-w", 22, interval=10.0)
    started = observe.fleet(repository).workers[0].started
    clock.advance(MIN)
    repository.heartbeat("celery@w1", "worker", "host-w", 22, interval=10.0)
    assert observe.fleet(repository).workers[0].started == started  # the same process: only last seen moves
    clock.advance(MIN)
    repository.heartbeat("celery@w1", "worker", "host-w", 23, interval=10.0)  # restarted: another pid
    [worker] = observe.fleet(repository).workers
    assert worker.started == worker.last_seen > started


def test_dead_servers_rows_are_pruned_after_the_retention(repository: JobRepository, clock: TestClock) -> None:
    _beat(repository, "old-beat")
    clock.advance(dt.timedelta(hours=2))
    _beat(repository, "new-beat")
    assert repository.prune_servers(dt.timedelta(hours=1)) == 1
    assert [beat.id for beat in observe.fleet(repository).beats] == ["new-beat"]


def test_due_jobs_not_claimed_count_and_the_oldest_lateness(repository: JobRepository, clock: TestClock) -> None:
    repository.upsert_job("late", "due a while", first_run_in=dt.timedelta(0))
    repository.upsert_job("later", "due soon", first_run_in=dt.timedelta(seconds=30))
    repository.upsert_job("paused", "not claimable", first_run_in=dt.timedelta(0))
    repository.set_paused("paused", True)
    clock.advance(dt.timedelta(minutes=10))
    due = observe.due_backlog(repository)
    assert (due.count, due.capped, due.earliest_job) == (2, False, "late")
    assert 600 <= due.lateness < 610
    assert list(due.as_json()) == ["count", "capped", "oldest_job", "oldest_due", "oldest_lateness"]


def test_nothing_due_is_no_lateness(repository: JobRepository) -> None:
    repository.upsert_job("soon", "not yet", first_run_in=MIN)
    due = observe.due_backlog(repository)
    assert (due.count, due.lateness) == (0, 0.0)
    assert due.as_json() == {
        "count": 0,
        "capped": False,
        "oldest_job": None,
        "oldest_due": None,
        "oldest_lateness": None,
    }


def test_problems_no_beat_alive_and_a_job_waiting_past_max_lag(repository: JobRepository, clock: TestClock) -> None:
    repository.upsert_job("late", "due", first_run_in=dt.timedelta(0))
    assert observe.status(repository).problems(None) == [
        "no beat is alive: no beat has written a heartbeat (or its row was pruned); "
        "start one: celery -A proj beat -S celery_dbsched.Scheduler"
    ]
    clock.advance(dt.timedelta(minutes=5))
    _beat(repository)
    status = observe.status(repository)
    assert status.problems(dt.timedelta(minutes=10)) == []
    [lag] = status.problems(MIN)
    assert re.fullmatch(
        r"job 'late' has been due for 5 min( \d s)?, longer than --max-lag 1 min \(1 job\(s\) due and not claimed\): "
        r"the beats do not keep up, or cannot reach the database or the broker",
        lag,
    ), lag
    clock.advance(MIN)
    [silent, _] = observe.status(repository).problems(MIN)
    assert re.fullmatch(
        r"no beat is alive: the last one seen, beat-1, has been silent for 1 min( \d s)?; start one: .*", silent
    )


def test_active_stalled_and_failed_runs(repository: JobRepository, clock: TestClock) -> None:
    for name in ("quiet", "failing", "queued"):
        repository.upsert_job(name, "runs")
    runs = {run.job_name: run for run in claim(repository)}
    quiet = repository.start_run(runs["quiet"].id, "celery@w1")
    failing = repository.start_run(runs["failing"].id, "celery@w1")
    repository.fail_run(failing.id, "Traceback ...\nValueError: boom")
    status = observe.status(repository)
    assert {run.job_name for run in status.active.runs} == {"quiet", "queued"} and status.active.count == 2
    assert [run.id for run in status.failures.runs] == [failing.id]
    assert status.stalled.count == 0
    clock.advance(repository.interrupt_threshold + MIN)  # no beat ran its monitor meanwhile
    status = observe.status(repository)
    assert {run.job_name for run in status.stalled.runs} == {"quiet", "queued"}
    repository.interrupt_runs()  # a beat's monitor: stalled runs are interrupted (and count as failures)
    status = observe.status(repository)
    assert (status.stalled.count, status.active.count, status.failures.count) == (0, 0, 3)
    assert status.failures.runs[-1].id == failing.id  # latest first
    assert {run.status for run in status.failures.runs[:2]} == {RunState.INTERRUPTED}
    assert quiet.id in {run.id for run in status.failures.runs}
    clock.advance(dt.timedelta(hours=1))
    assert observe.status(repository).failures.count == 0  # the last hour only


def test_status_json_shape(repository: JobRepository) -> None:
    repository.upsert_job("a", "shape")
    run = repository.start_run(claim_one(repository, "a").id, "celery@w1")
    _beat(repository)
    repository.heartbeat("celery@w1", "worker", "host-w", 22, interval=10.0)
    data = observe.status(repository).as_json(MIN)
    assert list(data) == STATUS_KEYS
    assert data["healthy"] is True and data["problems"] == []
    assert list(data["beats"][0]) == BEAT_KEYS and list(data["workers"][0]) == WORKER_KEYS
    assert list(data["active"]) == ["count", "capped", "runs"]
    assert list(data["active"]["runs"][0]) == RUN_KEYS
    assert data["active"]["runs"][0]["id"] == run.id and data["active"]["runs"][0]["status"] == "running"
    last = repository.last_runs()["a"]
    job = repository.lookup_job("a")
    assert list(observe.job_json(job, "enabled", last, job.create_time)) == JOB_KEYS


def test_claim_window_reports_the_last_minute() -> None:
    window = ClaimWindow(60.0)
    assert window.stats(0.0) == ClaimStats(0, None, None)
    slot = dt.datetime(2026, 12, 5, 8, tzinfo=dt.timezone.utc)

    def run(lag: float) -> object:
        return type("Run", (), {"scheduled_for": slot, "create_time": slot + dt.timedelta(seconds=lag)})()

    window.add([run(1.0), run(3.0), run(2.0)], at=10.0)  # type: ignore[list-item]
    window.add([run(10.0)], at=50.0)  # type: ignore[list-item]
    assert window.stats(55.0) == ClaimStats(4, 2.5, 10.0)
    assert window.stats(100.0) == ClaimStats(1, 10.0, 10.0)  # the first batch is over a minute old
    assert window.stats(200.0) == ClaimStats(0, None, None)


# -- bounded statements -------------------------------------------------------------------------------------------


def _observe_statements(repository: JobRepository) -> list[object]:
    now = repository.clock.now
    return [
        sql.servers(1000),
        sql.due_backlog(now, 10_000),
        *sql.active_runs(10_000, 10),
        *sql.stalled_runs(now, 300.0, 10_000, 10),
        *sql.failures_since(now, 3600.0, 10_000, 10),
    ]


def test_every_count_is_over_a_limited_subquery(repository: JobRepository) -> None:
    for statement in _observe_statements(repository):
        compiled = str(statement.compile(repository.engine))  # type: ignore[attr-defined]
        for match in re.finditer(r"count\(\*\)", compiled):
            rest = compiled[match.end() :]
            assert re.match(r"\s*AS \w+\s*FROM \(SELECT", rest), compiled  # count over a subquery ...
            assert " LIMIT " in rest, compiled  # ... which is limited


@pytest.mark.postgres
def test_status_reads_use_indexes_not_scans_of_the_runs_table(postgres_database: Database) -> None:
    repository = postgres_database.migrated_repository()  # plans are PostgreSQL's: no SQLite twin to skip
    repository.upsert_job("a", "plans")
    with repository.engine.begin() as conn:
        conn.execute(text("SET LOCAL enable_seqscan = off"))  # a scan is then only chosen where no index serves
        # ... and the count of a worker's runs in flight, in its heartbeat, and the metrics' active runs by
        # status: over the active runs only.
        for statement in [*_observe_statements(repository), sql.runs_in_flight("celery@w1"), sql.active_by_status()]:
            compiled = statement.compile(conn, compile_kwargs={"literal_binds": True})  # type: ignore[attr-defined]
            plan = "\n".join(row[0] for row in conn.execute(text(f"EXPLAIN {compiled}")))
            assert "Seq Scan on dbsched_job_run" not in plan, plan
            assert "Seq Scan on dbsched_job " not in plan, plan
