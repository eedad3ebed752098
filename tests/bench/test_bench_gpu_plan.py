"""The GPU suite's entry point (bench/gpu.py) without a GPU: its plan (``--dry-run``), the GPU goals, and one
end-to-end run of a few cheap cases on the CPU (rows, report, rebuilding the report from the rows)."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from bench import gpu, harness, report
from bench.selection import POT
from bench.workloads import TINY_WORKLOADS


def test_dry_run_plans_every_section_without_touching_a_gpu(tmp_path):
    cuda_was_initialized = torch.cuda.is_initialized()
    assert gpu.main(["--out", str(tmp_path), "--dry-run"]) == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    cases = plan["cases"]
    ids = [case["id"] for case in cases]
    assert len(ids) == len(set(ids))
    # (small-n has cases once bench/workloads.py has workloads of n <= 8)
    assert plan["sections"] == [s for s in gpu.SECTIONS if s != "small-n" or gpu.small_n_workloads()]
    assert torch.cuda.is_initialized() == cuda_was_initialized  # the plan is checked without touching CUDA
    sinkhorn = [c for c in cases if c["section"] == "sinkhorn"]
    for provider in ("cuda", "triton", "triton-grouped", "reference", "authors-loop", "pot-scaling"):
        for workload in ("mnist-wscnn", "cifar-wsresnet"):
            for mode in ("fwd", "fwd+bwd"):
                for regime in ("init", "sharp"):
                    assert f"sinkhorn/{provider}/{mode}/{workload}/{regime}" in ids
    assert {c["workload"] for c in sinkhorn} == {
        "mnist-wscnn",
        "cifar-wsresnet",
        "batch-1024x16x16",
        "batch-1024x64x64",
        "batch-64x256x256",
        *TINY_WORKLOADS,
    }
    # The tiny workloads: both GPU kernels (public function and op) against the references, POT and the floor.
    for workload in TINY_WORKLOADS:
        providers = {c["provider"] for c in sinkhorn if c["workload"] == workload and c["mode"] == "fwd+bwd"}
        assert providers == {"cuda", "cuda-op", "triton", "triton-op", "reference", "copy-floor", *POT}
    assert not any(c["provider"].endswith("-grouped") and c["workload"].startswith("batch") for c in sinkhorn)
    # Host-syncing providers cannot be captured in a CUDA graph.
    assert all(not c["graph"] for c in sinkhorn if c["provider"] in ("authors-loop", "pot-log"))
    # The forward rows carry the minimum bytes for the bandwidth goal.
    row = next(c for c in sinkhorn if c["id"] == "sinkhorn/triton/fwd/batch-1024x64x64/sharp")
    assert row["bytes_moved"] == 2 * 4 * 1024 * 64 * 64
    compiled = [c for c in cases if c["section"] == "compiled"]
    assert {c["provider"] for c in compiled} == {"reference-compiled"}
    assert len(compiled) == 5 * 2 * 2 + len(TINY_WORKLOADS) * 2
    # The goal rows come first, the compiled reference last, so a run cut short by its budget has them.
    assert sinkhorn[0]["mode"] == "fwd+bwd" and sinkhorn[0]["workload"] == "mnist-wscnn"
    assert cases[-1]["section"] == "compiled"
    expansion = Counter(c["provider"] for c in cases if c["section"] == "expansion")
    assert expansion == {"cuda": 36, "triton": 36, "reference": 36}
    conv_ready = [c for c in cases if c["section"] == "expansion" and c["regime"] == "channels_last-bf16"]
    assert len(conv_ready) == 36 and all(c["dtype"] == "float32" for c in conv_ready)
    steps = {c["id"] for c in cases if c["section"] == "train-step"}
    assert {
        "train-step/ws-triton/train-step/mnist-wscnn",
        "train-step/plain-cnn/train-step/cifar-wsresnet",
    } <= steps
    assert sum(c["section"] == "bandwidth" for c in cases) == 1
    # A requirement that cannot be met here comes with its reason.
    assert all(c["would_run"] or c["reason"] for c in cases)


def test_small_n_workloads_are_timed_in_their_own_section(monkeypatch):
    """Workloads of n <= 8 in bench/workloads.py (the hyper-connection batches) are picked up by their shapes:
    the CUDA and Triton kernels and the compiled reference timed in one group per workload, mode and regime,
    forward + backward first and n = 4's largest batch first; the other sections leave them out."""
    from bench import workloads

    added = {
        "tiny-32768x4x4": [(32768, 4, 4)],
        "tiny-262144x4x4": [(262144, 4, 4)],
        "tiny-32768x8x8": [(32768, 8, 8)],
    }
    for name, shapes in added.items():
        monkeypatch.setitem(workloads.SINKHORN_WORKLOADS, name, shapes)
    assert set(gpu.small_n_workloads()) >= set(added)
    cases = gpu.build_plan(["sinkhorn", "small-n", "compiled"], "cuda")
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids))
    small = [c for c in cases if c.section == "small-n"]
    assert {c.workload for c in small} == set(added)
    assert all(c.workload not in added for c in cases if c.section != "small-n")
    groups = harness.groups_of(small)
    assert len(groups) == len(added) * 2 * 2  # modes x regimes
    assert all(sorted(c.provider for c in g) == sorted(gpu.SMALL_N_PROVIDERS) for g in groups)
    assert groups[0][0].workload == "tiny-262144x4x4" and groups[0][0].mode == "fwd+bwd"
    modes = [g[0].mode for g in groups]
    assert modes == sorted(modes, key=lambda mode: mode != "fwd+bwd")


def test_plan_filters_and_rejects_unknown_sections():
    cases = gpu.build_plan(["sinkhorn"], "cuda", only="^sinkhorn/reference/fwd/")
    assert cases and all(c.id.startswith("sinkhorn/reference/fwd/") for c in cases)
    with pytest.raises(ValueError, match="unknown sections"):
        gpu.build_plan(["sinkhorn", "nope"], "cuda")


def gpu_row(provider, workload, regime, ms, mode="fwd+bwd", op="sinkhorn", **extra):
    return {
        "op": op,
        "provider": provider,
        "mode": mode,
        "workload": workload,
        "regime": regime,
        "status": "ok",
        "median_ms": ms,
        **extra,
    }


def test_gpu_goal_verdicts():
    setup = report.Setup("cuda", "test GPU", 1, 0)
    rows = [
        # mnist init: 200x over the authors' loop (grouped), 5x over the compiled reference.
        gpu_row("triton", "mnist-wscnn", "init", 0.10),
        gpu_row("triton-grouped", "mnist-wscnn", "init", 0.05),
        gpu_row("authors-loop", "mnist-wscnn", "init", 10.0),
        gpu_row("reference-compiled", "mnist-wscnn", "init", 0.25),
        # cifar sharp: the triton row failed, so only the authors' baseline is known.
        gpu_row("authors-loop", "cifar-wsresnet", "sharp", 30.0),
        {**gpu_row("triton", "cifar-wsresnet", "sharp", 0.0), "status": "error"},
        gpu_row("torch", "device-to-device", None, 1.0, mode="copy", op="bandwidth", achieved_gbps=4000.0),
        gpu_row("triton", "batch-1024x64x64", "sharp", 0.02, mode="fwd", achieved_gbps=3000.0),
        gpu_row("triton", "batch-1024x64x64", "init", 0.01, mode="fwd", achieved_gbps=3200.0),
        gpu_row("reference", "batch-1024x64x64", "init", 1.0, mode="fwd", achieved_gbps=40.0),
    ]
    goals = {g["goal"]: g for g in report.goals(setup, rows)}
    authors = goals["mnist-wscnn fwd+bwd (init) ≥ 100× authors-loop"]
    assert authors["status"] == "met" and authors["ours"] == "triton-grouped"
    assert authors["value"] == pytest.approx(200.0)
    compiled = goals["mnist-wscnn fwd+bwd (init) ≥ 10× reference-compiled"]
    assert compiled["status"] == "not met" and compiled["value"] == pytest.approx(5.0)
    assert goals["cifar-wsresnet fwd+bwd (sharp) ≥ 100× authors-loop"]["status"] == "unknown"
    bandwidth = goals["batch-1024x64x64 forward ≥ 70% of copy bandwidth"]
    # Our best forward counts, never the reference's.
    assert bandwidth["status"] == "met" and bandwidth["value"] == pytest.approx(0.8)
    assert set(bandwidth["achieved_gbps"]) == {"triton/sharp", "triton/init"}
    lines = "\n".join(report.goal_lines(list(goals.values())))
    assert "**met**" in lines and "**not met**" in lines and "**unknown**" in lines


def test_cpu_run_writes_rows_and_report(tmp_path):
    only = "^(bandwidth/|expansion/reference/fwd/mnist-lift$|sinkhorn/authors-loop/fwd/mnist-wscnn/init$)"
    threads = torch.get_num_threads()
    argv = ["--out", str(tmp_path), "--device", "cpu", "--only", only, "--rounds", "2", "--quick"]
    assert gpu.main(argv) == 0
    assert torch.get_num_threads() == threads
    runs, rows = harness.read_records(tmp_path / "rows.jsonl")
    by_id = {row["id"]: row for row in rows}
    assert len(by_id) == 3 and all(row["status"] == "ok" for row in rows)
    assert by_id["bandwidth/torch/copy/device-to-device"]["achieved_gbps"] > 0
    assert by_id["expansion/reference/fwd/mnist-lift"]["achieved_gbps"] > 0
    report_json = json.loads((tmp_path / "gpu-bench.json").read_text())
    assert report_json["runs"][0]["env"]["torch"] == torch.__version__
    assert {row["id"] for row in report_json["rows"]} == set(by_id)
    assert "### Bandwidth" in (tmp_path / "gpu-bench.md").read_text()
    # The report can be rebuilt from the rows alone (after a run was cut short).
    (tmp_path / "gpu-bench.md").unlink()
    assert gpu.main(["--out", str(tmp_path), "--report-only"]) == 0
    assert (tmp_path / "gpu-bench.md").exists()
    assert len(harness.read_records(tmp_path / "rows.jsonl")[1]) == 3
