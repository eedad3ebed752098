"""Kernel expansion and the permuted-kernel convolution (docs/design.md §4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def expand_kernel_reference(reps: torch.Tensor, weight: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """reps ``[G, d, d]``, weight ``[C_out, C_in, d]`` → ``[C_out·G, C_in·G_in, k, k]`` with ``d = G_in·k²``.

    ``K[o, g, i, n] = Σ_m R[g, n, m] θ[o, i, m]``, output channels o-major, g-minor.
    """
    group_size, d = reps.shape[0], reps.shape[-1]
    out_channels, in_channels = weight.shape[:2]
    in_group_size = d // (kernel_size * kernel_size)
    expanded = torch.einsum("gnm,oim->ogin", reps, weight)
    return expanded.reshape(out_channels * group_size, in_channels * in_group_size, kernel_size, kernel_size)


def permuted_conv2d_reference(
    x: torch.Tensor,
    reps: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    kernel_size: int,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] | str = 0,
) -> torch.Tensor:
    """``[B, C_in, H, W]`` (lifting) or ``[B, C_in, G_in, H, W]`` → ``[B, C_out, G, H', W']``."""
    kernel = expand_kernel_reference(reps, weight, kernel_size)
    flat = x.flatten(1, 2) if x.dim() == 5 else x
    y = F.conv2d(flat, kernel, stride=stride, padding=padding)
    y = y.unflatten(1, (weight.shape[0], reps.shape[0]))
    if bias is not None:
        y = y + bias.reshape(-1, 1, 1, 1)
    return y
