"""`python -m example_proj`: start a worker with an embedded beat and watch the jobs run.

Prints, every two seconds, each job's active run with its progress and its latest finished runs, and serves
the dashboard (`celery -A example_proj dbsched web`) on http://127.0.0.1:8555 (`--web-port`; 0: no page; the
actions' token is `example-dashboard-token` unless DBSCHED_WEB_TOKEN is set). Stops (warm shutdown) after
`--seconds` (default 60; 0 runs until Ctrl-C). The worker's log goes to .example_data/worker.log, the page's to
.example_data/web.log.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import subprocess
import sys
import time

from celery_dbsched.binding import repository_for
from celery_dbsched.migrate import prepare_schema

from .celery_app import DATA_DIR, app


def bar(completed: int, total: int, width: int = 20) -> str:
    if total <= 0:
        return "[" + " " * width + "]"
    filled = round(width * completed / total)
    return "[" + "#" * filled + "." * (width - filled) + f"] {completed}/{total}"


def show(started: float) -> None:
    repository = repository_for(app)
    lines = [f"--- {time.monotonic() - started:5.1f}s ---"]
    for job in repository.list_jobs():
        runs = repository.list_runs(job_name=job.name, limit=6)
        active = next((run for run in runs if run.status in ("queued", "running")), None)
        history = " ".join(run.status[:4] for run in runs if run is not active)
        now = f"run {active.id} {active.status:<8} {bar(active.completed, active.total)}" if active else "idle"
        lines.append(f"{job.name:<26} {now:<48} last: {history}")
    print("\n".join(lines), flush=True)


WEB_PORT = 8555
WEB_TOKEN = "example-dashboard-token"  # loopback only; the page asks for it before an action


def start_web(port: int) -> subprocess.Popen[bytes] | None:
    """`celery -A example_proj dbsched web` on 127.0.0.1:<port>, or None (with the reason) when not possible."""
    if port <= 0:
        return None
    if any(importlib.util.find_spec(module) is None for module in ("starlette", "uvicorn", "jinja2")):
        print("dashboard: not started (python -m pip install -e '.[web]' to see it)", flush=True)
        return None
    env = {"DBSCHED_WEB_TOKEN": WEB_TOKEN, **os.environ}
    command = [sys.executable, "-m", "celery", "-A", "example_proj", "dbsched", "web", "--port", str(port)]
    log = open(DATA_DIR / "web.log", "ab")  # noqa: SIM115 - the child keeps its own copy of the descriptor
    try:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    finally:
        log.close()
    print(
        f"dashboard: http://127.0.0.1:{port} (token: {env['DBSCHED_WEB_TOKEN']}; log: {DATA_DIR / 'web.log'})",
        flush=True,
    )
    return server


def stop(process: subprocess.Popen[bytes]) -> None:
    """Warm shutdown (SIGTERM); SIGKILL after 30 s."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m example_proj", description=__doc__)
    parser.add_argument("--seconds", type=float, default=60, help="how long to run (0: until Ctrl-C)")
    parser.add_argument("--web-port", type=int, default=WEB_PORT, help="the dashboard's port (0: no dashboard)")
    args = parser.parse_args()
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    prepare_schema(repository_for(app).engine, auto_migrate=True)
    log = open(DATA_DIR / "worker.log", "ab")  # noqa: SIM115 - kept open for the worker's lifetime
    command = [
        sys.executable, "-m", "celery", "-A", "example_proj", "worker", "-B",
        "--scheduler", "celery_dbsched.Scheduler", "--pool", "threads", "--concurrency", "4",
        "--loglevel", "info",
    ]  # fmt: skip
    print("starting:", " ".join(command[2:]), f"(log: {DATA_DIR / 'worker.log'})", flush=True)
    worker = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    web = start_web(args.web_port)
    started = time.monotonic()
    try:
        while worker.poll() is None and (args.seconds <= 0 or time.monotonic() - started < args.seconds):
            time.sleep(2)
            show(started)
    except KeyboardInterrupt:
        pass
    finally:
        stop(worker)  # warm shutdown: running jobs are interrupted (shutdown)
        if web is not None:
            stop(web)
        log.close()
    show(started)
    print(f"worker exited with {worker.returncode}; see `celery -A example_proj dbsched runs`", flush=True)
    return 0 if worker.returncode in (0, -signal.SIGTERM) else 1


if __name__ == "__main__":
    raise SystemExit(main())
