"""Sinkhorn's mathematical properties (on the automatic backend), the reference and the authors' loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import symkernels
from symkernels.reference import authors_representation_stack, sinkhorn_early_exit, sinkhorn_reference
from tests.testing import TOLERANCES, make_logits, random_permutation_matrix


def converged_sinkhorn_knopp(logits: np.ndarray, tau: float) -> np.ndarray:
    """Independent solver: entropic OT with unit marginals, cost −Θ, regularisation τ, run to convergence.

    NumPy, scaling form, iterated until the marginals hold to 1e-14: a different computation that converges
    to the same unique doubly stochastic ``diag(u) exp(Θ/τ) diag(v)``.
    """
    kernel = np.exp((logits - logits.max()) / tau)
    u = np.ones(logits.shape[0])
    v = np.ones(logits.shape[1])
    for _ in range(100_000):
        u = 1.0 / (kernel @ v)
        v = 1.0 / (kernel.T @ u)
        plan = u[:, None] * kernel * v[None, :]
        if np.abs(plan.sum(axis=1) - 1).max() < 1e-14:
            return plan
    raise AssertionError("reference solver did not converge")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_marginals_are_one(dtype):
    p = symkernels.sinkhorn(make_logits(5, 25, 25, dtype=dtype), n_iter=50)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(p.sum(-2), torch.ones(5, 25, dtype=dtype), **tol)
    torch.testing.assert_close(p.sum(-1), torch.ones(5, 25, dtype=dtype), rtol=0, atol=1e-4)
    assert (p >= 0).all()


def test_columns_exact_after_one_iteration():
    p = symkernels.sinkhorn(make_logits(3, 7, 7, dtype=torch.float64, scale=3.0), n_iter=1)
    torch.testing.assert_close(p.sum(-2), torch.ones(3, 7, dtype=torch.float64))
    assert (p.sum(-1) - 1).abs().max() > 1e-3  # rows are not yet balanced after one iteration


def test_invariant_to_row_shifts_at_every_t():
    logits = make_logits(4, 9, 9, dtype=torch.float64, scale=2.0)
    shifted = logits + make_logits(4, 9, 1, dtype=torch.float64, seed=1, scale=5.0)
    for n_iter in (1, 3, 20):
        torch.testing.assert_close(
            symkernels.sinkhorn(shifted, n_iter),
            symkernels.sinkhorn(logits, n_iter),
            **TOLERANCES[torch.float64],
        )


def test_invariant_to_column_shifts_once_converged():
    # Rows are normalised first, so a column shift changes every finite-T iterate; the fixed point is shared.
    logits = make_logits(4, 9, 9, dtype=torch.float64, scale=2.0)
    shifted = logits + make_logits(4, 1, 9, dtype=torch.float64, seed=2, scale=5.0)
    assert not torch.allclose(symkernels.sinkhorn(shifted, 1), symkernels.sinkhorn(logits, 1))
    torch.testing.assert_close(
        symkernels.sinkhorn(shifted, 3000), symkernels.sinkhorn(logits, 3000), rtol=1e-9, atol=1e-11
    )


def test_permutation_equivariant():
    logits = make_logits(11, 11, dtype=torch.float64, scale=2.0)
    a, b = random_permutation_matrix(11, seed=1), random_permutation_matrix(11, seed=2)
    torch.testing.assert_close(
        symkernels.sinkhorn(a @ logits @ b), a @ symkernels.sinkhorn(logits) @ b, **TOLERANCES[torch.float64]
    )


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_agrees_with_converged_solver_at_large_t(tau):
    logits = make_logits(3, 12, 12, dtype=torch.float64, scale=1.5)
    p = symkernels.sinkhorn(logits, n_iter=2000, tau=tau)
    for matrix, logit in zip(p, logits, strict=True):
        expected = torch.from_numpy(converged_sinkhorn_knopp(logit.numpy(), tau))
        torch.testing.assert_close(matrix, expected, rtol=1e-9, atol=1e-11)


def test_temperature_divides_logits():
    logits = make_logits(2, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(
        symkernels.sinkhorn(logits, tau=0.25), symkernels.sinkhorn(logits * 4, tau=1.0)
    )


@pytest.mark.parametrize("shape", [(6, 6), (3, 6, 6), (2, 3, 6, 6), (0, 6, 6), (1, 1, 1)])
def test_batch_shapes(shape):
    logits = make_logits(*shape)
    p = symkernels.sinkhorn(logits)
    assert p.shape == logits.shape
    flat_logits, flat_p = logits.reshape(-1, *shape[-2:]), p.reshape(-1, *shape[-2:])
    for matrix_logits, matrix_p in zip(flat_logits, flat_p, strict=True):
        torch.testing.assert_close(matrix_p, symkernels.sinkhorn(matrix_logits))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_computed_in_float32(dtype):
    logits = make_logits(3, 10, 10, dtype=dtype)
    p = symkernels.sinkhorn(logits)
    assert p.dtype == dtype
    torch.testing.assert_close(p, sinkhorn_reference(logits.float()).to(dtype), rtol=0, atol=0)


def test_float64_stays_float64():
    assert symkernels.sinkhorn(make_logits(4, 4, dtype=torch.float64)).dtype == torch.float64


def test_authors_loop_stops_once_doubly_stochastic():
    uniform = torch.full((2, 25, 25), -math.log(25))  # already doubly stochastic: no iteration runs
    assert torch.equal(sinkhorn_early_exit(uniform), uniform.exp())
    logits = torch.rand(3, 25, 25, generator=torch.Generator().manual_seed(0))
    early = sinkhorn_early_exit(logits)
    torch.testing.assert_close(early, sinkhorn_reference(logits, n_iter=20), rtol=1e-4, atol=1e-5)
    ones = torch.ones(3, 25)
    assert torch.allclose(early.sum(-1), ones) and torch.allclose(early.sum(-2), ones)


def test_authors_stack_prepends_identity():
    logits = torch.rand(3, 9, 9)
    stack = authors_representation_stack(logits)
    assert stack.shape == (4, 9, 9)
    assert torch.equal(stack[0], torch.eye(9))
    torch.testing.assert_close(stack[1:], sinkhorn_early_exit(logits))


def test_representation_stack():
    logits = make_logits(3, 9, 9)
    stack = symkernels.representation_stack(logits, n_iter=7, tau=0.5)
    assert torch.equal(stack[0], torch.eye(9))
    torch.testing.assert_close(stack[1:], symkernels.sinkhorn(logits, n_iter=7, tau=0.5))
    free = symkernels.representation_stack(logits, fix_identity=False)
    torch.testing.assert_close(free, symkernels.sinkhorn(logits))


def test_reference_tolerance_matches_the_authors_loop():
    """stop='stack' at the authors' tolerance is their loop: same P, same iterations (init and sharper)."""
    generator = torch.Generator().manual_seed(3)
    for logits in (
        torch.rand(3, 25, 25, generator=generator),
        2 * torch.randn(3, 16, 16, generator=generator),
    ):
        p, iterations = sinkhorn_reference(
            logits, 20, tol=symkernels.AUTHORS_TOLERANCE, stop="stack", return_iterations=True
        )
        assert torch.equal(p, sinkhorn_early_exit(logits, 20))
        assert len(set(iterations.tolist())) == 1
    per_matrix = sinkhorn_reference(logits, 20, tol=symkernels.AUTHORS_TOLERANCE, return_iterations=True)[1]
    assert int(per_matrix.max()) == int(iterations[0])
