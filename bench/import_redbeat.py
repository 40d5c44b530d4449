"""`dbsched import redbeat` at scale (issue 13): N RedBeat entries written by celery-redbeat itself, imported into
PostgreSQL by the real command (`celery -A bench.import_redbeat dbsched import redbeat`), timed, with the peak
memory (max RSS) of the importing process; then imported again (everything unchanged).

    python bench/import_redbeat.py [--n 10000] [--redis redis://127.0.0.1:6379/0] [--pg postgresql+psycopg://...]

Needs the `test` extra (celery-redbeat, psycopg, redis). Writes its keys under `bench-import-redbeat-<hex>:` and a
schema `bench_import_redbeat_<hex>`, both removed at the end.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import resource
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import quote

from celery import Celery

REPO = Path(__file__).resolve().parent.parent

# As an app module (`-A bench.import_redbeat`): the database from the environment.
app = Celery("bench_import_redbeat", set_as_current=False)
app.conf.update(broker_url="memory://", dbsched_database_url=os.environ.get("BENCH_IMPORT_DB", "sqlite://"))


def write_entries(n: int, redis_url: str, prefix: str) -> float:
    from celery.schedules import crontab, schedule
    from redbeat import RedBeatSchedulerEntry

    writer = Celery("bench-writer", set_as_current=False)
    writer.conf.update(broker_url="memory://", redbeat_redis_url=redis_url, redbeat_key_prefix=prefix)
    now = dt.datetime.now(dt.timezone.utc)
    started = time.perf_counter()
    for i in range(n):
        sched = (
            schedule(dt.timedelta(seconds=60 + i % 3600)) if i % 2 else crontab(minute=i % 60, hour=f"*/{1 + i % 6}")
        )
        entry = RedBeatSchedulerEntry(
            f"bench-{i:06d}",
            "proj.tasks.bench",
            sched,
            args=[i],
            kwargs={"i": i},
            options={"queue": f"q{i % 4}"},
            app=writer,
        ).save()
        if i % 3 == 0:
            entry.reschedule(now - dt.timedelta(seconds=i % 50))
    return time.perf_counter() - started


def run_import(env: dict[str, str], redis_url: str, prefix: str) -> tuple[float, float, str]:
    """Wall time (s) of the command, its process's max RSS (MiB), its plan's first lines."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(Path(__file__)), "--child", "-A", "bench.import_redbeat", "dbsched", "import",
         "redbeat", "--redis-url", redis_url, "--key-prefix", prefix],
        env=env, cwd=REPO, capture_output=True, text=True, check=False,
    )  # fmt: skip
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"import failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    peak = next(int(line.split()[1]) for line in done.stderr.splitlines() if line.startswith("MAXRSS "))
    summary = " | ".join(line.strip() for line in done.stdout.splitlines()[:3])
    return elapsed, peak / 1024, summary


def child(argv: list[str]) -> None:
    """`celery ARGV` in this process, printing its max RSS (KiB) at exit."""
    import atexit

    from celery.__main__ import main as celery_main

    atexit.register(lambda: print(f"MAXRSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", file=sys.stderr))
    sys.argv = ["celery", *argv]
    celery_main()


def main() -> None:
    import redis
    from sqlalchemy import create_engine, text

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()

    tag = uuid.uuid4().hex[:8]
    prefix, schema = f"bench-import-redbeat-{tag}:", f"bench_import_redbeat_{tag}"
    engine = create_engine(args.pg)
    with engine.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    db_url = f"{args.pg}{'&' if '?' in args.pg else '?'}options={quote(f'-csearch_path={schema}')}"
    env = {**os.environ, "BENCH_IMPORT_DB": db_url, "PYTHONPATH": str(REPO)}
    client = redis.Redis.from_url(args.redis)
    try:
        subprocess.run([sys.executable, "-m", "celery", "-A", "bench.import_redbeat", "dbsched", "migrate"],
                       env=env, cwd=REPO, check=True, capture_output=True)  # fmt: skip
        written = write_entries(args.n, args.redis, prefix)
        print(f"wrote {args.n:,} RedBeat entries with RedBeatSchedulerEntry.save() in {written:.1f} s")
        first = run_import(env, args.redis, prefix)
        print(f"first import:  {first[0]:.2f} s, max RSS {first[1]:.0f} MiB  ({first[2]})")
        second = run_import(env, args.redis, prefix)
        print(f"second import: {second[0]:.2f} s, max RSS {second[1]:.0f} MiB  ({second[2]})")
    finally:
        keys = list(client.scan_iter(match=prefix + "*", count=5000))
        for start in range(0, len(keys), 5000):
            client.delete(*keys[start : start + 5000])
        with engine.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        engine.dispose()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2:])
    else:
        main()
