"""Triton launchers of the Sinkhorn forward and its exact backward, on the ragged layout of the op contract.

``logits`` holds, back to back, ``counts[l]`` row-major matrices of ``sizes[l] × sizes[l]`` for every stack
``l``. Matrices with ``n <= Tuning.fused_max_n`` take one fused launch each way (packed when all of them
have ``n <= packed_max_n``, else chunked: :mod:`symkernels.triton_kernels.sinkhorn_packed`,
``sinkhorn_chunked``, ``sinkhorn_chunked_backward``); larger ones take the multi-program kernels
(:mod:`symkernels.triton_kernels.sinkhorn_stepped`), ``n_iter + 1`` launches each way. The early exit is
decided on the device, matrix by matrix: no host sync, and the launches depend only on the shapes and the
Python arguments.

The arguments are not checked here: the operators that call these functions do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Sequence

import torch
import triton

from symkernels._checks import check_positive_int
from symkernels.ops.triton_support import INTERPRETED, launched_on_its_device
from symkernels.triton_kernels.sinkhorn_chunked import chunked_forward_kernel
from symkernels.triton_kernels.sinkhorn_chunked_backward import chunked_backward_kernel
from symkernels.triton_kernels.sinkhorn_packed import packed_backward_kernel, packed_forward_kernel
from symkernels.triton_kernels.sinkhorn_stepped import (
    stepped_backward_final_kernel,
    stepped_backward_step_kernel,
    stepped_forward_kernel,
)

__all__ = [
    "MAX_LOG_SCALING",
    "MAX_SPREAD",
    "Tuning",
    "backward",
    "chunked_plan",
    "current_tuning",
    "forward",
    "packed_plan",
    "stepped_plan",
    "tuning",
]

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

    The defaults keep every kernel free of register spills on sm_90 with triton 3.8 (checked with
    ``ptxas -v`` for every block size they produce; triton 3.6's ptxas spills a few dozen bytes in some).
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
    """Run the enclosed calls with some :class:`Tuning` fields changed (e.g. to send small matrices through
    every kernel layout)."""
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
# Launch plans: block sizes and warps of each kernel.


def packed_plan(
    max_n: int, num_matrices: int, *, stopping: bool = False, backward: bool = False
) -> dict[str, int]:
    """``MB`` matrices of ``BN × BN`` per program of the packed kernels.

    About 16 tile values per thread, fewer where a kernel keeps more state per matrix (ptxas, sm_90): 8 for a
    forward that stops matrices one by one (``stopping``: caps or a tolerance), 4 for the backward of
    matrices smaller than 16 and 8 for that of ``BN = 16``.
    """
    block = _block(max_n)
    if backward:
        per_thread = 4 if block < 16 else 8 if block == 16 else 16
    else:
        per_thread = 8 if stopping else 16
    elements = _tuning.packed_elements * per_thread // 16
    per_program = min(_floor_pow2(elements // (block * block)), _block(num_matrices))
    # One matrix larger than `elements` keeps the warps of `elements`: more would cap each one's registers.
    warps = _num_warps(min(per_program * block * block, elements), per_thread)
    return {"MB": per_program, "BN": block, "num_warps": warps}


def chunked_plan(max_n: int, *, backward: bool, test: bool = False) -> dict[str, int]:
    """``BR`` rows of ``BN`` per tile of the chunked kernels: 8 tile values per thread in the forward (with
    fewer live tiles, it spills a few registers at 16), half the rows when it also tests convergence (which
    recomputes the previous row scalings), 16 in the backward."""
    block = _block(max_n)
    elements = _tuning.chunk_elements // 2 if test and not backward else _tuning.chunk_elements
    rows = min(block, _floor_pow2(elements // block))
    return {"BR": rows, "BN": block, "num_warps": _num_warps(rows * block, 16 if backward else 8)}


def _stepped_rows(max_n: int) -> tuple[int, int]:
    """Rows per register tile and per program (a multiple of the former) of the stepped kernels."""
    block = _block(max_n)
    tile = min(block, _floor_pow2(_tuning.stepped_elements // block))
    return tile, triton.cdiv(_tuning.stepped_slab_rows, tile) * tile


def stepped_plan(max_n: int, *, test: bool = False) -> dict[str, int]:
    """``BR`` rows of ``BN`` per tile of the stepped kernels: 16 tile values per thread, 8 (half the rows) in
    a forward that tests convergence (which recomputes the previous row scalings). Either divides the rows
    of a program."""
    block = _block(max_n)
    rows, _ = _stepped_rows(max_n)
    if test:
        rows = max(1, rows // 2)
        return {"BR": rows, "BN": block, "num_warps": _num_warps(rows * block, 8)}
    return {"BR": rows, "BN": block, "num_warps": _num_warps(rows * block)}


# ------------------------------------------------------------------------------------------------------------
# Layout of a call: which matrices each launch serves, built once per (sizes, counts, device, tuning).


@dataclasses.dataclass(frozen=True)
class _Layout:
    fused: torch.Tensor  # [M_f, 3] int64: offset, n, matrix index
    fused_n: int  # the largest fused n (0: no fused matrix)
    stepped: torch.Tensor  # [M_s, 5] int64: offset, n, matrix index, first program, programs
    programs: torch.Tensor  # [P, 3] int64: row of `stepped`, first row, end row
    stepped_n: int  # the largest stepped n (0: none)


_LAYOUT_CACHE: dict[tuple, _Layout] = {}
_LAYOUT_CACHE_SIZE = 256


def _build_layout(sizes: Sequence[int], counts: Sequence[int], device: torch.device) -> _Layout:
    """Built with device-side ``arange``/``full`` from the Python ints (no host-to-device copy)."""

    def ints(value: int, count: int) -> torch.Tensor:
        return torch.full((count,), value, dtype=torch.int64, device=device)

    def arange(count: int) -> torch.Tensor:
        return torch.arange(count, dtype=torch.int64, device=device)

    limit = _tuning.fused_max_n
    stepped_n = max((n for n, count in zip(sizes, counts, strict=True) if count and n > limit), default=0)
    rows = _stepped_rows(stepped_n)[1]
    fused, stepped, programs = [], [], []
    offset = matrices = stepped_matrices = num_programs = 0
    for n, count in zip(sizes, counts, strict=True):
        if count:
            offsets, indices = arange(count) * (n * n) + offset, arange(count) + matrices
            if n <= limit:
                fused.append(torch.stack([offsets, ints(n, count), indices], dim=1))
            else:
                slabs = triton.cdiv(n, rows)
                firsts = arange(count) * slabs + num_programs
                stepped.append(
                    torch.stack([offsets, ints(n, count), indices, firsts, ints(slabs, count)], dim=1)
                )
                slab = arange(count * slabs)
                begin = (slab % slabs) * rows
                ends = torch.clamp(begin + rows, max=n)
                programs.append(torch.stack([slab // slabs + stepped_matrices, begin, ends], dim=1))
                stepped_matrices += count
                num_programs += count * slabs
        offset += count * n * n
        matrices += count

    def table(parts: list[torch.Tensor], width: int) -> torch.Tensor:
        return torch.cat(parts) if parts else torch.empty((0, width), dtype=torch.int64, device=device)

    fused_n = max((n for n, count in zip(sizes, counts, strict=True) if count and n <= limit), default=0)
    return _Layout(table(fused, 3), fused_n, table(stepped, 5), table(programs, 3), stepped_n)


def _layout(sizes: Sequence[int], counts: Sequence[int], device: torch.device) -> _Layout:
    key = (tuple(sizes), tuple(counts), str(device), _tuning)
    cached = _LAYOUT_CACHE.get(key)
    if cached is None:
        if len(_LAYOUT_CACHE) >= _LAYOUT_CACHE_SIZE:
            _LAYOUT_CACHE.clear()
        cached = _LAYOUT_CACHE[key] = _build_layout(sizes, counts, device)
    return cached


# ------------------------------------------------------------------------------------------------------------
# Forward.


@launched_on_its_device
def forward(
    logits: torch.Tensor,
    sizes: list[int],
    counts: list[int],
    n_iter: int,
    tau: float,
    tol: float,
    caps: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(p, cols, domain, iterations)`` for the matrices of ``logits`` (1-D, contiguous; float16, bfloat16
    or float32, computed in float32): P like ``logits``; ``cols`` float64 ``[M, n_iter, max(sizes)]``, the
    column scalings ``c_t``/``g_t`` of the iterations each matrix ran and 0 elsewhere (``max(sizes)`` over
    the stacks that hold matrices); ``domain`` int32 ``[M]`` (0 scaling, 1 log); ``iterations`` int32 ``[M]``,
    the ``T_m`` run.

    A matrix runs at most ``caps[m]`` iterations (int32 ``[M]``, clamped to ``1..n_iter`` on the device as
    the CUDA kernels do; ``None``: ``n_iter``), and with ``tol > 0`` stops at the first iterate whose row sums
    are all within ``tol`` of 1.
    """
    device = logits.device
    num_matrices = sum(counts)
    # As the op's contract (and its fake) says: the largest matrix's n; an empty stack's size does not count.
    max_n = max((n for n, count in zip(sizes, counts, strict=True) if count), default=0)
    layout = _layout(sizes, counts, device)
    p = torch.empty_like(logits)
    # A launch writes the first BN columns of its matrices' saved scalings; when a larger matrix elsewhere in
    # the call (or an empty stack's size) makes the rows wider, the rest are zeroed here.
    padded = any(0 < n and _block(n) < max_n for n in (layout.fused_n, layout.stepped_n))
    cols = (torch.zeros if padded else torch.empty)(
        (num_matrices, n_iter, max_n), dtype=torch.float64, device=device
    )
    domain = torch.empty((num_matrices,), dtype=torch.int32, device=device)
    iterations = torch.empty((num_matrices,), dtype=torch.int32, device=device)
    if num_matrices == 0:
        return p, cols, domain, iterations
    test, capped = tol > 0, caps is not None
    flags = {"TEST": test, "CAPPED": capped}
    # Without caps the kernels never read them: any int32 tensor stands in.
    arrays = (p, cols, domain, iterations, iterations if caps is None else caps)
    if layout.fused_n:
        meta, count = layout.fused, layout.fused.shape[0]
        scalars = (tau, tol, MAX_SPREAD, _SCALE_LO, _SCALE_HI)
        if layout.fused_n <= _tuning.packed_max_n:
            plan = packed_plan(layout.fused_n, count, stopping=test or capped)
            packed_forward_kernel[(triton.cdiv(count, plan["MB"]),)](
                logits, *arrays, meta, count, n_iter, max_n, *scalars, **flags, **plan
            )
        else:
            scratch = torch.empty(logits.shape, dtype=torch.float32, device=device)  # K, written once
            chunked_forward_kernel[(count,)](
                logits,
                scratch,
                *arrays,
                meta,
                n_iter,
                max_n,
                *scalars,
                **flags,
                **chunked_plan(layout.fused_n, backward=False, test=test),
            )
    if layout.stepped_n:
        plan = stepped_plan(layout.stepped_n, test=test)
        num_programs = layout.programs.shape[0]
        maxima = torch.empty((2, num_programs, plan["BN"]), dtype=torch.float64, device=device)
        sums = torch.empty((2, num_programs, plan["BN"]), dtype=torch.float32, device=device)
        status = torch.empty((2, num_programs), dtype=torch.int32, device=device)
        for s in range(n_iter + 1):
            stepped_forward_kernel[(num_programs,)](
                logits,
                *arrays,
                maxima,
                sums,
                status,
                layout.stepped,
                layout.programs,
                s,
                n_iter,
                max_n,
                num_programs,
                tau,
                tol,
                **flags,
                **plan,
            )
    return p, cols, domain, iterations


# ------------------------------------------------------------------------------------------------------------
# Backward.


@launched_on_its_device
def backward(
    grad_p: torch.Tensor,
    logits: torch.Tensor,
    sizes: list[int],
    counts: list[int],
    cols: torch.Tensor,
    domain: torch.Tensor,
    iterations: torch.Tensor,
    tau: float,
) -> torch.Tensor:
    """The gradient of the logits: the exact VJP of the ``iterations[m]``-step map each matrix ran, from the
    saved ``cols``/``domain``/``iterations`` of :func:`forward` (``n_iter = cols.shape[1]``)."""
    device = logits.device
    grad_logits = torch.empty_like(logits)
    num_matrices, n_iter, max_n = cols.shape
    if num_matrices == 0:
        return grad_logits
    grad_p = grad_p.contiguous()
    layout = _layout(sizes, counts, device)
    chunked = 0 < layout.fused_n and layout.fused_n > _tuning.packed_max_n
    # The column adjoints ḡ_t of the chunked and stepped kernels, laid out as cols.
    bars = (
        torch.empty(cols.shape, dtype=torch.float32, device=device) if chunked or layout.stepped_n else None
    )
    if layout.fused_n:
        meta, count = layout.fused, layout.fused.shape[0]
        if not chunked:
            plan = packed_plan(layout.fused_n, count, backward=True)
            packed_backward_kernel[(triton.cdiv(count, plan["MB"]),)](
                grad_p, logits, cols, domain, iterations, meta, grad_logits, count, n_iter, max_n, tau, **plan
            )
        else:
            scratch = torch.empty(logits.shape, dtype=torch.float32, device=device)
            chunked_backward_kernel[(count,)](
                grad_p,
                logits,
                scratch,
                cols,
                domain,
                iterations,
                meta,
                grad_logits,
                bars,
                n_iter,
                max_n,
                tau,
                **chunked_plan(layout.fused_n, backward=True),
            )
    if layout.stepped_n:
        plan = stepped_plan(layout.stepped_n)
        num_programs = layout.programs.shape[0]
        partials = torch.empty((2, num_programs, plan["BN"]), dtype=torch.float32, device=device)
        tables = (layout.stepped, layout.programs)
        for k in range(n_iter):
            stepped_backward_step_kernel[(num_programs,)](
                grad_p,
                logits,
                cols,
                iterations,
                bars,
                partials,
                *tables,
                k,
                n_iter,
                max_n,
                num_programs,
                tau,
                **plan,
            )
        stepped_backward_final_kernel[(num_programs,)](
            grad_p,
            logits,
            grad_logits,
            cols,
            iterations,
            bars,
            partials,
            *tables,
            n_iter,
            max_n,
            num_programs,
            tau,
            **plan,
        )
    return grad_logits
