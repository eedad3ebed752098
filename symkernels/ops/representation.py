"""``symkernels::representation_stack``: a layer's whole stack in one op, optionally with its expanded kernel.

Sinkhorn of the ``[G', d, d]`` logits, the identity prepended when fixed, and, when ``weight [O, I, d]`` is
given, the expansion ``[O, G, I, d]`` in the same call; the backward chains the expansion's and Sinkhorn's
exact backward kernels.
"""

from __future__ import annotations

import torch

__all__ = ["native_representation_stack", "prepend_identity", "representation_stack_and_kernel"]


def prepend_identity(stack: torch.Tensor) -> torch.Tensor:
    """``[G', d, d]`` → ``[G' + 1, d, d]`` with the exact identity first (the fixed element of a stack)."""
    identity = torch.eye(stack.shape[-1], dtype=stack.dtype, device=stack.device).unsqueeze(0)
    return torch.cat([identity, stack], dim=0)


@torch.library.custom_op("symkernels::representation_stack", mutates_args=(), device_types="cpu")
def _representation_stack(
    logits: torch.Tensor, n_iter: int, tau: float, fix_identity: bool, weight: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    p, rows, cols = torch.ops.symkernels.sinkhorn_forward(logits.contiguous(), n_iter, tau)
    if fix_identity:
        p = prepend_identity(p)
    if weight is None:
        kernel = p.new_empty(0)
    else:
        kernel = torch.ops.symkernels.expand_kernel_forward(p, weight.contiguous())
    return p, kernel, rows, cols


@_representation_stack.register_fake
def _(logits, n_iter, tau, fix_identity, weight):
    learned, d, _ = logits.shape
    stack = logits.new_empty(learned + int(fix_identity), d, d)
    if weight is None:
        kernel = logits.new_empty(0)
    else:
        kernel = weight.new_empty(weight.shape[0], stack.shape[0], weight.shape[1], d)
    scalings = logits.new_empty(learned, n_iter, d)
    return stack, kernel, scalings, torch.empty_like(scalings)


def _setup_context(ctx, inputs, output) -> None:
    logits, _, tau, fix_identity, weight = inputs
    stack, _, rows, cols = output
    ctx.save_for_backward(logits, weight, stack, rows, cols)
    ctx.tau, ctx.fix_identity = tau, fix_identity


def _backward(ctx, grad_stack, grad_kernel, grad_rows, grad_cols):
    logits, weight, stack, rows, cols = ctx.saved_tensors
    grad_weight = None
    grad_stack = torch.zeros_like(stack) if grad_stack is None else grad_stack
    if weight is not None and grad_kernel is not None:
        grad_reps, grad_weight = torch.ops.symkernels.expand_kernel_backward(
            grad_kernel.contiguous(), stack, weight
        )
        grad_stack = grad_stack + grad_reps
    learned = grad_stack[1:] if ctx.fix_identity else grad_stack
    grad_logits = torch.ops.symkernels.sinkhorn_backward(learned.contiguous(), logits, rows, cols, ctx.tau)
    return grad_logits, None, None, None, grad_weight


_representation_stack.register_autograd(_backward, setup_context=_setup_context)


def native_representation_stack(
    logits: torch.Tensor, n_iter: int, tau: float, *, fix_identity: bool = True
) -> torch.Tensor:
    """``[G', d, d]`` → ``[G, d, d]`` through the fused op (float32 at least, input dtype out)."""
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    stack, _, _, _ = _representation_stack(logits.to(compute), n_iter, tau, fix_identity, None)
    return stack.to(logits.dtype)


def representation_stack_and_kernel(
    logits: torch.Tensor,
    weight: torch.Tensor,
    kernel_size: int,
    n_iter: int,
    tau: float,
    *,
    fix_identity: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The stack ``[G, d, d]`` and the conv-ready kernel ``[O·G, I·G_in, k, k]`` from one fused call."""
    stack, kernel, _, _ = _representation_stack(logits, n_iter, tau, fix_identity, weight)
    out_channels, group_size, in_channels, d = kernel.shape
    in_group_size = d // (kernel_size * kernel_size)
    return stack, kernel.view(
        out_channels * group_size, in_channels * in_group_size, kernel_size, kernel_size
    )
