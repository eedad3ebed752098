"""``torch.ops.symkernels`` Sinkhorn ops on Triton: single stacks and grouped (ragged) launches.

Every call works on a list of stacks ``[G_l, n_l, n_l]`` (one stack is a list of one): their logits are
concatenated into one flat buffer, ``meta`` gives each matrix's offset and size, and one launch iterates all
of them (:mod:`symkernels.triton_kernels.sinkhorn`). Matrices larger than ``Tuning.fused_max_n`` go to the
multi-program kernels (:mod:`symkernels.triton_kernels.sinkhorn_stepped`) instead: several programs per
matrix, one launch per iteration.

Four operators, each with a fake implementation and registered autograd (the backward is the exact VJP of the
T-step map):

* ``symkernels::triton_sinkhorn_fused_forward(x, meta, max_n, n_iter, tau) -> (p, cols, domain)`` and its
  ``..._backward(grad, x, meta, cols, domain, max_n, tau) -> grad_x``;
* ``symkernels::triton_sinkhorn_stepped_forward(x, meta, programs, max_n, n_iter, tau)`` and its backward.

On a GPU they are ``torch.library.triton_op``s, so ``torch.compile`` sees the Triton kernels; under the
Triton interpreter, plain custom ops (:mod:`symkernels.ops.triton_registration`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Sequence

import torch
import triton

from symkernels._checks import (
    check_positive_int,
    check_square_stack,
    check_stack_list,
    check_tau,
    check_tensor,
)
from symkernels.ops.representation import prepend_identity
from symkernels.ops.triton_registration import INTERPRETED, define_op, wrap_triton
from symkernels.triton_kernels.sinkhorn import (
    chunked_backward_kernel,
    chunked_forward_kernel,
    packed_backward_kernel,
    packed_forward_kernel,
)
from symkernels.triton_kernels.sinkhorn_stepped import (
    stepped_backward_final_kernel,
    stepped_backward_step_kernel,
    stepped_forward_final_kernel,
    stepped_forward_step_kernel,
)

__all__ = [
    "INTERPRETED",
    "SUPPORTED_DTYPES",
    "Tuning",
    "current_tuning",
    "triton_grouped_sinkhorn",
    "triton_representation_stack",
    "triton_sinkhorn",
    "tuning",
]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# The scaling domain's limits in float32, as csrc/sinkhorn/common.h (ScalingLimits<float>): a matrix whose
# logits / tau spread more than MAX_SPREAD within a row, or whose scalings leave e^±MAX_LOG_SCALING, is
# iterated in the log domain instead.
MAX_SPREAD = 40.0
MAX_LOG_SCALING = 64.0
_SCALE_LO = math.exp(-MAX_LOG_SCALING)
_SCALE_HI = math.exp(MAX_LOG_SCALING)


@dataclasses.dataclass(frozen=True)
class Tuning:
    """How matrices are mapped onto programs (block sizes are powers of two ≥ the matrix size ``n``).

    * ``n <= packed_max_n``: whole matrices in registers, as many per program as fit ``packed_elements``;
    * ``packed_max_n < n <= fused_max_n``: one program per matrix, rows streamed in chunks of
      ``chunk_elements / BN`` rows, all iterations in one launch;
    * ``n > fused_max_n``: one program per slab of ``stepped_slab_rows`` rows (walked in tiles of
      ``stepped_elements / BN`` rows), one launch per iteration (the column sums are exchanged through global
      memory between launches).

    The defaults keep every kernel free of register spills on sm_90 (checked with ``ptxas -v``).
    """

    packed_max_n: int = 64
    packed_elements: int = 4096
    fused_max_n: int = 256
    chunk_elements: int = 4096
    stepped_elements: int = 4096
    stepped_slab_rows: int = 64

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            check_positive_int(getattr(self, field.name), field.name)


# The interpreter runs programs one after another: pack as many matrices per program as possible there.
_DEFAULT_TUNING = Tuning(packed_elements=1 << 16) if INTERPRETED else Tuning()
_tuning = _DEFAULT_TUNING


def current_tuning() -> Tuning:
    """The :class:`Tuning` in force."""
    return _tuning


@contextlib.contextmanager
def tuning(**changes: int) -> Iterator[Tuning]:
    """Run the enclosed calls with some :class:`Tuning` fields changed (e.g. to exercise every kernel layout
    on small matrices)."""
    global _tuning
    previous = _tuning
    _tuning = dataclasses.replace(previous, **changes)
    try:
        yield _tuning
    finally:
        _tuning = previous


def _block(n: int) -> int:
    """The smallest power of two >= max(n, 2)."""
    return triton.next_power_of_2(max(n, 2))


def _floor_pow2(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def _num_warps(elements: int, per_thread: int = 16) -> int:
    # About `per_thread` values of a tile per thread, between 1 and 16 warps.
    return max(1, min(16, elements // (32 * per_thread)))


# ------------------------------------------------------------------------------------------------------------
# Launch plans: block sizes and warps of each kernel for the matrices of a call.


def packed_plan(max_n: int, num_matrices: int) -> dict[str, int]:
    """``MB`` matrices of ``BN × BN`` per program of the packed kernels."""
    block = _block(max_n)
    per_program = min(_floor_pow2(_tuning.packed_elements // (block * block)), _block(num_matrices))
    return {"MB": per_program, "BN": block, "num_warps": _num_warps(per_program * block * block)}


def chunked_plan(max_n: int, *, backward: bool) -> dict[str, int]:
    """``BR`` rows of ``BN`` per tile of the chunked kernels (the forward, with fewer live tiles, still spills
    a few registers at 16 values per thread: it gets 8)."""
    block = _block(max_n)
    rows = min(block, _floor_pow2(_tuning.chunk_elements // block))
    return {"BR": rows, "BN": block, "num_warps": _num_warps(rows * block, 16 if backward else 8)}


def _stepped_rows(max_n: int) -> tuple[int, int]:
    """Rows per register tile and per program (a multiple of the former) of the stepped kernels."""
    block = _block(max_n)
    tile = min(block, _floor_pow2(_tuning.stepped_elements // block))
    return tile, triton.cdiv(_tuning.stepped_slab_rows, tile) * tile


def stepped_plan(max_n: int) -> dict[str, int]:
    """``BR`` rows of ``BN`` per tile of the stepped kernels."""
    block = _block(max_n)
    rows, _ = _stepped_rows(max_n)
    return {"BR": rows, "BN": block, "num_warps": _num_warps(rows * block)}


# ------------------------------------------------------------------------------------------------------------
# Fused ops: all iterations in one launch.


def _fused_forward(
    x: torch.Tensor, meta: torch.Tensor, max_n: int, n_iter: int, tau: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    num_matrices = meta.shape[0]
    p = torch.empty_like(x)
    cols = torch.empty((num_matrices, n_iter, max_n), dtype=torch.float64, device=x.device)
    domain = torch.empty((num_matrices,), dtype=torch.int32, device=x.device)
    if num_matrices == 0:
        return p, cols, domain
    if max_n <= _tuning.packed_max_n:
        plan = packed_plan(max_n, num_matrices)
        wrap_triton(packed_forward_kernel)[(triton.cdiv(num_matrices, plan["MB"]),)](
            x,
            p,
            cols,
            domain,
            meta,
            num_matrices,
            n_iter,
            max_n,
            tau,
            MAX_SPREAD,
            _SCALE_LO,
            _SCALE_HI,
            **plan,
        )
    else:
        scratch = torch.empty(x.shape, dtype=torch.float32, device=x.device)  # K, written once per matrix
        wrap_triton(chunked_forward_kernel)[(num_matrices,)](
            x,
            scratch,
            p,
            cols,
            domain,
            meta,
            n_iter,
            max_n,
            tau,
            MAX_SPREAD,
            _SCALE_LO,
            _SCALE_HI,
            **chunked_plan(max_n, backward=False),
        )
    return p, cols, domain


def _fused_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    meta: torch.Tensor,
    cols: torch.Tensor,
    domain: torch.Tensor,
    max_n: int,
    tau: float,
) -> torch.Tensor:
    num_matrices, n_iter, _ = cols.shape
    out = torch.empty_like(x)
    if num_matrices == 0:
        return out
    if max_n <= _tuning.packed_max_n:
        plan = packed_plan(max_n, num_matrices)
        wrap_triton(packed_backward_kernel)[(triton.cdiv(num_matrices, plan["MB"]),)](
            grad, x, cols, domain, meta, out, num_matrices, n_iter, max_n, tau, **plan
        )
    else:
        bars = torch.empty(cols.shape, dtype=torch.float32, device=x.device)
        scratch = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        wrap_triton(chunked_backward_kernel)[(num_matrices,)](
            grad,
            x,
            scratch,
            cols,
            domain,
            meta,
            out,
            bars,
            n_iter,
            max_n,
            tau,
            **chunked_plan(max_n, backward=True),
        )
    return out


# ------------------------------------------------------------------------------------------------------------
# Stepped ops: several programs per matrix, one launch per iteration.


def _stepped_forward(
    x: torch.Tensor, meta: torch.Tensor, programs: torch.Tensor, max_n: int, n_iter: int, tau: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    num_matrices, num_programs = meta.shape[0], programs.shape[0]
    p = torch.empty_like(x)
    cols = torch.empty((num_matrices, n_iter, max_n), dtype=torch.float64, device=x.device)
    domain = torch.ones((num_matrices,), dtype=torch.int32, device=x.device)  # always the log domain
    if num_matrices == 0:
        return p, cols, domain
    plan = stepped_plan(max_n)
    maxima = torch.empty((2, num_programs, plan["BN"]), dtype=torch.float64, device=x.device)
    sums = torch.empty((2, num_programs, plan["BN"]), dtype=torch.float32, device=x.device)
    step = wrap_triton(stepped_forward_step_kernel)
    for t in range(n_iter):
        step[(num_programs,)](
            x, cols, maxima, sums, meta, programs, t, n_iter, max_n, num_programs, tau, **plan
        )
    wrap_triton(stepped_forward_final_kernel)[(num_programs,)](
        x, p, cols, maxima, sums, meta, programs, n_iter, max_n, num_programs, tau, **plan
    )
    return p, cols, domain


def _stepped_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    meta: torch.Tensor,
    programs: torch.Tensor,
    cols: torch.Tensor,
    max_n: int,
    tau: float,
) -> torch.Tensor:
    num_matrices, n_iter, _ = cols.shape
    num_programs = programs.shape[0]
    out = torch.empty_like(x)
    if num_matrices == 0:
        return out
    plan = stepped_plan(max_n)
    partials = torch.empty((2, num_programs, plan["BN"]), dtype=torch.float32, device=x.device)
    bars = torch.empty(cols.shape, dtype=torch.float32, device=x.device)
    step = wrap_triton(stepped_backward_step_kernel)
    for k in range(n_iter):
        step[(num_programs,)](
            grad, x, cols, bars, partials, meta, programs, k, n_iter, max_n, num_programs, tau, **plan
        )
    wrap_triton(stepped_backward_final_kernel)[(num_programs,)](
        grad, x, out, cols, bars, partials, meta, programs, n_iter, max_n, num_programs, tau, **plan
    )
    return out


# ------------------------------------------------------------------------------------------------------------
# Operator definitions.

_FUSED_FORWARD = "symkernels::triton_sinkhorn_fused_forward"
_FUSED_BACKWARD = "symkernels::triton_sinkhorn_fused_backward"
_STEPPED_FORWARD = "symkernels::triton_sinkhorn_stepped_forward"
_STEPPED_BACKWARD = "symkernels::triton_sinkhorn_stepped_backward"


def _forward_fake(x, meta, max_n, n_iter, tau):
    num_matrices = meta.shape[0]
    cols = x.new_empty((num_matrices, n_iter, max_n), dtype=torch.float64)
    return torch.empty_like(x), cols, x.new_empty((num_matrices,), dtype=torch.int32)


_fused_forward_op = define_op(_FUSED_FORWARD, _fused_forward, _forward_fake)
_fused_backward_op = define_op(
    _FUSED_BACKWARD,
    _fused_backward,
    lambda grad, x, meta, cols, domain, max_n, tau: torch.empty_like(x),
)
_stepped_forward_op = define_op(
    _STEPPED_FORWARD,
    _stepped_forward,
    lambda x, meta, programs, max_n, n_iter, tau: _forward_fake(x, meta, max_n, n_iter, tau),
)
_stepped_backward_op = define_op(
    _STEPPED_BACKWARD,
    _stepped_backward,
    lambda grad, x, meta, programs, cols, max_n, tau: torch.empty_like(x),
)


def _fused_setup_context(ctx, inputs, output) -> None:
    x, meta, max_n, _, tau = inputs
    _, cols, domain = output
    ctx.save_for_backward(x, meta, cols, domain)
    ctx.max_n, ctx.tau = max_n, tau


def _fused_autograd(ctx, grad_p, grad_cols, grad_domain):
    x, meta, cols, domain = ctx.saved_tensors
    if grad_p is None:
        return None, None, None, None, None
    grad_x = _fused_backward_op(grad_p.contiguous(), x, meta, cols, domain, ctx.max_n, ctx.tau)
    return grad_x, None, None, None, None


def _stepped_setup_context(ctx, inputs, output) -> None:
    x, meta, programs, max_n, _, tau = inputs
    _, cols, _ = output
    ctx.save_for_backward(x, meta, programs, cols)
    ctx.max_n, ctx.tau = max_n, tau


def _stepped_autograd(ctx, grad_p, grad_cols, grad_domain):
    x, meta, programs, cols = ctx.saved_tensors
    if grad_p is None:
        return None, None, None, None, None, None
    grad_x = _stepped_backward_op(grad_p.contiguous(), x, meta, programs, cols, ctx.max_n, ctx.tau)
    return grad_x, None, None, None, None, None


_fused_forward_op.register_autograd(_fused_autograd, setup_context=_fused_setup_context)
_stepped_forward_op.register_autograd(_stepped_autograd, setup_context=_stepped_setup_context)


# ------------------------------------------------------------------------------------------------------------
# Layout of a group of stacks: per-matrix offsets and sizes, built once per shape and device.

_LAYOUT_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}
_LAYOUT_CACHE_SIZE = 256


def _layout_tensors(
    shapes: Sequence[tuple[int, int]], device: torch.device, rows: int | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``meta`` rows ``(offset, n)`` (fused) or ``(offset, n, first program, programs)`` (stepped, ``rows``
    per program), and the stepped program table ``(matrix, first row, end row)``.

    Built with device-side ``arange``/``full`` from Python ints (no host-to-device copy), so that a compiled
    and CUDA-graphed step computes them inside the graph.
    """

    def ints(value: int, count: int) -> torch.Tensor:
        return torch.full((count,), value, dtype=torch.int64, device=device)

    def arange(count: int) -> torch.Tensor:
        return torch.arange(count, dtype=torch.int64, device=device)

    meta_parts, program_parts = [], []
    offset = matrices = programs = 0
    for count, n in shapes:
        columns = [arange(count) * (n * n) + offset, ints(n, count)]
        if rows is not None:
            slabs = triton.cdiv(n, rows)
            columns += [arange(count) * slabs + programs, ints(slabs, count)]
            slab = arange(count * slabs)
            begin = (slab % slabs) * rows
            program_parts.append(
                torch.stack([slab // slabs + matrices, begin, torch.clamp(begin + rows, max=n)], dim=1)
            )
            programs += count * slabs
        meta_parts.append(torch.stack(columns, dim=1))
        offset += count * n * n
        matrices += count
    meta = torch.cat(meta_parts) if meta_parts else torch.empty((0, 2), dtype=torch.int64, device=device)
    if rows is None:
        return meta, None
    return meta, torch.cat(program_parts)


def _layout(
    shapes: tuple[tuple[int, int], ...], device: torch.device, rows: int | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if torch.compiler.is_compiling():
        return _layout_tensors(shapes, device, rows)  # part of the graph; a cache would be a mutable global
    key = (shapes, str(device), rows)
    cached = _LAYOUT_CACHE.get(key)
    if cached is None:
        if len(_LAYOUT_CACHE) >= _LAYOUT_CACHE_SIZE:
            _LAYOUT_CACHE.clear()
        cached = _LAYOUT_CACHE[key] = _layout_tensors(shapes, device, rows)
    return cached


# ------------------------------------------------------------------------------------------------------------
# Public functions.


def _check_triton_tensor(tensor: torch.Tensor, name: str) -> None:
    """Raise unless Triton can run on ``tensor``: float16/bfloat16/float32, on CUDA (or on the CPU under
    ``TRITON_INTERPRET=1``)."""
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} must be float16, bfloat16 or float32 for the triton backend, got {tensor.dtype}; "
            "use the cpu or reference backend for float64"
        )
    if INTERPRETED:
        if tensor.device.type != "cpu":
            raise ValueError(f"under TRITON_INTERPRET=1 {name} must be a CPU tensor, got {tensor.device}")
    elif tensor.device.type != "cuda":
        raise ValueError(
            f"{name} must be a CUDA tensor for the triton backend, got {tensor.device} "
            "(set TRITON_INTERPRET=1 before importing triton to run the kernels in its CPU interpreter)"
        )


def _run_part(stacks: list[torch.Tensor], n_iter: int, tau: float, stepped: bool) -> list[torch.Tensor]:
    shapes = tuple((s.shape[0], s.shape[-1]) for s in stacks)
    max_n = max(n for _, n in shapes)
    flat = stacks[0].reshape(-1) if len(stacks) == 1 else torch.cat([s.reshape(-1) for s in stacks])
    if stepped:
        meta, programs = _layout(shapes, flat.device, _stepped_rows(max_n)[1])
        p, _, _ = _stepped_forward_op(flat, meta, programs, max_n, n_iter, tau)
    else:
        meta, _ = _layout(shapes, flat.device, None)
        p, _, _ = _fused_forward_op(flat, meta, max_n, n_iter, tau)
    pieces = p.split([count * n * n for count, n in shapes])
    return [piece.view(count, n, n) for piece, (count, n) in zip(pieces, shapes, strict=True)]


def _check_size(tensor: torch.Tensor, name: str) -> None:
    if tensor.shape[-1] < 1:
        raise ValueError(f"{name} must have n >= 1, got shape {tuple(tensor.shape)}")


def _grouped(stacks: list[torch.Tensor], n_iter: int, tau: float) -> list[torch.Tensor]:
    """The computation of checked, non-empty ``stacks``: fused and stepped stacks in one launch each."""
    results: list[torch.Tensor | None] = [None] * len(stacks)
    limit = _tuning.fused_max_n
    for stepped in (False, True):
        part = [i for i, s in enumerate(stacks) if (s.shape[-1] > limit) == stepped]
        if part:
            for i, out in zip(part, _run_part([stacks[i] for i in part], n_iter, tau, stepped), strict=True):
                results[i] = out
    return results  # type: ignore[return-value]


def _sinkhorn(logits: torch.Tensor, n_iter: int, tau: float) -> torch.Tensor:
    n = logits.shape[-1]
    (p,) = _grouped([logits.reshape(-1, n, n)], n_iter, tau)
    return p.reshape(logits.shape)


# The backend's ops (registered by symkernels.ops.triton_backend). Their callers (symkernels.functional and
# symkernels.nn.grouped_sinkhorn) have checked the arguments, and backends.resolve the dtype and device
# (triton_backend's can_serve): only the n >= 1 rule is left to check here.


def dispatched_grouped_sinkhorn(stacks: list[torch.Tensor], n_iter: int, tau: float) -> list[torch.Tensor]:
    """:func:`triton_grouped_sinkhorn` of a non-empty list checked by ``symkernels.nn.grouped_sinkhorn``."""
    for index, stack in enumerate(stacks):
        _check_size(stack, f"stacks[{index}]")
    return _grouped(stacks, n_iter, tau)


def dispatched_representation_stack(
    logits: torch.Tensor, n_iter: int, tau: float, *, fix_identity: bool = True
) -> torch.Tensor:
    """:func:`triton_representation_stack` of logits checked by ``symkernels.representation_stack``."""
    _check_size(logits, "logits")
    stack = _sinkhorn(logits, n_iter, tau)
    return prepend_identity(stack) if fix_identity else stack


def triton_grouped_sinkhorn(
    stacks: Sequence[torch.Tensor], n_iter: int = 20, tau: float = 1.0
) -> list[torch.Tensor]:
    """Sinkhorn of every stack ``[G_l, n_l, n_l]`` of ``stacks`` (sizes may differ) in one launch forward and
    one backward; returns the list of doubly stochastic stacks, in the input dtype.

    Stacks with ``n > current_tuning().fused_max_n`` are computed by the multi-program kernels (one launch
    per iteration for all of them) instead.
    """
    stacks = check_stack_list(stacks)
    check_positive_int(n_iter, "n_iter")
    tau = check_tau(tau)
    for index, stack in enumerate(stacks):
        _check_size(stack, f"stacks[{index}]")
    if not stacks:
        return []
    _check_triton_tensor(stacks[0], "stacks")
    return _grouped(stacks, n_iter, tau)


def triton_sinkhorn(logits: torch.Tensor, n_iter: int = 20, tau: float = 1.0) -> torch.Tensor:
    """``[..., n, n]`` logits → doubly stochastic matrices (float32 compute, input dtype out)."""
    check_tensor(logits, "logits")
    check_square_stack(logits, "logits")
    _check_triton_tensor(logits, "logits")
    _check_size(logits, "logits")
    check_positive_int(n_iter, "n_iter")
    tau = check_tau(tau)
    return _sinkhorn(logits, n_iter, tau)


def triton_representation_stack(
    logits: torch.Tensor, n_iter: int = 20, tau: float = 1.0, *, fix_identity: bool = True
) -> torch.Tensor:
    """``[G', d, d]`` logits → ``[G, d, d]`` stack (the identity first when ``fix_identity``)."""
    stack = triton_sinkhorn(logits, n_iter, tau)
    return prepend_identity(stack) if fix_identity else stack
