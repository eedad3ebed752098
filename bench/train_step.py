"""Time the default training step on the CPU and say where its milliseconds go.

    python bench/train_step.py [--threads 1 2] [--busy 0 1] [--steps 40] [--dataset mnist5k] [--channels C]

For each thread count and each number of competing busy processes (``--busy 1`` starts one
``while True: pass`` process for the measurement and stops it afterwards), times ``--steps`` steps of
:func:`symkernels.training.loop.training_step` on augmented batches of the dataset's default config (the
batch drawn and transformed as the training loop does, included in the time), after warm-up. Once per thread
count it also profiles the step (torch.profiler, self CPU time grouped into Sinkhorn, kernel expansion,
convolutions, layer norm + ReLU, optimiser, the rest) and times the learned stacks' Sinkhorn and expansion
alone, forward + backward. Writes ``bench/results/train-step-cpu.json`` (raw times, machine, load averages,
versions, commit) and ``bench/results/train-step-cpu.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

# Profiler op names (self CPU time) → the part of the step they belong to; the first match wins.
CATEGORIES = (
    ("sinkhorn", ("sinkhorn", "representation_stack")),
    ("expansion", ("expand_kernel",)),
    ("convolution", ("convolution", "conv2d", "mkldnn")),
    ("layer norm + relu", ("layer_norm", "relu", "threshold", "clamp_min")),
    ("optimizer", ("adamw", "optimizer", "_foreach", "lerp", "addcdiv", "sqrt")),
    ("augmentation", ("grid_sampler", "affine_grid")),
)


def _commit() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@contextlib.contextmanager
def busy_processes(count: int) -> Iterator[None]:
    """``count`` processes spinning on the CPU for the duration of the block."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        time.sleep(0.5 if spinners else 0)  # let them get scheduled
        yield
    finally:
        for process in spinners:
            process.kill()
            process.wait()


class Step:
    """The default config's model, optimiser and data stream; ``run()`` is one training step."""

    def __init__(self, config) -> None:
        import torch

        from symkernels.training.datasets import prepare_data
        from symkernels.training.factory import build_model, build_optimizer
        from symkernels.training.rng import DataStreams

        self.config = config
        self.data = prepare_data(config)
        self.model = build_model(config, self.data.in_channels, self.data.num_classes)
        self.optimizer = build_optimizer(self.model, config)
        self.streams = DataStreams.from_seed(config.seed)
        self.order = torch.randperm(len(self.data.train_labels), generator=self.streams.order)
        self.position = 0

    def run(self) -> None:
        from symkernels.training.loop import training_step

        size = self.config.batch_size
        if self.position + size > len(self.order):
            self.position = 0
        index = self.order[self.position : self.position + size]
        self.position += size
        params = self.data.augmentation.sample(size, self.streams.augment)
        x = self.data.training_batch(index, params)
        training_step(self.model, self.optimizer, x, self.data.train_labels[index], self.config)


def time_steps(step: Step, steps: int, warmup: int = 5) -> list[float]:
    for _ in range(warmup):
        step.run()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step.run()
        times.append(time.perf_counter() - start)
    return times


def profile_step(step: Step, steps: int = 10) -> dict[str, float]:
    """Self CPU milliseconds per step, by category (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step.run()
    totals: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        name = event.key.lower()
        category = next((c for c, keys in CATEGORIES if any(k in name for k in keys)), "other")
        totals[category] += event.self_cpu_time_total / 1000 / steps
    return dict(totals)


def stacks_fwd_bwd(step: Step, repeats: int = 20) -> dict[str, float]:
    """Median ms of the learned stacks' Sinkhorn, and of the kernel expansion, forward + backward."""
    import torch

    from symkernels import functional
    from symkernels.models import weight_sharing_layers
    from symkernels.nn import precompute_representations

    model = step.model
    layers = [layer for _, layer in weight_sharing_layers(model)]

    def sinkhorn() -> None:
        with precompute_representations(model) as stacks:
            total = sum(s.sum() for s in stacks.values())
        total.backward()

    with torch.no_grad(), precompute_representations(model) as computed:
        frozen = {name: s.detach().requires_grad_() for name, s in computed.items()}
    names = [name for name, m in model.named_modules() if m in [layer.reps for layer in layers]]

    def expansion() -> None:
        total = 0
        for name, layer in zip(names, layers, strict=True):
            total = total + functional.expand_kernel(frozen[name], layer.weight, layer.kernel_size).sum()
        total.backward()

    out = {}
    for label, fn in (("sinkhorn", sinkhorn), ("expansion", expansion)):
        for _ in range(3):
            fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
        out[label] = 1000 * statistics.median(times)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--busy", type=int, nargs="+", default=[0, 1], help="competing busy processes")
    parser.add_argument("--steps", type=int, default=40, help="timed steps (and Sinkhorn/expansion repeats)")
    parser.add_argument("--profile-steps", type=int, default=10, help="steps under torch.profiler")
    parser.add_argument("--dataset", default="mnist5k")
    parser.add_argument("--channels", type=int, help="override the dataset's default width")
    parser.add_argument("--out", type=Path, default=RESULTS / "train-step-cpu")
    args = parser.parse_args(argv)
    import torch

    import symkernels
    from symkernels.training import TrainConfig

    overrides = {} if args.channels is None else {"channels": args.channels}
    config = TrainConfig.for_dataset(args.dataset, **overrides)
    rows: list[dict[str, Any]] = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        step = Step(config)
        parts = profile_step(step, args.profile_steps)
        alone = stacks_fwd_bwd(step, args.steps)
        for busy in args.busy:
            with busy_processes(busy):
                load_before = os.getloadavg()
                times = time_steps(step, args.steps)
            row = {
                "threads": threads,
                "busy_processes": busy,
                "median_ms": 1000 * statistics.median(times),
                "min_ms": 1000 * min(times),
                "times_ms": [1000 * t for t in times],
                "load_average_before": list(load_before),
                "profile_ms": parts,
                "sinkhorn_fwd_bwd_ms": alone["sinkhorn"],
                "expansion_fwd_bwd_ms": alone["expansion"],
            }
            rows.append(row)
            print(
                f"threads {threads} busy {busy}: median {row['median_ms']:.1f} ms (min {row['min_ms']:.1f}), "
                f"load before {load_before[0]:.2f}",
                flush=True,
            )
    record = {
        "config": config.to_dict(),
        "cpu": _cpu_name(),
        "logical_cores": os.cpu_count(),
        "torch": torch.__version__,
        "symkernels": symkernels.__version__,
        "commit": _commit(),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(record) + "\n")
    print(markdown(record))
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def markdown(record: dict[str, Any]) -> str:
    c, steps = record["config"], len(record["rows"][0]["times_ms"])
    lines = [
        f"Training step of the default run ({c['model']}, {c['channels']} channels, batch {c['batch_size']}, "
        f"{c['dataset']}, float32; batch drawn and rotated included), median of {steps} steps. "
        f"CPU: {record['cpu']}, {record['logical_cores']} logical cores, torch {record['torch']}, "
        f"commit {record['commit'][:12]}. Reproduce: `python bench/train_step.py`.",
        "",
        "| threads | busy competing processes | load avg before | step (ms) | Sinkhorn fwd+bwd (ms) | "
        "expansion fwd+bwd (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for row in record["rows"]:
        lines.append(
            f"| {row['threads']} | {row['busy_processes']} | {row['load_average_before'][0]:.2f} | "
            f"{row['median_ms']:.1f} | {row['sinkhorn_fwd_bwd_ms']:.1f} | {row['expansion_fwd_bwd_ms']:.1f} |"
        )
    lines += ["", "Profile of one step (self CPU ms, torch.profiler, no competing process of ours):", ""]
    seen = []
    for row in record["rows"]:
        if row["threads"] in seen:
            continue
        seen.append(row["threads"])
        parts = ", ".join(f"{k} {v:.1f}" for k, v in sorted(row["profile_ms"].items(), key=lambda kv: -kv[1]))
        lines.append(f"- {row['threads']} thread(s): {parts}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
