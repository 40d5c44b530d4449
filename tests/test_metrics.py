"""Prometheus metrics (celery_dbsched.metrics): what a scrape shows, read as Prometheus reads it
(prometheus_client.parser). The real beat and prefork worker serving them: tests/test_metrics_processes.py."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import os
import re
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from celery.concurrency.prefork import TaskPool as PreforkPool
from celery.concurrency.thread import TaskPool as ThreadsPool
from helpers.apps import memory_app
from helpers.proxy import closed_port
from helpers.repository import claim_one, queued_run
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from celery_dbsched import JobContext, JobRepository, JobStatus, metrics
from celery_dbsched import worker as worker_module
from celery_dbsched.clock import TestClock
from celery_dbsched.errors import CannotStart
from celery_dbsched.job import FunctionJob
from celery_dbsched.metrics import (
    CLAIM_LAG_BUCKETS,
    OTHER,
    PROCESS,
    BeatMetrics,
    JobLabels,
    RunMetrics,
    metrics_app,
    observe_many,
)
from celery_dbsched.records import RunRecord
from celery_dbsched.runner import execute_run
from celery_dbsched.settings import PROMETHEUS_MULTIPROC_ENV, Settings
from celery_dbsched.states import RunState
from celery_dbsched.worker import DbschedWorkerStep

HOUR = dt.timedelta(hours=1)
T = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
MINUTE = dt.timedelta(minutes=1)


def parse(text: str) -> list[Sample]:
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def value(samples: Iterable[Sample], name: str, **labels: str) -> float | None:
    """The sample `name` whose labels include `labels` (None when there is none)."""
    for sample in samples:
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
            return float(sample.value)
    return None


def scrape_asgi(app: Any) -> tuple[int, str, str]:
    """GET /metrics through the ASGI app: status, content type, body."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/metrics", "query_string": b"", "headers": []}
    asyncio.run(app(scope, receive, send))
    headers = dict(sent[0]["headers"])
    return sent[0]["status"], headers[b"content-type"].decode(), b"".join(m.get("body", b"") for m in sent[1:]).decode()


def scrape(repository: JobRepository) -> list[Sample]:
    status, content_type, body = scrape_asgi(metrics_app(repository))
    assert status == 200
    assert content_type.startswith("text/plain; version=")  # the Prometheus text format
    return parse(body)


def function_job(name: str, body: Any) -> FunctionJob:
    return FunctionJob(body, name=name, description=name, every=HOUR, queue=None, interrupt_threshold=None)


def process_value(name: str, **labels: str) -> float:
    return PROCESS.get_sample_value(name, labels) or 0.0


# -- settings ---------------------------------------------------------------------------------------------------


def test_the_metrics_settings() -> None:
    assert Settings.from_mapping({}).metrics_port is None
    assert Settings.from_mapping({"dbsched_metrics_port": 0}).metrics_port is None
    settings = Settings.from_mapping({"dbsched_metrics_port": "9808", "dbsched_metrics_address": "127.0.0.1"})
    assert (settings.metrics_port, settings.metrics_address) == (9808, "127.0.0.1")
    assert Settings.from_mapping({}).metrics_address == "0.0.0.0"
    assert Settings.from_mapping({}).metrics_job_labels == 200
    assert Settings.from_mapping({"dbsched_metrics_job_labels": 3}).metrics_job_labels == 3
    for bad, error in (
        (70000, "at most 65535, got 70000"),
        (-1, "must not be negative, got -1"),
        ("http", "expected a whole number, got 'http'"),
        (1.5, "expected a whole number, got 1.5"),
        (True, "expected a whole number, got True"),
    ):
        with pytest.raises(ValueError) as raised:
            Settings.from_mapping({"dbsched_metrics_port": bad})
        assert str(raised.value) == f"dbsched_metrics_port: {error}"
    with pytest.raises(ValueError, match=r"^dbsched_metrics_address: expected a host name or IP address"):
        Settings.from_mapping({"dbsched_metrics_address": ""})
    with pytest.raises(ValueError, match="did you mean dbsched_metrics_port"):
        Settings.from_mapping({"dbsched_metric_port": 9808})


# -- labels -----------------------------------------------------------------------------------------------------


def test_job_labels_are_capped_the_same_way_in_every_process() -> None:
    """The first `limit` names in name order keep their own label (whatever order runs come in); the others,
    and names the registry does not know, share `other`."""
    labels = JobLabels(lambda: ["c", "a", "b", "a"], limit=2)
    assert [labels(name) for name in ("c", "b", "a", "unknown")] == [OTHER, "b", "a", OTHER]
    assert JobLabels(lambda: ["x"], limit=5)("x") == "x"


# -- counted in the process ---------------------------------------------------------------------------------------


def test_a_worker_counts_runs_by_job_and_outcome_with_their_durations(repository: JobRepository) -> None:
    def ok(ctx: JobContext) -> None:
        ctx.progress(1, 1)

    def boom(ctx: JobContext) -> None:
        raise RuntimeError("boom")

    jobs = {name: function_job(name, body) for name, body in (("metrics.ok", ok), ("metrics.boom", boom))}
    observer = RunMetrics(JobLabels(lambda: ["metrics.ok"], limit=1))  # metrics.boom is beyond the cap
    before = {
        "started_ok": process_value("dbsched_runs_started_total", job="metrics.ok"),
        "started_other": process_value("dbsched_runs_started_total", job=OTHER),
        "completed": process_value("dbsched_runs_ended_total", job="metrics.ok", outcome="completed"),
        "failed": process_value("dbsched_runs_ended_total", job=OTHER, outcome="failed"),
        "durations": process_value("dbsched_run_duration_seconds_count", job="metrics.ok"),
    }
    for name in jobs:
        repository.upsert_job(name, "a job", every=HOUR)
        run = claim_one(repository, name)
        execute_run(repository, jobs.get, run.id, "worker-1", monitor_interval=0.05, observer=observer)
    assert process_value("dbsched_runs_started_total", job="metrics.ok") == before["started_ok"] + 1
    assert process_value("dbsched_runs_started_total", job=OTHER) == before["started_other"] + 1
    assert process_value("dbsched_runs_ended_total", job="metrics.ok", outcome="completed") == before["completed"] + 1
    assert process_value("dbsched_runs_ended_total", job=OTHER, outcome="failed") == before["failed"] + 1
    assert process_value("dbsched_run_duration_seconds_count", job="metrics.ok") == before["durations"] + 1
    assert PROCESS.get_sample_value("dbsched_runs_started_total", {"job": "metrics.boom"}) is None


def _run(run_id: int, slot: dt.datetime, claimed: dt.datetime) -> RunRecord:
    return queued_run(run_id, f"job-{run_id}", slot, claimed)


BEAT = "beat-under-test"


def test_a_beat_counts_each_batch_it_publishes_and_the_claim_lag() -> None:
    sent = process_value("dbsched_runs_sent_total", beat=BEAT)
    unpublished = process_value("dbsched_runs_unpublished_total", beat=BEAT)
    lag_count = process_value("dbsched_claim_lag_seconds_count", beat=BEAT)
    lag_sum = process_value("dbsched_claim_lag_seconds_sum", beat=BEAT)
    late_bucket = process_value("dbsched_claim_lag_seconds_bucket", beat=BEAT, le="2.5")
    slot = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    beat = BeatMetrics(BEAT)
    batch = [_run(1, slot, slot + dt.timedelta(seconds=2)), _run(2, slot, slot + dt.timedelta(seconds=40))]
    beat.published(batch, 1, 1)  # one sent, one not (the broker failed)
    beat.ticked()
    assert process_value("dbsched_runs_sent_total", beat=BEAT) == sent + 1
    assert process_value("dbsched_runs_unpublished_total", beat=BEAT) == unpublished + 1
    assert process_value("dbsched_claim_lag_seconds_count", beat=BEAT) == lag_count + 2
    assert process_value("dbsched_claim_lag_seconds_sum", beat=BEAT) == pytest.approx(lag_sum + 42)
    assert process_value("dbsched_claim_lag_seconds_bucket", beat=BEAT, le="2.5") == late_bucket + 1
    last_tick = process_value("dbsched_beat_last_tick_timestamp_seconds", beat=BEAT)
    assert abs(last_tick - dt.datetime.now(dt.timezone.utc).timestamp()) < 60


def test_observing_a_batch_at_once_is_observing_each_amount() -> None:
    amounts = [0.0, 0.01, 0.011, 0.3, 2.5, 2.5000001, 59.0, 299.0, 301.0, 1e9]

    def histogram_after(observe: Callable[[Histogram], None]) -> list[tuple[str, dict[str, str], float]]:
        registry = CollectorRegistry()
        observe(Histogram("lag", "lag", buckets=CLAIM_LAG_BUCKETS, registry=registry))
        samples = [sample for family in registry.collect() for sample in family.samples]
        return [(s.name, s.labels, s.value) for s in samples if not s.name.endswith("_created")]

    def each(histogram: Histogram) -> None:
        for amount in amounts:
            histogram.observe(amount)

    expected = histogram_after(each)
    assert histogram_after(lambda histogram: observe_many(histogram, amounts)) == expected
    assert ("lag_count", {}, len(amounts)) in expected
    assert histogram_after(lambda histogram: observe_many(histogram, [])) == histogram_after(lambda histogram: None)


# -- read from the database at the scrape -------------------------------------------------------------------------


def test_a_scrape_shows_what_the_database_says(repository: JobRepository, clock: TestClock) -> None:
    repository.upsert_job("metrics.due", "a job", every=HOUR)
    repository.upsert_job("metrics.later", "a job", every=HOUR, first_run_in=HOUR)
    repository.upsert_job("metrics.paused", "a job", every=HOUR)
    repository.set_paused("metrics.paused", True)
    clock.advance(2 * MINUTE)
    samples = scrape(repository)
    assert value(samples, "dbsched_database_up") == 1
    assert value(samples, "dbsched_jobs_due_unclaimed") == 1  # not the later one, nor the paused one
    assert value(samples, "dbsched_jobs_due_oldest_lateness_seconds") == pytest.approx(120, abs=10)
    assert value(samples, "dbsched_runs_active", status="queued") == 0
    assert value(samples, "dbsched_runs_stalled") == 0

    run = claim_one(repository, "metrics.due")
    samples = scrape(repository)
    assert value(samples, "dbsched_jobs_due_unclaimed") == 0
    assert value(samples, "dbsched_jobs_due_oldest_lateness_seconds") == 0
    assert value(samples, "dbsched_runs_active", status="queued") == 1

    repository.start_run(run.id, "worker-1@host")
    repository.heartbeat("worker-1@host", "worker", "host", 123)
    samples = scrape(repository)
    assert value(samples, "dbsched_runs_active", status="queued") == 0
    assert value(samples, "dbsched_runs_active", status="running") == 1
    seen = value(samples, "dbsched_server_last_seen_timestamp_seconds", server="worker-1@host", kind="worker")
    assert seen is not None and abs(seen - repository.database_now().timestamp()) < 60

    clock.advance(repository.interrupt_threshold + MINUTE)  # no progress since: the next monitor step ends it
    assert value(scrape(repository), "dbsched_runs_stalled") == 1
    repository.update_progress(run.id, 1, 2)
    assert value(scrape(repository), "dbsched_runs_stalled") == 0
    assert repository.lookup_run(run.id).progress == JobStatus(1, 2)


def test_the_web_apps_scrape_has_only_the_database_figures_outside_multiprocess_mode(
    repository: JobRepository,
) -> None:
    """The web process runs no job: counters at zero there would read as 'nothing happens'."""
    names = {sample.name for sample in scrape(repository)}
    assert "dbsched_runs_active" in names
    assert not {name for name in names if name.startswith(("dbsched_runs_sent", "dbsched_claim_lag"))}


def test_a_database_that_does_not_answer_is_database_up_0_not_a_failed_scrape(tmp_path: Path) -> None:
    repository = JobRepository(f"sqlite:///{tmp_path / 'missing' / 'db.sqlite3'}")
    samples = scrape(repository)
    assert value(samples, "dbsched_database_up") == 0
    assert value(samples, "dbsched_runs_active", status="running") is None


# -- the exporter of a beat ---------------------------------------------------------------------------------------


def test_a_beat_serves_its_figures_and_the_databases_on_its_port(make_scheduler: Any, tmp_path: Path) -> None:
    port = closed_port()
    scheduler = make_scheduler(
        f"sqlite:///{tmp_path / 'db.sqlite3'}", dbsched_metrics_port=port, dbsched_metrics_address="127.0.0.1"
    )
    scheduler.tick()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        samples = parse(response.read().decode())
    assert value(samples, "dbsched_database_up") == 1
    tick = value(samples, "dbsched_beat_last_tick_timestamp_seconds", beat=scheduler.server_id)
    assert tick is not None and abs(tick - dt.datetime.now(dt.timezone.utc).timestamp()) < 60
    assert value(samples, "dbsched_runs_sent_total", beat=scheduler.server_id) == 0  # nothing was due
    assert value(samples, "dbsched_jobs_due_unclaimed") == 0


def test_a_beat_whose_metrics_port_is_taken_cannot_start(make_scheduler: Any, tmp_path: Path) -> None:
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(CannotStart) as raised:
            make_scheduler(
                f"sqlite:///{tmp_path / 'db.sqlite3'}", dbsched_metrics_port=port, dbsched_metrics_address="127.0.0.1"
            )
    assert str(raised.value) == (
        f"celery_dbsched: the beat cannot start: dbsched_metrics_port: cannot serve metrics on 127.0.0.1:{port} "
        "(Address already in use); choose a free port (each beat and worker on a host needs its own), or 0 to turn "
        "the exporter off"
    )


# -- the exporter of a worker ----------------------------------------------------------------------------------


def test_a_prefork_worker_refuses_to_start_when_prometheus_client_is_already_in_single_process_mode(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Here prometheus-client was imported without PROMETHEUS_MULTIPROC_DIR (this test process), as when an app
    imports it itself: a prefork worker's children would count runs nobody serves, so it says so and stops; a
    threads worker counts in its one process."""
    monkeypatch.setattr(metrics, "_worker_serves", False)
    monkeypatch.delenv(PROMETHEUS_MULTIPROC_ENV, raising=False)
    app = memory_app(f"sqlite:///{tmp_path / 'db.sqlite3'}", dbsched_metrics_port=closed_port())
    with pytest.raises(CannotStart) as raised:
        DbschedWorkerStep(SimpleNamespace(app=app, hostname="w", pool_cls=PreforkPool))
    assert str(raised.value) == (
        "celery_dbsched: the worker cannot start: dbsched_metrics_port: prometheus_client was imported before the "
        "worker started, without PROMETHEUS_MULTIPROC_DIR: the runs of the prefork pool's children would not be "
        "counted; set PROMETHEUS_MULTIPROC_DIR to an empty directory in the worker's environment"
    )
    assert PROMETHEUS_MULTIPROC_ENV not in os.environ  # too late to set it: nothing left behind

    DbschedWorkerStep(SimpleNamespace(app=app, hostname="w", pool_cls=ThreadsPool))
    assert isinstance(worker_module._observers.get(app), RunMetrics)
    assert metrics.served_by_worker()  # a beat embedded in it (-B) starts no exporter of its own


# -- the example dashboard --------------------------------------------------------------------------------------


def test_the_grafana_dashboard_uses_the_names_a_scrape_shows(repository: JobRepository) -> None:
    """Every series docs/grafana-dashboard.json queries is one that the beat's or the web page's scrape shows."""
    dashboard = json.loads((Path(__file__).parent.parent / "docs" / "grafana-dashboard.json").read_text())
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"dbsched_[a-z_]+", target["expr"])
    }
    repository.heartbeat("worker-1@host", "worker", "host", 1)
    BeatMetrics("dashboard-beat").published([_run(1, T, T)], 1, 0)
    worker = RunMetrics(JobLabels(lambda: ["j"], 1))
    worker.started(_run(2, T, T))
    worker.ended(dataclasses.replace(_run(2, T, T), status=RunState.COMPLETED, start_time=T, end_time=T + MINUTE))
    shown = {sample.name for sample in scrape(repository)} | {
        sample.name for family in PROCESS.collect() for sample in family.samples
    }
    assert queried <= shown, queried - shown
    assert len(queried) >= 12
