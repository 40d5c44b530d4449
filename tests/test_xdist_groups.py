"""The suite's pytest-xdist plugin (helpers/xdist_groups.py): the `e2e` tests run one after another on one
worker, everything else spreads over the workers; it holds with the pytest that breaks xdist's own
`xdist_group` marks (pytest-xdist#1386)."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest
from helpers import xdist_groups

pytest_plugins = ["pytester"]

RECORDING_CONFTEST = """
import json, os, time
import pytest

@pytest.fixture(autouse=True)
def record(request):
    started = time.monotonic()
    yield
    line = {"id": request.node.nodeid, "worker": os.environ["PYTEST_XDIST_WORKER"],
            "start": started, "end": time.monotonic()}
    with open(os.environ["RECORD_TO"], "a") as file:
        file.write(json.dumps(line) + "\\n")
"""


@pytest.mark.processes
def test_e2e_tests_run_one_at_a_time_on_one_worker_and_the_rest_spread(
    pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makeini("[pytest]\nmarkers =\n    e2e: real processes\n")
    pytester.makeconftest(RECORDING_CONFTEST)
    pytester.makepyfile(
        test_e2e_a="import pytest, time\npytestmark = pytest.mark.e2e\n"
        "@pytest.mark.parametrize('i', range(3))\ndef test_a(i):\n    time.sleep(0.2)\n",
        test_plain="import pytest, time\n"
        "@pytest.mark.parametrize('i', range(8))\ndef test_plain(i):\n    time.sleep(0.2)\n\n"
        "@pytest.mark.e2e\ndef test_one_e2e_among_plain():\n    time.sleep(0.2)\n",
    )
    record = tmp_path / "record.jsonl"
    monkeypatch.setenv("RECORD_TO", str(record))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-p", "helpers.xdist_groups", "-n", "2", "--dist", "loadgroup"
    )
    result.assert_outcomes(passed=12)
    lines = [json.loads(line) for line in record.read_text().splitlines()]
    e2e = sorted((line for line in lines if "e2e" in line["id"]), key=lambda line: line["start"])
    plain = [line for line in lines if "e2e" not in line["id"]]
    assert len(e2e) == 4 and len(plain) == 8
    assert len({line["worker"] for line in e2e}) == 1, e2e
    assert all(before["end"] <= after["start"] for before, after in itertools.pairwise(e2e)), e2e
    assert {line["worker"] for line in plain} == {"gw0", "gw1"}, plain


def test_the_workers_are_one_per_core_and_at_most_four(monkeypatch: pytest.MonkeyPatch) -> None:
    for cores, workers in [(None, 1), (1, 1), (2, 2), (4, 4), (64, xdist_groups.MAX_XDIST_WORKERS)]:
        monkeypatch.setattr(os, "cpu_count", lambda cores=cores: cores)
        assert xdist_groups.auto_workers() == workers
    assert xdist_groups.MAX_XDIST_WORKERS == 4


def test_a_worker_that_listed_nothing_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "gw0.json").write_text(json.dumps(["tests/test_e2e.py::test_x"]))
    assert xdist_groups.read_grouped(tmp_path, 1) == {"tests/test_e2e.py::test_x"}
    with pytest.raises(pytest.UsageError, match=r"1 of 2 xdist workers listed their e2e tests .* Run with -n 0"):
        xdist_groups.read_grouped(tmp_path, 2)
