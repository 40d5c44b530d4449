"""Private PostgreSQL clusters for the fault suite: created with Debian's `pg_createcluster` (as root) on a free
port, stopped and started with `pg_ctlcluster`, dropped by the fixture that made them (also when its test
fails), and never the shared server on 5432. A streaming standby of one is made with `pg_basebackup -R`.

    with private_cluster("dbschedfaults") as primary, standby_of(primary) as standby:
        ...
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

from helpers.polling import wait_for
from helpers.services import free_port, unavailable

# What a throw-away cluster does not need (a crash of the machine loses it anyway).
FAST_SETTINGS = ("fsync=off", "synchronous_commit=off", "full_page_writes=off")


def run(args: Sequence[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, check=False)


def pg_version() -> str | None:
    """The newest PostgreSQL server installed (Debian's layout), or None."""
    root = Path("/usr/lib/postgresql")
    versions = sorted(
        (p.name for p in root.glob("*") if (p / "bin" / "initdb").exists()), key=lambda v: float(v), reverse=True
    )
    return versions[0] if versions else None


@dataclass
class PrivatePostgres:
    version: str
    name: str
    port: int

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    @property
    def data_directory(self) -> Path:
        return Path(f"/var/lib/postgresql/{self.version}/{self.name}")

    def ctl(self, action: str, *options: str) -> float:
        """`pg_ctlcluster <version> <name> <action> [options]`; returns how long it took."""
        started = time.monotonic()
        result = run(["pg_ctlcluster", "--skip-systemctl-redirect", self.version, self.name, action, *options])
        assert result.returncode == 0, f"pg_ctlcluster {action}: {result.stdout}{result.stderr}"
        return time.monotonic() - started

    def accepting(self) -> bool:
        engine = create_engine(self.url(), connect_args={"connect_timeout": 2})
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return True
        except Exception:
            return False
        finally:
            engine.dispose()

    def admin(self, sql: str) -> None:
        engine = create_engine(self.url(), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(text(sql))
        finally:
            engine.dispose()

    def scalar(self, sql: str, database: str = "postgres") -> Any:
        engine = create_engine(self.url(database), connect_args={"connect_timeout": 5})
        try:
            with engine.connect() as conn:
                return conn.execute(text(sql)).scalar()
        finally:
            engine.dispose()

    def in_recovery(self) -> bool:
        return bool(self.scalar("SELECT pg_is_in_recovery()"))


def _require_tools() -> str:
    """The PostgreSQL version to create clusters with; skips (fails under DBSCHED_REQUIRE_SERVICES) without."""
    tools = ("pg_createcluster", "pg_ctlcluster", "pg_dropcluster")
    missing = [tool for tool in tools if not shutil.which(tool)]
    version = pg_version()
    if missing or version is None:
        unavailable(f"a private PostgreSQL cluster needs {', '.join(missing) or 'initdb'} (Debian's postgresql-common)")
    assert version is not None
    if os.geteuid() != 0:
        unavailable("a private PostgreSQL cluster needs root (pg_createcluster creates it as postgres)")
    return version


def _drop_stale_clusters(version: str, prefix: str) -> None:
    """Clusters a previous run left behind (their pytest process is gone): named <prefix><pid>_<random>."""
    for line in run(["pg_lsclusters", "-h"]).stdout.splitlines():
        fields = line.split()
        if len(fields) < 2 or fields[0] != version or not fields[1].startswith(prefix):
            continue
        pid = fields[1][len(prefix) :].split("_")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            run(["pg_dropcluster", "--stop", version, fields[1]])


def _drop(pg: PrivatePostgres) -> None:
    dropped = run(["pg_dropcluster", "--stop", pg.version, pg.name])
    if dropped.returncode != 0 and "does not exist" not in dropped.stderr:
        print(f"pg_dropcluster {pg.name}: {dropped.stdout}{dropped.stderr}")


def _create(prefix: str, settings: Sequence[str]) -> PrivatePostgres:
    version = _require_tools()
    _drop_stale_clusters(version, prefix)
    pg = PrivatePostgres(version, f"{prefix}{os.getpid()}_{uuid.uuid4().hex[:6]}", free_port())
    options = [arg for setting in settings for arg in ("-o", setting)]
    created = run(
        [
            "pg_createcluster",
            version,
            pg.name,
            "-p",
            str(pg.port),
            "--start-conf",
            "manual",
            *options,
            "--",
            "--auth=trust",
        ]
    )
    if created.returncode != 0:
        _drop(pg)
        unavailable(f"pg_createcluster failed: {created.stdout}{created.stderr}")
    return pg


@contextmanager
def private_cluster(prefix: str, settings: Sequence[str] = FAST_SETTINGS) -> Iterator[PrivatePostgres]:
    """A running cluster (trust on localhost, replication allowed), dropped on exit."""
    pg = _create(prefix, settings)
    try:
        pg.ctl("start")
        wait_for(pg.accepting, 60, 0.2, f"the private PostgreSQL cluster {pg.name} on port {pg.port}")
        print(f"\nprivate PostgreSQL {pg.version}/{pg.name} on 127.0.0.1:{pg.port}")
        yield pg
    finally:
        _drop(pg)


@contextmanager
def standby_of(primary: PrivatePostgres, prefix: str) -> Iterator[PrivatePostgres]:
    """A hot standby streaming from `primary` (asynchronously unless the primary's synchronous_standby_names
    names it: its application_name is its cluster's name), its data directory a `pg_basebackup -R` of the
    primary's; dropped on exit."""
    if not shutil.which("pg_basebackup") or not shutil.which("runuser"):
        unavailable("a standby needs pg_basebackup (Debian's postgresql-client) and runuser (util-linux)")
    standby = _create(prefix, FAST_SETTINGS)
    try:
        data = standby.data_directory
        for entry in data.iterdir():  # pg_basebackup fills an empty directory (its parent is root's)
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        conninfo = f"host=127.0.0.1 port={primary.port} user=postgres application_name={standby.name}"
        backup_args = ["pg_basebackup", "-d", conninfo, "-D", str(data), "-R", "-X", "stream", "-c", "fast"]
        backup = run(["runuser", "-u", "postgres", "--", *backup_args])
        assert backup.returncode == 0, f"pg_basebackup: {backup.stdout}{backup.stderr}"
        standby.ctl("start")
        wait_for(standby.accepting, 60, 0.2, f"the standby {standby.name} on port {standby.port}")

        def streaming() -> bool:
            sql = f"SELECT count(*) FROM pg_stat_replication WHERE application_name = '{standby.name}'"
            return bool(primary.scalar(f"{sql} AND state = 'streaming'"))

        wait_for(streaming, 60, 0.2, f"the standby {standby.name} to stream from {primary.name}")
        print(f"\nprivate PostgreSQL standby {standby.version}/{standby.name} on 127.0.0.1:{standby.port}")
        yield standby
    finally:
        _drop(standby)


def multi_host_url(database: str, *clusters: PrivatePostgres) -> str:
    """A URL naming every cluster's host and port, for the primary only (libpq tries them in turn and keeps the
    first that accepts writes)."""
    hosts = "&".join(f"host=127.0.0.1:{pg.port}" for pg in clusters)
    return f"postgresql+psycopg://postgres@/{database}?{hosts}&target_session_attrs=read-write"
