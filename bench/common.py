"""What every measurement shares: the services, the publish counter, the beat loop, memory and timing helpers.

Every measured system publishes through Celery (`after_task_publish` is sent for every message, whatever the
scheduler), so one signal handler counts what each system sent, by schedule name, with the time it was sent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

INTERVAL = 60.0  # every schedule is an interval schedule of 60 s (issue 5)
MAX_INTERVAL = 5.0  # celery_dbsched's run-jobs interval, django-/sqlalchemy-celery-beat's max loop interval
IDLE_AHEAD = 3600.0  # idle state: each schedule's next due time is this far ahead, so nothing falls due
TASK = "bench.noop"


@dataclasses.dataclass
class Config:
    """Everything a measurement subprocess needs; passed as JSON on its command line."""

    pg_admin: str = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    mariadb_admin: str = "mysql+pymysql://root@127.0.0.1:3306/"  # the MariaDB server of the MariaDB columns
    db_prefix: str = "bench_"
    dbsched_url: str | None = None  # a given database (e.g. a test schema) instead of <prefix>dbsched
    redis_url: str = "redis://127.0.0.1:6379/9"
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672//"
    cap: float = 60.0  # seconds: the longest a peer's dispatch (or two-instance) run may take
    quick: bool = False  # fewer samples (the smoke test)
    # None: every system sleeps what it does in production with its defaults (README: "How each system is
    # configured"); a number: forced on every system (beat_max_loop_interval, dbsched_run_jobs_interval).
    max_interval: float | None = None
    out_dir: str = "."

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Config:
        return cls(**json.loads(text))

    def pg_url(self, name: str) -> str:
        """The URL of database `<prefix><name>` on the PostgreSQL server."""
        from sqlalchemy.engine import make_url

        return make_url(self.pg_admin).set(database=f"{self.db_prefix}{name}").render_as_string(hide_password=False)

    def mariadb_url(self, name: str) -> str:
        """The URL of database `<prefix><name>` on the MariaDB server."""
        from sqlalchemy.engine import make_url

        url = make_url(self.mariadb_admin).set(database=f"{self.db_prefix}{name}")
        return url.render_as_string(hide_password=False)

    @property
    def loop_bound(self) -> float:
        """A typical longest sleep, for spacing samples: the forced interval, else 5 s."""
        return self.max_interval or MAX_INTERVAL

    def samples(self, full: int, quick: int) -> int:
        return quick if self.quick else full


def ensure_database(cfg: Config, name: str, *, recreate: bool = False) -> str:
    """Create database `<prefix><name>` if missing (or drop and create it); returns its URL."""
    from sqlalchemy import create_engine, text

    db = f"{cfg.db_prefix}{name}"
    engine = create_engine(cfg.pg_admin, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            exists = conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :d"), {"d": db}).scalar()
            if exists and recreate:
                conn.execute(text(f'DROP DATABASE "{db}" WITH (FORCE)'))
                exists = False
            if not exists:
                conn.execute(text(f'CREATE DATABASE "{db}"'))
    finally:
        engine.dispose()
    return cfg.pg_url(name)


def drop_database(cfg: Config, name: str) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(cfg.pg_admin, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{cfg.db_prefix}{name}" WITH (FORCE)'))
    finally:
        engine.dispose()


def _mariadb_admin_engine(cfg: Config) -> Any:
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    url = make_url(cfg.mariadb_admin).set(database=None)
    return create_engine(url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})


def mariadb_unavailable(cfg: Config) -> str | None:
    """None when the MariaDB server answers, else why not (the MariaDB columns are then skipped)."""
    from sqlalchemy import text

    try:
        engine = _mariadb_admin_engine(cfg)
    except Exception as exc:
        return f"MariaDB not usable at {cfg.mariadb_admin} ({type(exc).__name__}: {exc})"
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return None
    except Exception as exc:
        return f"MariaDB not reachable at {cfg.mariadb_admin} ({type(exc).__name__}: {str(exc)[:200]})"
    finally:
        engine.dispose()


def ensure_mariadb_database(cfg: Config, name: str, *, recreate: bool = False) -> str:
    """Create database `<prefix><name>` on the MariaDB server if missing (or drop and create it), in utf8mb4 as
    tests/helpers/services.py does (celery_dbsched's tables set their own binary collation); returns its URL."""
    from sqlalchemy import text

    db = f"{cfg.db_prefix}{name}"
    engine = _mariadb_admin_engine(cfg)
    try:
        with engine.connect() as conn:
            if recreate:
                conn.execute(text(f"DROP DATABASE IF EXISTS `{db}`"))
            conn.execute(text(f"CREATE DATABASE IF NOT EXISTS `{db}` CHARACTER SET utf8mb4"))
    finally:
        engine.dispose()
    return cfg.mariadb_url(name)


def drop_mariadb_database(cfg: Config, name: str) -> None:
    from sqlalchemy import text

    engine = _mariadb_admin_engine(cfg)
    try:
        with engine.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS `{cfg.db_prefix}{name}`"))
    finally:
        engine.dispose()


def fresh_schema(url: str) -> None:
    """Drop whatever tables the database (or schema) at `url` has, so that a schema change on a branch needs
    no edit here, and migrate it to the package's head."""
    from sqlalchemy import MetaData

    from celery_dbsched.engine import make_engine
    from celery_dbsched.migrate import migrate

    engine = make_engine(url)
    try:
        existing = MetaData()
        existing.reflect(engine)
        existing.drop_all(engine)
        migrate(engine)
    finally:
        engine.dispose()


def template_columns(engine: Any, varied: tuple[str, ...]) -> tuple[str, str]:
    """The columns of `dbsched_job` but `varied` (and any generated column), for copying a template job N times
    with INSERT ... SELECT over a series: as a quoted list (`"a", "b"`; MariaDB: backquotes) and as picked from
    the template `t` (`t."a", t."b"`)."""
    from sqlalchemy import MetaData, Table

    job = Table("dbsched_job", MetaData(), autoload_with=engine)
    quote = engine.dialect.identifier_preparer.quote_identifier
    columns = [quote(c.name) for c in job.columns if c.name not in varied and c.computed is None]
    return ", ".join(columns), ", ".join(f"t.{c}" for c in columns)


# -- the publish counter ---------------------------------------------------------------------------------


class Sent:
    """Counts the messages Celery publishes in this process, by schedule key (the last positional argument:
    the job name for celery_dbsched, the entry name for the peers). Every 1,000 messages it empties the
    in-process `memory://` queues, so that the beat's RSS measures the beat, not a broker holding N messages."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.first: dict[Any, float] = {}
        self.total = 0
        self.schedules = 0  # distinct keys starting with "bench.e": the N schedules of a measure
        self.last_time = 0.0
        self.log: list[tuple[float, Any]] | None = None  # every (time, key) when asked for
        self.changed = threading.Condition(self.lock)

    def connect(self) -> Sent:
        from celery import signals

        signals.after_task_publish.connect(self._on_publish, weak=False)
        return self

    def _on_publish(self, sender: Any = None, body: Any = None, **kwargs: Any) -> None:
        now = time.perf_counter()
        args = body[0] if isinstance(body, (tuple, list)) and body and isinstance(body[0], (list, tuple)) else []
        key = args[-1] if args else None
        with self.lock:
            self.total += 1
            self.last_time = now
            if key not in self.first:
                self.first[key] = now
                if isinstance(key, str) and key.startswith("bench.e"):
                    self.schedules += 1
            if self.log is not None:
                self.log.append((now, key))
            if self.total % 1000 == 0:
                purge_memory_broker()
            self.changed.notify_all()

    @property
    def distinct(self) -> int:
        return len(self.first)

    def wait_for(self, key: Any, timeout: float) -> float | None:
        """The time `key` was first sent, waiting up to `timeout` seconds for it."""
        deadline = time.perf_counter() + timeout
        with self.lock:
            while key not in self.first:
                left = deadline - time.perf_counter()
                if left <= 0:
                    return None
                self.changed.wait(min(left, 0.05))
            return self.first[key]


def purge_memory_broker() -> None:
    try:
        from kombu.transport import memory
    except ImportError:
        return
    for queue in list(memory.Channel.queues.values()):
        with contextlib.suppress(Exception):
            queue.queue.clear()


# -- the beat loop ---------------------------------------------------------------------------------------


class BeatThread(threading.Thread):
    """Celery's `beat.Service.start` loop (tick; sleep what it returns; sync when due), in a thread that
    stops at once when asked (an Event instead of time.sleep, the only difference)."""

    def __init__(self, scheduler: Any) -> None:
        super().__init__(name="bench-beat", daemon=True)
        self.scheduler = scheduler
        self.stopped = threading.Event()
        self.error: BaseException | None = None
        self.ticks = 0

    def run(self) -> None:
        try:
            while not self.stopped.is_set():
                interval = self.scheduler.tick()
                self.ticks += 1
                if interval and interval > 0.0:
                    self.stopped.wait(interval)
                    if self.scheduler.should_sync():
                        self.scheduler._do_sync()
        except BaseException as exc:  # reported by the measurement
            self.error = exc

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=60)


def run_beat_until(scheduler: Any, done: Callable[[], bool], cap: float) -> tuple[float, bool, list[float]]:
    """Tick as `celery beat` does until `done()` or `cap` seconds; returns (elapsed, capped, tick times)."""
    ticks: list[float] = []
    start = time.perf_counter()
    deadline = start + cap
    while True:
        t0 = time.perf_counter()
        interval = scheduler.tick()
        ticks.append(time.perf_counter() - t0)
        if done():
            return time.perf_counter() - start, False, ticks
        now = time.perf_counter()
        if now >= deadline:
            return now - start, True, ticks
        if interval and interval > 0.0:
            time.sleep(min(interval, deadline - now))
            if scheduler.should_sync():
                scheduler._do_sync()


# -- numbers ----------------------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    """This process's peak resident set size so far: VmHWM, the high-water mark of this program's memory.
    Not ru_maxrss: Linux carries that over fork and exec, so a child started by a larger parent reports the
    parent's size."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100); with few samples p99 is the maximum."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(p / 100.0 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


@contextlib.contextmanager
def stopwatch() -> Iterator[list[float]]:
    box: list[float] = []
    start = time.perf_counter()
    try:
        yield box
    finally:
        box.append(time.perf_counter() - start)


def emit(result: dict[str, Any]) -> None:
    """A measurement subprocess's answer: one JSON line on stdout, marked so logs around it do not matter."""
    sys.stdout.write("BENCH-RESULT " + json.dumps(result, default=str) + "\n")
    sys.stdout.flush()


def log(message: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()
