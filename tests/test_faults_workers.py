"""Fault suite (issue 4), the worker side: workers killed (the whole process, or one prefork child), stopped
warm, restarted under the same node name, running older code, and beats and workers whose host clocks are an
hour off. Real `celery worker` / `celery beat` processes (tests/e2e_app.py) on PostgreSQL and a real broker.

Each test prints one `FAULTS <scenario>: ...` line with what it measured (times in seconds, from the database
clock) and appends it as a JSON line to the file named by DBSCHED_FAULT_REPORT, if set.

Bounds are asserted with a stated slack: this machine is small and shared with other test runs.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import time
from typing import Any

import pytest
from helpers.cluster import (
    APP,
    CLOCK_TOLERANCE,
    LATENESS,
    PG_RABBITMQ,
    PG_REDIS,
    SETTINGS,
    SQLITE_FS,
    Cluster,
    assert_runs_spaced,
    on,
    quick,
    seconds_between,
)
from helpers.processes import TESTS_DIR, CeleryProcess

from celery_dbsched import JobStatus
from celery_dbsched.schedules import IntervalSchedule

pytestmark = [pytest.mark.faults, pytest.mark.e2e]

# The fixtures, made visible to this test module.

MONITOR_INTERVAL: float = SETTINGS["dbsched_monitor_interval"]  # beats' monitor and workers' progress writes
RUN_JOBS_INTERVAL: float = SETTINGS["dbsched_run_jobs_interval"]  # the longest an idle beat sleeps
RETRY_BASE: float = SETTINGS["dbsched_retry_backoff"][0]  # the first retry of a failed or stalled run
THRESHOLD = 2.5  # the interrupt threshold of the jobs that are killed
# Added to every asserted bound: a beat's tick, a statement and a process scheduled late on a loaded 2-core
# machine shared with other test runs.
SLACK = 2.0


def report(scenario: str, **figures: Any) -> None:
    """One line for the reader of the test output, one JSON line for the lead's table."""
    shown = " ".join(
        f"{key}={value:.2f}s" if isinstance(value, float) else f"{key}={value}" for key, value in figures.items()
    )
    print(f"\nFAULTS {scenario}: {shown}")
    path = os.environ.get("DBSCHED_FAULT_REPORT")
    if path:
        rounded = {key: round(value, 3) if isinstance(value, float) else value for key, value in figures.items()}
        with open(path, "a") as f:
            f.write(json.dumps({"scenario": scenario, **rounded}, default=str) + "\n")


# -- 3. SIGKILL a worker, or one of its prefork children, in the middle of a job ---------------------------


@pytest.mark.parametrize(
    ("broker", "db_kind", "target"),
    [
        pytest.param(*PG_RABBITMQ.values, "worker", id="worker-rabbitmq-postgres", marks=PG_RABBITMQ.marks),
        pytest.param(*PG_RABBITMQ.values, "prefork", id="prefork-worker-rabbitmq-postgres", marks=PG_RABBITMQ.marks),
        pytest.param(*PG_REDIS.values, "child", id="prefork-child-redis-postgres", marks=PG_REDIS.marks),
    ],
    indirect=["broker"],
)
def test_a_killed_worker_s_run_ends_interrupted_within_the_threshold_and_runs_again(
    cluster: Cluster, target: str
) -> None:
    """No shutdown, no goodbye: the run's progress stops moving, a beat's monitor ends it `interrupted`
    (stalled) within the job's interrupt threshold + one monitor interval, and the job runs again elsewhere
    after the first retry's backoff."""
    jobs = [
        {
            "kind": "long",
            "name": "e2e.victim",
            "every": 300,
            "seconds": 120,
            "step": 0.2,
            "interrupt_threshold": THRESHOLD,
        }
    ]
    pool = "threads" if target == "worker" else "prefork"
    worker_dies = target != "child"
    first = cluster.worker(jobs, name="first", pool=pool, concurrency=2)
    cluster.beat()
    sampler = cluster.sampler()

    run = cluster.wait_run("e2e.victim", lambda run: run.status == "running" and run.worker == first.node)
    start = cluster.event(run.id, "start")
    # The job is reporting: its progress (and so the run's update_time) has moved a few times.
    cluster.wait(lambda: cluster.repo.lookup_run(run.id).completed >= 3, 30, "progress written", "e2e.victim")
    second = cluster.worker(jobs, name="second", pool=pool, concurrency=2)
    second.wait_ready()
    assert cluster.repo.lookup_run(run.id).status == "running", cluster.describe_runs()

    killed_at = cluster.repo.database_now()  # read just before the kill: the figures below err on the long side
    if target == "worker":
        victim = first.pid
        assert start["pid"] == victim
        cluster.kill(first)  # SIGKILL, threads pool: the job, its monitor thread and the worker die together
    elif target == "prefork":
        victim = start["pid"]
        assert victim != first.pid, "the job ran in the worker's main process, not a pool child"
        cluster.stop(first, signal.SIGKILL)  # the main process, then at once its whole process group
    else:
        victim = start["pid"]
        assert victim != first.pid, "the job ran in the worker's main process, not a pool child"
        os.kill(victim, signal.SIGKILL)  # the worker's main process lives on (a WorkerLostError in its log)

    ended = cluster.wait_run(
        "e2e.victim", lambda r: r.id == run.id and r.status != "running", THRESHOLD + MONITOR_INTERVAL + 30
    )
    assert ended.status == "interrupted", cluster.describe_runs()
    assert ended.error is not None and ended.error.startswith("stalled: no progress"), ended.error
    assert ended.end_time is not None
    last_progress = ended.update_time
    assert seconds_between(last_progress, killed_at) <= MONITOR_INTERVAL + SLACK, (
        "the run's progress was not moving at the kill"
    )
    assert ended.completed >= 3 and ended.total == 600, ended  # the last progress reported is kept

    # The bound: never before the threshold (measured from the last progress), at most threshold + one monitor
    # interval after the kill (+ slack).
    stalled_for = seconds_between(last_progress, ended.end_time)
    interrupted_after = seconds_between(killed_at, ended.end_time)
    bound = THRESHOLD + MONITOR_INTERVAL
    assert stalled_for >= THRESHOLD - CLOCK_TOLERANCE, f"interrupted {stalled_for:.3f}s after its last progress"
    assert interrupted_after <= bound + SLACK, f"interrupted {interrupted_after:.3f}s after the kill (bound {bound}s)"

    # It runs again after the first retry's backoff, in another process: on the second worker when the first
    # is dead; on either when only a child died (the first worker replaces it).
    again = cluster.wait_run("e2e.victim", lambda r: r.id > run.id and r.start_time is not None, timeout=60)
    rerun = cluster.event(again.id, "start")
    assert rerun["pid"] != victim
    if worker_dies:
        assert again.worker == second.node
    else:
        assert again.worker in (first.node, second.node)
        assert first.alive(), "the worker died with its child"
    rerun_after = seconds_between(ended.end_time, again.create_time)
    assert RETRY_BASE - CLOCK_TOLERANCE <= rerun_after <= RETRY_BASE + LATENESS, rerun_after
    assert again.start_time is not None

    if worker_dies:
        # RabbitMQ gave the dead worker's unacknowledged message (acks_late) to the second worker, which
        # dropped it: the run was no longer `queued` (design §3, a run starts at most once).
        second.wait_for_log(f"dropping the message for run {run.id}:", timeout=30)
    sampler.stop()
    sampler.check()
    assert [e["event"] for e in cluster.events(run.id)] == ["start"]  # killed: it never saw an end
    cluster.assert_started_once(cluster.runs())
    report(
        f"worker-kill-{target}",
        broker=cluster.broker.kind,
        interrupted_after=interrupted_after,
        stalled_for=stalled_for,
        threshold=THRESHOLD,
        bound=bound,
        slack=SLACK,
        rerun_after=rerun_after,
        rerun_on={first.node: "first", second.node: "second"}.get(again.worker, again.worker),
        rerun_pid_differs=rerun["pid"] != victim,
    )


@on(PG_RABBITMQ)
def test_a_worker_restarted_with_the_same_name_ends_the_runs_it_left_running(cluster: Cluster) -> None:
    """The killed worker comes back under its node name long before the threshold (120 s): it ends the runs it
    left `running` as it starts (reason restart), and the job runs again at once."""
    jobs = [{"kind": "long", "name": "e2e.long", "every": 300, "seconds": 120, "interrupt_threshold": 120}]
    node = f"e2e-restart-{time.monotonic_ns() % 10**9}@%h"
    crashed = cluster.worker(jobs, name="crashed", node=node)
    cluster.beat()
    run = cluster.wait_run("e2e.long", lambda run: run.status == "running")
    cluster.event(run.id, "start")
    assert run.worker == crashed.node

    cluster.kill(crashed)  # SIGKILL: no shutdown, the run stays `running`
    assert cluster.repo.lookup_run(run.id).status == "running"
    restarted_at = cluster.repo.database_now()
    restarted = cluster.worker(jobs, name="restarted", node=node)
    restarted.wait_ready()
    ready_at = cluster.repo.database_now()

    # Ended at start: before the worker consumes its first message.
    ended = cluster.repo.lookup_run(run.id)
    assert ended.status == "interrupted", cluster.describe_runs()
    assert ended.error is not None and ended.error.startswith("restart"), ended.error
    assert node.split("@")[0] in ended.error, ended.error
    assert ended.end_time is not None
    assert restarted_at <= ended.end_time <= ready_at
    # Ended by the restart, well before the job's 120 s threshold.
    assert seconds_between(restarted_at, ended.end_time) < 30
    assert not [e for e in cluster.events(run.id) if e["event"] == "cancelled"]  # it was killed, not told
    assert f"ended 1 run(s) that {restarted.node} left running: {run.label()}" in restarted.log()

    # And it is due again at once: the restarted worker runs it.
    again = cluster.wait_run("e2e.long", lambda r: r.id > run.id and r.status == "running", timeout=30)
    assert again.worker == restarted.node
    rerun_after = seconds_between(ended.end_time, again.create_time)
    assert 0 <= rerun_after < LATENESS
    cluster.assert_started_once(cluster.runs())
    report(
        "worker-restart-same-name",
        ended_after_launch=seconds_between(restarted_at, ended.end_time),
        launch_to_ready=seconds_between(restarted_at, ready_at),
        threshold=120.0,
        rerun_after=rerun_after,
        rerun_on=again.worker,
    )


# -- 4. warm shutdown mid-job ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("broker", "db_kind", "pool"),
    [
        pytest.param(*PG_RABBITMQ.values, "threads", id="threads-rabbitmq-postgres", marks=PG_RABBITMQ.marks),
        pytest.param(*SQLITE_FS.values, "prefork", id="prefork-filesystem-sqlite"),
        pytest.param(*PG_REDIS.values, "solo", id="solo-redis-postgres", marks=PG_REDIS.marks),
    ],
    indirect=["broker"],
)
def test_warm_shutdown_interrupts_the_run_and_another_worker_takes_it_at_once(cluster: Cluster, pool: str) -> None:
    jobs = [{"kind": "long", "name": "e2e.long", "every": 300, "seconds": 120}]
    if pool != "solo":
        jobs.append(quick("e2e.quick", 0.5))
    concurrency = {"threads": 4, "prefork": 2, "solo": 1}[pool]
    first = cluster.worker(jobs, name="first", pool=pool, concurrency=concurrency)
    cluster.beat()

    run = cluster.wait_run("e2e.long", lambda run: run.status == "running" and run.worker == first.node)
    start = cluster.event(run.id, "start")
    if pool == "prefork":
        assert start["pid"] != first.pid, "the job ran in the worker's main process, not a pool child"
    else:
        assert start["pid"] == first.pid
    if pool != "solo":
        cluster.wait_runs("e2e.quick", 2, lambda run: run.status == "completed" and run.worker == first.node)

    second = cluster.worker(jobs, name="second", pool=pool, concurrency=concurrency)
    second.wait_ready()
    stopped_at = cluster.repo.database_now()
    began = time.monotonic()
    assert cluster.stop(first, signal.SIGTERM, timeout=60) == 0, first.log_tail()
    stop_took = time.monotonic() - began
    assert stop_took < 20, "the worker waited for the job instead of stopping it"

    ended = cluster.repo.lookup_run(run.id)
    assert ended.status == "interrupted", cluster.describe_runs()
    assert ended.error is not None and ended.error.startswith("shutdown"), ended.error
    cancelled = cluster.event(run.id, "cancelled")
    assert cancelled["reason"].startswith("shutdown"), cancelled
    assert cancelled["pid"] == start["pid"]

    # Due again at once (not after the backoff or the threshold): the second worker runs it, for the same slot.
    taken = cluster.wait_run("e2e.long", lambda later: later.id > run.id and later.status == "running", timeout=30)
    assert taken.worker == second.node
    assert ended.end_time is not None and taken.start_time is not None
    assert taken.scheduled_for is not None and taken.scheduled_for <= ended.end_time, "it was not due at once"
    retaken_after = seconds_between(ended.end_time, taken.create_time)
    started_after = seconds_between(ended.end_time, taken.start_time)
    assert 0 <= retaken_after <= RUN_JOBS_INTERVAL + SLACK, retaken_after
    assert 0 <= retaken_after < LATENESS
    cluster.assert_started_once(cluster.runs())
    if pool != "solo":
        quick_runs = cluster.runs("e2e.quick")
        assert {run.status for run in quick_runs} <= {"completed", "interrupted", "queued", "running"}
        assert all(run.progress == JobStatus(3, 3) for run in quick_runs if run.status == "completed")
    report(
        f"worker-warm-shutdown-{pool}",
        broker=cluster.broker.kind,
        db=cluster.database.kind,
        stop_took=stop_took,
        interrupted_after=seconds_between(stopped_at, ended.end_time),
        retaken_after=retaken_after,
        retaken_bound=RUN_JOBS_INTERVAL + SLACK,
        started_after=started_after,
        taken_on=taken.worker,
    )


# -- 7. a worker that does not know the job ----------------------------------------------------------------


@on(PG_RABBITMQ)
def test_a_worker_that_does_not_know_the_job_fails_the_run_naming_both_and_workers_that_know_it_take_the_next(
    cluster: Cluster,
) -> None:
    """A rolling upgrade: the job was registered by new code, an old worker gets its run. The run fails naming
    the job and the worker; the job is retried (not stuck); once a new worker is up, it runs the job."""
    settings = {"dbsched_retry_backoff": [0.3, 1.0]}  # failures retried within a second
    # Registered in the database by the new deployment (the definition its `every=300` makes: re-registering
    # it unchanged keeps its next run), but not in the old worker's app.
    cluster.repo.upsert_job(
        "e2e.upgraded",
        "e2e: quick",
        every=dt.timedelta(seconds=300),
        schedule=IntervalSchedule(300),
    )
    old = cluster.worker([quick("e2e.known", 300)], name="old", concurrency=1, settings=settings)
    cluster.beat(settings=settings)
    sampler = cluster.sampler()

    failed = lambda run: run.status == "failed"  # noqa: E731
    run = cluster.wait_run("e2e.upgraded", failed)
    assert run.error is not None
    assert "'e2e.upgraded'" in run.error and f"'{old.node}'" in run.error, run.error
    assert run.error == (
        f"job 'e2e.upgraded' is not registered on worker '{old.node}'; import the module that registers it on this "
        "worker, or route the job's queue to workers that do"
    )
    assert run.worker == old.node
    assert cluster.events(run.id) == []
    known = cluster.wait_run("e2e.known", lambda run: run.status == "completed")
    assert known.worker == old.node

    # Not stuck: the failed run freed the job, which is retried after the backoff (and fails again here).
    retried = cluster.wait_runs("e2e.upgraded", 2, failed, timeout=30)[1]
    assert run.end_time is not None
    retry_after = seconds_between(run.end_time, retried.create_time)
    assert 0.3 - CLOCK_TOLERANCE <= retry_after <= 0.3 + LATENESS, retry_after

    new = cluster.worker(
        [quick("e2e.known", 300), quick("e2e.upgraded", 300)], name="new", concurrency=2, settings=settings
    )
    new.wait_ready()
    ready_at = cluster.repo.database_now()
    done = cluster.wait_run("e2e.upgraded", lambda run: run.status == "completed", timeout=60)
    assert done.worker == new.node
    assert done.progress == JobStatus(3, 3)
    taken_after = seconds_between(ready_at, done.create_time)
    assert taken_after <= 1.0 + LATENESS, taken_after  # the backoff cap + lateness
    sampler.stop()
    sampler.check()

    runs = cluster.runs("e2e.upgraded")
    for each in runs:
        if each.status == "failed":
            assert each.worker == old.node and each.error == run.error, cluster.describe_runs("e2e.upgraded")
            assert cluster.events(each.id) == []
        else:
            assert each.status in ("completed", "queued", "running"), cluster.describe_runs("e2e.upgraded")
            assert each.worker in (None, new.node), cluster.describe_runs("e2e.upgraded")
    # A failed run here was started (queued -> running) and ended before any job code ran: no events.
    cluster.assert_started_once([each for each in runs if each.status != "failed"])
    failed_after_new = [r for r in runs if r.status == "failed" and r.create_time >= ready_at]
    report(
        "worker-unknown-job",
        failed_on_old=sum(r.status == "failed" for r in runs),
        failed_on_old_after_new_ready=len(failed_after_new),
        retry_after=retry_after,
        taken_by_new_after_ready=taken_after,
        bound=1.0 + LATENESS,
    )


# -- 8. clock skew -------------------------------------------------------------------------------------------

SKEW_DIR = TESTS_DIR / "skewed_clock"  # its sitecustomize shifts the host clock of a process
SKEW = 3600.0


def start_skewed(cluster: Cluster, kind: str, skew: float, jobs: list[dict[str, Any]]) -> CeleryProcess:
    """A worker or beat of the cluster whose host clock is `skew` seconds off (see tests/skewed_clock)."""
    name = f"{kind}{skew:+.0f}s"
    env = {
        **cluster.env(name, jobs, None),
        "DBSCHED_TEST_CLOCK_SKEW": str(skew),
        "PYTHONPATH": os.pathsep.join([str(SKEW_DIR), cluster.processes.env["PYTHONPATH"]]),
    }
    if kind == "worker":
        process = cluster.processes.start_worker(APP, env=env, name=name)
    else:
        process = cluster.processes.start_beat(APP, env=env, name=name)
    cluster.live.append(process)
    process.wait_for_log(f"dbsched test clock skew: {skew:+g}s")
    return process


@on(PG_RABBITMQ)
def test_a_beat_and_a_worker_with_clocks_two_hours_apart_agree_on_due_times(cluster: Cluster) -> None:
    """The beat's host clock is an hour ahead, the worker's an hour behind. Every time that decides anything
    (when a job is due, when a run is stalled, when it runs next) is the database's, so nothing is early,
    late or interrupted for it."""
    jobs = [
        quick("e2e.skew.every", 1.0),
        quick("e2e.skew.later", 300, next_run_in=4),
        {"kind": "long", "name": "e2e.skew.alive", "every": 300, "seconds": 5, "interrupt_threshold": THRESHOLD},
        {"kind": "stall", "name": "e2e.skew.stall", "every": 300, "interrupt_threshold": THRESHOLD},
    ]
    before = cluster.repo.database_now()
    worker = start_skewed(cluster, "worker", -SKEW, jobs)  # registers the jobs (on the database clock)
    start_skewed(cluster, "beat", +SKEW, [])
    sampler = cluster.sampler()

    completed = lambda run: run.status == "completed"  # noqa: E731
    every = cluster.wait_runs("e2e.skew.every", 4, completed, timeout=60)
    later = cluster.wait_run("e2e.skew.later", completed, timeout=60)
    alive = cluster.wait_run("e2e.skew.alive", lambda run: run.end_time is not None, timeout=60)
    stall = cluster.wait_run("e2e.skew.stall", lambda run: run.status == "interrupted", timeout=60)
    sampler.stop()
    sampler.check()
    now = cluster.repo.database_now()

    # The worker's host clock really was an hour behind: the job's own events carry its time.time().
    start = cluster.event(every[0].id, "start")
    assert every[0].start_time is not None
    worker_offset = start["time"] - every[0].start_time.timestamp()
    assert worker_offset == pytest.approx(-SKEW, abs=30), worker_offset

    # Registration (by the worker) on the database clock: first due at its creation + next_run_in (4 s), and
    # the beat (whose clock is 2 h ahead of the worker's) did not claim it before.
    job = cluster.repo.lookup_job("e2e.skew.later")
    assert before <= job.create_time <= now
    assert later.scheduled_for is not None
    assert seconds_between(job.create_time, later.scheduled_for) == pytest.approx(4, abs=CLOCK_TOLERANCE)
    first_delay = seconds_between(job.create_time, later.create_time)
    assert 4 - CLOCK_TOLERANCE <= first_delay <= 4 + LATENESS, first_delay

    # A fixed cadence, every run claimed on time, once.
    runs = cluster.runs("e2e.skew.every")
    assert_runs_spaced(runs, 1.0)
    lateness = max(seconds_between(r.scheduled_for, r.create_time) for r in runs if r.scheduled_for is not None)

    # Progress times are the database's: a running job is not stalled for the beat an hour ahead, and a
    # stalled one is interrupted after its threshold, not at once nor an hour late.
    assert alive.status == "completed" and alive.progress.completed == alive.progress.total, alive
    assert stall.end_time is not None and stall.error is not None and stall.error.startswith("stalled"), stall
    stalled_for = seconds_between(stall.update_time, stall.end_time)
    assert THRESHOLD - CLOCK_TOLERANCE <= stalled_for <= THRESHOLD + MONITOR_INTERVAL + SLACK, stalled_for

    # No persisted time is an hour off.
    for run in cluster.runs():
        for value in (run.create_time, run.start_time, run.update_time, run.end_time, run.scheduled_for):
            assert value is None or before <= value <= now + dt.timedelta(seconds=1), (run, value)
    for each in cluster.repo.list_jobs():
        if not each.name.startswith("e2e.skew."):
            continue  # Celery's own beat_schedule entry (celery.backend_cleanup, daily)
        assert before <= each.next_scheduled_run <= now + dt.timedelta(seconds=301), each
    cluster.assert_started_once(cluster.runs())
    assert {run.worker for run in cluster.runs() if run.worker} == {worker.node}
    report(
        "clock-skew",
        beat_skew=f"{+SKEW:+.0f}s",
        worker_skew=f"{-SKEW:+.0f}s",
        worker_offset_seen=worker_offset,
        every_runs=len(runs),
        max_claim_lateness=lateness,
        first_run_after_registration=first_delay,
        expected_first_run=4.0,
        stalled_for=stalled_for,
        threshold=THRESHOLD,
        long_job=alive.status,
    )
