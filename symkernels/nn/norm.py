"""Parameter-free normalisations of ``[B, C, G, H, W]`` feature maps (docs/design.md §5, §7)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_layer_norm(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Non-affine layer norm per sample over every axis but the batch: (C, G, H, W) or (C, H, W)."""
    return F.layer_norm(x, x.shape[1:], eps=eps)


def channel_layer_norm(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Non-affine layer norm per sample and channel over the remaining axes: (G, H, W) or (H, W)."""
    return F.layer_norm(x, x.shape[2:], eps=eps)
