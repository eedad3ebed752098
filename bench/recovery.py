"""The long experiment: does the lifting stack of a WSCNN trained on rotated real digits find the four
rotations, and how does its trajectory compare with the authors' run, step by step?

    python bench/recovery.py [--steps 94000] [--channels 32] [--threads 1] [--device auto]
                             [--out bench/results/recovery-<date>] [--max-minutes M]

Trains the paper's rotated-MNIST configuration (AdamW lr 1e-2 for weights and logits, weight decay 1e-4,
λ_norm 0.1, T = 20, batch 64, continuous rotations, normalised inputs) on the 5,000 MNIST digits of
``--dataset mnist5k`` for a budget of optimisation steps, at the paper's width or a narrower one. The run
folder (checkpoint after every epoch, metrics) is ``--run-dir`` (default ``runs/<name of --out>``); after
every epoch the results folder ``--out`` gets:

    trajectory.json   the config, commit, machine, and one evaluation per epoch: step, test accuracy and, for
                      each learned lifting element (and each group-conv layer's), its best exact element and
                      that element's mass; the verdict at the latest evaluation
    config.json       the experiment (as in the run folder)
    trajectory.png    best-element mass against steps, the authors' run as markers (every 20 epochs, and
                      at the end)
    summary.md        the side-by-side table of this run and the authors' trajectory by steps

Running the same command again continues from the last checkpoint (also after a kill or ``--max-minutes``);
a larger ``--steps`` extends a finished run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # `python bench/recovery.py` puts bench/, not the repository root, on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.environment import ROOT, commit, cpu_name

PLOT_EVERY_EPOCHS = 20
# Steps at which the side-by-side table compares this run with the authors' (theirs at 23k, 47k, 70k, 94k).
TABLE_STEPS = (
    1_000,
    2_500,
    5_000,
    10_000,
    15_000,
    23_000,
    30_000,
    40_000,
    47_000,
    60_000,
    70_000,
    80_000,
    94_000,
)


class TimeBudgetReachedError(Exception):
    """``--max-minutes`` ran out after a complete (checkpointed) epoch."""


def _machine(device: str, threads: int) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "cpu": cpu_name(),
        "logical_cores": os.cpu_count(),
        "threads": threads,
        "device": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=94_000, help="optimisation steps (the authors': ~94k)")
    parser.add_argument("--channels", type=int, default=32, help="hidden channels (the paper's: 32)")
    parser.add_argument("--seed", type=int, default=0)
    today = datetime.date.today().strftime("%Y%m%d")
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "bench" / "results" / f"recovery-{today}",
        help="results folder (default bench/results/recovery-<today>); the same --out continues a run",
    )
    parser.add_argument(
        "--run-dir", type=Path, help="run folder: checkpoint and metrics (default runs/<name of --out>)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1, as symkernels train)"
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    parser.add_argument("--backend", help="symkernels backend (default: automatic)")
    parser.add_argument(
        "--max-minutes",
        type=float,
        help="stop cleanly after the first epoch that ends past this many minutes",
    )
    args = parser.parse_args(argv)
    for name in ("steps", "channels"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.max_minutes is not None and not args.max_minutes > 0:
        parser.error(f"--max-minutes must be > 0, got {args.max_minutes}")
    return args


def experiment(args: argparse.Namespace):
    """The paper's rotated-MNIST configuration on mnist5k at ``--channels``, long enough for ``--steps``."""
    from symkernels.data import load_dataset
    from symkernels.training import TrainConfig

    base = TrainConfig.for_dataset("mnist5k", channels=args.channels, seed=args.seed)
    (_, train_labels), _ = load_dataset("mnist5k")
    steps_per_epoch = len(train_labels) // base.batch_size  # the last incomplete batch is dropped
    return TrainConfig.for_dataset(
        "mnist5k", channels=args.channels, seed=args.seed, epochs=math.ceil(args.steps / steps_per_epoch)
    )


def evaluations(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per epoch: step, test accuracy, each learned element's best exact element and its mass."""
    from symkernels.training import report

    layers = [name for name in metrics.get("group_elements", {}) if metrics.get("learned_rows", {}).get(name)]
    per_layer = {name: report.trajectory(metrics, name) for name in layers}
    out = []
    for i, record in enumerate(metrics["epochs"]):
        out.append(
            {
                "step": record["step"],
                "epoch": record["epoch"],
                "test_accuracy": record["test_accuracy"],
                "train_loss": record["train_loss"],
                "seconds_per_step": record["seconds_per_step"],
                "layers": {name: per_layer[name][i]["elements"] for name in layers},
            }
        )
    return out


def _cell(elements: list[dict[str, Any]]) -> str:
    return " / ".join(f"{e['assigned']} {e['mass']:.2f}" for e in elements)


def side_by_side(points: list[dict[str, Any]], channels: int) -> str:
    """Markdown: this run's lifting elements (best rotation, mass) next to the authors' at the same steps."""
    from symkernels.training.report import AUTHORS_LIFT_TRAJECTORY

    authors = {point["step"]: point for point in AUTHORS_LIFT_TRAJECTORY}
    last = points[-1]["step"] if points else 0
    steps = [s for s in TABLE_STEPS if s <= last or s in authors]
    lines = [
        f"| step | this run ({channels} ch, 4,000 digits): R1 / R2 / R3, best rotation and its mass "
        "| test acc | authors (32 ch, 60,000 digits): R1 / R2 / R3 |",
        "|---|---|---|---|",
    ]
    rows = [
        (s, max((p for p in points if p["step"] <= s), key=lambda p: p["step"], default=None)) for s in steps
    ]
    if points and last not in steps:
        rows.append((last, points[-1]))
    for step, point in sorted(rows, key=lambda row: row[0]):
        ours = "not reached" if point is None or step > last else _cell(point["layers"]["lift"])
        accuracy = "" if point is None or step > last else f"{point['test_accuracy']:.3f}"
        if point is not None and step <= last and point["step"] != step:
            ours += f" (step {point['step']:,})"
        theirs = " / ".join(f"{m:.2f}" for m in authors[step]["mass"]) if step in authors else ""
        lines.append(f"| {step:,} | {ours} | {accuracy} | {theirs} |")
    return "\n".join(lines)


def verdict_line(elements: list[dict[str, Any]], threshold: float) -> str:
    covered = sorted({e["assigned"] for e in elements})
    lowest = min(e["mass"] for e in elements)
    named = ", ".join(f"{e['element']} on {e['assigned']} ({e['mass']:.3f})" for e in elements)
    distinct = len(covered) == len(elements)
    reached = lowest >= threshold and distinct and "rot0" not in covered
    head = "RECOVERED" if reached else "not recovered"
    return (
        f"{head}: {named}; lowest mass {lowest:.3f} (goal >= {threshold:.2f}), rotations covered with the "
        f"fixed identity: {', '.join(['rot0', *[c for c in covered if c != 'rot0']])}"
    )


class ResultsWriter:
    """Writes the results folder from the run's metrics after every epoch."""

    def __init__(self, args: argparse.Namespace, config, run_dir: Path, machine: dict[str, Any]) -> None:
        self.args, self.config, self.run_dir, self.machine = args, config, run_dir, machine
        self.out: Path = args.out
        self.started = time.monotonic()
        self.commits = self._previous_commits() + [commit()]

    def _previous_commits(self) -> list[str]:
        path = self.out / "trajectory.json"
        if not path.is_file():
            return []
        try:
            return list(json.loads(path.read_text()).get("commits", []))
        except (OSError, ValueError):
            return []

    def write(self, metrics: dict[str, Any], *, final: bool = False) -> dict[str, Any]:
        from symkernels.training.checkpoint import atomic_write_text
        from symkernels.training.report import (
            AUTHORS_LIFT_TRAJECTORY,
            RECOVERY_THRESHOLD,
            save_trajectory_figure,
        )

        points = evaluations(metrics)
        record: dict[str, Any] = {
            "experiment": "lifting-stack recovery on rotated mnist5k (bench/recovery.py)",
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "config": self.config.to_dict(),
            "target_steps": self.args.steps,
            "steps_per_epoch": metrics["epochs"][0]["steps"] if metrics["epochs"] else None,
            "commits": list(dict.fromkeys(self.commits)),
            "machine": self.machine,
            "backend": metrics.get("backend"),
            "run_dir": str(self.run_dir),
            "complete": final,
            "training_seconds": sum(e["epoch_seconds"] for e in metrics["epochs"]),
            "load_average_now": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "threshold": RECOVERY_THRESHOLD,
            "authors": [dict(p, mass=list(p["mass"])) for p in AUTHORS_LIFT_TRAJECTORY],
            "trajectory": points,
        }
        if points:
            record["verdict"] = verdict_line(points[-1]["layers"]["lift"], RECOVERY_THRESHOLD)
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out / "trajectory.json", json.dumps(record, indent=1) + "\n")
        atomic_write_text(self.out / "config.json", self.config.to_json() + "\n")
        atomic_write_text(self.out / "summary.md", self.summary(record) + "\n")
        epoch = metrics["epochs_completed"]
        if final or epoch % PLOT_EVERY_EPOCHS == 0 or not (self.out / "trajectory.png").exists():
            right = max(self.args.steps, AUTHORS_LIFT_TRAJECTORY[-1]["step"]) * 1.02
            save_trajectory_figure(
                metrics, self.out / "trajectory.png", reference=AUTHORS_LIFT_TRAJECTORY, max_step=right
            )
        return record

    def summary(self, record: dict[str, Any]) -> str:
        points = record["trajectory"]
        machine = record["machine"]
        where = machine.get("gpu") or f"{machine['cpu']}, {machine['threads']} thread(s)"
        seconds = record["training_seconds"]
        per_step = seconds / points[-1]["step"] if points else float("nan")
        status = "finished" if record["complete"] else "in progress / stopped (resumable)"
        lines = [
            f"# Lifting-stack recovery on rotated mnist5k: {self.config.channels} channels",
            "",
            f"`{record['command']}` — {status}; {points[-1]['step'] if points else 0:,} of "
            f"{record['target_steps']:,} steps, {seconds / 3600:.2f} h of training on {where} "
            f"({1000 * per_step:.0f} ms per step), commit {', '.join(record['commits'])}.",
            "",
            side_by_side(points, self.config.channels),
            "",
        ]
        if "verdict" in record:
            lines.append(f"Lift at step {points[-1]['step']:,}: {record['verdict']}.")
        return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from symkernels.training import RuntimeOptions, TrainingInterruptedError, train
    from symkernels.training.steps import torch_device

    config = experiment(args)
    run_dir = args.run_dir if args.run_dir is not None else ROOT / "runs" / args.out.name
    runtime = RuntimeOptions(backend=args.backend, device=args.device, threads=args.threads, quiet=True)
    torch.set_num_threads(args.threads)
    machine = _machine(str(torch_device(args.device)), torch.get_num_threads())
    writer = ResultsWriter(args, config, run_dir, machine)
    deadline = None if args.max_minutes is None else time.monotonic() + 60 * args.max_minutes

    def after_epoch(metrics: dict[str, Any]) -> None:
        record = writer.write(metrics)
        point = record["trajectory"][-1]
        lift = " ".join(f"{e['element']}:{e['assigned']} {e['mass']:.3f}" for e in point["layers"]["lift"])
        print(
            f"step {point['step']:>6} epoch {point['epoch']:>5}  test acc {point['test_accuracy']:.4f}  "
            f"train loss {point['train_loss']:.4f}  {1000 * point['seconds_per_step']:.0f} ms/step  "
            f"lift {lift}",
            flush=True,
        )
        if deadline is not None and time.monotonic() > deadline:
            raise TimeBudgetReachedError

    print(
        f"recovery run: {config.channels} channels, {config.epochs} epochs (>= {args.steps:,} steps), "
        f"run folder {run_dir}, results {args.out}, {machine['threads']} thread(s), "
        f"device {machine['device']}",
        flush=True,
    )
    resume_hint = f"continue with: python bench/recovery.py {' '.join(sys.argv[1:])}".rstrip()
    try:
        result = train(config, runtime, out=run_dir, on_epoch=after_epoch)
    except TimeBudgetReachedError:
        print(f"--max-minutes {args.max_minutes} reached; {resume_hint}", flush=True)
        return 0
    except TrainingInterruptedError as stopped:
        print(f"{stopped}; {resume_hint}", file=sys.stderr, flush=True)
        return stopped.exit_code
    record = writer.write(result.metrics, final=True)
    print(writer.summary(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
