"""The benchmark harness (bench/, issue 5) still runs end to end: N = 100, few samples, nothing timed.

celery_dbsched is measured on a fresh PostgreSQL schema; the peers (django-celery-beat, sqlalchemy-celery-beat,
celery-redbeat: the `bench` extra) are measured when installed and skipped with the reason printed otherwise;
the RabbitMQ measures are skipped by the harness when RabbitMQ does not answer.
"""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

from conftest import POSTGRES_URL, REDIS_URL, Database

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench import run  # noqa: E402
from bench.common import Config  # noqa: E402
from bench.systems import SYSTEMS  # noqa: E402


def test_harness_runs_end_to_end(postgres_database: Database, tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    prefix = f"smoke_{uuid.uuid4().hex[:8]}_"
    redis_url = REDIS_URL.rsplit("/", 1)[0] + "/11"
    missing = {key: cls(Config()).missing() for key, cls in SYSTEMS.items()}
    for key, reason in missing.items():
        if reason:
            print(f"bench smoke: peer {key} skipped: {reason}")

    status = run.main(
        [
            "--n", "100",
            "--quick",
            "--max-interval", "1",
            "--cap", "20",
            "--profile-n", "0",
            "--out", str(out),
            "--pg", POSTGRES_URL,
            "--db-prefix", prefix,
            "--dbsched-url", postgres_database.url,
            "--redis", redis_url,
            "--cleanup",
        ]
    )  # fmt: skip

    assert status == 0
    results = json.loads(out.with_suffix(".json").read_text())
    ours = results["systems"]["dbsched"]["by_n"]["100"]
    for step in ("populate_idle", "beat", "instances_1", "instances_2"):
        assert "error" not in ours[step], ours[step].get("trace")
    beat = ours["beat"]
    assert beat["dispatch_sent"] == 100 and not beat["dispatch_capped"]
    assert beat["idle_tick_sql"], "the idle tick's SQL was captured"
    assert ours["instances_2"]["duplicates"] == 0 and ours["instances_2"]["distinct"] == 100
    for key, reason in missing.items():
        entry = results["systems"][key]
        if reason:
            assert entry["missing"] == reason
        else:
            assert "error" not in entry["by_n"]["100"]["beat"], entry["by_n"]["100"]["beat"].get("trace")
    extras = results["extras"]
    assert "error" not in extras["wakeup"], extras["wakeup"].get("trace")
    for n_results in extras["brokers"].values():
        for name, step in n_results.items():
            assert "error" not in step, (name, step.get("trace"))
    if extras.get("amqp_missing") is None:
        assert "error" not in extras["worker"], extras["worker"].get("trace")
    report = out.read_text()
    assert "## Targets (issue 5)" in report and "celery_dbsched" in report
