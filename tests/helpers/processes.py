"""Real `celery worker` / `celery beat` subprocesses for end-to-end tests.

    from helpers.polling import wait_for
    from helpers.processes import Processes

    def test_something(processes: Processes) -> None:
        worker = processes.start_worker("my_app", env={...})   # an importable module with `app`
        beat = processes.start_beat("my_app", env={...})
        worker.wait_ready()
        wait_for(lambda: some_row(), timeout=30, message="a run")
        assert worker.stop() == 0

Every process runs in a session of its own (so a prefork worker and its children can be killed together),
writes stdout and stderr to `<tmp_path>/procs/<name>.log`, and is stopped when the test ends (SIGTERM, then
SIGKILL after a timeout). When a test fails, the tail of every process's log is added to its report. The
`processes` fixture and that report hook are in tests/conftest.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from helpers.polling import wait_for

TESTS_DIR = Path(__file__).resolve().parent.parent
REPO_DIR = TESTS_DIR.parent
LOG_TAIL_LINES = 400


class CeleryProcess:
    """One `python -m celery ...` subprocess and its log file."""

    def __init__(self, name: str, args: Sequence[str], env: Mapping[str, str], cwd: Path, log_path: Path) -> None:
        self.name = name
        self.args = list(args)
        self.log_path = log_path
        self.node: str | None = None  # the worker node name (with %h expanded), for workers
        self.started_at = time.monotonic()
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in _reap
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "celery", *self.args],
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: prefork children go with it
        )

    def __repr__(self) -> str:
        return f"<CeleryProcess {self.name} pid={self.pid} returncode={self.returncode}>"

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        text = self.log().splitlines()
        skipped = len(text) - lines
        head = [f"... ({skipped} earlier lines in {self.log_path})"] if skipped > 0 else []
        return "\n".join(head + text[-lines:])

    def describe(self) -> str:
        state = "running" if self.alive() else f"exited with {self.returncode}"
        return f"{self.name} (pid {self.pid}, {state}): {' '.join(self.args)}"

    def wait_for_log(self, text: str, timeout: float = 60.0) -> None:
        """Wait until `text` appears in the log; fail at once (with the log) if the process exits first."""

        def seen() -> bool:
            if text in self.log():
                return True
            if not self.alive():
                raise AssertionError(f"{self.describe()} before logging {text!r}:\n{self.log_tail()}")
            return False

        wait_for(seen, timeout, interval=0.1, message=lambda: f"{text!r} in the log of {self.describe()}")

    def wait_ready(self, timeout: float = 60.0) -> None:
        """A worker has connected and consumes (`<node> ready.`)."""
        self.wait_for_log(" ready.", timeout)

    def send_signal(self, sig: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL the main process only (a crash): prefork children are left to notice on their own."""
        self.send_signal(signal.SIGKILL)
        self.popen.wait()

    def stop(self, sig: int | None = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send `sig` (None: none, it was sent already) and wait up to `timeout` for the exit; then SIGKILL
        the whole process group. Returns the exit code (negative: killed by that signal)."""
        if sig is not None:
            self.send_signal(sig)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self._kill_group()
            self.popen.wait()
        self._kill_group()  # prefork children that outlived their parent
        self._reap()
        return self.popen.returncode

    def _kill_group(self) -> None:
        # The group id is our child's pid (start_new_session): only processes we started are in it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)

    def _reap(self) -> None:
        if not self._log.closed:
            self._log.close()


class Processes:
    """Starts celery subprocesses for a test and stops them all at the end."""

    def __init__(self, folder: Path, env: Mapping[str, str] | None = None) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        # The working directory of every process: stray files (celerybeat-schedule, a default SQLite
        # database) land here, not in the repository.
        self.cwd = folder / "cwd"
        self.cwd.mkdir(exist_ok=True)
        python_path = [str(TESTS_DIR), str(REPO_DIR)]
        if os.environ.get("PYTHONPATH"):
            python_path.append(os.environ["PYTHONPATH"])
        self.env: dict[str, str] = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(python_path),
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        self.started: list[CeleryProcess] = []

    def _unique_name(self, name: str) -> str:
        taken = {p.name for p in self.started}
        if name not in taken:
            return name
        n = 2
        while f"{name}-{n}" in taken:
            n += 1
        return f"{name}-{n}"

    def start_celery(
        self, args: Sequence[str], env: Mapping[str, str] | None = None, name: str = "celery"
    ) -> CeleryProcess:
        """`python -m celery <args>` with the base environment plus `env`; its log is `<name>.log`."""
        name = self._unique_name(name)
        process = CeleryProcess(
            name,
            args,
            {**self.env, **(env or {})},
            self.cwd,
            self.folder / f"{name}.log",
        )
        self.started.append(process)
        return process

    def start_worker(
        self,
        app: str,
        *,
        env: Mapping[str, str] | None = None,
        name: str = "worker",
        node: str | None = None,
        pool: str = "threads",
        concurrency: int = 4,
        queues: Sequence[str] = (),
        loglevel: str = "INFO",
        embedded_beat: str | None = None,
        extra_args: Sequence[str] = (),
    ) -> CeleryProcess:
        """`celery -A app worker` with a unique node name (`e2e-<hex>@%h` unless given) and no mingle,
        gossip or heartbeat (they only slow the start). `process.node` is the expanded node name.

        `embedded_beat="celery_dbsched.Scheduler"` adds `-B --scheduler ...` (on `worker`, `-S` is --statedb)."""
        node = node or f"e2e-{uuid.uuid4().hex[:10]}@%h"
        args = [
            "-A",
            app,
            "worker",
            "-P",
            pool,
            "-c",
            str(concurrency),
            "-n",
            node,
            "-l",
            loglevel,
            "--without-mingle",
            "--without-gossip",
            "--without-heartbeat",
        ]
        if queues:
            args += ["-Q", ",".join(queues)]
        name = self._unique_name(name)
        if embedded_beat:
            args += ["-B", "--scheduler", embedded_beat, "-s", str(self.folder / f"{name}-beat-schedule")]
        process = self.start_celery([*args, *extra_args], env, name)
        process.node = expand_node_name(node)
        return process

    def start_beat(
        self,
        app: str,
        *,
        env: Mapping[str, str] | None = None,
        name: str = "beat",
        scheduler: str = "celery_dbsched.Scheduler",
        loglevel: str = "INFO",
        extra_args: Sequence[str] = (),
    ) -> CeleryProcess:
        """`celery -A app beat -S scheduler`."""
        name = self._unique_name(name)
        args = [
            "-A",
            app,
            "beat",
            "-S",
            scheduler,
            "-l",
            loglevel,
            "-s",
            str(self.folder / f"{name}-schedule"),
        ]
        return self.start_celery([*args, *extra_args], env, name)

    def alive(self) -> list[CeleryProcess]:
        return [p for p in self.started if p.alive()]

    def check_alive(self, *processes: CeleryProcess) -> None:
        """Fail with the log of the first of `processes` (default: all started) that has exited."""
        for process in processes or tuple(self.started):
            if not process.alive():
                raise AssertionError(f"{process.describe()}:\n{process.log_tail()}")

    def stop_all(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
        """Signal every live process at once, then wait for each (SIGKILL after `timeout`)."""
        for process in self.started:
            process.send_signal(sig)
        deadline = time.monotonic() + timeout
        for process in self.started:
            process.stop(None, timeout=max(deadline - time.monotonic(), 0.1))

    def log_sections(self) -> Iterator[tuple[str, str]]:
        for process in self.started:
            yield f"{process.describe()} [{process.log_path}]", process.log_tail()


def expand_node_name(node: str) -> str:
    """Celery's `%h`, `%n` and `%d` in a node name (what the worker reports as its hostname)."""
    host = socket.gethostname()
    name, _, domain = host.partition(".")
    return node.replace("%h", host).replace("%n", name).replace("%d", domain).replace("%%", "%")


# Where the `processes` fixture keeps a test's Processes, for the report hook in conftest.py.
PROCESSES_KEY = pytest.StashKey[Processes]()
