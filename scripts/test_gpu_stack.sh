#!/usr/bin/env bash
# The GPU machines' software stack, checked on a CPU machine: Python 3.12, torch 2.11, triton 3.6 (what the lent
# H100/H200 machines have preinstalled, with no network). In a copy of the checkout, so that this build does not
# replace the one in .venv:
#
#   1. a virtual environment with only torch, triton, numpy and the build/test tools (cached between runs);
#   2. `pip install --no-build-isolation --no-deps -e .`: the CPU and CUDA (sm_90) parts of the native library;
#   3. `import symkernels` and `symkernels info` without TRITON_INTERPRET, as on a GPU machine;
#   4. the smoke tests (`pytest -m smoke`): CPU ops against the reference, opcheck, a model step, the Triton
#      kernels' parity in the interpreter and their compile for sm_90;
#   5. a rehearsal of scripts/gpu_check.sh with the carried wheels if .whl/ has them: the build, `symkernels
#      info` and the benchmark's plan run, every GPU stage skips saying why; the stages must come in the
#      script's order, each with its limit;
#   6. the lean core: with none of the optional packages installed, `symkernels train` exits 2 naming the
#      `pip install` of its extra.
#
#   bash scripts/test_gpu_stack.sh
#
# Knobs: GPU_STACK_PYTHON (default: pyenv's 3.12, else python3.12, else python3), GPU_STACK_TORCH_SPEC
# (torch==2.11.*), GPU_STACK_TRITON_SPEC (triton==3.6.*), SYMKERNELS_CACHE (default ~/.cache/symkernels).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd)"

torch_spec="${GPU_STACK_TORCH_SPEC:-torch==2.11.*}"
triton_spec="${GPU_STACK_TRITON_SPEC:-triton==3.6.*}"
# Triton 3.6's interpreter cannot run loops with run-time bounds under numpy 2.4 (see problem() in
# symkernels/ops/triton_support.py); the GPU machines' compiled kernels are not affected.
numpy_spec="numpy<2.4"
tools=(setuptools wheel ninja pybind11 pytest hypothesis)

if [[ -n "${GPU_STACK_PYTHON:-}" ]]; then
    python_bin="$GPU_STACK_PYTHON"
elif prefix="$(pyenv prefix 3.12 2>/dev/null)" && [[ -x "$prefix/bin/python3.12" ]]; then
    python_bin="$prefix/bin/python3.12"
elif python3.12 --version >/dev/null 2>&1; then
    python_bin="python3.12"
else
    python_bin="python3"
    echo "gpu-stack: no Python 3.12 found; using $("$python_bin" --version 2>&1)"
fi

cache="${SYMKERNELS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/symkernels}"
key="$("$python_bin" --version 2>&1 | tr -cd '0-9.')-$(echo "$torch_spec $triton_spec $numpy_spec ${tools[*]}" |
    sha256sum | cut -c1-12)"
venv="$cache/gpu-stack-venv-$key"
py="$venv/bin/python"
if [[ ! -f "$venv/.complete" ]]; then
    echo "gpu-stack: creating $venv ($torch_spec, $triton_spec, $numpy_spec)"
    rm -rf "$venv"
    "$python_bin" -m venv "$venv"
    "$py" -m pip install -q --disable-pip-version-check "$torch_spec" "$triton_spec" "$numpy_spec" "${tools[@]}"
    touch "$venv/.complete"
fi
"$py" -c 'import sys, torch, triton, numpy
print(f"gpu-stack: python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}, "
      f"numpy {numpy.__version__}")'

commit="$(git rev-parse HEAD)"
[[ -n "$(git status --porcelain)" ]] && commit="$commit+dirty"
export SYMKERNELS_COMMIT="$commit"

# The tracked and untracked-but-not-ignored files, as a GPU machine receives them.
work="$(mktemp -d "${TMPDIR:-/tmp}/symkernels-gpu-stack.XXXXXX")"
trap 'rm -rf "$work"' EXIT
src="$work/src"
mkdir -p "$src"
git ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' path; do [[ -e "$path" ]] && printf '%s\0' "$path"; done | # not deleted ones
    xargs -0 cp --parents -t "$src"
# What a GPU machine gets carried with the checkout (scripts/gpu_check.sh's header).
[[ -d .whl ]] && cp -r .whl "$src/"
cd "$src"

export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"
unset TRITON_INTERPRET

# The rehearsal's build stage is the build: gpu_check.sh runs `pip install --no-build-isolation --no-deps -e .`
# as a GPU machine does, then every stage that needs no GPU.
echo "gpu-stack: rehearsing scripts/gpu_check.sh (build, info, the benchmark's plan; GPU stages skip)"
rehearsal="$work/gpu-check"
# A CPU machine builds slower than a 16-core GPU machine: the rehearsal gets longer limits.
PYTHON="$py" OUT="$rehearsal" GPU_CHECK_BUILD_S=900 GPU_CHECK_BUDGET_S=1200 bash scripts/gpu_check.sh
"$py" - "$rehearsal" <<'PY'
import sys
from pathlib import Path

# scripts/gpu_check.sh's stages, in its order (bench-report runs only when the benchmark wrote rows).
ORDER = ["env", "wheels", "build", "info", "bench-plan", "tests-cuda", "memcheck", "racecheck", "tests-triton",
         "bench-sinkhorn", "bench-small-n", "train", "recovery", "tests-full"]
GPU_STAGES = {"tests-cuda", "memcheck", "racecheck", "tests-triton", "bench-sinkhorn", "bench-small-n", "train"}

out = Path(sys.argv[1])
names = sorted(p.name for p in out.iterdir())
lines = (out / "stages.tsv").read_text().splitlines()
rows = [line.split("\t") for line in lines[1:]]
problems = []
if lines[0].split("\t") != ["stage", "status", "seconds", "limit", "note"]:
    problems.append(f"stages.tsv header: {lines[0]!r}")
stages = [row[0] for row in rows]
if stages != ORDER:
    problems.append(f"stages {stages}, expected {ORDER}")
for row in rows:
    name, status, _seconds, limit, note = row
    if status not in ("0", "skipped"):
        problems.append(f"stage {name} failed: {row}")
    if name != "env" and not limit.isdigit():
        problems.append(f"stage {name} has no limit: {row}")
    if status == "skipped" and not note:
        problems.append(f"stage {name} skipped without a reason: {row}")
    if name in GPU_STAGES and (status != "skipped" or "no CUDA device" not in note):
        problems.append(f"GPU stage {name} did not skip for want of a device: {row}")
for name in ("build", "info", "bench-plan"):
    if not any(row[0] == name and row[1] == "0" for row in rows):
        problems.append(f"the {name} stage did not run and pass")
if len(names) > 8:
    problems.append(f"{len(names)} files in the output folder, at most 8 come back from a GPU machine: {names}")
if not (out / "summary.md").is_file():
    problems.append("no summary.md")
width = max(len(name) for name in stages)
for name, status, seconds, limit, note in rows:
    print(f"gpu-stack:   {name:<{width}}  {status:>7}  {seconds:>4} s of {limit:>4} s  {note}")
if problems:
    sys.exit("gpu-stack: the gpu_check.sh rehearsal failed: " + "; ".join(problems))
print(f"gpu-stack: rehearsal complete: {', '.join(names)}")
PY

echo "gpu-stack: import symkernels without TRITON_INTERPRET"
"$py" - <<'PY'
import symkernels
from symkernels.backends import backend_status

status = backend_status()
for name in ("reference", "cpu", "triton"):
    if name not in status:
        raise SystemExit(f"gpu-stack: backend {name!r} is not reported")
if not status["cpu"].usable:
    raise SystemExit(f"gpu-stack: the native cpu backend is unusable: {status['cpu'].detail}")
print("gpu-stack: backends:", {name: s.usable for name, s in status.items()})
PY
"$py" -m symkernels info

echo "gpu-stack: smoke tests"
"$py" -m pytest -m smoke -q -p no:cacheprovider -rfEs

echo "gpu-stack: a command without its optional packages names the install"
set +e
"$py" -m symkernels train --epochs 1 --out "$work/train" 2>"$work/train.err"
rc=$?
set -e
if [[ $rc -ne 2 ]] || ! grep -q "pip install 'symkernels\[train\]'" "$work/train.err"; then
    cat "$work/train.err"
    echo "gpu-stack: symkernels train without the train extra should exit 2 naming the install (exit $rc)"
    exit 1
fi
