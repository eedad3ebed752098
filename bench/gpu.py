"""The GPU suite in one command, with a time budget: what ``scripts/gpu_check.sh`` runs on a GPU machine.

    python bench/gpu.py --out DIR [--sections a,b] [--only REGEX] [--budget-s S] [--quick]
                        [--dry-run] [--report-only] [--device cuda|cpu]

Sections, in this order (the rows that matter most first, so that a run cut short by its budget has them):

``bandwidth``   device-to-device copy bandwidth (the memory roofline the Sinkhorn goal is measured against);
``sinkhorn``    ``bench/sinkhorn.py``: every GPU backend, grouped, the authors' rule, the eager reference, the
                authors' loop and POT, on the model stacks and the batches (eager, and as CUDA graphs);
``small-n``     the Sinkhorn workloads of ``bench/workloads.py`` made of matrices of n <= 8 (the
                hyper-connection batches, ``[B, 4, 4]`` and ``[B, 8, 8]``): the CUDA and Triton kernels timed
                with the ``torch.compile``d reference, forward + backward first;
``expansion``   ``bench/expansion.py`` (float32 and bfloat16);
``layer``       ``bench/layer.py``: one WS layer against the exact G-CNN layer, escnn and a plain conv;
``train-step``  ``bench/train_step.py``: the MNIST and CIFAR training steps, with a ``torch.profiler`` summary
                (kernel launches, device time, convolution time);
``overhead``    ``bench/overhead.py``: the per-call cost of the functional API against its kernel;
``compiled``    the ``torch.compile``d reference on the Sinkhorn workloads (compile time in ``first_call_s``).

Every case is timed by the harness (``bench/harness.py``: CUDA events, interleaved providers, peak memory) and
appended to ``DIR/rows.jsonl`` as its group finishes; ``DIR/gpu-bench.md`` (tables, goals, notes) and
``DIR/gpu-bench.json`` (goals and the rows used) are rebuilt from it at the end, or with ``--report-only``
after a run was cut short. ``--dry-run`` writes the plan to ``DIR/plan.json`` with what each case needs,
without touching the GPU. ``--device cpu`` runs the same plan on the CPU, only to test this script.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

if __name__ == "__main__":  # `python bench/gpu.py` puts bench/, not the repository root, on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness, report
from bench.__main__ import op_cases

SECTIONS = ("bandwidth", "sinkhorn", "small-n", "expansion", "layer", "train-step", "overhead", "compiled")
SMALL_N_MAX = 8
SMALL_N_PROVIDERS = ("cuda", "triton", "reference-compiled")
COPY_BYTES = {"cuda": 512 * 2**20, "cpu": 8 * 2**20}  # large enough to defeat a GPU's L2 cache


def copy_case(device: str) -> harness.Case:
    size = COPY_BYTES["cuda" if torch.device(device).type == "cuda" else "cpu"]

    def make() -> harness.Closure:
        src = torch.rand(size // 4, generator=torch.Generator().manual_seed(0)).to(device)
        dst = torch.empty_like(src)
        return lambda: dst.copy_(src)

    return harness.Case(
        op="bandwidth",
        workload="device-to-device",
        mode="copy",
        provider="torch",
        device=device,
        make=make,
        info={"bytes_moved": 2 * size},  # read + write
    )


def small_n_workloads() -> list[str]:
    """The Sinkhorn workloads of bench/workloads.py, by name, made of matrices of n <= SMALL_N_MAX."""
    from bench.workloads import SINKHORN_WORKLOADS

    return [
        name
        for name, shapes in SINKHORN_WORKLOADS.items()
        if shapes and all(shape[-1] <= SMALL_N_MAX for shape in shapes)
    ]


def small_n_cases(device: str) -> list[harness.Case]:
    """The small-n workloads' kernels and compiled reference, one group per workload, mode and regime (timed
    together): forward + backward first, then n = 4 before 8, the larger batch and the larger T first."""
    names = set(small_n_workloads())
    chosen = [
        dataclasses.replace(case, section="small-n")
        for case in op_cases("sinkhorn")(device)
        if case.workload in names and case.provider in SMALL_N_PROVIDERS
    ]

    def priority(case: harness.Case) -> tuple:
        shapes = case.info.get("shapes") or [[0, 0, 0]]
        n, batch = max(s[-1] for s in shapes), sum(s[0] for s in shapes)
        return (case.mode != "fwd+bwd", n, -batch, -case.info.get("n_iter", 0), str(case.regime))

    return sorted(chosen, key=priority)


def build_plan(sections: Sequence[str], device: str, *, quick: bool = False, only: str | None = None):
    """Every case of ``sections`` in the order of :data:`SECTIONS`, filtered by the regular expression
    ``only`` on the case ids. The small-n workloads are timed in their own section only."""
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown sections {unknown}; expected some of {list(SECTIONS)}")
    small = set(small_n_workloads())
    cases: list[harness.Case] = []
    for section in SECTIONS:
        if section not in sections:
            continue
        if section == "bandwidth":
            cases.append(copy_case(device))
        elif section == "small-n":
            cases += small_n_cases(device)
        elif section == "compiled":
            cases += [
                c
                for c in op_cases("sinkhorn")(device, quick=quick)
                if c.section == "compiled" and c.workload not in small
            ]
        else:
            cases += [
                c
                for c in op_cases(section)(device, quick=quick)
                if c.section != "compiled" and not (section == "sinkhorn" and c.workload in small)
            ]
    if only:
        pattern = re.compile(only)
        cases = [case for case in cases if pattern.search(case.id)]
    return cases


def write_report(out: Path) -> dict[str, Any]:
    runs, rows = harness.read_records(out / "rows.jsonl")
    selected = report.latest(runs, rows)
    goals = [goal for setup, chosen in selected.items() for goal in report.goals(setup, chosen)]
    (out / "gpu-bench.md").write_text(report.markdown(runs, selected, {}))
    result = {
        "runs": list(runs.values()),
        "goals": goals,
        "rows": [r for rs in selected.values() for r in rs],
    }
    (out / "gpu-bench.json").write_text(json.dumps(result, indent=1, default=str))
    return result


def dry_run(cases: Sequence[harness.Case], out: Path, device: str) -> dict[str, Any]:
    """The plan with what each case would do on ``device``: nothing is built, launched or timed."""
    plan = []
    for case in cases:
        reason = harness._safe_requires(case)
        plan.append(case.describe() | {"would_run": reason is None, "reason": reason, "graph": case.graph})
    result = {"device": device, "sections": list(dict.fromkeys(c.section for c in cases)), "cases": plan}
    (out / "plan.json").write_text(json.dumps(result, indent=1, default=str))
    return result


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (created)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated sections to run")
    parser.add_argument("--only", default=None, help="regular expression selecting case ids")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (to test this script)")
    parser.add_argument("--budget-s", type=float, default=None, help="start no new group after this many s")
    parser.add_argument("--rounds", type=int, default=None, help="samples per provider")
    parser.add_argument("--quick", action="store_true", help="the quick subset of every section")
    parser.add_argument("--dry-run", action="store_true", help="check the plan; time nothing")
    parser.add_argument("--report-only", action="store_true", help="rebuild the report from DIR/rows.jsonl")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        sections = [s.strip() for s in args.sections.split(",") if s.strip()]
        cases = build_plan(sections, args.device, quick=args.quick, only=args.only)
        if args.dry_run:
            result = dry_run(cases, args.out, args.device)
            runnable = sum(entry["would_run"] for entry in result["cases"])
            sections = result["sections"]
            print(f"plan: {len(cases)} cases in {sections}, {runnable} runnable here; wrote {args.out}")
            return 0
        if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
            print("bench/gpu.py: no CUDA device visible; use --dry-run or --device cpu", file=sys.stderr)
            return 2
        settings = harness.settings_for(args.quick, args.rounds, args.budget_s)
        command = "python bench/gpu.py " + " ".join(sys.argv[1:] if argv is None else argv)
        threads = [1] if torch.device(args.device).type == "cpu" else [torch.get_num_threads()]
        harness.run(
            cases,
            settings,
            args.out / "rows.jsonl",
            threads=threads,
            command=command,
            progress=lambda row: print(harness.describe_row(row), flush=True),
        )
    result = write_report(args.out)
    for goal in result["goals"]:
        print(f"goal: {goal['goal']}: {goal['status']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
