"""A private PgBouncer in transaction pooling mode (issue 15 item 3), in front of the shared PostgreSQL, and the
databases the tests reach through it.

Each `PgBouncer` listens on a free port of 127.0.0.1, forwards every database name to the shared server
(`* = host=... port=...`), trusts every client and shares DEFAULT_POOL_SIZE server connections per database
between all its clients, so that consecutive transactions of one client really do run on different server
connections. It keeps server-side prepared statements unsupported (`max_prepared_statements = 0` where the
version knows the option: before 1.21 they always are), as most deployments have it. It runs as postgres
(PgBouncer refuses root: `-u`) and is stopped, also when the test fails, by its fixture (tests/conftest.py).
A missing `pgbouncer` binary skips the tests that need one, or fails them under DBSCHED_REQUIRE_SERVICES=1.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import create_engine, make_url, text

from helpers.polling import wait_for
from helpers.services import POSTGRES_URL, Database, free_port, port_open, require_service, unavailable

DEFAULT_POOL_SIZE = 5
CONFIG_PREFIX = "dbsched-pgbouncer-"  # + the pid of the pytest that started it + ".ini"
# The Celery setting a deployment behind PgBouncer needs (README, docs/deployment.md).
POOLER_SETTINGS: dict[str, Any] = {"pooler": "pgbouncer"}


def _binary() -> str | None:
    return shutil.which("pgbouncer") or next(
        (path for path in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.access(path, os.X_OK)), None
    )


def _version(binary: str) -> tuple[int, ...]:
    output = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30, check=False).stdout
    found = re.search(r"PgBouncer (\d+)\.(\d+)", output)
    return tuple(int(part) for part in found.groups()) if found else (0, 0)


class PgBouncer:
    """One running pgbouncer; `url(database)` reaches that database of the shared server through it."""

    def __init__(self, binary: str, folder: Path) -> None:
        self.port = free_port()
        self.folder = folder
        server = make_url(POSTGRES_URL)
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o755)
        (folder / "users.txt").write_text(f'"{server.username or "postgres"}" ""\n')
        settings = [
            "listen_addr = 127.0.0.1",
            f"listen_port = {self.port}",
            "unix_socket_dir =",
            "auth_type = trust",
            f"auth_file = {folder / 'users.txt'}",
            "pool_mode = transaction",
            f"default_pool_size = {DEFAULT_POOL_SIZE}",
            "max_client_conn = 1000",
            "ignore_startup_parameters = extra_float_digits",
            f"admin_users = {server.username or 'postgres'}",  # SHOW POOLS (`pools`)
        ]
        if _version(binary) >= (1, 21):
            settings.append("max_prepared_statements = 0")
        config = folder / f"{CONFIG_PREFIX}{os.getpid()}.ini"  # the pid: `_stop_stale` finds it
        config.write_text(
            f"[databases]\n* = host={server.host or '127.0.0.1'} port={server.port or 5432}\n\n"
            "[pgbouncer]\n" + "\n".join(settings) + "\n"
        )
        self.log = folder / "pgbouncer.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [binary, "-u", "postgres", str(config)], stdout=log, stderr=subprocess.STDOUT
            )
        try:
            wait_for(lambda: self.process.poll() is not None or port_open(self.port), 30, 0.05, "pgbouncer to listen")
            if self.process.poll() is not None:
                raise RuntimeError(f"pgbouncer exited at start: {self.log.read_text()[-2000:]}")
        except BaseException:
            self.stop()
            raise

    def url(self, database: str) -> str:
        server = make_url(POSTGRES_URL)
        through = server.set(host="127.0.0.1", port=self.port, database=database, query={})
        return through.render_as_string(hide_password=False)

    def admin_dsn(self) -> str:
        """PgBouncer's admin console (SHOW POOLS, SHOW CLIENTS, ...)."""
        return f"host=127.0.0.1 port={self.port} user={make_url(POSTGRES_URL).username or 'postgres'} dbname=pgbouncer"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


class PoolSampler(threading.Thread):
    """Reads PgBouncer's `SHOW POOLS` for one database every `interval` while a test runs: the most client
    connections seen at once (`cl_active` + `cl_waiting`), waiting for a server connection (`cl_waiting`), server
    connections running a transaction (`sv_active`), and the longest wait (`maxwait`, s)."""

    def __init__(self, bouncer: PgBouncer, database: str, interval: float = 0.2) -> None:
        super().__init__(name="pgbouncer-pools", daemon=True)
        self.bouncer, self.database, self.interval = bouncer, database, interval
        self.samples = 0
        self.most = {"clients": 0, "waiting": 0, "server_active": 0}
        self.max_wait = 0.0
        self.errors: list[BaseException] = []
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            conn = psycopg.connect(self.bouncer.admin_dsn(), autocommit=True)
        except Exception as exc:
            self.errors.append(exc)
            return
        with conn:
            while not self._halt.is_set():
                try:
                    self._sample(conn)
                except Exception as exc:
                    self.errors.append(exc)
                self._halt.wait(self.interval)

    def _sample(self, conn: psycopg.Connection[Any]) -> None:
        cursor = conn.execute("SHOW POOLS", prepare=False)  # the admin console prepares nothing
        names = [column.name for column in cursor.description or ()]
        for values in cursor.fetchall():
            row = dict(zip(names, values, strict=True))
            if row["database"] != self.database:
                continue
            seen = {
                "clients": row["cl_active"] + row["cl_waiting"],
                "waiting": row["cl_waiting"],
                "server_active": row["sv_active"],
            }
            self.most = {key: max(self.most[key], seen[key]) for key in seen}
            self.max_wait = max(self.max_wait, row["maxwait"] + row["maxwait_us"] / 1e6)
        self.samples += 1

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=30)


def _stop_stale() -> None:
    """PgBouncers a killed pytest left running (their fixture never stopped them): their config names that
    pytest's pid, which is gone."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        found = re.search(rf"{CONFIG_PREFIX}(\d+)\.ini$", args[-2].decode(errors="replace")) if len(args) > 1 else None
        if found and "pgbouncer" in args[0].decode(errors="replace") and not Path(f"/proc/{found[1]}").exists():
            with contextlib.suppress(OSError):
                os.kill(int(cmdline.parent.name), signal.SIGTERM)


@contextmanager
def running_pgbouncer(folder: Path) -> Iterator[PgBouncer]:
    require_service("postgres")
    binary = _binary()
    if binary is None:
        unavailable("PgBouncer tests need pgbouncer (Debian's pgbouncer: apt-get install pgbouncer)")
    assert binary is not None
    if os.geteuid() != 0:
        unavailable("a private PgBouncer runs as postgres (`-u postgres`), which needs root")
    _stop_stale()
    bouncer = PgBouncer(binary, folder)
    try:
        yield bouncer
    finally:
        bouncer.stop()


def make_pgbouncer_database(bouncer: PgBouncer, **settings: Any) -> Database:
    """A database of its own on the shared server (PgBouncer passes no `options`, so no search_path: a
    database, not a schema, per test), reached through `bouncer`, with the pooler setting and `settings`
    (`Settings` fields). Dropped by `drop_database`."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    engine = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        engine.dispose()
    return Database("postgres", bouncer.url(name), own_database=name, settings={**POOLER_SETTINGS, **settings})
