"""Fused Sinkhorn kernels: all iterations (forward) or the whole exact backward in one launch.

Matrices of any sizes share a launch ("ragged"): they lie in one flat buffer, and ``meta [M', 3]`` (int64)
gives each matrix's element offset, size ``n`` and index ``m`` in the outputs (a launch may serve only some of
the matrices of a call). Two layouts of the work:

* **packed** (``packed_*_kernel``): ``MB`` whole matrices per program, padded to ``BN × BN``, kept in
  registers for all iterations: many matrices per program for small ``n``, one for larger ``n``;
* **chunked** (``chunked_*_kernel``): one program per matrix, for ``n`` whose matrix does not fit a program's
  registers: ``K`` is written once to a scratch copy (laid out as the logits), and every pass streams it in
  chunks of ``BR`` rows (from L1/L2: 150 KB for n = 196); row quantities are recomputed chunk by chunk.

Iterations (method.md §2, rows then columns): ``c_0 = 1``, ``r_t = 1 / (K c_{t-1})``,
``c_t = 1 / (Kᵀ r_t)``, ``P_t = diag(r_t) K diag(c_t)`` with ``K = exp(L0 - rowmax)``, in float32 whatever the
input dtype. A matrix whose logits spread more than ``max_spread`` within a row, with a non-finite logit, or
whose scalings leave ``[scale_lo, scale_hi]`` is iterated in the log domain instead (see
:mod:`.sinkhorn_tiles`); ``domain[m]`` records which (0: scaling, 1: log).

Each matrix stops on its own, decided on the device: it runs at most ``limit_m`` iterations (``caps[m]``
with ``CAPPED``, else ``n_iter``), and with ``TEST`` (a tolerance ``tol > 0``) stops at the first ``t`` whose
iterate ``P_t`` has every row sum within ``tol`` of 1. Those row sums come from the row step of iteration
``t + 1`` (``r_t / r_{t+1}``, :func:`.sinkhorn_tiles.rows_converged`), which is then discarded.
``iterations[m]`` records the ``T_m`` iterations run. A packed program loops until all its matrices have
stopped, the stopped ones masked.

The forward saves the column scalings of every iteration, ``cols [M, n_iter, vec_stride]`` (``c_t``, or
``g_t`` in the log domain; float64, see :mod:`.sinkhorn_tiles`; 0 for ``t > T_m``), and not the row scalings:
the backward recomputes ``r_t = 1 / (K c_{t-1})`` from them in the same pass over ``K`` that needs it, which
halves what is saved and costs one matrix-vector product per step (the backward's cost is O(T n²) either way).

Backward (kernels.md §3, written as the adjoint of the log-domain steps, which is the same VJP), ``T = T_m``
per matrix: with ``A_t = entries(r_t, c_{t-1})`` (after row step t) and ``B_t = entries(r_t, c_t)`` (after
column step t), ``ḡ_T = colsum(Ḡ ⊙ P)``, ``f̄_T = rowsum(P ⊙ (Ḡ - 1ḡ_Tᵀ))``, then for ``t = T..2``:
``ḡ_{t-1} = -A_tᵀ f̄_t``, ``f̄_{t-1} = -B_{t-1} ḡ_{t-1}``, and
``M' = P ⊙ (Ḡ - 1ḡ_Tᵀ) - Σ_{t<T} B_t ⊙ 1ḡ_tᵀ - Σ_{t≥2} A_t ⊙ f̄_t 1ᵀ``,
``Θ̄ = (M' - A_1 ⊙ rowsum(M') 1ᵀ) / tau``. The first and last steps are formed entry by entry (the last with
the actual row sums of ``M'``), which keeps tiny gradients of saturated matrices accurate. The row-max shift
has zero gradient (P does not change when a row of logits is shifted).

Loops over iterations are ``while`` loops where they may end early (the packed early-exit loop ends once all
its program's matrices have stopped) or run one matrix's count (chunked), and ``for`` loops over a run-time
range in the packed kernels otherwise, which ptxas allocates with fewer registers there (Triton 3.6's
interpreter cannot take a run-time ``range`` under numpy 2.4).
"""

import triton
import triton.language as tl

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

# ------------------------------------------------------------------------------------------------------------
# Shared by the layouts.


@triton.jit
def first_column(col_mask, LOG: tl.constexpr):
    """``c_0 = 1`` (float32) or ``g_0 = 0`` (float64), 0 on padded columns."""
    if LOG:
        return tl.where(col_mask, 0.0, 0.0).to(tl.float64)
    else:
        return tl.where(col_mask, 1.0, 0.0)


@triton.jit
def saved_column(vec, t, vec_stride, col_mask, LOG: tl.constexpr):
    """``c_t`` / ``g_t`` for ``t >= 0`` (``c_0`` for ``t < 1``) from the saved ``cols`` (float64; ``c_t`` were
    float32 values); ``t`` may be per matrix (``[MB, 1, 1]``)."""
    saved = tl.load(vec + (t - 1) * vec_stride, mask=col_mask & (t >= 1), other=0.0)
    first = first_column(col_mask, LOG)
    if LOG:
        return tl.where(t >= 1, saved, first)
    else:
        return tl.where(t >= 1, saved.to(tl.float32), first)


@triton.jit
def zero_columns_from(vec, t, n_iter, vec_stride, zero, mask):
    """Store ``zero`` as the saved scalings of iterations ``t + 1 .. n_iter`` (those no matrix here ran)."""
    while t < n_iter:
        tl.store(vec + t * vec_stride, zero, mask=mask)
        t += 1


# ------------------------------------------------------------------------------------------------------------
# Packed: MB whole matrices per program.


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


@triton.jit
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
        limit = tl.minimum(tl.load(caps_ptr + index, mask=live, other=0), n_iter)  # never past cols' end
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


@triton.jit
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


# ------------------------------------------------------------------------------------------------------------
# Chunked: one matrix per program, rows streamed in chunks of BR.


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
def _chunked_matrix(meta_ptr):
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


@triton.jit
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
    off, n, index = _chunked_matrix(meta_ptr)
    if CAPPED:
        limit = tl.minimum(tl.load(caps_ptr + index), n_iter)  # never past cols' end
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


@triton.jit
def last_column_adjoint_rows(
    grad_ptr,
    x_ptr,
    k_ptr,
    off,
    n,
    row0,
    tau,
    vec,
    vec_stride,
    last,
    col_mask,
    BR: tl.constexpr,
    BN: tl.constexpr,
    LOG: tl.constexpr,
):
    """What the rows ``row0 + [0, BR)`` add to ``ḡ_T = colsum(Ḡ ⊙ P)`` (``T = last``)."""
    c_last = saved_column(vec, last, vec_stride, col_mask, LOG)
    c_prev = saved_column(vec, last - 1, vec_stride, col_mask, LOG)
    tile, row_mask = streamed_tile(x_ptr, k_ptr, off, n, row0, tau, col_mask, BR, BN, LOG)
    ptrs, mask = element_pointers(grad_ptr, off, n, row0, BR, BN)
    grad = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    row = row_scaling(tile, c_prev, row_mask, LOG)
    return tl.sum(grad * entries(tile, row, c_last, LOG), axis=1, keep_dims=True)


@triton.jit
def column_adjoint_rows(
    grad_ptr,
    x_ptr,
    k_ptr,
    off,
    n,
    row0,
    tau,
    vec,
    vec_stride,
    last,
    t,
    g_bar,
    col_mask,
    BR: tl.constexpr,
    BN: tl.constexpr,
    LOG: tl.constexpr,
):
    """What the rows ``row0 + [0, BR)`` add to ``A_tᵀ f̄_t`` (``= -ḡ_{t-1}``), given ``g_bar = ḡ_t``."""
    c_t = saved_column(vec, t, vec_stride, col_mask, LOG)
    c_prev = saved_column(vec, t - 1, vec_stride, col_mask, LOG)
    tile, row_mask = streamed_tile(x_ptr, k_ptr, off, n, row0, tau, col_mask, BR, BN, LOG)
    ptrs, mask = element_pointers(grad_ptr, off, n, row0, BR, BN)
    # Ḡ only enters f̄_T: masked off (never read) for t < T.
    grad = tl.load(ptrs, mask=mask & (t == last), other=0.0).to(tl.float32)
    row = row_scaling(tile, c_prev, row_mask, LOG)
    f_bar = tl.sum(entries(tile, row, c_t, LOG) * (grad - g_bar), axis=2, keep_dims=True)
    return tl.sum(entries(tile, row, c_prev, LOG) * f_bar, axis=1, keep_dims=True)


@triton.jit
def gradient_rows(
    grad_ptr,
    x_ptr,
    k_ptr,
    out_ptr,
    off,
    n,
    row0,
    tau,
    vec,
    bars,
    vec_stride,
    last,
    g_first,
    col_mask,
    BR: tl.constexpr,
    BN: tl.constexpr,
    LOG: tl.constexpr,
):
    """``Θ̄`` for the rows ``row0 + [0, BR)`` from the column adjoints ``ḡ_t`` (``bars`` for t >= 2,
    ``g_first`` for t = 1); every row quantity is recomputed here, chunk-locally."""
    tile, row_mask = streamed_tile(x_ptr, k_ptr, off, n, row0, tau, col_mask, BR, BN, LOG)
    ptrs, mask = element_pointers(grad_ptr, off, n, row0, BR, BN)
    grad = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    adj = tl.zeros_like(tile).to(tl.float32)
    c_prev = first_column(col_mask, LOG)
    row = tl.zeros_like(tl.sum(tile, axis=2, keep_dims=True)).to(c_prev.dtype)
    t = last
    while t >= 1:
        c_t = saved_column(vec, t, vec_stride, col_mask, LOG)
        c_prev = saved_column(vec, t - 1, vec_stride, col_mask, LOG)
        saved_bar = tl.load(bars + (t - 1) * vec_stride, mask=col_mask & (t >= 2), other=0.0)
        g_bar = tl.where(t >= 2, saved_bar, g_first)
        row = row_scaling(tile, c_prev, row_mask, LOG)
        final = tl.where(t == last, 1.0, 0.0)
        # Column step t: P ⊙ (Ḡ - 1ḡ_Tᵀ) for t = T, -B_t ⊙ 1ḡ_tᵀ before.
        step = entries(tile, row, c_t, LOG) * (grad * final - g_bar)
        adj += step
        f_bar = tl.sum(step, axis=2, keep_dims=True)
        # Row step t >= 2: -A_t ⊙ f̄_t 1ᵀ (row step 1 is formed from rowsum(M') below).
        adj -= entries(tile, row, c_prev, LOG) * (f_bar * tl.where(t >= 2, 1.0, 0.0))
        t -= 1
    first = entries(tile, row, c_prev, LOG)  # A_1
    out = adj - first * tl.sum(adj, axis=2, keep_dims=True)
    ptrs, mask = element_pointers(out_ptr, off, n, row0, BR, BN)
    tl.store(ptrs, tl.math.div_rn(out, tau), mask=mask)


@triton.jit
def _chunked_backward(
    grad_ptr,
    x_ptr,
    k_ptr,
    out_ptr,
    off,
    n,
    tau,
    vec,
    bars,
    vec_stride,
    last,
    col_mask,
    BR: tl.constexpr,
    BN: tl.constexpr,
    LOG: tl.constexpr,
):
    """The backward of one matrix that ran ``last`` iterations: a pass over the row chunks per reverse
    iteration for the column adjoints ``ḡ_t`` (kept in ``bars``), then one pass that forms ``Θ̄`` chunk by
    chunk."""
    if not LOG:
        for row0 in range(0, n, BR):
            store_kernel_rows(x_ptr, k_ptr, off, n, row0, tau, col_mask, BR, BN)
        tl.debug_barrier()  # K is read back by other threads
    g_bar = tl.zeros_like(tl.where(col_mask, 0.0, 0.0))
    for row0 in range(0, n, BR):
        g_bar += last_column_adjoint_rows(
            grad_ptr, x_ptr, k_ptr, off, n, row0, tau, vec, vec_stride, last, col_mask, BR, BN, LOG
        )
    t = last
    while t >= 2:  # from ḡ_t to ḡ_{t-1}
        tl.store(bars + (t - 1) * vec_stride, g_bar, mask=col_mask)
        total = tl.zeros_like(g_bar)
        for row0 in range(0, n, BR):
            total += column_adjoint_rows(
                grad_ptr,
                x_ptr,
                k_ptr,
                off,
                n,
                row0,
                tau,
                vec,
                vec_stride,
                last,
                t,
                g_bar,
                col_mask,
                BR,
                BN,
                LOG,
            )
        g_bar = -total
        t -= 1
    tl.debug_barrier()  # the ḡ_t stored above are read back below
    for row0 in range(0, n, BR):
        gradient_rows(
            grad_ptr,
            x_ptr,
            k_ptr,
            out_ptr,
            off,
            n,
            row0,
            tau,
            vec,
            bars,
            vec_stride,
            last,
            g_bar,
            col_mask,
            BR,
            BN,
            LOG,
        )


@triton.jit
def chunked_backward_kernel(
    grad_ptr,
    x_ptr,
    k_ptr,
    cols_ptr,
    domain_ptr,
    iterations_ptr,
    meta_ptr,
    out_ptr,
    bars_ptr,
    n_iter,
    vec_stride,
    tau,
    BR: tl.constexpr,
    BN: tl.constexpr,
):
    off, n, index = _chunked_matrix(meta_ptr)
    col_mask = tl.arange(0, BN)[None, None, :] < n
    base = index * n_iter * vec_stride + tl.arange(0, BN)[None, None, :]
    last = tl.minimum(tl.load(iterations_ptr + index), n_iter)  # reads stay in cols
    if tl.load(domain_ptr + index) != 0:
        _chunked_backward(
            grad_ptr,
            x_ptr,
            k_ptr,
            out_ptr,
            off,
            n,
            tau,
            cols_ptr + base,
            bars_ptr + base,
            vec_stride,
            last,
            col_mask,
            BR,
            BN,
            True,
        )
    else:
        _chunked_backward(
            grad_ptr,
            x_ptr,
            k_ptr,
            out_ptr,
            off,
            n,
            tau,
            cols_ptr + base,
            bars_ptr + base,
            vec_stride,
            last,
            col_mask,
            BR,
            BN,
            False,
        )
