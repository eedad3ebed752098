"""Run the benchmark suite, or part of it, and write its report.

    python -m bench [--quick] [--ops sinkhorn,expansion,layer,train-step,overhead,compat] [--threads 1 2]
                    [--only REGEX] [--device cpu] [--out FILE] [--budget-s S] [--rounds N] [--busy N]
                    [--no-report] [--readme]
    python -m bench report [--results FILE] [--readme]

Rows are appended to ``--out`` (default ``bench/results/benchmarks.jsonl``; with ``--quick``, a file in a new
temporary folder, so that a quick run never mixes with the committed results), then ``<out>.md`` and the
plots are rewritten from it. ``--quick`` is the subset CI runs: the MNIST stack and 1024×16×16 for Sinkhorn,
the MNIST layers for the expansion, the lifting layer (batch 8) and the training step (8 fields, batch 8),
one thread, three rounds.
Each op has its own script too (``python bench/sinkhorn.py``, ``bench/expansion.py``, ``bench/layer.py``,
``bench/train_step.py``, ``bench/overhead.py``), with the same options.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness

OP_NAMES = ("sinkhorn", "expansion", "layer", "train-step", "overhead", "compat")
QUICK_OPS = ("sinkhorn", "expansion", "layer", "train-step")


def op_cases(name: str) -> Callable[..., list[harness.Case]]:
    """The ``cases(device, quick=...)`` function of op ``name`` (modules imported on demand)."""
    if name == "sinkhorn":
        from bench import sinkhorn as module
    elif name == "expansion":
        from bench import expansion as module
    elif name == "layer":
        from bench import layer as module
    elif name == "train-step":
        from bench import train_step as module
    elif name == "overhead":
        from bench import overhead as module
    elif name == "compat":
        from bench import compat as module
    else:
        raise ValueError(f"unknown op {name!r}; expected some of {list(OP_NAMES)}")
    return module.cases


def plan(ops: Sequence[str], device: str, *, quick: bool, only: str | None) -> list[harness.Case]:
    cases = [case for name in ops for case in op_cases(name)(device, quick=quick)]
    # Long compilations last, so that a run cut short by its budget has the rest.
    cases.sort(key=lambda case: case.section == "compiled")
    if only:
        pattern = re.compile(only)
        cases = [case for case in cases if pattern.search(case.id)]
    return cases


def parse(argv: Sequence[str] | None, ops: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="the CI subset (under two minutes)")
    if ops is None:
        parser.add_argument(
            "--ops", default=None, help=f"comma-separated ops (default: {','.join(OP_NAMES)})"
        )
    parser.add_argument(
        "--threads", type=int, nargs="+", default=None, help="torch thread counts (default 1 2)"
    )
    parser.add_argument("--only", default=None, help="regular expression selecting case ids")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--out", type=Path, default=None, help="results file (JSON lines, appended)")
    parser.add_argument("--budget-s", type=float, default=None, help="start no new group after this many s")
    parser.add_argument("--rounds", type=int, default=None, help="samples per provider")
    parser.add_argument("--busy", type=int, default=0, help="competing busy processes during the timing")
    parser.add_argument("--no-report", action="store_true", help="do not rewrite the report and plots")
    parser.add_argument(
        "--readme", action="store_true", help="also rewrite the generated section of docs/benchmarks.md"
    )
    parser.add_argument("--list", action="store_true", help="print the case ids and exit")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, ops: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:
        from bench import report

        return report.main(argv[1:])
    args = parse(argv, ops)
    chosen = (
        list(ops)
        if ops is not None
        else (
            [s.strip() for s in args.ops.split(",") if s.strip()]
            if args.ops
            else list(QUICK_OPS if args.quick else OP_NAMES)
        )
    )
    unknown = [name for name in chosen if name not in OP_NAMES]
    if unknown:
        print(f"unknown ops {unknown}; expected some of {list(OP_NAMES)}", file=sys.stderr)
        return 2
    cases = plan(chosen, args.device, quick=args.quick, only=args.only)
    if args.list:
        print("\n".join(case.id for case in cases))
        return 0
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print("no CUDA device is visible; use --device cpu (or bench/gpu.py --dry-run)", file=sys.stderr)
            return 2
    settings = harness.settings_for(args.quick, args.rounds, args.budget_s)
    out = args.out
    if out is None:
        out = (
            Path(tempfile.mkdtemp(prefix="bench-quick-")) / "quick.jsonl"
            if args.quick
            else harness.RESULTS_FILE
        )
    threads = args.threads or ([1] if args.quick else [1, 2])
    script = "python -m bench" if ops is None else f"python bench/{ops[0].replace('-', '_')}.py"
    command = " ".join([script, *map(shlex.quote, argv)])
    harness.run(
        cases,
        settings,
        out,
        threads=threads,
        command=command,
        busy=args.busy,
        progress=lambda row: print(harness.describe_row(row), flush=True),
    )
    print(f"rows appended to {out}")
    if not args.no_report:
        from bench import report

        print(f"wrote {report.write_report(out)}")
        if args.readme:
            report.update_readme(out)
            print(f"rewrote the benchmark section of {report.README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
