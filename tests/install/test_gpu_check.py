"""scripts/pytest_parts.sh, which runs scripts/gpu_check.sh's test stages: the selection split over several
pytest processes, and a stage stopped at its limit still reporting (the GPU stages themselves are rehearsed by
scripts/test_gpu_stack.sh; a GPU runs them)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "pytest_parts.sh"

TESTS = textwrap.dedent(
    """
    import os
    import time

    import pytest


    @pytest.mark.parametrize("n", range(5))
    def test_quick(n):
        assert n >= 0


    def test_wanted_first():
        pass


    def test_fails():
        assert False, "on purpose"


    def test_slow():
        time.sleep(float(os.environ.get("SLOW_S", "0")))
    """
)


def run_parts(tmp_path: Path, parts: int, seconds: int, *args: str, slow_s: float = 0.0):
    (tmp_path / "test_sample.py").write_text(TESTS)
    out = tmp_path / "out"
    env = {"PYTHON": sys.executable, "SLOW_S": str(slow_s), "PATH": "/usr/bin:/bin"}
    command = ["bash", str(SCRIPT), "sample", str(parts), str(seconds), str(out), *args]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    return result, out


def junit_counts(path: Path) -> tuple[int, int]:
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    return int(suite.get("tests")), int(suite.get("failures"))


def test_the_selection_is_split_over_processes_with_the_wanted_tests_first(tmp_path):
    result, out = run_parts(tmp_path, 3, 90, "wanted", "--", "test_sample.py")
    assert result.returncode == 1, result.stdout + result.stderr  # test_fails
    assert "sample: 8 tests in up to 3 processes" in result.stdout
    counts = [junit_counts(out / f"sample.part{k}.xml") for k in range(3)]
    assert sum(tests for tests, _ in counts) == 8 and sum(failures for _, failures in counts) == 1
    part0 = ET.parse(out / "sample.part0.xml").getroot().iter("testcase")
    assert next(part0).get("name") == "test_wanted_first"
    logs = "".join((out / f"sample.part{k}.log").read_text() for k in range(3))
    assert "FAILED test_sample.py::test_fails" in logs


def test_a_run_stopped_at_its_limit_still_prints_its_summary_and_writes_its_junit_file(tmp_path):
    """SIGINT at the limit: pytest lists what ran (with timeout's default SIGTERM it printed nothing more and
    wrote no junit file)."""
    result, out = run_parts(tmp_path, 1, 8, "--", "test_sample.py", "-k", "quick or slow", slow_s=60)
    assert result.returncode == 124, result.stdout + result.stderr
    log = (out / "sample.part0.log").read_text()
    assert "KeyboardInterrupt" in log and "5 passed" in log, log
    assert junit_counts(out / "sample.part0.xml")[0] >= 5


def test_nothing_collected_is_an_error(tmp_path):
    result, out = run_parts(tmp_path, 2, 60, "--", "test_sample.py", "-k", "no_such_test")
    assert result.returncode == 5 and "sample: 0 tests" in result.stdout
