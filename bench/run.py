"""The benchmark's one command: every measure of issue 5, for celery_dbsched and each installed peer, in one run.

    python bench/run.py --out docs/benchmarks.md          # N = 1,000 / 10,000 / 100,000 (tens of minutes)
    python bench/run.py --n 100 --quick --out /tmp/b.md  # a smoke run

Each system and N is measured in fresh subprocesses (see bench/measure.py and bench/extras.py); this process
only orchestrates, coordinates the multi-beat runs, and writes the report (bench/report.py). A peer that is not
installed is skipped with the reason in the report; a step that fails is reported as failed and the run goes on.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/run.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import REPO_ROOT, Config, log
from bench.measure import run_step, subprocess_env
from bench.systems import SYSTEMS, is_dbsched

PREFIX = "bench.e"


def amqp_reachable(url: str) -> str | None:
    try:
        from kombu import Connection

        with Connection(url, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1)
        return None
    except Exception as exc:
        return f"RabbitMQ not reachable at {url} ({type(exc).__name__}: {exc})"


def git_state() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "celery_dbsched"], cwd=REPO_ROOT, capture_output=True, text=True
        )
        return head.stdout.strip() + (" + uncommitted changes in celery_dbsched/" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def multi(cfg: Config, system_key: str, n: int, instances: int) -> dict[str, Any]:
    """`instances` beats on one store holding N due schedules: start them, let them go at once, stop when
    every schedule was sent at least once (or at the cap), and count what each sent."""
    folder = Path(tempfile.mkdtemp(prefix=f"bench-multi-{system_key}-"))
    cap = cfg.cap * (10 if is_dbsched(system_key) else 1)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "bench.measure", "instance", system_key, str(folder), str(n), cfg.to_json()],
            cwd=REPO_ROOT,
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(instances)
    ]
    try:
        deadline = time.monotonic() + 900
        while len(list(folder.glob("ready-*"))) < instances:
            if any(p.poll() is not None for p in procs):
                raise RuntimeError("a beat instance exited before it was ready")
            if time.monotonic() > deadline:
                raise RuntimeError("beat instances not ready after 900 s")
            time.sleep(0.05)
        go = time.time()
        (folder / "go").touch()

        def read() -> tuple[dict[str, float], int, dict[str, int]]:
            first: dict[str, float] = {}
            total = 0
            per: dict[str, int] = {}
            for path in folder.glob("sent-*.txt"):
                count = 0
                for line in path.read_text().splitlines():
                    stamp, _, key = line.partition(" ")
                    if not key.startswith(PREFIX):
                        continue
                    count += 1
                    t = float(stamp)
                    if key not in first or t < first[key]:
                        first[key] = t
                per[path.stem] = count
                total += count
            return first, total, per

        capped = False
        while True:
            time.sleep(0.25)
            first, _, _ = read()
            if len(first) >= n:
                break
            if time.time() - go > cap:
                capped = True
                break
        time.sleep(2.0)  # late duplicates, if any, still count
        (folder / "stop").touch()
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        first, total, per = read()
        distinct = len(first)
        elapsed = (max(first.values()) - go) if (first and not capped) else cap
        return {
            "instances": instances,
            "n": n,
            "distinct": distinct,
            "sends": total,
            "duplicates": total - distinct,
            "sends_per_slot": total / distinct if distinct else float("nan"),
            "per_instance": sorted(per.values(), reverse=True),
            "elapsed_s": elapsed,
            "capped": capped,
            "cap_s": cap,
        }
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        shutil.rmtree(folder, ignore_errors=True)


def attempt(results: dict[str, Any], key: str, action: Any) -> Any:
    """Run one step; on failure record why and go on."""
    try:
        value = action()
    except Exception as exc:
        log(f"FAILED {key}: {exc}")
        value = {"error": f"{type(exc).__name__}: {str(exc)[-2000:]}", "trace": traceback.format_exc()[-4000:]}
    results[key] = value
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[1000, 10000, 100000], help="numbers of schedules")
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS))
    parser.add_argument("--cap", type=float, default=60.0, help="seconds a peer's dispatch may take (x10 for dbsched)")
    parser.add_argument("--out", default="docs/benchmarks.md", help="the Markdown report")
    parser.add_argument("--plot", default=None, help="the PNG plot (default: the report's name with .png)")
    parser.add_argument("--json", default=None, help="raw results (default: the report's name with .json)")
    parser.add_argument("--quick", action="store_true", help="few samples (smoke runs)")
    parser.add_argument(
        "--max-interval",
        type=float,
        default=None,
        help="seconds: force this max loop interval on the peers and run-jobs interval on celery_dbsched "
        "(default: each system's own, as in production; see bench/README.md)",
    )
    parser.add_argument("--no-extras", action="store_true", help="skip celery_dbsched's extra measures")
    parser.add_argument("--profile-n", type=int, default=10000, help="N for the dispatch profile (0: none)")
    parser.add_argument("--two-beats-n", type=int, default=10000, help="N for the one-vs-two beats run")
    parser.add_argument("--pg", default=Config.pg_admin, help="PostgreSQL server (any database on it)")
    parser.add_argument(
        "--mariadb",
        default=Config.mariadb_admin,
        help="MariaDB server of the MariaDB columns (dbsched_maria, dbsched_bs_maria; skipped if it does not answer)",
    )
    parser.add_argument("--db-prefix", default="bench_", help="prefix of the databases the run creates")
    parser.add_argument("--dbsched-url", default=None, help="use this database for celery_dbsched as is")
    parser.add_argument("--redis", default=Config.redis_url, help="Redis for RedBeat (flushed per measure)")
    parser.add_argument("--amqp", default=Config.amqp_url, help="RabbitMQ for the broker measures")
    parser.add_argument("--cleanup", action="store_true", help="drop the databases the run created at the end")
    parser.add_argument("--from-json", default=None, help="only write the report from the raw results of a run")
    parser.add_argument(
        "--intro",
        default=None,
        help="a paragraph put under the report's title (what was run, on what, when); with --from-json too",
    )
    args = parser.parse_args(argv)
    if args.from_json:
        from bench.report import write_report

        out = Path(args.out).resolve()
        results = json.loads(Path(args.from_json).read_text())
        if args.intro is not None:
            results["meta"]["intro"] = args.intro
            raw_out = Path(args.json).resolve() if args.json else out.with_suffix(".json")
            raw_out.write_text(json.dumps(results, indent=1, default=str))
        write_report(results, out, Path(args.plot).resolve() if args.plot else out.with_suffix(".png"))
        print(f"wrote {out}", flush=True)
        return 0

    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    plot = Path(args.plot).resolve() if args.plot else out.with_suffix(".png")
    raw = Path(args.json).resolve() if args.json else out.with_suffix(".json")
    cfg = Config(
        pg_admin=args.pg,
        mariadb_admin=args.mariadb,
        db_prefix=args.db_prefix,
        dbsched_url=args.dbsched_url,
        redis_url=args.redis,
        amqp_url=args.amqp,
        cap=args.cap,
        quick=args.quick,
        max_interval=args.max_interval,
        out_dir=str(out.parent),
    )
    ns = sorted(set(args.n))
    started = time.time()
    results: dict[str, Any] = {
        "meta": {
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "host": socket.gethostname(),
            "cpus": os.cpu_count(),
            "ns": ns,
            "cap_s": cfg.cap,
            "quick": cfg.quick,
            "max_interval_s": cfg.max_interval,
            "configured": {key: SYSTEMS[key].configured for key in args.systems},
            # Where each column's schedules live and what its beat publishes to (the main measures).
            "stores": {key: SYSTEMS[key].store for key in args.systems},
            "broker": "memory://",
            "argv": sys.argv,
            "git": git_state(),
            "intro": args.intro,
        },
        "systems": {},
        "extras": {},
    }
    from bench.report import versions

    results["meta"]["versions"] = versions(cfg)

    for key in args.systems:
        system = SYSTEMS[key](cfg)
        entry: dict[str, Any] = {"label": system.label, "store": system.store, "by_n": {}}
        results["systems"][key] = entry
        reason = system.missing()
        if reason:
            entry["missing"] = reason
            print(f"SKIPPED {system.label}: {reason}", flush=True)
            continue
        try:
            system.prepare_store()
        except Exception as exc:
            entry["missing"] = f"store not available: {exc}"
            print(f"SKIPPED {system.label}: {entry['missing']}", flush=True)
            continue
        for n in ns:
            log(f"=== {system.label} N={n}")
            per_n: dict[str, Any] = {}
            entry["by_n"][str(n)] = per_n
            attempt(per_n, "populate_idle", lambda: run_step(["populate", key, str(n), "idle"], cfg))  # noqa: B023
            attempt(per_n, "beat", lambda: run_step(["beat", key, str(n)], cfg))  # noqa: B023
            # One beat beside two for celery_dbsched ("no slower than one"); a quick (smoke) run keeps only
            # celery_dbsched's two-beat run, whose target is its duplicates, to stay short (CI time).
            counts = {(True, True): [2], (True, False): [], (False, True): [1, 2], (False, False): [2]}[
                (cfg.quick, is_dbsched(key))
            ]
            for k in counts:

                def run_multi(k: int = k) -> dict[str, Any]:
                    run_step(["populate", key, str(n), "due"], cfg)  # noqa: B023
                    return multi(cfg, key, n, k)  # noqa: B023

                result = attempt(per_n, f"instances_{k}", run_multi)
                log(
                    f"{system.label} N={n} x{k}: {json.dumps({a: result.get(a) for a in ('sends', 'distinct', 'duplicates', 'elapsed_s', 'capped')})}"  # noqa: E501
                )
            raw.write_text(json.dumps(results, indent=1, default=str))

    if not args.no_extras and "dbsched" in args.systems and not results["systems"]["dbsched"].get("missing"):
        extras = results["extras"]
        amqp_missing = amqp_reachable(cfg.amqp_url)
        extras["amqp_missing"] = amqp_missing
        for n in ns:
            per_n: dict[str, Any] = {}
            extras.setdefault("brokers", {})[str(n)] = per_n
            attempt(per_n, "raw_memory", lambda: run_step(["bench.extras", "raw-kombu", str(n), "memory://"], cfg))  # noqa: B023
            if amqp_missing is None:
                attempt(per_n, "raw_amqp", lambda: run_step(["bench.extras", "raw-kombu", str(n), cfg.amqp_url], cfg))  # noqa: B023

                def dispatch_amqp() -> dict[str, Any]:
                    run_step(["populate", "dbsched", str(n), "due"], cfg)  # noqa: B023
                    return run_step(["bench.extras", "dispatch", str(n), cfg.amqp_url], cfg)  # noqa: B023

                attempt(per_n, "dispatch_amqp", dispatch_amqp)

                def dispatch_amqp_confirm() -> dict[str, Any]:
                    run_step(["populate", "dbsched", str(n), "due"], cfg)  # noqa: B023
                    return run_step(["bench.extras", "dispatch", str(n), cfg.amqp_url, "dbsched", "confirm"], cfg)  # noqa: B023

                attempt(per_n, "dispatch_amqp_confirm", dispatch_amqp_confirm)
                if "dbsched_bs" in args.systems:

                    def dispatch_amqp_tasks() -> dict[str, Any]:
                        run_step(["populate", "dbsched_bs", str(n), "due"], cfg)  # noqa: B023
                        return run_step(["bench.extras", "dispatch", str(n), cfg.amqp_url, "dbsched_bs"], cfg)  # noqa: B023

                    attempt(per_n, "dispatch_amqp_bs", dispatch_amqp_tasks)
            log(
                f"brokers N={n}: {json.dumps({k: v.get('raw_rate', v.get('dispatch_rate')) for k, v in per_n.items()})}"
            )
        wake_n = 1000 if 1000 in ns else ns[0]

        def wake() -> dict[str, Any]:
            run_step(["populate", "dbsched", str(wake_n), "idle"], cfg)
            return run_step(["bench.extras", "wakeup", str(wake_n)], cfg)

        attempt(extras, "wakeup", wake)
        log(f"wake-up: {extras['wakeup'].get('p50_s')} / {extras['wakeup'].get('p99_s')}")
        if amqp_missing is None:

            def real_worker() -> dict[str, Any]:
                run_step(["populate", "dbsched", "0", "idle"], cfg)
                return run_step(["bench.extras", "worker"], cfg)

            attempt(extras, "worker", real_worker)
        two_n = args.two_beats_n if args.two_beats_n in ns else ns[-1]
        extras["two_beats_n"] = two_n
        if args.profile_n:

            def prof() -> dict[str, Any]:
                run_step(["populate", "dbsched", str(args.profile_n), "due"], cfg)
                return run_step(["bench.extras", "profile", str(args.profile_n)], cfg)

            attempt(extras, "profile", prof)

    results["meta"]["elapsed_s"] = time.time() - started
    raw.write_text(json.dumps(results, indent=1, default=str))
    from bench.report import write_report

    write_report(results, out, plot)
    print(f"wrote {out}, {plot} and {raw} in {results['meta']['elapsed_s']:.0f}s", flush=True)
    if args.cleanup:
        for key in args.systems:
            system = SYSTEMS[key](cfg)
            if not system.missing():
                try:
                    system.cleanup()
                except Exception as exc:
                    log(f"cleanup of {key}: {exc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
