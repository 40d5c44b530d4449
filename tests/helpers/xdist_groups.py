"""Under pytest-xdist (pyproject's addopts: `-n auto --dist loadgroup`) the `e2e` tests run one after another
on one xdist worker, as in a serial run, while every other test spreads over the workers.

The `e2e` tests start real beats and workers and assert bounds in seconds (an outage noticed within 13 s,
claims resumed within 5 s); run two at once on a 2-core machine and they measure each other. Everything else
(the in-process suites, the CLI, the browser) does not mind a neighbour.

Why not `xdist_group` marks: xdist's loadgroup carries a test's group to the controller as a suffix it writes
into the test's node id (`item._nodeid`), and pytest 9.2 computes node ids from a structured id instead, so the
suffix is lost and every test is spread, silently (pytest-xdist#1386, open). Here each worker writes the node
ids of its `e2e` tests to a file in a folder the controller names (`workerinput`) before it reports its
collection, and the controller's scheduler reads them when it splits the tests into work units.

A pytest plugin (tests/conftest.py's `pytest_plugins`); the hooks are xdist's, optional without it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

E2E_GROUP = "e2e-one-at-a-time"
MAX_XDIST_WORKERS = 4  # more would put more CLI and browser processes beside the e2e test than its bounds allow for
_FOLDER_KEY = "dbsched_e2e_folder"


def is_grouped(item: pytest.Item) -> bool:
    return item.get_closest_marker("e2e") is not None


def auto_workers() -> int:
    return max(1, min(os.cpu_count() or 1, MAX_XDIST_WORKERS))


def e2e_scheduler(folder: Path, config: pytest.Config, log: Any) -> Any:
    """xdist's loadgroup, with the `e2e` tests the workers listed in `folder` as one work unit (the largest, so
    it starts first)."""
    from xdist.scheduler import LoadGroupScheduling

    class E2EOneAtATime(LoadGroupScheduling):  # type: ignore[misc]
        grouped: set[str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self.grouped is None:
                self.grouped = read_grouped(folder, len(self.nodes))
            if nodeid in self.grouped:
                return E2E_GROUP
            return str(super()._split_scope(nodeid))

    return E2EOneAtATime(config, log)


def read_grouped(folder: Path, workers: int) -> set[str]:
    files = sorted(folder.glob("*.json"))
    if len(files) < workers:
        raise pytest.UsageError(
            f"tests/helpers/xdist_groups.py: {len(files)} of {workers} xdist workers listed their e2e tests in "
            f"{folder}; without the lists the e2e tests would run at once. Run with -n 0 and report this."
        )
    grouped: set[str] = set()
    for file in files:
        grouped.update(json.loads(file.read_text()))
    return grouped


def write_grouped(session: pytest.Session) -> None:
    """On an xdist worker: list its `e2e` tests for the controller, before the worker reports its collection."""
    workerinput: dict[str, Any] | None = getattr(session.config, "workerinput", None)
    if not workerinput or _FOLDER_KEY not in workerinput:
        return
    path = Path(workerinput[_FOLDER_KEY]) / f"{workerinput['workerid']}.json"
    partial = path.with_suffix(".part")
    partial.write_text(json.dumps([item.nodeid for item in session.items if is_grouped(item)]))
    partial.rename(path)


# -- the hooks ---------------------------------------------------------------------------------------------------

FOLDER = pytest.StashKey[Path]()  # the controller's: where the workers list their e2e tests


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    return auto_workers()


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    config: pytest.Config = node.config
    if FOLDER not in config.stash:
        config.stash[FOLDER] = Path(tempfile.mkdtemp(prefix="dbsched-xdist-"))
    node.workerinput[_FOLDER_KEY] = str(config.stash[FOLDER])


@pytest.hookimpl(optionalhook=True, tryfirst=True)  # before xdist's own, for `--dist loadgroup`
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    if config.getvalue("dist") != "loadgroup" or FOLDER not in config.stash:
        return None
    return e2e_scheduler(config.stash[FOLDER], config, log)


@pytest.hookimpl(tryfirst=True)  # before xdist's worker reports the collection
def pytest_collection_finish(session: pytest.Session) -> None:
    write_grouped(session)


def pytest_report_header(config: pytest.Config) -> str | None:
    if not config.getoption("numprocesses", None):
        return None
    return "celery_dbsched: e2e tests one at a time on one xdist worker, the rest spread (-n 0: all in one process)"


def pytest_unconfigure(config: pytest.Config) -> None:
    if FOLDER in config.stash:
        shutil.rmtree(config.stash[FOLDER], ignore_errors=True)
