"""``symkernels::marginal_error``: how far each matrix of a stack is from doubly stochastic.

For ``p`` of shape ``[..., n, n]`` the result has shape ``[...]``: per matrix, the largest of
``|row sum - 1|`` and ``|column sum - 1|`` over all rows and columns. NaN propagates (a NaN marginal never
reads as converged). It is a diagnostic (e.g. a Sinkhorn stopping test), so the result carries no gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from symkernels import _native

__all__ = ["marginal_error"]

_NATIVE_DTYPES = (torch.float32, torch.float64)
# Read once: a plain constant keeps the entry point traceable by torch.compile without graph breaks.
_NATIVE = _native.native_status()

if _NATIVE.loaded:

    @torch.library.register_fake("symkernels::marginal_error")
    def _marginal_error_fake(p: Tensor) -> Tensor:
        torch._check(p.dim() >= 2, lambda: f"marginal_error: p must be [..., n, n], got {p.shape}")
        torch._check(p.shape[-1] == p.shape[-2], lambda: f"marginal_error: p must be square, got {p.shape}")
        torch._check(p.dtype in _NATIVE_DTYPES, lambda: f"marginal_error: bad dtype {p.dtype}")
        return p.new_empty(p.shape[:-2])


def _native_serves(p: Tensor) -> bool:
    if not _NATIVE.loaded or p.dtype not in _NATIVE_DTYPES:
        return False
    return p.device.type == "cpu" or (p.device.type == "cuda" and _NATIVE.cuda_built)


def _marginal_error_torch(p: Tensor) -> Tensor:
    """The same quantity in pure PyTorch, for devices and dtypes without a native kernel."""
    acc = torch.float64 if p.dtype == torch.float64 else torch.float32
    rows = (p.sum(dim=-1, dtype=acc) - 1).abs().amax(dim=-1)
    cols = (p.sum(dim=-2, dtype=acc) - 1).abs().amax(dim=-1)
    return torch.maximum(rows, cols).to(p.dtype)


def marginal_error(p: Tensor) -> Tensor:
    """``max(|row sums - 1|, |column sums - 1|)`` of each matrix of ``p`` ``[..., n, n]``; shape ``[...]``.

    Raises ValueError when ``p`` is not a stack of non-empty square matrices, TypeError when it is not
    floating-point.
    """
    if not isinstance(p, Tensor):
        raise TypeError(f"marginal_error: p must be a torch.Tensor, got {type(p).__name__}")
    if p.dim() < 2:
        raise ValueError(f"marginal_error: p must have shape [..., n, n] (2+ dims), got {tuple(p.shape)}")
    if p.shape[-1] != p.shape[-2]:
        raise ValueError(f"marginal_error: p must be square in its last two dims, got {tuple(p.shape)}")
    if p.shape[-1] == 0:
        raise ValueError(f"marginal_error: p must have n >= 1, got {tuple(p.shape)}")
    if not p.is_floating_point():
        raise TypeError(f"marginal_error: p must be a floating-point tensor, got {p.dtype}")
    if _native_serves(p):
        return torch.ops.symkernels.marginal_error(p.detach())
    with torch.no_grad():
        return _marginal_error_torch(p)
