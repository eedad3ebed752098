"""Packed Sinkhorn kernels: ``MB`` whole matrices per program, padded to ``BN × BN`` and kept in registers
for all iterations (many matrices per program for small ``n``, one for larger ``n``). The math, the saved
state and the backward are described in :mod:`.sinkhorn`."""

import triton
import triton.language as tl

from .sinkhorn import first_column, iteration_limit, saved_column, zero_columns_from
from .sinkhorn_tiles import (
    any_outside,
    column_partials,
    column_scaling,
    element_pointers,
    entries,
    in_range,
    matrix_rows,
    row_scaling,
    row_stats,
    rows_converged,
    scaling_tile,
)


@triton.jit
def _packed_matrices(meta_ptr, num_matrices, MB: tl.constexpr):
    slot = tl.program_id(0) * MB + tl.arange(0, MB)
    live = slot < num_matrices
    off = tl.load(meta_ptr + 3 * slot, mask=live, other=0)
    n = tl.load(meta_ptr + 3 * slot + 1, mask=live, other=0).to(tl.int32)
    index = tl.load(meta_ptr + 3 * slot + 2, mask=live, other=0)
    return live, off[:, None, None], n[:, None, None], index


@triton.jit
def _column_step(tile, row, col_mask, LOG: tl.constexpr):
    """``c = 1 / (Kᵀ r)`` or ``g = -lse_i(L0 + f)`` for whole matrices."""
    a, b = column_partials(tile, row, LOG)
    return column_scaling(a, b, col_mask, LOG)


@triton.jit
def _packed_iterate(
    tile,
    vec,
    vec_stride,
    n_iter,
    limit,
    tol,
    row_mask,
    col_mask,
    store_mask,
    lo,
    hi,
    LOG: tl.constexpr,
    TEST: tl.constexpr,
    CAPPED: tl.constexpr,
):
    """Each matrix's iterations on a tile of whole matrices, up to its ``limit`` (``[MB]``, 0: none) or its
    convergence; stores every ``c_t``/``g_t`` under ``store_mask`` (0 after the matrix stopped).

    Returns P, the iterations each matrix ran (``[MB]``) and, per matrix, 1 if a scaling left ``[lo, hi]``
    (scaling domain only) else 0.
    """
    col = first_column(col_mask, LOG)
    row = tl.zeros_like(tl.sum(tile, axis=2, keep_dims=True)).to(col.dtype)
    # Range checks accumulate elementwise and are reduced once, after the loop.
    rows_inside = row == row
    cols_inside = col == col
    if TEST or CAPPED:
        done = tl.zeros_like(limit)
        t = tl.zeros([], tl.int32)
        bound = tl.max(limit, axis=0)
        while t < bound:
            new_row = row_scaling(tile, col, row_mask, LOG)
            go = (done == t) & (t < limit)  # still running: every iteration so far ran
            if TEST:
                go = go & ((rows_converged(row, new_row, row_mask, tol, LOG) == 0) | (t == 0))
            go3 = go[:, None, None]
            # A stopped matrix keeps r_T and c_T: P is formed from them after the loop.
            row = tl.where(go3, new_row, row)
            col = tl.where(go3, _column_step(tile, row, col_mask, LOG), col)
            if not LOG:
                rows_inside = rows_inside & in_range(row, lo, hi)
                cols_inside = cols_inside & in_range(col, lo, hi)
            tl.store(vec + t * vec_stride, tl.where(go3, col, 0.0), mask=store_mask)
            done += go.to(tl.int32)
            t += 1
            if TEST:
                # The program stops once all its matrices have.
                bound = tl.where(tl.max(tl.where((done == t) & (t < limit), 1, 0), axis=0) > 0, bound, t)
        zero_columns_from(vec, t, n_iter, vec_stride, tl.zeros_like(col), store_mask)
    else:
        # Every matrix runs every iteration: no masking, and a `for` loop (ptxas allocates it with fewer
        # registers than the `while` above).
        for t in range(n_iter):
            row = row_scaling(tile, col, row_mask, LOG)
            col = _column_step(tile, row, col_mask, LOG)
            if not LOG:
                rows_inside = rows_inside & in_range(row, lo, hi)
                cols_inside = cols_inside & in_range(col, lo, hi)
            tl.store(vec + t * vec_stride, col, mask=store_mask)
        done = limit
    escaped = any_outside(rows_inside, row_mask) | any_outside(cols_inside, col_mask)
    return entries(tile, row, col, LOG), done, escaped


@triton.jit(do_not_specialize=["num_matrices", "n_iter"])
def packed_forward_kernel(
    x_ptr,
    p_ptr,
    cols_ptr,
    domain_ptr,
    iterations_ptr,
    caps_ptr,
    meta_ptr,
    num_matrices,
    n_iter,
    vec_stride,
    tau,
    tol,
    max_spread,
    scale_lo,
    scale_hi,
    MB: tl.constexpr,
    BN: tl.constexpr,
    TEST: tl.constexpr,
    CAPPED: tl.constexpr,
):
    live, off, n, index = _packed_matrices(meta_ptr, num_matrices, MB)
    if CAPPED:
        limit = tl.where(live, iteration_limit(tl.load(caps_ptr + index, mask=live, other=1), n_iter), 0)
    else:
        limit = tl.where(live, n_iter, 0)
    l0, row_mask, col_mask = matrix_rows(x_ptr, off, n, 0, tau, BN, BN)
    spread, bad = row_stats(l0, row_mask, col_mask)
    vec = cols_ptr + index[:, None, None] * n_iter * vec_stride + tl.arange(0, BN)[None, None, :]
    live3 = live[:, None, None]
    # Every saved entry up to vec_stride is written (padded columns as 0): no uninitialised output.
    store_mask = (tl.arange(0, BN)[None, None, :] < vec_stride) & live3
    kernel = scaling_tile(l0, row_mask, col_mask)
    p, done, escaped = _packed_iterate(
        kernel,
        vec,
        vec_stride,
        n_iter,
        limit,
        tol,
        row_mask,
        col_mask,
        store_mask,
        scale_lo,
        scale_hi,
        False,
        TEST,
        CAPPED,
    )
    use_log = (spread > max_spread) | (bad != 0) | (escaped != 0)
    log3 = use_log[:, None, None]
    p_ptrs, mask = element_pointers(p_ptr, off, n, 0, BN, BN)
    tl.store(p_ptrs, p, mask=mask & live3 & (~log3))
    tl.store(domain_ptr + index, tl.where(use_log, 1, 0), mask=live)
    tl.store(iterations_ptr + index, done, mask=live & (~use_log))
    if tl.max(tl.where(live & use_log, 1, 0), axis=0) > 0:
        # Some matrix of this program needs the log domain; its column scalings are stored again, after the
        # scaling attempt's. L0 is loaded again rather than kept in registers through the common case.
        tl.debug_barrier()
        logits, _rows, _cols = matrix_rows(x_ptr, off, n, 0, tau, BN, BN)
        p_log, done_log, _escaped = _packed_iterate(
            logits,
            vec,
            vec_stride,
            n_iter,
            tl.where(use_log, limit, 0),
            tol,
            row_mask,
            col_mask,
            store_mask & log3,
            scale_lo,
            scale_hi,
            True,
            TEST,
            CAPPED,
        )
        tl.store(p_ptrs, p_log, mask=mask & live3 & log3)
        tl.store(iterations_ptr + index, done_log, mask=live & use_log)


@triton.jit
def _packed_backward_tile(tile, grad, vec, vec_stride, last, row_mask, col_mask, LOG: tl.constexpr):
    """``tau · Θ̄`` for a tile of whole matrices that ran ``last`` (``[MB]``) iterations each, row vectors
    carried across the reverse iterations."""
    last3 = last[:, None, None]
    c_last = saved_column(vec, last3, vec_stride, col_mask, LOG)
    c_prev = saved_column(vec, last3 - 1, vec_stride, col_mask, LOG)
    row = row_scaling(tile, c_prev, row_mask, LOG)
    p = entries(tile, row, c_last, LOG)
    g_bar = tl.sum(grad * p, axis=1, keep_dims=True)
    adj = p * (grad - g_bar)
    f_bar = tl.sum(adj, axis=2, keep_dims=True)
    for s in range(tl.max(last, axis=0) - 1):
        t = last3 - s  # row step t, then column step t - 1, of each matrix
        # A matrix with t < 2 is done: its f̄ is masked to 0, so both steps add nothing, and its scalings stay
        # r_1 and c_0 (saved_column gives c_0 for t - 2 < 1), all finite.
        step = entries(tile, row, c_prev, LOG) * tl.where(t >= 2, f_bar, 0.0)  # A_t ⊙ f̄_t 1ᵀ
        adj -= step
        g_bar = -tl.sum(step, axis=1, keep_dims=True)
        c_before = saved_column(vec, t - 2, vec_stride, col_mask, LOG)
        row = row_scaling(tile, c_before, row_mask, LOG)
        step = entries(tile, row, c_prev, LOG) * g_bar  # B_{t-1} ⊙ 1ḡ_{t-1}ᵀ
        adj -= step
        f_bar = -tl.sum(step, axis=2, keep_dims=True)
        c_prev = c_before
    first = entries(tile, row, c_prev, LOG)  # A_1
    return adj - first * tl.sum(adj, axis=2, keep_dims=True)


@triton.jit(do_not_specialize=["num_matrices", "n_iter"])
def packed_backward_kernel(
    grad_ptr,
    x_ptr,
    cols_ptr,
    domain_ptr,
    iterations_ptr,
    meta_ptr,
    out_ptr,
    num_matrices,
    n_iter,
    vec_stride,
    tau,
    MB: tl.constexpr,
    BN: tl.constexpr,
):
    live, off, n, index = _packed_matrices(meta_ptr, num_matrices, MB)
    l0, row_mask, col_mask = matrix_rows(x_ptr, off, n, 0, tau, BN, BN)
    grad_ptrs, mask = element_pointers(grad_ptr, off, n, 0, BN, BN)
    vec = cols_ptr + index[:, None, None] * n_iter * vec_stride + tl.arange(0, BN)[None, None, :]
    use_log = tl.load(domain_ptr + index, mask=live, other=0) != 0
    last = tl.minimum(tl.load(iterations_ptr + index, mask=live, other=1), n_iter)  # reads stay in cols
    log3 = use_log[:, None, None]
    live3 = live[:, None, None]
    out_ptrs, _ = element_pointers(out_ptr, off, n, 0, BN, BN)
    kernel = scaling_tile(l0, row_mask, col_mask)
    grad = tl.load(grad_ptrs, mask=mask & (~log3), other=0.0).to(tl.float32)
    # Each pass loops as long as its own matrices need (the others count as one iteration).
    out = _packed_backward_tile(
        kernel, grad, vec, vec_stride, tl.where(use_log, 1, last), row_mask, col_mask, False
    )
    tl.store(out_ptrs, tl.math.div_rn(out, tau), mask=mask & live3 & (~log3))
    if tl.max(tl.where(use_log, 1, 0), axis=0) > 0:
        logits, _rows, _cols = matrix_rows(x_ptr, off, n, 0, tau, BN, BN)
        grad_log = tl.load(grad_ptrs, mask=mask & log3, other=0.0).to(tl.float32)
        out_log = _packed_backward_tile(
            logits, grad_log, vec, vec_stride, tl.where(use_log, last, 1), row_mask, col_mask, True
        )
        tl.store(out_ptrs, tl.math.div_rn(out_log, tau), mask=mask & live3 & log3)
