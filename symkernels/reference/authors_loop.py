"""The loop as the method's authors run it: what users of their code pay today (the speed baseline).

Log domain, τ = 1 unless given, and before every iteration a host-side ``allclose`` test of the row and
column sums of the whole stack that stops the loop early once it is doubly stochastic. The test reads
device memory from the host, so each iteration synchronises with the device.
"""

from __future__ import annotations

import torch


def _is_doubly_stochastic(log_p: torch.Tensor) -> bool:
    p = log_p.exp()
    ones = torch.ones(p.shape[:-1], dtype=p.dtype, device=p.device)
    return torch.allclose(p.sum(dim=-1), ones) and torch.allclose(p.sum(dim=-2), ones)


def sinkhorn_early_exit(logits: torch.Tensor, n_iter: int = 20, tau: float = 1.0) -> torch.Tensor:
    """Up to ``n_iter`` log-domain iterations, stopping as soon as the whole batch is doubly stochastic."""
    log_p = logits / tau
    for _ in range(n_iter):
        if _is_doubly_stochastic(log_p):
            break
        log_p = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)
        log_p = log_p - torch.logsumexp(log_p, dim=-2, keepdim=True)
    return log_p.exp()


def authors_representation_stack(
    logits: torch.Tensor, n_iter: int = 20, tau: float = 1.0, *, fix_identity: bool = True
) -> torch.Tensor:
    """``[G', d, d]`` logits → ``[G, d, d]``: the identity concatenated in front of the early-exit loop."""
    stack = sinkhorn_early_exit(logits, n_iter, tau)
    if not fix_identity:
        return stack
    identity = torch.eye(logits.shape[-1], dtype=stack.dtype, device=stack.device).unsqueeze(0)
    return torch.cat([identity, stack], dim=0)
