"""The ``symkernels`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from symkernels.demo import DemoConfig, format_decomposition, run_demo


def _info(args: argparse.Namespace) -> int:
    from symkernels.info import format_info

    print(format_info())
    return 0


def _demo(args: argparse.Namespace) -> int:
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = DemoConfig(epochs=args.epochs, seed=args.seed, train_limit=args.train_limit)
    print(
        f"Training a WSCNN (lifting + {config.num_layers} group-conv layers, "
        f"{config.hidden_channels} channels, |G| = 4) on scikit-learn's digits at 28x28,\n"
        "each image rotated by a random multiple of 90 degrees."
    )
    result = run_demo(config, progress=not args.quiet)
    print(f"test accuracy: {result.test_accuracy:.4f}  ({result.seconds:.1f} s)")
    print("Lifting layer: each learned 25x25 matrix decomposed onto the four exact C4 rotations")
    print("(non-negative coefficients summing to 1; a recovered group puts each row's mass on one rotation):")
    print(format_decomposition(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="symkernels", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="versions, what was built, which backends are usable")
    info.set_defaults(run=_info)
    demo = commands.add_parser("demo", help="train a small WSCNN on rotated digits (a few minutes on a CPU)")
    demo.add_argument("--epochs", type=int, default=DemoConfig.epochs)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--train-limit", type=int, default=None, help="use only this many training images")
    demo.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    demo.add_argument("--quiet", action="store_true", help="no progress output")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
