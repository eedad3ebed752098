"""Sparsified filters: values at a few anchor points, interpolated to the grid by a fixed RBF regression map.

A sparsified filter stores ``M`` values ``u`` at anchor points ``Z`` and reads its grid values as ``u Ψ`` with
``Ψ = (K_ZZ + σ²I)⁻¹ K_ZG`` (an RBF kernel of length scale ω). Ψ is fixed when the layer is built, so a layer
applies it to its input once (``Ψ x``) and learns ``u`` with an ordinary linear map.
"""

from __future__ import annotations

import torch

from symkernels._checks import check_int

RBF_LENGTH_SCALE = 1.0  # ω, in pixels
RBF_NOISE = 0.01  # σ


def anchor_count(fraction: float, size: int) -> int:
    """``round(fraction · size)`` anchors, at least one: 7 of 9 for f = 0.8, 4 of 9 for f = 0.5."""
    size = check_int("size", size)
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    return max(1, round(fraction * size))


def grid_points(height: int, width: int) -> torch.Tensor:
    """The ``[height·width, 2]`` pixel coordinates ``(row, column)`` of a grid, row-major."""
    rows, cols = torch.meshgrid(
        torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64), indexing="ij"
    )
    return torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=1)


def random_anchors(count: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """``[count, 2]`` points drawn uniformly in the square spanned by the grid's pixel centres."""
    count = check_int("count", count)
    scale = torch.tensor([height - 1, width - 1], dtype=torch.float64)
    return torch.rand(count, 2, dtype=torch.float64, generator=generator) * scale


def rbf_interpolation(
    anchors: torch.Tensor,
    grid: torch.Tensor,
    *,
    length_scale: float = RBF_LENGTH_SCALE,
    noise: float = RBF_NOISE,
) -> torch.Tensor:
    """``Ψ = (K_ZZ + σ²I)⁻¹ K_ZG``, ``[M, G]``: anchor values ``u [M]`` give grid values ``u Ψ`` (float64)."""
    if anchors.dim() != 2 or grid.dim() != 2 or anchors.shape[1] != grid.shape[1]:
        raise ValueError(
            f"anchors [M, D] and grid [G, D] must be point lists of one dimension, got "
            f"{tuple(anchors.shape)} and {tuple(grid.shape)}"
        )
    if length_scale <= 0 or noise < 0:
        raise ValueError(f"length_scale must be > 0 and noise >= 0, got {length_scale} and {noise}")
    anchors, grid = anchors.double(), grid.double()

    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.exp(-torch.cdist(a, b).square() / (2 * length_scale**2))

    gram = kernel(anchors, anchors) + noise**2 * torch.eye(len(anchors), dtype=torch.float64)
    return torch.linalg.solve(gram, kernel(anchors, grid))
