"""One DELETE against batched deletes, for the run history (issue 9, goal 7):

    python bench/prune_compare.py --rows 300000

Stores ROWS final runs that ended a day ago (one INSERT ... SELECT), then prunes them twice on a fresh copy:
with the statement `JobRepository.prune_runs` used before issue 9 (one DELETE of every old final run) and with
`prune_runs` as it is now (transactions of at most 5,000 rows). Prints the longest transaction of each: what a
beat's loop stalls for while it prunes, and how long one transaction holds back vacuum's horizon.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import Config, drop_database, ensure_database


def fill(url: str, rows: int) -> None:
    from sqlalchemy import MetaData, text

    from celery_dbsched import JobRepository
    from celery_dbsched.engine import make_engine
    from celery_dbsched.migrate import migrate

    engine = make_engine(url)
    existing = MetaData()
    existing.reflect(engine)
    existing.drop_all(engine)
    migrate(engine)
    engine.dispose()
    repository = JobRepository(url)
    repository.upsert_job("cmp", "prune comparison")
    with repository.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO dbsched_job_run (job_name, status, claimed_by, create_time, update_time, end_time) "
                "SELECT 'cmp', 'completed', 'beat', now() - interval '1 day', now() - interval '1 day', "
                "now() - interval '1 day' + g * interval '1 millisecond' FROM generate_series(1, :n) g"
            ),
            {"n": rows},
        )
    with repository.engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("VACUUM ANALYZE dbsched_job_run"))
    repository.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--pg", default=Config.pg_admin)
    args = parser.parse_args(argv)
    from sqlalchemy import delete, event

    from celery_dbsched import JobRepository
    from celery_dbsched.schema import run_table
    from celery_dbsched.states import FINAL

    cfg = Config(pg_admin=args.pg)
    url = ensure_database(cfg, "prune_compare", recreate=True)
    try:
        fill(url, args.rows)
        repository = JobRepository(url)
        r = run_table
        t0 = time.perf_counter()
        with repository.engine.begin() as conn:
            cutoff = repository.clock.now(-3600.0)
            one = conn.execute(delete(r).where(r.c.status.in_(FINAL), r.c.end_time < cutoff)).rowcount
        single = time.perf_counter() - t0
        repository.close()

        fill(url, args.rows)
        repository = JobRepository(url)
        spans: list[float] = []
        started: list[float] = []

        def before(*_: object) -> None:
            started.append(time.perf_counter())

        def after(*_: object) -> None:
            spans.append(time.perf_counter() - started.pop())

        event.listen(repository.engine, "begin", before)
        event.listen(repository.engine, "commit", after)
        t0 = time.perf_counter()
        batched = repository.prune_runs(dt.timedelta(hours=1))
        total = time.perf_counter() - t0
        repository.close()
        print(
            f"{args.rows:,} old final runs. One DELETE: {one:,} rows in one transaction of {single:.2f} s. "
            f"Batched (prune_runs): {batched:,} rows in {len(spans)} transactions, {total:.2f} s in all, "
            f"the longest {max(spans) * 1e3:.0f} ms, median {sorted(spans)[len(spans) // 2] * 1e3:.0f} ms."
        )
    finally:
        drop_database(cfg, "prune_compare")
    return 0


if __name__ == "__main__":
    sys.exit(main())
