"""The native CPU kernel expansion called directly (``symkernels._C``): forward and backward against the
pure-PyTorch reference (with and without the leading identity, float64 and float32), the identity block,
strided gradients, determinism, gradcheck, and the input checks."""

from __future__ import annotations

import pytest
import torch

from symkernels import _native
from symkernels.reference.expansion import expand_kernel_reference
from tests.testing import assert_as_accurate_as_reference, make_logits

native = _native.library()
pytestmark = pytest.mark.skipif(
    native is None or not hasattr(native, "sinkhorn_forward"),
    reason=f"native library without the ragged kernels: {_native.native_status().reason}",
)


def expand_forward(
    reps, weight, kernel_size, leading_identity, *, memory_format=torch.contiguous_format, dtype=None
):
    """The native forward into a fresh kernel of the given layout and dtype (default: reps')."""
    out_channels, in_channels, d = weight.shape
    in_group = d // (kernel_size * kernel_size)
    shape = (
        out_channels * (reps.shape[0] + int(leading_identity)),
        in_channels * in_group,
        kernel_size,
        kernel_size,
    )
    kernel = torch.full(shape, float("nan"), dtype=dtype or reps.dtype).contiguous(
        memory_format=memory_format
    )
    native.expand_forward(reps, weight, kernel_size, leading_identity, kernel)
    return kernel


def expansion_reference(reps, weight, kernel_size, leading_identity):
    if leading_identity:
        d = weight.shape[-1]
        reps = torch.cat([torch.eye(d, dtype=reps.dtype)[None], reps])
    return expand_kernel_reference(reps, weight, kernel_size)


# (G', G_in, k, O, I): I >= O and O > I paths, lifting (I = 1), G' = 0, empty channels, k = 1.
EXPANSION_SHAPES = [
    (3, 1, 5, 4, 6),
    (3, 4, 3, 6, 2),
    (2, 2, 2, 20, 1),
    (0, 1, 3, 3, 2),
    (2, 1, 3, 0, 4),
    (3, 7, 1, 2, 3),
]


@pytest.mark.parametrize("leading_identity", [False, True])
@pytest.mark.parametrize("shape", EXPANSION_SHAPES)
def test_expansion_matches_reference(shape, leading_identity):
    learned, in_group, k, out_channels, in_channels = shape
    d = in_group * k * k
    groups = learned + int(leading_identity)
    for dtype in (torch.float64, torch.float32):
        reps = torch.rand(learned, d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        weight = make_logits(out_channels, in_channels, d, dtype=torch.float64, seed=2)
        grad = make_logits(out_channels * groups, in_channels * in_group, k, k, dtype=torch.float64, seed=3)
        exact = [reps.clone().requires_grad_(), weight.clone().requires_grad_()]
        truth = expansion_reference(*exact, k, leading_identity)
        truth_grads = torch.autograd.grad(truth, exact, grad, allow_unused=True)
        low = [reps.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_()]
        expected = expansion_reference(*low, k, leading_identity)
        expected_grads = torch.autograd.grad(expected, low, grad.to(dtype), allow_unused=True)

        kernel = expand_forward(reps.to(dtype), weight.to(dtype), k, leading_identity)
        assert kernel.shape == (out_channels * groups, in_channels * in_group, k, k) and kernel.dtype == dtype
        assert_as_accurate_as_reference(kernel, expected, truth)
        grad_reps, grad_weight = native.expand_backward(
            grad.to(dtype), reps.to(dtype), weight.to(dtype), k, leading_identity
        )
        assert grad_reps.shape == reps.shape and grad_weight.shape == weight.shape
        for got, want, exact_grad, like in zip(
            (grad_reps, grad_weight), expected_grads, truth_grads, (reps, weight), strict=True
        ):
            want = torch.zeros_like(like, dtype=dtype) if want is None else want
            exact_grad = torch.zeros_like(like) if exact_grad is None else exact_grad
            assert_as_accurate_as_reference(got, want, exact_grad)


def test_expansion_identity_block_is_a_copy_of_weight():
    weight = make_logits(3, 2, 9, dtype=torch.float32)
    reps = torch.rand(2, 9, 9)
    kernel = expand_forward(reps, weight, 3, True).view(3, 3, 2, 9)
    assert torch.equal(kernel[:, 0], weight)
    grad = make_logits(9, 2, 3, 3, dtype=torch.float32, seed=1)
    _, grad_weight = native.expand_backward(grad, reps, weight, 3, True)
    _, grad_weight_learned = native.expand_backward(
        grad.view(3, 3, 2, 9)[:, 1:].reshape(6, 2, 3, 3), reps, weight, 3, False
    )
    torch.testing.assert_close(grad_weight, grad_weight_learned + grad.view(3, 3, 2, 9)[:, 0])


def test_expansion_backward_reads_any_strides_and_is_deterministic():
    reps, weight = torch.rand(4, 36, 36), torch.randn(8, 6, 36)
    grad = torch.randn(8 * 5, 6 * 4, 3, 3)
    expected = native.expand_backward(grad, reps, weight, 3, True)
    for strided in (
        grad.to(memory_format=torch.channels_last),
        grad.transpose(0, 1).contiguous().transpose(0, 1),
    ):
        assert not strided.is_contiguous()
        got = native.expand_backward(strided, reps, weight, 3, True)
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        again = native.expand_backward(grad, reps, weight, 3, True)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(again, expected, strict=True))


def test_expansion_gradcheck():
    class NativeExpansion(torch.autograd.Function):
        @staticmethod
        def forward(ctx, reps, weight):
            ctx.save_for_backward(reps, weight)
            return expand_forward(reps, weight, 2, True)

        @staticmethod
        def backward(ctx, grad):
            reps, weight = ctx.saved_tensors
            return native.expand_backward(grad, reps, weight, 2, True)

    reps = torch.rand(2, 8, 8, dtype=torch.float64, requires_grad=True)
    weight = make_logits(3, 2, 8, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(NativeExpansion.apply, (reps, weight))


def test_expansion_writes_channels_last_and_other_dtypes():
    """The conv weight in the layout and dtype the convolution wants: the same values as the contiguous kernel
    in reps' dtype, rounded once."""
    reps, weight = torch.rand(3, 18, 18), make_logits(4, 5, 18)
    want = expand_forward(reps, weight, 3, True)
    for memory_format in (torch.contiguous_format, torch.channels_last):
        for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            kernel = expand_forward(reps, weight, 3, True, memory_format=memory_format, dtype=dtype)
            assert kernel.dtype == dtype and kernel.is_contiguous(memory_format=memory_format)
            assert torch.equal(kernel, want.to(dtype))


def test_expansion_backward_reads_gradients_of_another_dtype():
    reps, weight = torch.rand(2, 9, 9, dtype=torch.float64), make_logits(3, 2, 9, dtype=torch.float64)
    grad = make_logits(9, 2, 3, 3, seed=1)
    got = native.expand_backward(grad, reps, weight, 3, True)
    want = native.expand_backward(grad.double(), reps, weight, 3, True)
    assert all(a.dtype == torch.float64 and torch.equal(a, b) for a, b in zip(got, want, strict=True))


KERNEL = torch.empty(6, 2, 3, 3)  # the kernel of reps [2, 9, 9], weight [3, 2, 9], k = 3, no identity


@pytest.mark.parametrize(
    "call,match",
    [
        (
            lambda: native.expand_forward(torch.rand(2, 9, 8), torch.rand(3, 2, 9), 3, False, KERNEL),
            r"reps must have shape",
        ),
        (
            lambda: native.expand_forward(torch.rand(2, 9, 9), torch.rand(3, 9), 3, False, KERNEL),
            "weight must have shape",
        ),
        (
            lambda: native.expand_forward(torch.rand(2, 9, 9), torch.rand(3, 2, 8), 3, False, KERNEL),
            "disagree on d",
        ),
        (
            lambda: native.expand_forward(torch.rand(2, 8, 8), torch.rand(3, 2, 8), 3, False, KERNEL),
            "multiple of kernel_size",
        ),
        (
            lambda: native.expand_forward(torch.rand(2, 9, 9), torch.rand(3, 2, 9), 0, False, KERNEL),
            "kernel_size must be",
        ),
        (
            lambda: native.expand_forward(
                torch.rand(2, 9, 9), torch.rand(3, 2, 9, dtype=torch.float64), 3, False, KERNEL
            ),
            "weight must have the dtype of reps",
        ),
        (
            lambda: native.expand_forward(
                torch.rand(2, 9, 9).half(), torch.rand(3, 2, 9).half(), 3, False, KERNEL.half()
            ),
            "reps must be float32 or float64",
        ),
        (
            lambda: native.expand_forward(
                torch.rand(2, 9, 9, device="meta"), torch.rand(3, 2, 9), 3, False, KERNEL
            ),
            "reps must be a CPU tensor",
        ),
        (
            lambda: native.expand_forward(torch.rand(2, 9, 9), torch.rand(3, 2, 9), 3, True, KERNEL),
            r"kernel must have the kernel's shape \[O\*G, I\*G_in, k, k\] = \[9, 2, 3, 3\]",
        ),
        (
            lambda: native.expand_forward(
                torch.rand(2, 9, 9), torch.rand(3, 2, 9), 3, False, torch.empty(2, 6, 3, 3).transpose(0, 1)
            ),
            "kernel must be contiguous or channels_last",
        ),
        (
            lambda: native.expand_forward(
                torch.rand(2, 9, 9), torch.rand(3, 2, 9), 3, False, KERNEL.to(torch.int32)
            ),
            "kernel must be a floating-point tensor",
        ),
        (
            lambda: native.expand_backward(
                torch.rand(6, 2, 3, 3), torch.rand(2, 9, 9), torch.rand(3, 2, 9), 3, True
            ),
            r"grad_kernel must have the kernel's shape \[O\*G, I\*G_in, k, k\] = \[9, 2, 3, 3\]",
        ),
        (
            lambda: native.expand_backward(
                torch.rand(9, 2, 3, 3, device="meta"), torch.rand(2, 9, 9), torch.rand(3, 2, 9), 3, True
            ),
            "grad_kernel must be a CPU tensor",
        ),
    ],
)
def test_expansion_rejects_bad_input(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()
