#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh), lint, and run the test suite; extra arguments are passed to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh
echo "test: ruff check ."
.venv/bin/ruff check .
echo "test: pytest $*"
exec .venv/bin/python -m pytest "$@"
