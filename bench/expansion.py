"""Kernel expansion (``[G, d, d]`` reps × weight ``[C_out, C_in, d]`` → conv kernel), forward and backward.

    python bench/expansion.py [--quick] [--threads 1 2] [--only REGEX] [--device cpu|cuda] [--out FILE]

At the paper's layer shapes, as the models call it: the identity fixed (``leading_identity=True``, 3 learned
matrices of a C4 stack). Providers: the eager reference (the identity concatenated, then one einsum) and every
native backend that serves the device (``symkernels.expand_kernel``); float32, and bfloat16 on a GPU. On a GPU
the regime ``channels_last-bf16`` is what a mixed-precision convolution on channels_last activations asks for:
float32 reps and weight, the kernel written channels_last in bfloat16 (the reference computes it, then copies
it into that layout and dtype) and its gradient read back in that form.
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
# The kernel a mixed-precision convolution on channels_last activations takes.
CONV_READY = "channels_last-bf16"


def make_closure(
    provider: str, workload: str, mode: str, dtype: str, device: str, regime: str | None = None
) -> Callable[[], Closure]:
    out_channels, in_channels, groups, in_groups, k = SHAPES[workload]
    conv_ready = regime == CONV_READY
    layout = torch.channels_last if conv_ready else torch.contiguous_format
    kernel_dtype = torch.bfloat16 if conv_ready else getattr(torch, dtype)

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
                kernel = expand_kernel_reference(prepend_identity(reps), weight, k)
                return kernel.to(kernel_dtype, memory_format=layout)  # itself unless conv-ready

        else:

            def forward() -> torch.Tensor:
                return symkernels.expand_kernel(
                    reps,
                    weight,
                    k,
                    leading_identity=True,
                    channels_last=conv_ready,
                    dtype=kernel_dtype,
                    backend=provider,
                )

        if not backward:

            def no_grad() -> torch.Tensor:
                with torch.no_grad():
                    return forward()

            return no_grad
        with torch.no_grad():
            grad = torch.randn(forward().shape, generator=generator).to(weight)
            grad = grad.to(kernel_dtype, memory_format=layout)
        return lambda: torch.autograd.grad(forward(), (reps, weight), grad)

    return make


def cases(device: str = "cpu", *, quick: bool = False) -> list[Case]:
    on_gpu = torch.device(device).type == "cuda"
    # (dtype of reps and weight, regime)
    variants = [("float32", None)]
    if on_gpu:
        variants += [("bfloat16", None), ("float32", CONV_READY)]
    out = []
    # Variant by variant, so that a GPU run cut short by its budget has every float32 row first.
    for dtype, regime in variants:
        for workload in QUICK_SHAPES if quick else tuple(SHAPES):
            out_channels, in_channels, groups, in_groups, k = SHAPES[workload]
            d = in_groups * k * k
            size = torch.tensor([], dtype=getattr(torch, dtype)).element_size()
            kernel_size = 2 if regime == CONV_READY else size
            for mode in MODES:
                for provider in [*native_backends(device), REFERENCE]:
                    out.append(
                        Case(
                            op=OP,
                            workload=workload,
                            mode=mode,
                            provider=provider,
                            regime=regime,
                            dtype=dtype,
                            device=device,
                            make=make_closure(provider, workload, mode, dtype, device, regime),
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
                                "bytes_moved": size * ((groups - 1) * d * d + out_channels * in_channels * d)
                                + kernel_size * out_channels * in_channels * d * groups,
                            },
                        )
                    )
    return out


if __name__ == "__main__":
    from bench.__main__ import main

    sys.exit(main(ops=[OP]))
