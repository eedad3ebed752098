#!/usr/bin/env bash
# One pass over a GPU machine: build, `symkernels info`, the cuda/triton tests, the GPU benchmark and a short
# training run.
#
#   OUT=DIR bash scripts/gpu_check.sh        (default DIR: bench/results/gpu-<UTC date and time>)
#
# Everything goes under $OUT: env.txt (device, driver, versions, commit), one log per stage, stages.tsv
# (stage, exit status, seconds), pytest-gpu.xml, bench/ (rows.jsonl, gpu-bench.json, gpu-bench.md) and
# summary.md. Each stage runs under `timeout` and the whole pass keeps within GPU_CHECK_BUDGET_S seconds
# (default 470, about 8 minutes): a stage that fails or times out is recorded and the next one runs.
#
# Knobs: PYTHON (default: python, else python3), MAX_JOBS (parallel compile jobs, default 16),
# GPU_CHECK_BUDGET_S, GPU_CHECK_SKIP_BUILD=1 (use the installed build), GPU_CHECK_FULL_SUITE=1 (also run the
# whole test suite if time is left).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

OUT="${OUT:-bench/results/gpu-$(date -u +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
BUDGET_S="${GPU_CHECK_BUDGET_S:-470}"
REPORT_RESERVE_S=25 # kept back for the final report
START_S=$(date +%s)
if [[ -n "${PYTHON:-}" ]]; then
  PY="$PYTHON"
elif command -v python >/dev/null 2>&1; then
  PY=python
else
  PY=python3
fi
export MAX_JOBS="${MAX_JOBS:-16}"
export PYTHONUNBUFFERED=1
# The kernels must be compiled for the GPU here, never run in Triton's CPU interpreter.
unset TRITON_INTERPRET

printf 'stage\tstatus\tseconds\tnote\n' >"$OUT/stages.tsv"

remaining() { echo $((BUDGET_S - ($(date +%s) - START_S))); }

# stage NAME MAX_SECONDS COMMAND...: run COMMAND with stdout+stderr in $OUT/NAME.log, under a timeout of at
# most MAX_SECONDS and never past the budget; record its status. Never stops the script.
stage() {
  local name="$1" max="$2"
  shift 2
  local left limit began rc note
  left=$(($(remaining) - REPORT_RESERVE_S))
  limit=$((max < left ? max : left))
  if ((limit < 10)); then
    printf '%s\tskipped\t0\tbudget spent (%ss left)\n' "$name" "$left" >>"$OUT/stages.tsv"
    echo "gpu_check: $name skipped: budget spent"
    return 0
  fi
  echo "gpu_check: $name (limit ${limit}s)"
  began=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  note=""
  if ((rc == 124 || rc == 137)); then note="timed out after ${limit}s"; fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - began))" "$note" >>"$OUT/stages.tsv"
  echo "gpu_check: $name exit $rc $note"
  return 0
}

# The commit, or a fingerprint of the sources where the checkout has no git metadata.
if COMMIT=$(git rev-parse HEAD 2>/dev/null); then
  [[ -n "$(git status --porcelain 2>/dev/null)" ]] && COMMIT="$COMMIT+dirty"
else
  COMMIT="unknown (no git); sources sha256 $(find symkernels triton_kernels csrc bench tests setup.py \
    -type f \( -name '*.py' -o -name '*.cpp' -o -name '*.cu' -o -name '*.h' \) 2>/dev/null | LC_ALL=C sort |
    xargs sha256sum 2>/dev/null | sha256sum | cut -c1-16)"
fi
export SYMKERNELS_COMMIT="$COMMIT"

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $COMMIT"
  echo "python: $(command -v "$PY") $("$PY" --version 2>&1)"
  "$PY" - <<'PYEOF' 2>&1
import torch
print("torch:", torch.__version__, "cuda:", torch.version.cuda, "cudnn:", torch.backends.cudnn.version())
try:
    import triton
    print("triton:", triton.__version__)
except Exception as error:
    print("triton: unavailable:", error)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.1f} GiB")
else:
    print("device: no CUDA device visible")
PYEOF
  echo "nvcc: $(nvcc --version 2>/dev/null | tail -n 1)"
  nvidia-smi 2>&1 || echo "nvidia-smi unavailable"
} >"$OUT/env.txt" 2>&1
printf 'env\t0\t%s\t\n' "$(($(date +%s) - START_S))" >>"$OUT/stages.tsv"

if [[ "${GPU_CHECK_SKIP_BUILD:-0}" != "1" ]]; then
  stage build 240 "$PY" -m pip install --no-build-isolation --no-deps -v -e .
fi
stage info 60 "$PY" -m symkernels info

# All failures are listed (no -x): this pass may be the only one on a GPU. The sm_90 compile check is the
# no-GPU stand-in for what this machine does for real.
stage tests 150 "$PY" -m pytest -m "cuda or triton" -q -rfEs -p no:cacheprovider --maxfail=25 \
  --deselect tests/test_triton_expansion.py::test_kernels_compile_for_hopper \
  --junitxml="$OUT/pytest-gpu.xml"

BENCH="$OUT/bench"
# Each benchmark process stops starting cases 20 s before its stage's limit, then writes its report.
bench_stage() {
  local name="$1" max="$2" sections="$3"
  local left limit
  left=$(($(remaining) - REPORT_RESERVE_S))
  limit=$((max < left ? max : left))
  stage "$name" "$max" "$PY" bench/gpu.py --out "$BENCH" --sections "$sections" --budget-s $((limit > 40 ? limit - 20 : 20))
}
bench_stage bench-main 130 bandwidth,sinkhorn,expansion
bench_stage bench-profile 70 profile
# torch.compile of the unrolled reference loop is slow (minutes for every shape with gradients): last, and
# its goal rows first.
bench_stage bench-compiled 150 compiled

# Training on the GPU end to end: the digits default for a few epochs.
stage train 60 "$PY" -m symkernels train --device cuda --quiet --epochs 5 --out "$OUT/train"
rm -f "$OUT"/train/checkpoint.pt # the metrics, config and figures are the result; checkpoints stay out of git

if [[ "${GPU_CHECK_FULL_SUITE:-0}" == "1" ]]; then
  stage tests-full 300 "$PY" -m pytest -q -rfEs -p no:cacheprovider -m "not slow"
fi

# The report from every row recorded, even when a benchmark stage was cut short.
REPORT_RESERVE_S=0
stage bench-report 30 "$PY" bench/gpu.py --out "$BENCH" --report-only

{
  echo "# GPU check"
  echo
  echo "Commit: $COMMIT. Total: $(($(date +%s) - START_S)) s of a ${BUDGET_S} s budget."
  echo
  grep -E '^(device|torch|triton):' "$OUT/env.txt" | sed 's/^/- /'
  echo
  echo "| stage | status | seconds | note |"
  echo "|---|---|---|---|"
  tail -n +2 "$OUT/stages.tsv" | awk -F'\t' '{ printf "| %s | %s | %s | %s |\n", $1, $2, $3, $4 }'
  echo
  if [[ -f "$OUT/tests.log" ]]; then
    echo "Tests: $(grep -E '(passed|failed|error)' "$OUT/tests.log" | tail -n 1)"
    echo
  fi
  if [[ -f "$BENCH/gpu-bench.md" ]]; then
    sed -n '/^## Goals/,/^## Sinkhorn/p' "$BENCH/gpu-bench.md" | sed '$d'
  fi
} >"$OUT/summary.md"
cat "$OUT/summary.md"
echo "gpu_check: results in $OUT"
