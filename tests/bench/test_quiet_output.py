"""A benchmark run prints its progress and results, nothing else: none of the lines that torch's profiler
(which measures the CPU's peak memory) writes from C++ straight to file descriptor 2. The pytest-benchmark
entry point's run is checked in test_pytest_benchmark.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import torch

from bench import harness, timing
from tests.bench.profiler_log import assert_no_profiler_line, default_log_levels

PROFILER_LINES = (
    b"USDT:2026-12-07 20:54:58 6995:6995 SyncActivityProfilerHandler.cpp:39] profiler_start\n",
    b"STAGE:2026-12-07 20:55:16 7610:7610 SyncActivityProfilerHandler.cpp:38] Completed Stage: Warm Up\n",
    b"ERROR:2026-12-07 20:55:16 7610:7610 DeviceProperties.cpp:56] gpuGetDeviceCount failed with code 35\n",
    b"[W1207 20:57:43.830073750 CPUAllocator.cpp:245] Memory block of unknown size was allocated before\n",
)
# Quick cases that profile: one without a backward, one training step (during it, blocks allocated before the
# profiling are freed, which c10 warns about).
QUICK_CASES = ("sinkhorn/cpu/fwd/mnist-wscnn/init", "train-step/ws-cpu/train-step/mnist-wscnn-c8-b8")


def test_quiet_profiler_drops_only_the_profilers_lines(capfd):
    with timing.quiet_profiler():
        for line in PROFILER_LINES:
            os.write(2, line)
        os.write(2, b"a kernel's own warning\n")
        print("through sys.stderr", file=sys.stderr)
    lines = capfd.readouterr().err.splitlines()
    assert sorted(lines) == ["a kernel's own warning", "through sys.stderr"]
    print("after the block", file=sys.stderr)
    assert capfd.readouterr().err == "after the block\n"


def test_peak_memory_profiles_without_a_line(capfd):
    def allocate() -> torch.Tensor:
        return torch.ones(2**20) * 2

    assert timing.peak_bytes(allocate, "cpu") >= 2 * 4 * 2**20
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""


def test_quick_run_prints_its_progress_and_results_only(tmp_path):
    out = tmp_path / "quick.jsonl"
    only = "^(" + "|".join(map(re.escape, QUICK_CASES)) + ")$"
    command = [sys.executable, "-m", "bench", "--quick", "--only", only, "--rounds", "1", "--out", str(out)]
    result = subprocess.run(
        [*command, "--no-report"],
        cwd=harness.ROOT,
        env=default_log_levels(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # interleaved, as a terminal shows them
        text=True,
    )
    output = result.stdout
    assert result.returncode == 0, output[-4000:]
    assert_no_profiler_line(output)
    lines = output.splitlines()
    assert [line.split(" [")[0] for line in lines] == [*QUICK_CASES, f"rows appended to {out}"], lines
    _, rows = harness.read_records(out)
    assert [row["status"] for row in rows] == ["ok", "ok"], rows
    assert all(row["peak_bytes"] is not None and row["peak_bytes"] > 0 for row in rows)  # it did profile
