"""The native CPU ops behind ``torch.ops.symkernels``: parity with the reference, opcheck, torch.compile,
saved-state size, backward modes and extreme logits."""

from __future__ import annotations

import itertools

import pytest
import torch

import symkernels
from symkernels import backends
from symkernels.nn import WSConv2d, WSLiftConv2d
from symkernels.ops.representation import representation_stack_and_kernel
from symkernels.reference import expand_kernel_reference, sinkhorn_reference
from tests.testing import TOLERANCES, assert_as_accurate_as_reference, make_logits, non_contiguous

pytestmark = pytest.mark.skipif(
    not symkernels.backend_status()["cpu"].usable,
    reason=f"native CPU kernels unavailable: {symkernels.backend_status()['cpu'].detail}",
)

SIZES = (1, 2, 3, 7, 25, 36, 100, 196)
GRAD_TOLERANCES = {torch.float64: {"rtol": 1e-10, "atol": 1e-12}, torch.float32: {"rtol": 1e-4, "atol": 1e-5}}


def reference_and_native(logits, n_iter, tau, grad):
    results = []
    for backend in ("reference", "cpu"):
        x = logits.detach().clone().requires_grad_()
        p = symkernels.sinkhorn(x, n_iter, tau, backend=backend)
        (g,) = torch.autograd.grad(p, x, grad)
        results.append((p, g))
    return results


@pytest.mark.smoke
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", SIZES)
def test_sinkhorn_matches_reference(n, dtype):
    for n_iter, tau in itertools.product((1, 5, 20), (0.1, 1.0, 3.0)):
        logits = make_logits(2, n, n, dtype=dtype, seed=n + n_iter, scale=2.0)
        grad = make_logits(2, n, n, dtype=dtype, seed=7)
        (p_ref, g_ref), (p, g) = reference_and_native(logits, n_iter, tau, grad)
        torch.testing.assert_close(p, p_ref, **TOLERANCES[dtype])
        # Gradients are compared relative to their largest entry: tiny entries carry only rounding noise.
        scale = g_ref.abs().max().clamp_min(1e-30)
        torch.testing.assert_close(g / scale, g_ref / scale, **GRAD_TOLERANCES[dtype])


@pytest.mark.parametrize("shape", [(5, 5), (3, 5, 5), (2, 3, 5, 5), (0, 5, 5)])
def test_batch_shapes_and_non_contiguous(shape):
    logits = make_logits(*shape, dtype=torch.float64)
    expected = sinkhorn_reference(logits)
    torch.testing.assert_close(symkernels.sinkhorn(logits, backend="cpu"), expected)
    if len(shape) > 2 and shape[0] > 0:
        torch.testing.assert_close(symkernels.sinkhorn(non_contiguous(logits), backend="cpu"), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_computed_in_float32(dtype):
    logits = make_logits(3, 9, 9, dtype=dtype)
    p = symkernels.sinkhorn(logits, backend="cpu")
    assert p.dtype == dtype
    torch.testing.assert_close(p.float(), sinkhorn_reference(logits.float()), **TOLERANCES[dtype])


@pytest.mark.smoke
def test_gradcheck_native_sinkhorn_and_expansion():
    logits = make_logits(2, 6, 6, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: symkernels.sinkhorn(t, 5, 0.7, backend="cpu"), (logits,))
    reps = symkernels.sinkhorn(make_logits(3, 8, 8, dtype=torch.float64, seed=1)).requires_grad_()
    weight = make_logits(2, 3, 8, dtype=torch.float64, seed=2).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda r, w: symkernels.expand_kernel(r, w, 2, backend="cpu"), (reps, weight)
    )


@pytest.mark.smoke
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "groups,in_groups,k,out_channels,in_channels",
    [(4, 1, 5, 8, 1), (4, 4, 5, 6, 5), (3, 7, 1, 5, 2), (4, 1, 2, 0, 3)],
)
def test_expand_kernel_matches_reference(groups, in_groups, k, out_channels, in_channels, dtype):
    d = in_groups * k * k
    reps = symkernels.sinkhorn(make_logits(groups, d, d, dtype=torch.float64)).requires_grad_()
    weight = make_logits(out_channels, in_channels, d, dtype=torch.float64, seed=3).requires_grad_()
    grad = make_logits(out_channels * groups, in_channels * in_groups, k, k, dtype=torch.float64, seed=4)
    truth = expand_kernel_reference(reps, weight, k)
    truth_grads = torch.autograd.grad(truth, (reps, weight), grad)
    low = [t.detach().to(dtype).requires_grad_() for t in (reps, weight)]
    expected = expand_kernel_reference(*low, k)
    kernel = symkernels.expand_kernel(*low, k, backend="cpu")
    assert kernel.dtype == dtype and kernel.shape == truth.shape
    assert_as_accurate_as_reference(kernel, expected, truth)
    expected_grads = torch.autograd.grad(expected, low, grad.to(dtype))
    grads = torch.autograd.grad(kernel, low, grad.to(dtype))
    for got, want, exact in zip(grads, expected_grads, truth_grads, strict=True):
        assert_as_accurate_as_reference(got, want, exact)


def test_expansion_backward_is_deterministic():
    reps, weight = torch.rand(4, 100, 100), torch.randn(16, 16, 100)
    grad = torch.randn(16, 4, 16, 100)
    first = torch.ops.symkernels.expand_kernel_backward(grad, reps, weight)
    for _ in range(3):
        again = torch.ops.symkernels.expand_kernel_backward(grad, reps, weight)
        assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


@pytest.mark.smoke
def test_opcheck_every_op():
    logits = make_logits(3, 7, 7, dtype=torch.float64).requires_grad_()
    p, f, g = torch.ops.symkernels.sinkhorn_forward(logits.detach(), 4, 0.5)
    checks = [
        (torch.ops.symkernels.sinkhorn_forward.default, (logits, 4, 0.5)),
        (torch.ops.symkernels.sinkhorn_backward.default, (torch.randn_like(p), logits.detach(), f, g, 0.5)),
        (
            torch.ops.symkernels.expand_kernel_forward.default,
            (
                torch.rand(4, 9, 9, dtype=torch.float64, requires_grad=True),
                torch.randn(3, 2, 9, dtype=torch.float64, requires_grad=True),
            ),
        ),
        (
            torch.ops.symkernels.expand_kernel_backward.default,
            (
                torch.randn(3, 4, 2, 9, dtype=torch.float64),
                torch.rand(4, 9, 9, dtype=torch.float64),
                torch.randn(3, 2, 9, dtype=torch.float64),
            ),
        ),
        (torch.ops.symkernels.fixed_point_sinkhorn.default, (logits, p, 0.5)),
        (torch.ops.symkernels.representation_stack.default, (logits, 4, 0.5, True, None)),
        (
            torch.ops.symkernels.representation_stack.default,
            (logits, 3, 1.0, False, torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)),
        ),
    ]
    for op, args in checks:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("fix_identity", [True, False])
def test_fused_representation_stack_and_kernel(fix_identity):
    logits = make_logits(3, 18, 18, dtype=torch.float64).requires_grad_()
    weight = make_logits(4, 2, 18, dtype=torch.float64, seed=1).requires_grad_()
    stack, kernel = representation_stack_and_kernel(logits, weight, 3, 7, 0.5, fix_identity=fix_identity)
    expected_stack = symkernels.representation_stack(
        logits, 7, 0.5, fix_identity=fix_identity, backend="reference"
    )
    expected_kernel = expand_kernel_reference(expected_stack, weight, 3)
    torch.testing.assert_close(stack, expected_stack)
    torch.testing.assert_close(kernel, expected_kernel)
    grads = torch.autograd.grad((stack.sin().sum(), kernel.cos().sum()), (logits, weight))
    expected = torch.autograd.grad(
        (expected_stack.sin().sum(), expected_kernel.cos().sum()), (logits, weight)
    )
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    lift, conv = WSLiftConv2d(2, 3, 3, n_iter=5), WSConv2d(3, 2, 3, n_iter=5)
    x = torch.randn(2, 2, 10, 10)

    def step(x):
        y = conv(torch.relu(lift(x)))
        return y.square().mean()

    with symkernels.use_backend("cpu"):
        eager_loss = step(x)
        eager_grads = torch.autograd.grad(eager_loss, [lift.reps.logits, conv.reps.logits, conv.weight])
        compiled = torch.compile(step, fullgraph=True)
        loss = compiled(x)
        grads = torch.autograd.grad(loss, [lift.reps.logits, conv.reps.logits, conv.weight])
    torch.testing.assert_close(loss, eager_loss)
    for got, want in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def saved_numel(fn):
    """Elements kept for backward by ``fn``, counting each distinct buffer once."""
    buffers = {}

    def pack(tensor):
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel())
        buffers[key] = tensor.numel()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(buffers.values())


def test_backward_state_is_order_t_times_n_per_matrix():
    batch, n, n_iter = 3, 100, 20
    logits = make_logits(batch, n, n).requires_grad_()
    native = saved_numel(lambda: symkernels.sinkhorn(logits, n_iter, backend="cpu"))
    # The logits themselves plus 2·T·n log-scalings per matrix: never T copies of an n×n matrix.
    assert native <= batch * n * n + 2 * batch * n_iter * n
    reference = saved_numel(lambda: symkernels.sinkhorn(logits, n_iter, backend="reference"))
    assert reference >= n_iter * batch * n * n  # what unrolled autograd keeps, for contrast


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


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("tau", [1e-3, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_logits_give_finite_outputs_and_gradients(backend, tau, dtype):
    logits = (
        (1e4 * torch.rand(3, 25, 25, generator=torch.Generator().manual_seed(0))).to(dtype).requires_grad_()
    )
    p = symkernels.sinkhorn(logits, 20, tau, backend=backend)
    (g,) = torch.autograd.grad(p, logits, torch.randn_like(p))
    assert torch.isfinite(p).all() and torch.isfinite(g).all()
    torch.testing.assert_close(p.sum(-2), torch.ones(3, 25, dtype=dtype), rtol=0, atol=1e-4)


def test_cpu_backend_is_preferred_automatically_for_cpu_tensors():
    assert backends.known_backends()[0] in ("cuda", "triton", "cpu")
    assert (
        backends.resolve("sinkhorn", None, torch.device("cpu"), torch.float32)
        is backends._REGISTRY["cpu"].ops["sinkhorn"]
    )


def test_cpu_backend_refuses_other_devices():
    with pytest.raises(RuntimeError, match="backend='cpu' cannot run sinkhorn on meta"):
        symkernels.sinkhorn(torch.rand(3, 3, device="meta"), backend="cpu", check_finite=False)
