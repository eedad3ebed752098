"""Log-domain Sinkhorn with a fixed number of iterations (method.md §2)."""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sinkhorn runs in float32 at least; float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sinkhorn_reference(logits: torch.Tensor, n_iter: int = 20, tau: float = 1.0) -> torch.Tensor:
    """``[..., n, n]`` logits → doubly stochastic matrices; rows then columns each iteration.

    Gradients are those of the unrolled loop (plain autograd).
    """
    log_p = logits.to(compute_dtype(logits.dtype)) / tau
    for _ in range(n_iter):
        log_p = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)
        log_p = log_p - torch.logsumexp(log_p, dim=-2, keepdim=True)
    return log_p.exp().to(logits.dtype)


def representation_stack_reference(
    logits: torch.Tensor, n_iter: int = 20, tau: float = 1.0, *, fix_identity: bool = True
) -> torch.Tensor:
    """``[G', d, d]`` logits → ``[G, d, d]`` stack; with ``fix_identity`` the identity is prepended."""
    stack = sinkhorn_reference(logits, n_iter, tau)
    if not fix_identity:
        return stack
    d = logits.shape[-1]
    identity = torch.eye(d, dtype=stack.dtype, device=stack.device).unsqueeze(0)
    return torch.cat([identity, stack], dim=0)
