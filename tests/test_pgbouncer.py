"""PostgreSQL through PgBouncer in transaction pooling mode (issue 15 item 3): with `dbsched_pooler` the
repository, migrations and beats work through it; without it, what cannot work through it fails with one clear
error instead of a hang (LISTEN) or an obscure one (server-side prepared statements). The setting's
validation is in test_settings.py.

A private PgBouncer per module (tests/conftest.py `pgbouncer`, helpers/pgbouncer.py) shares 5 server
connections between all its clients, so consecutive transactions of one client run on different ones. The
scenarios with real beat and worker processes are in test_e2e.py and test_faults_beats.py (`PGBOUNCER_RABBITMQ`).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers.apps import memory_app
from helpers.pgbouncer import PgBouncer, make_pgbouncer_database
from helpers.polling import wait_for
from helpers.repository import claim
from helpers.services import POSTGRES_URL, Database, drop_database
from sqlalchemy import Engine, create_engine, select, text
from sqlalchemy.exc import DBAPIError

from celery_dbsched.binding import forget_repository
from celery_dbsched.engine import make_engine
from celery_dbsched.errors import DatabaseError, classify
from celery_dbsched.migrate import current_revision, head_revision, migrate
from celery_dbsched.records import RunRecord
from celery_dbsched.scheduler import Scheduler
from celery_dbsched.wakeup import PING_TIMEOUT, Wakeup

pytestmark = [pytest.mark.postgres, pytest.mark.processes]  # a pgbouncer of its own

HOUR = dt.timedelta(hours=1)


@pytest.fixture
def bare_database(pgbouncer: PgBouncer) -> Iterator[Database]:
    """A database through `pgbouncer` whose repositories do NOT say so (no `dbsched_pooler`)."""
    db = make_pgbouncer_database(pgbouncer)
    db.settings.clear()
    try:
        yield db
    finally:
        drop_database(db)


# -- with the setting: everything through the pooler -------------------------------------------------------------


def test_claim_start_finish_from_many_threads_through_pgbouncer(pgbouncer_database: Database) -> None:
    """20 rounds: a beat's repository claims 8 due jobs, 8 workers' repositories (threads, more clients than
    the pool's 5 server connections) start, report and complete one run each. Every statement runs, prepared on
    no server connection, and no session setting is made."""
    beat = pgbouncer_database.migrated_repository()
    names = [f"job-{n}" for n in range(8)]
    for name in names:
        beat.upsert_job(name, "through the pooler", first_run_in=dt.timedelta(0))
    workers = {name: pgbouncer_database.repository() for name in names}

    def work(run: RunRecord) -> None:
        repository = workers[run.job_name]
        repository.start_run(run.id, f"worker-{run.job_name}")
        repository.update_progress(run.id, 1, 2)
        repository.complete_run(run.id, next_run_in=dt.timedelta(0))

    with ThreadPoolExecutor(len(names)) as pool:
        for _ in range(20):
            runs = claim(beat)
            assert sorted(run.job_name for run in runs) == names
            list(pool.map(work, runs))
    for name in names:
        runs = beat.list_runs(job_name=name, limit=100)
        assert len(runs) == 20 and all(run.status == "completed" for run in runs)
    # No prepared statement on the server connections, no session SET of ours on them.
    with beat.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM pg_prepared_statements")).scalar_one() == 0
        assert conn.execute(text("SHOW idle_in_transaction_session_timeout")).scalar_one() in ("0", "0s")


def test_migrations_through_pgbouncer_run_in_one_transaction_and_leave_no_lock(pgbouncer_database: Database) -> None:
    """Three processes' worth of migrations at once through the pooler: the lock is transaction-scoped
    (`pg_advisory_xact_lock`) and the whole upgrade one transaction (PostgreSQL's DDL is transactional), so a
    pooled server connection keeps no lock after it; the schema is migrated exactly once."""
    engines = [make_engine(pgbouncer_database.url, pooler="transaction") for _ in range(3)]
    found: list[str | None] = []
    errors: list[BaseException] = []

    def run(engine: Engine) -> None:
        try:
            found.append(migrate(engine))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(engine,)) for engine in engines]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    try:
        assert not errors, errors
        # One migrated the fresh database, the two others then found it current.
        assert found.count(None) == 1 and found.count(head_revision()) == 2, found
        assert current_revision(engines[0]) == head_revision()
    finally:
        for engine in engines:
            engine.dispose()
    direct = create_engine(POSTGRES_URL)
    try:
        with direct.connect() as conn:
            locks = conn.execute(
                text(
                    "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
                    "WHERE l.locktype = 'advisory' AND d.datname = :name"
                ),
                {"name": pgbouncer_database.own_database},
            ).scalar_one()
    finally:
        direct.dispose()
    assert locks == 0


def test_a_beat_through_pgbouncer_polls_and_honours_run_now_within_its_interval(
    pgbouncer_database: Database,
) -> None:
    """No LISTEN through the pooler: the beat sleeps its run-jobs interval (as on MariaDB) and a run_now made
    meanwhile is claimed at its next tick, within that interval."""
    repository = pgbouncer_database.migrated_repository()
    repository.upsert_job("later", "due in an hour", first_run_in=HOUR)
    app = memory_app(pgbouncer_database.url, main="pgb", dbsched_run_jobs_interval=1, **pgbouncer_database.extra_conf())
    scheduler = Scheduler(app=app, lazy=False)
    try:
        scheduler.tick()
        assert scheduler._wakeup is None  # never listens
        requested = time.monotonic()
        repository.update_job_next_run_in_at_least("later", dt.timedelta(0), run_now=True)

        def claimed() -> bool:
            scheduler.tick()
            return any(run.job_name == "later" for run in repository.list_runs(limit=10))

        wait_for(claimed, 10, 0.1, "the run_now to be claimed")
        assert time.monotonic() - requested < 1.0 + 1.0  # its interval, and a tick's own time
    finally:
        scheduler.close()
        forget_repository(app)


# -- without the setting: clear errors, not hangs ------------------------------------------------------------------


def test_without_the_setting_a_lost_prepared_statement_names_the_pooler_and_the_fix(bare_database: Database) -> None:
    """psycopg prepares a statement on the server after a few runs on one connection; through the pooler the next
    transaction runs on another server connection (here: two clients interleaved), where it is missing or one of
    the same name exists. The error says what it means and what to set."""
    engine = make_engine(bare_database.url)
    message = None
    try:
        with engine.connect() as a, engine.connect() as b:
            for n in range(20):
                try:
                    a.execute(select(text(":n")), {"n": n}).all()
                    a.commit()
                    b.execute(select(text(":n + 1")), {"n": n}).all()
                    b.commit()
                except DBAPIError as exc:
                    message = str(classify(exc))
                    assert isinstance(classify(exc), DatabaseError)
                    break
    finally:
        engine.dispose()
    assert message is not None, "20 interleaved statements through PgBouncer ran without the setting"
    assert "transaction-mode pooler such as PgBouncer" in message and 'dbsched_pooler = "pgbouncer"' in message

    # With the setting, the same statements run.
    engine = make_engine(bare_database.url, pooler="transaction")
    try:
        with engine.connect() as a, engine.connect() as b:
            for n in range(20):
                assert a.execute(select(text(":n")), {"n": n}).scalar_one() == n
                a.commit()
                assert b.execute(select(text(":n + 1")), {"n": n}).scalar_one() == n + 1
                b.commit()
    finally:
        engine.dispose()


def test_without_the_setting_listen_logs_one_error_and_the_beat_polls(
    bare_database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """LISTEN through the pooler is accepted and then hears nothing: the probe NOTIFY after it does not come
    back within PING_TIMEOUT while the connection still answers, so the beat logs one error naming the cause and
    the fix and sleeps its interval from then on (it does not reconnect and listen again)."""
    repository = bare_database.migrated_repository()
    engine = make_engine(bare_database.url, {"connect_args": {"prepare_threshold": None}})
    wakeup = Wakeup(engine)
    try:
        with caplog.at_level(logging.WARNING, logger="celery_dbsched.wakeup"):
            began = time.monotonic()
            assert wakeup.wait(30) is None  # not listening: the caller sleeps
            decided = time.monotonic() - began
            assert wakeup.wait(30) is None and wakeup.wait(30) is None
        errors = [record for record in caplog.records if record.levelno >= logging.WARNING]
        assert len(errors) == 1, [record.getMessage() for record in errors]
        text_ = errors[0].getMessage()
        assert errors[0].levelno == logging.ERROR
        assert "transaction-mode pooler such as PgBouncer" in text_ and 'dbsched_pooler = "pgbouncer"' in text_
        assert decided < PING_TIMEOUT + 3
        assert wakeup.enabled is False
    finally:
        wakeup.close()
        engine.dispose()
    repository.ping()  # the database itself is fine

    # Directly, the same probe comes back at once and the beat listens.
    direct = make_engine(POSTGRES_URL)
    wakeup = Wakeup(direct)
    try:
        began = time.monotonic()
        assert wakeup.wait(0.2) is False
        assert wakeup.enabled and time.monotonic() - began < PING_TIMEOUT
    finally:
        wakeup.close()
        direct.dispose()
