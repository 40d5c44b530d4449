"""The MariaDB column beside PostgreSQL's (issue 14), measured through `JobRepository` on each database:

- idle tick: `next_due_in` (what an idle beat costs per tick) with N jobs none of which is due, median of 200;
- claim of 10,000 due jobs: `claim_runs` in batches of 500 until none is left (the database side of a dispatch);
- two claimers at once over 10,000 due jobs: duplicates (runs of one job claimed twice) must be 0.

    python -m bench.mariadb_column [--sizes 1000,10000,100000]

Each database is a fresh one of its own (a PostgreSQL schema, a MariaDB database), dropped afterwards.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from sqlalchemy import insert, text

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers.services import drop_database, make_mariadb_database, make_postgres_database

from celery_dbsched.repository import JobRepository
from celery_dbsched.schema import job_table

UTC = dt.timezone.utc


def fill(repository: JobRepository, n: int, due: bool) -> None:
    now = repository.database_now()
    when = now - dt.timedelta(seconds=1) if due else now + dt.timedelta(days=1)
    rows = [
        {"name": f"job-{i:07d}", "description": "", "next_scheduled_run": when, "create_time": now, "update_time": now}
        for i in range(n)
    ]
    with repository.engine.begin() as conn:
        conn.execute(text("DELETE FROM dbsched_job"))
        for start in range(0, n, 5000):
            conn.execute(insert(job_table), rows[start : start + 5000])


def idle_tick_ms(repository: JobRepository) -> float:
    samples = []
    for _ in range(200):
        start = time.perf_counter()
        repository.next_due_in()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def claim_all_s(repository: JobRepository) -> tuple[float, int]:
    start, claimed = time.perf_counter(), 0
    while True:
        runs = repository.claim_runs("bench", 500).runs
        if not runs:
            return time.perf_counter() - start, claimed
        claimed += len(runs)


def two_claimers(database: Any, n: int) -> dict[str, int]:
    repositories = [database.repository() for _ in range(2)]
    fill(repositories[0], n, due=True)
    claimed: Counter[str] = Counter()
    lock = threading.Lock()

    def claimer(repository: JobRepository, name: str) -> None:
        while True:
            runs = repository.claim_runs(name, 500).runs
            if not runs:
                return
            with lock:
                claimed.update(run.job_name for run in runs)

    threads = [threading.Thread(target=claimer, args=(r, f"beat-{i}")) for i, r in enumerate(repositories)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"jobs": n, "claimed": sum(claimed.values()), "duplicates": sum(c - 1 for c in claimed.values() if c > 1)}


def measure(kind: str, sizes: list[int]) -> dict[str, Any]:
    database = make_mariadb_database() if kind == "mariadb" else make_postgres_database()
    try:
        repository = database.migrated_repository()
        result: dict[str, Any] = {"idle_tick_ms": {}}
        for n in sizes:
            fill(repository, n, due=False)
            result["idle_tick_ms"][n] = round(idle_tick_ms(repository), 3)
        fill(repository, 10_000, due=True)
        seconds, claimed = claim_all_s(repository)
        result["claim_10000_due_s"] = round(seconds, 2)
        result["claimed"] = claimed
        with repository.engine.begin() as conn:
            conn.execute(text("DELETE FROM dbsched_job_run"))
        result["two_claimers"] = two_claimers(database, 10_000)
        return result
    finally:
        drop_database(database)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1000,10000,100000")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    for kind in ("postgres", "mariadb"):
        print(kind, measure(kind, sizes), flush=True)


if __name__ == "__main__":
    main()
