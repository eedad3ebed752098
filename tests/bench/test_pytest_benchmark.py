"""The suite's cases under pytest-benchmark (bench/test_bench_cases.py): one test per case of every registered
op script, timed with the harness's rounds and calls per sample, skipped with the harness's reason, and no
profiler log in the output."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass

import pytest

from bench import harness
from bench.__main__ import OP_NAMES, QUICK_OPS, plan
from bench.test_bench_cases import planned
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


class Options:
    """The command line's --bench-* options, as ``pytest.Config.getoption`` returns them."""

    def __init__(self, **values: object) -> None:
        self.values = values

    def getoption(self, name: str, default: object = None) -> object:
        return self.values.get(name, default)


def test_every_case_of_every_op_script_and_of_the_quick_set_is_a_test():
    full = [case.id for case in plan(OP_NAMES, "cpu", quick=False, only=None)]
    quick = [case.id for case in plan(QUICK_OPS, "cpu", quick=True, only=None)]
    ids = [case.id for case in planned(Options())]
    assert len(ids) == len(set(ids)) and set(ids) == set(full) | set(quick)
    assert [i for i in ids if i in set(full)] == full  # in the order python -m bench runs them
    assert [case.id for case in planned(Options(bench_quick=True))] == quick


# A training step (profiling its peak memory frees blocks allocated before, which c10 warns about), and a peer
# that may be missing here.
TIMED, MAYBE_SKIPPED = "train-step/ws-cpu/train-step/mnist-wscnn-c8-b8", "layer/escnn/fwd/mnist-lift-b8"
QUICK = ("--bench-quick", "--benchmark-only")


@dataclass
class SavedRun:
    output: str
    report: dict
    storage: str  # --benchmark-storage option
    skip_reason: str | None  # the harness's reason for MAYBE_SKIPPED


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory: pytest.TempPathFactory) -> SavedRun:
    """One quick run of TIMED and MAYBE_SKIPPED, autosaved: its JSON report and its output (-s: pytest
    captures nothing, so whatever the run writes to the descriptors is in it)."""
    cases = {case.id: case for case in plan(QUICK_OPS, "cpu", quick=True, only=None)}
    if harness._safe_requires(cases[TIMED]) is not None:
        pytest.skip(f"{TIMED} cannot run here: {harness._safe_requires(cases[TIMED])}")
    folder = tmp_path_factory.mktemp("saved")
    report, storage = folder / "run.json", f"--benchmark-storage=file://{folder / 'storage'}"
    selection = f"{TIMED} or {MAYBE_SKIPPED}"
    result = pytest_bench(
        *QUICK, "-k", selection, "-s", "-rs", f"--benchmark-json={report}", storage, "--benchmark-autosave"
    )
    assert result.returncode == 0, result.stdout[-3000:]
    return SavedRun(
        result.stdout, json.loads(report.read_text()), storage, harness._safe_requires(cases[MAYBE_SKIPPED])
    )


def test_a_quick_case_is_timed_as_the_harness_times_it_quietly(saved_run: SavedRun):
    assert_no_profiler_line(saved_run.output)
    benchmarks = {b["extra_info"]["id"]: b for b in saved_run.report["benchmarks"]}
    if saved_run.skip_reason is None:  # escnn is installed here: both are timed
        assert sorted(benchmarks) == sorted([TIMED, MAYBE_SKIPPED])
    else:
        assert list(benchmarks) == [TIMED] and "SKIPPED [1] bench/test_bench_cases.py" in saved_run.output
        assert saved_run.skip_reason in saved_run.output.replace("\n", "")
    benchmark = benchmarks[TIMED]
    info, stats = benchmark["extra_info"], benchmark["stats"]
    assert benchmark["group"] == "train-step/train-step/mnist-wscnn-c8-b8"
    assert info["device"] == "cpu" and info["threads"] == 1 and len(info["load_avg"]) == 3
    assert info["provider"] == "ws-cpu" and info["workload"] == "mnist-wscnn-c8-b8"
    assert info["mode"] == "train-step" and "cpu" in info["backends"]
    assert info["peak_bytes"] > 0  # it did profile
    assert stats["rounds"] == info["rounds"] == harness.QUICK.rounds
    assert stats["iterations"] == info["calls_per_sample"] >= 1
    assert 0 < stats["min"] <= stats["median"] <= stats["max"]


def test_a_saved_run_is_compared_without_a_machine_warning(saved_run: SavedRun):
    compared = pytest_bench(*QUICK, "-k", TIMED, saved_run.storage, "--benchmark-compare")
    assert compared.returncode == 0, compared.stdout[-3000:]
    # The load average, the date and the commit change between runs: they are not in machine_info.
    assert "machine_info is different" not in compared.stdout
    rows = [
        line.split()[1] for line in compared.stdout.splitlines() if line.startswith(f"test_case[{TIMED}]")
    ]
    assert len(rows) == 2 and "(NOW)" in rows and any(row.startswith("(0001_") for row in rows), rows
