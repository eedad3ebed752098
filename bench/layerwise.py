"""Where the marginal-likelihood step spends its time: one KFAC fit plus the hypersteps, against one epoch.

    python bench/layerwise.py [--threads 1] [--model groups] [--width 2] [--images 1000] [--repeats 3]

On the backbone of the layer-wise experiments (16×16 real digits, rotated), times the median of ``--repeats``
rounds of: one training epoch (SGD steps, the fast form of every path), one curvature fit over the same
images (exact Fisher: one backward pass per class; and the one-sample Monte-Carlo Fisher), and 20 Adam steps
on log δ. The exact fit is profiled (cProfile) into its parts: the backward passes, accumulating the two
Kronecker factors in the hooks, the loss-Hessian square roots, the eigendecompositions, the rest (forward,
data, glue). Writes ``bench/results/layerwise-cpu-<threads>t.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/layerwise.py` puts bench/, not the repository, on the path
    sys.path.insert(0, str(ROOT))

from bench.environment import commit  # noqa: E402
from symkernels.layerwise import LayerwiseConfig, fit_curvature, prior_parameters  # noqa: E402
from symkernels.layerwise.tasks import load_task  # noqa: E402
from symkernels.layerwise.trainer import build_model  # noqa: E402

RESULTS = ROOT / "bench" / "results"

# cProfile entries whose time makes up each part of a fit: (part, function name, tottime or cumtime).
_PARTS = (
    ("backward passes (autograd)", "run_backward", "tottime"),
    ("B factors (output-gradient Gram, hooks)", "_accumulate_gradient_covariance", "cumtime"),
    ("A factors (input Gram, hooks)", "_hook_accumulate_input_covariance", "cumtime"),
    ("loss-Hessian square roots", "loss_hessian_matrix_sqrt", "cumtime"),
    ("eigendecompositions", "linalg_eigh", "tottime"),
)


def _median_seconds(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def _profile_fit(model, images, labels) -> dict[str, float]:
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    fit_curvature(model, images, labels, batch_size=250)
    profiler.disable()
    total = time.perf_counter() - start
    stats = pstats.Stats(profiler).stats
    parts = {}
    for part, function, column in _PARTS:
        seconds = 0.0
        for (_, _, name), (_, _, tottime, cumtime, _) in stats.items():
            if name == function or name.endswith(f".{function}") or function in name:
                seconds += tottime if column == "tottime" else cumtime
        parts[part] = seconds
    parts["rest (forward, data, glue)"] = max(0.0, total - sum(parts.values()))
    parts["total"] = total
    return parts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default="groups")
    parser.add_argument("--width", type=int, default=2, help="α (2: the experiments of docs/layerwise.md)")
    parser.add_argument("--task", default="rotated")
    parser.add_argument("--source", default="mnist5k")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = LayerwiseConfig.create(
        model=args.model,
        task=args.task,
        source=args.source,
        width=args.width,
        train_limit=args.images,
        test_limit=10,
    )
    task = load_task(config.task, config.source, config.size, train_limit=args.images, test_limit=10)
    images, labels = task.train_images, task.train_labels
    model = build_model(config, 1, task.num_classes)
    priors = [p for _, p in prior_parameters(model)]
    # As the trainer: one group per tensor, the prior term δ_l/(2N)||θ_l||² as weight decay δ_l/N (δ = 1).
    groups = [{"params": [p], "weight_decay": 1.0 / len(labels)} for p in priors]
    optimizer = torch.optim.SGD(groups, lr=1e-3, momentum=0.9)

    def epoch() -> None:
        for start in range(0, len(labels) - config.batch_size + 1, config.batch_size):
            x, y = images[start : start + config.batch_size], labels[start : start + config.batch_size]
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    epoch()  # warm-up
    epoch_s, epoch_all = _median_seconds(epoch, args.repeats)
    exact_s, exact_all = _median_seconds(
        lambda: fit_curvature(model, images, labels, batch_size=250), args.repeats
    )
    mc_s, mc_all = _median_seconds(
        lambda: fit_curvature(model, images, labels, batch_size=250, fisher="mc"), args.repeats
    )
    curvature = fit_curvature(model, images, labels, batch_size=250)
    log_delta = torch.zeros(len(priors), dtype=torch.float64, requires_grad=True)
    adam = torch.optim.Adam([log_delta], lr=0.1)

    def hypersteps() -> None:
        for _ in range(20):
            adam.zero_grad()
            (-curvature.log_marginal_likelihood(log_delta.exp()) / len(labels)).backward()
            adam.step()

    hyper_s, hyper_all = _median_seconds(hypersteps, args.repeats)
    parts = _profile_fit(model, images, labels)

    environment = {
        "device": f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores",
        "threads": args.threads,
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "commit": commit(),
    }
    from importlib.metadata import version

    for package in ("laplace-torch", "curvlinops-for-pytorch"):
        environment[package] = version(package)
    workload = {
        "model": config.model,
        "blocks": config.blocks,
        "width": config.width,
        "size": config.size,
        "task": f"{config.task} {config.source}",
        "images": len(labels),
        "classes": task.num_classes,
        "parameters": sum(p.numel() for p in model.parameters()),
        "tensors_with_prior": len(priors),
        "batch_size": config.batch_size,
        "curvature_batch_size": 250,
    }
    rows = {
        "one training epoch": (epoch_s, epoch_all),
        "one fit, exact Fisher": (exact_s, exact_all),
        "one fit, Monte-Carlo Fisher (1 sample)": (mc_s, mc_all),
        "20 hypersteps on log δ": (hyper_s, hyper_all),
    }
    result = {"environment": environment, "workload": workload, "seconds": rows, "exact_fit_profile": parts}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"layerwise-cpu-{args.threads}t"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(_markdown(result, args))
    print(stem.with_suffix(".md").read_text())
    return 0


def _markdown(result: dict, args: argparse.Namespace) -> str:
    env, work, rows, parts = (
        result["environment"],
        result["workload"],
        result["seconds"],
        result["exact_fit_profile"],
    )
    epoch = rows["one training epoch"][0]
    lines = [
        f"Marginal-likelihood step against a training epoch: {work['model']} backbone "
        f"(blocks {work['blocks']}, α = {work['width']}, {work['parameters']:,} parameters in "
        f"{work['tensors_with_prior']} tensors with a "
        f"prior), {work['images']} {work['size']}×{work['size']} images ({work['task']}, {work['classes']} "
        f"classes), float32. {env['device']}, {env['threads']} thread(s), load average "
        f"{env['load_average'][0]:.1f} while it ran, torch {env['torch']}, "
        f"laplace-torch {env['laplace-torch']}, "
        f"curvlinops {env['curvlinops-for-pytorch']}, commit {env['commit'][:12]}. Median of {args.repeats}. "
        f"Reproduce: `python bench/layerwise.py --threads {env['threads']}`.",
        "",
        "| what | seconds | × one epoch |",
        "|---|---|---|",
    ]
    for name, (median, _) in rows.items():
        lines.append(f"| {name} | {median:.3f} | {median / epoch:.2f} |")
    lines += ["", "Where one exact fit spends its time (cProfile, one run):", ""]
    lines += ["| part | seconds | share |", "|---|---|---|"]
    total = parts["total"]
    for name, seconds in parts.items():
        if name != "total":
            lines.append(f"| {name} | {seconds:.3f} | {100 * seconds / total:.0f} % |")
    lines.append(f"| total | {total:.3f} | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
