"""The GPU benchmark script without a GPU: its plan (``--dry-run``), the goal verdicts, and one end-to-end
run of a few cheap cases on the CPU (timing harness, incremental rows, JSON and Markdown report)."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from bench import gpu


def test_dry_run_plans_every_section_without_touching_a_gpu(tmp_path):
    cuda_was_initialized = torch.cuda.is_initialized()
    assert gpu.main(["--out", str(tmp_path), "--dry-run"]) == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    cases = plan["cases"]
    ids = [case["id"] for case in cases]
    assert len(ids) == len(set(ids))
    assert plan["sections"] == list(gpu.SECTIONS)
    assert torch.cuda.is_initialized() == cuda_was_initialized  # the plan is checked without touching CUDA
    sinkhorn = [c for c in cases if c["section"] == "sinkhorn"]
    for provider in ("triton", gpu.GROUPED, gpu.REFERENCE, gpu.AUTHORS):
        for workload in gpu.MODEL_STACKS:
            for mode in gpu.MODES:
                for regime in ("init", "sharp"):
                    assert f"sinkhorn/{provider}/{mode}/{workload}/{regime}" in ids
    assert {c["workload"] for c in sinkhorn} == set(gpu.SINKHORN_WORKLOADS)
    assert not any(c["provider"] == gpu.GROUPED and c["workload"] in gpu.BATCHES for c in sinkhorn)
    # The authors' loop syncs with the host every iteration: it cannot be captured in a CUDA graph.
    assert all(not c["graph"] for c in sinkhorn if c["provider"] == gpu.AUTHORS)
    # The forward rows of the batch carry the minimum bytes for the bandwidth goal.
    row = next(c for c in sinkhorn if c["id"] == "sinkhorn/triton/fwd/batch-1024x64x64/sharp")
    assert row["bytes_moved"] == 2 * 4 * 1024 * 64 * 64
    compiled = [c for c in cases if c["section"] == "compiled"]
    assert {c["provider"] for c in compiled} == {gpu.COMPILED}
    assert len(compiled) == len(gpu.SINKHORN_WORKLOADS) * len(gpu.MODES) * 2
    # The goal rows come first in each Sinkhorn section, so a run cut short by its time budget has them.
    assert compiled[0]["mode"] == "fwd+bwd" and compiled[0]["workload"] in gpu.MODEL_STACKS
    expansion = Counter(c["provider"] for c in cases if c["section"] == "expansion")
    assert expansion == {"triton": 24, gpu.REFERENCE: 24}
    profile = {c["id"] for c in cases if c["section"] == "profile"}
    assert {"profile/reference/train-step/wscnn", "profile/plain/train-step/cnn"} <= profile
    assert sum(c["section"] == "bandwidth" for c in cases) == 1
    # A requirement that cannot be met here comes with its reason.
    assert all(c["would_run"] or c["reason"] for c in cases)


def test_plan_filters_and_rejects_unknown_sections():
    cases = gpu.build_plan(["sinkhorn"], only="^sinkhorn/reference/fwd/")
    assert cases and all(c.id.startswith("sinkhorn/reference/fwd/") for c in cases)
    with pytest.raises(ValueError, match="unknown sections"):
        gpu.build_plan(["sinkhorn", "nope"])


def sinkhorn_row(provider, workload, regime, ms, mode="fwd+bwd", **extra):
    return {
        "id": f"sinkhorn/{provider}/{mode}/{workload}/{regime}",
        "kind": "sinkhorn",
        "provider": provider,
        "mode": mode,
        "workload": workload,
        "regime": regime,
        "status": "ok",
        "eager": {"median_ms": ms},
        **extra,
    }


def test_goal_verdicts():
    rows = [
        # mnist init: 200x over the authors' loop, 5x over the compiled reference.
        sinkhorn_row("triton", "mnist-wscnn", "init", 0.10),
        sinkhorn_row(gpu.GROUPED, "mnist-wscnn", "init", 0.05),
        sinkhorn_row(gpu.AUTHORS, "mnist-wscnn", "init", 10.0),
        sinkhorn_row(gpu.COMPILED, "mnist-wscnn", "init", 0.25),
        # cifar sharp: the triton row failed, so only the authors' baseline is known.
        sinkhorn_row(gpu.AUTHORS, "cifar-wsresnet", "sharp", 30.0),
        {**sinkhorn_row("triton", "cifar-wsresnet", "sharp", 0.0), "status": "error", "eager": None},
        {
            "id": "bandwidth/torch/copy/device-to-device/float32",
            "kind": "bandwidth",
            "provider": "torch",
            "status": "ok",
            "bandwidth_gbps": 4000.0,
        },
        sinkhorn_row("triton", "batch-1024x64x64", "sharp", 0.02, mode="fwd", achieved_gbps=3000.0),
        sinkhorn_row("triton", "batch-1024x64x64", "init", 0.01, mode="fwd", achieved_gbps=3200.0),
        sinkhorn_row(gpu.REFERENCE, "batch-1024x64x64", "init", 1.0, mode="fwd", achieved_gbps=40.0),
    ]
    goals = {g["goal"]: g for g in gpu.evaluate_goals(rows)}
    authors = goals["mnist-wscnn fwd+bwd (init logits) >= 100x faster than authors-loop"]
    assert authors["status"] == "met" and authors["ours_provider"] == gpu.GROUPED
    assert authors["speedup"] == pytest.approx(200.0)
    compiled = goals["mnist-wscnn fwd+bwd (init logits) >= 10x faster than reference-compiled"]
    assert compiled["status"] == "not met" and compiled["speedup"] == pytest.approx(5.0)
    assert (
        goals["cifar-wsresnet fwd+bwd (sharp logits) >= 100x faster than authors-loop"]["status"] == "unknown"
    )
    bandwidth = goals["batch-1024x64x64 forward >= 70% of copy bandwidth"]
    # Our best forward counts, never the reference's.
    assert bandwidth["status"] == "met" and bandwidth["fraction"] == pytest.approx(0.8)
    assert set(bandwidth["achieved_gbps"]) == {"triton/sharp", "triton/init"}
    markdown = gpu.markdown({"device_name": "test"}, rows, list(goals.values()))
    assert "**met**" in markdown and "**not met**" in markdown and "**unknown**" in markdown


def test_cpu_run_writes_rows_and_report(tmp_path):
    only = (
        "^(bandwidth/"
        "|expansion/reference/fwd/mnist-lift/float32$"
        "|sinkhorn/authors-loop/fwd/mnist-wscnn/init$)"
    )
    threads = torch.get_num_threads()
    argv = ["--out", str(tmp_path), "--device", "cpu", "--only", only, "--rounds", "2", "--round-s", "0.002"]
    assert gpu.main(argv) == 0
    assert torch.get_num_threads() == threads
    rows = {row["id"]: row for row in gpu.read_rows(tmp_path)}
    assert len(rows) == 3
    copy = rows["bandwidth/torch/copy/device-to-device/float32"]
    assert copy["status"] == "ok" and copy["bandwidth_gbps"] > 0
    expansion = rows["expansion/reference/fwd/mnist-lift/float32"]
    assert (
        expansion["status"] == "ok" and expansion["eager"]["median_ms"] > 0 and expansion["achieved_gbps"] > 0
    )
    authors = rows["sinkhorn/authors-loop/fwd/mnist-wscnn/init"]
    assert authors["status"] == "ok" and authors["graph"] is False  # no CUDA graph of a host-syncing loop
    report = json.loads((tmp_path / "gpu-bench.json").read_text())
    assert report["environment"]["device"] == "cpu" and report["environment"]["torch"] == torch.__version__
    assert {row["id"] for row in report["rows"]} == set(rows)
    assert (tmp_path / "gpu-bench.md").read_text().startswith("# GPU benchmark")
    # The report can be rebuilt from the rows alone (after a run was cut short).
    (tmp_path / "gpu-bench.md").unlink()
    assert gpu.main(["--out", str(tmp_path), "--device", "cpu", "--report-only"]) == 0
    assert (tmp_path / "gpu-bench.md").exists()
    assert len(gpu.read_rows(tmp_path)) == 3


def test_a_failing_case_is_recorded_not_raised(tmp_path):
    def broken(device):
        raise RuntimeError("kernel exploded")

    case = gpu.Case(
        id="sinkhorn/broken/fwd/x/init",
        section="sinkhorn",
        kind="sinkhorn",
        provider="broken",
        mode="fwd",
        workload="x",
        make=broken,
    )
    row = gpu.run_case(case, torch.device("cpu"), gpu.Timer(torch.device("cpu")), rounds=1, round_s=0.001)
    assert row["status"] == "error" and "kernel exploded" in row["error"]["message"]
