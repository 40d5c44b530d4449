"""PyMySQL against mysqlclient (MySQLdb) on MariaDB: the cost of a connect and of a claim-shaped round trip
(INSERT ... SELECT ... RETURNING of 10 rows, committed), each the median of many, on one server.

    python -m bench.mysql_driver [mysql://root@127.0.0.1:3306/i14_maria_bench]
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import make_url

SETUP = (
    "CREATE TABLE IF NOT EXISTS bench_job (name VARCHAR(128) PRIMARY KEY, due DATETIME(6) NOT NULL)",
    "CREATE TABLE IF NOT EXISTS bench_run (id BIGINT AUTO_INCREMENT PRIMARY KEY, job_name VARCHAR(128), "
    "create_time DATETIME(6))",
    "DELETE FROM bench_job",
    "INSERT INTO bench_job SELECT concat('job-', seq), NOW(6) FROM seq_1_to_1000",
)
CLAIM = (
    "INSERT INTO bench_run (job_name, create_time) SELECT name, NOW(6) FROM bench_job WHERE due <= NOW(6) "
    "ORDER BY due, name LIMIT 10 RETURNING id, job_name, create_time"
)


def _median_ms(action: Callable[[], Any], times: int) -> float:
    samples = []
    for _ in range(times):
        start = time.perf_counter()
        action()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def measure(module: Any, url: str, **extra: Any) -> tuple[float, float]:
    parsed = make_url(url)
    args = {"host": parsed.host or "127.0.0.1", "port": parsed.port or 3306, "user": parsed.username or "root"}
    args["password" if module.__name__ == "pymysql" else "passwd"] = parsed.password or ""
    args.update(extra)

    def connect() -> Any:
        return module.connect(database=parsed.database, **args)

    setup = module.connect(**args)
    setup.cursor().execute(f"CREATE DATABASE IF NOT EXISTS {parsed.database}")
    setup.close()
    conn = connect()
    cursor = conn.cursor()
    for statement in SETUP:
        cursor.execute(statement)
    conn.commit()

    def claim() -> None:
        cursor.execute(CLAIM)
        cursor.fetchall()
        conn.commit()

    connect_ms = _median_ms(lambda: connect().close(), 200)
    claim_ms = _median_ms(claim, 500)
    cursor.execute("DROP TABLE bench_run, bench_job")
    conn.close()
    return connect_ms, claim_ms


def main() -> None:
    url = sys.argv[1] if len(sys.argv) > 1 else "mysql://root@127.0.0.1:3306/i14_maria_bench"
    import MySQLdb
    import pymysql

    # PyMySQL builds an SSL context (loading the system's CA certificates, ~80 ms) at every connect unless
    # told the server is reached without TLS; mysqlclient asks libmariadb, which does it lazily.
    for label, module, extra in (
        ("pymysql", pymysql, {}),
        ("pymysql ssl_disabled", pymysql, {"ssl_disabled": True}),
        ("mysqlclient", MySQLdb, {}),
    ):
        connect_ms, claim_ms = measure(module, url, **extra)
        print(f"{label:21} connect {connect_ms:7.3f} ms  claim round trip {claim_ms:.3f} ms (median)")


if __name__ == "__main__":
    main()
