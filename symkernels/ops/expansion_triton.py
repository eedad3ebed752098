"""Triton launchers of the kernel expansion and its backward (:mod:`symkernels.triton_kernels.expansion`).

``forward`` writes ``kernel[o·G + g, i·G_in + h, y, x] = Σ_m R_g[n, m] θ[o, i, m]`` (``n = h·k² + y·k + x``)
into a fresh contiguous conv weight in one launch; ``backward`` returns ``(R̄, θ̄)`` from one launch (two when
the ``R̄`` reduction is split), with fixed-order reductions. With ``leading_identity`` the stack is
``[I, reps[0], ..., reps[G'-1]]`` and the identity is never materialised. float16, bfloat16 and float32,
accumulated in float32; every operand is read through its strides.

The arguments are not checked here: the operators that call these functions do.
"""

from __future__ import annotations

import torch

from symkernels.triton_kernels.expansion import expand_backward_into, expand_forward_into

__all__ = ["backward", "forward"]


def forward(
    reps: torch.Tensor, weight: torch.Tensor, kernel_size: int, leading_identity: bool
) -> torch.Tensor:
    """reps ``[G', d, d]``, weight ``[O, I, d]`` (``d = G_in·k²``) → the contiguous conv weight
    ``[O·G, I·G_in, k, k]`` in weight's dtype, ``G = G' + leading_identity``."""
    out_channels, in_channels, d = weight.shape
    groups = reps.shape[0] + int(leading_identity)
    in_groups = d // (kernel_size * kernel_size)
    kernel = torch.empty(
        (out_channels * groups, in_channels * in_groups, kernel_size, kernel_size),
        dtype=weight.dtype,
        device=weight.device,
    )
    expand_forward_into(reps, weight, kernel, kernel_size, leading_identity=leading_identity)
    return kernel


def backward(
    grad_kernel: torch.Tensor,
    reps: torch.Tensor,
    weight: torch.Tensor,
    kernel_size: int,
    leading_identity: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_reps [G', d, d], grad_weight [O, I, d])`` (contiguous, in reps' and weight's dtypes) from the
    gradient of the conv weight ``[O·G, I·G_in, k, k]`` (any strides); ``grad_weight`` includes the identity's
    term."""
    grad_reps = torch.empty(reps.shape, dtype=reps.dtype, device=reps.device)
    grad_weight = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    expand_backward_into(
        grad_kernel, reps, weight, grad_reps, grad_weight, kernel_size, leading_identity=leading_identity
    )
    return grad_reps, grad_weight
