"""Fault suite, beats (issue 4, scenarios 1 and 2): several beats on one database and one broker, under load
and while one of them is SIGKILLed again and again in the middle of a claim batch.

Real `celery beat` and `celery worker` processes (tests/cluster.py) run tests/e2e_app.py's `instant` jobs:
each records its start and end in `<tmp>/events/<run id>.jsonl` and completes at once, so the workers' cost is
the wrapper's own. Every test prints one line `FAULTS <name>: key=value ...` with what it counted, and appends
the same figures as a JSON line to the file named by DBSCHED_FAULT_REPORT when it is set.

What a beat leaves behind when it dies (celery_dbsched/scheduler.py, repository.py): a claim is one
transaction (`claim_runs`: a `queued` run per due job), then the beat publishes one message per run. Runs it
claimed but had not published when killed stay `queued`, blocking their job (one active run per job), until

- any beat's monitor (every monitor interval) ends them `interrupted` ("stalled: no worker started it within
  the interrupt threshold") once their `update_time` (the claim) is older than the interrupt threshold; the
  job is retried after the backoff, which never goes past the job's next slot; or
- a beat restarting with the same server id (`dbsched_server_id`) ends them at its start ("restart: left
  behind by ..."), and the job is due again at once.

So a claimed, unpublished run is brought back at worst interrupt threshold + one monitor interval after its
claim (design §4), plus the retry delay (at most the job's period) and one claim; the tests assert that bound.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import socket
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from helpers.cluster import (
    LATENESS,
    MARIADB_RABBITMQ,
    PG_RABBITMQ,
    PG_REDIS,
    PGBOUNCER_RABBITMQ,
    SQLITE_FS,
    Cluster,
    RunSampler,
    on,
    seconds_between,
)
from helpers.pgbouncer import DEFAULT_POOL_SIZE, PoolSampler
from helpers.processes import CeleryProcess
from sqlalchemy import bindparam, select, update

from celery_dbsched import RunRecord
from celery_dbsched.repository import JobRepository
from celery_dbsched.schema import job_table, run_table
from celery_dbsched.states import ACTIVE

pytestmark = [pytest.mark.faults, pytest.mark.e2e]


HOST = socket.gethostname()
# Slack on a shared 2-core machine, on top of every documented bound.
SLACK = 8.0


# -- reporting -----------------------------------------------------------------------------------------------


def report(name: str, **figures: Any) -> None:
    """One line on stdout and, with DBSCHED_FAULT_REPORT set, one JSON line in that file (for the closing note)."""
    print(f"\nFAULTS {name}: " + " ".join(f"{key}={value}" for key, value in figures.items()))
    path = os.environ.get("DBSCHED_FAULT_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"test": name, **figures}, default=str) + "\n")


# -- observations --------------------------------------------------------------------------------------------


class ActiveRunSampler(RunSampler):
    """Samples only the active runs, all of them, in one statement (a consistent snapshot however long the
    history grows): a job with two `queued`/`running` runs in one snapshot is what the database must forbid."""

    def __init__(self, repository: JobRepository, interval: float = 0.1) -> None:
        super().__init__(repository, interval)
        self.max_active = 0

    def sample(self) -> None:
        r = run_table
        with self.repository.engine.connect() as conn:
            rows = conn.execute(select(r.c.job_name, r.c.id).where(r.c.status.in_(ACTIVE))).all()
        active: dict[str, list[int]] = defaultdict(list)
        for job_name, run_id in rows:
            active[job_name].append(run_id)
        self.double_active += [(job, ids) for job, ids in active.items() if len(ids) > 1]
        self.max_active = max(self.max_active, len(rows))
        self.samples += 1


def all_runs(repository: JobRepository) -> list[RunRecord]:
    with repository.engine.connect() as conn:
        rows = conn.execute(select(run_table).order_by(run_table.c.id)).all()
    return [RunRecord.from_row(row) for row in rows]


def start_events(events_dir: Path) -> Counter[int]:
    """How many times each run's job began (its `start` events), from every event file at once."""
    starts: Counter[int] = Counter()
    if not events_dir.exists():
        return starts
    for path in events_dir.glob("*.jsonl"):
        for line in path.read_text().splitlines():
            event = json.loads(line)
            if event["event"] == "start":
                starts[int(event["run_id"])] += 1
    return starts


def doubles(runs: Sequence[RunRecord], starts: Counter[int]) -> list[str]:
    """Everything that would be a run done twice: a run whose job began more than once, a run the database
    never started whose job began anyway, and two runs of one job for the same slot that both started."""
    found = [f"run {run_id} started {n} times" for run_id, n in starts.items() if n > 1]
    by_id = {run.id: run for run in runs}
    found += [
        f"run {run_id} began without being started ({by_id[run_id].status})"
        for run_id in starts
        if run_id in by_id and by_id[run_id].start_time is None
    ]
    per_slot = Counter((run.job_name, run.scheduled_for) for run in runs if run.start_time is not None)
    found += [f"{job} ran twice for slot {slot}" for (job, slot), n in per_slot.items() if n > 1]
    return found


def instant_jobs(prefix: str, count: int, every: float) -> list[dict[str, Any]]:
    return [{"kind": "instant", "name": f"{prefix}.{n:04d}", "every": every} for n in range(count)]


def spread_due_times(repository: JobRepository, names: Sequence[str], every: float, lead: float) -> dt.datetime:
    """Make the jobs due at evenly spread times over one period starting `lead` s from now (their fixed
    cadence keeps that phase), so the load is a steady len(names)/every runs per second, not a burst."""
    now = repository.database_now()
    start = now + dt.timedelta(seconds=lead)
    values = [{"n": name, "t": start + dt.timedelta(seconds=every * i / len(names))} for i, name in enumerate(names)]
    j = job_table
    with repository.engine.begin() as conn:
        conn.execute(update(j).where(j.c.name == bindparam("n")).values(next_scheduled_run=bindparam("t")), values)
    return start


def wait_jobs_registered(cluster: Cluster, count: int, timeout: float = 180.0) -> None:
    cluster.wait(
        lambda: len(cluster.repo.list_jobs()) >= count,
        timeout,
        f"the workers to register {count} jobs",
    )


def beat_id(process: CeleryProcess) -> str:
    return f"{HOST}:{process.pid}"


# -- scenario 1: three beats under load ----------------------------------------------------------------------


def run_load(cluster: Cluster, *, name: str, jobs: int, every: float, duration: float, workers: int) -> None:
    """`jobs` instant jobs every `every` s, three beats, `workers` worker processes; count the slots of a
    `duration` s window."""
    specs = instant_jobs("load", jobs, every)
    names = [spec["name"] for spec in specs]
    worker_settings = {"dbsched_monitor_interval": 1.0}
    started = [
        cluster.worker(specs, name=f"worker-{n}", pool="threads", concurrency=8, settings=worker_settings)
        for n in range(workers)
    ]
    for worker in started:
        worker.wait_ready(timeout=180)
    wait_jobs_registered(cluster, jobs)
    first_due = spread_due_times(cluster.repo, names, every, lead=4.0)
    beats = [cluster.beat(name=f"beat-{n}") for n in range(3)]
    sampler = ActiveRunSampler(cluster.repo, interval=0.1)
    cluster.samplers.append(sampler)
    sampler.start()

    # The window: whole periods after the beats had time to start (their start is not the subject).
    window_start = first_due + dt.timedelta(seconds=every * max(1, round(6.0 / every)))
    window_end = window_start + dt.timedelta(seconds=duration)
    began = time.monotonic()
    cluster.wait(
        lambda: cluster.repo.database_now() >= window_end,
        duration + 120,
        "the end of the load window",
    )

    def drained() -> bool:
        """Every slot of the window claimed (each job is due after it: a claim that lags, as on MariaDB under
        load, is not read as a lost slot) and every run of the window ended."""
        r, j = run_table, job_table
        with cluster.repo.engine.connect() as conn:
            unclaimed = conn.execute(select(j.c.name).where(j.c.next_scheduled_run < window_end).limit(1)).first()
            left = conn.execute(
                select(r.c.id).where(r.c.status.in_(ACTIVE), r.c.scheduled_for < window_end).limit(1)
            ).first()
        return unclaimed is None and left is None

    cluster.wait(drained, 120, "the window's runs to finish")
    sampler.stop()
    elapsed = time.monotonic() - began

    starts = start_events(cluster.events_dir)  # first: a run the snapshot below shows unstarted has not begun
    runs = all_runs(cluster.repo)
    counts = count_slots(cluster.repo, runs, names, every, window_start, window_end)
    in_window = counts.runs
    completed = [run for run in in_window if run.status == "completed"]
    not_completed = [run for run in in_window if run.status != "completed"]
    doubled = doubles(runs, starts)
    not_begun_once = [run.id for run in completed if starts[run.id] != 1]
    claimers = Counter(run.claimed_by for run in in_window)
    waits = sorted(seconds_between(run.create_time, run.start_time) for run in completed if run.start_time)
    report(
        name,
        jobs=jobs,
        every=every,
        window_s=duration,
        beats=3,
        workers=f"{workers}x threads-8",
        slots=counts.slots,
        overrun=len(counts.overrun),
        slots_due=counts.due,
        dispatched=len(in_window),
        completed=len(completed),
        lost=len(counts.lost),
        doubled=len(doubled),
        double_active=len(sampler.double_active),
        samples=sampler.samples,
        max_active=sampler.max_active,
        rate_per_s=round(len(completed) / duration, 1),
        claim_late_p99_s=percentile(counts.lateness, 0.99),
        claim_late_max_s=percentile(counts.lateness, 1.0),
        queue_wait_p99_s=percentile(waits, 0.99),
        claims_per_beat="/".join(str(n) for _, n in sorted(claimers.items())),
        # Deadlocks the beats and workers logged (MariaDB; each was retried): they must cost no slot (above).
        deadlocks=sum(process.log().count("Deadlock found") for process in cluster.processes.started),
        elapsed_s=round(elapsed, 1),
    )

    sampler.check()
    assert not doubled, doubled[:10]
    assert not counts.lost, f"{len(counts.lost)} of {counts.due} due slots not dispatched: {counts.lost_detail[:10]}"
    assert len(in_window) == counts.due, "more runs than due slots"
    assert not not_completed, [f"{r.id} {r.job_name} {r.status} {r.error}" for r in not_completed[:10]]
    assert not not_begun_once, f"completed runs whose job did not begin exactly once: {not_begun_once[:10]}"
    assert max(counts.lateness, default=0.0) <= LATENESS, "a due slot was claimed late"
    assert set(claimers) == {beat_id(beat) for beat in beats}, f"not every beat claimed: {claimers}"
    # Worker capacity, not correctness: slots passed over because the previous run was still active (one
    # active run per job; README: the next slot after now when slots were missed). Most must be run.
    assert len(counts.overrun) <= counts.slots // 2, f"the workers fell far behind: {len(counts.overrun)} slots overrun"


class SlotCounts:
    def __init__(self) -> None:
        self.slots = 0  # every slot of the window on each job's cadence
        self.overrun: list[tuple[str, dt.datetime]] = []  # passed over: the previous run was still active
        self.lost: list[tuple[str, dt.datetime]] = []  # due (the job free) and never claimed
        self.lost_detail: list[str] = []
        self.runs: list[RunRecord] = []  # the runs for slots of the window
        self.lateness: list[float] = []  # claim time - when the slot became claimable, per run

    @property
    def due(self) -> int:
        return self.slots - len(self.overrun)


def count_slots(
    repository: JobRepository,
    runs: Sequence[RunRecord],
    names: Sequence[str],
    every: float,
    window_start: dt.datetime,
    window_end: dt.datetime,
) -> SlotCounts:
    """Each job's slots in [window_start, window_end) on its fixed cadence, against its runs. A slot without
    a run is `overrun` when the job's previous run was still active at that slot (the job was not due: one
    active run per job), else `lost`."""
    counts = SlotCounts()
    period = dt.timedelta(seconds=every)
    by_job: dict[str, list[RunRecord]] = defaultdict(list)
    for run in runs:
        by_job[run.job_name].append(run)
    for job_name in names:
        job_runs = sorted((run for run in by_job[job_name] if run.scheduled_for), key=lambda run: run.id)
        anchor = repository.lookup_job(job_name).next_scheduled_run
        slot = anchor + ((window_start - anchor) // period) * period  # exact: whole microseconds
        if slot < window_start:
            slot += period
        for_slot = {run.scheduled_for: run for run in job_runs}
        while slot < window_end:
            counts.slots += 1
            run = for_slot.get(slot)
            previous = [r for r in job_runs if r.scheduled_for is not None and r.scheduled_for < slot]
            before = previous[-1] if previous else None
            if run is not None:
                counts.runs.append(run)
                free = slot if before is None or before.end_time is None else max(slot, before.end_time)
                counts.lateness.append(seconds_between(free, run.create_time))
            elif before is not None and (before.end_time is None or before.end_time >= slot):
                counts.overrun.append((job_name, slot))
            else:
                counts.lost.append((job_name, slot))
                following = [r for r in job_runs if r.scheduled_for and r.scheduled_for > slot][:2]
                counts.lost_detail.append(
                    f"{job_name} slot {slot:%H:%M:%S.%f}: previous run {before and before.id} ended "
                    f"{before and before.end_time}, next runs {[(r.id, r.scheduled_for) for r in following]}"
                )
            slot += period
    return counts


def percentile(values: Sequence[float], fraction: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, max(0, int(len(ordered) * fraction + 0.5) - 1))], 3)


# Jobs due every second per database: on MariaDB the three workers keep 100-136 runs/s on two shared cores
# (CI: 99.9/s at 200 jobs, 3,003 of 6,000 slots overrun, none lost or doubled), so it runs at 100: the scenario
# is about the beats' claims, and the overrun bound below is about the workers' pace.
LOAD_JOBS = {"postgres": 200, "pgbouncer": 200, "mariadb": 100}
# The window, in seconds (CI time): 15 s (20 s until stop 23, 30 s before; through PgBouncer, transaction mode,
# 5 server connections, its 30 s window took 51 s). The 60 s soaks below run the same at length with --soak.
LOAD_WINDOW = {"postgres": 15.0, "pgbouncer": 15.0, "mariadb": 15.0}


@on(PG_RABBITMQ, PGBOUNCER_RABBITMQ, MARIADB_RABBITMQ)
def test_three_beats_under_load_dispatch_every_slot_once(
    cluster: Cluster, db_kind: str, request: pytest.FixtureRequest
) -> None:
    jobs = LOAD_JOBS[db_kind]
    if db_kind == "pgbouncer":  # how many connections the processes used, through the pooler
        pools = PoolSampler(request.getfixturevalue("pgbouncer"), str(cluster.database.own_database))
        pools.start()
        request.addfinalizer(pools.stop)
    run_load(
        cluster, name=f"beats-load-{db_kind}-{jobs}", jobs=jobs, every=1.0, duration=LOAD_WINDOW[db_kind], workers=3
    )
    if db_kind == "pgbouncer":
        pools.stop()
        report(
            f"beats-load-{db_kind}-{jobs}-pools",
            pool_size=DEFAULT_POOL_SIZE,
            samples=pools.samples,
            max_clients=pools.most["clients"],
            max_waiting=pools.most["waiting"],
            max_server_active=pools.most["server_active"],
            max_wait_s=round(pools.max_wait, 3),
        )
        assert pools.samples >= 5, pools.errors[-3:]
        # The beats and workers connected through the pooler: more clients than the test process's own pool
        # (cluster.repo and the samplers: SQLAlchemy's 5 + 10 overflow at most) could make.
        assert pools.most["clients"] > 15
        assert pools.most["server_active"] <= DEFAULT_POOL_SIZE


@pytest.mark.soak  # CI time (52 s): the 200-job scenario runs in CI, this and its 60 s soak with --soak
@on(PG_RABBITMQ)
def test_2000_jobs_on_postgresql_three_beats_dispatch_every_slot_once(cluster: Cluster) -> None:
    # The same rate as above (200 runs/s; 2,000 runs/s is beyond two shared cores), ten times the jobs: claims
    # and the monitor work on a table of 2,000 jobs.
    run_load(cluster, name="beats-load-pg-2000", jobs=2000, every=10.0, duration=30.0, workers=3)


# -- scenario 2: SIGKILL a beat in the middle of a claim batch, again and again ------------------------------

KILLS = int(os.environ.get("DBSCHED_FAULT_KILLS") or 10)  # 20 until stop 23 (CI time); 100 in the soaks
# Beats claim at most 5 jobs at a time; the victim takes 30 ms to publish each message (e2e_publish_delay),
# so it spends most of its life inside a claim batch: claimed, not all published.
CLAIM_LIMIT = 5
PUBLISH_DELAY = 0.03
MONITOR_INTERVAL = 0.5
RUN_JOBS_INTERVAL = 0.3  # cluster.SETTINGS
RETRY_BACKOFF = [0.5, 30]  # cluster.SETTINGS; a retry never waits past the job's next slot
# A beat restarted with the same id ends its leftovers at start: the kill, a new beat's start on a loaded
# machine, and one claim.
RESTART_LIMIT = 30.0


def run_kills(
    cluster: Cluster, *, name: str, same_id: bool, kills: int = KILLS, jobs: int = 60, every: float = 1.0
) -> None:
    seed = int(os.environ.get("DBSCHED_FAULT_SEED") or time.time_ns() % 2**32)
    rng = random.Random(seed)
    print(f"\n{name}: random seed {seed} (DBSCHED_FAULT_SEED={seed} repeats the kill times)")
    # new server id: the claimed-unpublished runs wait for a monitor (short threshold); same server id: the
    # restarted beat ends them at its start (the threshold is long, so only the restart can).
    threshold = 60.0 if same_id else 2.0
    settings: dict[str, Any] = {
        "dbsched_run_jobs_limit": CLAIM_LIMIT,
        "dbsched_monitor_interval": MONITOR_INTERVAL,
        "dbsched_interrupt_threshold": threshold,
        "dbsched_retry_backoff": RETRY_BACKOFF,
    }
    victim_settings = {**settings, "e2e_publish_delay": PUBLISH_DELAY}
    if same_id:
        victim_settings["dbsched_server_id"] = "victim-beat"
    specs = instant_jobs("kill", jobs, every)
    names = [spec["name"] for spec in specs]
    worker = cluster.worker(specs, concurrency=8, settings={"dbsched_monitor_interval": 1.0})
    worker.wait_ready(timeout=180)
    wait_jobs_registered(cluster, jobs)
    first_due = spread_due_times(cluster.repo, names, every, lead=3.0)
    steady = [cluster.beat(name=f"steady-{n}", settings=settings) for n in range(2)]
    sampler = ActiveRunSampler(cluster.repo, interval=0.1)
    cluster.samplers.append(sampler)
    sampler.start()

    killed: list[dict[str, Any]] = []
    began = time.monotonic()
    for n in range(kills):
        victim = cluster.beat(name=f"victim-{n}", settings=victim_settings)
        victim_id = "victim-beat" if same_id else beat_id(victim)
        since = cluster.repo.database_now()

        def claimed(victim_id: str = victim_id, since: dt.datetime = since) -> bool:
            recent = cluster.repo.list_runs(limit=50)
            return any(run.create_time >= since for run in recent if run.claimed_by == victim_id)

        cluster.wait(claimed, 120, f"victim {n} to claim runs")
        delay = rng.uniform(0.0, 0.6)
        time.sleep(delay)  # not a wait for a condition: the random moment of the crash is the test's input
        cluster.kill(victim)
        killed.append({"n": n, "id": victim_id, "since": since, "at": cluster.repo.database_now(), "delay": delay})
    last_kill = killed[-1]["at"]

    # Recovered: every job runs again after the last kill, once its leftovers were brought back.
    bound = threshold + MONITOR_INTERVAL + min(RETRY_BACKOFF[0], every) + RUN_JOBS_INTERVAL
    settle = last_kill + dt.timedelta(seconds=(2.0 if same_id else bound) + every)

    def all_ran_since() -> bool:
        r = run_table
        with cluster.repo.engine.connect() as conn:
            rows = conn.execute(
                select(r.c.job_name).where(r.c.status == "completed", r.c.create_time >= settle).distinct()
            ).all()
        return len(rows) == jobs

    if same_id:  # the leftovers of the last kill are ended by a start with that id
        cluster.beat(name="victim-restarted", settings=victim_settings)
    cluster.wait(all_ran_since, 120 + bound, "every job to run again after the last kill")
    sampler.stop()
    elapsed = time.monotonic() - began

    starts = start_events(cluster.events_dir)
    runs = all_runs(cluster.repo)
    doubled = doubles(runs, starts)
    victim_ids = {kill["id"] for kill in killed}
    # Claimed by a killed beat and never started (not published, or published and ended before a worker got it).
    orphans = [
        run for run in runs if run.claimed_by in victim_ids and run.start_time is None and run.create_time <= last_kill
    ]
    by_job: dict[str, list[RunRecord]] = defaultdict(list)
    for run in runs:
        by_job[run.job_name].append(run)
    recovery: list[float] = []
    unrecovered: list[str] = []
    wrong_reason: list[str] = []
    for orphan in orphans:
        later = [run for run in by_job[orphan.job_name] if run.id > orphan.id]
        if orphan.status != "interrupted" or not later:
            unrecovered.append(f"run {orphan.id} {orphan.job_name} {orphan.status} {orphan.error}")
            continue
        recovery.append(seconds_between(orphan.create_time, later[0].create_time))
        expected = "restart: left behind by victim-beat" if same_id else "stalled: no worker started it"
        if not (orphan.error or "").startswith(expected):
            wrong_reason.append(f"run {orphan.id}: {orphan.error}")
    # Kills that left claimed runs unpublished (queued, never started): "in the middle of a claim batch".
    mid_batch = 0
    for kill in killed:
        claimed_then = [
            run for run in orphans if run.claimed_by == kill["id"] and kill["since"] <= run.create_time <= kill["at"]
        ]
        mid_batch += bool(claimed_then)
    window_start = first_due + dt.timedelta(seconds=6 * every)
    counts = count_slots(cluster.repo, runs, names, every, window_start, settle)
    report(
        name,
        kills=len(killed),
        kills_mid_batch=mid_batch,
        seed=seed,
        server_id="same" if same_id else "new",
        jobs=jobs,
        every=every,
        runs=len(runs),
        slots=counts.slots,
        overrun=len(counts.overrun),
        slots_due=counts.due,
        dispatched=len(counts.runs),
        lost=len(counts.lost),
        doubled=len(doubled),
        double_active=len(sampler.double_active),
        samples=sampler.samples,
        left_queued=len(orphans),
        recovered=len(recovery),
        recovery_max_s=percentile(recovery, 1.0),
        recovery_p50_s=percentile(recovery, 0.5),
        bound_s=round(bound, 2) if not same_id else "restart",
        asserted_s=RESTART_LIMIT if same_id else round(bound + SLACK, 2),
        elapsed_s=round(elapsed, 1),
    )

    sampler.check()
    assert not doubled, doubled[:10]
    assert not unrecovered, unrecovered[:10]
    assert not wrong_reason, wrong_reason[:10]
    assert not counts.lost, f"{len(counts.lost)} due slots never claimed: {counts.lost_detail[:10]}"
    assert mid_batch >= 1, "no kill landed inside a claim batch: the test did not test what it says"
    # design §4: brought back at worst interrupt threshold + one monitor interval after the claim (+ the retry
    # delay, never past the job's next slot, and one claim), with slack for a loaded machine. design §9: a beat
    # restarted with the same server id ends them at its start, long before the (60 s) threshold.
    limit = RESTART_LIMIT if same_id else bound + SLACK
    assert max(recovery, default=0.0) <= limit, f"recovery took {max(recovery):.2f}s > {limit:.2f}s"
    if not same_id:
        assert min(recovery, default=threshold) >= threshold - 0.5, "a claimed run was ended before the threshold"
    assert {run.status for run in runs if run.create_time < settle} <= {"completed", "interrupted"}
    assert [r for r in runs if r.status == "interrupted" and r.start_time is not None] == []
    assert {run.claimed_by for run in runs} >= {beat_id(beat) for beat in steady}


@on(PG_RABBITMQ)
def test_a_beat_killed_mid_claim_10_times_loses_and_doubles_nothing_new_server_id(cluster: Cluster) -> None:
    run_kills(cluster, name="beats-kill-new-id", same_id=False)


@pytest.mark.soak  # CI time (51 s): the new-id variant runs in CI; this one and 100 kills of each with --soak
@on(PG_RABBITMQ)
def test_a_beat_killed_mid_claim_10_times_loses_and_doubles_nothing_same_server_id(cluster: Cluster) -> None:
    run_kills(cluster, name="beats-kill-same-id", same_id=True)


# -- the full scenarios: opt-in (DBSCHED_SOAK=1) ------------------------------------------------------------


@pytest.mark.soak
@on(PG_RABBITMQ, PG_REDIS, PGBOUNCER_RABBITMQ, SQLITE_FS)
def test_soak_three_beats_200_jobs_every_second_for_60_seconds(cluster: Cluster, broker: Any, db_kind: str) -> None:
    run_load(
        cluster,
        name=f"beats-load-soak-{db_kind}-{broker.kind}-200",
        jobs=200,
        every=1.0,
        duration=60.0,
        workers=3,
    )


@pytest.mark.soak
@on(PG_RABBITMQ)
def test_soak_2000_jobs_on_postgresql_for_60_seconds(cluster: Cluster) -> None:
    run_load(cluster, name="beats-load-soak-pg-2000", jobs=2000, every=10.0, duration=60.0, workers=3)


@pytest.mark.soak
@pytest.mark.parametrize("same_id", [False, True], ids=["new-id", "same-id"])
@on(PG_RABBITMQ, SQLITE_FS)
def test_soak_a_beat_killed_mid_claim_100_times(cluster: Cluster, same_id: bool, broker: Any, db_kind: str) -> None:
    run_kills(
        cluster,
        name=f"beats-kill-soak-{db_kind}-{broker.kind}-{'same' if same_id else 'new'}-id",
        same_id=same_id,
        kills=max(KILLS, 100),
    )
