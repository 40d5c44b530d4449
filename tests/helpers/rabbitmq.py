"""A RabbitMQ node of a test's own, on free ports, that the test can really stop and start again.

The shared server (127.0.0.1:5672, node rabbit@localhost) is never touched: the private node has its own node
name (`dbsched_<pid>_<hex>@localhost`), AMQP port, distribution port, data, log, pid file, Erlang cookie (its
own HOME) and configuration files, and no plugins (`[].`: no management or prometheus listener on the shared
node's ports). It is started with `rabbitmq-server -detached` and stopped with `rabbitmqctl stop`, which
persists durable queues and their persistent messages, as when a production node is restarted: a message
queued before the stop is delivered after the start. `close()` kills what is left of it
(its beam process, by the pid in its pid file or by its unique node name), also after a failure; a node left by
a killed test run is killed by the next one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

from .polling import wait_for
from .services import free_port

# Debian's scripts, called directly: the wrappers in /usr/sbin `su rabbitmq` and write the shared node's
# startup_log under /var/log/rabbitmq.
RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
NODE_PREFIX = "dbsched_"
START_TIMEOUT = 90.0


def rabbitmq_missing() -> str | None:
    """Why a private node cannot be run here, or None."""
    for tool in ("rabbitmq-server", "rabbitmqctl"):
        if not (RABBITMQ_BIN / tool).exists() and not shutil.which(tool):
            return f"a private RabbitMQ node needs {tool} (Debian's rabbitmq-server)"
    return None


def _tool(name: str) -> str:
    path = RABBITMQ_BIN / name
    return str(path) if path.exists() else (shutil.which(name) or name)


def _node_names() -> dict[int, str]:
    """The RabbitMQ node name of each process started for one (its beam and helpers: the start scripts pass
    it in the environment, not on the command line)."""
    names = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            for variable in (entry / "environ").read_bytes().split(b"\0"):
                if variable.startswith(b"RABBITMQ_NODENAME="):
                    names[int(entry.name)] = variable.split(b"=", 1)[1].decode(errors="replace")
    return names


def _node_pids(node: str) -> list[int]:
    """The live processes of `node` (zombies excluded)."""
    pids = []
    for pid, name in _node_names().items():
        with contextlib.suppress(OSError):
            if name == node and ") Z " not in Path(f"/proc/{pid}/stat").read_text():
                pids.append(pid)
    return pids


def _kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def kill_stale_nodes() -> None:
    """Nodes of this helper whose test process is gone (a killed run): their node name carries its pid."""
    for pid, node in _node_names().items():
        owner = node[len(NODE_PREFIX) :].split("_")[0] if node.startswith(NODE_PREFIX) else ""
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            _kill([pid])


class PrivateRabbitMQ:
    """`rabbitmq-server` on ports of its own; `start()` and `stop()` return how long they took."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.dist_port = free_port()
        self.node = f"{NODE_PREFIX}{os.getpid()}_{uuid.uuid4().hex[:6]}@localhost"
        (folder / "home").mkdir(parents=True, exist_ok=True)
        (folder / "enabled_plugins").write_text("[].\n")
        (folder / "rabbitmq-env.conf").write_text("")  # not /etc/rabbitmq's (NODENAME=rabbit@localhost)
        (folder / "rabbitmq.conf").write_text("")  # not /etc/rabbitmq's (listeners.tcp.local = ...:5672)
        self.pid_file = folder / "node.pid"
        self.running = False

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def env(self) -> dict[str, str]:
        folder = self.folder
        return {
            **os.environ,
            "HOME": str(folder / "home"),  # its own Erlang cookie
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONF_ENV_FILE": str(folder / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(folder / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(folder / "enabled_plugins"),
            "RABBITMQ_PLUGINS_EXPAND_DIR": str(folder / "plugins-expand"),
            "RABBITMQ_MNESIA_BASE": str(folder / "mnesia"),
            "RABBITMQ_LOG_BASE": str(folder / "log"),
            "RABBITMQ_PID_FILE": str(self.pid_file),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(args), env=self.env(), cwd=self.folder, capture_output=True, text=True, timeout=timeout, check=False
        )

    def start(self) -> float:
        """Start the node (its queues and persistent messages as it left them) and wait until it accepts an
        AMQP connection."""
        started = time.monotonic()
        result = self._run(_tool("rabbitmq-server"), "-detached")
        assert result.returncode == 0, f"rabbitmq-server -detached: {result.stdout}{result.stderr}"
        self.running = True
        wait_for(self.ready, START_TIMEOUT, 0.1, f"the private RabbitMQ node {self.node} on port {self.port}")
        return time.monotonic() - started

    def ready(self) -> bool:
        from kombu import Connection

        try:
            with Connection(self.url, connect_timeout=1) as conn:
                conn.ensure_connection(max_retries=1)
            return True
        except Exception:
            log = self.log()
            if "eaddrinuse" in log or "BOOT FAILED" in log:
                raise AssertionError(f"the private RabbitMQ node did not start: {log[-3000:]}") from None
            return False

    def stop(self) -> float:
        """`rabbitmqctl stop`: the node closes its connections, persists its durable queues and exits."""
        started = time.monotonic()
        result = self._run(_tool("rabbitmqctl"), "-n", self.node, "stop")
        assert result.returncode == 0, f"rabbitmqctl stop: {result.stdout}{result.stderr}"
        wait_for(lambda: not _node_pids(self.node), 60, 0.1, f"the RabbitMQ node {self.node} to exit")
        self.running = False
        return time.monotonic() - started

    def log(self) -> str:
        path = self.folder / "log" / f"{self.node}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        """Kill the node and whatever is left of it: its data is the test's and goes with it (a `rabbitmqctl
        shutdown` would take 3 to 4 s more per test)."""
        with contextlib.suppress(OSError, ValueError):
            _kill([int(self.pid_file.read_text().strip())])
        _kill(_node_pids(self.node))
        self.running = False
