"""Property tests: every implementation of every op against the reference on random inputs (hypothesis).

Shapes (n = 1, empty stacks, many sizes in one grouped call), dtypes, τ from 1e-3 to 1e2, logits up to ±1e4,
n_iter and tol: outputs finite and as accurate as the same-dtype reference, gradients finite and matching,
bad input refused with a clear error. The number of examples comes from the hypothesis profile (conftest.py):
``ci`` by default, ``long`` with ``SYMKERNELS_HYPOTHESIS_PROFILE=long``.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import symkernels
from symkernels.functional import prepend_identity
from symkernels.reference import expand_kernel_reference, sinkhorn_reference
from tests.testing import assert_as_accurate_as_reference

# The implementation fixture is the same for every example of a test; under Triton's interpreter most drawn
# cases are too large to run and are filtered out.
pytestmark = pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")
FIXTURE_OK = settings(
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
    ]
)

log_uniform = st.floats(min_value=-3.0, max_value=2.0).map(lambda e: 10.0**e)


@st.composite
def logits_cases(draw, max_n: int = 9):
    n = draw(st.integers(1, max_n))
    batch = draw(st.integers(0, 3))
    scale = draw(st.sampled_from([0.1, 1.0, 10.0, 1e2, 1e4]))
    seed = draw(st.integers(0, 2**31 - 1))
    logits = scale * (2 * torch.rand(batch, n, n, generator=torch.Generator().manual_seed(seed)) - 1)
    return logits.double()


def _run(impl, logits, dtype, n_iter, tau, tol, stop):
    x = logits.to(dtype).to(impl.device).requires_grad_()
    p, iterations = symkernels.sinkhorn(
        x, n_iter, tau, tol=tol, stop=stop, backend=impl.name, return_iterations=True
    )
    grad = torch.linspace(-1, 1, p.numel(), dtype=dtype).reshape(p.shape).to(impl.device)
    (g,) = torch.autograd.grad(p, x, grad) if p.numel() else (torch.zeros_like(x),)
    return p.detach().cpu(), iterations.cpu(), g.cpu(), grad.cpu()


@FIXTURE_OK
@given(
    logits=logits_cases(),
    n_iter=st.integers(1, 25),
    tau=log_uniform,
    tol=st.one_of(st.none(), log_uniform.map(lambda v: v * 1e-3)),
    stop=st.sampled_from(["matrix", "stack"]),
    data=st.data(),
)
def test_sinkhorn_on_random_inputs(implementation, logits, n_iter, tau, tol, stop, data):
    dtype = data.draw(st.sampled_from(implementation.dtypes))
    if implementation.interpreted:
        assume(logits.shape[-1] <= 5 and n_iter <= 8)
    p, iterations, grad, grad_p = _run(implementation, logits, dtype, n_iter, tau, tol, stop)
    assert p.dtype == dtype and p.shape == logits.shape
    assert bool(torch.isfinite(p).all()) and bool(torch.isfinite(grad).all())
    assert bool(((iterations >= 1) & (iterations <= n_iter)).all())
    if logits.numel() == 0:
        return
    # Columns sum to 1 after every iteration, in every domain.
    atol = {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 2e-2)
    torch.testing.assert_close(
        p.double().sum(-2), torch.ones(p.shape[:-1], dtype=torch.float64), rtol=0, atol=atol
    )

    # Against the reference with the iterations this implementation ran (the tolerance test is decided in the
    # compute precision, so a matrix at the threshold may stop one iteration apart from the float64 one).
    truth_input = logits.to(dtype).double().requires_grad_()
    caps = iterations.reshape(-1).tolist()
    truth = torch.stack([sinkhorn_reference(m, t, tau) for m, t in zip(truth_input, caps, strict=True)])
    (truth_grad,) = torch.autograd.grad(truth, truth_input, grad_p.double())
    low = logits.to(dtype).requires_grad_()
    expected = torch.stack([sinkhorn_reference(m, t, tau) for m, t in zip(low, caps, strict=True)])
    (expected_grad,) = torch.autograd.grad(expected, low, grad_p)
    if dtype == torch.float64:
        # The same-dtype reference is the truth itself here: bound the error on each quantity's natural scale
        # (P: 1; the gradient: |grad_p| / tau), allowing the eps·|L0| by which log P itself is rounded.
        magnitude = max(1.0, float(logits.abs().max()) / tau)
        torch.testing.assert_close(p, truth.detach(), rtol=0, atol=1e-12 * magnitude)
        scale = float(grad_p.abs().max()) / tau
        torch.testing.assert_close(grad, truth_grad, rtol=0, atol=1e-12 * magnitude * scale)
    else:
        assert_as_accurate_as_reference(p, expected.detach(), truth.detach())
        assert_as_accurate_as_reference(
            grad,
            expected_grad,
            truth_grad,
            computed_from=float(grad_p.abs().max()) / tau,
            compute_dtype=implementation.compute_dtype(dtype, logits.shape[-1]),
        )
    if tol is not None:
        reference_iterations = sinkhorn_reference(
            truth_input.detach(), n_iter, tau, tol=tol, stop=stop, return_iterations=True
        )[1]
        assert bool(((iterations - reference_iterations).abs() <= 1).all()), (
            iterations,
            reference_iterations,
        )


@FIXTURE_OK
@given(
    shapes=st.lists(st.tuples(st.integers(0, 3), st.integers(1, 7)), min_size=1, max_size=6),
    n_iter=st.integers(1, 10),
    seed=st.integers(0, 2**31 - 1),
)
def test_grouped_sinkhorn_equals_each_stack(implementation, shapes, n_iter, seed):
    generator = torch.Generator().manual_seed(seed)
    stacks = [3 * torch.randn(g, n, n, generator=generator) for g, n in shapes]
    on_device = [s.to(implementation.device) for s in stacks]
    outputs = symkernels.grouped_sinkhorn(on_device, n_iter, backend=implementation.name)
    for stack, out in zip(stacks, outputs, strict=True):
        assert out.shape == stack.shape
        torch.testing.assert_close(out.cpu(), sinkhorn_reference(stack, n_iter), rtol=1e-4, atol=1e-5)


@FIXTURE_OK
@given(
    groups=st.integers(0, 4),
    in_groups=st.integers(1, 4),
    k=st.integers(1, 5),
    out_channels=st.integers(0, 4),
    in_channels=st.integers(1, 4),
    leading_identity=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_expansion_on_random_inputs(
    implementation, groups, in_groups, k, out_channels, in_channels, leading_identity, seed, data
):
    assume(groups + leading_identity >= 1)
    if implementation.interpreted:
        assume(in_groups * k * k <= 36)
    dtype = data.draw(st.sampled_from(implementation.dtypes))
    d = in_groups * k * k
    generator = torch.Generator().manual_seed(seed)
    reps64 = torch.rand(groups, d, d, generator=generator, dtype=torch.float64)
    weight64 = torch.randn(out_channels, in_channels, d, generator=generator, dtype=torch.float64)
    low = [t.to(dtype).requires_grad_() for t in (reps64, weight64)]
    on_device = [t.detach().to(implementation.device).requires_grad_() for t in low]
    kernel = symkernels.expand_kernel(
        *on_device, k, leading_identity=leading_identity, backend=implementation.name
    )
    exact = [t.to(dtype).double().requires_grad_() for t in (reps64, weight64)]

    def reference(reps, weight):
        return expand_kernel_reference(prepend_identity(reps) if leading_identity else reps, weight, k)

    truth, expected = reference(*exact), reference(*low)
    assert kernel.shape == truth.shape and kernel.dtype == dtype
    assert_as_accurate_as_reference(kernel.detach().cpu(), expected.detach(), truth.detach())
    if kernel.numel() == 0:
        return
    grad = torch.randn(kernel.shape, generator=generator).to(dtype)
    grads = torch.autograd.grad(kernel, on_device, grad.to(implementation.device))
    for got, want, right in zip(
        grads,
        torch.autograd.grad(expected, low, grad),
        torch.autograd.grad(truth, exact, grad.double()),
        strict=True,
    ):
        assert_as_accurate_as_reference(got.cpu(), want, right)


@given(
    shape=st.lists(st.integers(0, 4), min_size=0, max_size=4),
    n_iter=st.integers(-2, 3),
    tau=st.sampled_from([0.0, -1.0, float("nan"), float("inf"), 1.0]),
)
def test_bad_sinkhorn_input_is_refused_clearly(shape, n_iter, tau):
    logits = torch.rand(*shape) if shape else torch.tensor(1.0)
    valid = len(shape) >= 2 and shape[-1] == shape[-2] and shape[-1] >= 1 and n_iter >= 1 and tau == 1.0
    if valid:
        assert symkernels.sinkhorn(logits, n_iter, tau).shape == logits.shape
        return
    with pytest.raises((ValueError, TypeError)) as error:
        symkernels.sinkhorn(logits, n_iter, tau)
    assert any(word in str(error.value) for word in ("logits", "n_iter", "tau"))
