"""Issue 9, goal 5: what the worker side costs the database, in round trips, on PostgreSQL.

Budget: a run costs one round trip to start (the `queued -> running` gate), one to finish (the run's end and
its job's next run, computed in the same statement), and one per progress change; a plain task tracked by
`celery_dbsched.tracking` the same. A change that adds a round trip fails here.

How a round trip is counted (`RoundTrips`), from SQLAlchemy's events:
- each statement SQLAlchemy sends (`before_cursor_execute`);
- on a connection that is not in autocommit, the BEGIN that psycopg sends before the first statement of a
  transaction and the COMMIT or ROLLBACK that ends it (each a round trip of its own with psycopg 3);
- each pool checkout (the pool's pre-ping is a round trip) and each new connection.
And at the protocol level, as a cross-check that nothing else goes to the server: libpq's trace of every
connection of the engine, where each simple-protocol Query and each extended-protocol Sync is one round trip.

Counted in steady state, after a warm-up run: a process's first statement checks out (and pings) the
connection that the worker side then keeps.
"""

from __future__ import annotations

import datetime as dt
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import IO, Any

import pytest
from celery import Celery
from helpers.services import Database
from sqlalchemy import Engine, event, select, text, update

import celery_dbsched.tracking as tracking
from celery_dbsched import JobContext, JobRepository, JobStatus, RunRecord
from celery_dbsched.binding import bind_repository
from celery_dbsched.clock import TestClock
from celery_dbsched.job import FunctionJob, JobDefinition
from celery_dbsched.migrate import migrate
from celery_dbsched.protocol import RUN_ID_HEADER
from celery_dbsched.runner import execute_run
from celery_dbsched.schedules import CrontabSchedule
from celery_dbsched.schema import job_table, run_table
from celery_dbsched.statements import wakeup_channel
from celery_dbsched.states import JobKind

pytestmark = pytest.mark.postgres

UTC = dt.timezone.utc
HOUR = dt.timedelta(hours=1)
START, FINISH, PROGRESS = 1, 1, 1  # the budget


class RoundTrips:
    """Counts what an engine sends to PostgreSQL while `counting()` (see the module docstring)."""

    def __init__(self, engine: Engine) -> None:
        self.statements: list[str] = []
        self.transaction_ends = 0  # BEGIN/COMMIT/ROLLBACK sent by the driver
        self.checkouts = 0
        self.connects = 0
        self._in_transaction: set[int] = set()
        self._dbapi: list[Any] = []
        self._trace: IO[str] | None = None
        self._lock = threading.Lock()
        event.listen(engine, "connect", self._on_connect)
        event.listen(engine, "checkout", self._on_checkout)
        event.listen(engine, "before_cursor_execute", self._on_statement)
        event.listen(engine, "commit", self._on_end)
        event.listen(engine, "rollback", self._on_end)

    @property
    def by_events(self) -> int:
        return len(self.statements) + self.transaction_ends + self.checkouts + self.connects

    def _on_connect(self, dbapi_connection: Any, record: Any) -> None:
        with self._lock:
            self._dbapi.append(dbapi_connection)
            self.connects += 1
            if self._trace is not None:
                self._start_trace(dbapi_connection)

    def _on_checkout(self, dbapi_connection: Any, record: Any, proxy: Any) -> None:
        with self._lock:
            self.checkouts += 1

    def _on_statement(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        with self._lock:
            self.statements.append(" ".join(statement.split())[:80])
            if not conn.connection.dbapi_connection.autocommit and id(conn) not in self._in_transaction:
                self._in_transaction.add(id(conn))
                self.transaction_ends += 1  # BEGIN

    def _on_end(self, conn: Any) -> None:
        with self._lock:
            if id(conn) in self._in_transaction:
                self._in_transaction.discard(id(conn))
                self.transaction_ends += 1  # COMMIT or ROLLBACK

    def _start_trace(self, dbapi_connection: Any) -> None:
        from psycopg import pq

        assert self._trace is not None
        dbapi_connection.pgconn.trace(self._trace.fileno())
        dbapi_connection.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)

    def counting(self, action: Callable[[], Any]) -> tuple[Any, int, int]:
        """Run `action`; return its result, the round trips by the events and by libpq's trace."""
        with self._lock:
            self.statements.clear()
            self.transaction_ends = self.checkouts = self.connects = 0
            self._trace = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed when counted
            for dbapi_connection in self._dbapi:
                if not dbapi_connection.closed:
                    self._start_trace(dbapi_connection)
        try:
            result = action()
        finally:
            with self._lock:
                for dbapi_connection in self._dbapi:
                    if not dbapi_connection.closed:
                        dbapi_connection.pgconn.untrace()  # flushes
                trace, self._trace = self._trace, None
        trace.seek(0)
        sent = [line.split("\t") for line in trace.read().splitlines()]
        trace.close()
        wire = sum(1 for fields in sent if fields[0] == "F" and fields[2:3] in (["Query"], ["Sync"]))
        return result, self.by_events, wire


@pytest.fixture
def counted(postgres_database: Database) -> tuple[JobRepository, RoundTrips]:
    """A worker's repository (wake-ups on, as with `dbsched_listen`), instrumented before its first connection."""
    repository = postgres_database.repository(listen=True, run_jobs_interval=dt.timedelta(seconds=5))
    trips = RoundTrips(repository.engine)
    migrate(repository.engine)
    return repository, trips


def add_and_claim(repository: JobRepository, name: str, **kwargs: Any) -> RunRecord:
    """Register a job due now and claim its run."""
    repository.upsert_job(name, f"the {name} job", first_run_in=dt.timedelta(0), **kwargs)
    [run] = [run for run in repository.claim_runs("beat-1", 100).runs if run.job_name == name]
    return run


def claimed_job(
    repository: JobRepository, body: Callable[[JobContext], Any], name: str, **kwargs: Any
) -> Callable[[], RunRecord]:
    """Register and claim a job (not counted); return what a worker does with its run (counted)."""
    job = FunctionJob(body, name=name, description=name, every=HOUR, queue=None, interrupt_threshold=None)
    run = add_and_claim(repository, name, every=HOUR, **kwargs)

    def execute() -> RunRecord:
        done = execute_run(repository, {name: job}.get, run.id, "worker-1", task_id="t-1", monitor_interval=1.0)
        assert done is not None
        return done

    return execute


def assert_budget(trips: RoundTrips, by_events: int, wire: int, budget: int) -> None:
    assert by_events == budget, trips.statements
    assert wire == by_events, f"the events miss round trips: {trips.statements}"


def warm_up(repository: JobRepository) -> None:
    claimed_job(repository, lambda ctx: None, f"warm-up-{uuid.uuid4().hex[:6]}")()


# -- @job runs ------------------------------------------------------------------------------------------------


def test_a_run_that_completes_costs_a_start_and_a_finish(counted: tuple[JobRepository, RoundTrips]) -> None:
    repository, trips = counted
    warm_up(repository)
    done, by_events, wire = trips.counting(claimed_job(repository, lambda ctx: None, "empty"))
    assert done.status == "completed"
    assert_budget(trips, by_events, wire, START + FINISH)
    assert repository.lookup_job("empty").next_scheduled_run > done.end_time  # type: ignore[operator]


def test_a_run_due_again_at_once_wakes_the_beats_in_its_finish(counted: tuple[JobRepository, RoundTrips]) -> None:
    repository, trips = counted
    warm_up(repository)
    execute = claimed_job(repository, lambda ctx: dt.timedelta(0), "again")
    listener = repository.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    try:
        channel = listener.execute(select(wakeup_channel())).scalar_one()  # this schema's (test_wakeup.py)
        listener.execute(text(f"LISTEN {channel}"))
        done, by_events, wire = trips.counting(execute)
        assert done.status == "completed"
        assert_budget(trips, by_events, wire, START + FINISH)
        dbapi = listener.connection.dbapi_connection
        assert dbapi is not None
        notified = [n.payload for n in dbapi.notifies(timeout=5, stop_after=1)]  # type: ignore[attr-defined]
        assert notified == ["again"]
    finally:
        listener.close()


def test_a_run_that_fails_costs_a_start_and_a_finish(counted: tuple[JobRepository, RoundTrips]) -> None:
    repository, trips = counted
    warm_up(repository)

    def explode(ctx: JobContext) -> None:
        raise RuntimeError("boom")

    done, by_events, wire = trips.counting(claimed_job(repository, explode, "failing"))
    assert done.status == "failed"
    assert_budget(trips, by_events, wire, START + FINISH)
    assert repository.lookup_job("failing").failure_count == 1


def test_a_progress_change_costs_one_more(
    counted: tuple[JobRepository, RoundTrips], postgres_database: Database
) -> None:
    repository, trips = counted
    observer = postgres_database.repository()  # another process's view, not counted
    warm_up(repository)

    def one_step(ctx: JobContext) -> None:
        ctx.progress(1, 2)
        deadline = time.monotonic() + 15
        while observer.lookup_run(ctx.run_id).progress != JobStatus(1, 2):  # written by the monitor after 1 s
            assert time.monotonic() < deadline, "the progress was never written"
            time.sleep(0.01)

    done, by_events, wire = trips.counting(claimed_job(repository, one_step, "stepping"))
    assert done.status == "completed" and done.progress == JobStatus(1, 2)
    assert_budget(trips, by_events, wire, START + PROGRESS + FINISH)


def test_a_crontab_job_costs_the_same(counted: tuple[JobRepository, RoundTrips]) -> None:
    """The next slot of a crontab is computed in Python: from what the start returned, not a query."""
    repository, trips = counted
    warm_up(repository)
    cron = CrontabSchedule(minute="*/5")
    done, by_events, wire = trips.counting(claimed_job(repository, lambda ctx: None, "cron", schedule=cron))
    assert done.status == "completed"
    assert_budget(trips, by_events, wire, START + FINISH)
    assert done.end_time is not None
    assert repository.lookup_job("cron").next_scheduled_run == cron.next_after(done.end_time)


# -- plain tasks tracked by celery_dbsched.tracking ----------------------------------------------------------


@pytest.fixture
def tracked_app(counted: tuple[JobRepository, RoundTrips]) -> Iterator[Celery]:
    repository, _ = counted
    app = Celery(f"round_trips_{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)
    app.conf.dbsched_database_url = str(repository.engine.url)
    previous = bind_repository(app, repository)
    yield app
    bind_repository(app, previous)


def dispatched_run(repository: JobRepository, name: str, task: str) -> RunRecord:
    repository.define_job(JobDefinition(name=name, description=name, kind=JobKind.TASK, task=task, every=HOUR))
    [run] = [run for run in repository.claim_runs("beat-1", 100).runs if run.job_name == name]
    return repository.dispatch_run(run.id)


def test_a_tracked_plain_task_costs_a_start_and_a_finish(
    counted: tuple[JobRepository, RoundTrips], tracked_app: Celery
) -> None:
    repository, trips = counted

    @tracked_app.task(name="round_trips.plain")
    def plain(steps: int) -> None:
        for step in range(steps):
            tracking.progress(step + 1, steps)

    runs = {}
    for steps, name in ((0, "warm-up"), (0, "plain"), (1, "one-step"), (0, "failing")):
        run = dispatched_run(repository, name, "round_trips.plain")
        args: list[Any] = [steps] if name != "failing" else ["not a number"]
        headers = {RUN_ID_HEADER: run.id}
        _, by_events, wire = trips.counting(lambda: plain.apply(args, headers=headers))  # noqa: B023
        runs[name] = (repository.lookup_run(run.id), by_events, wire)
    for name, budget in (("plain", START + FINISH), ("one-step", START + PROGRESS + FINISH), ("failing", 2)):
        run, by_events, wire = runs[name]
        assert run.status == ("failed" if name == "failing" else "completed"), run
        assert by_events == budget, (name, by_events)
        assert wire == by_events, (name, wire)
    assert runs["one-step"][0].progress == JobStatus(1, 1)


# -- the one-statement finish keeps the long way's semantics ---------------------------------------------------

T0 = dt.datetime(2026, 6, 1, 8, 0, tzinfo=UTC)


def _job_state(repository: JobRepository, name: str) -> tuple[Any, ...]:
    with repository.engine.begin() as conn:
        row = conn.execute(
            select(job_table.c.next_scheduled_run, job_table.c.failure_count, job_table.c.retry_slot).where(
                job_table.c.name == name
            )
        ).one()
    return tuple(row)


SCENARIOS: dict[str, dict[str, Any]] = {
    "every": {"every": dt.timedelta(minutes=10)},
    "crontab": {"schedule": CrontabSchedule(minute="*/15")},
    "no-cadence": {},
    "max-active-2": {"every": dt.timedelta(minutes=10), "max_active": 2},
    "own-backoff": {"every": HOUR, "retry_backoff": (dt.timedelta(seconds=7), dt.timedelta(minutes=2))},
    "slot-before-backoff": {"every": dt.timedelta(seconds=30)},
}


@pytest.mark.parametrize("finish", ["complete", "complete-in-3-min", "fail", "fail-twice", "pulled-in"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_the_one_statement_finish_matches_the_long_way(
    postgres_database: Database, scenario: str, finish: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Twin jobs, run and finished at the same frozen instants, one through the one-statement finish and one
    the long way (the code that SQLite runs): their runs and jobs end up identical."""
    clock = TestClock(frozen_at=T0)
    repository = postgres_database.migrated_repository(
        clock=clock,
        listen=True,  # wake-ups within 5 s
        run_jobs_interval=dt.timedelta(seconds=5),
        retry_backoff=(dt.timedelta(seconds=20), HOUR),
    )
    long_way: list[int] = []
    one_statement = repository._finish_in_one_statement

    def finish_in_one_statement(run_id: int, *args: Any) -> RunRecord | None:
        if run_id in long_way:
            return None
        result = one_statement(run_id, *args)
        assert result is not None, "the one-statement finish did not apply"
        return result

    monkeypatch.setattr(repository, "_finish_in_one_statement", finish_in_one_statement)
    results = {}
    for twin in ("fast", "slow"):
        clock.freeze(T0)
        name = f"{scenario}-{twin}"
        repository.upsert_job(name, name, first_run_in=dt.timedelta(0), **SCENARIOS[scenario])
        for attempt in range(2 if finish == "fail-twice" else 1):
            clock.freeze(T0 + dt.timedelta(hours=attempt))
            if attempt:
                with repository.engine.begin() as conn:  # due again for the second failure
                    conn.execute(update(job_table).where(job_table.c.name == name).values(next_scheduled_run=T0))
            [run] = [run for run in repository.claim_runs("beat-1", 100).runs if run.job_name == name]
            if twin == "slow":
                long_way.append(run.id)
            repository.start_run(run.id, "worker-1")
            clock.advance(dt.timedelta(minutes=7, seconds=3))  # the run took a while
            if finish == "pulled-in":
                repository.update_job_next_run_in_at_least(name, dt.timedelta(seconds=90))
            if finish.startswith("fail"):
                ended = repository.fail_run(run.id, "boom", progress=JobStatus(1, 3))
            else:
                delay = dt.timedelta(minutes=3) if finish == "complete-in-3-min" else None
                ended = repository.complete_run(run.id, delay, progress=JobStatus(3, 3))
        stored = repository.lookup_run(ended.id)
        assert stored == ended
        results[twin] = (
            {k: v for k, v in vars(ended).items() if k not in ("id", "job_name")},
            _job_state(repository, name),
        )
    assert results["fast"] == results["slow"]


def test_a_cadence_changed_during_the_run_is_used_by_the_finish(postgres_database: Database) -> None:
    clock = TestClock(frozen_at=T0)
    repository = postgres_database.migrated_repository(clock=clock)
    run = add_and_claim(repository, "changing", every=dt.timedelta(minutes=10))
    repository.start_run(run.id, "worker-1")
    repository.upsert_job("changing", "changing", schedule=CrontabSchedule(minute="*/15"))  # a new deployment
    clock.freeze(T0 + dt.timedelta(minutes=1))
    repository.complete_run(run.id)
    assert repository.lookup_job("changing").next_scheduled_run == T0 + dt.timedelta(minutes=15)


def test_a_cadence_changed_while_the_finish_waits_for_the_job_row(postgres_database: Database) -> None:
    """The change commits after the finishing statement read the job, while it waits for the row's lock:
    the statement undoes itself and the finish is done again with the new cadence."""
    clock = TestClock(frozen_at=T0)
    repository = postgres_database.migrated_repository(clock=clock)
    run = add_and_claim(repository, "racing", every=dt.timedelta(minutes=10))
    repository.start_run(run.id, "worker-1")
    clock.freeze(T0 + dt.timedelta(minutes=1))
    other = postgres_database.repository().engine.connect()
    try:
        transaction = other.begin()
        other.execute(
            update(job_table)
            .where(job_table.c.name == "racing")
            .values(schedule=CrontabSchedule(minute="*/15").to_json())
        )
        (backend,) = other.execute(text("SELECT pg_backend_pid()")).one()
        finished: list[RunRecord] = []
        thread = threading.Thread(target=lambda: finished.append(repository.complete_run(run.id)), daemon=True)
        thread.start()
        deadline = time.monotonic() + 15
        while not _waits_on(repository, backend):
            assert time.monotonic() < deadline, "the finish never waited for the job row"
            time.sleep(0.01)
        transaction.commit()
        thread.join(15)
        assert not thread.is_alive()
    finally:
        other.close()
    [done] = finished
    assert done.status == "completed"
    assert repository.lookup_job("racing").next_scheduled_run == T0 + dt.timedelta(minutes=15)


def _waits_on(repository: JobRepository, backend: int) -> bool:
    with repository.engine.begin() as conn:
        return bool(
            conn.execute(
                text(
                    "SELECT count(*) FROM pg_locks l, LATERAL unnest(pg_blocking_pids(l.pid)) b "
                    "WHERE NOT l.granted AND b = :b"
                ),
                {"b": backend},
            ).scalar()
        )


def test_a_finish_far_from_the_expected_time_goes_the_long_way(postgres_database: Database) -> None:
    """The finish's slots are computed around the time the start suggests; a database clock elsewhere (here:
    moved an hour on a test hook the estimate does not know) is detected by the statement, which then
    changes nothing, and the long way is right."""
    repository = postgres_database.migrated_repository()
    run = add_and_claim(repository, "far", every=dt.timedelta(minutes=10))
    started = repository.start_run(run.id, "worker-1")
    repository._started[run.id] = dataclasses_replace(repository._started[run.id], monotonic=time.monotonic() + 3600)
    done = repository.complete_run(run.id)
    assert done.status == "completed"
    assert started.scheduled_for is not None and done.end_time is not None
    expected = started.scheduled_for + dt.timedelta(minutes=10)
    while expected <= done.end_time:
        expected += dt.timedelta(minutes=10)
    assert repository.lookup_job("far").next_scheduled_run == expected


def test_a_kept_connection_the_database_dropped_is_replaced_at_once(postgres_database: Database) -> None:
    repository = postgres_database.migrated_repository()
    run = add_and_claim(repository, "dropped", every=HOUR)
    repository.start_run(run.id, "worker-1")
    [(backend,)] = [tuple(row) for row in repository._one(select(text("pg_backend_pid()")))]
    with postgres_database.repository().engine.begin() as conn:
        conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": backend})
    done = repository.complete_run(run.id)  # on a fresh connection, without an error
    assert done.status == "completed"
    with repository.engine.begin() as conn:
        assert conn.execute(select(run_table.c.status).where(run_table.c.id == run.id)).scalar() == "completed"


def dataclasses_replace(obj: Any, **changes: Any) -> Any:
    import dataclasses

    return dataclasses.replace(obj, **changes)
