"""Fault suite, issue 15 item 2: failover to a streaming standby.

A primary and a hot standby of its own (`pg_createcluster`, `pg_basebackup -R`: tests/helpers/postgres.py), on
free ports, created and dropped by the fixture. The scheduler's URL names both hosts with
`target_session_attrs=read-write`, so that libpq keeps the one that accepts writes. The primary is stopped
(`pg_ctlcluster stop -m immediate`: a crash, what it had not streamed yet is lost) while beats claim and a
worker runs, and the standby is promoted (`pg_ctlcluster promote`).

- Asynchronous replication: what the primary committed but had not streamed is lost. A claim lost so makes its
  slot run again; a lost start or finish leaves a run that a monitor interrupts. Counted and reported
  (`slots_doubled`, `starts_lost`, `finishes_lost`), not asserted: they are the documented cost.
- Synchronous replication (`synchronous_commit = on`, the standby in `synchronous_standby_names`): no slot is
  lost or doubled, asserted.

Both: claiming resumes on the new primary within FAILOVER_RESUME_BOUND of the promotion, a job never has two
active runs (sampled), every process keeps running, and the beats listen for wake-ups on the new primary.
Each test prints one line `FAULTS <name>: key=value ...` (and appends it to DBSCHED_FAULT_REPORT when set).
"""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers.cluster import Cluster, quick, seconds_between
from helpers.polling import wait_for
from helpers.postgres import FAST_SETTINGS, PrivatePostgres, multi_host_url, private_cluster, standby_of
from helpers.processes import Processes
from helpers.services import RABBITMQ_URL, Broker, Database, cleanup_queue, require_service
from sqlalchemy import text
from test_faults_outages import (
    describe,
    error_lines,
    first_claims_after,
    listening_beats,
    log_size,
    lost_runs,
    rabbitmq_broker,  # noqa: F401 (a fixture)
    report,
)

from celery_dbsched import DatabaseUnavailable
from celery_dbsched.migrate import migrate
from celery_dbsched.repository import JobRepository
from celery_dbsched.settings import Settings

pytestmark = [pytest.mark.faults]

PREFIX = "dbschedfailover"
# Claims resume on the promoted standby within this many seconds of its promotion: a beat's failed claim backs
# off 0.5 s, then 1, 2, 4 s (dbsched_retry_backoff [0.5, 30] here) while the primary is gone and the standby
# still in recovery (target_session_attrs=read-write refuses it); slack for 2 shared cores.
FAILOVER_RESUME_BOUND = 10.0
# Jobs claimed (4 a second each) and run while the primary dies. A run whose start or finish the failover lost
# stays active on the new primary until a beat's monitor interrupts it after this threshold.
JOBS = [f"e2e.f{n}" for n in range(6)]
EVERY = 0.25
THRESHOLD = 5.0


@dataclass
class Pair:
    primary: PrivatePostgres
    standby: PrivatePostgres
    synchronous: bool

    def url(self, database: str) -> str:
        return multi_host_url(database, self.primary, self.standby)


@contextmanager
def standby_pair(*, synchronous: bool, local_commit: str = "on") -> Iterator[Pair]:
    """A primary and a hot standby streaming from it: asynchronously, or synchronously (the primary commits
    once the standby has flushed the commit: synchronous_commit = on, the standby in synchronous_standby_names)."""
    # synchronous_commit = `local_commit`, on by default (as PostgreSQL's): a commit is flushed on the primary
    # before it is acknowledged, and with a synchronous standby on the standby too. Off, the primary acknowledges
    # before its own flush, and a crash loses up to 3 x wal_writer_delay of commits: more doubled slots.
    settings = [s for s in FAST_SETTINGS if not s.startswith("synchronous_commit")]
    settings.append(f"synchronous_commit={local_commit}")
    with private_cluster(PREFIX, settings) as primary, standby_of(primary, PREFIX) as standby:
        if synchronous:
            primary.admin(f"ALTER SYSTEM SET synchronous_standby_names = '\"{standby.name}\"'")
            primary.admin("SELECT pg_reload_conf()")
            sql = f"SELECT sync_state FROM pg_stat_replication WHERE application_name = '{standby.name}'"
            wait_for(lambda: primary.scalar(sql) == "sync", 30, 0.2, "the standby to be synchronous")
        yield Pair(primary, standby, synchronous)


def new_database(pair: Pair) -> str:
    """An empty database on the primary, once the standby has it too."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    pair.primary.admin(f'CREATE DATABASE "{name}"')
    exists = f"SELECT count(*) FROM pg_database WHERE datname = '{name}'"
    wait_for(lambda: pair.standby.scalar(exists) == 1, 30, 0.1, f"the standby to have the database {name}")
    return name


def server_port(repository: JobRepository) -> int:
    with repository.engine.connect() as conn:
        port: int = conn.execute(text("SELECT inet_server_port()")).scalar_one()
        return port


def _repository(url: str) -> JobRepository:
    return JobRepository.from_settings(Settings(database_url=url, listen=False))


# -- a connection to a server that is, or becomes, read-only ---------------------------------------------------


@pytest.mark.postgres
def test_a_read_only_server_is_an_outage_and_the_pool_moves_to_the_writable_host() -> None:
    """A write on a hot standby is an outage with a message that says what to do, not a refused statement.
    And a pooled connection to a server that turns read-only under it (the pool's pre-ping, a SELECT, still
    passes there) is discarded on the first refused write, so that the next connection goes through the
    URL's hosts again and target_session_attrs=read-write finds the writable one: no process wedges."""
    with standby_pair(synchronous=False) as pair:
        name = new_database(pair)
        on_primary = _repository(pair.url(name))
        migrate(on_primary.engine)
        on_primary.upsert_job("j.before", "registered on the primary", every=dt.timedelta(hours=1))
        assert server_port(on_primary) == pair.primary.port
        replayed = "SELECT count(*) FROM dbsched_job WHERE name = 'j.before'"
        wait_for(lambda: pair.standby.scalar(replayed, name) == 1, 30, 0.1, "the standby to replay the job")

        on_standby = _repository(pair.standby.url(name))
        assert [job.name for job in on_standby.list_jobs()] == ["j.before"]  # reads work on a standby
        with pytest.raises(DatabaseUnavailable) as refused:
            on_standby.upsert_job("j.refused", "a write on a standby", every=dt.timedelta(hours=1))
        message = str(refused.value)
        assert "read-only transaction" in message and "target_session_attrs=read-write" in message, message

        # Two writable servers now (the standby promoted), and the first one of the URL turned read-only
        # under the pooled connection.
        pair.standby.ctl("promote")
        wait_for(lambda: not pair.standby.in_recovery(), 30, 0.1, "the standby to be promoted")
        pair.primary.admin("ALTER SYSTEM SET default_transaction_read_only = on")
        pair.primary.admin("SELECT pg_reload_conf()")
        wait_for(lambda: pair.primary.scalar("SHOW transaction_read_only") == "on", 10, 0.1, "read-only")
        with pytest.raises(DatabaseUnavailable, match="read-only transaction"):
            on_primary.upsert_job("j.during", "a write on the server turned read-only", every=dt.timedelta(hours=1))
        # The next write gets a new connection: the first host refuses it (read-only), the second takes it.
        on_primary.upsert_job("j.after", "a write after the failover", every=dt.timedelta(hours=1))
        assert server_port(on_primary) == pair.standby.port
        assert {job.name for job in on_primary.list_jobs()} == {"j.before", "j.after"}
        on_primary.close()
        on_standby.close()


# -- the primary dies under load, the standby is promoted -----------------------------------------------------


@pytest.fixture(params=[pytest.param(False, id="async"), pytest.param(True, id="sync")])
def pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    with standby_pair(synchronous=request.param) as made:
        yield made


@pytest.fixture
def failover_cluster(
    pair: Pair,
    rabbitmq_broker: Broker,  # noqa: F811 (the fixture imported above)
    processes: Processes,
    tmp_path: Path,
) -> Iterator[Cluster]:
    database = Database("postgres", pair.url(new_database(pair)))
    cluster = Cluster(database, rabbitmq_broker, processes, tmp_path)
    try:
        yield cluster
    finally:
        cluster.close()
        for repository in database.repositories:
            repository.close()


def _events(cluster: Cluster) -> list[dict[str, Any]]:
    """Every `start` and `end` event the jobs wrote (one file per run id)."""
    events = []
    for path in sorted(cluster.events_dir.glob("*.jsonl")):
        events += [json.loads(line) for line in path.read_text().splitlines()]
    return events


@pytest.mark.e2e
@pytest.mark.rabbitmq
def test_failover_to_a_standby_while_beats_and_a_worker_run(pair: Pair, failover_cluster: Cluster) -> None:
    _failover(pair, failover_cluster, f"pg-failover-{'sync' if pair.synchronous else 'async'}")


# How often asynchronous replication loses what a failover needs: behind `soak` (a pair and a failover take
# ~20 s each), with the primary's local commits flushed (synchronous_commit = on, the default) or not (off).
SOAK_FAILOVERS = 10


@pytest.mark.soak
@pytest.mark.e2e
@pytest.mark.rabbitmq
@pytest.mark.parametrize("local_commit", ["on", "off"])
def test_failover_soak_counts_what_asynchronous_replication_loses(
    local_commit: str, processes: Processes, tmp_path: Path
) -> None:
    require_service("rabbitmq")
    totals: Counter[str] = Counter()
    worst: Counter[str] = Counter()
    for n in range(SOAK_FAILOVERS):
        broker = Broker("rabbitmq", {"broker_url": RABBITMQ_URL}, f"dbsched-faults-{uuid.uuid4().hex[:12]}")
        with standby_pair(synchronous=False, local_commit=local_commit) as pair:
            database = Database("postgres", pair.url(new_database(pair)))
            cluster = Cluster(database, broker, processes, tmp_path / f"failover{n}")
            try:
                figures = _failover(pair, cluster, f"pg-failover-async-commit-{local_commit}-{n}")
            finally:
                cluster.close()
                for repository in database.repositories:
                    repository.close()
                cleanup_queue(broker)
        for key in ("slots_doubled", "started_twice", "starts_lost", "finishes_lost"):
            totals[key] += figures[key]
            worst[key] = max(worst[key], figures[key])
    report(
        f"pg-failover-async-soak-commit-{local_commit}",
        failovers=SOAK_FAILOVERS,
        **{f"{key}_total": value for key, value in totals.items()},
        **{f"{key}_worst": value for key, value in worst.items()},
    )


def _failover(pair: Pair, cluster: Cluster, name: str) -> dict[str, Any]:
    """Beats and a worker run, the primary dies, the standby is promoted: the figures (reported as `name`)."""
    mode = "sync" if pair.synchronous else "async"
    settings = {"dbsched_retry_backoff": [0.5, 30]}
    jobs = [quick(job, EVERY, interrupt_threshold=THRESHOLD, steps=2, step=0.05) for job in JOBS]
    worker = cluster.worker(jobs, concurrency=8, settings=settings)
    beats = [cluster.beat(name=f"beat{n}", settings=settings) for n in (1, 2)]
    worker.wait_ready()
    sampler = cluster.sampler()
    for job in JOBS:
        cluster.wait_runs(job, 3, lambda run: run.status == "completed", timeout=90)
    database = cluster.database.url.split("/")[-1].split("?")[0]
    wait_for(lambda: listening_beats(pair.primary, database) == 2, 30, 0.2, "both beats to listen on the primary")
    offsets = {process.name: log_size(process) for process in cluster.live}

    pair.primary.ctl("stop", "-m", "immediate")
    pair.standby.ctl("promote")
    wait_for(lambda: not pair.standby.in_recovery(), 30, 0.05, "the standby to be promoted")
    promoted_at = time.monotonic()
    promoted = pair.standby.scalar("SELECT now()")  # the server's clock, as the runs' times
    assert isinstance(promoted, dt.datetime)

    resumed = first_claims_after(cluster, JOBS, promoted, timeout=FAILOVER_RESUME_BOUND + 30)
    resume_first = min(seconds_between(promoted, run.create_time) for run in resumed)
    resume_all = max(seconds_between(promoted, run.create_time) for run in resumed)
    for job in JOBS:
        cluster.wait_runs(job, 3, lambda run: run.status == "completed" and run.create_time > promoted, timeout=60)
    # Runs claimed before the promotion end: completed, or (their start or finish lost) interrupted.
    cluster.wait(
        lambda: all(run.end_time is not None for run in cluster.runs() if run.create_time < promoted),
        THRESHOLD + 30,
        "every run claimed before the promotion to end",
    )
    wait_for(lambda: listening_beats(pair.standby, database) == 2, 30, 0.2, "both beats to listen on the new primary")
    relisten = time.monotonic() - promoted_at
    sampler.stop()
    sampler.check()  # never two active runs of a job, before, during or after the failover

    # The events first, then the runs: a job writes its start event after its run's start is committed, so
    # every start read here is in the snapshot (its end event comes before the finish: only runs claimed
    # before the promotion, all ended by now, are checked for a lost finish).
    events = _events(cluster)
    runs = {run.id: run for run in cluster.runs()}
    starts = [e for e in events if e["event"] == "start"]
    ends = [e for e in events if e["event"] == "end"]
    # The job ran, but the new primary does not know its run (or knows another job's run by that id: the
    # sequence's advance was lost too): the claim was lost, the slot was claimed and run again.
    slots_doubled = [e for e in starts if e["run_id"] not in runs or runs[e["run_id"]].job_name != e["job"]]
    known = [e for e in starts if e not in slots_doubled]
    started_twice = len(known) - len({e["run_id"] for e in known})
    starts_lost = [e for e in known if runs[e["run_id"]].start_time is None]
    finishes_lost = [
        e
        for e in ends
        if (run := runs.get(e["run_id"])) is not None
        and run.job_name == e["job"]
        and run.create_time < promoted
        and run.status != "completed"
    ]
    window = [run for run in runs.values() if 0 <= seconds_between(run.create_time, promoted) <= 2]  # all ended
    errors = {process.name: error_lines(process, offsets[process.name]) for process in cluster.live}
    cluster.processes.check_alive(worker, *beats)
    figures: dict[str, Any] = dict(
        replication=mode,
        claims_resumed_after=round(resume_first, 2),
        all_jobs_resumed_after=round(resume_all, 2),
        runs=len(runs),
        slots_doubled=len(slots_doubled),
        started_twice=started_twice,
        starts_lost=len(starts_lost),
        finishes_lost=len(finishes_lost),
        claimed_in_last_2s=len(window),
        not_completed_of_those=sum(run.status != "completed" for run in window),
        doubled_active=len(sampler.double_active),
        beats_listening_again_after=round(relisten, 1),
        error_lines_by_process={process: len(lines) for process, lines in errors.items()},
    )
    report(name, **figures)
    assert resume_all <= FAILOVER_RESUME_BOUND, f"claiming resumed {resume_all:.1f}s after the promotion"
    for process_name, lines in errors.items():
        assert not [line for line in lines if line.startswith("Traceback")], f"{process_name}: {lines[:10]}"
    if pair.synchronous:
        assert not slots_doubled and not started_twice, f"slots run again: {slots_doubled}"
        assert not starts_lost and not finishes_lost, f"lost: {starts_lost} {finishes_lost}"
        bad = lost_runs(list(runs.values()), cluster.repo.database_now(), lambda run: False)
        assert not bad, f"runs lost or falsely ended with synchronous replication: {describe(bad)}"
        cluster.assert_started_once(list(runs.values()))
    return figures
