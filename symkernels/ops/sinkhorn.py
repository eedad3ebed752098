"""``torch.ops.symkernels`` Sinkhorn ops: fake implementations and autograd.

The native kernels (``csrc/sinkhorn``) implement ``sinkhorn_forward``/``sinkhorn_backward`` per dispatch key.
``sinkhorn_forward`` returns P and the per-iteration log-scalings (O(T·n) per matrix); its registered
backward replays the exact T-step VJP from them (``backward="unrolled"``).
:func:`attach_fixed_point_gradient` gives any forward the gradient of the converged map instead
(``backward="implicit"``).
"""

from __future__ import annotations

import torch

from symkernels import _native

__all__ = ["attach_fixed_point_gradient", "fixed_point_vjp", "native_sinkhorn"]


def native_sinkhorn(logits: torch.Tensor, n_iter: int, tau: float) -> torch.Tensor:
    """``[..., n, n]`` → P through ``symkernels::sinkhorn_forward`` (float32 at least, input dtype out)."""
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    n = logits.shape[-1]
    batch = logits.reshape(-1, n, n).to(compute).contiguous()
    p, _, _ = torch.ops.symkernels.sinkhorn_forward(batch, n_iter, tau)
    return p.reshape(logits.shape).to(logits.dtype)


def _forward_setup_context(ctx, inputs, output) -> None:
    logits, _, tau = inputs
    _, row_log_scalings, col_log_scalings = output
    ctx.save_for_backward(logits, row_log_scalings, col_log_scalings)
    ctx.tau = tau


def _forward_backward(ctx, grad_p, grad_rows, grad_cols):
    logits, row_log_scalings, col_log_scalings = ctx.saved_tensors
    if grad_p is None:
        return None, None, None
    grad_logits = torch.ops.symkernels.sinkhorn_backward(
        grad_p.contiguous(), logits, row_log_scalings, col_log_scalings, ctx.tau
    )
    return grad_logits, None, None


def fixed_point_vjp(p: torch.Tensor, grad_p: torch.Tensor, tau: float) -> torch.Tensor:
    """VJP of the converged Sinkhorn map at P (``[B, n, n]``): ``P ⊙ (Ḡ − α1ᵀ − 1βᵀ) / τ``.

    ``(α, β)`` solve the linearised marginal constraints written with P's actual marginals, which makes the
    system consistent with exactly one redundant equation: drop it and fix ``β_n = 0``.
    """
    n = p.shape[-1]
    weighted = grad_p * p
    rhs = torch.cat([weighted.sum(-1), weighted.sum(-2)], dim=-1)[..., :-1]
    system = torch.zeros(*p.shape[:-2], 2 * n, 2 * n, dtype=p.dtype, device=p.device)
    system[..., :n, :n] = torch.diag_embed(p.sum(-1))
    system[..., :n, n:] = p
    system[..., n:, :n] = p.transpose(-1, -2)
    system[..., n:, n:] = torch.diag_embed(p.sum(-2))
    solution = torch.linalg.solve(system[..., :-1, :-1], rhs.unsqueeze(-1)).squeeze(-1)
    alpha = solution[..., :n]
    beta = torch.cat([solution[..., n:], solution.new_zeros(*solution.shape[:-1], 1)], dim=-1)
    return p * (grad_p - alpha.unsqueeze(-1) - beta.unsqueeze(-2)) / tau


@torch.library.custom_op("symkernels::fixed_point_sinkhorn", mutates_args=())
def _fixed_point_sinkhorn(logits: torch.Tensor, p: torch.Tensor, tau: float) -> torch.Tensor:
    return p.clone()


@_fixed_point_sinkhorn.register_fake
def _(logits, p, tau):
    return torch.empty_like(p)


def _fixed_point_setup_context(ctx, inputs, output) -> None:
    _, p, tau = inputs
    ctx.save_for_backward(p)
    ctx.tau = tau


def _fixed_point_backward(ctx, grad):
    (p,) = ctx.saved_tensors
    compute = torch.float64 if p.dtype == torch.float64 else torch.float32
    n = p.shape[-1]
    grad_logits = fixed_point_vjp(
        p.reshape(-1, n, n).to(compute), grad.reshape(-1, n, n).to(compute), ctx.tau
    ).reshape(p.shape)
    return grad_logits.to(p.dtype), None, None


_fixed_point_sinkhorn.register_autograd(_fixed_point_backward, setup_context=_fixed_point_setup_context)


def attach_fixed_point_gradient(logits: torch.Tensor, p: torch.Tensor, tau: float) -> torch.Tensor:
    """P (computed by any backend, detached) carrying the implicit gradient of the converged map wrt logits.

    It equals the unrolled gradient only when the forward has converged.
    """
    return _fixed_point_sinkhorn(logits, p.detach(), tau)


if _native.native_status().loaded and _native.has_ops(("sinkhorn_forward", "sinkhorn_backward")):

    @torch.library.register_fake("symkernels::sinkhorn_forward")
    def _(logits, n_iter, tau):
        batch, n, _ = logits.shape
        scalings = logits.new_empty(batch, n_iter, n)
        return torch.empty_like(logits), scalings, torch.empty_like(scalings)

    @torch.library.register_fake("symkernels::sinkhorn_backward")
    def _(grad_p, logits, row_log_scalings, col_log_scalings, tau):
        return torch.empty_like(logits)

    torch.library.register_autograd(
        "symkernels::sinkhorn_forward", _forward_backward, setup_context=_forward_setup_context
    )
