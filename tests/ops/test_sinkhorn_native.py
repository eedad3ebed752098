"""The native CPU Sinkhorn kernels called directly (``symkernels._C``): ragged forward and backward against
the pure-PyTorch reference (float64 and float32, extreme logits, both domains), the per-matrix early exit and
caps, the saved state (column scalings, domain, iterations), determinism, and the input checks."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
import torch

from symkernels import _native
from symkernels.ops.sinkhorn import RECOMPUTED_MAX_SIZE
from symkernels.reference.sinkhorn import sinkhorn_reference
from tests.testing import assert_as_accurate_as_reference, make_logits, random_permutation_matrix

native = _native.library()
pytestmark = pytest.mark.skipif(
    native is None or not hasattr(native, "sinkhorn_forward"),
    reason=f"native library without the ragged kernels: {_native.native_status().reason}",
)

EPS64 = torch.finfo(torch.float64).eps


# ------------------------------------------------------------------------------------------------------------
# Sinkhorn helpers


def pack(stacks: list[torch.Tensor]) -> tuple[torch.Tensor, list[int], list[int]]:
    """[c, n, n] stacks -> (1-D logits, sizes, counts)."""
    flat = torch.cat([s.reshape(-1) for s in stacks]) if stacks else torch.zeros(0, dtype=torch.float64)
    return flat, [s.shape[-1] for s in stacks], [s.shape[0] for s in stacks]


def unpack(flat: torch.Tensor, sizes: list[int], counts: list[int]) -> list[torch.Tensor]:
    out, offset = [], 0
    for n, c in zip(sizes, counts, strict=True):
        out.append(flat[offset : offset + c * n * n].view(c, n, n))
        offset += c * n * n
    assert offset == flat.numel()
    return out


def forward(stacks, n_iter, tau, tol=0.0, caps=None):
    """The native forward of the stacks, its P packed like the logits (flat, sizes, counts)."""
    flat, sizes, counts = pack(stacks)
    p, cols, domain, iterations = native.sinkhorn_forward(stacks, n_iter, tau, tol, False, caps)
    assert [q.shape for q in p] == [s.shape for s in stacks]
    return flat, sizes, counts, pack(p)[0], cols, domain, iterations


def backward(grads, flat, sizes, counts, cols, domain, iterations, tau):
    stacks = unpack(flat, sizes, counts)
    grad_logits = native.sinkhorn_backward(grads, stacks, cols, domain, iterations, tau)
    return pack(grad_logits)[0]


def reference_with_grad(stack, n_iter, tau, grad, tol=0.0):
    """P, iterations and the autograd gradient of the reference."""
    x = stack.detach().clone().requires_grad_()
    p, iterations = sinkhorn_reference(x, n_iter, tau, tol=tol, return_iterations=True)
    (g,) = torch.autograd.grad(p, x, grad)
    return p.detach(), iterations, g


def ragged_stacks(dtype=torch.float64, scale=1.0, seed=0):
    """A ragged mix: n = 1, a stack with no matrix, odd and vector-width sizes."""
    spec = [(1, 2), (3, 0), (2, 1), (5, 3), (8, 2), (25, 1), (13, 2)]
    return [make_logits(c, n, n, dtype=dtype, scale=scale, seed=seed + i) for i, (n, c) in enumerate(spec)]


def assert_state_is_well_formed(stacks, cols, domain, iterations, n_iter):
    sizes = [s.shape[-1] for s in stacks]
    counts = [s.shape[0] for s in stacks]
    num = sum(counts)
    max_n = max((n for n, c in zip(sizes, counts, strict=True) if c > 0), default=0)
    # A call whose every matrix is small saves no column scalings: its backward recomputes them.
    width = 0 if max_n <= RECOMPUTED_MAX_SIZE else max_n
    assert cols.shape == (num, n_iter, width) and cols.dtype == torch.float64
    assert domain.shape == (num,) and domain.dtype == torch.int32
    assert iterations.shape == (num,) and iterations.dtype == torch.int32
    assert bool(((domain == 0) | (domain == 1)).all())
    assert bool(((iterations >= 1) & (iterations <= n_iter)).all())
    assert torch.isfinite(cols).all()
    m = 0
    for n, c in zip(sizes, counts, strict=True):
        for _ in range(c):
            ran = int(iterations[m])
            assert torch.all(cols[m, ran:] == 0), "rows past the iterations run must be zero"
            assert torch.all(cols[m, :, n:] == 0), "columns past the matrix size must be zero"
            m += 1


def wide_stack():
    """A matrix larger than RECOMPUTED_MAX_SIZE: a call with it saves every matrix's column scalings."""
    return make_logits(1, RECOMPUTED_MAX_SIZE + 1, RECOMPUTED_MAX_SIZE + 1, dtype=torch.float64, seed=99)


def assert_cols_follow_the_recurrence(stack, tau, p, cols, domain, iterations):
    """Independently of the kernel, for every saved t: c_t = 1 / (K' r_t), r_t = 1 / (K c_{t-1}) with
    K = exp(L0 - rowmax) (scaling domain), or g_t = -lse_i(L0 + f_t), f_t = -lse_j(L0 + g_{t-1}) (log domain);
    and P = diag(r_T) K diag(c_T) (or exp(L0 + f_T 1' + 1 g_T'))."""
    n = stack.shape[-1]
    assert cols.shape[-1] >= n, "a call that saved the column scalings"
    for b in range(stack.shape[0]):
        l0 = stack[b] / tau
        ran = int(iterations[b])
        saved = cols[b, :ran, :n]
        if int(domain[b]) == 0:
            k = torch.exp(l0 - l0.amax(-1, keepdim=True))
            prev = torch.ones(n, dtype=torch.float64)
            for t in range(ran):
                r = 1 / (k @ prev)
                torch.testing.assert_close(saved[t], 1 / (k.T @ r), rtol=1e-12, atol=0)
                prev = saved[t]
            rebuilt = r[:, None] * k * saved[-1]
        else:
            prev = torch.zeros(n, dtype=torch.float64)
            for t in range(ran):
                f = -torch.logsumexp(l0 + prev, dim=-1)
                expected = -torch.logsumexp(l0 + f[:, None], dim=-2)
                torch.testing.assert_close(saved[t], expected, rtol=1e-12, atol=1e-12 * l0.abs().max().item())
                prev = saved[t]
            rebuilt = torch.exp(l0 + f[:, None] + saved[-1])
        torch.testing.assert_close(p[b].to(torch.float64), rebuilt, rtol=1e-12, atol=1e-15)


# ------------------------------------------------------------------------------------------------------------
# Sinkhorn forward and backward in float64: the exact map and its exact VJP


@pytest.mark.parametrize("n_iter,tau", [(1, 1.0), (5, 0.5), (20, 1.0), (20, 3.0)])
def test_ragged_forward_and_backward_match_reference(n_iter, tau):
    stacks = ragged_stacks(scale=2.0, seed=n_iter)
    flat, sizes, counts, p, cols, domain, iterations = forward(stacks, n_iter, tau)
    assert p.shape == flat.shape and p.dtype == flat.dtype
    assert_state_is_well_formed(stacks, cols, domain, iterations, n_iter)
    assert torch.all(domain == 0) and torch.all(iterations == n_iter)
    grads = [make_logits(*s.shape, dtype=torch.float64, seed=100 + i) for i, s in enumerate(stacks)]
    grad_logits = backward(grads, flat, sizes, counts, cols, domain, iterations, tau)
    m = 0
    for stack, got_p, got_g, grad in zip(
        stacks, unpack(p, sizes, counts), unpack(grad_logits, sizes, counts), grads, strict=True
    ):
        if stack.shape[0] == 0:
            continue
        want_p, _, want_g = reference_with_grad(stack, n_iter, tau, grad)
        torch.testing.assert_close(got_p, want_p, rtol=1e-12, atol=1e-14)
        scale = want_g.abs().max().clamp_min(1e-300)
        torch.testing.assert_close(got_g / scale, want_g / scale, rtol=0, atol=1e-12)
        count = stack.shape[0]
        state = (cols[m : m + count], domain[m : m + count], iterations[m : m + count])
        assert_cols_follow_the_recurrence(stack, tau, got_p, *state)
        m += count


def test_gradcheck_through_the_native_pair():
    class NativeSinkhorn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, flat, sizes, counts, n_iter, tau, caps):
            stacks = unpack(flat, sizes, counts)
            p, cols, domain, iterations = native.sinkhorn_forward(stacks, n_iter, tau, 0.0, False, caps)
            ctx.save_for_backward(flat, cols, domain, iterations)
            ctx.layout = (sizes, counts, tau)
            return pack(p)[0]

        @staticmethod
        def backward(ctx, grad_p):
            flat, cols, domain, iterations = ctx.saved_tensors
            sizes, counts, tau = ctx.layout
            grads = native.sinkhorn_backward(
                unpack(grad_p, sizes, counts), unpack(flat, sizes, counts), cols, domain, iterations, tau
            )
            grad = pack(grads)[0]
            return grad, None, None, None, None, None

    flat, sizes, counts = pack(
        [make_logits(c, n, n, dtype=torch.float64, seed=n) for n, c in ((1, 1), (3, 2), (4, 1))]
    )
    caps = torch.tensor([2, 1, 3, 5], dtype=torch.int32)
    for caps_or_none in (None, caps):
        x = flat.clone().requires_grad_()
        assert torch.autograd.gradcheck(
            lambda t, caps=caps_or_none: NativeSinkhorn.apply(t, sizes, counts, 5, 0.7, caps), (x,)
        )


def test_extreme_logits_stay_exact():
    """Saturated and sharp logits, tau 1e-3..1e2, logits up to 1e4 in size, n = 1, both domains. The reference
    itself rounds log P with an absolute error ~eps |L0|, so errors are measured relative to
    kappa = max(1, |L0|) (and gradients to their natural scale max|grad_p| / tau): within ~50 eps of that."""
    gen = torch.Generator().manual_seed(0)
    makers = {
        "saturated": lambda n: 1e4 * torch.rand(2, n, n, dtype=torch.float64, generator=gen),
        "signed": lambda n: 1e4 * torch.randn(2, n, n, dtype=torch.float64, generator=gen),
        "sharp": lambda n: 3 * torch.randn(2, n, n, dtype=torch.float64, generator=gen),
        "near_permutation": lambda n: (
            8 * random_permutation_matrix(n, seed=n).expand(2, n, n)
            + 0.1 * torch.randn(2, n, n, dtype=torch.float64, generator=gen)
        ),
    }
    domains_seen = set()
    for (name, make), n, tau, n_iter in itertools.product(
        makers.items(), (1, 2, 7, 25), (1e-3, 1e-1, 1.0, 1e2), (1, 20)
    ):
        stack = make(n)
        flat, sizes, counts, p, cols, domain, iterations = forward([stack], n_iter, tau)
        grad = torch.randn(stack.shape, dtype=torch.float64, generator=gen)
        grad_logits = backward([grad], flat, sizes, counts, cols, domain, iterations, tau)
        assert torch.isfinite(p).all() and torch.isfinite(grad_logits).all(), (name, n, tau)
        want_p, _, want_g = reference_with_grad(stack, n_iter, tau, grad)
        kappa = max(1.0, (stack / tau).abs().max().item())
        p_error = (p.view_as(want_p) - want_p).abs().max().item()
        g_error = (grad_logits.view_as(want_g) - want_g).abs().max().item() * tau / grad.abs().max().item()
        assert p_error <= 50 * EPS64 * kappa, (name, n, tau, n_iter, p_error)
        assert g_error <= 50 * EPS64 * kappa, (name, n, tau, n_iter, g_error)
        domains_seen.update(domain.tolist())
    assert domains_seen == {0, 1}


def test_log_domain_for_spread_and_non_finite_logits():
    spread = torch.tensor([[[0.0, 400.0], [1.0, 0.0]]], dtype=torch.float64)  # within-row spread 400 > 300
    mild = make_logits(1, 2, 2, dtype=torch.float64)
    stack = torch.cat([spread, mild])
    flat, sizes, counts, p, cols, domain, iterations = forward([stack, wide_stack()], 6, 1.0)
    assert domain.tolist() == [1, 0, 0]
    p = unpack(p, sizes, counts)[0]
    torch.testing.assert_close(p, sinkhorn_reference(stack, 6, 1.0), rtol=1e-12, atol=1e-14)
    assert_cols_follow_the_recurrence(stack, 1.0, p, cols[:2], domain[:2], iterations[:2])
    nan = torch.tensor([[[0.0, float("nan")], [0.0, 0.0]]], dtype=torch.float64)
    *_, domain, _ = forward([torch.cat([nan, mild])], 3, 1.0)
    assert domain.tolist() == [1, 0]


@pytest.mark.parametrize("tol", [1e-3, 1e-6])
def test_early_exit_matches_reference(tol):
    gen = torch.Generator().manual_seed(int(-torch.log10(torch.tensor(tol))))
    stacks = [
        torch.rand(3, 25, 25, dtype=torch.float64, generator=gen),  # converges in a few iterations
        3 * torch.randn(2, 9, 9, dtype=torch.float64, generator=gen),  # runs longer
        torch.rand(2, 1, 1, dtype=torch.float64, generator=gen),  # n = 1: P_1 = [1] passes at t = 1
    ]
    n_iter, tau = 20, 1.0
    flat, sizes, counts, p, cols, domain, iterations = forward(stacks, n_iter, tau, tol=tol)
    assert_state_is_well_formed(stacks, cols, domain, iterations, n_iter)
    grads = [make_logits(*s.shape, dtype=torch.float64, seed=7 + i) for i, s in enumerate(stacks)]
    grad_logits = backward(grads, flat, sizes, counts, cols, domain, iterations, tau)
    expected_iterations = []
    for stack, got_p, got_g, grad in zip(
        stacks, unpack(p, sizes, counts), unpack(grad_logits, sizes, counts), grads, strict=True
    ):
        want_p, want_it, want_g = reference_with_grad(stack, n_iter, tau, grad, tol=tol)
        m, count = len(expected_iterations), stack.shape[0]
        state = (cols[m : m + count], domain[m : m + count], iterations[m : m + count])
        assert_cols_follow_the_recurrence(stack, tau, got_p, *state)
        expected_iterations += want_it.tolist()
        torch.testing.assert_close(got_p, want_p, rtol=1e-12, atol=1e-14)
        scale = want_g.abs().max().clamp_min(1e-300)
        torch.testing.assert_close(got_g / scale, want_g / scale, rtol=0, atol=1e-12)
    assert iterations.tolist() == expected_iterations
    assert min(expected_iterations) < n_iter, "the early exit must trigger somewhere"
    assert iterations[-2:].tolist() == [1, 1]


def caps_and_one(caps):
    """``caps`` for a call with wide_stack() after the stacks: its matrix capped at the largest cap."""
    return torch.cat([caps, caps.max().reshape(1)])


def test_caps_limit_each_matrix():
    stack = make_logits(5, 6, 6, dtype=torch.float64, scale=3.0)
    caps = torch.tensor([1, 4, 9, 2, 9], dtype=torch.int32)
    for tol in (0.0, 1e-4):
        flat, sizes, counts, p, cols, domain, iterations = forward([stack], 9, 0.5, tol=tol, caps=caps)
        assert_state_is_well_formed([stack], cols, domain, iterations, 9)
        grad = make_logits(5, 6, 6, dtype=torch.float64, seed=1)
        grad_logits = backward([grad], flat, sizes, counts, cols, domain, iterations, 0.5)
        # The same matrices next to a wide one: the saved column scalings, the same P, state and gradient.
        _, _, _, p_saved, saved, *state = forward(
            [stack, wide_stack()], 9, 0.5, tol=tol, caps=caps_and_one(caps)
        )
        assert torch.equal(p_saved[: p.numel()], p) and torch.equal(state[0][:5], domain)
        assert torch.equal(state[1][:5], iterations)
        assert_cols_follow_the_recurrence(stack, 0.5, p.view(5, 6, 6), saved[:5], domain, iterations)
        assert torch.equal(
            backward([grad], flat, sizes, counts, saved[:5, :, :6], domain, iterations, 0.5), grad_logits
        )
        for m in range(5):
            want_p, want_it, want_g = reference_with_grad(
                stack[m : m + 1], int(caps[m]), 0.5, grad[m : m + 1], tol=tol
            )
            assert int(iterations[m]) == int(want_it[0]) <= int(caps[m])
            torch.testing.assert_close(p.view(5, 6, 6)[m : m + 1], want_p, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(grad_logits.view(5, 6, 6)[m : m + 1], want_g, rtol=1e-10, atol=1e-13)
        if tol == 0.0:
            assert iterations.tolist() == caps.tolist()


def test_no_matrices_gives_empty_well_shaped_outputs():
    for stacks in (
        [],
        [torch.zeros(0, 4, 4, dtype=torch.float64), torch.zeros(0, 2, 2, dtype=torch.float64)],
    ):
        p, cols, domain, iterations = native.sinkhorn_forward(stacks, 7, 1.0, 0.0, False, None)
        assert [q.shape for q in p] == [s.shape for s in stacks]
        assert cols.shape == (0, 7, 0) and domain.shape == (0,) and iterations.shape == (0,)
        grads = native.sinkhorn_backward(stacks, stacks, cols, domain, iterations, 1.0)
        assert [g.shape for g in grads] == [s.shape for s in stacks]


def test_float32_is_as_accurate_as_the_float32_reference():
    gen = torch.Generator().manual_seed(0)
    regimes = {
        "uniform": lambda: torch.rand(4, 25, 25, dtype=torch.float64, generator=gen),
        "normal": lambda: torch.randn(3, 36, 36, dtype=torch.float64, generator=gen),
        "sharp": lambda: 3 * torch.randn(3, 16, 16, dtype=torch.float64, generator=gen),
        "near_permutation": lambda: (
            5 * random_permutation_matrix(9, seed=2).expand(3, 9, 9)
            + 0.3 * torch.randn(3, 9, 9, dtype=torch.float64, generator=gen)
        ),
    }
    for make, tau in itertools.product(regimes.values(), (0.5, 1.0, 2.0)):
        truth_logits = make()
        logits = truth_logits.float()
        grad = torch.randn(truth_logits.shape, dtype=torch.float64, generator=gen)
        # The float64 truth starts from the same (float32-rounded) logits.
        truth_p, _, truth_g = reference_with_grad(logits.double(), 20, tau, grad)
        ref_p, _, ref_g = reference_with_grad(logits, 20, tau, grad.float())
        flat, sizes, counts, p, cols, domain, iterations = forward([logits], 20, tau)
        assert p.dtype == torch.float32 and cols.dtype == torch.float64
        grad_logits = backward([grad.float()], flat, sizes, counts, cols, domain, iterations, tau)
        assert grad_logits.dtype == torch.float32
        assert_as_accurate_as_reference(p.view_as(ref_p), ref_p, truth_p)
        assert_as_accurate_as_reference(grad_logits.view_as(ref_g), ref_g, truth_g)


def test_results_do_not_depend_on_threads_or_neighbours():
    stacks = ragged_stacks(seed=5)
    flat, sizes, counts, p, cols, domain, iterations = forward(stacks, 10, 1.0)
    grads = [make_logits(*s.shape, dtype=torch.float64, seed=9 + i) for i, s in enumerate(stacks)]
    grad_logits = backward(grads, flat, sizes, counts, cols, domain, iterations, 1.0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        again = forward(stacks, 10, 1.0)
        assert torch.equal(again[3], p) and torch.equal(again[4], cols)
        assert torch.equal(backward(grads, flat, sizes, counts, cols, domain, iterations, 1.0), grad_logits)
    finally:
        torch.set_num_threads(threads)
    # One stack alone gives the bits it gives inside the mix.
    alone = forward([stacks[5]], 10, 1.0)
    assert torch.equal(alone[3], unpack(p, sizes, counts)[5].reshape(-1))


# ------------------------------------------------------------------------------------------------------------
# Sinkhorn input checks


def _sinkhorn_args(**changes):
    args = {
        "stacks": [make_logits(2, 3, 3, dtype=torch.float64), make_logits(1, 2, 2, dtype=torch.float64)],
        "n_iter": 5,
        "tau": 1.0,
        "tol": 0.0,
        "stop_by_stack": False,
        "caps": None,
    }
    args.update(changes)
    return args


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"stacks": [torch.zeros(2, 3, 3, dtype=torch.int64)]}, "stacks must be float32 or float64"),
        ({"stacks": [torch.zeros(2, 11, dtype=torch.float64)]}, r"stacks\[0\] must have shape \[G, n, n\]"),
        ({"stacks": [torch.zeros(2, 3, 4, dtype=torch.float64)]}, r"stacks\[0\] must have shape \[G, n, n\]"),
        (
            {"stacks": [torch.zeros(2, 0, 0, dtype=torch.float64)]},
            r"stacks\[0\] must have shape \[G, n, n\] with n >= 1, got \[2, 0, 0\]",
        ),
        ({"stacks": [torch.zeros(2, 3, 3, device="meta")]}, r"stacks\[0\] must be a CPU tensor"),
        (
            {"stacks": [torch.zeros(2, 3, 3, dtype=torch.float64), torch.zeros(1, 2, 2)]},
            r"stacks\[1\] must have the dtype of stacks\[0\]",
        ),
        ({"n_iter": 0}, "n_iter must be"),
        ({"tau": 0.0}, "tau must be > 0"),
        ({"tau": float("nan")}, "tau must be > 0"),
        ({"tol": -1e-3}, "tol must be >= 0"),
        ({"caps": torch.ones(3, dtype=torch.int64)}, "caps must be int32"),
        ({"caps": torch.ones(2, dtype=torch.int32)}, r"caps must have shape \[3\]"),
        ({"caps": torch.tensor([1, 0, 2], dtype=torch.int32)}, r"caps must lie in 1..5, got caps\[1\] = 0"),
        ({"caps": torch.tensor([1, 6, 2], dtype=torch.int32)}, r"caps must lie in 1..5, got caps\[1\] = 6"),
    ],
)
def test_forward_rejects_bad_input(changes, match):
    with pytest.raises(RuntimeError, match=f"sinkhorn_forward: {match}"):
        native.sinkhorn_forward(**_sinkhorn_args(**changes))


def test_backward_rejects_bad_input():
    args = _sinkhorn_args()
    p, cols, domain, iterations = native.sinkhorn_forward(**args)
    good = {
        "grad_p": [torch.ones_like(q) for q in p],
        "stacks": args["stacks"],
        "cols": cols,
        "domain": domain,
        "iterations": iterations,
        "tau": 1.0,
    }
    # The small matrices' call saves no column scalings; their backward takes the saved ones as well.
    assert cols.shape == (3, 5, 0)
    expected = native.sinkhorn_backward(**good)
    saved = native.sinkhorn_forward(**_sinkhorn_args(stacks=[*args["stacks"], wide_stack()]))[1]
    for got, want in zip(
        native.sinkhorn_backward(**{**good, "cols": saved[:3, :, :3]}), expected, strict=True
    ):
        assert torch.equal(got, want)
    bad = [
        ({"grad_p": [torch.ones_like(p[0])]}, "grad_p must have one tensor per stack"),
        ({"grad_p": [p[0], p[1][:, :1]]}, r"grad_p\[1\] must have the shape of stacks\[1\]"),
        ({"grad_p": [p[0].float(), p[1]]}, r"grad_p\[0\] must have the dtype of stacks"),
        ({"cols": cols.float()}, "cols must be float64"),
        ({"cols": torch.zeros(3, 5, 2, dtype=torch.float64)}, r"cols must have shape \[M, n_iter, max_n\]"),
        ({"cols": cols[:2]}, r"cols must have shape \[M, n_iter, max_n\]"),
        ({"domain": torch.full((3,), 2, dtype=torch.int32)}, r"domain must lie in 0..1"),
        ({"domain": domain.long()}, "domain must be int32"),
        ({"iterations": torch.full((3,), 6, dtype=torch.int32)}, r"iterations must lie in 1..5"),
        ({"iterations": torch.zeros(3, dtype=torch.int32)}, r"iterations must lie in 1..5"),
        ({"iterations": iterations[:2]}, r"iterations must have shape \[3\]"),
        ({"tau": -1.0}, "tau must be > 0"),
        ({"stacks": args["stacks"][:1]}, "grad_p must have one tensor per stack"),
    ]
    for changes, match in bad:
        with pytest.raises(RuntimeError, match=f"sinkhorn_backward: {match}"):
            native.sinkhorn_backward(**{**good, **changes})


# ------------------------------------------------------------------------------------------------------------
# The small-matrix path (n <= 8: several matrices per vector, one per lane)


@pytest.mark.parametrize("n_iter", [20, 7])
def test_small_matrix_path_saved_state(n_iter):
    """cols, domain and iterations of tiny matrices: c_t of each matrix (zero past its iterations and size),
    in one stack and in a ragged mix of sizes padded to 2, 4 and 8 (slabs narrower than max_n), with caps,
    the tolerance, a log-domain matrix; saved only next to a wide matrix, else none (cols [M, T, 0]), the same
    P, domain and iterations either way, and the backward gives the same bits from either form of cols."""
    single = [make_logits(19, 4, 4, dtype=torch.float64, scale=2.0, seed=1)]
    mixed = [
        make_logits(c, n, n, dtype=torch.float64, scale=2.0, seed=n)
        for n, c in ((3, 9), (8, 5), (2, 11), (1, 3))
    ]
    mixed[1][2] *= 400.0  # log domain
    for small in (single, mixed):
        count = sum(s.shape[0] for s in small)
        max_n = max(s.shape[-1] for s in small)
        caps = torch.randint(1, n_iter + 1, (count,), generator=torch.Generator().manual_seed(n_iter))
        grads = [make_logits(*s.shape, dtype=torch.float64, seed=5) for s in small]
        for tol, cap in (
            (0.0, None),
            (1e-6, None),
            (0.0, caps.to(torch.int32)),
            (1e-6, caps.to(torch.int32)),
        ):
            flat, sizes, counts, p, cols, domain, iterations = forward(small, n_iter, 0.8, tol=tol, caps=cap)
            assert_state_is_well_formed(small, cols, domain, iterations, n_iter)
            assert cols.shape == (count, n_iter, 0)
            grad = backward(grads, flat, sizes, counts, cols, domain, iterations, 0.8)

            stacks = [*small, wide_stack()]
            wide_caps = None if cap is None else caps_and_one(cap)
            _, _, _, p_saved, saved, *state = forward(stacks, n_iter, 0.8, tol=tol, caps=wide_caps)
            assert_state_is_well_formed(stacks, saved, *state, n_iter)
            assert torch.equal(p_saved[: p.numel()], p)
            assert torch.equal(state[0][:count], domain) and torch.equal(state[1][:count], iterations)
            m = 0
            for stack, got_p in zip(small, unpack(p, sizes, counts), strict=True):
                count_l = stack.shape[0]
                part = (saved[m : m + count_l], domain[m : m + count_l], iterations[m : m + count_l])
                assert_cols_follow_the_recurrence(stack, 0.8, got_p, *part)
                m += count_l
            again = backward(grads, flat, sizes, counts, saved[:count, :, :max_n], domain, iterations, 0.8)
            assert torch.equal(again, grad)
            if small is mixed:
                assert domain.nonzero().flatten().tolist() == [9 + 2]  # the spread-out 8x8 matrix


def test_wide_calls_backward_from_no_saved_cols():
    """A call with matrices above RECOMPUTED_MAX_SIZE saves cols; given cols [M, T, 0] instead, the
    per-matrix backward recomputes them (scaling and log domain, the tolerance): the same gradient, to an ulp
    (reading cols back, it recomputes r_t with row_dots, whose sums may round apart from the row pass's)."""
    stacks = ragged_stacks(scale=2.0, seed=3)
    stacks[5][0, 0, 1] = 500.0  # the 25x25 matrix in the log domain
    grads = [make_logits(*s.shape, dtype=torch.float64, seed=6) for s in stacks]
    for tol in (0.0, 1e-6):
        flat, sizes, counts, p, cols, domain, iterations = forward(stacks, 12, 0.7, tol=tol)
        assert cols.shape[-1] == 25 and set(domain.tolist()) == {0, 1}
        grad = backward(grads, flat, sizes, counts, cols, domain, iterations, 0.7)
        empty = cols.new_zeros(cols.shape[0], cols.shape[1], 0)
        again = backward(grads, flat, sizes, counts, empty, domain, iterations, 0.7)
        torch.testing.assert_close(again, grad, rtol=4 * EPS64, atol=4 * EPS64)


def test_small_matrices_do_not_depend_on_neighbours_tasks_or_threads():
    """2,000 4x4 matrices (several tasks): the same bits at 1 and 2 threads, and each matrix the same bits
    alone as in the batch (forward and backward)."""
    stack = make_logits(2000, 4, 4, dtype=torch.float32, scale=2.0, seed=3)
    grad = make_logits(2000, 4, 4, dtype=torch.float32, seed=4)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            flat, sizes, counts, p, cols, domain, iterations = forward([stack], 20, 1.0)
            g = backward([grad], flat, sizes, counts, cols, domain, iterations, 1.0)
            results.append((p, cols, g))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
    p, cols, g = results[0]
    for m in (0, 7, 8, 1234, 1999):
        one = stack[m : m + 1]
        flat, sizes, counts, p1, cols1, domain1, iterations1 = forward([one], 20, 1.0)
        g1 = backward([grad[m : m + 1]], flat, sizes, counts, cols1, domain1, iterations1, 1.0)
        assert torch.equal(p1, p.view(2000, 16)[m]) and torch.equal(cols1[0], cols[m])
        assert torch.equal(g1, g.view(2000, 16)[m])


NARROWER_VECTORS_CHECK = """
import torch
from symkernels import _native
from symkernels.ops.sinkhorn import RECOMPUTED_MAX_SIZE
from symkernels.reference.sinkhorn import sinkhorn_reference
native = _native.library()
generator = torch.Generator().manual_seed(0)
for n, count in ((4, 13), (3, 6), (8, 5), (2, 9)):
    for tol in (0.0, 1e-6):
        x = 2 * torch.randn(count, n, n, dtype=torch.float64, generator=generator)
        grad = torch.randn(count, n, n, dtype=torch.float64, generator=generator)
        p, cols, domain, iterations = native.sinkhorn_forward([x], 20, 0.9, tol, False, None)
        (g,) = native.sinkhorn_backward([grad], [x], cols, domain, iterations, 0.9)
        y = x.clone().requires_grad_()
        want, want_iterations = sinkhorn_reference(y, 20, 0.9, tol=tol, return_iterations=True)
        (want_grad,) = torch.autograd.grad(want, y, grad)
        assert torch.equal(iterations, want_iterations), (n, tol)
        torch.testing.assert_close(p[0], want.detach(), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(g, want_grad, rtol=1e-10, atol=1e-13)
print("ok")
"""


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_small_matrix_path_with_narrower_vectors(isa):
    """The builds for narrower vectors (4 matrices per group), which SYMKERNELS_CPU_ISA selects on a wider
    CPU, against the reference; each in a process of its own, since the ISA is chosen once per process."""
    env = {**os.environ, "SYMKERNELS_CPU_ISA": isa}
    result = subprocess.run(
        [sys.executable, "-c", NARROWER_VECTORS_CHECK], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
