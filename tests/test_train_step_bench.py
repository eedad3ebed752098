"""The training-step benchmark ``bench/train_step.py``: one short run writes its rows, profile and table,
and the competing busy processes it starts are gone afterwards."""

from __future__ import annotations

import json

import pytest

import symkernels
from bench import train_step


def test_a_short_benchmark_writes_rows_profile_and_table(tmp_path):
    out = tmp_path / "train-step"
    flags = [
        "--threads",
        "1",
        "--busy",
        "0",
        "1",
        "--steps",
        "3",
        "--profile-steps",
        "2",
        "--channels",
        "2",
        "--out",
        str(out),
    ]
    assert train_step.main(flags) == 0
    native_cpu = symkernels.backend_status()["cpu"].usable
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["config"]["dataset"] == "mnist5k" and record["config"]["channels"] == 2
    assert [(r["threads"], r["busy_processes"]) for r in record["rows"]] == [(1, 0), (1, 1)]
    for row in record["rows"]:
        assert len(row["times_ms"]) == 3 and row["median_ms"] > 0
        assert row["sinkhorn_fwd_bwd_ms"] > 0 and row["expansion_fwd_bwd_ms"] > 0
        parts = row["profile_ms"]
        assert {"convolution", "optimizer"} <= set(parts) and all(value >= 0 for value in parts.values())
        if native_cpu:  # the native ops carry their names; the reference backend runs plain ATen ops
            assert {"sinkhorn", "expansion"} <= set(parts)
    table = out.with_suffix(".md").read_text()
    assert "| 1 | 1 |" in table and "Sinkhorn fwd+bwd (ms)" in table


def test_busy_processes_spin_during_the_block_and_are_stopped_after(monkeypatch):
    started = []
    real_popen = train_step.subprocess.Popen

    def recording_popen(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(train_step.subprocess, "Popen", recording_popen)
    with train_step.busy_processes(2):
        assert len(started) == 2 and all(p.poll() is None for p in started)
    assert all(p.poll() is not None for p in started)
    with pytest.raises(RuntimeError), train_step.busy_processes(1):
        raise RuntimeError("the measurement failed")
    assert started[-1].poll() is not None
