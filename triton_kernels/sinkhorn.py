"""Fused Sinkhorn kernels: all iterations (forward) or the whole exact backward in one launch.

Matrices of any sizes share a launch ("ragged"): they lie in one flat buffer, and ``meta [M', 3]`` (int64)
gives each matrix's element offset, size ``n`` and index ``m`` in the outputs (a launch may serve only some of
the matrices of a call). Two layouts of the work:

* **packed** (``packed_*_kernel``): ``MB`` whole matrices per program, padded to ``BN × BN``, kept in
  registers for all iterations: many matrices per program for small ``n``, one for larger ``n``;
* **chunked** (``chunked_*_kernel``): one program per matrix, for ``n`` whose matrix does not fit a program's
  registers: ``K`` is written once to a scratch copy (laid out as the logits), and every pass streams it in
  chunks of ``BR`` rows (from L1/L2: 150 KB for n = 196); row quantities are recomputed chunk by chunk.

Iterations (docs/design.md §2, rows then columns): ``c_0 = 1``, ``r_t = 1 / (K c_{t-1})``,
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

Backward (docs/design.md §13, written as the adjoint of the log-domain steps, which is the same VJP),
``T = T_m`` per matrix: with ``A_t = entries(r_t, c_{t-1})`` (after row step t) and
``B_t = entries(r_t, c_t)`` (after column step t), ``ḡ_T = colsum(Ḡ ⊙ P)``,
``f̄_T = rowsum(P ⊙ (Ḡ - 1ḡ_Tᵀ))``, then for ``t = T..2``:
``ḡ_{t-1} = -A_tᵀ f̄_t``, ``f̄_{t-1} = -B_{t-1} ḡ_{t-1}``, and
``M' = P ⊙ (Ḡ - 1ḡ_Tᵀ) - Σ_{t<T} B_t ⊙ 1ḡ_tᵀ - Σ_{t≥2} A_t ⊙ f̄_t 1ᵀ``,
``Θ̄ = (M' - A_1 ⊙ rowsum(M') 1ᵀ) / tau``. The first and last steps are formed entry by entry (the last with
the actual row sums of ``M'``), which keeps tiny gradients of saturated matrices accurate. The row-max shift
has zero gradient (P does not change when a row of logits is shifted).

The kernels' counts and iteration indices (``n_iter``, the number of matrices or programs, the stepped
kernels' launch index) are not specialised on (``do_not_specialize``): Triton would otherwise compile a kernel
again for the value 1 and for multiples of 16 (three variants of each stepped kernel in one call), and these
values only bound loops and masks.

Loops over iterations are ``while`` loops where they may end early (the packed early-exit loop ends once all
its program's matrices have stopped) or run one matrix's count (chunked), and ``for`` loops over a run-time
range in the packed kernels otherwise, which ptxas allocates with fewer registers there (Triton 3.6's
interpreter cannot take a run-time ``range`` under numpy 2.4).
"""

import triton
import triton.language as tl


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
def iteration_limit(cap, n_iter):
    """A matrix's iteration limit from its cap, clamped to ``1..n_iter`` as the CUDA kernels clamp it (the
    launchers cannot check caps without a host sync): never past the end of ``cols``, and at least one
    iteration, so that P is always an iterate."""
    return tl.minimum(tl.maximum(cap, 1), n_iter)


@triton.jit
def zero_columns_from(vec, t, n_iter, vec_stride, zero, mask):
    """Store ``zero`` as the saved scalings of iterations ``t + 1 .. n_iter`` (those no matrix here ran)."""
    while t < n_iter:
        tl.store(vec + t * vec_stride, zero, mask=mask)
        t += 1
