#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run the main job; extra arguments are passed to `symkernels train`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh
exec .venv/bin/symkernels train "$@"
