"""``symkernels layerwise train|report``: marginal-likelihood runs of relaxed networks, their share tables."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from symkernels.layerwise.config import DEFAULT_BLOCKS, MODELS, LayerwiseConfig
from symkernels.layerwise.marglik import FISHERS
from symkernels.layerwise.sharing import STACKS
from symkernels.layerwise.tasks import SOURCES, TASKS

# Flags that set LayerwiseConfig fields (dest = field name); unset flags keep the config's defaults.
_CONFIG_FLAGS: tuple[tuple[str, dict], ...] = (
    ("--task", {"choices": TASKS, "help": "data set (default rotated)"}),
    (
        "--source",
        {"choices": SOURCES, "help": "digits: mnist5k (5,000 real MNIST digits, default) or digits"},
    ),
    ("--model", {"choices": MODELS, "help": "relaxed layers (default groups: F-FC / CONV / GCONV)"}),
    ("--stack", {"choices": STACKS, "help": "sharing model: learned soft permutations or exact C4"}),
    ("--size", {"type": int, "help": "image size (default 16)"}),
    (
        "--width",
        {
            "type": int,
            "help": "α: block channels are multiples of it, per lifted copy for groups (default 4)",
        },
    ),
    (
        "--blocks",
        {
            "help": "blocks as multiple:stride,... (default "
            f"{DEFAULT_BLOCKS['backbone']}; sharing: {DEFAULT_BLOCKS['sharing']})"
        },
    ),
    ("--epochs", {"type": int}),
    ("--batch-size", {"type": int}),
    ("--lr", {"type": float, "help": "SGD learning rate (cosine schedule)"}),
    ("--momentum", {"type": float}),
    ("--stack-lr", {"type": float, "help": "Adam learning rate of the learned stacks (sharing model)"}),
    ("--burn-in", {"type": int, "help": "epochs before the first marginal-likelihood step"}),
    ("--marglik-every", {"type": int, "help": "epochs between marginal-likelihood steps"}),
    ("--hyper-steps", {"type": int, "help": "Adam steps on log δ per marginal-likelihood step"}),
    ("--hyper-lr", {"type": float}),
    ("--fisher", {"choices": FISHERS, "help": "exact GGN (default) or mc: one sampled label per image"}),
    ("--curvature-batch-size", {"type": int}),
    ("--train-limit", {"type": int, "metavar": "N", "help": "use only the first N training images"}),
    ("--test-limit", {"type": int, "metavar": "N", "help": "use only the first N test images"}),
    ("--seed", {"type": int}),
)


def _field(flag: str) -> str:
    return flag[2:].replace("-", "_")


def add_layerwise_command(commands: argparse._SubParsersAction) -> None:
    """Register ``layerwise`` with its ``train`` and ``report`` subcommands."""
    layerwise = commands.add_parser(
        "layerwise",
        help="layer-wise equivariance learned through the marginal likelihood (needs symkernels[layerwise])",
        description=(
            "Relaxed layers (FC, CONV, GCONV, ... paths per layer, or a weight-sharing layer next to a free "
            "one) trained with per-tensor prior precisions learned by a KFAC Laplace marginal likelihood "
            "(laplace-torch + curvlinops). Each layer's paths get shares from their effective dimensions."
        ),
    )
    actions = layerwise.add_subparsers(dest="layerwise_command", required=True)
    train = actions.add_parser(
        "train",
        help="train a relaxed network (config.json, checkpoint.pt, metrics.json, shares.md, shares.png)",
        description=(
            "Train with the paper's schedule (SGD steps on CE + δ/(2N)||θ||²; after a burn-in, every few "
            "epochs and after the last one, a KFAC fit over the training set and Adam steps on log δ). "
            "SIGINT/SIGTERM stop at the last complete epoch; --resume continues bit for bit."
        ),
    )
    experiment = train.add_argument_group("experiment (stored in config.json)")
    for flag, options in _CONFIG_FLAGS:
        experiment.add_argument(flag, default=argparse.SUPPRESS, **options)
    where = train.add_argument_group("run folder")
    where.add_argument("--out", metavar="DIR", help="run folder (default: runs/<timestamp>)")
    where.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its last checkpoint")
    runtime = train.add_argument_group("execution")
    runtime.add_argument("--threads", type=int, help="torch CPU threads")
    runtime.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N")
    runtime.add_argument("--quiet", action="store_true", help="no progress bar or epoch lines")
    train.set_defaults(run=_train)

    report = actions.add_parser(
        "report",
        help="the per-layer share tables of finished runs, side by side in one figure",
        description="Print each run's final per-layer share table; --out DIR adds shares.md and shares.png.",
    )
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="folders written by `layerwise train`")
    report.add_argument("--out", metavar="DIR", help="write DIR/shares.md and DIR/shares.png")
    report.set_defaults(run=_report)


def _train(args: argparse.Namespace) -> int:
    from symkernels.layerwise.trainer import train_layerwise
    from symkernels.training.interrupt import TrainingInterruptedError

    given = {
        _field(flag): getattr(args, _field(flag)) for flag, _ in _CONFIG_FLAGS if hasattr(args, _field(flag))
    }
    try:
        if args.resume is not None:
            if given:
                raise ValueError(f"--resume continues the stored config; drop {sorted(given)}")
            result = train_layerwise(
                out=args.out, resume=args.resume, threads=args.threads, device=args.device, quiet=args.quiet
            )
        else:
            config = LayerwiseConfig.create(**given)
            result = train_layerwise(
                config, args.out, threads=args.threads, device=args.device, quiet=args.quiet
            )
    except TrainingInterruptedError as stopped:
        print(f"symkernels layerwise: {stopped}", file=sys.stderr)
        return stopped.exit_code
    except (ValueError, TypeError, OSError, RuntimeError) as error:
        print(f"symkernels layerwise: error: {error}", file=sys.stderr)
        return 2
    if args.quiet:
        print(f"test accuracy {result.metrics['test_accuracy']:.4f}; run folder {result.run_dir}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from symkernels.layerwise.report import format_share_table, save_share_figure
    from symkernels.training.checkpoint import atomic_write_text

    try:
        runs = [_final_shares(Path(folder)) for folder in args.run_dirs]
        text = "\n".join(format_share_table(layers, title=title) for title, _, layers in runs)
        print(text, end="")
        if args.out is not None:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / "shares.md", text)
            save_share_figure([(label, layers) for _, label, layers in runs], out / "shares.png")
    except (ValueError, TypeError, OSError, KeyError) as error:
        print(f"symkernels layerwise report: error: {error}", file=sys.stderr)
        return 2
    return 0


def _final_shares(folder: Path) -> tuple[str, str, dict]:
    """``(title, short label, per-layer shares)`` of the last marginal-likelihood step of a run."""
    path = folder / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a layer-wise run folder (no metrics.json)")
    metrics = json.loads(path.read_text())
    if not metrics.get("marglik"):
        raise ValueError(f"{folder} has no marginal-likelihood step yet")
    c, last = metrics["config"], metrics["marglik"][-1]
    accuracy = metrics.get("test_accuracy")
    model = f"{c['model']} ({c['stack']} stacks)" if c["model"] == "sharing" else c["model"]
    title = (
        f"{model} on {c['task']} {c['source']} ({c['size']}×{c['size']}), seed {c['seed']}, "
        f"epoch {last['epoch']}" + (f", test accuracy {accuracy:.3f}" if accuracy is not None else "")
    )
    return title, f"{model}, {c['task']}, seed {c['seed']}", last["layers"]
