"""``symkernels::expand_kernel``: each implementation (native CPU, Triton, native CUDA) against the reference.

Output and both gradients for the paper's layer shapes and edge shapes, with and without the leading identity,
strided gradients, determinism, opcheck, torch.compile, the convolution built on it, and the API's errors.
"""

from __future__ import annotations

import pytest
import torch

import symkernels
from symkernels.functional import prepend_identity
from symkernels.reference import expand_kernel_reference, permuted_conv2d_reference, sinkhorn_reference
from tests.testing import assert_as_accurate_as_reference, make_logits


def make_inputs(groups: int, in_groups: int, k: int, out_channels: int, in_channels: int, seed: int = 0):
    """float64 reps (doubly stochastic, as the layers produce them) and weight."""
    d = in_groups * k * k
    reps = sinkhorn_reference(make_logits(groups, d, d, dtype=torch.float64, scale=2.0, seed=seed))
    weight = make_logits(out_channels, in_channels, d, dtype=torch.float64, seed=seed + 1)
    return reps, weight


def check_against_reference(impl, reps64, weight64, k, dtype, *, leading_identity=False, grad_layout=None):
    """Output and both gradients at least as accurate (vs float64) as the same-dtype reference."""
    reps64, weight64 = reps64.clone().requires_grad_(), weight64.clone().requires_grad_()
    stack = prepend_identity(reps64) if leading_identity else reps64
    truth = expand_kernel_reference(stack, weight64, k)
    grad64 = make_logits(*truth.shape, dtype=torch.float64, seed=11)
    truth_grads = torch.autograd.grad(truth, (reps64, weight64), grad64)

    low = [t.detach().to(dtype).requires_grad_() for t in (reps64, weight64)]
    expected = expand_kernel_reference(prepend_identity(low[0]) if leading_identity else low[0], low[1], k)
    on_device = [t.detach().to(impl.device).requires_grad_() for t in low]
    kernel = symkernels.expand_kernel(*on_device, k, leading_identity=leading_identity, backend=impl.name)
    assert kernel.shape == truth.shape and kernel.dtype == dtype and kernel.is_contiguous()
    assert_as_accurate_as_reference(kernel.detach().cpu(), expected.detach(), truth.detach())

    grad = grad64.to(dtype)
    expected_grads = torch.autograd.grad(expected, low, grad)
    device_grad = grad.to(impl.device)
    grads = torch.autograd.grad(
        kernel, on_device, device_grad if grad_layout is None else grad_layout(device_grad)
    )
    for got, want, exact, tensor in zip(grads, expected_grads, truth_grads, low, strict=True):
        assert got.dtype == tensor.dtype and got.shape == tensor.shape
        assert_as_accurate_as_reference(got.cpu(), want, exact)


# (G', G_in, k, C_out, C_in): the lifting and group-conv shapes in small, and edges (C = 1, k = 1, G = 1).
SHAPES = [
    (1, 1, 1, 1, 1),
    (4, 1, 3, 2, 1),
    (4, 4, 1, 3, 2),
    (1, 4, 3, 1, 3),
    (4, 1, 5, 3, 2),
    (2, 1, 7, 1, 1),
    (4, 4, 3, 2, 2),
]


@pytest.mark.smoke
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "G{}-Gin{}-k{}-O{}-I{}".format(*s))
def test_matches_reference(implementation, shape):
    reps, weight = make_inputs(*shape)
    for dtype in implementation.dtypes:
        for leading_identity in (False, True):
            check_against_reference(
                implementation, reps, weight, shape[2], dtype, leading_identity=leading_identity
            )


@pytest.mark.parametrize("shape", [(3, 1, 5, 8, 1), (3, 4, 5, 6, 5)], ids=["lift", "gconv"])
def test_paper_shapes(implementation, shape):
    if implementation.interpreted:
        pytest.skip("needs a CUDA GPU: paper-sized layers are too slow for Triton's interpreter")
    reps, weight = make_inputs(*shape)
    for dtype in implementation.dtypes:
        check_against_reference(implementation, reps, weight, shape[2], dtype, leading_identity=True)


def test_only_the_identity(implementation):
    """G' = 0 with the leading identity: the kernel is the weight itself."""
    reps, weight = make_inputs(1, 1, 3, 2, 3)
    kernel = symkernels.expand_kernel(
        reps[:0].float().to(implementation.device),
        weight.float().to(implementation.device),
        3,
        leading_identity=True,
        backend=implementation.name,
    )
    torch.testing.assert_close(kernel.cpu(), weight.float().reshape(2, 3, 3, 3))


def test_empty_channels(implementation):
    reps, weight = make_inputs(2, 1, 3, 0, 2)
    kernel = symkernels.expand_kernel(
        reps.float().to(implementation.device),
        weight.float().to(implementation.device),
        3,
        backend=implementation.name,
    )
    assert kernel.shape == (0, 2, 3, 3)


def test_strided_gradients(implementation):
    """A gradient that is not contiguous (channels_last, expanded) gives the same result."""
    reps, weight = make_inputs(3, 1, 3, 2, 2)
    check_against_reference(
        implementation,
        reps,
        weight,
        3,
        torch.float32,
        leading_identity=True,
        grad_layout=lambda g: g.contiguous(memory_format=torch.channels_last),
    )


def test_backward_is_deterministic(implementation):
    reps, weight = make_inputs(3, 4, 3 if implementation.interpreted else 5, 4, 4)
    reps, weight = (t.float().to(implementation.device) for t in (reps, weight))
    grad = torch.randn(4 * 4, 4 * 4, *([3] * 2 if implementation.interpreted else [5] * 2)).to(reps.device)
    args = (reps, weight, grad.shape[-1], True, implementation.name)
    first = torch.ops.symkernels.expand_kernel_backward(grad, *args)
    for _ in range(2):
        again = torch.ops.symkernels.expand_kernel_backward(grad, *args)
        assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


@pytest.mark.smoke
def test_opcheck(implementation):
    reps, weight = make_inputs(3, 1, 3, 2, 2)
    reps, weight = (t.float().to(implementation.device).requires_grad_() for t in (reps, weight))
    for leading in (False, True):
        torch.library.opcheck(
            torch.ops.symkernels.expand_kernel.default, (reps, weight, 3, leading, implementation.name)
        )
        grad = torch.randn(2 * (3 + leading), 2, 3, 3, device=reps.device)
        torch.library.opcheck(
            torch.ops.symkernels.expand_kernel_backward.default,
            (grad, reps.detach(), weight.detach(), 3, leading, implementation.name),
        )


def test_gradcheck_float64():
    reps, weight = make_inputs(3, 2, 2, 2, 3)
    for leading in (False, True):
        assert torch.autograd.gradcheck(
            lambda r, w, lead=leading: symkernels.expand_kernel(
                r, w, 2, leading_identity=lead, backend="cpu"
            ),
            (reps.requires_grad_(), weight.requires_grad_()),
        )


def test_permuted_conv2d_matches_reference(implementation):
    """The convolution of the expanded kernel, lifting and group conv, with a fixed identity."""
    reps, weight = make_inputs(3, 4, 3, 2, 3)
    x = make_logits(2, 3, 4, 7, 7, dtype=torch.float64, seed=5)
    bias = make_logits(2, 1, 1, 1, dtype=torch.float64, seed=6)
    expected = permuted_conv2d_reference(x, prepend_identity(reps), weight, bias, kernel_size=3, padding=1)
    got = symkernels.permuted_conv2d(
        *(t.float().to(implementation.device) for t in (x, reps, weight, bias)),
        kernel_size=3,
        padding=1,
        leading_identity=True,
        backend=implementation.name,
    )
    assert got.shape == (2, 2, 4, 7, 7)
    torch.testing.assert_close(got.cpu(), expected.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda: symkernels.expand_kernel(torch.rand(2, 9, 9), torch.rand(1, 1, 8), 3),
            ValueError,
            "last dim",
        ),
        (
            lambda: symkernels.expand_kernel(torch.rand(2, 8, 8), torch.rand(1, 1, 8), 3),
            ValueError,
            "must divide",
        ),
        (
            lambda: symkernels.expand_kernel(torch.rand(2, 9, 9), torch.rand(1, 9), 3),
            ValueError,
            "weight must",
        ),
        (lambda: symkernels.expand_kernel(torch.rand(9, 9), torch.rand(1, 1, 9), 3), ValueError, "reps must"),
        (
            lambda: symkernels.expand_kernel(torch.rand(2, 9, 9), torch.rand(1, 1, 9), 0),
            ValueError,
            "kernel_size",
        ),
        (
            lambda: symkernels.expand_kernel(torch.rand(2, 9, 9), torch.rand(1, 1, 9).double(), 3),
            TypeError,
            "dtype",
        ),
        (
            lambda: symkernels.expand_kernel(torch.rand(2, 9, 9), torch.rand(1, 1, 9), 3, leading_identity=1),
            TypeError,
            "leading_identity must be a bool",
        ),
        (
            lambda: symkernels.expand_kernel(torch.rand(2, 9, 9), torch.rand(1, 1, 9), 3, backend="nope"),
            ValueError,
            "not a known backend",
        ),
    ],
)
def test_bad_input_raises_naming_the_argument(call, error, message):
    with pytest.raises(error, match=message):
        call()
