"""Prometheus metrics (the extra `metrics`: prometheus-client). Importing this module needs prometheus-client.

Two kinds of figures, under the names in the README's "Metrics" section:

- **Counted where they happen**, in the process: a beat counts the runs it sent and observes their claim lag
  (claimed at minus slot) once per published batch, and sets its last tick time (`BeatMetrics`); a worker
  counts the runs it started and ended, by job and outcome, and observes their durations (`RunMetrics`, called
  by `runner.execute_run`). Job names are labels for at most `dbsched_metrics_job_labels` jobs (the first in
  name order of the worker's registry, the same in every process of a worker); the rest share `other`. A run
  id is never a label.
- **Read from the database at scrape time** (`DatabaseCollector`): runs in flight by status, stalled runs,
  jobs due and not claimed and how late the earliest is, the servers' last heartbeats. What `dbsched status`
  reads (`celery_dbsched.observe`: bounded, indexed queries); a database that does not answer is
  `dbsched_database_up 0`, not a failed scrape.

Where they are served: `dbsched_metrics_port` starts an HTTP exporter in a beat (its figures and the
database's) or a worker (its figures only: a fleet of workers need not query the database at each scrape);
`metrics_app(repository)` is the ASGI app the web page mounts at /metrics (the database's figures, and those
of PROMETHEUS_MULTIPROC_DIR when it is set).

Prefork: a worker's runs happen in its pool's children, and its exporter runs in the main process. With the
exporter on, a worker always runs prometheus-client in multiprocess mode: PROMETHEUS_MULTIPROC_DIR if set,
else a private directory the worker makes before prometheus-client is imported and removes at exit
(`worker.prepare_metrics_dir`).
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess, values
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, start_http_server
from prometheus_client.registry import Collector

from . import observe
from .errors import DbschedError
from .records import RunRecord
from .repository import JobRepository
from .settings import PROMETHEUS_MULTIPROC_ENV, Settings

logger = logging.getLogger(__name__)

OTHER = "other"  # the job label of the jobs beyond dbsched_metrics_job_labels

# Seconds. Claim lag: a beat claims within its run-jobs interval (5 s by default) when it keeps up.
CLAIM_LAG_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
DURATION_BUCKETS = (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0)

# The figures counted in this process (served directly, or through PROMETHEUS_MULTIPROC_DIR's files).
PROCESS = CollectorRegistry(auto_describe=True)
RUNS_STARTED = Counter("dbsched_runs_started", "Runs a worker started, by job.", ["job"], registry=PROCESS)
RUNS_ENDED = Counter(
    "dbsched_runs_ended",
    "Runs a worker ended, by job and outcome (completed, failed, interrupted).",
    ["job", "outcome"],
    registry=PROCESS,
)
RUN_DURATION = Histogram(
    "dbsched_run_duration_seconds",
    "Run durations on the workers (start to end, database clock), by job.",
    ["job"],
    buckets=DURATION_BUCKETS,
    registry=PROCESS,
)
# The beat's figures are labelled by beat (its server id): besides telling beats apart, a labelled metric opens
# no multiprocess file until used, so a worker that imports this module opens none before its pool and an
# embedded beat fork (a child that inherits such a file cannot close it: billiard closed its descriptor).
RUNS_SENT = Counter("dbsched_runs_sent", "Run messages (and plain tasks) a beat published.", ["beat"], registry=PROCESS)
RUNS_UNPUBLISHED = Counter(
    "dbsched_runs_unpublished", "Claimed runs a beat could not publish (ended failed).", ["beat"], registry=PROCESS
)
CLAIM_LAG = Histogram(
    "dbsched_claim_lag_seconds",
    "How late a beat claimed runs: claimed at minus the slot they were claimed for.",
    ["beat"],
    buckets=CLAIM_LAG_BUCKETS,
    registry=PROCESS,
)
BEAT_LAST_TICK = Gauge(
    "dbsched_beat_last_tick_timestamp_seconds",
    "When a beat last ticked (Unix time).",
    ["beat"],
    multiprocess_mode="mostrecent",
    registry=PROCESS,
)


_worker_serves = False  # this process is (or was forked from) a worker whose exporter serves its figures


def worker_serves() -> None:
    """Called by a worker that starts an exporter, before its pool and embedded beat (`-B`) fork: a beat
    embedded in it counts into the same multiprocess directory, served by the worker's exporter, and starts
    no exporter of its own (it would take the same port)."""
    global _worker_serves
    _worker_serves = True


def served_by_worker() -> bool:
    return _worker_serves


def multiprocess_mode() -> bool:
    """prometheus-client chose multiprocess mode when it was imported (PROMETHEUS_MULTIPROC_DIR was set)."""
    return values.ValueClass is not values.MutexValue


class JobLabels:
    """The job label of a job name: the name itself for the first `limit` names of `names()` (in name order,
    so that every process of a worker picks the same), else `other`. `names` is read at the first call in
    each process."""

    def __init__(self, names: Callable[[], Iterable[str]], limit: int) -> None:
        self._names = names
        self._limit = limit
        self._allowed: frozenset[str] | None = None
        self._pid = -1
        self._lock = threading.Lock()

    def __call__(self, name: str) -> str:
        allowed = self._allowed
        if allowed is None or self._pid != os.getpid():
            with self._lock:
                allowed = self._allowed = frozenset(sorted(set(self._names()))[: self._limit])
                self._pid = os.getpid()
        return name if name in allowed else OTHER


class RunMetrics:
    """A worker's counts: `runner.execute_run` calls `started` and `ended` with each run's record."""

    def __init__(self, labels: JobLabels) -> None:
        self.labels = labels

    def started(self, run: RunRecord) -> None:
        RUNS_STARTED.labels(self.labels(run.job_name)).inc()

    def ended(self, run: RunRecord) -> None:
        job = self.labels(run.job_name)
        RUNS_ENDED.labels(job, str(run.status)).inc()
        if run.start_time is not None and run.end_time is not None:
            RUN_DURATION.labels(job).observe(max((run.end_time - run.start_time).total_seconds(), 0.0))


class BeatMetrics:
    """A beat's counts: its ticks, and per published batch the runs sent and their claim lag."""

    def __init__(self, server_id: str) -> None:
        self._tick = BEAT_LAST_TICK.labels(server_id)
        self._sent = RUNS_SENT.labels(server_id)
        self._unpublished = RUNS_UNPUBLISHED.labels(server_id)
        self._lag = CLAIM_LAG.labels(server_id)

    def ticked(self) -> None:
        self._tick.set(time.time())

    def published(self, runs: Sequence[RunRecord], sent: int, unpublished: int) -> None:
        """A claimed batch: `sent` of its runs published, `unpublished` not (the broker failed)."""
        if unpublished:
            self._unpublished.inc(unpublished)
        if sent:
            self._sent.inc(sent)
        observe_many(
            self._lag,
            [max((r.create_time - r.scheduled_for).total_seconds(), 0.0) for r in runs if r.scheduled_for is not None],
        )


def observe_many(histogram: Histogram, amounts: Sequence[float]) -> None:
    """`histogram.observe(amount)` for each amount, written once per bucket and once for the sum rather than
    twice per amount (a beat observes a batch of up to 2,000 claim lags; in multiprocess mode each write is a
    locked write to a memory-mapped file). Through the histogram's buckets and sum as `observe` updates them
    (prometheus-client's layout since 0.4); `observe` one by one where they are not there."""
    bounds: Sequence[float] | None = getattr(histogram, "_upper_bounds", None)
    buckets: Sequence[Any] | None = getattr(histogram, "_buckets", None)
    total: Any = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for amount in amounts:
            histogram.observe(amount)
        return
    counts = [0] * len(bounds)
    for amount in amounts:
        counts[bisect.bisect_left(bounds, amount)] += 1  # the first bound >= amount; the last is +Inf
    if amounts:
        total.inc(sum(amounts))
    for bucket, count in zip(buckets, counts, strict=True):
        if count:
            bucket.inc(count)


class DatabaseCollector(Collector):
    """The database's figures, read at each scrape through the read model of `dbsched status` (`observe`)."""

    def __init__(self, repository: JobRepository) -> None:
        self.repository = repository
        self._failing = False

    def describe(self) -> Iterable[Metric]:
        return []  # registering it must not query the database

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("dbsched_database_up", "1 when the scrape could read the scheduler's database.")
        try:
            active = observe.active_by_status(self.repository)
            stalled = observe.stalled_runs(self.repository, limit=0)
            due = observe.due_backlog(self.repository)
            fleet = observe.fleet(self.repository)
        except DbschedError as exc:
            if not self._failing:
                logger.warning("celery_dbsched metrics: the database figures are left out: %s", exc)
            self._failing = True
            up.add_metric([], 0)
            yield up
            return
        self._failing = False
        up.add_metric([], 1)
        yield up
        by_status = GaugeMetricFamily(
            "dbsched_runs_active", "Runs queued or running now, by status.", labels=["status"]
        )
        for status, count in active.items():
            by_status.add_metric([status], count)
        yield by_status
        yield GaugeMetricFamily(
            "dbsched_runs_stalled",
            "Active runs without progress (or not started) within their interrupt threshold: the next monitor "
            f"step of a beat ends them (counted up to {observe.COUNT_CAP}).",
            value=stalled.count,
        )
        yield GaugeMetricFamily(
            "dbsched_jobs_due_unclaimed",
            f"Jobs whose next run has come and that no beat has claimed yet (counted up to {observe.COUNT_CAP}).",
            value=due.count,
        )
        yield GaugeMetricFamily(
            "dbsched_jobs_due_oldest_lateness_seconds",
            "How late the earliest due, unclaimed job is (0 when none is).",
            value=due.lateness,
        )
        seen = GaugeMetricFamily(
            "dbsched_server_last_seen_timestamp_seconds",
            "When each beat or worker last wrote its heartbeat (Unix time).",
            labels=["server", "kind"],
        )
        for server in fleet.servers:
            seen.add_metric([server.id, server.role], server.last_seen.timestamp())
        yield seen


class _Forward(Collector):
    """Serves another registry's metrics from a registry of its own."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        return iter(self.registry.collect())


def exporter_registry(repository: JobRepository | None, *, process: bool = True) -> CollectorRegistry:
    """What an exporter serves: this process's figures (with `process`; in multiprocess mode those of every
    process writing to PROMETHEUS_MULTIPROC_DIR), and the database's when given a repository."""
    registry = CollectorRegistry(auto_describe=False)
    if multiprocess_mode():
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    elif process:
        registry.register(_Forward(PROCESS))
    if repository is not None:
        registry.register(DatabaseCollector(repository))
    return registry


def serve(settings: Settings, repository: JobRepository | None) -> Any:
    """Start the HTTP exporter of `dbsched_metrics_port` (a daemon thread); returns its server (`shutdown()`).
    ValueError, naming the setting, when the port cannot be bound."""
    assert settings.metrics_port is not None
    registry = exporter_registry(repository)
    try:
        server, _ = start_http_server(settings.metrics_port, settings.metrics_address, registry)
    except OSError as exc:
        raise ValueError(
            f"dbsched_metrics_port: cannot serve metrics on {settings.metrics_address}:{settings.metrics_port} "
            f"({exc.strerror or exc}); choose a free port (each beat and worker on a host needs its own), or 0 "
            "to turn the exporter off"
        ) from None
    logger.info(
        "celery_dbsched: metrics on http://%s:%d/metrics%s",
        settings.metrics_address,
        settings.metrics_port,
        f" (multiprocess: {os.environ.get(PROMETHEUS_MULTIPROC_ENV)})" if multiprocess_mode() else "",
    )
    return server


ASGIApp = Callable[
    [MutableMapping[str, Any], Callable[[], Awaitable[Any]], Callable[[MutableMapping[str, Any]], Awaitable[None]]],
    Awaitable[None],
]


def metrics_app(repository: JobRepository) -> ASGIApp:
    """The ASGI app of /metrics on the web page: the database's figures (and, when PROMETHEUS_MULTIPROC_DIR is
    set, the figures of the processes writing there). The scrape's queries run on a thread, not on the event
    loop."""
    registry = exporter_registry(repository, process=False)

    async def app(
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[Any]],
        send: Callable[[MutableMapping[str, Any]], Awaitable[None]],
    ) -> None:
        if scope["type"] != "http":
            return
        body = await asyncio.to_thread(generate_latest, registry)
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", CONTENT_TYPE_LATEST.encode())]}
        )
        await send({"type": "http.response.body", "body": body})

    return app
