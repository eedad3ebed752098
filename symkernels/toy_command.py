"""The `symkernels toy` command: its arguments, the result table and the verdict (see symkernels.toy)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from symkernels.toy import PROBLEMS, ToyResult, run_toy

__all__ = ["add_toy_arguments", "format_toy_result", "run_toy_command"]

_GROUP_WORDS = {"shift1d": "cyclic shifts", "rot2d": "quarter-turn rotations", "cube": "cube rotations"}


def _verdict(result: ToyResult) -> str:
    what = f"the {len(result.target)} {'target elements' if result.partial else _GROUP_WORDS[result.problem]}"
    if result.recovered:
        order = "each on the element it was trained on" if result.matches_labels else "in another order"
        return (
            f"RECOVERED: every learned element puts >= {result.threshold:.2f} of its mass on one exact "
            f"element (min {min(result.mass):.3f}) and together they cover {what}, {order}."
        )
    reasons = []
    soft = [f"R{j} {m:.2f}" for j, m in enumerate(result.mass) if m < result.threshold]
    if soft:
        shown = ", ".join(soft[:6]) + (", …" if len(soft) > 6 else "")
        reasons.append(f"{len(soft)} below {result.threshold:.2f} ({shown})")
    missing = sorted(set(result.target) - set(result.assigned), key=result.element_names.index)
    if missing:
        reasons.append(f"missing {', '.join(missing)}")
    extra = sorted(set(result.assigned) - set(result.target), key=result.element_names.index)
    if extra:
        reasons.append(f"outside the target: {', '.join(extra)}")
    return f"NOT RECOVERED ({what}): " + "; ".join(reasons) + "."


def format_toy_result(result: ToyResult) -> str:
    """A table (one row per learned element: its data transform, assigned element, mass, runner-up,
    residual) and a one-line verdict."""
    variant = "partial" if result.partial else "full"
    lines = [
        f"toy {result.problem} ({variant}, size {result.size}, seed {result.seed}, noise {result.noise:g}, "
        f"{result.steps} steps, identity {'fixed' if result.fix_identity else 'learned, read as R_j R_0⁺'}): "
        f"loss {result.loss:.4g}, {result.seconds:.1f} s",
        f"{'element':<8} {'data':>11} {'assigned':>11} {'mass':>6}  {'runner-up':>17} {'residual':>9}",
    ]
    for j, row in enumerate(result.coefficients):
        top = torch.topk(row, min(2, row.numel())).indices.tolist()
        # A runner-up with no mass would name an arbitrary element.
        has_runner = len(top) > 1 and row[top[1]].item() >= 5e-4
        runner = f"{result.element_names[top[1]]} {row[top[1]].item():.3f}" if has_runner else "-"
        lines.append(
            f"{'R' + str(j):<8} {result.target[j]:>11} {result.assigned[j]:>11} {result.mass[j]:6.3f}  "
            f"{runner:>17} {result.residuals[j]:9.3f}"
        )
    lines.append(_verdict(result))
    return "\n".join(lines)


def add_toy_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``symkernels toy`` arguments to ``parser`` and set its ``run`` default to
    :func:`run_toy_command` (the attribute :mod:`symkernels.cli` dispatches on)."""
    parser.add_argument(
        "problem", choices=PROBLEMS, help="which group: 1D shifts, 2D quarter turns, cube rotations"
    )
    parser.add_argument(
        "--partial",
        action="store_true",
        help="data use only a subset: the first half of the shifts, {rot0, rot90}, or the 16 cube rotations "
        "z^a·x^b (a, b = 0..3)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: 400, 400, 800)")
    parser.add_argument("--noise", type=float, default=0.1, help="noise standard deviation (signals: 1)")
    parser.add_argument(
        "--threshold", type=float, default=0.8, help="mass each element must put on one element"
    )
    parser.add_argument("--size", type=int, default=None, help="signal length / grid side / cube side")
    parser.add_argument("--channels", type=int, default=8, help="canonical signals per sample")
    parser.add_argument("--samples", type=int, default=8, help="noisy copies per target element")
    parser.add_argument("--learn-identity", action="store_true", help="learn the first element too")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: tiny tensors)")
    parser.add_argument(
        "--json", type=Path, default=None, metavar="PATH", help="also write the result as JSON"
    )
    parser.set_defaults(run=run_toy_command)


def run_toy_command(args: argparse.Namespace) -> int:
    """Run :func:`run_toy` from parsed arguments, print the table, optionally write JSON.

    Returns 0 when the group (or the partial subset) was recovered, 1 when it was not, 2 on bad arguments
    or an unwritable ``--json`` path (the message goes to stderr).
    """
    try:
        result = run_toy(
            args.problem,
            partial=args.partial,
            seed=args.seed,
            steps=args.steps,
            noise=args.noise,
            threshold=args.threshold,
            size=args.size,
            channels=args.channels,
            samples=args.samples,
            fix_identity=not args.learn_identity,
            threads=args.threads,
        )
        print(format_toy_result(result))
        if args.json is not None:
            args.json.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    except (ValueError, TypeError, OSError) as error:
        print(f"symkernels toy: error: {error}", file=sys.stderr)
        return 2
    return 0 if result.recovered else 1
