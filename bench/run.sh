#!/usr/bin/env bash
# The benchmark in one command: a virtualenv of its own with the peers (the `bench` extra), then every measure.
#   bench/run.sh                          # N = 1,000 / 10,000 / 100,000 -> docs/benchmarks.md, .png, .json
#   bench/run.sh --n 1000 --quick --out /tmp/b.md   # any bench/run.py option
# BENCH_VENV picks the virtualenv (default .bench-venv in the checkout); it is reused when it exists.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${BENCH_VENV:-.bench-venv}"
if [[ ! -x "$venv/bin/python" ]]; then
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
fi
"$venv/bin/python" -m pip install -q -e ".[bench]"
exec "$venv/bin/python" bench/run.py "$@"
