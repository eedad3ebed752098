"""Reading learned doubly stochastic stacks in terms of exact permutations (the recovery metric)."""

from __future__ import annotations

import numpy as np
import torch

# scipy and threadpoolctl are imported where they are used: `import symkernels` needs neither.

__all__ = ["decompose", "decomposition_residual", "nearest_permutation", "nearest_permutation_indices"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_tensor(name: str, value: object, *, floating: bool) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and value.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating dtype, got {value.dtype}")
    if value.is_complex():
        raise TypeError(f"{name} must be real, got {value.dtype}")
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    return value


def _check_square(name: str, value: torch.Tensor) -> None:
    if value.shape[-1] != value.shape[-2]:
        raise ValueError(f"{name} must hold square matrices, got shape {tuple(value.shape)}")


def _prepare(reps: object, basis: object) -> tuple[torch.Tensor, torch.Tensor, bool]:
    reps = _check_tensor("reps", reps, floating=True)
    basis = _check_tensor("basis", basis, floating=True)
    if reps.dim() not in (2, 3):
        raise ValueError(f"reps must have shape [N, d, d] or [d, d], got {tuple(reps.shape)}")
    _check_square("reps", reps)
    if basis.dim() != 3:
        raise ValueError(f"basis must have shape [K, d, d], got {tuple(basis.shape)}")
    _check_square("basis", basis)
    if basis.shape[0] == 0:
        raise ValueError("basis must hold at least one matrix, got K = 0")
    if basis.shape[-1] != reps.shape[-1]:
        raise ValueError(
            f"reps and basis disagree on d: reps {tuple(reps.shape)}, basis {tuple(basis.shape)}"
        )
    single = reps.dim() == 2
    return (reps.unsqueeze(0) if single else reps), basis, single


def _affine_minimizer(points: np.ndarray) -> np.ndarray:
    """Weights ``a`` (``sum(a) = 1``) of the smallest-norm point in the affine hull of ``points`` ``[s, m]``.

    Solved as least squares ``min ||p_0 + sum_i b_i (p_i - p_0)||`` (SVD): accurate relative to the residual,
    and one of the minimisers when the points are affinely dependent.
    """
    from scipy.linalg import lstsq

    if points.shape[0] == 1:
        return np.ones(1)
    edges = (points[1:] - points[0]).T
    beta = lstsq(edges, -points[0], lapack_driver="gelsd", check_finite=False)[0]
    return np.concatenate([[1.0 - beta.sum()], beta])


def _min_norm_point(points: np.ndarray) -> np.ndarray:
    """Wolfe's algorithm: convex weights ``c`` ``[K]`` minimising ``||c @ points||`` (``points``: ``[K, m]``).

    Finite; exact up to the least-squares solves. The optimality test (Frank-Wolfe gap) and all norms are
    computed from the points themselves, not from their Gram matrix, so the answer stays accurate when the
    minimum norm is tiny compared to the points.
    """
    k = points.shape[0]
    lengths = np.sqrt(np.einsum("km,km->k", points, points))
    longest = float(lengths.max(initial=0.0))
    drop_tol = 1e-15
    support = [int(np.argmin(lengths))]
    weights = np.ones(1)
    x = points[support[0]].copy()
    norm2 = float(x @ x)
    for _ in range(10 * k + 100):
        inner = points @ x  # <x, p_j> for every j; equals norm2 on the support
        j = int(np.argmin(inner))
        if norm2 - inner[j] <= 1e-12 * longest * np.sqrt(norm2) or j in support:
            break  # optimal: no vertex improves on x (Frank-Wolfe gap at rounding level)
        trial_support = support + [j]
        trial_weights = np.append(weights, 0.0)
        for _ in range(len(trial_support) + 1):  # minor cycles: each drops at least one point
            alpha = _affine_minimizer(points[trial_support])
            if np.all(alpha > drop_tol):
                trial_weights = alpha
                break
            # Move from the current weights towards alpha until the first weight reaches zero, drop it.
            neg = alpha <= drop_tol
            denom = trial_weights[neg] - alpha[neg]
            ratios = np.divide(trial_weights[neg], denom, out=np.full_like(denom, np.inf), where=denom > 0)
            theta = min(max(float(ratios.min()), 0.0), 1.0)
            trial_weights = (1.0 - theta) * trial_weights + theta * alpha
            keep = trial_weights > drop_tol
            if theta == 0.0 or keep.all():
                keep &= ~neg  # no progress along the segment: drop the offending points outright
            trial_support = [s for s, kept in zip(trial_support, keep, strict=True) if kept]
            trial_weights = np.clip(trial_weights[keep], 0.0, None)
            if not trial_support:
                break
            trial_weights = trial_weights / trial_weights.sum()
        if not trial_support or j not in trial_support:
            break  # the new vertex could not enter: no further numerical progress
        trial_x = trial_weights @ points[trial_support]
        trial_norm2 = float(trial_x @ trial_x)
        if trial_norm2 >= norm2:
            break
        support, weights, x, norm2 = trial_support, trial_weights, trial_x, trial_norm2
    out = np.zeros(k)
    out[support] = np.clip(weights, 0.0, None)
    return out / out.sum()


def decompose(reps: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Best convex combination of basis matrices for each learned matrix (constrained least squares).

    For each ``R_i`` in ``reps`` (``[N, d, d]``, or ``[d, d]``) finds ``c >= 0, sum(c) = 1`` minimising
    ``||sum_k c_k P_k - R_i||_F`` over ``basis`` (``[K, d, d]``, e.g. a stack from :mod:`symkernels.groups`).
    Solved exactly in float64 (Wolfe's minimum-norm-point algorithm, a finite active-set method); when basis
    matrices are linearly dependent the minimiser is not unique and one of them is returned.

    Returns float64 coefficients ``[N, K]`` (``[K]`` for a single matrix) on the device of ``reps``.
    """
    from threadpoolctl import threadpool_limits

    reps3, basis, single = _prepare(reps, basis)
    n, k, d = reps3.shape[0], basis.shape[0], basis.shape[-1]
    flat_basis = basis.detach().to(device="cpu", dtype=torch.float64).reshape(k, d * d)
    flat_reps = reps3.detach().to(device="cpu", dtype=torch.float64).reshape(n, d * d)
    coefficients = np.zeros((n, k))
    # Many tiny LAPACK solves: a multi-threaded BLAS spends more time waking its threads than solving
    # (10-40x slower on a loaded 2-core machine).
    with threadpool_limits(limits=1):
        for i in range(n):
            # Since sum(c) = 1, the residual is sum_k c_k (P_k - R_i): the point of smallest norm in the
            # convex hull of the shifted matrices.
            coefficients[i] = _min_norm_point((flat_basis - flat_reps[i]).numpy())
    out = torch.from_numpy(coefficients).to(reps3.device)
    return out[0] if single else out


def decomposition_residual(
    reps: torch.Tensor, basis: torch.Tensor, coefficients: torch.Tensor | None = None
) -> torch.Tensor:
    """Frobenius error ``||sum_k c_k P_k - R_i||_F`` per matrix: float64 ``[N]`` (scalar for ``[d, d]`` reps).

    ``coefficients`` (``[N, K]`` or ``[K]``) default to :func:`decompose`.
    """
    reps3, basis, single = _prepare(reps, basis)
    if coefficients is None:
        coefficients = decompose(reps3, basis)
    coefficients = _check_tensor("coefficients", coefficients, floating=True)
    coefficients = coefficients.to(device=reps3.device, dtype=torch.float64).reshape(reps3.shape[0], -1)
    if coefficients.shape[-1] != basis.shape[0]:
        raise ValueError(
            f"coefficients must have K = {basis.shape[0]} entries per matrix, got {tuple(coefficients.shape)}"
        )
    fitted = torch.einsum("nk,kij->nij", coefficients, basis.to(device=reps3.device, dtype=torch.float64))
    err = torch.linalg.matrix_norm(fitted - reps3.detach().to(torch.float64))
    return err[0] if single else err


def nearest_permutation_indices(reps: torch.Tensor) -> torch.Tensor:
    """Assignment ``sigma`` maximising ``sum_i R[i, sigma(i)]`` per matrix (Hungarian algorithm).

    ``reps``: ``[..., d, d]`` real. Returns int64 ``[..., d]`` on the same device; ``sigma[..., i]`` is the
    column matched to row ``i``.
    """
    from scipy.optimize import linear_sum_assignment

    reps = _check_tensor("reps", reps, floating=False)
    if reps.dim() < 2:
        raise ValueError(f"reps must have shape [..., d, d], got {tuple(reps.shape)}")
    _check_square("reps", reps)
    d = reps.shape[-1]
    batch = int(np.prod(reps.shape[:-2], dtype=np.int64))
    flat = reps.detach().to(device="cpu", dtype=torch.float64).reshape(batch, d, d).numpy()
    sigma = np.empty((flat.shape[0], d), dtype=np.int64)
    for i, matrix in enumerate(flat):
        sigma[i] = linear_sum_assignment(matrix, maximize=True)[1]
    return torch.from_numpy(sigma).reshape(reps.shape[:-1]).to(reps.device)


def nearest_permutation(reps: torch.Tensor) -> torch.Tensor:
    """Permutation matrices maximising ``sum_i R[i, sigma(i)]``: same shape ``[..., d, d]`` and dtype as reps.

    This is also the permutation matrix nearest to ``R`` in Frobenius norm.
    """
    sigma = nearest_permutation_indices(reps)
    d = reps.shape[-1]
    return torch.eye(d, dtype=reps.dtype, device=reps.device)[sigma]
