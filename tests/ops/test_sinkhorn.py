"""``symkernels::sinkhorn``: every implementation (native CPU, Triton, native CUDA) against the reference.

One matrix of cases, run for each implementation (conftest.py's ``implementation`` fixture): P, the
iterations each matrix ran and the exact gradient, for sizes, dtypes, temperatures, both domains, the
tolerance exit (per matrix and per stack), ragged groups of stacks; then gradients (gradcheck, the implicit
gradient, low precision) and the functional API's errors. The op contract is in tests/ops/test_sinkhorn_op.py.
Without a GPU, Triton runs in its CPU interpreter on tiny shapes.
"""

from __future__ import annotations

import pytest
import torch

import symkernels
from symkernels.reference import sinkhorn_reference
from symkernels.reference.sinkhorn import AUTHORS_TOLERANCE
from tests.testing import assert_as_accurate_as_reference, make_logits, non_contiguous


def rounded(logits64: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float64 values the kernel sees in ``dtype`` (so input rounding is not counted as error)."""
    return logits64.to(dtype).to(torch.float64)


def check_against_reference(
    impl, logits64, n_iter, tau, dtype, *, tol=None, stop="matrix", prepare=None, poison=None
):
    """P, iterations and the gradient: at least as accurate (vs float64) as the same-dtype reference.
    ``poison()``, if given, runs before the forward and before the backward (see ``poisoned_outputs``)."""
    logits64 = rounded(logits64, dtype).requires_grad_()
    truth, truth_iterations = sinkhorn_reference(
        logits64, n_iter, tau, tol=tol or 0.0, stop=stop, return_iterations=True
    )
    grad = rounded(make_logits(*truth.shape, dtype=torch.float64, seed=11), dtype)
    (truth_grad,) = torch.autograd.grad(truth, logits64, grad)

    low = logits64.detach().to(dtype).requires_grad_()
    expected = sinkhorn_reference(low, n_iter, tau, tol=tol or 0.0, stop=stop)
    (expected_grad,) = torch.autograd.grad(expected, low, grad.to(dtype))

    x = low.detach().to(impl.device).requires_grad_()
    if poison is not None:
        poison()
    p, iterations = symkernels.sinkhorn(
        x if prepare is None else prepare(x),
        n_iter,
        tau,
        tol=tol,
        stop=stop,
        backend=impl.name,
        return_iterations=True,
    )
    grad_device = grad.to(dtype).to(impl.device)
    if poison is not None:
        poison()
    (got_grad,) = torch.autograd.grad(p, x, grad_device)
    assert p.shape == truth.shape and p.dtype == dtype and p.device.type == impl.device.type
    assert got_grad.shape == x.shape and got_grad.dtype == dtype
    if tol:
        assert torch.equal(iterations.cpu(), truth_iterations), (iterations, truth_iterations)
    else:
        assert bool((iterations == n_iter).all())
    assert_as_accurate_as_reference(p.detach().cpu(), expected.detach(), truth.detach())
    assert_as_accurate_as_reference(got_grad.cpu(), expected_grad, truth_grad)


@pytest.mark.smoke
@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 16, 25])
def test_matches_reference_for_each_size(implementation, n):
    for dtype in implementation.dtypes:
        check_against_reference(
            implementation, make_logits(3, n, n, dtype=torch.float64, scale=2.0), 5, 0.7, dtype
        )


@pytest.mark.parametrize(("n_iter", "tau"), [(1, 1.0), (3, 0.5), (20, 2.0)])
def test_matches_reference_for_iterations_and_temperature(implementation, n_iter, tau):
    check_against_reference(
        implementation, make_logits(2, 6, 6, dtype=torch.float64), n_iter, tau, torch.float32
    )


@pytest.mark.parametrize("n", [36, 100])
def test_paper_sizes(implementation, n):
    if implementation.interpreted:
        pytest.skip("needs a CUDA GPU: n = 36, 100 are too slow for Triton's interpreter")
    for dtype in implementation.dtypes:
        check_against_reference(implementation, make_logits(3, n, n, dtype=torch.float64), 20, 1.0, dtype)


GPU_SIZES = [1, 3, 9, 16, 25, 36, 49, 64, 100, 196, 256, 392, 784]


@pytest.mark.cuda
@pytest.mark.parametrize("n_iter", [1, 20, 50])
@pytest.mark.parametrize("n", GPU_SIZES)
def test_gpu_parity_matrix(implementation, n, n_iter, monkeypatch):
    """The GPU implementations at every kernel layout's sizes, in every dtype, with and without the tolerance
    exit, every output allocated on poisoned memory (every output element must be written)."""
    if implementation.device.type != "cuda":
        pytest.skip("needs an implementation that runs on a CUDA GPU")
    batch = max(1, 4096 // (n * n))
    logits = make_logits(batch, n, n, dtype=torch.float64, seed=n + n_iter)
    poison = poisoned_outputs(implementation, monkeypatch)
    for dtype in implementation.dtypes:
        check_against_reference(implementation, logits, n_iter, 1.0, dtype, poison=poison)
    check_against_reference(implementation, logits, n_iter, 1.0, torch.float32, tol=1e-4, poison=poison)


# Sizes of the allocations a parity case makes, from an int32 flag to the largest saved state: each must come
# out of the caching allocator poisoned.
_PROBE_BYTES = (4, 512, 4096, 100_000, 1 << 20, (1 << 20) + 1, 6 << 20, 40 << 20)


def poisoned_outputs(implementation, monkeypatch):
    """A function that makes the next outputs of the op start as 0xFF bytes (NaN in every float type, -1 in
    int32), to be called before each call whose outputs must all be written.

    The Triton launchers' allocations are poisoned where they are made (tests.triton_testing.poison). The C++
    entry points allocate through PyTorch's caching allocator, which serves a request from its cached free
    blocks: each call empties the cache, then fills and frees blocks for both of its pools (requests of up to
    1 MB are carved from 2 MB segments, larger ones from large blocks), so that whatever block a request is
    served from holds 0xFF; allocations of the sizes a case makes are checked to come out poisoned.
    """
    if implementation.name == "triton":
        from symkernels.ops import sinkhorn_triton
        from tests.triton_testing import poison

        poison(monkeypatch, sinkhorn_triton)

    def poison_cache() -> None:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        blocks = [torch.empty(1 << 20, dtype=torch.uint8, device="cuda") for _ in range(64)]  # small pool
        blocks.append(torch.empty(256 << 20, dtype=torch.uint8, device="cuda"))  # large pool
        for block in blocks:
            block.fill_(0xFF)
        del blocks
        # Read on the host: a comparison on the device would write its result into the poisoned blocks.
        probes = [torch.empty(size, dtype=torch.uint8, device="cuda").cpu() for size in _PROBE_BYTES]
        assert all(bool((probe == 0xFF).all()) for probe in probes), "the allocator served unpoisoned memory"

    return poison_cache


# Cases the property tests found (tests/ops/test_properties.py, long profile): float32, grad_p linspace.
# "saturated": one iteration at tau ≈ 2.4e-3; the true gradient of row 1 is ±1.6e-14, about 1e-17 of
# |grad_p| / tau, and one float64 ulp of P[1, 0] (≈ 1) moves it by about that much (the float64 autograd truth
# gets P[1, 0] exactly 1 and one of those entries exactly 0). "cancelling": two iterations of near-uniform
# logits at tau = 1; the gradient is ±2.6e-6 against |grad_p| / tau = 1, so a float32 kernel resolves it to
# float32 ulps of 1 (3e-8 in Triton's interpreter), the float32 reference's autograd to 2e-10.
FOUND_CASES = {
    "saturated": ([[-0.0075, 0.5364], [-0.8230, -0.7359]], 1, 10.0**-2.625),
    "cancelling": ([[-0.0007, 0.0536], [-0.0823, -0.0736]], 2, 1.0),
}


@pytest.mark.parametrize("case", list(FOUND_CASES))
def test_gradients_far_below_their_scale(implementation, case):
    """Each entry within a few ulps of |grad_p| / tau in the kernel's compute precision (and of its own size
    in float32), and the row sums of the gradient zero to the same bound (every iteration starts by
    normalising the rows, so shifting a row of logits changes nothing)."""
    values, n_iter, tau = FOUND_CASES[case]
    logits = torch.tensor([values], dtype=torch.float32)
    grad_p = torch.linspace(-1, 1, 4).reshape(1, 2, 2)
    x = logits.to(implementation.device).requires_grad_()
    p = symkernels.sinkhorn(x, n_iter, tau, backend=implementation.name)
    (grad,) = torch.autograd.grad(p, x, grad_p.to(implementation.device))
    exact = logits.double().requires_grad_()
    (truth,) = torch.autograd.grad(sinkhorn_reference(exact, n_iter, tau), exact, grad_p.double())
    largest = float(truth.abs().max())
    assert largest < 1e-5  # the case is still one of tiny gradients
    # (plus the float32 rounding of the result itself)
    bound = 4 * torch.finfo(implementation.compute_dtype(torch.float32, 2)).eps / tau + 32 * 1.2e-7 * largest
    assert float((grad.cpu().double() - truth).abs().max()) <= bound
    assert float(grad.cpu().double().sum(-1).abs().max()) <= bound


@pytest.mark.parametrize("scale", [40.0, 1e3], ids=["spread-logits", "huge-logits"])
def test_log_domain_matrices(implementation, scale):
    """Logits too spread out for the scaling domain go to the log domain, per matrix."""
    logits = make_logits(3, 5, 5, dtype=torch.float64, seed=4)
    logits[1] *= scale
    check_against_reference(implementation, logits, 4, 1.0, torch.float32)


@pytest.mark.parametrize(
    ("tol", "stop", "scale"),
    [(1e-3, "matrix", 1.0), (AUTHORS_TOLERANCE, "matrix", 2.0), (AUTHORS_TOLERANCE, "stack", 2.0)],
)
def test_tolerance_exit_matches_reference(implementation, tol, stop, scale):
    """Each matrix stops at the reference's iteration, and the gradient is that of the iterations it ran."""
    logits = make_logits(4, 6, 6, dtype=torch.float64, scale=scale, seed=5)
    logits[0] = make_logits(6, 6, dtype=torch.float64, scale=0.05, seed=6)  # converges within 2 iterations
    for dtype in implementation.dtypes[:1]:
        check_against_reference(implementation, logits, 20, 1.0, dtype, tol=tol, stop=stop)


def test_tolerance_at_the_papers_initialisation_matches_the_authors_loop(implementation):
    """U[0, 1) logits: the authors' loop stops after 2-3 iterations; so does stop='stack' at their tol, with
    the gradient of their loop."""
    from symkernels.reference import sinkhorn_early_exit

    n = 9 if implementation.interpreted else 25
    logits = torch.rand(3, n, n, generator=torch.Generator().manual_seed(0))
    ours = logits.to(implementation.device).requires_grad_()
    p, iterations = symkernels.sinkhorn(
        ours,
        20,
        tol=AUTHORS_TOLERANCE,
        stop="stack",
        backend=implementation.name,
        return_iterations=True,
    )
    _, expected_iterations = sinkhorn_reference(
        logits.double(), 20, tol=AUTHORS_TOLERANCE, stop="stack", return_iterations=True
    )
    assert torch.equal(iterations.cpu(), expected_iterations) and 2 <= int(iterations[0]) <= 3
    theirs = logits.clone().requires_grad_()
    expected = sinkhorn_early_exit(theirs, 20)
    torch.testing.assert_close(p.cpu(), expected.detach(), rtol=1e-5, atol=1e-6)
    grad_p = make_logits(3, n, n, seed=7)
    (grad,) = torch.autograd.grad(p, ours, grad_p.to(implementation.device))
    (expected_grad,) = torch.autograd.grad(expected, theirs, grad_p)
    torch.testing.assert_close(grad.cpu(), expected_grad, rtol=1e-4, atol=1e-6)


def test_grouped_stacks_match_each_stack(implementation):
    """One call for stacks of different sizes (n = 1, an empty stack, a log-domain one) equals each alone."""
    shapes = [(3, 2), (2, 5), (0, 4), (1, 1), (2, 3)]
    stacks64 = [make_logits(g, n, n, dtype=torch.float64, scale=2.0, seed=n) for g, n in shapes]
    stacks64[1][0] *= 60.0
    stacks = [s.float().to(implementation.device).requires_grad_() for s in stacks64]
    grads = [make_logits(*s.shape, seed=20 + i) for i, s in enumerate(stacks)]
    outputs, iterations = symkernels.grouped_sinkhorn(
        stacks, 4, 0.7, tol=1e-4, backend=implementation.name, return_iterations=True
    )
    got_grads = torch.autograd.grad(outputs, stacks, [g.to(implementation.device) for g in grads])
    for s64, out, it, grad, got_grad in zip(stacks64, outputs, iterations, grads, got_grads, strict=True):
        x = s64.float().requires_grad_()
        expected, expected_it = sinkhorn_reference(x, 4, 0.7, tol=1e-4, return_iterations=True)
        (expected_grad,) = torch.autograd.grad(expected, x, grad) if x.numel() else (torch.zeros_like(x),)
        assert out.shape == s64.shape and torch.equal(it.cpu(), expected_it)
        torch.testing.assert_close(out.detach().cpu(), expected.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_grad.cpu(), expected_grad, rtol=1e-4, atol=1e-6)


def test_batch_shapes_and_strides(implementation):
    for shape in [(5, 5), (2, 3, 5, 5), (0, 5, 5)]:
        logits = make_logits(*shape).to(implementation.device)
        expected = sinkhorn_reference(logits.cpu(), 3)
        torch.testing.assert_close(
            symkernels.sinkhorn(logits, 3, backend=implementation.name).cpu(), expected
        )
    logits = make_logits(3, 5, 5).to(implementation.device)
    torch.testing.assert_close(
        symkernels.sinkhorn(non_contiguous(logits), 3, backend=implementation.name).cpu(),
        sinkhorn_reference(non_contiguous(logits.cpu()), 3),
    )


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # the Triton interpreter's numpy
def test_non_finite_logits_make_only_their_matrix_nan(implementation):
    logits = make_logits(2, 4, 4, seed=10)
    logits[0, 1, 2] = float("nan")
    p = symkernels.sinkhorn(
        logits.to(implementation.device), 3, backend=implementation.name, check_finite=False
    )
    assert bool(torch.isnan(p[0].cpu()).all())
    torch.testing.assert_close(p[1].cpu(), sinkhorn_reference(logits[1], 3))


@pytest.mark.parametrize("tau", [1e-3, 1.0])
def test_extreme_logits_give_finite_outputs_and_gradients(implementation, tau):
    n = 5 if implementation.interpreted else 25
    logits = 1e4 * torch.rand(3, n, n, generator=torch.Generator().manual_seed(0))
    x = logits.to(implementation.device).requires_grad_()
    p = symkernels.sinkhorn(x, 20, tau, backend=implementation.name)
    (g,) = torch.autograd.grad(p, x, torch.randn_like(p))
    assert torch.isfinite(p).all() and torch.isfinite(g).all()
    torch.testing.assert_close(p.sum(-2).cpu(), torch.ones(3, n), rtol=0, atol=1e-4)


def test_gradcheck_float64():
    logits = make_logits(2, 5, 5, dtype=torch.float64).requires_grad_()
    for tol in (None, 1e-3):
        assert torch.autograd.gradcheck(
            lambda t, tol=tol: symkernels.sinkhorn(t, 4, 0.7, tol=tol, backend="cpu"), (logits,)
        )


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_implicit_matches_unrolled_once_converged(backend):
    logits = make_logits(2, 8, 8, dtype=torch.float64, scale=1.5).requires_grad_()
    grad = make_logits(2, 8, 8, dtype=torch.float64, seed=3)
    implicit = torch.autograd.grad(
        symkernels.sinkhorn(logits, 400, backend=backend, backward="implicit"), logits, grad
    )
    unrolled = torch.autograd.grad(symkernels.sinkhorn(logits, 400, backend=backend), logits, grad)
    torch.testing.assert_close(implicit[0], unrolled[0], rtol=1e-8, atol=1e-10)
    # ... and differs when the forward has not converged.
    early_implicit = torch.autograd.grad(
        symkernels.sinkhorn(logits, 2, backend=backend, backward="implicit"), logits, grad
    )
    early_unrolled = torch.autograd.grad(symkernels.sinkhorn(logits, 2, backend=backend), logits, grad)
    assert not torch.allclose(early_implicit[0], early_unrolled[0], rtol=1e-3, atol=1e-6)


def test_implicit_gradient_matches_finite_difference_of_converged_map():
    logits = make_logits(1, 5, 5, dtype=torch.float64, scale=1.0)
    direction = make_logits(1, 5, 5, dtype=torch.float64, seed=9)
    grad = make_logits(1, 5, 5, dtype=torch.float64, seed=10)
    x = logits.clone().requires_grad_()
    (g,) = torch.autograd.grad(symkernels.sinkhorn(x, 3000, backward="implicit"), x, grad)
    eps = 1e-6
    plus = symkernels.sinkhorn(logits + eps * direction, 3000)
    minus = symkernels.sinkhorn(logits - eps * direction, 3000)
    finite_difference = ((plus - minus) / (2 * eps) * grad).sum()
    torch.testing.assert_close((g * direction).sum(), finite_difference, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_computes_low_precision_in_float32(dtype):
    logits = make_logits(3, 9, 9, dtype=dtype)
    p = symkernels.sinkhorn(logits, backend="cpu")
    assert p.dtype == dtype
    torch.testing.assert_close(p.float(), sinkhorn_reference(logits.float()), rtol=1e-2, atol=1e-3)


# ------------------------------------------------------------------------------------------------------------
# The functional API's checks (shared by every implementation).


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: symkernels.sinkhorn([[1.0]]), TypeError, "logits must be a torch.Tensor"),
        (lambda: symkernels.sinkhorn(torch.ones(2, 3, 3, dtype=torch.int64)), TypeError, "floating dtype"),
        (lambda: symkernels.sinkhorn(torch.rand(3, 4)), ValueError, "square"),
        (lambda: symkernels.sinkhorn(torch.rand(2, 0, 0)), ValueError, "n >= 1"),
        (lambda: symkernels.sinkhorn(torch.rand(3, 3), n_iter=0), ValueError, "n_iter must be >= 1"),
        (lambda: symkernels.sinkhorn(torch.rand(3, 3), tau=-1.0), ValueError, "tau must be"),
        (lambda: symkernels.sinkhorn(torch.rand(3, 3), tol=-1e-3), ValueError, "tol must be None or"),
        (lambda: symkernels.sinkhorn(torch.rand(3, 3), tol=float("nan")), ValueError, "tol must be None or"),
        (lambda: symkernels.sinkhorn(torch.rand(3, 3), stop="all"), ValueError, "stop must be one of"),
        (lambda: symkernels.sinkhorn(torch.rand(3, 3), backward="exact"), ValueError, "backward must be"),
        (
            lambda: symkernels.sinkhorn(torch.full((3, 3), float("nan")), check_finite=True),
            ValueError,
            "logits contains NaN",
        ),
        (lambda: symkernels.grouped_sinkhorn(torch.rand(2, 3, 3)), TypeError, "sequence of"),
        (lambda: symkernels.grouped_sinkhorn([torch.rand(3, 3)]), ValueError, r"stacks\[0\] must have shape"),
        (lambda: symkernels.grouped_sinkhorn([torch.rand(1, 0, 0)]), ValueError, r"stacks\[0\] must have n"),
        (
            lambda: symkernels.grouped_sinkhorn([torch.rand(1, 3, 3), torch.rand(1, 2, 2).half()]),
            ValueError,
            r"stacks\[1\] is torch.float16",
        ),
    ],
)
def test_bad_input_raises_naming_the_argument(call, error, message):
    with pytest.raises(error, match=message):
        call()
