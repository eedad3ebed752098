"""The command line: ``symkernels info`` and the demo, run as a user runs them."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest


def run_cli(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "symkernels", *args], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_info_reports_versions_build_and_backends():
    out = run_cli("info")
    assert re.search(r"^torch\s+\d", out, re.MULTILINE)
    assert re.search(r"^native library\s+(loaded|not loaded: .+)", out, re.MULTILINE)
    assert re.search(r"^backend reference\s+usable", out, re.MULTILINE)


def test_demo_trains_and_prints_accuracy_and_decomposition():
    out = run_cli("demo", "--epochs", "1", "--train-limit", "96", "--quiet", "--threads", "1")
    accuracy = float(re.search(r"test accuracy: ([0-9.]+)", out).group(1))
    assert 0.0 <= accuracy <= 1.0
    rows = re.findall(r"^(identity|R\d)\s+([0-9. ]+)$", out, re.MULTILINE)
    assert [name for name, _ in rows] == ["identity", "R1", "R2", "R3"]
    for _, values in rows:
        coefficients = [float(v) for v in values.split()]
        assert len(coefficients) == 4 and min(coefficients) >= 0
        assert sum(coefficients) == pytest.approx(1.0, abs=2e-3)
    assert [float(v) for v in rows[0][1].split()] == [1.0, 0.0, 0.0, 0.0]


def test_unknown_command_fails_with_usage():
    result = subprocess.run([sys.executable, "-m", "symkernels", "nope"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "invalid choice" in result.stderr
