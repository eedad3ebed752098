"""Sinkhorn on tiny matrices (n <= 8, e.g. a hyper-connection layer's ``[tokens, 4, 4]``) on every
implementation (conftest.py's ``implementation``): the native CPU kernels' small-matrix path (several matrices
per vector, one per lane), the Triton kernels (in the interpreter without a GPU: tiny batches) and the native
CUDA kernels.

Outputs and gradients against the reference for batches that do not fill whole vectors, the tolerance exit
with matrices of one vector stopping at different iterations, stop="stack", caps, the log-domain fallback of
one matrix among scaling-domain ones, ragged groups of tiny and large stacks, and batches of 0 and 1 matrices.
The CPU path's saved state, its tasks and its narrower vectors are tested in test_sinkhorn_native.py.
"""

from __future__ import annotations

import pytest
import torch

import symkernels
from symkernels.reference import sinkhorn_reference
from tests.testing import assert_as_accurate_as_reference, make_logits

SIZES = [1, 2, 3, 4, 5, 8]


def batches(impl) -> list[int]:
    """Batch sizes around the vector widths (4 and 8 matrices): fewer, more, and not a multiple of either."""
    return [1, 9] if impl.interpreted else [1, 3, 9, 17, 70]


def reference_with_grad(logits, n_iter, tau, grad, **options):
    x = logits.detach().clone().requires_grad_()
    p, iterations = sinkhorn_reference(x, n_iter, tau, return_iterations=True, **options)
    (g,) = torch.autograd.grad(p, x, grad)
    return p.detach(), iterations, g


def check(impl, logits64, n_iter, tau, dtype, *, tol=None, stop="matrix", seed=0):
    """P, the iterations and the gradient of ``symkernels.sinkhorn`` on ``impl``: at least as accurate
    (against a float64 truth) as the reference computed in ``dtype``, the gradient to a few ulps of its scale
    |grad_p| / tau in the kernel's compute precision; the iterations equal to the reference's."""
    logits64 = logits64.to(dtype).to(torch.float64)  # the values the kernel sees
    grad64 = make_logits(*logits64.shape, dtype=torch.float64, seed=seed + 1).to(dtype).to(torch.float64)
    options = {"tol": tol or 0.0, "stop": stop}
    truth, truth_iterations, truth_grad = reference_with_grad(logits64, n_iter, tau, grad64, **options)
    expected, _, expected_grad = reference_with_grad(
        logits64.to(dtype), n_iter, tau, grad64.to(dtype), **options
    )
    x = logits64.to(dtype).to(impl.device).requires_grad_()
    p, iterations = symkernels.sinkhorn(
        x, n_iter, tau, tol=tol, stop=stop, backend=impl.name, check_finite=False, return_iterations=True
    )
    (got_grad,) = torch.autograd.grad(p, x, grad64.to(dtype).to(impl.device))
    assert p.shape == logits64.shape and p.dtype == dtype and got_grad.dtype == dtype
    assert torch.equal(iterations.cpu(), truth_iterations), (iterations, truth_iterations)
    assert_as_accurate_as_reference(p.detach().cpu(), expected, truth)
    assert_as_accurate_as_reference(
        got_grad.cpu(),
        expected_grad,
        truth_grad,
        computed_from=grad64.abs().max().item() / tau,
        compute_dtype=impl.compute_dtype(dtype, logits64.shape[-1]),
    )
    return iterations.cpu()


@pytest.mark.parametrize("n", SIZES)
def test_sizes_and_batches_that_do_not_fill_the_lanes(implementation, n):
    for batch in batches(implementation):
        for dtype in implementation.dtypes:
            logits = make_logits(batch, n, n, dtype=torch.float64, scale=2.0, seed=batch * 10 + n)
            check(implementation, logits, 20, 1.0, dtype, seed=n)


@pytest.mark.parametrize(("n_iter", "tau"), [(1, 1.0), (2, 0.5), (10, 1.0), (20, 0.3)])
def test_hyper_connection_shape(implementation, n_iter, tau):
    """``[batch, tokens, 4, 4]``, as a hyper-connection layer calls it, at the workload's T and short T."""
    tokens = 5 if implementation.interpreted else 37
    logits = make_logits(2, tokens, 4, 4, dtype=torch.float64, seed=n_iter)
    check(implementation, logits, n_iter, tau, torch.float32, seed=3)


def test_matrices_of_one_vector_stop_at_their_own_iteration(implementation):
    """With the tolerance, matrices sharing a vector stop at different iterations (each its own with
    stop="matrix", the slowest one's with stop="stack"), and each gradient is that of its own iterations."""
    batch = 9 if implementation.interpreted else 19
    scales = torch.linspace(0.05, 1.5, batch, dtype=torch.float64)[:, None, None]
    logits = scales * make_logits(batch, 4, 4, dtype=torch.float64, seed=11)
    dtype = implementation.dtypes[0]
    each = check(implementation, logits, 30, 1.0, dtype, tol=1e-5, stop="matrix", seed=4)
    assert len(set(each.tolist())) >= 3 and int(each.max()) < 30, each
    together = check(implementation, logits, 30, 1.0, dtype, tol=1e-5, stop="stack", seed=4)
    assert together.tolist() == [int(each.max())] * batch


def test_caps_bound_each_matrix(implementation):
    """The op's caps bound each matrix's iterations, with and without the tolerance, matrices of one vector
    capped differently; forward and backward against the reference run for each matrix's own count."""
    batch, n = 11, 4
    logits64 = make_logits(batch, n, n, dtype=torch.float64, scale=2.0, seed=12)
    caps = torch.tensor([1, 7, 3, 20, 2, 9, 5, 20, 4, 1, 6], dtype=torch.int32)
    grad64 = make_logits(batch, n, n, dtype=torch.float64, seed=13)
    stacks = [logits64.float().to(implementation.device)]
    for tol in (0.0, 1e-4):
        p, cols, domain, iterations = torch.ops.symkernels.sinkhorn(
            stacks, 20, 1.0, tol, "matrix", caps.to(implementation.device), implementation.name
        )
        (grad,) = torch.ops.symkernels.sinkhorn_backward(
            [grad64.float().to(implementation.device)],
            stacks,
            cols,
            domain,
            iterations,
            1.0,
            implementation.name,
        )
        assert bool((iterations.cpu() <= caps).all())
        if tol == 0.0:
            assert torch.equal(iterations.cpu(), caps)
        for m in range(batch):
            one = logits64[m : m + 1].float().double()
            want_p, want_it, want_g = reference_with_grad(one, int(caps[m]), 1.0, grad64[m : m + 1], tol=tol)
            assert int(iterations[m]) == int(want_it[0])
            torch.testing.assert_close(p[0][m : m + 1].cpu().double(), want_p, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(grad[m : m + 1].cpu().double(), want_g, rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # the Triton interpreter's numpy
def test_a_spread_out_matrix_goes_to_the_log_domain_alone(implementation):
    """Among scaling-domain neighbours, one matrix whose logits are too spread out for the scaling domain runs
    in the log domain, and one with a NaN logit gives NaN: neither changes its neighbours."""
    batch = 9
    logits64 = make_logits(batch, 4, 4, dtype=torch.float64, scale=1.5, seed=14)
    logits64[3] *= 300.0  # a within-row spread beyond the scaling domain's in float32 and float64
    stacks = [logits64.float().to(implementation.device)]
    _, _, domain, _ = torch.ops.symkernels.sinkhorn(stacks, 20, 1.0, 0.0, "matrix", None, implementation.name)
    assert domain.cpu().tolist() == [0, 0, 0, 1, 0, 0, 0, 0, 0]
    check(implementation, logits64, 20, 1.0, torch.float32, seed=5)

    with_nan = logits64.float().clone()
    with_nan[6, 1, 2] = float("nan")
    p = symkernels.sinkhorn(
        with_nan.to(implementation.device), 20, backend=implementation.name, check_finite=False
    )
    assert bool(torch.isnan(p[6].cpu()).all())
    others = [m for m in range(batch) if m != 6]
    torch.testing.assert_close(
        p[others].cpu(), sinkhorn_reference(with_nan[others].double(), 20).float(), rtol=1e-5, atol=1e-6
    )


def test_tiny_and_large_stacks_in_one_call(implementation):
    """One grouped call: a stack of many 4x4 matrices next to larger matrices, an empty stack, n = 1, n = 3
    and 8x8, with the tolerance exit; each stack equals its own reference."""
    large = 9 if implementation.interpreted else 25
    tokens = 9 if implementation.interpreted else 37
    shapes = [(tokens, 4), (3, large), (0, 4), (1, 1), (5, 8), (6, 3)]
    stacks64 = [
        make_logits(g, n, n, dtype=torch.float64, scale=2.0, seed=30 + i) for i, (g, n) in enumerate(shapes)
    ]
    stacks = [s.float().to(implementation.device).requires_grad_() for s in stacks64]
    grads = [make_logits(*s.shape, seed=40 + i) for i, s in enumerate(stacks)]
    outputs, iterations = symkernels.grouped_sinkhorn(
        stacks, 20, 1.0, tol=1e-4, backend=implementation.name, check_finite=False, return_iterations=True
    )
    got_grads = torch.autograd.grad(outputs, stacks, [g.to(implementation.device) for g in grads])
    for s64, out, its, grad, got_grad in zip(stacks64, outputs, iterations, grads, got_grads, strict=True):
        x = s64.float().requires_grad_()
        want, want_it = sinkhorn_reference(x, 20, 1.0, tol=1e-4, return_iterations=True)
        (want_grad,) = torch.autograd.grad(want, x, grad) if x.numel() else (torch.zeros_like(x),)
        assert out.shape == s64.shape and torch.equal(its.cpu(), want_it)
        torch.testing.assert_close(out.detach().cpu(), want.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_grad.cpu(), want_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(0, 4, 4), (1, 4, 4), (1, 8, 8), (1, 1, 1), (0, 3, 2, 2)])
def test_batches_of_zero_and_one_matrix(implementation, shape):
    logits = make_logits(*shape, scale=2.0, seed=7)
    x = logits.to(implementation.device).requires_grad_()
    p = symkernels.sinkhorn(x, 20, backend=implementation.name)
    grad = make_logits(*shape, seed=8)
    (got,) = torch.autograd.grad(p, x, grad.to(implementation.device))
    y = logits.clone().requires_grad_()
    want = sinkhorn_reference(y, 20)
    (want_grad,) = torch.autograd.grad(want, y, grad) if y.numel() else (torch.zeros_like(y),)
    assert p.shape == shape and got.shape == shape
    torch.testing.assert_close(p.detach().cpu(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.cpu(), want_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_cpu_float32_lanes_error_bound(n):
    """The native CPU kernels compute float32 matrices of n <= 8 in float32 lanes: P within 8 float32 ulps of
    1 and each gradient entry within 8 float32 ulps of |grad_p| / tau of a float64 truth (measured worst over
    n = 2..8, T = 1..20, tau = 0.3..3, logit scales 0.01..4: 4.0 and 2.6 ulps; the float32 eager reference's
    15.6 and 9.8). An entry far below |grad_p| / tau is resolved to that bound, not to its own size."""
    eps = torch.finfo(torch.float32).eps
    for n_iter, tau, scale in ((1, 0.3, 4.0), (20, 1.0, 2.0), (5, 3.0, 0.01)):
        logits = (scale * make_logits(256, n, n, dtype=torch.float64, seed=n_iter)).float()
        grad_p = make_logits(256, n, n, seed=n + 1)
        x = logits.clone().requires_grad_()
        p = symkernels.sinkhorn(x, n_iter, tau, backend="cpu")
        (grad,) = torch.autograd.grad(p, x, grad_p)
        truth, _, truth_grad = reference_with_grad(logits.double(), n_iter, tau, grad_p.double())
        assert float((p.detach().double() - truth).abs().max()) <= 8 * eps
        scale_of_grad = grad_p.abs().amax((1, 2), keepdim=True).double() / tau
        assert float(((grad.double() - truth_grad).abs() / scale_of_grad).max()) <= 8 * eps
