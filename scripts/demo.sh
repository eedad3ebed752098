#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run the demo; extra arguments are passed to `symkernels demo`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh
exec .venv/bin/symkernels demo "$@"
