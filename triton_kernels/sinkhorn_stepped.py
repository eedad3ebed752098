"""Multi-program Sinkhorn kernels for matrices too large for one program: one launch per iteration.

Each matrix is split into slabs of rows, one program per slab (``programs [P, 3]``: matrix, first row, end
row), which walks its slab in register tiles of ``BR`` rows. A launch does one iteration for every slab: it
merges the column partials that all slabs of its matrix wrote in the previous launch (in a fixed order, so
every program of a matrix gets bit-identical column scalings), takes its rows' step, and writes its own column
partial. Partials alternate between two buffers, as programs of a launch still read the previous iteration's.
``meta [M, 4]``: offset, n, first program, number of programs. Merging costs every program one read of its
matrix's partials per launch, so slabs are kept a few tiles tall.

Rows are re-read from global memory at every launch, so the log domain costs about what the scaling domain
would and needs no fallback: these kernels always iterate in the log domain (``domain`` is 1). The saved
``cols`` and the backward (kernels.md §3) are those of :mod:`.sinkhorn`, with ``T + 1`` launches each way.
"""

import triton
import triton.language as tl

from .sinkhorn import column_adjoint_rows, gradient_rows, last_column_adjoint_rows, saved_column
from .sinkhorn_tiles import (
    column_partials,
    column_scaling,
    element_pointers,
    entries,
    matrix_rows,
    merge_column_partials,
    row_scaling,
)


@triton.jit
def _program(meta_ptr, programs_ptr, n_iter, vec_stride, BN: tl.constexpr):
    prog = tl.program_id(0)
    mat = tl.load(programs_ptr + 3 * prog)
    row_begin = tl.load(programs_ptr + 3 * prog + 1).to(tl.int32)
    row_end = tl.load(programs_ptr + 3 * prog + 2).to(tl.int32)
    off = tl.load(meta_ptr + 4 * mat)
    n = tl.load(meta_ptr + 4 * mat + 1).to(tl.int32)
    first = tl.load(meta_ptr + 4 * mat + 2)
    count = tl.load(meta_ptr + 4 * mat + 3).to(tl.int32)
    index = tl.arange(0, BN)[None, None, :]
    col_mask = index < n
    vec = mat * n_iter * vec_stride + index
    return prog, row_begin, row_end, off, n, first, count, index, col_mask, vec


@triton.jit
def _merged_log_partials(maxima_ptr, sums_ptr, first, count, index, mask, BN: tl.constexpr):
    """Online log-sum-exp over the column partials of a matrix's ``count`` programs, in program order."""
    a = tl.where(mask, float("-inf"), float("-inf")).to(tl.float64)
    b = tl.where(mask, 0.0, 0.0)
    for j in range(count):
        at = (first + j) * BN + index
        a, b = merge_column_partials(
            a,
            b,
            tl.load(maxima_ptr + at, mask=mask, other=float("-inf")),
            tl.load(sums_ptr + at, mask=mask, other=0.0),
            True,
        )
    return a, b


@triton.jit
def _summed_partials(sums_ptr, first, count, index, mask, BN: tl.constexpr):
    total = tl.where(mask, 0.0, 0.0)
    for j in range(count):
        total += tl.load(sums_ptr + (first + j) * BN + index, mask=mask, other=0.0)
    return total


@triton.jit
def stepped_forward_step_kernel(
    x_ptr,
    cols_ptr,
    maxima_ptr,
    sums_ptr,
    meta_ptr,
    programs_ptr,
    t,
    n_iter,
    vec_stride,
    num_programs,
    tau,
    BR: tl.constexpr,
    BN: tl.constexpr,
):
    """Iteration ``t + 1``: ``g_t`` from the previous partials (stored by each matrix's first program), then
    this slab's ``f_{t+1}`` and its column partial."""
    prog, row_begin, row_end, off, n, first, count, index, col_mask, vec = _program(
        meta_ptr, programs_ptr, n_iter, vec_stride, BN
    )
    plane = num_programs * BN
    previous = ((t + 1) % 2) * plane
    a, b = _merged_log_partials(
        maxima_ptr + previous, sums_ptr + previous, first, count, index, col_mask & (t > 0), BN
    )
    col = column_scaling(a, b, col_mask & (t > 0), True)  # g_0 = 0
    first_slab = row_begin == 0
    tl.store(cols_ptr + vec + (t - 1) * vec_stride, col, mask=(index < vec_stride) & (t > 0) & first_slab)
    a = tl.where(col_mask, float("-inf"), float("-inf")).to(tl.float64)
    b = tl.where(col_mask, 0.0, 0.0)
    for row0 in range(row_begin, row_end, BR):
        l0, row_mask, _ = matrix_rows(x_ptr, off, n, row0, tau, BR, BN)
        row = row_scaling(l0, col, row_mask, True)
        a_chunk, b_chunk = column_partials(l0, row, True)
        a, b = merge_column_partials(a, b, a_chunk, b_chunk, True)
    current = (t % 2) * plane + prog * BN + index
    tl.store(maxima_ptr + current, a)
    tl.store(sums_ptr + current, b)


@triton.jit
def stepped_forward_final_kernel(
    x_ptr,
    p_ptr,
    cols_ptr,
    maxima_ptr,
    sums_ptr,
    meta_ptr,
    programs_ptr,
    n_iter,
    vec_stride,
    num_programs,
    tau,
    BR: tl.constexpr,
    BN: tl.constexpr,
):
    """``g_T`` from the last partials, then this slab's rows of ``P = exp(L0 + f_T + g_T)``."""
    prog, row_begin, row_end, off, n, first, count, index, col_mask, vec = _program(
        meta_ptr, programs_ptr, n_iter, vec_stride, BN
    )
    plane = num_programs * BN
    previous = ((n_iter + 1) % 2) * plane
    a, b = _merged_log_partials(maxima_ptr + previous, sums_ptr + previous, first, count, index, col_mask, BN)
    col = column_scaling(a, b, col_mask, True)
    tl.store(cols_ptr + vec + (n_iter - 1) * vec_stride, col, mask=(index < vec_stride) & (row_begin == 0))
    col_prev = saved_column(cols_ptr + vec, n_iter - 1, vec_stride, col_mask, True)
    for row0 in range(row_begin, row_end, BR):
        l0, row_mask, _ = matrix_rows(x_ptr, off, n, row0, tau, BR, BN)
        row = row_scaling(l0, col_prev, row_mask, True)
        ptrs, mask = element_pointers(p_ptr, off, n, row0, BR, BN)
        tl.store(ptrs, entries(l0, row, col, True), mask=mask)


@triton.jit
def stepped_backward_step_kernel(
    grad_ptr,
    x_ptr,
    cols_ptr,
    bars_ptr,
    partials_ptr,
    meta_ptr,
    programs_ptr,
    k,
    n_iter,
    vec_stride,
    num_programs,
    tau,
    BR: tl.constexpr,
    BN: tl.constexpr,
):
    """Launch ``k`` of the reverse sweep: ``k = 0`` sums ``colsum(Ḡ ⊙ P)``; ``k >= 1`` takes ``ḡ_t`` with
    ``t = T - k + 1`` from the previous partials (stored by each matrix's first program) and sums this slab's
    ``A_tᵀ f̄_t``."""
    prog, row_begin, row_end, off, n, first, count, index, col_mask, vec = _program(
        meta_ptr, programs_ptr, n_iter, vec_stride, BN
    )
    plane = num_programs * BN
    partial = tl.where(col_mask, 0.0, 0.0)
    if k == 0:
        for row0 in range(row_begin, row_end, BR):
            partial += last_column_adjoint_rows(
                grad_ptr,
                x_ptr,
                x_ptr,
                off,
                n,
                row0,
                tau,
                cols_ptr + vec,
                vec_stride,
                n_iter,
                col_mask,
                BR,
                BN,
                True,
            )
    else:
        t = n_iter - k + 1
        total = _summed_partials(partials_ptr + ((k + 1) % 2) * plane, first, count, index, col_mask, BN)
        g_bar = tl.where(k == 1, total, -total)
        tl.store(bars_ptr + vec + (t - 1) * vec_stride, g_bar, mask=col_mask & (row_begin == 0))
        for row0 in range(row_begin, row_end, BR):
            partial += column_adjoint_rows(
                grad_ptr,
                x_ptr,
                x_ptr,  # no K scratch: the log domain reads L0
                off,
                n,
                row0,
                tau,
                cols_ptr + vec,
                vec_stride,
                n_iter,
                t,
                g_bar,
                col_mask,
                BR,
                BN,
                True,
            )
    tl.store(partials_ptr + (k % 2) * plane + prog * BN + index, partial)


@triton.jit
def stepped_backward_final_kernel(
    grad_ptr,
    x_ptr,
    out_ptr,
    cols_ptr,
    bars_ptr,
    partials_ptr,
    meta_ptr,
    programs_ptr,
    n_iter,
    vec_stride,
    num_programs,
    tau,
    BR: tl.constexpr,
    BN: tl.constexpr,
):
    """``ḡ_1`` from the last partials, then this slab's rows of ``Θ̄``."""
    prog, row_begin, row_end, off, n, first, count, index, col_mask, vec = _program(
        meta_ptr, programs_ptr, n_iter, vec_stride, BN
    )
    plane = num_programs * BN
    total = _summed_partials(partials_ptr + ((n_iter + 1) % 2) * plane, first, count, index, col_mask, BN)
    g_first = tl.where(n_iter == 1, total, -total)
    for row0 in range(row_begin, row_end, BR):
        gradient_rows(
            grad_ptr,
            x_ptr,
            x_ptr,
            out_ptr,
            off,
            n,
            row0,
            tau,
            cols_ptr + vec,
            bars_ptr + vec,
            vec_stride,
            n_iter,
            g_first,
            col_mask,
            BR,
            BN,
            True,
        )
