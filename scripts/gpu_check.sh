#!/usr/bin/env bash
# One pass over a GPU machine: build, `symkernels info`, the cuda/triton tests, compute-sanitizer on the CUDA
# kernels, the GPU benchmark and a short training run, within a time budget. Without a visible CUDA device the GPU stages are skipped (each says why),
# so the pass can be rehearsed on a CPU machine (scripts/test_gpu_stack.sh does, in CI).
#
#   OUT=DIR bash scripts/gpu_check.sh        (default DIR: bench/results/gpu-<UTC date and time>)
#
# What is left in $OUT is small, because a GPU machine sends back at most 8 files, 2 folders deep:
#   summary.md      what ran, passed, failed and was measured (readable alone);
#   stages.tsv      stage, exit status, seconds, note;
#   results.tar.gz  everything else: env.txt (device, driver, versions, commit), one log per stage,
#                   pytest-cuda.xml, pytest-gpu.xml, bench/ (rows.jsonl, gpu-bench.json, gpu-bench.md),
#                   train/ (metrics, figures).
# Each stage runs under `timeout` and the whole pass keeps within GPU_CHECK_BUDGET_S seconds (default 470,
# about 8 minutes): a stage that fails or times out is recorded and the next one runs.
#
# Knobs: PYTHON (default: python3, the interpreter that holds torch on the GPU machines), MAX_JOBS (parallel
# compile jobs, default 16), GPU_CHECK_BUDGET_S, GPU_CHECK_BUILD_S (the build's limit, default 240),
# GPU_CHECK_SKIP_BUILD=1 (use the installed build), GPU_CHECK_FULL_SUITE=1 (also run the whole test suite if
# time is left), SYMKERNELS_COMMIT (recorded as the commit; default: from git).
# Python packages the machine lacks can travel as wheels in .whl/ (scripts/gpu_wheels.sh fetches them): they are
# installed into a private folder on PYTHONPATH first.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

OUT="${OUT:-bench/results/gpu-$(date -u +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")" # full logs; packed into results.tar.gz at the end
BUDGET_S="${GPU_CHECK_BUDGET_S:-470}"
REPORT_RESERVE_S=25 # kept back for the final report
START_S=$(date +%s)
PY="${PYTHON:-python3}"
export MAX_JOBS="${MAX_JOBS:-16}"
export PYTHONUNBUFFERED=1
# The kernels must be compiled for the GPU here, never run in Triton's CPU interpreter.
unset TRITON_INTERPRET

printf 'stage\tstatus\tseconds\tnote\n' >"$OUT/stages.tsv"

remaining() { echo $((BUDGET_S - ($(date +%s) - START_S))); }

record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$OUT/stages.tsv"; }

# stage NAME MAX_SECONDS COMMAND...: run COMMAND with stdout+stderr in $WORK/NAME.log, under a timeout of at
# most MAX_SECONDS and never past the budget; record its status. Never stops the script.
stage() {
  local name="$1" max="$2"
  shift 2
  local left limit began rc note
  left=$(($(remaining) - REPORT_RESERVE_S))
  limit=$((max < left ? max : left))
  if ((limit < 10)); then
    record "$name" skipped 0 "budget spent (${left}s left)"
    echo "gpu_check: $name skipped: budget spent"
    return 0
  fi
  echo "gpu_check: $name (limit ${limit}s)"
  began=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$WORK/$name.log" 2>&1
  rc=$?
  note=""
  if ((rc == 124 || rc == 137)); then note="timed out after ${limit}s"; fi
  record "$name" "$rc" "$(($(date +%s) - began))" "$note"
  echo "gpu_check: $name exit $rc $note"
  return 0
}

# gpu_stage: a stage that needs a CUDA device; without one it is recorded as skipped, with the reason.
gpu_stage() {
  if [[ "$HAS_GPU" != "1" ]]; then
    record "$1" skipped 0 "no CUDA device visible"
    echo "gpu_check: $1 skipped: no CUDA device visible"
    return 0
  fi
  stage "$@"
}

if compgen -G ".whl/*.whl" >/dev/null; then
  site="$WORK/site"
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl; then
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "gpu_check: installing the wheels in .whl/ failed; going on without them"
  fi
fi

# The commit, or a fingerprint of the sources where the checkout has no git metadata.
if [[ -n "${SYMKERNELS_COMMIT:-}" ]]; then
  COMMIT="$SYMKERNELS_COMMIT"
elif COMMIT=$(git rev-parse HEAD 2>/dev/null); then
  [[ -n "$(git status --porcelain 2>/dev/null)" ]] && COMMIT="$COMMIT+dirty"
else
  COMMIT="unknown (no git); sources sha256 $(find symkernels triton_kernels csrc bench tests setup.py \
    -type f \( -name '*.py' -o -name '*.cpp' -o -name '*.cu' -o -name '*.h' \) 2>/dev/null | LC_ALL=C sort |
    xargs sha256sum 2>/dev/null | sha256sum | cut -c1-16)"
fi
export SYMKERNELS_COMMIT="$COMMIT"

HAS_GPU=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $COMMIT"
  echo "python: $(command -v "$PY") $("$PY" --version 2>&1)"
  "$PY" - <<'PYEOF' 2>&1
import torch
print("torch:", torch.__version__, "cuda:", torch.version.cuda, "cudnn:", torch.backends.cudnn.version())
for name in ("triton", "numpy"):
    try:
        print(f"{name}:", __import__(name).__version__)
    except Exception as error:
        print(f"{name}: unavailable:", error)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.1f} GiB")
else:
    print("device: no CUDA device visible")
PYEOF
  echo "nvcc: $(nvcc --version 2>/dev/null | tail -n 1)"
  nvidia-smi 2>&1 || echo "nvidia-smi unavailable"
} >"$WORK/env.txt" 2>&1
record env 0 "$(($(date +%s) - START_S))" ""

if [[ "${GPU_CHECK_SKIP_BUILD:-0}" != "1" ]]; then
  stage build "${GPU_CHECK_BUILD_S:-240}" "$PY" -m pip install --no-build-isolation --no-deps -v -e .
fi
stage info 60 "$PY" -m symkernels info

# All failures are listed (no -x): this pass may be the only one on a GPU. The CUDA kernels' own tests first
# (the parity matrix over every GPU size, T and dtype; the launch contract: streams, CUDA graphs,
# torch.compile), so that the native kernels are checked even if the rest runs long.
gpu_stage tests-cuda 150 "$PY" -m pytest -m cuda -q -rfEs -p no:cacheprovider --maxfail=25 \
  tests/ops/test_cuda_kernels.py "tests/ops/test_sinkhorn.py::test_gpu_parity_matrix" --junitxml="$WORK/pytest-cuda.xml"
# The sm_90 compile check is the no-GPU stand-in for what this machine does for real.
gpu_stage tests 150 "$PY" -m pytest -m "cuda or triton" -q -rfEs -p no:cacheprovider --maxfail=25 \
  --deselect tests/install/test_triton_compile.py::test_kernels_compile_for_hopper_without_spills \
  --deselect "tests/ops/test_sinkhorn.py::test_gpu_parity_matrix" --ignore tests/ops/test_cuda_kernels.py \
  --junitxml="$WORK/pytest-gpu.xml"

# compute-sanitizer over a short workload per CUDA kernel path (tests/ops/test_cuda_kernels.py -k sanitizer), with
# PyTorch's caching allocator off so that every buffer is its own allocation (an overrun inside a cached block
# is invisible to memcheck). Some sandboxes refuse the device to the tool: that is recorded as a skip with the
# reason, while an error the tool reports, or a failing test, fails the stage.
SANITIZER="$(command -v compute-sanitizer || true)"
for candidate in "${CUDA_HOME:-}" /usr/local/cuda /usr/local/cuda-*; do
  [[ -z "$SANITIZER" && -n "$candidate" && -x "$candidate/bin/compute-sanitizer" ]] &&
    SANITIZER="$candidate/bin/compute-sanitizer"
done
sanitizer_stage() {
  local tool="$1" max="$2" name="sanitizer-$1"
  if [[ "$HAS_GPU" == "1" && -z "$SANITIZER" ]]; then
    record "$name" skipped 0 "compute-sanitizer not found"
    echo "gpu_check: $name skipped: compute-sanitizer not found"
    return 0
  fi
  gpu_stage "$name" "$max" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" --error-exitcode 3 \
    --target-processes all "$PY" -m pytest -q -p no:cacheprovider -rfEs tests/ops/test_cuda_kernels.py -k sanitizer
  local log="$WORK/$name.log" last
  last="$(tail -n 1 "$OUT/stages.tsv")"
  if [[ -f "$log" && "$(cut -f2 <<<"$last")" != "0" && "$(cut -f2 <<<"$last")" != "skipped" ]] &&
    ! grep -qE "ERROR SUMMARY: [1-9]" "$log" &&
    grep -qiE "not supported|unable to (attach|connect|initiali)|insufficient permission|failed to (launch|initiali)" \
      "$log"; then
    sed -i '$d' "$OUT/stages.tsv"
    record "$name" skipped "$(cut -f3 <<<"$last")" "compute-sanitizer could not use the device (see $name.log)"
  fi
}
sanitizer_stage memcheck 90
sanitizer_stage racecheck 90

BENCH="$WORK/bench"
# Each benchmark process stops starting cases 20 s before its stage's limit, then writes its report.
bench_stage() {
  local name="$1" max="$2" sections="$3"
  local left limit
  left=$(($(remaining) - REPORT_RESERVE_S))
  limit=$((max < left ? max : left))
  gpu_stage "$name" "$max" "$PY" bench/gpu.py --out "$BENCH" --sections "$sections" \
    --budget-s $((limit > 40 ? limit - 20 : 20))
}
bench_stage bench-main 130 bandwidth,sinkhorn,expansion
bench_stage bench-steps 70 layer,train-step,overhead
# torch.compile of the unrolled reference loop is slow (minutes for every shape with gradients): last, and
# its goal rows first.
bench_stage bench-compiled 150 compiled

# Training on the GPU end to end: the default data set for a few epochs.
gpu_stage train 60 "$PY" -m symkernels train --device cuda --quiet --epochs 5 --out "$WORK/train"
rm -f "$WORK"/train/checkpoint.pt # the metrics, config and figures are the result; checkpoints stay out of git

# The paper's width on the GPU for the minutes left of this stage: the lifting stack's trajectory by steps.
gpu_stage recovery 220 "$PY" bench/recovery.py --device cuda --channels 32 --steps 94000 --max-minutes 2.8 \
  --out "$WORK/recovery" --run-dir "$WORK/recovery-run"
rm -rf "$WORK/recovery-run"

if [[ "${GPU_CHECK_FULL_SUITE:-0}" == "1" ]]; then
  stage tests-full 300 "$PY" -m pytest -q -rfEs -p no:cacheprovider -m "not slow"
fi

# The report from every row recorded, even when a benchmark stage was cut short.
REPORT_RESERVE_S=0
if [[ -f "$BENCH/rows.jsonl" ]]; then
  stage bench-report 30 "$PY" bench/gpu.py --out "$BENCH" --report-only
fi

{
  echo "# GPU check"
  echo
  echo "Commit: $COMMIT. Total: $(($(date +%s) - START_S)) s of a ${BUDGET_S} s budget."
  echo
  grep -E '^(device|torch|triton|numpy):' "$WORK/env.txt" | sed 's/^/- /'
  echo
  echo "| stage | status | seconds | note |"
  echo "|---|---|---|---|"
  tail -n +2 "$OUT/stages.tsv" | awk -F'\t' '{ printf "| %s | %s | %s | %s |\n", $1, $2, $3, $4 }'
  echo
  for log in "$WORK"/tests*.log; do
    [[ -f "$log" ]] || continue
    echo "$(basename "$log" .log): $(grep -E ' (passed|failed|error|skipped|deselected)' "$log" | tail -n 1 | tr -d '=')"
    grep -E '^(FAILED|ERROR) ' "$log" | head -n 25 | sed 's/^/- /'
    echo
  done
  if [[ -f "$BENCH/gpu-bench.md" ]]; then
    sed -n '/^### Goals/,/^### Sinkhorn/p' "$BENCH/gpu-bench.md" | sed '$d'
  fi
  failed=$(tail -n +2 "$OUT/stages.tsv" | awk -F'\t' '$2 != "0" && $2 != "skipped" { print $1 }' | paste -sd, -)
  echo
  echo "Failed stages: ${failed:-none}. Full logs and results: results.tar.gz."
} >"$OUT/summary.md"
tar -czf "$OUT/results.tar.gz" -C "$WORK" --exclude=site .
rm -rf "$WORK"
cat "$OUT/summary.md"
echo "gpu_check: results in $OUT"
