"""Issue 13 §1 with real processes: a change to a runtime schedule reaches a running beat at once on
PostgreSQL (NOTIFY), without a restart, though the beat sleeps up to its (long) run-jobs interval."""

from __future__ import annotations

import datetime as dt
import time

from helpers.cluster import PG_FS, Cluster, on
from helpers.polling import wait_for

from celery_dbsched import add_schedule, update_schedule

INTERVAL = 60.0  # the beat's run-jobs interval: without a wake-up it would see a change this late


@on(PG_FS)
def test_a_change_wakes_a_running_beat_at_once(cluster: Cluster) -> None:
    settings = {"dbsched_run_jobs_interval": INTERVAL}
    beat = cluster.beat(settings=settings)
    app = cluster.app()
    app.conf.dbsched_run_jobs_interval = INTERVAL  # changes due within it wake the beats (NOTIFY)
    wait_for(
        lambda: any(row.kind == "beat" for row in cluster.repo.server_rows(10)[0]),
        60,
        message="the beat's heartbeat row",
    )
    beat.wait_for_log("beat: Starting", 60)
    # Added while the beat sleeps (not due for a year: no wake-up), then edited to run once, now.
    add_schedule(app, "rt.later", task="e2e.never_sent", schedule="0 0 1 1 *")
    began = time.monotonic()
    update_schedule(app, "rt.later", schedule=dt.datetime.now(dt.timezone.utc))
    run = cluster.wait_run("rt.later", lambda r: r.status in ("queued", "dispatched"), timeout=INTERVAL / 2)
    woke = time.monotonic() - began
    print(f"\nbeat claimed the edited runtime schedule {woke:.2f} s after the edit (run-jobs interval {INTERVAL} s)")
    assert woke < 5, woke
    assert run.job_name == "rt.later"
    # A new schedule wakes it too.
    began = time.monotonic()
    add_schedule(app, "rt.new", task="e2e.never_sent", schedule=60)
    cluster.wait_run("rt.new", lambda r: r.status in ("queued", "dispatched"), timeout=INTERVAL / 2)
    assert time.monotonic() - began < 5
    cluster.processes.check_alive(beat)
