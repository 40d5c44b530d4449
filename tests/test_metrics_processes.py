"""Prometheus metrics served by a real beat and a real prefork worker (`dbsched_metrics_port`) on PostgreSQL,
scraped over HTTP and read with prometheus_client's parser, as Prometheus reads them."""

from __future__ import annotations

import datetime as dt
import re
import urllib.request
from pathlib import Path

import pytest
from helpers.cluster import PG_FS, Cluster, on, quick
from helpers.proxy import closed_port
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

pytestmark = pytest.mark.e2e


def scrape(port: int) -> list[Sample]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def total(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum of the samples `name` whose labels include `labels`."""
    return sum(
        float(s.value) for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def metrics(port: int, **more: object) -> dict[str, object]:
    return {"dbsched_metrics_port": port, "dbsched_metrics_address": "127.0.0.1", **more}


@on(PG_FS)
def test_a_beat_and_a_prefork_worker_serve_what_happens(cluster: Cluster) -> None:
    """The worker's counts add up the runs of both pool children (multiprocess mode in a private directory,
    removed at exit); job labels beyond the cap are `other`; the beat counts what it sent and serves the
    database's figures."""
    worker_port, beat_port = closed_port(), closed_port()
    jobs = [quick("e2e.a", 0.5, steps=2, step=0.2), quick("e2e.b", 0.5, steps=2, step=0.2)]
    worker = cluster.worker(
        jobs, pool="prefork", concurrency=2, settings=metrics(worker_port, dbsched_metrics_job_labels=1)
    )
    worker.wait_ready()
    beat = cluster.beat(settings=metrics(beat_port))

    def ran_in_both_children() -> bool:
        done = [run for run in cluster.runs() if run.status == "completed"]
        pids = {event["pid"] for run in done for event in cluster.events(run.id)}
        return len(done) >= 6 and len(pids) >= 2

    cluster.wait(ran_in_both_children, 90, "completed runs in both pool children")
    samples = scrape(beat_port)
    assert total(samples, "dbsched_database_up") == 1
    assert total(samples, "dbsched_runs_sent_total") >= 6
    assert total(samples, "dbsched_claim_lag_seconds_count") == total(samples, "dbsched_runs_sent_total")
    beat_id = re.escape(f":{beat.pid}")
    ticks = [s for s in samples if s.name == "dbsched_beat_last_tick_timestamp_seconds"]
    assert len(ticks) == 1 and re.search(beat_id + "$", ticks[0].labels["beat"]), ticks
    assert abs(ticks[0].value - dt.datetime.now(dt.timezone.utc).timestamp()) < 30
    assert {s.labels["status"] for s in samples if s.name == "dbsched_runs_active"} == {"queued", "running"}
    assert any(s.name == "dbsched_jobs_due_unclaimed" for s in samples)

    # Quiet: no run left in flight, so the worker's counts can be held against the database's history.
    assert cluster.stop(beat) == 0
    cluster.wait(lambda: all(run.status == "completed" for run in cluster.runs()), 60, "the last runs to end")
    completed = len(cluster.runs())
    samples = scrape(worker_port)
    assert total(samples, "dbsched_runs_started_total") == completed
    assert total(samples, "dbsched_runs_ended_total", outcome="completed") == completed
    assert total(samples, "dbsched_run_duration_seconds_count") == completed
    # The cap is 1: e2e.a (first in name order) keeps its label in both children, e2e.b is `other`.
    assert {s.labels["job"] for s in samples if s.name == "dbsched_runs_ended_total"} == {"e2e.a", "other"}
    assert total(samples, "dbsched_runs_ended_total", job="e2e.a") == len(cluster.runs("e2e.a"))
    assert not any(s.name == "dbsched_database_up" for s in samples)  # a worker serves its own figures only

    found = re.search(r"metrics on http://127\.0\.0\.1:\d+/metrics \(multiprocess: (\S+)\)", worker.log())
    assert found, worker.log_tail()
    private_dir = Path(found.group(1))
    assert private_dir.is_dir()
    assert cluster.stop(worker) == 0
    assert not private_dir.exists()


@on(PG_FS)
def test_a_worker_with_an_embedded_beat_serves_both_on_its_one_port(cluster: Cluster) -> None:
    port = closed_port()
    worker = cluster.worker([quick("e2e.a", 0.5)], settings=metrics(port), embedded_beat="celery_dbsched.Scheduler")
    cluster.wait_runs("e2e.a", 3, lambda run: run.status == "completed")
    samples = scrape(port)
    assert total(samples, "dbsched_runs_sent_total") >= 3  # counted by the beat process, served by the worker
    assert total(samples, "dbsched_runs_ended_total", job="e2e.a", outcome="completed") >= 3
    assert "cannot start" not in worker.log()
