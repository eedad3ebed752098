"""Tile-level pieces shared by the Sinkhorn kernels.

A tile is ``[MB, BR, BN]``: rows ``row0 .. row0 + BR`` of ``MB`` matrices, each padded to ``BN`` columns.
Every matrix is iterated in one of two domains, and the helpers take the domain as the constexpr ``LOG``:

* scaling domain: the tile holds ``K = exp(L0 - rowmax)`` (0 where padded); the row and column scalings are
  ``r = 1 / (K c)``, ``c = 1 / (Kᵀ r)``; an entry of an iterate is ``r_i K_ij c_j``;
* log domain: the tile holds ``L0 = logits / tau`` (-inf where padded); the scalings are log-sum-exps,
  ``f = -lse_j(L0 + g)``, ``g = -lse_i(L0 + f)``; an entry is ``exp(L0_ij + f_i + g_j)``.

Padded rows and columns carry the scaling 0 in both domains, so they add nothing to any sum.

Scalings are float32 in the scaling domain and float64 in the log domain: ``f`` and ``g`` grow with the
logits' spread (|f| ~ 100 for logits / tau ~ 100), and a float32 potential would carry an absolute error
~eps·|f| into every entry ``exp(L0 + f + g)``, i.e. a relative error ~eps·|f|, 10-100x the float32
reference's. The float64 sums ``L0 + f + g`` are rounded to float32 only once they are small (for the entries
that matter), and every exponential and sum over a tile stays float32.
"""

import triton
import triton.language as tl


@triton.jit
def matrix_rows(x_ptr, off, n, row0, tau, BR: tl.constexpr, BN: tl.constexpr):
    """``L0 = x / tau`` (float32, -inf where padded) for the rows ``row0 + [0, BR)``; with its row/col masks.

    ``off`` (element offset of each matrix) and ``n`` broadcast as ``[MB, 1, 1]`` (or are scalars).
    """
    rows = row0 + tl.arange(0, BR)[None, :, None]
    cols = tl.arange(0, BN)[None, None, :]
    row_mask = rows < n
    col_mask = cols < n
    mask = row_mask & col_mask
    x = tl.load(x_ptr + off + rows * n + cols, mask=mask, other=0.0).to(tl.float32)
    # Correctly rounded, as the reference's `logits / tau`: the GPU's default fp32 division is approximate.
    l0 = tl.where(mask, tl.math.div_rn(x, tau), float("-inf"))
    return l0, row_mask, col_mask


@triton.jit
def element_pointers(ptr, off, n, row0, BR: tl.constexpr, BN: tl.constexpr):
    """Pointers and mask of the tile ``rows row0 + [0, BR)`` of matrices stored row-major at ``ptr + off``."""
    rows = row0 + tl.arange(0, BR)[None, :, None]
    cols = tl.arange(0, BN)[None, None, :]
    return ptr + off + rows * n + cols, (rows < n) & (cols < n)


@triton.jit
def precise_exp(x):
    """``exp(x)`` in float32 within 1.5 ulps over the whole float range (NaN stays NaN, overflow gives inf,
    underflow 0), from float32 additions and multiplications only, so that it rounds the same way on the GPU
    as in Triton's interpreter.

    The GPU's ``tl.exp`` is ``ex2.approx.f32`` of the rounded product ``x·log2 e``: a relative error of
    ~eps·|x| (CUDA's ``__expf``: 2 + 1.17·|x| ulps), and ``tl.exp2`` (``ex2.approx``) or libdevice's ``expf``
    are still up to 2 ulps off; the log domain's backward amplifies such errors past the accuracy bound
    (tests/ops/test_triton_gpu_arithmetic.py emulates them). Here ``x = k ln2 + r`` (``|r| <= ln2 / 2``),
    ``e^r`` is its Taylor polynomial of degree 7 (truncation error < 6e-9, below half an ulp) and ``2^k`` is
    built exactly from its bits, in two halves so that subnormal results (k down to -150) and overflow
    (k = 128) need no special case.
    """
    # Literal constants (no module globals): torch.compile copies the kernels' source into its own modules.
    c = tl.minimum(tl.maximum(x, -104.0), 89.0)  # exp(-104) rounds to 0 and exp(89) to inf
    k = tl.floor(c * 1.4426950408889634 + 0.5)  # round(c · log2 e), in [-150, 128]
    # ln 2 = 0.693145751953125 + 1.428606765330187e-06, the first part exact in k · it for |k| < 2^8.
    r = (c - k * 0.693145751953125) - k * 1.428606765330187e-06
    p = 1.0 / 5040.0 + r * (1.0 / 40320.0)
    p = 1.0 / 720.0 + r * p
    p = 1.0 / 120.0 + r * p
    p = 1.0 / 24.0 + r * p
    p = 1.0 / 6.0 + r * p
    p = 0.5 + r * p
    p = 1.0 + r * p
    p = 1.0 + r * p
    whole = k.to(tl.int32)
    half = whole >> 1
    low = ((half + 127) << 23).to(tl.float32, bitcast=True)  # 2^half, exact
    high = ((whole - half + 127) << 23).to(tl.float32, bitcast=True)
    return tl.where(x == x, p * low * high, x)  # the clamps drop NaN on the GPU (max.f32 returns the other)


@triton.jit
def reciprocal(x):
    """``1 / x`` correctly rounded: the GPU's float32 ``/`` is ``div.full.f32``, up to 2 ulps off."""
    return tl.math.div_rn(tl.zeros_like(x) + 1.0, x)


@triton.jit
def scaling_tile(l0, row_mask, col_mask):
    """``K = exp(L0 - rowmax)``, 0 where padded (rows are whole, so the chunk's own row maxima are exact)."""
    row_max = tl.max(l0, axis=2, keep_dims=True)
    row_max = tl.where(row_mask, row_max, 0.0)
    return tl.where(row_mask & col_mask, precise_exp(l0 - row_max), 0.0)


@triton.jit
def row_stats(l0, row_mask, col_mask):
    """Per matrix ``[MB]``: the largest within-row spread ``max_j L0 - min_j L0``, and 1 if a logit is not
    finite (NaN, ±inf) else 0."""
    mask = row_mask & col_mask
    hi = tl.max(l0, axis=2, keep_dims=True)
    lo = tl.min(tl.where(mask, l0, float("inf")), axis=2, keep_dims=True)
    spread = tl.max(tl.max(tl.where(row_mask, hi - lo, 0.0), axis=2), axis=1)
    finite = (l0 == l0) & (tl.abs(l0) < float("inf"))
    bad = tl.max(tl.max(tl.where(mask & (~finite), 1, 0), axis=2), axis=1)
    return spread, bad


@triton.jit
def row_scaling(tile, col_scaling, row_mask, LOG: tl.constexpr):
    """Row step: ``r = 1 / (K c)`` or ``f = -lse_j(L0 + g)``, as ``[MB, BR, 1]`` (0 on padded rows)."""
    if LOG:
        z = tile.to(tl.float64) + col_scaling
        z_max = tl.where(row_mask, tl.max(z, axis=2, keep_dims=True), 0.0)
        total = tl.sum(precise_exp((z - z_max).to(tl.float32)), axis=2, keep_dims=True)
        total = tl.where(row_mask, total, 1.0)  # padded rows: no log(0)
        return tl.where(row_mask, -(z_max + tl.log(total).to(tl.float64)), 0.0)
    else:
        total = tl.sum(tile * col_scaling, axis=2, keep_dims=True)
        return tl.where(row_mask, reciprocal(tl.where(row_mask, total, 1.0)), 0.0)


@triton.jit
def entries(tile, row_scaling, col_scaling, LOG: tl.constexpr):
    """Entries of the iterate with these scalings: ``r_i K_ij c_j`` or ``exp(L0_ij + f_i + g_j)``."""
    if LOG:
        return precise_exp((tile.to(tl.float64) + row_scaling + col_scaling).to(tl.float32))
    else:
        return row_scaling * tile * col_scaling


@triton.jit
def column_partials(tile, row_scaling, LOG: tl.constexpr):
    """What a chunk of rows contributes to the column step, as two ``[MB, 1, BN]`` partials: the sums
    ``Σ_i K_ij r_i`` (and zeros), or the maxima (float64) and shifted sums of ``L0_ij + f_i`` over the chunk's
    rows."""
    if LOG:
        y = tile.to(tl.float64) + row_scaling
        y_max = tl.max(y, axis=1, keep_dims=True)
        shift = tl.where(y_max == float("-inf"), 0.0, y_max)
        return y_max, tl.sum(precise_exp((y - shift).to(tl.float32)), axis=1, keep_dims=True)
    else:
        total = tl.sum(tile * row_scaling, axis=1, keep_dims=True)
        return total, tl.zeros_like(total)


@triton.jit
def merge_column_partials(a0, b0, a1, b1, LOG: tl.constexpr):
    """Combine two column partials of :func:`column_partials` (an online log-sum-exp in the log domain)."""
    if LOG:
        top = tl.maximum(a0, a1)
        shift = tl.where(top == float("-inf"), 0.0, top)
        scale0 = precise_exp((a0 - shift).to(tl.float32))
        return top, b0 * scale0 + b1 * precise_exp((a1 - shift).to(tl.float32))
    else:
        return a0 + a1, b0


@triton.jit
def column_scaling(a, b, col_mask, LOG: tl.constexpr):
    """Column step from the merged partials: ``c = 1 / Σ`` or ``g = -(max + log Σ)`` (0 on padded columns)."""
    # Padded columns (empty sums) are replaced before the division / log, which would warn or trap there.
    if LOG:
        return tl.where(col_mask, -(a + tl.log(tl.where(col_mask, b, 1.0)).to(tl.float64)), 0.0)
    else:
        return tl.where(col_mask, reciprocal(tl.where(col_mask, a, 1.0)), 0.0)


@triton.jit
def any_outside(inside, mask):
    """Per matrix ``[MB]``: 1 if some entry under ``mask`` is not ``inside``, else 0."""
    return tl.max(tl.max(tl.where(mask & (~inside), 1, 0), axis=2), axis=1)


@triton.jit
def in_range(v, lo, hi):
    """Elementwise ``lo <= v <= hi`` (false for NaN)."""
    return (v >= lo) & (v <= hi)


@triton.jit
def rows_converged(previous, current, row_mask, tol, LOG: tl.constexpr):
    """Per matrix ``[MB]``: 1 if every row sum of the iterate ``P_t`` is within ``tol`` of 1, else 0 (NaN
    fails).

    ``previous`` is the row scaling of ``P_t`` (``r_t`` / ``f_t``) and ``current`` the next row step's
    (``r_{t+1}`` / ``f_{t+1}``): the row sums ``r_t ⊙ (K c_t)`` are ``r_t / r_{t+1}``, or
    ``exp(f_t - f_{t+1})``.
    """
    if LOG:
        sums = precise_exp((previous - current).to(tl.float32))
    else:
        sums = tl.math.div_rn(previous, tl.where(row_mask, current, 1.0))
    inside = (tl.abs(sums - 1.0) <= tol) | (~row_mask)
    return tl.min(tl.min(tl.where(inside, 1, 0), axis=2), axis=1)
