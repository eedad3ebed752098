"""Chunked Sinkhorn forward: one program per matrix, for ``n`` whose matrix does not fit a program's
registers. ``K`` is written once to a scratch copy (laid out as the logits), and every pass streams it in
chunks of ``BR`` rows (from L1/L2: 150 KB for n = 196); row quantities are recomputed chunk by chunk. The
math and the saved state are described in :mod:`.sinkhorn`; the backward is :mod:`.sinkhorn_chunked_backward`.
"""

import triton
import triton.language as tl

from .sinkhorn import first_column, iteration_limit, zero_columns_from
from .sinkhorn_tiles import (
    any_outside,
    column_partials,
    column_scaling,
    element_pointers,
    entries,
    in_range,
    matrix_rows,
    merge_column_partials,
    row_scaling,
    row_stats,
    rows_converged,
    scaling_tile,
)


@triton.jit
def streamed_tile(
    x_ptr, k_ptr, off, n, row0, tau, col_mask, BR: tl.constexpr, BN: tl.constexpr, LOG: tl.constexpr
):
    """The rows ``row0 + [0, BR)`` of the tile a pass works on, and their row mask: ``L0`` from the logits, or
    ``K`` from the scratch copy :func:`store_kernel_rows` wrote (exponentials are taken once per matrix, not
    once per pass)."""
    if LOG:
        l0, row_mask, _ = matrix_rows(x_ptr, off, n, row0, tau, BR, BN)
        return l0, row_mask
    else:
        ptrs, mask = element_pointers(k_ptr, off, n, row0, BR, BN)
        row_mask = (row0 + tl.arange(0, BR)[None, :, None]) < n
        return tl.load(ptrs, mask=mask, other=0.0), row_mask


@triton.jit
def store_kernel_rows(x_ptr, k_ptr, off, n, row0, tau, col_mask, BR: tl.constexpr, BN: tl.constexpr):
    """Write ``K = exp(L0 - rowmax)`` for the rows ``row0 + [0, BR)`` to the scratch ``k_ptr``; returns ``L0``
    and its row mask."""
    l0, row_mask, _ = matrix_rows(x_ptr, off, n, row0, tau, BR, BN)
    ptrs, mask = element_pointers(k_ptr, off, n, row0, BR, BN)
    tl.store(ptrs, scaling_tile(l0, row_mask, col_mask), mask=mask)
    return l0, row_mask


@triton.jit
def chunked_matrix(meta_ptr):
    slot = tl.program_id(0)
    off = tl.load(meta_ptr + 3 * slot)
    n = tl.load(meta_ptr + 3 * slot + 1).to(tl.int32)
    index = tl.load(meta_ptr + 3 * slot + 2)
    return off, n, index


@triton.jit
def _chunked_iterate(
    x_ptr,
    k_ptr,
    off,
    n,
    tau,
    vec,
    vec_stride,
    n_iter,
    limit,
    tol,
    col_mask,
    lo,
    hi,
    BR: tl.constexpr,
    BN: tl.constexpr,
    LOG: tl.constexpr,
    TEST: tl.constexpr,
):
    """The iterations up to ``limit`` or convergence, one pass over the row chunks each; stores every
    ``c_t``/``g_t`` (0 after the stop).

    Returns ``c_{T-1}``, ``c_T``, ``T`` and 1 if a scaling left ``[lo, hi]`` (scaling domain) else 0.
    """
    col = first_column(col_mask, LOG)
    col_prev = col
    escaped = tl.zeros([], tl.int32)
    t = tl.zeros([], tl.int32)
    running = t == 0
    lanes = tl.arange(0, BN)[None, None, :]
    while running & (t < limit):
        if LOG:
            a = tl.where(col_mask, float("-inf"), float("-inf")).to(tl.float64)
            b = tl.where(col_mask, 0.0, 0.0)
        else:
            a = tl.zeros_like(col)
            b = tl.zeros_like(col)
        escaping = tl.zeros([], tl.int32)
        converged = tl.full([], 1, tl.int32)
        for row0 in range(0, n, BR):
            tile, row_mask = streamed_tile(x_ptr, k_ptr, off, n, row0, tau, col_mask, BR, BN, LOG)
            row = row_scaling(tile, col, row_mask, LOG)
            a_chunk, b_chunk = column_partials(tile, row, LOG)
            a, b = merge_column_partials(a, b, a_chunk, b_chunk, LOG)
            if not LOG:
                escaping = escaping | tl.max(any_outside(in_range(row, lo, hi), row_mask), axis=0)
            if TEST:
                # r_t again, from c_{t-1} (chunks keep no row state): P_t's row sums are r_t / r_{t+1}.
                previous = row_scaling(tile, col_prev, row_mask, LOG)
                converged = converged & tl.min(rows_converged(previous, row, row_mask, tol, LOG), axis=0)
        if TEST:
            running = (converged == 0) | (t == 0)
        new_col = column_scaling(a, b, col_mask, LOG)
        if not LOG:
            escaping = escaping | tl.max(any_outside(in_range(new_col, lo, hi), col_mask), axis=0)
        # After a successful test the pass is discarded: c_{T-1}, c_T stay.
        col_prev = tl.where(running, col, col_prev)
        col = tl.where(running, new_col, col)
        escaped = escaped | tl.where(running, escaping, 0)
        tl.store(vec + t * vec_stride, col, mask=(lanes < vec_stride) & running)
        t += running.to(tl.int32)
    zero_columns_from(vec, t, n_iter, vec_stride, tl.zeros_like(col), lanes < vec_stride)
    return col_prev, col, t, escaped


@triton.jit
def _chunked_write(
    x_ptr,
    k_ptr,
    p_ptr,
    off,
    n,
    tau,
    col_prev,
    col,
    col_mask,
    BR: tl.constexpr,
    BN: tl.constexpr,
    LOG: tl.constexpr,
):
    for row0 in range(0, n, BR):
        tile, row_mask = streamed_tile(x_ptr, k_ptr, off, n, row0, tau, col_mask, BR, BN, LOG)
        row = row_scaling(tile, col_prev, row_mask, LOG)
        ptrs, mask = element_pointers(p_ptr, off, n, row0, BR, BN)
        tl.store(ptrs, entries(tile, row, col, LOG), mask=mask)


@triton.jit(do_not_specialize=["n_iter"])
def chunked_forward_kernel(
    x_ptr,
    k_ptr,
    p_ptr,
    cols_ptr,
    domain_ptr,
    iterations_ptr,
    caps_ptr,
    meta_ptr,
    n_iter,
    vec_stride,
    tau,
    tol,
    max_spread,
    scale_lo,
    scale_hi,
    BR: tl.constexpr,
    BN: tl.constexpr,
    TEST: tl.constexpr,
    CAPPED: tl.constexpr,
):
    off, n, index = chunked_matrix(meta_ptr)
    if CAPPED:
        limit = iteration_limit(tl.load(caps_ptr + index), n_iter)
    else:
        limit = n_iter
    col_mask = tl.arange(0, BN)[None, None, :] < n
    vec = cols_ptr + index * n_iter * vec_stride + tl.arange(0, BN)[None, None, :]
    spread = tl.full([], 0.0, tl.float32)
    bad = tl.full([], 0, tl.int32)
    for row0 in range(0, n, BR):
        l0, row_mask = store_kernel_rows(x_ptr, k_ptr, off, n, row0, tau, col_mask, BR, BN)
        chunk_spread, chunk_bad = row_stats(l0, row_mask, col_mask)
        spread = tl.maximum(spread, tl.max(chunk_spread, axis=0))
        bad = bad | tl.max(chunk_bad, axis=0)
    use_log = tl.where((spread > max_spread) | (bad != 0), 1, 0)
    last = tl.zeros([], tl.int32)
    if use_log == 0:
        tl.debug_barrier()  # K, stored above, is read back by other threads
        col_prev, col, last, escaped = _chunked_iterate(
            x_ptr,
            k_ptr,
            off,
            n,
            tau,
            vec,
            vec_stride,
            n_iter,
            limit,
            tol,
            col_mask,
            scale_lo,
            scale_hi,
            BR,
            BN,
            False,
            TEST,
        )
        use_log = escaped
        if use_log == 0:
            _chunked_write(x_ptr, k_ptr, p_ptr, off, n, tau, col_prev, col, col_mask, BR, BN, False)
    if use_log != 0:
        tl.debug_barrier()  # the scaling attempt may have stored column scalings: order the rewrite
        col_prev, col, last, _ = _chunked_iterate(
            x_ptr,
            k_ptr,
            off,
            n,
            tau,
            vec,
            vec_stride,
            n_iter,
            limit,
            tol,
            col_mask,
            scale_lo,
            scale_hi,
            BR,
            BN,
            True,
            TEST,
        )
        _chunked_write(x_ptr, k_ptr, p_ptr, off, n, tau, col_prev, col, col_mask, BR, BN, True)
    tl.store(domain_ptr + index, use_log)
    tl.store(iterations_ptr + index, last)
