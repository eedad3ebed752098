"""``torch.ops.symkernels`` kernel-expansion ops: fake implementations and autograd.

``expand_kernel_forward`` maps reps ``[G, d, d]`` and weight ``[O, I, d]`` to ``[O, G, I, d]``; its backward
(``expand_kernel_backward``) returns both gradients with deterministic reductions.
"""

from __future__ import annotations

import torch

from symkernels import _native

__all__ = ["native_expand_kernel"]


def native_expand_kernel(reps: torch.Tensor, weight: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """The conv-ready kernel ``[O·G, I·G_in, k, k]`` through ``symkernels::expand_kernel_forward``."""
    kernel = torch.ops.symkernels.expand_kernel_forward(reps.contiguous(), weight.contiguous())
    out_channels, group_size, in_channels, d = kernel.shape
    in_group_size = d // (kernel_size * kernel_size)
    return kernel.view(out_channels * group_size, in_channels * in_group_size, kernel_size, kernel_size)


def _setup_context(ctx, inputs, output) -> None:
    reps, weight = inputs
    ctx.save_for_backward(reps, weight)


def _backward(ctx, grad_kernel):
    reps, weight = ctx.saved_tensors
    grad_reps, grad_weight = torch.ops.symkernels.expand_kernel_backward(
        grad_kernel.contiguous(), reps, weight
    )
    return grad_reps, grad_weight


if _native.native_status().loaded and _native.has_ops(("expand_kernel_forward", "expand_kernel_backward")):

    @torch.library.register_fake("symkernels::expand_kernel_forward")
    def _(reps, weight):
        return weight.new_empty(weight.shape[0], reps.shape[0], weight.shape[1], weight.shape[2])

    @torch.library.register_fake("symkernels::expand_kernel_backward")
    def _(grad_kernel, reps, weight):
        return torch.empty_like(reps), torch.empty_like(weight)

    torch.library.register_autograd(
        "symkernels::expand_kernel_forward", _backward, setup_context=_setup_context
    )
