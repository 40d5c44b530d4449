"""Fault suite (issue 15, item 5): a run that outlasts Redis's `visibility_timeout`.

kombu's Redis transport emulates acknowledgements: a message delivered and not acknowledged within
`visibility_timeout` is put back on the queue and delivered again, to any worker, while the first is still
working on it. Run messages are acknowledged late (when the run has ended), so a job longer than the timeout is
redelivered. Real `celery worker` and `celery beat` processes (tests/e2e_app.py) on PostgreSQL and Redis, with
a 2 s visibility timeout swept every second, and two single-slot workers: the one running the job has no free
slot, so the other one gets the redelivered message.

Each test prints one `FAULTS <scenario>: ...` line with what it measured and appends it as a JSON line to the
file named by DBSCHED_FAULT_REPORT, if set.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from helpers.cluster import PG_REDIS, Cluster, on
from helpers.processes import CeleryProcess
from helpers.services import SERVICE_URLS

pytestmark = [pytest.mark.faults, pytest.mark.e2e]

VISIBILITY_TIMEOUT = 2
JOB_SECONDS = 8.0  # four visibility timeouts
# Put back on the queue `visibility_timeout` after its delivery, by a sweep every second: well within this.
REDELIVERY_BOUND = VISIBILITY_TIMEOUT + 1 + 3.0  # + slack for a loaded 2-core machine


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


@pytest.fixture
def short_visibility(cluster: Cluster) -> Iterator[str]:
    """The cluster's Redis broker with a 2 s visibility timeout swept every second, under a key prefix of this
    test's own (the shared server's `unacked` hash is not ours to read); the prefix, its keys deleted after."""
    import redis

    prefix = f"i15-prod-{uuid.uuid4().hex[:10]}:"
    cluster.broker.settings["broker_transport_options"] = {
        "visibility_timeout": VISIBILITY_TIMEOUT,
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
        "global_keyprefix": prefix,
    }
    yield prefix
    client = redis.Redis.from_url(SERVICE_URLS["redis"])
    try:
        keys = list(client.scan_iter(f"{prefix}*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def unacknowledged(prefix: str, queue: str) -> tuple[int, int]:
    """Messages delivered and not acknowledged, and messages waiting on the queue."""
    import redis

    client = redis.Redis.from_url(SERVICE_URLS["redis"])
    try:
        return int(client.hlen(f"{prefix}unacked")), int(client.llen(f"{prefix}{queue}"))
    finally:
        client.close()


def lines(process: CeleryProcess, pattern: str) -> list[str]:
    return [line for line in process.log_path.read_text(errors="replace").splitlines() if re.search(pattern, line)]


def errors_in(process: CeleryProcess) -> list[str]:
    return lines(process, r"ERROR|CRITICAL|Traceback")


def two_workers(cluster: Cluster, jobs: list[dict[str, Any]], settings: dict[str, Any] | None = None) -> list[Any]:
    workers = [cluster.worker(jobs, name=name, concurrency=1, settings=settings) for name in ("worker-a", "worker-b")]
    for worker in workers:
        worker.wait_ready(timeout=120)
    return workers


@on(PG_REDIS)
@pytest.mark.timeout(300)
def test_a_job_outlasting_the_visibility_timeout_starts_once_and_its_redelivery_is_dropped_with_one_line(
    cluster: Cluster, short_visibility: str
) -> None:
    name = "e2e.outlasts_visibility"
    workers = two_workers(cluster, [{"kind": "long", "name": name, "seconds": JOB_SECONDS, "every": 3600}])
    cluster.beat()
    pattern = r"dropping the message for run \d+"
    started = cluster.wait_run(name, lambda run: run.status == "running", timeout=60)
    start = cluster.event(started.id, "start")
    dropped = cluster.wait(lambda: [line for w in workers for line in lines(w, pattern)], 30, "the redelivery")
    redelivered_after = time.time() - start["time"]
    run = cluster.wait_run(name, lambda run: run.status == "completed", timeout=60)

    # Started once, by one worker, for the whole job; the other got the message again and dropped it.
    cluster.assert_started_once([run])
    ran, other = sorted(workers, key=lambda w: w.node != run.worker)
    assert run.worker == ran.node
    assert lines(ran, pattern) == []
    assert len(lines(other, pattern)) == 1, lines(other, pattern)
    line = lines(other, pattern)[0]
    assert f"run {run.id} is running, not queued" in line and "redelivered" in line, line
    assert "visibility_timeout" in line, line
    assert redelivered_after <= REDELIVERY_BOUND, f"redelivered {redelivered_after:.1f}s after the start"
    # Both deliveries were acknowledged: nothing is left unacknowledged or waiting, nothing comes back.
    cluster.wait(lambda: unacknowledged(short_visibility, cluster.broker.queue) == (0, 0), 30, "nothing unacknowledged")
    time.sleep(VISIBILITY_TIMEOUT + 2)  # a message left unacknowledged would be back by now
    assert unacknowledged(short_visibility, cluster.broker.queue) == (0, 0)
    assert len(lines(other, pattern)) == 1
    assert [r.id for r in cluster.runs(name)] == [run.id]
    assert errors_in(ran) == [] and errors_in(other) == [], errors_in(ran) + errors_in(other)
    report(
        "redis-visibility-timeout-job",
        visibility_timeout=float(VISIBILITY_TIMEOUT),
        job_seconds=JOB_SECONDS,
        redelivered_after=redelivered_after,
        starts=1,
        dropped=len(dropped),
        error_lines=0,
    )


@pytest.mark.parametrize(
    ("broker", "db_kind", "acks_late"),
    [
        pytest.param(*PG_REDIS.values, False, id="acks-early-redis-postgres", marks=PG_REDIS.marks),
        pytest.param(*PG_REDIS.values, True, id="acks-late-redis-postgres", marks=PG_REDIS.marks),
    ],
    indirect=["broker"],
)
@pytest.mark.timeout(300)
def test_a_plain_task_outlasting_the_visibility_timeout_is_tracked_once(
    cluster: Cluster, short_visibility: str, acks_late: bool
) -> None:
    """A `beat_schedule` task on tracking workers. Acknowledged early (Celery's default) its message is gone
    before it runs: never redelivered. Acknowledged late (`task_acks_late`), Redis delivers it again every
    visibility timeout while an execution lasts, and Celery runs it each time (a signal cannot stop a plain
    task, and a redelivery after a worker died is what acks_late is for): the run stays with its first
    execution, and each later one says so in one line."""
    entry = "plain-outlasts-visibility"
    settings = {
        "imports": ["celery_dbsched.tracking", "e2e_plain_tasks"],
        "beat_schedule": {entry: {"task": "e2e.plain_sleep", "schedule": 3600, "args": [JOB_SECONDS]}},
        "task_acks_late": acks_late,
    }
    workers = two_workers(cluster, [], settings)
    cluster.beat(settings=settings)  # an interval entry's first run is claimed at once
    run = cluster.wait_run(entry, lambda run: run.status == "completed", timeout=60)

    def executions(event: str) -> list[dict[str, Any]]:
        path = cluster.events_dir / f"plain-{run.id}.jsonl"
        found = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        return sorted((e for e in found if e["event"] == event), key=lambda e: e["time"])

    pattern = rf"run {run.id} of task"
    if acks_late:
        cluster.wait(lambda: len(executions("end")) >= 2, 60, "a second execution")
    else:
        time.sleep(VISIBILITY_TIMEOUT + 2)  # a redelivery would have started by now
    for worker in workers:  # warm: the executions in progress end first
        cluster.stop(worker)
    starts, ends = executions("start"), executions("end")
    said = [line for worker in workers for line in lines(worker, pattern)]
    ended = cluster.repo.lookup_run(run.id)
    # The run is the first execution's, whatever came after.
    first = starts[0]
    assert ended.status == "completed" and ended.task_id == first["task_id"], ended
    assert ended.worker == next(w.node for w in workers if w.name == first["process"])
    assert ended.end_time is not None and abs(ended.end_time.timestamp() - ends[0]["time"]) < 1.0
    assert [r.id for r in cluster.runs(entry)] == [run.id]
    if not acks_late:
        assert len(starts) == 1 and said == [], (starts, said)
    else:
        assert len(starts) >= 2 and all(e["redelivered"] for e in starts[1:]) and not first["redelivered"]
        assert {e["task_id"] for e in starts} == {first["task_id"]}
        # One line per later execution, none for its end.
        assert len(said) == len(starts) - 1, said
        for line in said:
            assert re.search(rf"run {run.id} is (running|completed), not dispatched", line), line
            assert "not tracked" in line and "redelivered" in line and "visibility_timeout" in line, line
    assert all(errors_in(worker) == [] for worker in workers), [errors_in(worker) for worker in workers]
    report(
        f"redis-visibility-timeout-plain-task-acks-{'late' if acks_late else 'early'}",
        executions=len(starts),
        tracked=1,
        untracked_lines=len(said),
        redelivered_after=starts[1]["time"] - first["time"] if len(starts) > 1 else 0.0,
    )
