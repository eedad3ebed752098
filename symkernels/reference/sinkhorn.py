"""Log-domain Sinkhorn (docs/design.md §2): a fixed number of iterations, or an early exit at a tolerance."""

from __future__ import annotations

import torch

# torch.allclose(row_sums, 1) with its default tolerances (rtol 1e-5, atol 1e-8): the authors' stopping test.
AUTHORS_TOLERANCE = 1e-5 + 1e-8

STOP_RULES = ("matrix", "stack")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sinkhorn runs in float32 at least; float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sinkhorn_reference(
    logits: torch.Tensor,
    n_iter: int = 20,
    tau: float = 1.0,
    *,
    tol: float = 0.0,
    stop: str = "matrix",
    return_iterations: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``[..., n, n]`` logits → doubly stochastic matrices; rows then columns each iteration.

    With ``tol > 0`` a matrix stops after the first iteration ``t`` whose iterate has every row sum within
    ``tol`` of 1 (its columns sum to 1 by construction); at least one iteration runs. ``stop="stack"`` stops
    all matrices together, at the first ``t`` where every one of them passes (the authors' loop, with
    ``tol=AUTHORS_TOLERANCE``). With ``return_iterations`` the iterations each matrix ran (int32, ``[...]``)
    come back too. Gradients are those of the iterations that ran (plain autograd through the loop).
    """
    if stop not in STOP_RULES:
        raise ValueError(f"stop must be one of {STOP_RULES}, got {stop!r}")
    log_p = logits.to(compute_dtype(logits.dtype)) / tau
    batch_shape = log_p.shape[:-2]
    running = torch.ones(batch_shape, dtype=torch.bool, device=log_p.device)
    iterations = torch.zeros(batch_shape, dtype=torch.int32, device=log_p.device)
    for t in range(n_iter):
        row_lse = torch.logsumexp(log_p, dim=-1, keepdim=True)
        if tol > 0 and t > 0:
            # rowsum(P_t) = exp(lse_j log P_t): test the iterate of the iterations done so far.
            passed = (row_lse.squeeze(-1).exp() - 1).abs().amax(dim=-1) <= tol
            if stop == "stack":
                passed = passed.all().expand(batch_shape)
            running = running & ~passed
        rows = log_p - row_lse
        step = rows - torch.logsumexp(rows, dim=-2, keepdim=True)
        log_p = torch.where(running[..., None, None], step, log_p) if tol > 0 else step
        iterations += running.to(torch.int32)
    p = log_p.exp().to(logits.dtype)
    return (p, iterations) if return_iterations else p


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
