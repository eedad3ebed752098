"""Chunked Sinkhorn backward: one program per matrix, the exact VJP of the iterations it ran (see
:mod:`.sinkhorn`): a pass over the row chunks per reverse iteration for the column adjoints, then one pass
that forms the gradient chunk by chunk. The row-chunk helpers also serve the multi-program kernels
(:mod:`.sinkhorn_stepped`)."""

import triton
import triton.language as tl

from .sinkhorn import first_column, saved_column
from .sinkhorn_chunked import chunked_matrix, store_kernel_rows, streamed_tile
from .sinkhorn_tiles import (
    element_pointers,
    entries,
    row_scaling,
)


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


@triton.jit(do_not_specialize=["n_iter"])
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
    off, n, index = chunked_matrix(meta_ptr)
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
