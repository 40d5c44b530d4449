"""`dbsched import django-celery-beat` at scale (issue 13): N PeriodicTasks written by django-celery-beat itself (its
ORM, tests/dcb_source.py bulk: half interval, half crontab in Europe/Berlin, all with a last_run_at) into a PostgreSQL
database of their own, imported into PostgreSQL by the real command (`celery -A bench.import_dcb dbsched import
django-celery-beat`): a dry run, the import, and the import again (everything unchanged). Each is timed, with the
peak memory (max RSS) of the importing process (/usr/bin/time).

    python bench/import_dcb.py [--n 10000] [--pg postgresql+psycopg://postgres@127.0.0.1:5432/test]

Needs the `test` extra (django-celery-beat, Django, psycopg) and /usr/bin/time. Creates a database
`bench_import_dcb_<hex>` and a schema of the same name in --pg's database, both removed at the end.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import quote

from celery import Celery
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

REPO = Path(__file__).resolve().parent.parent

# As an app module (`-A bench.import_dcb`): the database from the environment.
app = Celery("bench_import_dcb", set_as_current=False)
app.conf.update(broker_url="memory://", dbsched_database_url=os.environ.get("BENCH_IMPORT_DB", "sqlite://"))


def run_import(env: dict[str, str], source_url: str, *extra: str) -> tuple[float, float, float, str]:
    """Wall time (s) of the command, its CPU time (user + system, s: the machine may be shared), its process's
    max RSS (MiB), its plan's first lines."""
    started = time.perf_counter()
    done = subprocess.run(
        ["/usr/bin/time", "-f", "MAXRSS %M CPU %U %S", sys.executable, "-m", "celery", "-A", "bench.import_dcb",
         "dbsched", "import", "django-celery-beat", "--url", source_url, *extra],
        env=env, cwd=REPO, capture_output=True, text=True, check=False,
    )  # fmt: skip
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"import failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    fields = next(line.split() for line in done.stderr.splitlines() if line.startswith("MAXRSS "))
    summary = " | ".join(line.strip()[:100] for line in done.stdout.splitlines()[:3])
    return elapsed, float(fields[3]) + float(fields[4]), int(fields[1]) / 1024, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    name = f"bench_import_dcb_{uuid.uuid4().hex[:8]}"
    admin = create_engine(args.pg, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
        conn.execute(text(f'CREATE SCHEMA "{name}"'))
    pg = make_url(args.pg)
    source_url = pg.set(drivername="postgresql", database=name).render_as_string(hide_password=False)
    separator = "&" if "?" in args.pg else "?"
    target = f"{args.pg}{separator}options={quote(f'-csearch_path={name}')}"
    env = {**os.environ, "BENCH_IMPORT_DB": target, "PYTHONPATH": str(REPO)}
    try:
        started = time.perf_counter()
        writer = [sys.executable, str(REPO / "tests" / "dcb_source.py"), "bulk", source_url, str(args.n)]
        subprocess.run(writer, check=True)
        print(f"wrote {args.n:,} PeriodicTasks with django-celery-beat's ORM in {time.perf_counter() - started:.1f} s")
        subprocess.run([sys.executable, "-m", "celery", "-A", "bench.import_dcb", "dbsched", "migrate"], env=env,
                       cwd=REPO, check=True, capture_output=True)  # fmt: skip
        for label, extra in (("dry run", ("--dry-run",)), ("import", ()), ("again", ())):
            elapsed, cpu, peak, summary = run_import(env, source_url, *extra)
            print(f"{label:8} {elapsed:6.2f} s (CPU {cpu:5.2f} s)  max RSS {peak:6.1f} MiB  {summary}")
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))
        admin.dispose()


if __name__ == "__main__":
    main()
