"""The command line: ``symkernels info`` and ``toy``, run as a user runs them."""

from __future__ import annotations

import json
import re
import subprocess
import sys


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


def test_unknown_command_fails_with_usage():
    result = subprocess.run([sys.executable, "-m", "symkernels", "nope"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


def test_toy_recovers_shifts_and_writes_json(tmp_path):
    report = tmp_path / "toy.json"
    out = run_cli("toy", "shift1d", "--partial", "--json", str(report))
    assert "RECOVERED" in out and "NOT RECOVERED" not in out
    result = json.loads(report.read_text())
    assert result["recovered"] is True
    assert result["assigned"] == result["target"]
