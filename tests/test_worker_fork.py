"""A fork of the worker process (the embedded beat, a prefork pool replacing a child) while its heartbeat
thread writes to SQLite: the child must not inherit SQLite's in-process lock table with that write's lock held
by a thread it does not have (its every transaction would wait out the busy timeout: seen as an example
project whose embedded beat never claimed anything)."""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path

from celery_dbsched import worker
from celery_dbsched.migrate import migrate
from celery_dbsched.repository import JobRepository


def test_a_fork_waits_until_the_heartbeats_sqlite_write_has_ended(tmp_path: Path) -> None:
    path = tmp_path / "fork.sqlite3"
    repository = JobRepository(f"sqlite:///{path}")
    migrate(repository.engine)
    writing, end_write = threading.Event(), threading.Event()

    def heartbeat_like_write() -> None:
        with worker._no_fork_during(repository), repository.engine.begin() as conn:  # BEGIN IMMEDIATE
            conn.exec_driver_sql("SELECT 1")
            writing.set()
            end_write.wait(10)

    thread = threading.Thread(target=heartbeat_like_write)
    thread.start()
    assert writing.wait(10)
    threading.Timer(0.3, end_write.set).start()  # the write ends a moment after the fork is asked for
    pid = os.fork()
    if pid == 0:  # the child: its own connection takes the write lock at once, or fails within 2 s
        try:
            connection = sqlite3.connect(path, timeout=2, isolation_level=None)
            connection.execute("BEGIN IMMEDIATE")
            connection.execute("COMMIT")
        except BaseException:
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    thread.join(10)
    assert os.waitstatus_to_exitcode(status) == 0, "the forked child found the parent's write lock held"
