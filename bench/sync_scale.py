"""By hand, not in CI: what a `beat_schedule` of N entries costs a beat start, on PostgreSQL or SQLite.

    python bench/sync_scale.py sync postgres 100000      # sync from empty, restart unchanged, 1 entry changed
    python bench/sync_scale.py dispatch sqlite 200000    # a beat start, then every entry sent by its tick loop

Each run uses a fresh schema (PostgreSQL, DBSCHED_TEST_POSTGRES_URL or the local default) or a fresh file.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import uuid
from typing import Any
from urllib.parse import quote

from celery import Celery
from kombu import Connection
from sqlalchemy import create_engine, event, text

from celery_dbsched.beat_schedule import sync_beat_schedule
from celery_dbsched.binding import forget_repository
from celery_dbsched.migrate import migrate
from celery_dbsched.repository import JobRepository
from celery_dbsched.scheduler import Scheduler

POSTGRES_URL = os.environ.get("DBSCHED_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
QUEUE = "sync-scale"


def make_database(kind: str) -> tuple[str, str | None]:
    if kind == "sqlite":
        return f"sqlite:///{tempfile.mkdtemp()}/sync-scale.sqlite3", None
    schema = f"sync_{uuid.uuid4().hex[:12]}"
    engine = create_engine(POSTGRES_URL)
    with engine.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    engine.dispose()
    return f"{POSTGRES_URL}?options={quote(f'-csearch_path={schema}')}", schema


def drop_database(schema: str | None) -> None:
    if schema is not None:
        engine = create_engine(POSTGRES_URL)
        with engine.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()


def make_app(n: int, changed: bool = False, **conf: Any) -> Celery:
    app = Celery("sync_scale", broker="memory://", set_as_current=False)
    schedule = {f"entry-{i:06d}": {"task": "proj.tasks.t", "schedule": 60.0, "args": [i]} for i in range(n)}
    if changed:
        schedule["entry-000000"]["args"] = ["changed"]
    app.conf.update({"result_expires": None, "beat_schedule": schedule, **conf})
    return app


def sync(url: str, n: int) -> str:
    repository = JobRepository(url)
    migrate(repository.engine)
    statements: list[str] = []
    event.listen(repository.engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    figures = []
    for label, app in (
        ("from empty", make_app(n)),
        ("unchanged", make_app(n)),
        ("1 changed", make_app(n, changed=True)),
    ):
        statements.clear()
        start = time.perf_counter()
        sync_beat_schedule(app, repository)
        figures.append(f"{label} {time.perf_counter() - start:.3f} s ({len(statements)} statements)")
    repository.close()
    return "; ".join(figures)


def drain() -> int:
    count = 0
    with Connection("memory://") as conn:
        channel = conn.channel()
        while channel.basic_get(QUEUE, no_ack=True) is not None:
            count += 1
        channel.close()
    return count


def dispatch(url: str, n: int) -> str:
    conf = {"dbsched_database_url": url, "dbsched_listen": False, "task_default_queue": QUEUE}
    app = make_app(n, **conf)
    start = time.perf_counter()
    beat = Scheduler(app=app)  # start-up: migrate, sync every entry
    started = time.perf_counter() - start
    sent, start = 0, time.perf_counter()
    while sent < n and time.perf_counter() - start < 1800:
        beat.tick()
        sent += drain()
    elapsed = time.perf_counter() - start
    beat.close()
    forget_repository(app)
    again = make_app(n, **conf)
    start = time.perf_counter()
    Scheduler(app=again).close()
    restarted = time.perf_counter() - start
    forget_repository(again)
    return (
        f"beat start (sync from empty) {started:.1f} s; {sent:,} sent by the tick loop in {elapsed:.1f} s "
        f"({sent / elapsed:,.0f}/s); restart unchanged {restarted:.2f} s"
    )


def main() -> None:
    what, kind, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    url, schema = make_database(kind)
    try:
        result = sync(url, n) if what == "sync" else dispatch(url, n)
        print(f"{what} {kind} N={n:,}: {result}", flush=True)
    finally:
        drop_database(schema)


if __name__ == "__main__":
    main()
