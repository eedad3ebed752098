#!/usr/bin/env bash
# Create or update the virtual environment .venv at the repository root and install symkernels into it
# (editable, with the test, train, layerwise and bench extras), its native extension built against the torch installed
# there.
# Safe to run again: when nothing that affects the build changed, it only checks and returns.
#
#   PYTHON                  interpreter that creates .venv (default: python3)
#   SYMKERNELS_TORCH_SPEC   torch to install into a .venv that has none (default: torch==2.14.1)
#   SYMKERNELS_TRITON_SPEC  triton to install with it (default: triton==3.8.*; empty: none)
#   SYMKERNELS_REINSTALL=1  rebuild and reinstall even when nothing changed
# Build knobs (see setup.py): SYMKERNELS_NATIVE, SYMKERNELS_CUDA, CUDA_HOME, TORCH_CUDA_ARCH_LIST, MAX_JOBS.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

venv_python=.venv/bin/python
stamp_file=.venv/.symkernels-setup-stamp

pip_install() { "$venv_python" -m pip install -q --disable-pip-version-check "$@"; }

# A digest of everything that changes what the editable install produces (Python edits need no reinstall).
install_stamp() {
    "$venv_python" - <<'PY'
import hashlib, os, shutil
from importlib import metadata
from pathlib import Path

digest = hashlib.sha256()
files = [Path("setup.py"), Path("pyproject.toml"), Path("scripts/setup.sh"), *sorted(Path("csrc").rglob("*"))]
for path in files:
    if path.is_file():
        digest.update(str(path).encode() + b"\0" + path.read_bytes())
for name in ("SYMKERNELS_NATIVE", "SYMKERNELS_CUDA", "CUDA_HOME", "CUDA_PATH", "TORCH_CUDA_ARCH_LIST"):
    digest.update(f"{name}={os.environ.get(name, '')}\0".encode())
digest.update(f"nvcc={shutil.which('nvcc')}\0".encode())
for dist in ("torch", "symkernels"):
    try:
        digest.update(f"{dist}={metadata.version(dist)}\0".encode())
    except metadata.PackageNotFoundError:
        digest.update(f"{dist}=missing\0".encode())
digest.update(f"build record={Path('symkernels/_build_info.json').is_file()}".encode())
print(digest.hexdigest())
PY
}

if [ ! -x "$venv_python" ]; then
    python_bin="${PYTHON:-python3}"
    echo "setup: creating .venv with $("$python_bin" --version 2>&1)"
    "$python_bin" -m venv .venv
    pip_install --upgrade pip setuptools wheel
fi

if ! "$venv_python" -c "import torch" >/dev/null 2>&1; then
    torch_spec="${SYMKERNELS_TORCH_SPEC:-torch==2.14.1}"
    triton_spec="${SYMKERNELS_TRITON_SPEC-triton==3.8.*}"
    echo "setup: installing $torch_spec $triton_spec (large, once)"
    pip_install "$torch_spec" ${triton_spec:+"$triton_spec"}
fi

if [ "${SYMKERNELS_REINSTALL:-0}" != "1" ] && [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$(install_stamp)" ]
then
    echo "setup: .venv is up to date"
    exit 0
fi

echo "setup: installing dependencies and building symkernels (editable; the native build takes about a minute)"
rm -f "$stamp_file"
pip_install numpy pybind11 ninja setuptools wheel
pip_install --no-build-isolation -e ".[test,train,layerwise,bench]"
install_stamp > "$stamp_file"
"$venv_python" - <<'PY'
import json

record = json.load(open("symkernels/_build_info.json"))
if not record["native"]:
    print("setup: done (no native code: SYMKERNELS_NATIVE=0)")
else:
    cuda = "with CUDA kernels" if record["cuda"] else f"CPU only: {record['cuda_skip_reason']}"
    print(f"setup: done (native library built against torch {record['torch_version']}, {cuda})")
PY
