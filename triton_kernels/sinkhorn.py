"""Fused Sinkhorn kernels: all ``T`` iterations (forward) or the whole exact backward in one launch.

Matrices of any sizes share a launch ("ragged"): they lie in one flat buffer, and ``meta [M, 2]`` (int64)
gives each matrix's element offset and size ``n``. Two layouts of the work:

* **packed** (``packed_*_kernel``): ``MB`` whole matrices per program, padded to ``BN × BN``, kept in
  registers for all iterations: many matrices per program for small ``n``, one for larger ``n``;
* **chunked** (``chunked_*_kernel``): one program per matrix, for ``n`` whose matrix does not fit a program's
  registers: ``K`` is written once to a scratch copy (laid out as the logits), and every pass streams it in
  chunks of ``BR`` rows (from L1/L2: 150 KB for n = 196); row quantities are recomputed chunk by chunk.

Iterations (method.md §2, rows then columns): ``c_0 = 1``, ``r_t = 1 / (K c_{t-1})``,
``c_t = 1 / (Kᵀ r_t)``, ``P = diag(r_T) K diag(c_T)`` with ``K = exp(L0 - rowmax)``, in float32 whatever the
input dtype. A matrix whose logits spread more than ``max_spread`` within a row, with a non-finite logit, or
whose scalings leave ``[scale_lo, scale_hi]`` is iterated in the log domain instead (see
:mod:`.sinkhorn_tiles`); ``domain[m]`` records which (0: scaling, 1: log).

The forward saves the column scalings of every iteration, ``cols [M, T, vec_stride]`` (``c_t``, or ``g_t`` in
the log domain; float64, see :mod:`.sinkhorn_tiles`), and not the row scalings: the backward recomputes
``r_t = 1 / (K c_{t-1})`` from them in the same pass over ``K`` that needs it, which halves what is saved and
costs one matrix-vector product per step (the backward's cost is O(T n²) either way).

Backward (kernels.md §3, written as the adjoint of the log-domain steps, which is the same VJP): with
``A_t = entries(r_t, c_{t-1})`` (after row step t) and ``B_t = entries(r_t, c_t)`` (after column step t),
``ḡ_T = colsum(Ḡ ⊙ P)``, ``f̄_T = rowsum(P ⊙ (Ḡ - 1ḡ_Tᵀ))``, then for ``t = T..2``:
``ḡ_{t-1} = -A_tᵀ f̄_t``, ``f̄_{t-1} = -B_{t-1} ḡ_{t-1}``, and
``M' = P ⊙ (Ḡ - 1ḡ_Tᵀ) - Σ_{t<T} B_t ⊙ 1ḡ_tᵀ - Σ_{t≥2} A_t ⊙ f̄_t 1ᵀ``,
``Θ̄ = (M' - A_1 ⊙ rowsum(M') 1ᵀ) / tau``. The first and last steps are formed entry by entry (the last with
the actual row sums of ``M'``), which keeps tiny gradients of saturated matrices accurate. The row-max shift
has zero gradient (P does not change when a row of logits is shifted).
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
    scaling_tile,
)

# ------------------------------------------------------------------------------------------------------------
# Packed: MB whole matrices per program.


@triton.jit
def _packed_matrices(meta_ptr, num_matrices, MB: tl.constexpr):
    mat = tl.program_id(0) * MB + tl.arange(0, MB)
    live = mat < num_matrices
    off = tl.load(meta_ptr + 2 * mat, mask=live, other=0)
    n = tl.load(meta_ptr + 2 * mat + 1, mask=live, other=0).to(tl.int32)
    return mat, live, off[:, None, None], n[:, None, None]


@triton.jit
def _packed_iterate(tile, vec, vec_stride, n_iter, row_mask, col_mask, store_mask, lo, hi, LOG: tl.constexpr):
    """All iterations on a tile of whole matrices; stores each ``c_t``/``g_t`` under ``store_mask``.

    Returns P and, per matrix, 1 if a scaling left ``[lo, hi]`` (scaling domain only) else 0.
    """
    col = first_column(col_mask, LOG)
    row = tl.zeros_like(tl.sum(tile, axis=2, keep_dims=True)).to(col.dtype)
    # Range checks accumulate elementwise and are reduced once, after the loop.
    rows_inside = row == row
    cols_inside = col == col
    for t in range(n_iter):
        row = row_scaling(tile, col, row_mask, LOG)
        a, b = column_partials(tile, row, LOG)
        col = column_scaling(a, b, col_mask, LOG)
        if not LOG:
            rows_inside = rows_inside & in_range(row, lo, hi)
            cols_inside = cols_inside & in_range(col, lo, hi)
        tl.store(vec + t * vec_stride, col, mask=store_mask)
    escaped = any_outside(rows_inside, row_mask) | any_outside(cols_inside, col_mask)
    return entries(tile, row, col, LOG), escaped


@triton.jit
def packed_forward_kernel(
    x_ptr,
    p_ptr,
    cols_ptr,
    domain_ptr,
    meta_ptr,
    num_matrices,
    n_iter,
    vec_stride,
    tau,
    max_spread,
    scale_lo,
    scale_hi,
    MB: tl.constexpr,
    BN: tl.constexpr,
):
    mat, live, off, n = _packed_matrices(meta_ptr, num_matrices, MB)
    l0, row_mask, col_mask = matrix_rows(x_ptr, off, n, 0, tau, BN, BN)
    spread, bad = row_stats(l0, row_mask, col_mask)
    vec = cols_ptr + mat[:, None, None].to(tl.int64) * n_iter * vec_stride + tl.arange(0, BN)[None, None, :]
    live3 = live[:, None, None]
    # Every saved entry up to vec_stride is written (padded columns as 0): no uninitialised output.
    store_mask = (tl.arange(0, BN)[None, None, :] < vec_stride) & live3
    kernel = scaling_tile(l0, row_mask, col_mask)
    p, escaped = _packed_iterate(
        kernel, vec, vec_stride, n_iter, row_mask, col_mask, store_mask, scale_lo, scale_hi, False
    )
    use_log = (spread > max_spread) | (bad != 0) | (escaped != 0)
    log3 = use_log[:, None, None]
    p_ptrs, mask = element_pointers(p_ptr, off, n, 0, BN, BN)
    tl.store(p_ptrs, p, mask=mask & live3 & (~log3))
    tl.store(domain_ptr + mat, tl.where(use_log, 1, 0), mask=live)
    if tl.max(tl.where(live & use_log, 1, 0), axis=0) > 0:
        # Some matrix of this program needs the log domain; its column scalings are stored again, after the
        # scaling attempt's. L0 is loaded again rather than kept in registers through the common case.
        tl.debug_barrier()
        logits, _rows, _cols = matrix_rows(x_ptr, off, n, 0, tau, BN, BN)
        p_log, _escaped = _packed_iterate(
            logits, vec, vec_stride, n_iter, row_mask, col_mask, store_mask & log3, scale_lo, scale_hi, True
        )
        tl.store(p_ptrs, p_log, mask=mask & live3 & log3)


@triton.jit
def first_column(col_mask, LOG: tl.constexpr):
    """``c_0 = 1`` (float32) or ``g_0 = 0`` (float64), 0 on padded columns."""
    if LOG:
        return tl.where(col_mask, 0.0, 0.0).to(tl.float64)
    else:
        return tl.where(col_mask, 1.0, 0.0)


@triton.jit
def saved_column(vec, t, vec_stride, col_mask, LOG: tl.constexpr):
    """``c_t`` / ``g_t`` for ``t >= 0`` from the saved ``cols`` (float64; ``c_t`` were float32 values)."""
    saved = tl.load(vec + (t - 1) * vec_stride, mask=col_mask & (t >= 1), other=0.0)
    first = first_column(col_mask, LOG)
    if LOG:
        return tl.where(t >= 1, saved, first)
    else:
        return tl.where(t >= 1, saved.to(tl.float32), first)


@triton.jit
def _packed_backward_tile(tile, grad, vec, vec_stride, n_iter, row_mask, col_mask, LOG: tl.constexpr):
    """``tau · Θ̄`` for a tile of whole matrices, row vectors carried across the reverse iterations."""
    c_last = saved_column(vec, n_iter, vec_stride, col_mask, LOG)
    c_prev = saved_column(vec, n_iter - 1, vec_stride, col_mask, LOG)
    row = row_scaling(tile, c_prev, row_mask, LOG)
    p = entries(tile, row, c_last, LOG)
    g_bar = tl.sum(grad * p, axis=1, keep_dims=True)
    adj = p * (grad - g_bar)
    f_bar = tl.sum(adj, axis=2, keep_dims=True)
    for s in range(n_iter - 1):
        t = n_iter - s  # row step t, then column step t - 1
        step = entries(tile, row, c_prev, LOG) * f_bar  # A_t ⊙ f̄_t 1ᵀ
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
    meta_ptr,
    out_ptr,
    num_matrices,
    n_iter,
    vec_stride,
    tau,
    MB: tl.constexpr,
    BN: tl.constexpr,
):
    mat, live, off, n = _packed_matrices(meta_ptr, num_matrices, MB)
    l0, row_mask, col_mask = matrix_rows(x_ptr, off, n, 0, tau, BN, BN)
    grad_ptrs, mask = element_pointers(grad_ptr, off, n, 0, BN, BN)
    vec = cols_ptr + mat[:, None, None].to(tl.int64) * n_iter * vec_stride + tl.arange(0, BN)[None, None, :]
    use_log = tl.load(domain_ptr + mat, mask=live, other=0) != 0
    log3 = use_log[:, None, None]
    live3 = live[:, None, None]
    out_ptrs, _ = element_pointers(out_ptr, off, n, 0, BN, BN)
    kernel = scaling_tile(l0, row_mask, col_mask)
    grad = tl.load(grad_ptrs, mask=mask & (~log3), other=0.0).to(tl.float32)
    out = _packed_backward_tile(kernel, grad, vec, vec_stride, n_iter, row_mask, col_mask, False)
    tl.store(out_ptrs, tl.math.div_rn(out, tau), mask=mask & live3 & (~log3))
    if tl.max(tl.where(use_log, 1, 0), axis=0) > 0:
        logits, _rows, _cols = matrix_rows(x_ptr, off, n, 0, tau, BN, BN)
        grad_log = tl.load(grad_ptrs, mask=mask & log3, other=0.0).to(tl.float32)
        out_log = _packed_backward_tile(logits, grad_log, vec, vec_stride, n_iter, row_mask, col_mask, True)
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
    mat = tl.program_id(0)
    off = tl.load(meta_ptr + 2 * mat)
    n = tl.load(meta_ptr + 2 * mat + 1).to(tl.int32)
    return mat, off, n


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
    col_mask,
    lo,
    hi,
    BR: tl.constexpr,
    BN: tl.constexpr,
    LOG: tl.constexpr,
):
    """All iterations, one pass over the row chunks per iteration; stores every ``c_t``/``g_t``.

    Returns the last two column scalings and 1 if a scaling left ``[lo, hi]`` (scaling domain) else 0.
    """
    col = first_column(col_mask, LOG)
    col_prev = col
    escaped = tl.max(tl.max(tl.zeros_like(col).to(tl.int32), axis=2), axis=1)
    for t in range(n_iter):
        if LOG:
            a = tl.where(col_mask, float("-inf"), float("-inf")).to(tl.float64)
            b = tl.where(col_mask, 0.0, 0.0)
        else:
            a = tl.zeros_like(col)
            b = tl.zeros_like(col)
        for row0 in range(0, n, BR):
            tile, row_mask = streamed_tile(x_ptr, k_ptr, off, n, row0, tau, col_mask, BR, BN, LOG)
            row = row_scaling(tile, col, row_mask, LOG)
            a_chunk, b_chunk = column_partials(tile, row, LOG)
            a, b = merge_column_partials(a, b, a_chunk, b_chunk, LOG)
            if not LOG:
                escaped = escaped | any_outside(in_range(row, lo, hi), row_mask)
        col_prev = col
        col = column_scaling(a, b, col_mask, LOG)
        if not LOG:
            escaped = escaped | any_outside(in_range(col, lo, hi), col_mask)
        tl.store(vec + t * vec_stride, col, mask=tl.arange(0, BN)[None, None, :] < vec_stride)
    return col_prev, col, escaped


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
    meta_ptr,
    n_iter,
    vec_stride,
    tau,
    max_spread,
    scale_lo,
    scale_hi,
    BR: tl.constexpr,
    BN: tl.constexpr,
):
    mat, off, n = _chunked_matrix(meta_ptr)
    col_mask = tl.arange(0, BN)[None, None, :] < n
    vec = cols_ptr + mat.to(tl.int64) * n_iter * vec_stride + tl.arange(0, BN)[None, None, :]
    spread = tl.full([], 0.0, tl.float32)
    bad = tl.full([], 0, tl.int32)
    for row0 in range(0, n, BR):
        l0, row_mask = store_kernel_rows(x_ptr, k_ptr, off, n, row0, tau, col_mask, BR, BN)
        chunk_spread, chunk_bad = row_stats(l0, row_mask, col_mask)
        spread = tl.maximum(spread, tl.max(chunk_spread, axis=0))
        bad = bad | tl.max(chunk_bad, axis=0)
    use_log = tl.where((spread > max_spread) | (bad != 0), 1, 0)
    if use_log == 0:
        tl.debug_barrier()  # K, stored above, is read back by other threads
        col_prev, col, escaped = _chunked_iterate(
            x_ptr, k_ptr, off, n, tau, vec, vec_stride, n_iter, col_mask, scale_lo, scale_hi, BR, BN, False
        )
        use_log = tl.max(escaped, axis=0)
        if use_log == 0:
            _chunked_write(x_ptr, k_ptr, p_ptr, off, n, tau, col_prev, col, col_mask, BR, BN, False)
    if use_log != 0:
        tl.debug_barrier()  # the scaling attempt may have stored column scalings: order the rewrite
        col_prev, col, _ = _chunked_iterate(
            x_ptr, k_ptr, off, n, tau, vec, vec_stride, n_iter, col_mask, scale_lo, scale_hi, BR, BN, True
        )
        _chunked_write(x_ptr, k_ptr, p_ptr, off, n, tau, col_prev, col, col_mask, BR, BN, True)
    tl.store(domain_ptr + mat, use_log)


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
    n_iter,
    col_mask,
    BR: tl.constexpr,
    BN: tl.constexpr,
    LOG: tl.constexpr,
):
    """What the rows ``row0 + [0, BR)`` add to ``ḡ_T = colsum(Ḡ ⊙ P)``."""
    c_last = saved_column(vec, n_iter, vec_stride, col_mask, LOG)
    c_prev = saved_column(vec, n_iter - 1, vec_stride, col_mask, LOG)
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
    n_iter,
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
    grad = tl.load(ptrs, mask=mask & (t == n_iter), other=0.0).to(tl.float32)
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
    n_iter,
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
    for s in range(n_iter):
        t = n_iter - s
        c_t = saved_column(vec, t, vec_stride, col_mask, LOG)
        c_prev = saved_column(vec, t - 1, vec_stride, col_mask, LOG)
        saved_bar = tl.load(bars + (t - 1) * vec_stride, mask=col_mask & (t >= 2), other=0.0)
        g_bar = tl.where(t >= 2, saved_bar, g_first)
        row = row_scaling(tile, c_prev, row_mask, LOG)
        last = tl.where(t == n_iter, 1.0, 0.0)
        # Column step t: P ⊙ (Ḡ - 1ḡ_Tᵀ) for t = T, -B_t ⊙ 1ḡ_tᵀ before.
        step = entries(tile, row, c_t, LOG) * (grad * last - g_bar)
        adj += step
        f_bar = tl.sum(step, axis=2, keep_dims=True)
        # Row step t >= 2: -A_t ⊙ f̄_t 1ᵀ (row step 1 is formed from rowsum(M') below).
        adj -= entries(tile, row, c_prev, LOG) * (f_bar * tl.where(t >= 2, 1.0, 0.0))
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
    n_iter,
    col_mask,
    BR: tl.constexpr,
    BN: tl.constexpr,
    LOG: tl.constexpr,
):
    """The backward of one matrix: a pass over the row chunks per reverse iteration for the column adjoints
    ``ḡ_t`` (kept in ``bars``), then one pass that forms ``Θ̄`` chunk by chunk."""
    if not LOG:
        for row0 in range(0, n, BR):
            store_kernel_rows(x_ptr, k_ptr, off, n, row0, tau, col_mask, BR, BN)
        tl.debug_barrier()  # K is read back by other threads
    g_bar = tl.zeros_like(tl.where(col_mask, 0.0, 0.0))
    for row0 in range(0, n, BR):
        g_bar += last_column_adjoint_rows(
            grad_ptr, x_ptr, k_ptr, off, n, row0, tau, vec, vec_stride, n_iter, col_mask, BR, BN, LOG
        )
    for s in range(n_iter - 1):
        t = n_iter - s  # from ḡ_t to ḡ_{t-1}
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
                n_iter,
                t,
                g_bar,
                col_mask,
                BR,
                BN,
                LOG,
            )
        g_bar = -total
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
            n_iter,
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
    meta_ptr,
    out_ptr,
    bars_ptr,
    n_iter,
    vec_stride,
    tau,
    BR: tl.constexpr,
    BN: tl.constexpr,
):
    mat, off, n = _chunked_matrix(meta_ptr)
    col_mask = tl.arange(0, BN)[None, None, :] < n
    base = mat.to(tl.int64) * n_iter * vec_stride + tl.arange(0, BN)[None, None, :]
    if tl.load(domain_ptr + mat) != 0:
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
            n_iter,
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
            n_iter,
            col_mask,
            BR,
            BN,
            False,
        )
