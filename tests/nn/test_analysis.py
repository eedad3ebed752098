"""Recovery metric: simplex-constrained least squares over exact permutations, and nearest permutations."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from tests.testing import require_extras

require_extras("train")

from scipy.optimize import minimize  # noqa: E402

from symkernels import analysis, groups  # noqa: E402


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _dirichlet(n: int, k: int, seed: int) -> torch.Tensor:
    """Random points of the simplex in float64 (summing to 1 to rounding)."""
    x = -torch.log(torch.rand(n, k, generator=_gen(seed), dtype=torch.float64))
    return x / x.sum(-1, keepdim=True)


def _mix(coefficients: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    return torch.einsum("nk,kij->nij", coefficients, basis.double())


def _doubly_stochastic(n: int, d: int, seed: int, iters: int = 1000) -> torch.Tensor:
    x = torch.exp(2 * torch.randn(n, d, d, generator=_gen(seed), dtype=torch.float64))
    for _ in range(iters):
        x = x / x.sum(-1, keepdim=True)
        x = x / x.sum(-2, keepdim=True)
    return x


def _objective(c: np.ndarray, gram: np.ndarray, cross: np.ndarray, norm: float) -> float:
    return float(c @ gram @ c - 2 * cross @ c + norm)


def _slsqp(rep: torch.Tensor, basis: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    b = basis.double().reshape(basis.shape[0], -1).numpy()
    r = rep.double().reshape(-1).numpy()
    gram, cross, norm = b @ b.T, b @ r, float(r @ r)
    k = b.shape[0]
    result = minimize(
        _objective,
        np.full(k, 1.0 / k),
        args=(gram, cross, norm),
        jac=lambda c, *_: 2 * gram @ c - 2 * cross,
        method="SLSQP",
        bounds=[(0.0, 1.0)] * k,
        constraints=[{"type": "eq", "fun": lambda c: c.sum() - 1.0, "jac": lambda c: np.ones_like(c)}],
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    return result.x, gram, cross, norm


def _assert_simplex(c: torch.Tensor) -> None:
    assert c.dtype == torch.float64
    assert bool((c >= 0).all())
    torch.testing.assert_close(c.sum(-1), torch.ones(c.shape[:-1], dtype=torch.float64), rtol=0, atol=1e-12)


def _assert_kkt(c: torch.Tensor, rep: torch.Tensor, basis: torch.Tensor, tol: float = 1e-8) -> None:
    """Optimality on the simplex: the gradient is minimal and constant on the support."""
    b = basis.double().reshape(basis.shape[0], -1)
    grad = 2 * (b @ (b.T @ c.double() - rep.double().reshape(-1)))
    support = c > 1e-9
    nu = grad[support].min()
    assert float(grad[support].max() - nu) < tol
    assert float(grad.min() - nu) > -tol


# --- decompose: exact recovery ------------------------------------------------------------------------------


def test_recovers_mixture_of_rotations() -> None:
    basis = groups.rotation_permutations(5)
    coefficients = _dirichlet(6, 4, seed=0)
    coefficients[0] = torch.tensor([0.0, 0.25, 0.0, 0.75], dtype=torch.float64)  # on a face of the simplex
    found = analysis.decompose(_mix(coefficients, basis), basis)
    assert found.shape == (6, 4)
    _assert_simplex(found)
    torch.testing.assert_close(found, coefficients, rtol=0, atol=1e-10)


@pytest.mark.parametrize("k", [3, 5])
def test_recovers_mixture_of_shift_twists(k: int) -> None:
    basis = groups.shift_twist(k)
    coefficients = _dirichlet(4, 4, seed=k)
    found = analysis.decompose(_mix(coefficients, basis), basis)
    torch.testing.assert_close(found, coefficients, rtol=0, atol=1e-10)
    torch.testing.assert_close(
        analysis.decomposition_residual(_mix(coefficients, basis), basis, found),
        torch.zeros(4, dtype=torch.float64),
        rtol=0,
        atol=1e-10,
    )


def test_recovers_mixture_of_cube_rotations() -> None:
    basis = groups.cube_rotations()
    coefficients = _dirichlet(3, 24, seed=7)
    coefficients[1] = 0.0
    coefficients[1, [2, 11, 17]] = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    found = analysis.decompose(_mix(coefficients, basis), basis)
    torch.testing.assert_close(found, coefficients, rtol=0, atol=1e-10)


def test_pure_permutation_gets_coefficient_one() -> None:
    for basis in (groups.rotation_permutations(5), groups.shift_twist(3), groups.cyclic_shifts(6)):
        found = analysis.decompose(basis, basis)
        torch.testing.assert_close(found, torch.eye(basis.shape[0], dtype=torch.float64), rtol=0, atol=1e-12)


def test_single_matrix_and_float32_input() -> None:
    # On a 3x3 grid the 8 dihedral matrices are linearly dependent; on 5x5 they are independent.
    basis = groups.dihedral_permutations(5)
    coefficients = _dirichlet(1, 8, seed=3)[0]
    rep = torch.einsum("k,kij->ij", coefficients, basis.double()).float()
    found = analysis.decompose(rep, basis)
    assert found.shape == (8,) and found.dtype == torch.float64
    _assert_simplex(found)
    torch.testing.assert_close(found, coefficients, rtol=0, atol=1e-6)  # float32 input rounding
    assert analysis.decomposition_residual(rep, basis).shape == ()


def test_empty_batch() -> None:
    basis = groups.rotation_permutations(3)
    assert analysis.decompose(torch.zeros(0, 9, 9), basis).shape == (0, 4)


def test_gradient_tracking_input_is_accepted() -> None:
    basis = groups.rotation_permutations(3)
    rep = basis[1].clone().requires_grad_(True)
    found = analysis.decompose(rep, basis)
    assert not found.requires_grad
    torch.testing.assert_close(found, torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64))


# --- decompose: optimality outside the span -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("basis", "seed"),
    [
        (groups.dihedral_permutations(3), 0),
        (groups.rotation_permutations(5), 1),
        (groups.shift_twist(2), 2),
        (torch.eye(6)[torch.stack([torch.randperm(6, generator=_gen(s)) for s in range(10)])], 3),
    ],
)
def test_matches_slsqp_on_doubly_stochastic_matrices(basis: torch.Tensor, seed: int) -> None:
    reps = _doubly_stochastic(5, basis.shape[-1], seed)
    found = analysis.decompose(reps, basis)
    _assert_simplex(found)
    residual = analysis.decomposition_residual(reps, basis, found)
    for i in range(reps.shape[0]):
        reference, gram, cross, norm = _slsqp(reps[i], basis)
        ours = _objective(found[i].numpy(), gram, cross, norm)
        assert ours <= _objective(reference, gram, cross, norm) + 1e-9
        assert abs(ours - float(residual[i]) ** 2) < 1e-9
        assert ours > 1e-3  # really outside the hull: the constraints matter
        _assert_kkt(found[i], reps[i], basis)


def test_random_matrices_kkt() -> None:
    basis = groups.dihedral_permutations(5)
    reps = torch.randn(8, 25, 25, generator=_gen(11), dtype=torch.float64)
    found = analysis.decompose(reps, basis)
    _assert_simplex(found)
    for i in range(8):
        _assert_kkt(found[i], reps[i], basis)


# --- decompose: linearly dependent bases --------------------------------------------------------------------


def test_duplicated_basis() -> None:
    basis = groups.rotation_permutations(3)
    doubled = torch.cat([basis, basis])
    coefficients = _dirichlet(3, 4, seed=5)
    reps = _mix(coefficients, basis)
    found = analysis.decompose(reps, doubled)
    _assert_simplex(found)
    torch.testing.assert_close(found[:, :4] + found[:, 4:], coefficients, rtol=0, atol=1e-10)


def test_identical_basis_matrices() -> None:
    basis = groups.rotation_permutations(1)  # all four rotations of a 1x1 kernel are the identity
    found = analysis.decompose(torch.tensor([[[0.3]], [[1.0]]]), basis)
    _assert_simplex(found)
    torch.testing.assert_close(
        analysis.decomposition_residual(torch.tensor([[[0.3]], [[1.0]]]), basis, found),
        torch.tensor([0.7, 0.0], dtype=torch.float64),
    )


def test_birkhoff_decomposition_over_all_permutations() -> None:
    """Every doubly stochastic matrix is a convex mix of the 120 permutations of 5 points (dependent)."""
    basis = torch.eye(5)[torch.tensor(list(itertools.permutations(range(5))))]
    reps = _doubly_stochastic(4, 5, seed=9)
    found = analysis.decompose(reps, basis)
    _assert_simplex(found)
    torch.testing.assert_close(
        analysis.decomposition_residual(reps, basis, found),
        torch.zeros(4, dtype=torch.float64),
        rtol=0,
        atol=1e-9,
    )
    outside = torch.rand(2, 5, 5, generator=_gen(1), dtype=torch.float64)
    found = analysis.decompose(outside, basis)
    _assert_simplex(found)
    for i in range(2):
        _assert_kkt(found[i], outside[i], basis)


# --- nearest permutation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nearest_permutation_recovers_noisy_permutations(dtype: torch.dtype) -> None:
    d = 7
    sigma = torch.stack([torch.randperm(d, generator=_gen(s)) for s in range(6)]).reshape(2, 3, d)
    perms = torch.eye(d, dtype=dtype)[sigma]
    noise = torch.rand(2, 3, d, d, generator=_gen(100)).to(dtype)
    noisy = 0.6 * perms + 0.4 * noise / noise.sum(-1, keepdim=True)
    found = analysis.nearest_permutation(noisy)
    assert found.shape == noisy.shape and found.dtype == dtype
    assert torch.equal(found, perms)
    assert torch.equal(analysis.nearest_permutation_indices(noisy), sigma)


def test_nearest_permutation_is_optimal() -> None:
    d = 5
    candidates = torch.eye(d, dtype=torch.float64)[torch.tensor(list(itertools.permutations(range(d))))]
    reps = torch.randn(10, d, d, generator=_gen(4), dtype=torch.float64)
    found = analysis.nearest_permutation(reps)
    for rep, perm in zip(reps, found, strict=True):
        scores = (candidates * rep).sum((-2, -1))
        torch.testing.assert_close((perm * rep).sum(), scores.max(), rtol=0, atol=1e-12)
        distances = torch.linalg.matrix_norm(candidates - rep)
        torch.testing.assert_close(torch.linalg.matrix_norm(perm - rep), distances.min(), rtol=0, atol=1e-12)


def test_nearest_permutation_shapes() -> None:
    indices = analysis.nearest_permutation_indices(torch.eye(4)[[2, 0, 3, 1]])
    assert indices.dtype == torch.int64 and indices.tolist() == [2, 0, 3, 1]
    assert analysis.nearest_permutation(torch.zeros(0, 3, 3)).shape == (0, 3, 3)
    assert torch.equal(analysis.nearest_permutation(torch.ones(1, 1)), torch.ones(1, 1))


# --- validation ---------------------------------------------------------------------------------------------

_BASIS = groups.rotation_permutations(3)


@pytest.mark.parametrize(
    ("reps", "basis", "error", "match"),
    [
        (torch.zeros(9), _BASIS, ValueError, "reps"),
        (torch.zeros(1, 1, 9, 9), _BASIS, ValueError, "reps"),
        (torch.zeros(2, 9, 8), _BASIS, ValueError, "reps"),
        (torch.zeros(2, 9, 9), _BASIS[0], ValueError, "basis"),
        (torch.zeros(2, 9, 9), torch.zeros(4, 9, 8), ValueError, "basis"),
        (torch.zeros(2, 9, 9), torch.zeros(0, 9, 9), ValueError, "basis"),
        (torch.zeros(2, 4, 4), _BASIS, ValueError, "d"),
        (torch.zeros(2, 9, 9, dtype=torch.int64), _BASIS, TypeError, "reps"),
        (torch.zeros(2, 9, 9), _BASIS.bool(), TypeError, "basis"),
        (torch.zeros(2, 9, 9, dtype=torch.complex64), _BASIS, TypeError, "reps"),
        (np.zeros((2, 9, 9)), _BASIS, TypeError, "reps"),
        (torch.full((2, 9, 9), float("nan")), _BASIS, ValueError, "reps"),
        (torch.zeros(2, 9, 9), _BASIS * float("inf"), ValueError, "basis"),
    ],
)
def test_decompose_rejects_bad_input(reps, basis, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        analysis.decompose(reps, basis)


def test_residual_rejects_bad_coefficients() -> None:
    with pytest.raises(ValueError, match="coefficients"):
        analysis.decomposition_residual(_BASIS, _BASIS, torch.ones(4, 3, dtype=torch.float64) / 3)


@pytest.mark.parametrize(
    ("reps", "error"),
    [
        (torch.zeros(4), ValueError),
        (torch.zeros(3, 4), ValueError),
        (torch.full((3, 3), float("nan")), ValueError),
        (torch.zeros(3, 3, dtype=torch.complex64), TypeError),
        ([[1.0]], TypeError),
    ],
)
def test_nearest_permutation_rejects_bad_input(reps, error: type[Exception]) -> None:
    with pytest.raises(error, match="reps"):
        analysis.nearest_permutation(reps)
