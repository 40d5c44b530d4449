"""End to end: real `celery worker` and `celery beat` processes, a real database and a real broker.

The app is tests/e2e_app.py, configured per test through environment variables; its jobs append what
happened to each run to `<tmp>/events/<run id>.jsonl`, so the tests see both sides: the database (runs,
states, times on the database clock) and the jobs (started once, saw their cancellation).

Production combinations run the core behaviour: SQLite + filesystem:// (one machine), PostgreSQL + RabbitMQ,
PostgreSQL + Redis, and PostgreSQL + filesystem://. The other behaviours run on one combination each.
Intervals are shortened through settings; every wait polls with a generous deadline, because other test
runs share this machine.

Workers killed, stopped warm, restarted, running older code or on a skewed clock: tests/test_faults_workers.py.
"""

from __future__ import annotations

import itertools
import re
import socket

import pytest
from celery import Celery
from helpers.cluster import (
    ALL_COMBINATIONS,
    CLOCK_TOLERANCE,
    LATENESS,
    PG_RABBITMQ,
    PG_REDIS,
    PGBOUNCER_RABBITMQ,
    SQLITE_FS,
    Cluster,
    assert_runs_spaced,
    on,
    quick,
    seconds_between,
)

from celery_dbsched import JobStatus, update_job_next_run_in_at_least
from celery_dbsched.protocol import RUN_TASK_NAME

pytestmark = pytest.mark.e2e

# The fixtures, made visible to this test module.


# -- on every broker ---------------------------------------------------------------------------------------


@on(*ALL_COMBINATIONS)
def test_two_jobs_run_once_per_due_time(cluster: Cluster) -> None:
    jobs = [quick("e2e.a", 1.0), {"kind": "quick_class", "name": "e2e.b", "every": 1.5}]
    worker = cluster.worker(jobs)
    beat = cluster.beat()
    sampler = cluster.sampler()

    done = lambda run: run.status == "completed"  # noqa: E731
    cluster.wait_runs("e2e.a", 4, done)
    cluster.wait_runs("e2e.b", 3, done)
    sampler.stop()
    sampler.check()

    beat_id = f"{socket.gethostname()}:{beat.pid}"
    for job, every in (("e2e.a", 1.0), ("e2e.b", 1.5)):
        runs = cluster.runs(job)
        finished = [run for run in runs if run.status not in ("queued", "running")]
        assert all(run.status == "completed" for run in finished), cluster.describe_runs(job)
        assert all(run.progress == JobStatus(3, 3) for run in finished), cluster.describe_runs(job)
        assert {run.worker for run in finished} == {worker.node}
        assert {run.claimed_by for run in runs} == {beat_id}
        assert all(run.task_id for run in finished)
        assert_runs_spaced(runs, every)
        cluster.assert_started_once(runs)


@on(*ALL_COMBINATIONS)
def test_progress_values_reach_the_database_while_the_job_runs(cluster: Cluster) -> None:
    cluster.worker(
        [{"kind": "progress", "name": "e2e.progress", "every": 300, "steps": 6, "step": 0.5}],
        settings={"dbsched_monitor_interval": 0.2},
    )
    cluster.beat()
    sampler = cluster.sampler()

    run = cluster.wait_run("e2e.progress", lambda run: run.status == "completed", timeout=60)
    sampler.stop()
    sampler.check()

    assert run.progress == JobStatus(6, 6)
    values = sampler.seen[run.id]
    while_running = [(completed, total) for status, completed, total in values if status == "running"]
    intermediate = [(c, t) for c, t in while_running if t == 6 and 0 < c < 6]
    assert len(intermediate) >= 3, f"progress seen while running: {values}"
    assert while_running == sorted(while_running), f"progress went backwards: {values}"
    cluster.assert_started_once([run])


@on(*ALL_COMBINATIONS)
def test_a_stalled_job_is_interrupted_and_its_context_cancelled(cluster: Cluster) -> None:
    cluster.worker([{"kind": "stall", "name": "e2e.stall", "every": 300, "interrupt_threshold": 1.5}])
    cluster.beat()

    run = cluster.wait_run(
        "e2e.stall", lambda run: run.status == "interrupted" and run.start_time is not None, timeout=60
    )
    assert run.error is not None and run.error.startswith("stalled"), run.error
    assert run.progress == JobStatus(0, 10)  # the last value it reported, kept
    assert run.end_time is not None and run.start_time is not None
    # Interrupted by a beat's monitor once its progress was older than its own threshold (1.5 s), not the
    # global one (60 s).
    assert 1.5 - CLOCK_TOLERANCE <= seconds_between(run.update_time, run.end_time) < 1.5 + LATENESS

    cancelled = cluster.event(run.id, "cancelled")
    assert "stalled" in cancelled["reason"], cancelled
    cluster.assert_started_once([run])
    # The job is due again after the backoff (0.5 s): it runs (and stalls) again.
    cluster.wait_run("e2e.stall", lambda later: later.id > run.id and later.start_time is not None)


# -- one combination each ------------------------------------------------------------------------------------


@on(SQLITE_FS)
def test_a_failing_job_is_retried_with_backoff_and_keeps_its_final_status(cluster: Cluster) -> None:
    worker = cluster.worker(
        [{"kind": "fail", "name": "e2e.fail", "every": 300}, quick("e2e.steady", 2.0)],
        settings={"dbsched_retry_backoff": [0.4, 30]},
        pool="prefork",  # the job's exception fails the task in a pool child, reported by the parent
        concurrency=2,
    )
    cluster.beat(settings={"dbsched_retry_backoff": [0.4, 30]})

    failed = cluster.wait_runs("e2e.fail", 4, lambda run: run.status == "failed", timeout=90)[:4]
    cluster.wait_runs("e2e.steady", 3, lambda run: run.status == "completed")

    # Backoff: 0.4, 0.8, 1.6 s after each failure (base 0.4 s, doubling; far below the job's 300 s).
    gaps = [seconds_between(a.end_time, b.create_time) for a, b in itertools.pairwise(failed)]  # type: ignore[arg-type]
    for n, gap in enumerate(gaps):
        assert 0.4 * 2**n - CLOCK_TOLERANCE <= gap <= 0.4 * 2**n + LATENESS, gaps
    assert gaps == sorted(gaps) and gaps[0] < gaps[-1], f"gaps between failed runs do not grow: {gaps}"
    assert cluster.repo.lookup_job("e2e.fail").failure_count >= 4

    # The final status of each failed run is kept in the history: its last progress and the error.
    for run in failed:
        assert run.progress == JobStatus(1, 3), cluster.describe_runs("e2e.fail")
        assert run.error is not None
        assert f"RuntimeError: e2e failure in run {run.id}" in run.error
        assert "Traceback" in run.error
    cluster.assert_started_once(failed)

    # Each failure failed its Celery task, under the job's name: the traceback logged once, at ERROR, and a
    # line naming the run. The retries are the backoff's: Celery retried nothing.
    log = worker.log()
    for run in failed:
        failure = f"ERROR/ForkPoolWorker-[0-9]+\\] Task e2e\\.fail\\[{run.task_id}\\] raised unexpected: RuntimeError"
        assert len(re.findall(failure, log)) == 1, log
        assert log.count(f"RuntimeError: e2e failure in run {run.id}\n") == 1, log  # the traceback's end
        assert f"run {run.id} of job 'e2e.fail' (slot " in log, log
    assert "Retry in" not in log, log

    # The failing job's retries do not make the other job run before its time.
    steady = cluster.runs("e2e.steady")
    assert all(run.status in ("completed", "queued", "running") for run in steady), cluster.describe_runs()
    assert_runs_spaced(steady, 2.0)
    assert cluster.repo.lookup_job("e2e.steady").failure_count == 0


@on(PG_RABBITMQ, PGBOUNCER_RABBITMQ)
def test_a_pull_in_runs_a_job_again_promptly(cluster: Cluster) -> None:
    cluster.worker([quick("e2e.idle", 300), quick("e2e.busy", 300, steps=10, step=0.5)])
    cluster.beat()
    app = cluster.app()

    # Pulled in after its run: due again at once instead of in 300 s.
    first = cluster.wait_run("e2e.idle", lambda run: run.status == "completed")
    job = cluster.repo.lookup_job("e2e.idle")
    assert first.end_time is not None and first.scheduled_for is not None
    # A fixed cadence: its slot + 300 s.
    assert seconds_between(first.scheduled_for, job.next_scheduled_run) == pytest.approx(300, abs=CLOCK_TOLERANCE)
    before = cluster.repo.database_now()
    update_job_next_run_in_at_least(app, "e2e.idle", 0)
    second = cluster.wait_run("e2e.idle", lambda run: run.id > first.id and run.status == "completed", timeout=30)
    assert seconds_between(before, second.create_time) < LATENESS

    # Pulled in while it runs (5 s): not lost, honoured when the run ends.
    running = cluster.wait_run("e2e.busy", lambda run: run.status == "running")
    update_job_next_run_in_at_least(app, "e2e.busy", 0)
    assert cluster.repo.lookup_run(running.id).status == "running", "the run ended before the pull-in: too fast"
    again = cluster.wait_run("e2e.busy", lambda run: run.id > running.id, timeout=30)
    ended = cluster.repo.lookup_run(running.id)
    assert ended.status == "completed" and ended.end_time is not None
    assert 0 <= seconds_between(ended.end_time, again.create_time) < LATENESS
    cluster.assert_started_once([first, second, ended])


@on(PG_REDIS)
def test_interrupting_a_run_in_the_database_cancels_only_that_job(cluster: Cluster) -> None:
    cluster.worker(
        [
            {"kind": "long", "name": "e2e.victim", "every": 300, "seconds": 120},
            {"kind": "progress", "name": "e2e.bystander", "every": 300, "steps": 10, "step": 0.6},
        ]
    )
    cluster.beat()
    victim = cluster.wait_run("e2e.victim", lambda run: run.status == "running")
    bystander = cluster.wait_run("e2e.bystander", lambda run: run.status == "running")
    cluster.event(victim.id, "start")

    interrupted = cluster.repo.interrupt_run(victim.id)
    assert interrupted.status == "interrupted"
    cancelled = cluster.event(victim.id, "cancelled", timeout=15)
    assert "interrupted" in cancelled["reason"], cancelled
    assert cluster.repo.lookup_run(victim.id).error == "cancelled"

    done = cluster.wait_run("e2e.bystander", lambda run: run.id == bystander.id and run.status != "running")
    assert done.status == "completed" and done.progress == JobStatus(10, 10), cluster.describe_runs()
    events = cluster.events(bystander.id)
    assert [e["event"] for e in events] == ["start", "end"]
    assert events[1]["time"] > cancelled["time"], "the bystander ended before the victim was cancelled"
    cluster.assert_started_once([cluster.repo.lookup_run(victim.id), done])


@on(SQLITE_FS)
def test_a_worker_with_an_embedded_beat_runs_jobs(cluster: Cluster) -> None:
    # The example's quick start: one process, `celery worker -B --scheduler celery_dbsched.Scheduler`.
    worker = cluster.worker([quick("e2e.a", 1.0)], embedded_beat="celery_dbsched.Scheduler")
    runs = cluster.wait_runs("e2e.a", 3, lambda run: run.status == "completed")
    assert {run.worker for run in runs} == {worker.node}
    # The embedded beat is a process of its own (a child of the worker), with a server id of its own.
    [claimed_by] = {run.claimed_by for run in runs}
    host, _, pid = claimed_by.rpartition(":")
    assert host == socket.gethostname() and pid.isdigit() and int(pid) != worker.pid, claimed_by
    assert_runs_spaced(cluster.runs("e2e.a"), 1.0)
    cluster.assert_started_once(cluster.runs("e2e.a"))


@on(PG_RABBITMQ, SQLITE_FS)
def test_two_beats_never_start_a_run_twice(cluster: Cluster) -> None:
    jobs = [quick(f"e2e.many{n}", 0.5, steps=2, step=0.05) for n in range(4)]
    worker = cluster.worker(jobs, concurrency=4)
    beats = [cluster.beat(name="beat-1"), cluster.beat(name="beat-2")]
    sampler = cluster.sampler()
    beat_ids = {f"{socket.gethostname()}:{beat.pid}" for beat in beats}

    # Long enough that both beats claim some runs (they race for every due job).
    cluster.wait(
        lambda: {run.claimed_by for run in cluster.runs()} >= beat_ids and len(cluster.runs()) >= 40,
        timeout=120,
        message="both beats to claim runs, 40 runs in all",
    )
    sampler.stop()
    sampler.check()

    runs = cluster.runs()
    assert {run.claimed_by for run in runs} == beat_ids
    assert {run.status for run in runs} <= {"completed", "queued", "running"}, cluster.describe_runs()
    assert {run.worker for run in runs if run.status == "completed"} == {worker.node}
    cluster.assert_started_once(runs)
    for job in jobs:
        assert_runs_spaced(cluster.runs(job["name"]), 0.5)


@on(PG_REDIS)
def test_a_run_message_delivered_again_does_not_start_the_run_again(cluster: Cluster) -> None:
    worker = cluster.worker([quick("e2e.once", 300), {"kind": "long", "name": "e2e.long", "every": 300}])
    cluster.beat()
    finished = cluster.wait_run("e2e.once", lambda run: run.status == "completed")
    running = cluster.wait_run("e2e.long", lambda run: run.status == "running")
    cluster.event(running.id, "start")

    # What a broker redelivery or a beat re-sending after a crash looks like to the worker.
    sender = Celery("e2e-sender", set_as_current=False)
    sender.conf.update(cluster.broker.conf())
    try:
        for run in (finished, running, finished):
            sender.send_task(RUN_TASK_NAME, args=[run.id, run.job_name], serializer="json")
        sender.send_task(RUN_TASK_NAME, args=[999_999, "e2e.once"], serializer="json")
    finally:
        sender.close()

    def dropped() -> bool:
        log = worker.log()
        return (
            log.count(f"dropping the message for run {finished.id}:") == 2
            and log.count(f"dropping the message for run {running.id}:") == 1
            and "dropping the message for run 999999:" in log
        )

    cluster.wait(dropped, timeout=30, message="the worker to drop the four messages")
    assert cluster.repo.lookup_run(finished.id) == finished
    assert cluster.repo.lookup_run(running.id).status == "running"
    assert len(cluster.runs("e2e.once")) == 1
    cluster.assert_started_once([finished, running])
