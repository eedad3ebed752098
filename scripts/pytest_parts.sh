#!/usr/bin/env bash
# The tests a pytest selection collects, run in several pytest processes side by side, all stopped at a time
# limit with SIGINT (pytest then still prints its summary and writes its junit file; SIGTERM would lose both).
# scripts/gpu_check.sh runs its test stages through it: Triton's compiles and the float64 reference are CPU
# work, and a GPU machine has 16 cores.
#
#   bash scripts/pytest_parts.sh NAME PARTS SECONDS DIR [FIRST] -- PYTEST_ARGS...
#
# Collects what PYTEST_ARGS select (in the current directory), puts the test ids that contain FIRST first, and
# cuts the list into PARTS contiguous runs (cases of one parameter stay together, and share what they compile);
# part K logs to DIR/NAME.partK.log and writes DIR/NAME.partK.xml; the collection's output is DIR/NAME.collect.log.
# Every process (the collection included) ends within SECONDS of the start. PYTHON: the interpreter (default
# python3). Exit status: 124 if a process was stopped at the limit, 5 if nothing was collected, else the largest
# of the processes'.
set -uo pipefail

name="$1" parts="$2" seconds="$3" dir="$4"
shift 4
first=""
if [[ "${1:-}" != "--" ]]; then
  first="$1"
  shift
fi
[[ "${1:-}" == "--" ]] && shift
py="${PYTHON:-python3}"
end=$(($(date +%s) + seconds))
mkdir -p "$dir"

# COMMAND under what is left of the limit; SIGINT there, SIGKILL 20 s later.
limited() {
  local left=$((end - $(date +%s)))
  ((left < 1)) && left=1
  timeout --signal=INT --kill-after=20 "$left" "$@"
}

limited "$py" -m pytest -q -p no:cacheprovider --collect-only "$@" >"$dir/$name.collect.log" 2>&1
collected=$?
ids=()
rest=()
while IFS= read -r id; do
  if [[ -n "$first" && "$id" == *"$first"* ]]; then ids+=("$id"); else rest+=("$id"); fi
done < <(grep -E '^[^ ]+::[^ ]+$' "$dir/$name.collect.log")
ids+=("${rest[@]}")
echo "$name: ${#ids[@]} tests in up to $parts processes"
if ((${#ids[@]} == 0)); then
  tail -n 30 "$dir/$name.collect.log"
  ((collected == 124 || collected == 137)) && exit 124
  exit 5
fi

per=$(((${#ids[@]} + parts - 1) / parts))
pids=()
part=0
for ((start = 0; start < ${#ids[@]}; start += per)); do
  limited "$py" -m pytest -q -rfEs -p no:cacheprovider "${ids[@]:start:per}" \
    --junitxml="$dir/$name.part$part.xml" >"$dir/$name.part$part.log" 2>&1 &
  pids+=($!)
  part=$((part + 1))
done
worst=0
for pid in "${pids[@]}"; do
  wait "$pid"
  rc=$?
  if ((rc == 124 || rc == 137)); then
    worst=124
  elif ((worst != 124 && rc > worst)); then
    worst=$rc
  fi
done
for ((k = 0; k < part; k++)); do
  echo "$name.part$k: $(grep -E '[0-9]+ (passed|failed|error|errors|skipped|deselected)' "$dir/$name.part$k.log" |
    tail -n 1 | tr -d '=')"
done
exit "$worst"
