"""The benchmark suite (bench/): the harness's timing, interleaving, budget, memory and results file; the
providers compute what they claim; the quick set that CI runs end to end; the report and README section."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

import symkernels
from bench import environment, harness, report, timing
from bench import sinkhorn as sinkhorn_bench
from bench.__main__ import main as bench_main
from bench.workloads import TINY_REGIME, TINY_WORKLOADS, make_logits, make_stack
from symkernels.reference import sinkhorn_reference

NATIVE_CPU = symkernels.backend_status()["cpu"].usable


def fake_case(provider: str, fn, **extra) -> harness.Case:
    return harness.Case(op="fake", workload="w", mode="fwd", provider=provider, make=lambda: fn, **extra)


def test_providers_of_a_group_are_interleaved_in_a_rotating_order():
    calls: list[str] = []
    cases = [fake_case(name, lambda name=name: calls.append(name)) for name in "abc"]
    settings = harness.Settings(rounds=3, sample_s=1e-9, max_calls=1, warmup=0)
    rows = harness.measure_group(cases, settings)
    assert [row["status"] for row in rows] == ["ok"] * 3
    assert all(row["rounds"] == 3 and len(row["samples_ms"]) == 3 for row in rows)
    # First calls and the estimate, then one sample per provider per round, each round starting one later.
    timed = calls[3:12]
    assert timed == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]


def test_timing_medians_follow_the_closures_cost():
    settings = harness.Settings(rounds=3, sample_s=0.003, max_calls=50, warmup=1)
    fast, slow = harness.measure_group(
        [fake_case("fast", lambda: None), fake_case("slow", lambda: time.sleep(0.002))], settings
    )
    assert slow["median_ms"] >= 2.0 and fast["median_ms"] < 0.5
    assert slow["p20_ms"] <= slow["median_ms"] <= slow["p80_ms"]
    assert fast["calls_per_sample"] > slow["calls_per_sample"] >= 1


def test_failures_and_requirements_are_recorded_not_raised():
    def broken():
        raise RuntimeError("kernel exploded")

    rows = harness.measure_group(
        [
            fake_case("broken", broken),
            fake_case("missing", lambda: None, requires=lambda: "needs a thing"),
            fake_case("fine", lambda: None),
        ],
        harness.Settings(rounds=2, sample_s=1e-4, warmup=0),
    )
    assert rows[0]["status"] == "error" and "kernel exploded" in rows[0]["error"]["message"]
    assert rows[1]["status"] == "skipped" and rows[1]["reason"] == "needs a thing"
    assert rows[2]["status"] == "ok"


def test_peak_memory_counts_what_one_call_allocates():
    def allocate() -> torch.Tensor:
        a = torch.ones(4 * 2**20 // 4)  # 4 MiB
        b = a * 2  # 4 MiB more while a is alive
        return b.sum()

    peak = timing.peak_bytes(allocate, "cpu")
    assert peak is not None and 8 * 2**20 <= peak < 12 * 2**20
    assert timing.peak_bytes(lambda: None, "cpu") == 0


def test_run_appends_records_and_respects_the_budget(tmp_path):
    out = tmp_path / "results.jsonl"
    cases = [
        fake_case("a", lambda: None),
        harness.Case(
            op="fake", workload="second", mode="fwd", provider="a", make=lambda: lambda: time.sleep(0.05)
        ),
        harness.Case(op="fake", workload="third", mode="fwd", provider="a", make=lambda: lambda: None),
    ]
    settings = harness.Settings(rounds=2, sample_s=1e-4, warmup=0, budget_s=0.05)
    run_id = harness.run(cases, settings, out, threads=[1], command="test")
    with out.open("a") as sink:
        sink.write('{"record": "row", "cut')  # a line cut by a kill mid-write
    runs, rows = harness.read_records(out)
    assert list(runs) == [run_id] and runs[run_id]["env"]["torch"] == torch.__version__
    assert runs[run_id]["env"]["load_avg"] is not None and runs[run_id]["env"]["commit"]
    statuses = {row["workload"]: row["status"] for row in rows}
    assert statuses["w"] == "ok" and statuses["third"] == "skipped"
    assert all(row["run"] == run_id and row["threads"] == 1 for row in rows)


def test_busy_processes_spin_during_the_block_and_are_stopped_after(monkeypatch):
    started = []
    real_popen = subprocess.Popen

    def recording_popen(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(environment.subprocess, "Popen", recording_popen)
    with harness.busy_processes(2):
        assert len(started) == 2 and all(p.poll() is None for p in started)
    assert all(p.poll() is not None for p in started)
    with pytest.raises(RuntimeError), harness.busy_processes(1):
        raise RuntimeError("the measurement failed")
    assert started[-1].poll() is not None


@pytest.mark.parametrize("regime", ["init", "sharp"])
def test_sinkhorn_providers_compute_the_same_matrices(regime):
    xs = [x[:, :9, :9].contiguous() for x in make_stack("mnist-wscnn", regime)[:2]]
    n_iter, tau = sinkhorn_bench.N_ITER, sinkhorn_bench.TAU
    fixed = [sinkhorn_reference(x, n_iter, tau) for x in xs]
    # The authors' rule: every matrix of a stack stops once all rows and columns sum to 1 within allclose.
    early = [sinkhorn_reference(x, n_iter, tau, tol=symkernels.AUTHORS_TOLERANCE, stop="stack") for x in xs]
    names = ["reference", "authors-loop"]
    if NATIVE_CPU:
        names += ["cpu", "cpu-grouped", "cpu-authors-tol"]
    if sinkhorn_bench.pot_module() is not None:
        names += list(sinkhorn_bench.POT_PROVIDERS)
    for name in names:
        expected = early if name in ("authors-loop", "cpu-authors-tol") else fixed
        for got, want in zip(sinkhorn_bench.provider_fn(name)(xs), expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)


def test_tiny_workload_providers_compute_the_same_matrices():
    """The tiny workloads' providers (the op, the native library called directly, POT) give the reference's P,
    and the kernel provider's backward the reference's gradient."""
    n_iter = 10
    generator = torch.Generator().manual_seed(0)
    xs = [make_logits((9, 4, 4), TINY_REGIME, generator), make_logits((5, 8, 8), TINY_REGIME, generator)]
    grads = [torch.randn(x.shape, generator=generator) for x in xs]
    want = [sinkhorn_reference(x, n_iter, sinkhorn_bench.TAU) for x in xs]
    names = ["reference"] + (["cpu", "cpu-op"] if NATIVE_CPU else [])
    if sinkhorn_bench.pot_module() is not None:
        names += list(sinkhorn_bench.POT_PROVIDERS)
    for name in names:
        for got, expected in zip(sinkhorn_bench.provider_fn(name, n_iter)(xs), want, strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6, msg=name)
    if not NATIVE_CPU:
        return
    forward = sinkhorn_bench.kernel_closure("cpu", xs, None, n_iter)()
    backward = sinkhorn_bench.kernel_closure("cpu", xs, grads, n_iter)()
    for x, grad, expected, (p, *_), (got_grad,) in zip(xs, grads, want, forward, backward, strict=True):
        torch.testing.assert_close(p[0], expected, rtol=1e-5, atol=1e-6)
        y = x.clone().requires_grad_()
        (want_grad,) = torch.autograd.grad(sinkhorn_reference(y, n_iter, sinkhorn_bench.TAU), y, grad)
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-5)


def test_memory_traffic_floor_and_the_copy_that_moves_it():
    # [32768, 4, 4], T = 20: logits and P (2 MiB each, float32), cols 32768 * 20 * 4 float64, domain and
    # iterations (int32); the backward: grad_p, logits and the gradient, domain and iterations.
    forward = 2 * 2**21 + 32768 * 20 * 4 * 8 + 32768 * 8
    assert sinkhorn_bench.floor_bytes((32768, 4, 4), 20, "fwd") == forward == 25_427_968
    assert sinkhorn_bench.floor_bytes((32768, 4, 4), 20, "fwd+bwd") == forward + 3 * 2**21 + 32768 * 8
    src, dst = sinkhorn_bench.copy_buffers(8_000_000, "cpu")
    assert src.numel() * src.element_size() + dst.numel() * dst.element_size() == 8_000_000
    case = next(
        c
        for c in sinkhorn_bench.cases("cpu", quick=True)
        if c.provider == sinkhorn_bench.COPY and c.workload in TINY_WORKLOADS
    )
    assert (
        case.info["floor_bytes"]
        == case.info["bytes_moved"]
        == sinkhorn_bench.floor_bytes((32768, 4, 4), 20, "fwd+bwd")
    )


def test_pot_solvers_match_symkernels_in_float64():
    pytest.importorskip("ot", reason="POT is an optional peer (the bench extra)")
    assert sinkhorn_bench.pot_disagreement() is None


def test_quick_suite_runs_every_symkernels_provider(tmp_path):
    out = tmp_path / "quick.jsonl"
    assert bench_main(["--quick", "--out", str(out)]) == 0
    runs, rows = harness.read_records(out)
    assert len(runs) == 1 and rows
    by_status: dict[str, set[str]] = {}
    for row in rows:
        by_status.setdefault(row["status"], set()).add(row["provider"])
    assert "error" not in by_status, [row for row in rows if row["status"] == "error"][:2]
    ours = {"reference", "authors-loop", "ws-reference", "gcnn-exact", "conv2d", "plain-cnn", "copy-floor"}
    if NATIVE_CPU:
        ours |= {"cpu", "cpu-grouped", "cpu-authors-tol", "ws-cpu", "cpu-op", "cpu-kernel"}
    assert ours <= by_status["ok"]
    assert {row["op"] for row in rows} == {"sinkhorn", "expansion", "layer", "train-step"}
    for row in rows:
        if row["status"] == "skipped":  # only peers that are not installed here, with the way to get them
            assert row["provider"].startswith(("pot", "escnn")) and "install" in row["reason"], row
        else:
            assert row["median_ms"] > 0 and len(row["samples_ms"]) == 3 and row["threads"] == 1
            assert row["peak_bytes"] is None or row["peak_bytes"] >= 0
    text = out.with_suffix(".md").read_text()
    assert "### Sinkhorn" in text and "### Training step" in text and "load average" in text
    assert "### Sinkhorn on tiny matrices (hyper-connections)" in text
    if NATIVE_CPU:
        assert "### Goals" in text
    pytest.importorskip("matplotlib")
    assert [path.name for path in (tmp_path / "plots").glob("cpu-*-1t-sinkhorn.png")], "no Sinkhorn plot"


def sinkhorn_row(run, provider, ms, regime="sharp", workload="mnist-wscnn", mode="fwd+bwd", **extra):
    return {
        "record": "row",
        "run": run,
        "id": f"sinkhorn/{provider}/{mode}/{workload}/{regime}",
        "op": "sinkhorn",
        "section": "sinkhorn",
        "workload": workload,
        "mode": mode,
        "provider": provider,
        "regime": regime,
        "dtype": "float32",
        "device": "cpu",
        "threads": 1,
        "busy_processes": 0,
        "status": "ok",
        "median_ms": ms,
        "p20_ms": ms,
        "p80_ms": ms,
        **extra,
    }


def write_results(path, runs, rows):
    records = [
        {"record": "run", "run": r, "env": {"device_name": "test CPU", "date": "2026", "torch": "x"}}
        for r in runs
    ]
    path.write_text("\n".join(json.dumps(r) for r in records + rows) + "\n")


def test_report_takes_each_group_from_its_latest_run_and_checks_the_targets(tmp_path):
    results = tmp_path / "results.jsonl"
    old, new = "20260101T000000Z-a", "20260102T000000Z-b"
    rows = [
        sinkhorn_row(old, "cpu", 1.0),
        sinkhorn_row(old, "pot-scaling", 2.0),
        sinkhorn_row(old, "reference", 9.0),
        sinkhorn_row(new, "cpu", 2.0),
        sinkhorn_row(new, "pot-scaling", 8.0),
        sinkhorn_row(new, "pot-log", 7.0),
        sinkhorn_row(new, "reference", 9.0),
        sinkhorn_row(old, "cpu", 1.0, regime="init"),  # a group only the old run measured
        sinkhorn_row(old, "pot-solve", 1.5, regime="init"),
        sinkhorn_row(old, "reference", 10.0, regime="init"),
    ]
    write_results(results, [old, new], rows)
    runs, read = harness.read_records(results)
    (setup,) = report.latest(runs, read)
    chosen = report.latest(runs, read)[setup]
    assert {(r["run"], r["regime"]) for r in chosen} == {(new, "sharp"), (old, "init")}
    goals = {g["goal"]: g for g in report.goals(setup, chosen)}
    sharp = goals["mnist-wscnn fwd+bwd (sharp) ≥ 3× POT's fastest"]
    assert (
        sharp["status"] == "met" and sharp["baseline"] == "pot-log" and sharp["value"] == pytest.approx(3.5)
    )
    assert goals["mnist-wscnn fwd+bwd (sharp) ≥ 5× the eager reference"]["status"] == "not met"
    assert goals["mnist-wscnn fwd+bwd (init) ≥ 3× POT's fastest"]["status"] == "not met"
    assert goals["mnist-wscnn fwd+bwd (init) ≥ 5× the eager reference"]["status"] == "met"
    text = report.write_report(results, plots=False).read_text()
    assert "| mnist-wscnn | fwd+bwd | sharp | 9.00 | 2.00 |" in text


def test_tiny_table_states_the_fraction_of_the_memory_traffic_floor(tmp_path):
    results = tmp_path / "results.jsonl"
    workload, floor = "hc-32768x4x4-T20", 31_981_568
    tiny = {"regime": TINY_REGIME, "workload": workload, "floor_bytes": floor}
    rows = [
        sinkhorn_row("r1", "cpu", 8.0, **tiny),
        sinkhorn_row("r1", "cpu-kernel", 4.0, **tiny),
        sinkhorn_row("r1", "reference", 400.0, **tiny),
        sinkhorn_row("r1", "pot-log", 100.0, **tiny),
        sinkhorn_row("r1", "copy-floor", 1.0, **tiny),
        sinkhorn_row("r1", "cpu", 1.0),  # a model stack: not in the tiny table
    ]
    write_results(results, ["r1"], rows)
    text = report.write_report(results, plots=False).read_text()
    tiny_part = text.split("### Sinkhorn on tiny matrices (hyper-connections)")[1].split("###")[0]
    header = (
        "| workload | mode | cpu (ms) | cpu-kernel (ms) | reference (ms) | pot-log (ms) | copy-floor (ms) | "
        "ours vs reference | ours vs POT's best | floor (MB) | cpu of floor | cpu-kernel of floor |"
    )
    assert header in tiny_part
    assert (
        "| hc-32768x4x4-T20 | fwd+bwd | 8.00 | 4.00 | 400 | 100 | 1.00 | 50.0× | 12.5× | 32.0 | 12% | 25% |"
        in (tiny_part)
    )
    assert "mnist-wscnn" not in tiny_part


def test_readme_section_is_replaced_between_its_markers(tmp_path):
    results = tmp_path / "results.jsonl"
    write_results(results, ["r1"], [sinkhorn_row("r1", "cpu", 1.0), sinkhorn_row("r1", "pot-log", 4.0)])
    readme = tmp_path / "README.md"
    readme.write_text(f"# T\n\n## Benchmarks\n\n{report.README_BEGIN}\nold\n{report.README_END}\n\n## Next\n")
    report.update_readme(results, readme)
    text = readme.read_text()
    assert "old" not in text and text.startswith("# T\n\n## Benchmarks\n\n") and text.endswith("## Next\n")
    assert "| mnist-wscnn | fwd+bwd | sharp |" in text and "No GPU results" in text
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        report.update_readme(results, readme)


def test_two_machines_get_their_own_plots_and_page_sections(tmp_path):
    # Two machines, one thread each: neither's plot overwrites the other's, and the page shows both.
    results = tmp_path / "results.jsonl"
    machines = {
        "20260101T000000Z-a": "Intel(R) Xeon(R) Processor (2 logical cores)",
        "20260102T000000Z-b": "AMD EPYC",
    }
    records = [{"record": "run", "run": run, "env": {"device_name": name}} for run, name in machines.items()]
    for run, ms in zip(machines, [3.0, 1.0], strict=True):
        overhead = {"op": "overhead", "section": "overhead", "regime": None}
        records.append(sinkhorn_row(run, "functional", ms, workload="tiny-1x2x2", **overhead))
        records.append(
            sinkhorn_row(run, "ws-auto", 10 * ms, regime=None, workload="default-run", op="train-step")
        )
    results.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    pytest.importorskip("matplotlib")
    report.write_report(results)
    plots = sorted(path.name for path in (tmp_path / "plots").iterdir())
    assert plots == ["cpu-amd-epyc-1t-train-step.png", "cpu-intel-xeon-1t-train-step.png"], plots
    section = report.readme_section(results, tmp_path / "page.md")
    assert "**Intel(R) Xeon(R) Processor (2 logical cores), 1 thread(s).**" in section
    assert "**AMD EPYC, 1 thread(s).**" in section
    assert "| tiny-1x2x2 | fwd+bwd | 3.00 |" in section and "| tiny-1x2x2 | fwd+bwd | 1.00 |" in section


def test_op_scripts_run_as_files(tmp_path):
    out = tmp_path / "r.jsonl"
    command = [
        sys.executable,
        "bench/sinkhorn.py",
        "--quick",
        "--only",
        "^sinkhorn/reference/fwd/mnist-wscnn/init$",
        "--rounds",
        "1",
        "--out",
        str(out),
        "--no-report",
    ]
    subprocess.run(command, cwd=harness.ROOT, check=True, capture_output=True, timeout=300)
    _, rows = harness.read_records(out)
    assert [(row["id"], row["status"]) for row in rows] == [("sinkhorn/reference/fwd/mnist-wscnn/init", "ok")]


@pytest.mark.parametrize(
    ("script", "needs"),
    [("busy_machine.py", ()), ("recovery.py", ()), ("layerwise.py", ("tqdm",)), ("cuda_resources.py", ())],
)
def test_experiment_scripts_start_as_files(script, needs):
    for module in needs:
        pytest.importorskip(module, reason=f"bench/{script} needs {module}")
    command = [sys.executable, f"bench/{script}", "--help"]
    result = subprocess.run(command, cwd=harness.ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {script}")
