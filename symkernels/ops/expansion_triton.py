"""Triton launchers of the kernel expansion and its backward (:mod:`symkernels.triton_kernels.expansion`).

``forward`` writes ``kernel[o·G + g, i·G_in + h, y, x] = Σ_m R_g[n, m] θ[o, i, m]`` (``n = h·k² + y·k + x``)
into the conv weight it is given (any layout and float dtype) in one launch; ``backward`` returns ``(R̄, θ̄)``
from one launch (two when the ``R̄`` reduction is split), with fixed-order reductions. With
``leading_identity`` the stack is ``[I, reps[0], ..., reps[G'-1]]`` and the identity is never materialised.
float16, bfloat16 and float32, accumulated in float32; every operand is read through its strides.

The arguments are not checked here: the operators that call these functions do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from symkernels.ops.triton_support import INTERPRETED, launched_on_its_device
from symkernels.triton_kernels.expansion import (
    expand_backward_kernel,
    expand_forward_kernel,
    sum_partials_kernel,
)

__all__ = ["BackwardPlan", "backward", "backward_plan", "forward"]

# Offsets are computed in int32 inside the kernels.
MAX_OFFSET = 2**31 - 1


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


def _block(size: int, cap: int) -> int:
    # tl.dot needs every block dimension to be at least 16.
    return max(16, min(cap, triton.next_power_of_2(max(size, 1))))


def _dot_f32(*tensors: torch.Tensor) -> bool:
    """Whether the dot products run on float32 operands (exact path) rather than the tensors' own dtype."""
    dtypes = {t.dtype for t in tensors}
    # The interpreter's tl.dot gives wrong values on bf16: there every dtype is computed on float32 operands.
    return len(dtypes) != 1 or torch.float32 in dtypes or INTERPRETED


def _max_offset(tensor: torch.Tensor) -> int:
    return sum((size - 1) * abs(stride) for size, stride in zip(tensor.shape, tensor.stride(), strict=True))


def _check_offsets(**named: torch.Tensor) -> None:
    for name, tensor in named.items():
        if tensor.numel() > MAX_OFFSET or _max_offset(tensor) > MAX_OFFSET:
            raise ValueError(
                f"{name} of shape {tuple(tensor.shape)} spans more than 2**31 - 1 elements; the triton "
                "expansion kernels use 32-bit offsets"
            )


@launched_on_its_device
def forward(
    reps: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, kernel_size: int, leading_identity: bool
) -> None:
    """Write the expansion of ``reps [G or G-1, d, d]`` and ``weight [O, I, d]`` into the conv weight ``out``
    ``[O·G, I·G_in, k, k]`` (any strides, any float dtype), ``G = G' + leading_identity``."""
    out_channels, in_channels, d = weight.shape
    groups = reps.shape[0] + int(leading_identity)
    if out.numel() == 0:
        return
    _check_offsets(reps=reps, weight=weight, out=out)
    kk = kernel_size * kernel_size
    rows = out_channels * in_channels
    block_r, block_n, block_m = _block(rows, 64), _block(d, 64), _block(d, 32)
    grid = (triton.cdiv(rows, block_r), triton.cdiv(d, block_n), groups)
    expand_forward_kernel[grid](
        reps,
        weight,
        out,
        out_channels,
        in_channels,
        groups,
        d,
        d // kk,
        kk,
        kernel_size,
        *reps.stride(),
        *weight.stride(),
        *out.stride(),
        LEADING_IDENTITY=int(leading_identity),
        DOT_F32=_dot_f32(reps, weight),
        BLOCK_R=block_r,
        BLOCK_N=block_n,
        BLOCK_M=block_m,
    )


@dataclass(frozen=True)
class BackwardPlan:
    """How the backward launch is cut; a function of the shapes (and whether the dot products run on float32
    operands) only, so results are reproducible."""

    block_r: int
    block_n: int
    block_m: int
    weight_tiles: int  # programs computing θ̄ tiles
    rows_per_split: int  # length of each split of the O·I reduction of R̄
    splits: int
    reps_tiles: int  # programs computing R̄ tiles (all splits)


def backward_plan(
    out_channels: int, in_channels: int, groups: int, learned: int, d: int, *, exact: bool = False
) -> BackwardPlan:
    """Tile sizes and the split of the ``R̄`` reduction for ``groups`` kernel groups (``learned`` of them
    carry a reps matrix). ``exact``: the dot products run on float32 operands, whose (non-tensor-core) dot
    keeps whole reduction slices per thread: the reduced dimensions (``n`` for ``θ̄``, the rows ``(o, i)``
    for ``R̄``) are cut in blocks of 32 instead of 64, which keeps them in registers (ptxas, sm_90).

    A ``θ̄`` tile reduces over ``G·d`` terms; the ``O·I`` reduction of ``R̄`` is cut into splits of about that
    length (a multiple of the row block) so that both kinds of program carry similar work.
    """
    rows = out_channels * in_channels
    reduced = 32 if exact else 64
    block_r, block_n, block_m = _block(rows, reduced), _block(d, reduced), _block(d, 64)
    weight_tiles = triton.cdiv(rows, block_r) * triton.cdiv(d, block_m)
    rows_per_split = triton.cdiv(max(groups * d, 1), block_r) * block_r
    splits = max(1, triton.cdiv(rows, rows_per_split))
    reps_tiles = splits * learned * triton.cdiv(d, block_n) * triton.cdiv(d, block_m)
    return BackwardPlan(block_r, block_n, block_m, weight_tiles, rows_per_split, splits, reps_tiles)


@launched_on_its_device
def expand_backward_into(
    grad: torch.Tensor,
    reps: torch.Tensor,
    weight: torch.Tensor,
    grad_reps: torch.Tensor,
    grad_weight: torch.Tensor,
    kernel_size: int,
    *,
    leading_identity: bool = False,
) -> None:
    """Write ``R̄`` into ``grad_reps`` (contiguous, shaped like ``reps``) and ``θ̄`` into ``grad_weight``
    (contiguous ``[O, I, d]``) from the conv-weight gradient ``grad`` ``[O·G, I·G_in, k, k]`` (any strides).
    """
    out_channels, in_channels, d = weight.shape
    learned = reps.shape[0]
    groups = learned + int(leading_identity)
    rows = out_channels * in_channels
    if d == 0:
        return
    if rows == 0 or groups == 0:
        # Empty sums: the gradient that has terms left is zero.
        grad_reps.zero_()
        grad_weight.zero_()
        return
    _check_offsets(grad=grad, reps=reps, weight=weight)
    dot_f32 = _dot_f32(grad, reps, weight)
    plan = backward_plan(out_channels, in_channels, groups, learned, d, exact=dot_f32)
    partials = plan.splits > 1 and learned > 0
    target = (
        torch.empty((plan.splits, *grad_reps.shape), dtype=torch.float32, device=grad_reps.device)
        if partials
        else grad_reps
    )
    _check_offsets(grad_reps=target)
    kk = kernel_size * kernel_size
    expand_backward_kernel[(plan.weight_tiles + plan.reps_tiles,)](
        grad,
        reps,
        weight,
        grad_weight,
        target,
        out_channels,
        in_channels,
        groups,
        d,
        d // kk,
        kk,
        kernel_size,
        *grad.stride(),
        *reps.stride(),
        *weight.stride(),
        plan.weight_tiles,
        plan.rows_per_split,
        LEADING_IDENTITY=int(leading_identity),
        DOT_F32=dot_f32,
        BLOCK_R=plan.block_r,
        BLOCK_N=plan.block_n,
        BLOCK_M=plan.block_m,
        num_warps=8,  # with 4, ptxas spills the 64-wide tiles' operands
    )
    if partials:
        numel, block = grad_reps.numel(), 1024
        sum_partials_kernel[(triton.cdiv(numel, block),)](target, grad_reps, numel, plan.splits, BLOCK=block)
