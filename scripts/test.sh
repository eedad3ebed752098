#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh), lint, and run the test suite; extra arguments are passed to pytest. Without
# arguments, then the benchmark suite's smoke test: each quick case once, untimed, under pytest-benchmark
# (bench/test_bench_cases.py; the normal run, on tests/, times nothing).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh
echo "test: ruff check ."
.venv/bin/ruff check .
echo "test: pytest $*"
if [ $# -gt 0 ]; then
    exec .venv/bin/python -m pytest "$@"
fi
.venv/bin/python -m pytest
echo "test: pytest bench --bench-quick --benchmark-disable"
.venv/bin/python -c "import pytest_benchmark"  # without it the smoke test would only skip
exec .venv/bin/python -m pytest bench --bench-quick --benchmark-disable -p no:cacheprovider
