"""Triton kernels of the kernel expansion ``K[o, g, i, n] = Σ_m R[g, n, m] θ[o, i, m]`` and its backward.

The expanded kernel is written straight into the convolution's weight tensor ``[O·G, I·G_in, k, k]`` through
its strides (contiguous, channels_last or any other layout), in that tensor's dtype; every other operand is
read through its strides too, so no permute, ``contiguous`` or cast kernel runs around these launches.

Index map (``d = G_in·k²``, ``n = (h, ky, kx)`` row-major): ``K[o, g, i, n]`` is the conv weight's element
``[o·G + g, i·G_in + h, ky, kx]``.

With ``LEADING_IDENTITY`` the reps tensor holds only the learned matrices ``R_1 … R_{G-1}`` and ``R_0 = I`` is
implied, so a fixed identity is never materialised or multiplied.

Backward, one launch (plus a fixed-order reduction when the ``R̄`` reduction is split):

* ``θ̄[o, i, :] = Σ_g K̄[o, g, i, :] R_g``: one program per ``(rows (o, i), columns m)`` tile, looping over
  ``g`` and ``n`` in order;
* ``R̄_g = Σ_{o, i} K̄[o, g, i, :]ᵀ θ[o, i, :]``: one program per ``(g, n, m)`` tile and split of the
  ``O·I`` reduction; with several splits each writes float32 partials that a second kernel sums in order.

No float atomics anywhere: the result depends only on the shapes, never on scheduling. The launchers, and the
plan of the backward's launch, are in :mod:`symkernels.ops.expansion_triton`.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["expand_backward_kernel", "expand_forward_kernel", "sum_partials_kernel"]


@triton.jit
def _conv_offsets(o, g, i, n, G, G_in, KK, k, s_oc, s_ic, s_y, s_x):
    """Offsets of ``K[o, g, i, n]`` in a conv weight ``[O·G, I·G_in, k, k]`` with strides ``s_*``."""
    h = n // KK
    s = n - h * KK
    ky = s // k
    kx = s - ky * k
    return (o * G + g) * s_oc + (i * G_in + h) * s_ic + ky * s_y + kx * s_x


@triton.jit
def _dot(a, b, acc, DOT_F32: tl.constexpr):
    # float32 operands take the exact (non-TF32) path to match an fp32 GEMM; fp16/bf16 use the tensor cores
    # with fp32 accumulation.
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def expand_forward_kernel(
    reps_ptr,
    weight_ptr,
    out_ptr,
    OC,
    IC,
    G,
    d,
    G_in,
    KK,
    k,
    s_rg,
    s_rn,
    s_rm,
    s_wo,
    s_wi,
    s_wm,
    s_oc,
    s_ic,
    s_y,
    s_x,
    LEADING_IDENTITY: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    # Tile: rows r = (o, i) of the flattened weight × columns n of R_g, for one g; reduction over m.
    pid_r = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < OC * IC
    col_ok = cols < d
    o = rows // IC
    i = rows - o * IC
    w_rows = o * s_wo + i * s_wi
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    m_stop = d
    if LEADING_IDENTITY:
        # R_0 = I: the kernel's first group is the weight itself (and the reduction below is empty).
        ptrs = weight_ptr + w_rows[:, None] + cols[None, :] * s_wm
        first = row_ok[:, None] & col_ok[None, :] & (g == 0)
        acc += tl.load(ptrs, mask=first, other=0.0).to(tl.float32)
        m_stop = tl.where(g == 0, 0, d)
    r_base = reps_ptr + (g - LEADING_IDENTITY) * s_rg + cols[None, :] * s_rn
    for m0 in range(0, m_stop, BLOCK_M):
        ms = m0 + tl.arange(0, BLOCK_M)
        m_ok = ms < d
        a = tl.load(
            weight_ptr + w_rows[:, None] + ms[None, :] * s_wm,
            mask=row_ok[:, None] & m_ok[None, :],
            other=0.0,
        )
        # b[m, n] = R_g[n, m]
        b = tl.load(r_base + ms[:, None] * s_rm, mask=m_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _dot(a, b, acc, DOT_F32)
    offsets = _conv_offsets(o[:, None], g, i[:, None], cols[None, :], G, G_in, KK, k, s_oc, s_ic, s_y, s_x)
    tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _weight_grad_tile(
    tile,
    grad_ptr,
    reps_ptr,
    grad_weight_ptr,
    OC,
    IC,
    G,
    d,
    G_in,
    KK,
    k,
    s_gc,
    s_gi,
    s_gy,
    s_gx,
    s_rg,
    s_rn,
    s_rm,
    LEADING_IDENTITY: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    # θ̄ tile: rows r = (o, i) × columns m; reduction over (g, n) in order.
    m_tiles = tl.cdiv(d, BLOCK_M)
    pid_r = tile // m_tiles
    pid_m = tile - pid_r * m_tiles
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < OC * IC
    m_ok = ms < d
    o = rows // IC
    i = rows - o * IC
    acc = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.float32)
    if LEADING_IDENTITY:
        # R_0 = I contributes K̄[o, 0, i, m] itself.
        first = _conv_offsets(o[:, None], 0, i[:, None], ms[None, :], G, G_in, KK, k, s_gc, s_gi, s_gy, s_gx)
        acc += tl.load(grad_ptr + first, mask=row_ok[:, None] & m_ok[None, :], other=0.0).to(tl.float32)
    for g in range(LEADING_IDENTITY, G):
        r_base = reps_ptr + (g - LEADING_IDENTITY) * s_rg + ms[None, :] * s_rm
        for n0 in range(0, d, BLOCK_N):
            ns = n0 + tl.arange(0, BLOCK_N)
            n_ok = ns < d
            offsets = _conv_offsets(
                o[:, None], g, i[:, None], ns[None, :], G, G_in, KK, k, s_gc, s_gi, s_gy, s_gx
            )
            a = tl.load(grad_ptr + offsets, mask=row_ok[:, None] & n_ok[None, :], other=0.0)
            b = tl.load(r_base + ns[:, None] * s_rn, mask=n_ok[:, None] & m_ok[None, :], other=0.0)
            acc = _dot(a, b, acc, DOT_F32)
    # grad_weight is a fresh contiguous [O, I, d] tensor.
    ptrs = grad_weight_ptr + rows[:, None] * d + ms[None, :]
    tl.store(ptrs, acc.to(grad_weight_ptr.dtype.element_ty), mask=row_ok[:, None] & m_ok[None, :])


@triton.jit
def _reps_grad_tile(
    tile,
    grad_ptr,
    weight_ptr,
    target_ptr,
    OC,
    IC,
    G,
    d,
    G_in,
    KK,
    k,
    s_gc,
    s_gi,
    s_gy,
    s_gx,
    s_wo,
    s_wi,
    s_wm,
    rows_per_split,
    LEADING_IDENTITY: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    # R̄ tile of learned matrix q: rows n × columns m over one split of the (o, i) reduction, in order.
    m_tiles = tl.cdiv(d, BLOCK_M)
    n_tiles = tl.cdiv(d, BLOCK_N)
    learned = G - LEADING_IDENTITY
    pid_m = tile % m_tiles
    rest = tile // m_tiles
    pid_n = rest % n_tiles
    rest = rest // n_tiles
    q = rest % learned
    split = rest // learned
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok = ns < d
    m_ok = ms < d
    g = q + LEADING_IDENTITY
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    start = split * rows_per_split
    stop = tl.minimum(start + rows_per_split, OC * IC)
    for r0 in range(start, stop, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < stop
        o = rows // IC
        i = rows - o * IC
        # a[n, r] = K̄[o, g, i, n]
        offsets = _conv_offsets(
            o[None, :], g, i[None, :], ns[:, None], G, G_in, KK, k, s_gc, s_gi, s_gy, s_gx
        )
        a = tl.load(grad_ptr + offsets, mask=n_ok[:, None] & row_ok[None, :], other=0.0)
        b = tl.load(
            weight_ptr + (o * s_wo + i * s_wi)[:, None] + ms[None, :] * s_wm,
            mask=row_ok[:, None] & m_ok[None, :],
            other=0.0,
        )
        acc = _dot(a, b, acc, DOT_F32)
    # The target (grad_reps [learned, d, d] or float32 partials [splits, learned, d, d]) is fresh, contiguous.
    ptrs = target_ptr + ((split * learned + q) * d + ns[:, None]) * d + ms[None, :]
    tl.store(ptrs, acc.to(target_ptr.dtype.element_ty), mask=n_ok[:, None] & m_ok[None, :])


@triton.jit
def expand_backward_kernel(
    grad_ptr,
    reps_ptr,
    weight_ptr,
    grad_weight_ptr,
    target_ptr,
    OC,
    IC,
    G,
    d,
    G_in,
    KK,
    k,
    s_gc,
    s_gi,
    s_gy,
    s_gx,
    s_rg,
    s_rn,
    s_rm,
    s_wo,
    s_wi,
    s_wm,
    weight_tiles,
    rows_per_split,
    LEADING_IDENTITY: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    # The first weight_tiles programs compute θ̄, the rest R̄: both gradients in one launch.
    pid = tl.program_id(0)
    if pid < weight_tiles:
        _weight_grad_tile(
            pid, grad_ptr, reps_ptr, grad_weight_ptr, OC, IC, G, d, G_in, KK, k, s_gc, s_gi, s_gy, s_gx,
            s_rg, s_rn, s_rm, LEADING_IDENTITY, DOT_F32, BLOCK_R, BLOCK_N, BLOCK_M,
        )  # fmt: skip
    else:
        _reps_grad_tile(
            pid - weight_tiles, grad_ptr, weight_ptr, target_ptr, OC, IC, G, d, G_in, KK, k, s_gc, s_gi, s_gy,
            s_gx, s_wo, s_wi, s_wm, rows_per_split, LEADING_IDENTITY, DOT_F32, BLOCK_R, BLOCK_N, BLOCK_M,
        )  # fmt: skip


@triton.jit
def sum_partials_kernel(partials_ptr, out_ptr, numel, splits, BLOCK: tl.constexpr):
    # out = Σ_s partials[s], summed in the order s = 0, 1, ... (deterministic).
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, splits):
        acc += tl.load(partials_ptr + s * numel + offsets, mask=ok, other=0.0)
    tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=ok)
