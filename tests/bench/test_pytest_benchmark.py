"""The suite's cases under pytest-benchmark (bench/test_bench_cases.py): one test per case of every registered
op script, timed with the harness's rounds and calls per sample, skipped with the harness's reason, and no
profiler log in the output."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench import harness
from bench.__main__ import OP_NAMES, QUICK_OPS, plan
from tests.bench.profiler_log import assert_no_profiler_line, default_log_levels

pytest.importorskip("pytest_benchmark", reason="needs pytest-benchmark (pip install -e '.[bench]')")


def pytest_bench(*args: str) -> subprocess.CompletedProcess:
    """``pytest bench ARGS`` at the repository root; stdout and stderr interleaved in ``stdout``."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", "bench", "-p", "no:cacheprovider", *args],
        cwd=harness.ROOT,
        env=default_log_levels(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )


def test_every_case_of_every_op_script_and_of_the_quick_set_is_a_test_named_by_its_id():
    result = pytest_bench("--collect-only", "-q")
    assert result.returncode == 0, result.stdout[-3000:]
    prefix = "bench/test_bench_cases.py::test_case["
    ids = [line[len(prefix) : -1] for line in result.stdout.splitlines() if line.startswith(prefix)]
    full = [case.id for case in plan(OP_NAMES, "cpu", quick=False, only=None)]
    quick = [case.id for case in plan(QUICK_OPS, "cpu", quick=True, only=None)]
    assert len(ids) == len(set(ids)) and set(ids) == set(full) | set(quick)
    assert [i for i in ids if i in set(full)] == full  # in the order python -m bench runs them


def test_a_quick_case_is_timed_as_the_harness_times_it_quietly(tmp_path):
    cases = {case.id: case for case in plan(QUICK_OPS, "cpu", quick=True, only=None)}
    # A training step (profiling its peak memory frees blocks allocated before, which c10 warns about), and a
    # peer that may be missing here.
    timed, maybe_skipped = "train-step/ws-cpu/train-step/mnist-wscnn-c8-b8", "layer/escnn/fwd/mnist-lift-b8"
    if harness._safe_requires(cases[timed]) is not None:
        pytest.skip(f"{timed} cannot run here: {harness._safe_requires(cases[timed])}")
    reason = harness._safe_requires(cases[maybe_skipped])
    report = tmp_path / "run.json"
    selection = f"{timed} or {maybe_skipped}"
    # -s: pytest captures nothing, so whatever the run writes to the descriptors is in the output.
    json_option = f"--benchmark-json={report}"
    result = pytest_bench("--bench-quick", "--benchmark-only", "-k", selection, "-s", "-rs", json_option)
    assert result.returncode == 0, result.stdout[-3000:]
    assert_no_profiler_line(result.stdout)
    benchmarks = {b["extra_info"]["id"]: b for b in json.loads(report.read_text())["benchmarks"]}
    if reason is None:  # escnn is installed here: both are timed
        assert sorted(benchmarks) == sorted([timed, maybe_skipped])
    else:
        assert list(benchmarks) == [timed] and "SKIPPED [1] bench/test_bench_cases.py" in result.stdout
        assert reason in result.stdout.replace("\n", "")
    benchmark = benchmarks[timed]
    info, stats = benchmark["extra_info"], benchmark["stats"]
    assert info["id"] == timed and benchmark["group"] == "train-step/train-step/mnist-wscnn-c8-b8"
    assert info["device"] == "cpu" and info["threads"] == 1 and len(info["load_avg"]) == 3
    assert info["provider"] == "ws-cpu" and info["workload"] == "mnist-wscnn-c8-b8"
    assert info["mode"] == "train-step" and "cpu" in info["backends"]
    assert info["peak_bytes"] > 0  # it did profile
    assert stats["rounds"] == info["rounds"] == harness.QUICK.rounds
    assert stats["iterations"] == info["calls_per_sample"] >= 1
    assert 0 < stats["min"] <= stats["median"] <= stats["max"]


def test_a_saved_run_is_compared_without_a_machine_warning(tmp_path):
    case = "expansion/cpu/fwd/mnist-lift"  # a quick case of microseconds
    (expansion,) = plan(["expansion"], "cpu", quick=True, only=f"^{case}$")
    if harness._safe_requires(expansion) is not None:
        pytest.skip(f"{case} cannot run here: {harness._safe_requires(expansion)}")
    options = ("--bench-quick", "--benchmark-only", "-k", case, f"--benchmark-storage=file://{tmp_path}")
    saved = pytest_bench(*options, "--benchmark-autosave")
    assert saved.returncode == 0, saved.stdout[-3000:]
    assert len(list(tmp_path.rglob("0001_*.json"))) == 1
    compared = pytest_bench(*options, "--benchmark-compare")
    assert compared.returncode == 0, compared.stdout[-3000:]
    # The load average, the date and the commit change between runs: they are not in machine_info.
    assert "machine_info is different" not in compared.stdout
    rows = [line.split()[1] for line in compared.stdout.splitlines() if line.startswith(f"test_case[{case}]")]
    assert len(rows) == 2 and "(NOW)" in rows and any(row.startswith("(0001_") for row in rows), rows
