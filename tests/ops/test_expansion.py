"""``symkernels::expand_kernel``: each implementation (native CPU, Triton, native CUDA) against the reference.

Output and both gradients for the paper's layer shapes and edge shapes, with and without the leading identity,
kernels written channels_last and in the convolution's dtype, strided gradients, determinism, opcheck,
torch.compile, the convolution built on it (channels_last inputs, autocast), and the API's errors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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


def check_against_reference(
    impl, reps64, weight64, k, dtype, *, leading_identity=False, grad_layout=None, channels_last=False,
    kernel_dtype=None,
):  # fmt: skip
    """Output and both gradients at least as accurate (vs float64) as the same-dtype reference; the kernel is
    asked for channels_last or contiguous, in ``kernel_dtype`` (default: ``dtype``), and its gradient comes in
    that dtype."""
    kernel_dtype = kernel_dtype or dtype
    layout = torch.channels_last if channels_last else torch.contiguous_format
    reps64, weight64 = reps64.clone().requires_grad_(), weight64.clone().requires_grad_()
    stack = prepend_identity(reps64) if leading_identity else reps64
    truth = expand_kernel_reference(stack, weight64, k)
    grad64 = make_logits(*truth.shape, dtype=torch.float64, seed=11)
    truth_grads = torch.autograd.grad(truth, (reps64, weight64), grad64)

    low = [t.detach().to(dtype).requires_grad_() for t in (reps64, weight64)]
    expected = expand_kernel_reference(prepend_identity(low[0]) if leading_identity else low[0], low[1], k)
    on_device = [t.detach().to(impl.device).requires_grad_() for t in low]
    kernel = symkernels.expand_kernel(
        *on_device, k, leading_identity=leading_identity, channels_last=channels_last, dtype=kernel_dtype,
        backend=impl.name,
    )  # fmt: skip
    assert kernel.shape == truth.shape and kernel.dtype == kernel_dtype
    assert kernel.is_contiguous(memory_format=layout)
    assert_as_accurate_as_reference(kernel.detach().cpu(), expected.detach().to(kernel_dtype), truth.detach())

    grad = grad64.to(kernel_dtype)
    expected_grads = torch.autograd.grad(expected, low, grad.to(dtype))
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


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_kernel_in_the_convolutions_layout_and_dtype(implementation, channels_last):
    """float32 reps and weight; the kernel channels_last or contiguous, in float32 or bfloat16 (an autocast
    convolution's), and its gradient in that dtype."""
    reps, weight = make_inputs(3, 2, 3, 5, 3)
    for kernel_dtype in (torch.float32, torch.bfloat16):
        for leading_identity in (False, True):
            check_against_reference(
                implementation, reps, weight, 3, torch.float32, leading_identity=leading_identity,
                channels_last=channels_last, kernel_dtype=kernel_dtype,
            )  # fmt: skip


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
    for leading, channels_last, dtype in [(False, False, torch.float32), (True, True, torch.bfloat16)]:
        torch.library.opcheck(
            torch.ops.symkernels.expand_kernel.default,
            (reps, weight, 3, leading, channels_last, dtype, implementation.name),
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


@contextlib.contextmanager
def float32_convolutions(precision: str) -> Iterator[None]:
    """cuDNN's float32 convolutions at ``precision`` while the context lasts: ``"ieee"`` (float32) or
    ``"tf32"`` (each operand rounded to TF32's 10 mantissa bits, on Ampere and later GPUs). PyTorch's default
    lets cuDNN use TF32, so a test of a float32 convolution states which one it tests. Without a GPU the
    setting changes nothing."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):  # torch >= 2.9 (the legacy flag conflicts)
        saved = conv.fp32_precision
        conv.fp32_precision = precision
        try:
            yield
        finally:
            conv.fp32_precision = saved
    else:
        saved = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = precision == "tf32"
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32 = saved


def tf32(t: torch.Tensor) -> torch.Tensor:
    """float32 values rounded to TF32 (10 mantissa bits, to nearest), as float64."""
    bits = t.float().view(torch.int32)
    rounded = (bits + 0x1000) & ~0x1FFF
    return rounded.view(torch.float32).double()


def tf32_error_bound(x64: torch.Tensor, kernel64: torch.Tensor, padding: int) -> torch.Tensor:
    """How far a TF32 convolution may be from the exact one: each operand within 2^-10 of itself (rounded to
    nearest or truncated), so each product within 2^-9, plus float32 accumulation over the reduction, all
    relative to the sum of the products' magnitudes."""
    magnitudes = torch.nn.functional.conv2d(x64.abs(), kernel64.abs(), padding=padding)
    terms = kernel64[0].numel()
    return (2.0**-9 + terms * 2.0**-24) * magnitudes + 1e-7


CONV_PRECISIONS = ["ieee", "tf32"]


@pytest.mark.parametrize("precision", CONV_PRECISIONS)
def test_permuted_conv2d_matches_reference(implementation, precision):
    """The convolution of the expanded kernel, lifting and group conv, with a fixed identity: at float32's
    precision when cuDNN computes in float32 (``ieee``), within TF32's error bound when it may use TF32 (the
    default; the kernel itself is float32 either way)."""
    reps, weight = make_inputs(3, 4, 3, 2, 3)
    x = make_logits(2, 3, 4, 7, 7, dtype=torch.float64, seed=5)
    bias = make_logits(2, 1, 1, 1, dtype=torch.float64, seed=6)
    expected = permuted_conv2d_reference(x, prepend_identity(reps), weight, bias, kernel_size=3, padding=1)
    with float32_convolutions(precision):
        got = symkernels.permuted_conv2d(
            *(t.float().to(implementation.device) for t in (x, reps, weight, bias)),
            kernel_size=3,
            padding=1,
            leading_identity=True,
            backend=implementation.name,
        )
    assert got.shape == (2, 2, 4, 7, 7)
    if precision == "ieee":
        torch.testing.assert_close(got.cpu(), expected.float(), rtol=1e-4, atol=1e-5)
    else:
        kernel = expand_kernel_reference(prepend_identity(reps), weight, 3)
        bound = tf32_error_bound(x.flatten(1, 2), kernel, 1).unflatten(1, (2, 4))
        assert bool(((got.cpu().double() - expected).abs() <= bound).all())


def test_tf32_convolutions_break_the_float32_tolerance_and_meet_their_bound():
    """The TF32 convolution of test_permuted_conv2d_matches_reference, simulated on the CPU (operands rounded
    to TF32, products summed exactly): most outputs miss the float32 comparison's rtol = 1e-4 (a float32
    test of a GPU convolution must turn TF32 off), and all are within tf32_error_bound."""
    reps, weight = make_inputs(3, 4, 3, 2, 3)
    x = make_logits(2, 3, 4, 7, 7, dtype=torch.float64, seed=5).flatten(1, 2)
    kernel = expand_kernel_reference(prepend_identity(reps), weight, 3)
    exact = torch.nn.functional.conv2d(x, kernel, padding=1)
    simulated = torch.nn.functional.conv2d(tf32(x), tf32(kernel), padding=1)
    error = (simulated - exact).abs()
    missed = error > 1e-5 + 1e-4 * exact.abs()
    assert int(missed.sum()) > exact.numel() // 2, int(missed.sum())
    assert bool((error <= tf32_error_bound(x, kernel, 1)).all())


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "autocast-bf16"])
def test_permuted_conv2d_asks_for_the_kernel_its_convolution_uses(implementation, monkeypatch, autocast):
    """A channels_last input gets a channels_last kernel, and under autocast the kernel comes in autocast's
    dtype, so that the convolution neither copies nor casts it: the float32 kernel rounded once, and the
    convolution's output unchanged."""
    import symkernels.functional as functional

    reps, weight = (t.float().to(implementation.device) for t in make_inputs(3, 1, 3, 4, 3))
    x = make_logits(2, 3, 9, 9, seed=5).to(implementation.device)
    kernels = []
    expand = functional.expand_kernel
    monkeypatch.setattr(
        functional, "expand_kernel", lambda *a, **kw: kernels.append(expand(*a, **kw)) or kernels[-1]
    )
    # float32 convolutions in float32: TF32 (the default) may be chosen for one layout and not the other.
    precision = float32_convolutions("ieee")
    with precision, torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        outputs = [
            symkernels.permuted_conv2d(
                x.contiguous(memory_format=layout),
                reps,
                weight,
                kernel_size=3,
                padding=1,
                leading_identity=True,
                backend=implementation.name,
            )  # fmt: skip
            for layout in (torch.contiguous_format, torch.channels_last)
        ]
        # The convolution of the kernel it was handed (checked against the float32 one below).
        direct = torch.nn.functional.conv2d(x, kernels[0], padding=1)
    dtype = torch.bfloat16 if autocast else torch.float32
    contiguous, channels_last = kernels
    assert contiguous.dtype == channels_last.dtype == dtype
    assert contiguous.is_contiguous()
    assert (
        channels_last.is_contiguous(memory_format=torch.channels_last) and not channels_last.is_contiguous()
    )
    float32_kernel = expand(reps, weight, 3, leading_identity=True, backend=implementation.name)
    # Triton's interpreter truncates float32 to bfloat16 (compiled, it rounds to nearest even, as torch does).
    ulps = 1 if implementation.interpreted and autocast else 0
    torch.testing.assert_close(contiguous, float32_kernel.to(dtype), rtol=ulps * 2**-7, atol=0)
    assert torch.equal(channels_last, contiguous)
    for got in outputs:
        assert got.dtype == dtype
        # (Summed in another order when channels_last: a bfloat16 output may round the other way.)
        tolerance = {"rtol": 2**-7, "atol": 2**-7} if autocast else {"rtol": 1e-5, "atol": 1e-5}
        torch.testing.assert_close(got, direct.unflatten(1, (4, 4)), **tolerance)


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
            lambda: symkernels.expand_kernel(
                torch.rand(2, 9, 9), torch.rand(1, 1, 9), 3, channels_last="yes"
            ),
            TypeError,
            "channels_last must be a bool",
        ),
        (
            lambda: symkernels.expand_kernel(torch.rand(2, 9, 9), torch.rand(1, 1, 9), 3, dtype=torch.int32),
            TypeError,
            r"dtype must be one of torch.float16, .*, got torch.int32",
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
