"""Kernel expansion (``[G, d, d]`` reps × weight ``[C_out, C_in, d]`` → conv kernel), forward and backward.

    python bench/expansion.py [--quick] [--threads 1 2] [--only REGEX] [--device cpu|cuda] [--out FILE]

At the paper's layer shapes, as the models call it: the identity fixed (``leading_identity=True``, 3 learned
matrices of a C4 stack). Providers: the eager reference (the identity concatenated, then one einsum) and every
native backend that serves the device (``symkernels.expand_kernel``); float32, and bfloat16 on a GPU.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch

if __name__ == "__main__":  # `python bench/expansion.py` puts bench/, not the repository root, on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import symkernels
from bench.environment import backend_reason, native_backends
from bench.harness import Case, Closure
from symkernels.functional import prepend_identity
from symkernels.reference import expand_kernel_reference

OP = "expansion"
MODES = ("fwd", "fwd+bwd")
# (C_out, C_in, G, G_in, k) of the paper's layers.
SHAPES = {
    "mnist-lift": (32, 1, 4, 1, 5),
    "mnist-gconv": (32, 32, 4, 4, 5),
    "cifar-lift": (32, 3, 4, 1, 7),
    "cifar-gconv-32x32": (32, 32, 4, 4, 7),
    "cifar-gconv-64x32": (64, 32, 4, 4, 7),
    "cifar-gconv-64x64": (64, 64, 4, 4, 7),
}
QUICK_SHAPES = ("mnist-lift", "mnist-gconv")
REFERENCE = "reference"


def make_closure(provider: str, workload: str, mode: str, dtype: str, device: str) -> Callable[[], Closure]:
    out_channels, in_channels, groups, in_groups, k = SHAPES[workload]

    def make() -> Closure:
        d = in_groups * k * k
        generator = torch.Generator().manual_seed(0)
        reps = torch.rand(groups - 1, d, d, generator=generator)
        reps = (reps / reps.sum(-1, keepdim=True)).to(device=device, dtype=getattr(torch, dtype))
        weight = torch.randn(out_channels, in_channels, d, generator=generator)
        weight = weight.to(device=device, dtype=getattr(torch, dtype))
        backward = mode == "fwd+bwd"
        reps.requires_grad_(backward)
        weight.requires_grad_(backward)
        if provider == REFERENCE:

            def forward() -> torch.Tensor:
                return expand_kernel_reference(prepend_identity(reps), weight, k)

        else:

            def forward() -> torch.Tensor:
                return symkernels.expand_kernel(reps, weight, k, leading_identity=True, backend=provider)

        if not backward:

            def no_grad() -> torch.Tensor:
                with torch.no_grad():
                    return forward()

            return no_grad
        with torch.no_grad():
            grad = torch.randn(forward().shape, generator=generator).to(weight)
        return lambda: torch.autograd.grad(forward(), (reps, weight), grad)

    return make


def cases(device: str = "cpu", *, quick: bool = False) -> list[Case]:
    dtypes = ("float32", "bfloat16") if torch.device(device).type == "cuda" else ("float32",)
    out = []
    for workload in QUICK_SHAPES if quick else tuple(SHAPES):
        out_channels, in_channels, groups, in_groups, k = SHAPES[workload]
        d = in_groups * k * k
        for mode in MODES:
            for dtype in dtypes:
                size = torch.tensor([], dtype=getattr(torch, dtype)).element_size()
                for provider in [*native_backends(device), REFERENCE]:
                    out.append(
                        Case(
                            op=OP,
                            workload=workload,
                            mode=mode,
                            provider=provider,
                            dtype=dtype,
                            device=device,
                            make=make_closure(provider, workload, mode, dtype, device),
                            requires=(
                                lambda p=provider: (
                                    None if p == REFERENCE else backend_reason(p, device, "expand_kernel")
                                )
                            ),
                            graph=True,
                            info={
                                "shape": {
                                    "C_out": out_channels,
                                    "C_in": in_channels,
                                    "G": groups,
                                    "G_in": in_groups,
                                    "k": k,
                                },
                                # Read reps and weight, write the kernel, once.
                                "bytes_moved": size
                                * ((groups - 1) * d * d + out_channels * in_channels * d * (1 + groups)),
                            },
                        )
                    )
    return out


if __name__ == "__main__":
    from bench.__main__ import main

    sys.exit(main(ops=[OP]))
