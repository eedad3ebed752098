"""Multi-program Sinkhorn kernels for matrices too large for one program: one launch per iteration.

Each matrix is split into slabs of rows, one program per slab (``programs [P, 3]``: meta row, first
row, end row), which walks its slab in register tiles of ``BR`` rows. A launch does one iteration for every
slab: it merges the column partials that all slabs of its matrix wrote in the previous launch (in a fixed
order, so every program of a matrix gets bit-identical column scalings), takes its rows' step, and writes its
own column partial. Partials alternate between two buffers, as programs of a launch still read the previous
iteration's. ``meta [M', 5]``: offset, n, index of the matrix in the outputs, first program, number of
programs. Merging costs every program one read of its matrix's partials per launch, so slabs are kept a few
tiles tall.

Rows are re-read from global memory at every launch, so the log domain costs about what the scaling domain
would and needs no fallback: these kernels always iterate in the log domain (``domain`` is 1). The saved
``cols``, the early exit and the backward (docs/design.md §13) are those of :mod:`.sinkhorn`; the launch
shape is fixed, ``n_iter + 1`` launches each way whatever the matrices do:

* forward launch ``s`` merges ``g_s``; a running matrix then takes the row step ``f_{s+1}`` and, with
  ``TEST``, each slab reports whether its rows of ``P_s`` passed (row sums ``exp(f_s - f_{s+1})``, with
  ``f_s`` recomputed from ``g_{s-1}``). Launch ``s + 1`` merges the reports: all passed means ``T = s``;
  else the matrix stops at ``T = s + 1`` if that is its limit. The launch that stops a matrix writes its
  ``P``; later launches only write zeros to its saved scalings. Each program reports in ``status [2, P]``
  (-1: stopped, 1: its rows passed, 0: not), so every program of a matrix takes the same decisions;
* the reverse sweep of a matrix that ran ``T`` iterations takes the last ``T`` step launches (the first
  ``n_iter - T`` leave it alone), so the final launch forms every matrix's gradient.
"""

import triton
import triton.language as tl

from .sinkhorn import iteration_limit, saved_column
from .sinkhorn_chunked_backward import column_adjoint_rows, gradient_rows, last_column_adjoint_rows
from .sinkhorn_tiles import (
    column_partials,
    column_scaling,
    element_pointers,
    entries,
    matrix_rows,
    merge_column_partials,
    row_scaling,
    rows_converged,
)


@triton.jit
def _program(meta_ptr, programs_ptr, n_iter, vec_stride, BN: tl.constexpr):
    prog = tl.program_id(0)
    slot = tl.load(programs_ptr + 3 * prog)
    row_begin = tl.load(programs_ptr + 3 * prog + 1).to(tl.int32)
    row_end = tl.load(programs_ptr + 3 * prog + 2).to(tl.int32)
    off = tl.load(meta_ptr + 5 * slot)
    n = tl.load(meta_ptr + 5 * slot + 1).to(tl.int32)
    index = tl.load(meta_ptr + 5 * slot + 2)
    first = tl.load(meta_ptr + 5 * slot + 3)
    count = tl.load(meta_ptr + 5 * slot + 4).to(tl.int32)
    lanes = tl.arange(0, BN)[None, None, :]
    col_mask = lanes < n
    vec = index * n_iter * vec_stride + lanes
    return prog, row_begin, row_end, off, n, index, first, count, lanes, col_mask, vec


@triton.jit
def _merged_log_partials(maxima_ptr, sums_ptr, first, count, lanes, mask, BN: tl.constexpr):
    """Online log-sum-exp over the column partials of a matrix's ``count`` programs, in program order."""
    a = tl.where(mask, float("-inf"), float("-inf")).to(tl.float64)
    b = tl.where(mask, 0.0, 0.0)
    for j in range(count):
        at = (first + j) * BN + lanes
        a, b = merge_column_partials(
            a,
            b,
            tl.load(maxima_ptr + at, mask=mask, other=float("-inf")),
            tl.load(sums_ptr + at, mask=mask, other=0.0),
            True,
        )
    return a, b


@triton.jit
def _summed_partials(sums_ptr, first, count, lanes, mask, BN: tl.constexpr):
    total = tl.where(mask, 0.0, 0.0)
    for j in range(count):
        total += tl.load(sums_ptr + (first + j) * BN + lanes, mask=mask, other=0.0)
    return total


@triton.jit
def _lowest_status(status_ptr, first, count, valid):
    """The lowest status the programs ``first .. first + count`` reported (1 where ``valid`` is false)."""
    lowest = tl.full([], 1, tl.int32)
    for j in range(count):
        lowest = tl.minimum(lowest, tl.load(status_ptr + first + j, mask=valid, other=1))
    return lowest


@triton.jit(do_not_specialize=["s", "n_iter", "num_programs"])
def stepped_forward_kernel(
    x_ptr,
    p_ptr,
    cols_ptr,
    domain_ptr,
    iterations_ptr,
    caps_ptr,
    maxima_ptr,
    sums_ptr,
    status_ptr,
    meta_ptr,
    programs_ptr,
    s,
    n_iter,
    vec_stride,
    num_programs,
    tau,
    tol,
    BR: tl.constexpr,
    BN: tl.constexpr,
    TEST: tl.constexpr,
    CAPPED: tl.constexpr,
):
    """Launch ``s`` (0 .. n_iter) of the forward: ``g_s`` from the previous partials (stored by each matrix's
    first program), then this slab's ``f_{s+1}``, its column partial and its test of ``P_s``; or this slab's
    rows of ``P`` when the matrix stops here."""
    prog, row_begin, row_end, off, n, index, first, count, lanes, col_mask, vec = _program(
        meta_ptr, programs_ptr, n_iter, vec_stride, BN
    )
    if CAPPED:
        limit = iteration_limit(tl.load(caps_ptr + index), n_iter)  # every matrix stops by launch n_iter
    else:
        limit = n_iter
    first_slab = row_begin == 0
    plane = num_programs * BN
    previous = ((s + 1) % 2) * plane
    lowest = _lowest_status(status_ptr + ((s + 1) % 2) * num_programs, first, count, s > 0)
    stopped = lowest < 0  # in an earlier launch
    passed = (lowest > 0) & (s > 0)  # every row of P_{s-1} passed the test: T = s - 1
    a, b = _merged_log_partials(
        maxima_ptr + previous, sums_ptr + previous, first, count, lanes, col_mask & (s > 0), BN
    )
    col = column_scaling(a, b, col_mask & (s > 0), True)  # g_s (g_0 = 0)
    saved = (lanes < vec_stride) & (s > 0) & first_slab
    tl.store(cols_ptr + vec + (s - 1) * vec_stride, tl.where(stopped | passed, 0.0, col), mask=saved)
    tl.store(domain_ptr + index, 1, mask=first_slab & (s == 0))
    status = tl.full([], -1, tl.int32)
    if (~stopped) & (passed | (s == limit)):
        last = tl.where(passed, s - 1, s)
        tl.store(iterations_ptr + index, last, mask=first_slab)
        col_last = tl.where(passed, saved_column(cols_ptr + vec, s - 1, vec_stride, col_mask, True), col)
        col_prev = saved_column(cols_ptr + vec, last - 1, vec_stride, col_mask, True)
        for row0 in range(row_begin, row_end, BR):
            l0, row_mask, _ = matrix_rows(x_ptr, off, n, row0, tau, BR, BN)
            row = row_scaling(l0, col_prev, row_mask, True)
            ptrs, mask = element_pointers(p_ptr, off, n, row0, BR, BN)
            tl.store(ptrs, entries(l0, row, col_last, True), mask=mask)
    elif ~stopped:
        col_prev = saved_column(cols_ptr + vec, s - 1, vec_stride, col_mask, True)  # g_{s-1}
        a = tl.where(col_mask, float("-inf"), float("-inf")).to(tl.float64)
        b = tl.where(col_mask, 0.0, 0.0)
        converged = tl.full([], TEST, tl.int32)
        for row0 in range(row_begin, row_end, BR):
            l0, row_mask, _ = matrix_rows(x_ptr, off, n, row0, tau, BR, BN)
            row = row_scaling(l0, col, row_mask, True)
            a_chunk, b_chunk = column_partials(l0, row, True)
            a, b = merge_column_partials(a, b, a_chunk, b_chunk, True)
            if TEST:
                previous_row = row_scaling(l0, col_prev, row_mask, True)  # f_s
                converged = converged & tl.min(rows_converged(previous_row, row, row_mask, tol, True), axis=0)
        current = (s % 2) * plane + prog * BN + lanes
        tl.store(maxima_ptr + current, a)
        tl.store(sums_ptr + current, b)
        status = tl.where(s > 0, converged, 0)
    tl.store(status_ptr + (s % 2) * num_programs + prog, status)


@triton.jit(do_not_specialize=["k", "n_iter", "num_programs"])
def stepped_backward_step_kernel(
    grad_ptr,
    x_ptr,
    cols_ptr,
    iterations_ptr,
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
    """Launch ``k`` of the reverse sweep, step ``j = k - (n_iter - T)`` of a matrix that ran ``T`` iterations:
    ``j = 0`` sums ``colsum(Ḡ ⊙ P)``; ``j >= 1`` takes ``ḡ_t`` with ``t = T - j + 1`` from the previous
    partials (stored by each matrix's first program) and sums this slab's ``A_tᵀ f̄_t``."""
    prog, row_begin, row_end, off, n, index, first, count, lanes, col_mask, vec = _program(
        meta_ptr, programs_ptr, n_iter, vec_stride, BN
    )
    last = tl.minimum(tl.load(iterations_ptr + index), n_iter)  # reads stay in cols
    j = k - (n_iter - last)
    plane = num_programs * BN
    if j >= 0:
        partial = tl.where(col_mask, 0.0, 0.0)
        if j == 0:
            for row0 in range(row_begin, row_end, BR):
                partial += last_column_adjoint_rows(
                    grad_ptr,
                    x_ptr,
                    x_ptr,  # no K scratch: the log domain reads L0
                    off,
                    n,
                    row0,
                    tau,
                    cols_ptr + vec,
                    vec_stride,
                    last,
                    col_mask,
                    BR,
                    BN,
                    True,
                )
        else:
            t = last - j + 1
            total = _summed_partials(partials_ptr + ((k + 1) % 2) * plane, first, count, lanes, col_mask, BN)
            g_bar = tl.where(j == 1, total, -total)
            tl.store(bars_ptr + vec + (t - 1) * vec_stride, g_bar, mask=col_mask & (row_begin == 0))
            for row0 in range(row_begin, row_end, BR):
                partial += column_adjoint_rows(
                    grad_ptr,
                    x_ptr,
                    x_ptr,
                    off,
                    n,
                    row0,
                    tau,
                    cols_ptr + vec,
                    vec_stride,
                    last,
                    t,
                    g_bar,
                    col_mask,
                    BR,
                    BN,
                    True,
                )
        tl.store(partials_ptr + (k % 2) * plane + prog * BN + lanes, partial)


@triton.jit(do_not_specialize=["n_iter", "num_programs"])
def stepped_backward_final_kernel(
    grad_ptr,
    x_ptr,
    out_ptr,
    cols_ptr,
    iterations_ptr,
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
    prog, row_begin, row_end, off, n, index, first, count, lanes, col_mask, vec = _program(
        meta_ptr, programs_ptr, n_iter, vec_stride, BN
    )
    last = tl.minimum(tl.load(iterations_ptr + index), n_iter)  # reads stay in cols
    plane = num_programs * BN
    total = _summed_partials(partials_ptr + ((n_iter + 1) % 2) * plane, first, count, lanes, col_mask, BN)
    g_first = tl.where(last == 1, total, -total)
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
            last,
            g_first,
            col_mask,
            BR,
            BN,
            True,
        )
