"""What the beat's metrics add to a published batch (issue 12 §4): `BeatMetrics.published` on a full claim
batch (2,000 runs), against publishing the same batch's run messages (`RunPublisher.publish` on an in-memory
broker: the cheapest transport, so the share shown is an upper bound), in prometheus-client's single-process
and multiprocess modes (each in a fresh interpreter: the mode is chosen at import).

    python -m bench.metrics_overhead            # prints one line per mode
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import subprocess
import sys
import tempfile
import time

BATCH = 2000
ROUNDS = 20


def measure() -> str:
    from celery import Celery

    from celery_dbsched.metrics import BeatMetrics, multiprocess_mode
    from celery_dbsched.publisher import RunPublisher
    from celery_dbsched.records import RunRecord
    from celery_dbsched.states import RunState

    slot = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    # A claimed run: the fields a claim sets, every other one None.
    claimed = {"status": RunState.QUEUED, "claimed_by": "beat", "completed": 0, "total": 0, "update_time": slot}
    base = RunRecord(**{**dict.fromkeys(RunRecord.__dataclass_fields__), **claimed, "scheduled_for": slot})
    runs = [
        dataclasses.replace(base, id=i, job_name=f"job-{i}", create_time=slot + dt.timedelta(milliseconds=i % 900))
        for i in range(BATCH)
    ]
    beat = BeatMetrics("bench-beat")
    best_metrics = min(_timed(lambda: beat.published(runs, BATCH, 0)) for _ in range(ROUNDS))

    app = Celery("bench", broker="memory://", set_as_current=False)
    publisher = RunPublisher(app)
    with app.producer_or_acquire() as producer:

        def publish() -> None:
            publisher.new_batch()
            for run in runs:
                publisher.publish(producer, run.id, run.job_name, None)

        best_publish = min(_timed(publish) for _ in range(5))
    mode = "multiprocess" if multiprocess_mode() else "single-process"
    per_run = best_metrics / BATCH * 1e6
    return (
        f"{mode}: metrics {best_metrics * 1e3:.2f} ms per batch of {BATCH} ({per_run:.2f} us a run); "
        f"publishing the batch {best_publish * 1e3:.1f} ms; metrics add {best_metrics / best_publish:.1%}"
    )


def _timed(action: object) -> float:
    start = time.perf_counter()
    action()  # type: ignore[operator]
    return time.perf_counter() - start


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(measure())
        return
    env = {k: v for k, v in os.environ.items() if k.upper() != "PROMETHEUS_MULTIPROC_DIR"}
    subprocess.run([sys.executable, "-m", "bench.metrics_overhead", "--child"], env=env, check=True)
    with tempfile.TemporaryDirectory() as folder:
        env["PROMETHEUS_MULTIPROC_DIR"] = folder
        subprocess.run([sys.executable, "-m", "bench.metrics_overhead", "--child"], env=env, check=True)


if __name__ == "__main__":
    main()
