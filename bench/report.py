"""Tables, goals and plots from a results file, and the benchmark section of docs/benchmarks.md.

    python -m bench report [--results FILE] [--readme]

For every setup (device, threads, competing processes) and every group of cases (one op, workload, mode,
logits and dtype), the rows come from the latest run that measured that group, so the ratios in a table line
are always between providers timed in the same run, interleaved.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.goals import goal_lines, goals
from bench.harness import RESULTS_FILE, ROOT, read_records
from bench.plots import plot as draw_plots
from bench.selection import POT, Setup, authors_rule, best, cell, latest, median, ms, ours, ratio
from bench.workloads import TINY_WORKLOADS

__all__ = ["goals", "latest", "main", "readme_section", "update_readme", "write_report"]

# The page whose generated section `--readme` rewrites (between the markers below).
README = ROOT / "docs" / "benchmarks.md"
README_BEGIN = "<!-- bench:begin -->"
README_END = "<!-- bench:end -->"


# ---------------------------------------------------------------------------------------------------------
# Tables


def table(
    rows: Sequence[dict[str, Any]],
    keys: Sequence[str],
    providers: Sequence[str],
    ratios: Sequence[tuple[str, Sequence[str], Sequence[str]]] = (),
    *,
    memory: bool = False,
) -> list[str]:
    """One line per distinct ``keys``; a column per provider present (median ms, spread when ≥ 5%, CUDA
    graph in parentheses); ``ratios``: (label, baselines, ours) → the best baseline over the best of ours."""
    groups: dict[tuple, dict[str, dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(k) for k in keys), {})[row["provider"]] = row
    present = [p for p in providers if any(p in g for g in groups.values())]
    present += sorted({p for g in groups.values() for p in g} - set(present))
    header = [*keys, *(f"{p} (ms)" for p in present), *(label for label, _, _ in ratios)]
    if memory:
        header += [f"{p} peak (MB)" for p in present]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, by_provider in groups.items():
        cells = [str(k) for k in key] + [cell(by_provider.get(p)) for p in present]
        for _, baselines, mine in ratios:
            cells.append(ratio(best(by_provider, baselines)[1], best(by_provider, mine)[1]))
        if memory:
            for p in present:
                peak = (by_provider.get(p) or {}).get("peak_bytes")
                cells.append("–" if peak is None else f"{peak / 2**20:,.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def sinkhorn_table(setup: Setup, rows: Sequence[dict[str, Any]], modes: Sequence[str] = ("fwd+bwd", "fwd")):
    mine = ours(setup)
    order = ["reference", "reference-compiled", "authors-loop"]
    for backend in mine:
        order += [backend, f"{backend}-grouped", f"{backend}-authors-tol", f"{backend}-grouped-authors-tol"]
    selected = sorted(
        (
            r
            for r in rows
            if r["op"] == "sinkhorn" and r["mode"] in modes and r["workload"] not in TINY_WORKLOADS
        ),
        key=lambda r: (modes.index(r["mode"]), r["workload"], r["regime"]),
    )
    ratios = [
        ("ours vs POT's best", POT, mine),
        ("ours vs reference", ("reference",), mine),
        ("ours vs authors' loop", ("authors-loop",), mine),
        ("their rule: ours vs authors' loop", ("authors-loop",), authors_rule(mine)),
    ]
    return table(selected, ("workload", "mode", "regime"), order + list(POT), ratios)


def tiny_table(setup: Setup, rows: Sequence[dict[str, Any]]) -> list[str]:
    """The tiny workloads (hyper-connections: B matrices of n×n, T iterations): ms per call of every provider,
    the speedups, and the memory-traffic floor of the row with the fraction of it each of ours reaches (the
    time of ``copy-floor``, a copy moving the floor's bytes, over ours)."""
    mine = ours(setup)
    variants = [f"{b}{v}" for b in mine for v in ("", "-op", "-kernel")]
    order = [*variants, "reference", "reference-compiled", *POT, "copy-floor"]
    groups: dict[tuple, dict[str, dict[str, Any]]] = {}
    for row in sorted(
        (r for r in rows if r["op"] == "sinkhorn" and r["workload"] in TINY_WORKLOADS),
        key=lambda r: (r["mode"] != "fwd+bwd", TINY_WORKLOADS[r["workload"]]),
    ):
        groups.setdefault((row["workload"], row["mode"]), {})[row["provider"]] = row
    present = [p for p in order if any(p in g for g in groups.values())]
    measured = [p for p in variants if p in present]
    header = [
        "workload",
        "mode",
        *(f"{p} (ms)" for p in present),
        "ours vs reference",
        "ours vs POT's best",
        "floor (MB)",
        *(f"{p} of floor" for p in measured),
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (workload, mode), by_provider in groups.items():
        copy = median(by_provider.get("copy-floor"))
        floor = next((r.get("floor_bytes") for r in by_provider.values() if r.get("floor_bytes")), None)
        cells = [workload, mode, *(cell(by_provider.get(p)) for p in present)]
        cells.append(ratio(best(by_provider, ("reference",))[1], best(by_provider, mine)[1]))
        cells.append(ratio(best(by_provider, POT)[1], best(by_provider, mine)[1]))
        cells.append("–" if floor is None else f"{floor / 1e6:,.1f}")
        for p in measured:
            time_ms = median(by_provider.get(p))
            cells.append("–" if copy is None or not time_ms else f"{copy / time_ms:.0%}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def step_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    selected = [r for r in rows if r["op"] == "train-step"]
    order = ["ws-cuda", "ws-triton", "ws-cpu", "ws-auto", "ws-auto-compiled", "ws-reference", "gcnn-exact"]
    order += ["escnn", "plain-cnn"]
    ratios = [
        ("plain CNN vs ours", ("plain-cnn",), ("ws-cuda", "ws-triton", "ws-cpu")),
        ("eager vs compiled", ("ws-auto",), ("ws-auto-compiled",)),
    ]
    return table(selected, ("workload",), order, ratios, memory=True)


def compat_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    selected = [r for r in rows if r["op"] == "compat"]
    order = ["compat", "compat-fixed", "reference-authors-loop"]
    ratios = [("authors' loop vs compat", ("reference-authors-loop",), ("compat",))]
    return table(selected, ("workload",), order, ratios, memory=True)


def layer_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    selected = sorted(
        (r for r in rows if r["op"] == "layer"), key=lambda r: (r["mode"] != "fwd+bwd", r["workload"])
    )
    order = ["ws-cuda", "ws-triton", "ws-cpu", "ws-reference", "gcnn-exact", "escnn", "conv2d"]
    ratios = [("conv2d vs ours", ("conv2d",), ("ws-cuda", "ws-triton", "ws-cpu"))]
    return table(selected, ("workload", "mode"), order, ratios, memory=True)


def expansion_table(setup: Setup, rows: Sequence[dict[str, Any]]) -> list[str]:
    selected = [r for r in rows if r["op"] == "expansion"]
    mine = ours(setup)
    return table(
        selected,
        ("workload", "mode", "dtype"),
        [*mine, "reference"],
        [("ours vs reference", ("reference",), mine)],
    )


def overhead_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    selected = [r for r in rows if r["op"] == "overhead"]
    order = ["functional", "functional-checked", "op", "bare-function", "kernel", "aten-clone"]
    ratios = [("functional vs bare Function", ("functional",), ("bare-function",))]
    return table(selected, ("workload", "mode"), order, ratios)


def bandwidth_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    copy = [r for r in rows if r["op"] == "bandwidth" and r.get("status") == "ok"]
    return (
        [f"Device-to-device copy: {copy[-1]['achieved_gbps']:.0f} GB/s (read + write bytes)."] if copy else []
    )


def profile_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    profiled = [r for r in rows if r["op"] == "train-step" and isinstance(r.get("profile"), dict)]
    if not profiled:
        return []
    lines = ["Where one step's time goes (one more step under `torch.profiler`):", ""]
    for row in profiled:
        p = row["profile"]
        if "kernel_launches" in p:
            parts = (
                f"{p['kernel_launches']} kernel launches, {ms(p['device_time_ms'])} ms device time, of it "
                f"{ms(p['conv_device_time_ms'])} ms in {p['conv_kernel_launches']} convolution kernels"
            )
        else:
            parts = ", ".join(f"{k.removesuffix('_ms')} {ms(v)}" for k, v in p.items()) + " (self CPU ms)"
        lines.append(f"- {row['workload']}, {row['provider']}: {parts}")
    return lines


def problems(rows: Sequence[dict[str, Any]]) -> list[str]:
    notes: dict[str, list[str]] = {}
    for row in rows:
        if row.get("status") == "skipped":
            notes.setdefault(f"skipped: {row.get('reason')}", []).append(row["provider"])
        elif row.get("status") == "error":
            error = row.get("error") or {}
            notes.setdefault(f"error: {error.get('type')}: {str(error.get('message'))[:200]}", []).append(
                row["id"]
            )
    return [f"- {', '.join(sorted(set(who)))}: {what}" for what, who in notes.items()]


def setup_line(
    setup: Setup, runs: dict[str, dict[str, Any]], rows: Sequence[dict[str, Any]], *, title: bool = True
) -> str:
    """Where and when the rows were measured, under what load, and the commands that reproduce them."""
    used = sorted({r["run"] for r in rows})
    envs = [runs[r]["env"] for r in used if r in runs]
    loads = [r["load_avg"][0] for r in rows if r.get("load_avg")]
    env = envs[-1] if envs else {}
    peers = ", ".join(f"{p} {env.get(p)}" for p in ("pot", "escnn") if env.get(p)) or "no peers installed"
    commands = sorted({runs[r].get("command", "") for r in used if r in runs} - {""})
    load = (
        f"1-minute load average {min(loads):.1f}–{max(loads):.1f} while it ran" if loads else "load unknown"
    )
    return (
        (f"{setup.title()}; " if title else "")
        + f"{load}; torch {env.get('torch')}, {peers}; commit {str(env.get('commit'))[:12]}; "
        f"{env.get('date', '?')[:10]}; run(s) {', '.join(used)}. Reproduce: "
        + (", ".join(f"`{c}`" for c in commands) or "`python -m bench`")
        + "."
    )


def markdown(
    runs: dict[str, dict[str, Any]], selected: dict[Setup, list[dict[str, Any]]], plots: dict
) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python -m bench report` from the results file. Times are per call in ms: the median "
        "of interleaved samples (±: half the 20–80th percentile spread, shown when ≥ 5%; in parentheses: one "
        "call inside a replayed CUDA graph). Sinkhorn: T = 20, τ = 1, float32; model stacks run one call per "
        "layer (`-grouped`: every layer in one call); logits `init` = U[0, 1) (the authors' loop exits after "
        "2–3 iterations), `sharp` = N(0, 3²) (all 20 run). `n/a`: the provider cannot run here (see the "
        "notes).",
    ]
    for setup in sorted(selected, key=lambda s: (s.device, s.threads, s.busy)):
        rows = selected[setup]
        lines += ["", f"## {setup.title()}", "", setup_line(setup, runs, rows)]
        sections = [
            ("Goals", goal_lines(goals(setup, rows))),
            ("Sinkhorn", sinkhorn_table(setup, rows)),
            ("Sinkhorn on tiny matrices (hyper-connections)", tiny_table(setup, rows)),
            ("Training step", step_table(rows) + [""] + profile_lines(rows)),
            ("Published-API training step (symkernels.compat)", compat_table(rows)),
            ("One weight-sharing layer", layer_table(rows)),
            ("Kernel expansion", expansion_table(setup, rows)),
            ("Per-call overhead of the public functions", overhead_table(rows)),
            ("Bandwidth", bandwidth_lines(rows)),
            ("Notes", problems(rows)),
        ]
        for title, body in sections:
            if len(body) > 2 or (body and not body[0].startswith("|")):
                lines += ["", f"### {title}", "", *body]
        for plot in plots.get(setup, []):
            lines += ["", f"![{plot.stem}](plots/{plot.name})"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------
# Outputs


def write_report(results: Path, *, plots: bool = True) -> Path:
    """``<results>.md`` and the plots in ``<results folder>/plots/``; returns the Markdown file."""
    runs, rows = read_records(results)
    selected = latest(runs, rows)
    written = {s: draw_plots(s, rs, results.parent / "plots") for s, rs in selected.items()} if plots else {}
    out = results.with_suffix(".md")
    out.write_text(markdown(runs, selected, written))
    return out


def readme_section(results: Path, readme: Path = README) -> str:
    """The Markdown of the page's benchmark section, from the results file (one thread, CPU first). Paths in
    backticks are the repository's (commands run from its root); link targets are relative to ``readme``."""
    runs, rows = read_records(results)
    selected = latest(runs, rows)
    relative = results.relative_to(ROOT) if results.is_relative_to(ROOT) else results
    markdown_file = relative.with_suffix(".md")
    markdown_link = os.path.relpath(results.with_suffix(".md"), readme.parent)
    bench_readme = os.path.relpath(ROOT / "bench" / "README.md", readme.parent)
    lines = [
        README_BEGIN,
        f"<!-- generated by `python -m bench report --readme` from {relative}; edit bench/report.py -->",
        "",
        "`python -m bench` times every implementation against the peers a user would pick instead, "
        "interleaved in one run so the ratios share the same minutes, and appends the rows (median, spread, "
        f"peak memory, device, versions, commit, threads, load) to `{relative}`; `python -m bench report` "
        f"writes [`{markdown_file}`]({markdown_link}) (every table, every thread count) and the plots. "
        "`python -m bench --quick` is the two-minute subset that CI runs. How to add a "
        f"provider or a workload: [bench/README.md]({bench_readme}).",
    ]
    quiet_cpu = [s for s in selected if s.device == "cpu" and not s.busy]
    fewest = min((s.threads for s in quiet_cpu), default=0)
    # Every machine's runs at the fewest threads, the one with the most rows first.
    cpu = sorted((s for s in quiet_cpu if s.threads == fewest), key=lambda s: -len(selected[s]))
    gpu = [s for s in selected if s.device == "cuda"]
    for setup in cpu + gpu[:1]:
        rows = selected[setup]
        folder = results.parent / "plots"
        lines += ["", f"**{setup.title()}.** {setup_line(setup, runs, rows, title=False)}"]
        sinkhorn = sinkhorn_table(setup, rows)
        if len(sinkhorn) > 2:
            lines += [
                "",
                "Sinkhorn (T = 20, float32, τ = 1), forward + backward and forward, ms per call:",
                "",
            ]
            lines += sinkhorn
        if any(r["provider"] == "reference-compiled" and r.get("status") == "ok" for r in rows):
            # Its own section: minutes of compilation per shape, so it runs last, in groups of its own.
            lines += [
                "",
                "`reference-compiled` (the reference under `torch.compile`) is timed in groups of its own, "
                "not interleaved with the other columns; no ratio uses it.",
            ]
        image = folder / f"{setup.slug}-sinkhorn.png"
        if image.exists():
            lines += ["", f"![Sinkhorn fwd+bwd, {setup.title()}]({os.path.relpath(image, readme.parent)})"]
        goal_list = goals(setup, rows)
        if goal_list:
            met = sum(g["status"] == "met" for g in goal_list)
            lines += ["", f"Targets: {met} of {len(goal_list)} met.", "", *goal_lines(goal_list)]
        step = step_table(rows)
        if len(step) > 2:
            lines += [
                "",
                "Training step (forward, loss, backward, AdamW), ms per step and peak memory:",
                "",
                *step,
            ]
        compat = compat_table(rows)
        if len(compat) > 2:
            lines += [
                "",
                "The published MNIST training step, through `symkernels.compat` and computed the published "
                "way, ms per step and peak memory:",
                "",
                *compat,
            ]
        overhead = overhead_table(rows)
        if len(overhead) > 2:
            lines += ["", "Per-call overhead of the public functions, ms per call:", "", *overhead]
    if not gpu:
        lines += [
            "",
            "No GPU results are committed yet: `bash scripts/gpu_check.sh` runs the GPU suite "
            "(`python bench/gpu.py`) on a GPU machine.",
        ]
    lines.append(README_END)
    return "\n".join(lines)


def update_readme(results: Path, readme: Path = README) -> None:
    """Replace the text between the benchmark markers of ``readme`` with :func:`readme_section`."""
    text = readme.read_text()
    pattern = re.compile(re.escape(README_BEGIN) + r".*?" + re.escape(README_END), re.DOTALL)
    if not pattern.search(text):
        raise ValueError(f"{readme} has no {README_BEGIN} ... {README_END} markers to replace")
    readme.write_text(pattern.sub(lambda _: readme_section(results, readme), text, count=1))


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m bench report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--results", type=Path, default=RESULTS_FILE, help="the results file (JSON lines)")
    parser.add_argument(
        "--readme", action="store_true", help="also rewrite the generated section of docs/benchmarks.md"
    )
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    out = write_report(args.results, plots=not args.no_plots)
    print(f"wrote {out}")
    if args.readme:
        update_readme(args.results)
        print(f"rewrote the benchmark section of {README}")
    return 0
