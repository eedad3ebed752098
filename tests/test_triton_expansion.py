"""The Triton kernel expansion: outputs and both gradients against the reference, layouts, the fixed-identity
form, argument errors mirrored from ``symkernels.expand_kernel``, opcheck, torch.compile and determinism.

Runs under the Triton interpreter (``TRITON_INTERPRET=1`` set before triton is imported; CPU tensors, tiny
shapes, fp32/fp16) or on a GPU; the ``cuda`` cases add large shapes, bf16, NaN-poisoned buffers and
bit-identical repeated backward passes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import symkernels
from symkernels.reference import expand_kernel_reference, sinkhorn_reference
from tests.testing import assert_as_accurate_as_reference, make_logits, non_contiguous

pytest.importorskip("triton")

from symkernels.ops.triton_expansion import triton_expand_kernel  # noqa: E402
from symkernels.triton_kernels.expansion import (  # noqa: E402
    backward_plan,
    expand_backward_into,
    expand_forward_into,
)

pytestmark = pytest.mark.triton


def make_inputs(groups: int, in_groups: int, k: int, out_channels: int, in_channels: int, seed: int = 0):
    """float64 CPU reps (doubly stochastic, as the layers produce them) and weight."""
    d = in_groups * k * k
    reps = sinkhorn_reference(make_logits(groups, d, d, dtype=torch.float64, scale=2.0, seed=seed))
    weight = make_logits(out_channels, in_channels, d, dtype=torch.float64, seed=seed + 1)
    return reps, weight


def full_stack(reps: torch.Tensor, leading_identity: bool) -> torch.Tensor:
    if not leading_identity:
        return reps
    identity = torch.eye(reps.shape[-1], dtype=reps.dtype, device=reps.device).unsqueeze(0)
    return torch.cat([identity, reps])


def check_against_reference(
    reps64: torch.Tensor,
    weight64: torch.Tensor,
    k: int,
    dtype: torch.dtype,
    device: torch.device,
    *,
    leading_identity: bool = False,
    channels_last: bool = False,
    out_dtype: torch.dtype | None = None,
    grad_layout=lambda g: g,
) -> None:
    """Output and both gradients at least as accurate (vs float64) as the same-dtype reference."""
    reps64, weight64 = reps64.clone().requires_grad_(), weight64.clone().requires_grad_()
    truth = expand_kernel_reference(full_stack(reps64, leading_identity), weight64, k)
    grad64 = make_logits(*truth.shape, dtype=torch.float64, seed=11)
    truth_grads = torch.autograd.grad(truth, (reps64, weight64), grad64)

    kernel_dtype = dtype if out_dtype is None else out_dtype
    low = [t.detach().to(device=device, dtype=dtype).requires_grad_() for t in (reps64, weight64)]
    expected = expand_kernel_reference(full_stack(low[0], leading_identity), low[1], k).to(kernel_dtype)
    kernel = triton_expand_kernel(
        *low, k, out_dtype=out_dtype, channels_last=channels_last, leading_identity=leading_identity
    )
    assert kernel.shape == truth.shape and kernel.dtype == kernel_dtype and kernel.device == device
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    assert kernel.is_contiguous(memory_format=memory_format)
    assert_as_accurate_as_reference(kernel.cpu(), expected.cpu(), truth)

    grad = grad_layout(grad64.to(device=device, dtype=kernel_dtype))
    expected_grads = torch.autograd.grad(expected, low, grad)
    grads = torch.autograd.grad(kernel, low, grad)
    for got, want, exact, tensor in zip(grads, expected_grads, truth_grads, low, strict=True):
        assert got.dtype == tensor.dtype and got.shape == tensor.shape
        assert_as_accurate_as_reference(got.cpu(), want.cpu(), exact)


# (G, G_in, k, C_out, C_in): C = 1, k = 1, 3, 5, 7, G = 1, 4, G_in = 1, 4.
TINY_SHAPES = [
    (1, 1, 1, 1, 1),
    (4, 1, 3, 2, 1),
    (4, 4, 1, 3, 2),
    (1, 4, 3, 1, 3),
    (4, 1, 5, 3, 2),
    (2, 1, 7, 1, 1),
    (4, 4, 3, 1, 1),
]


@pytest.mark.smoke
@pytest.mark.parametrize(
    "dtype,leading_identity",
    [(torch.float32, False), (torch.float32, True), (torch.float16, False)],
    ids=["fp32", "fp32-identity", "fp16"],
)
@pytest.mark.parametrize("shape", TINY_SHAPES, ids=lambda s: "G{}-Gin{}-k{}-O{}-I{}".format(*s))
def test_matches_reference(shape, dtype, leading_identity, device):
    groups, in_groups, k, out_channels, in_channels = shape
    if leading_identity and groups == 1:
        groups = 2  # one learned matrix after the identity
    reps, weight = make_inputs(groups, in_groups, k, out_channels, in_channels, seed=sum(shape))
    check_against_reference(reps, weight, k, dtype, device, leading_identity=leading_identity)


def test_only_the_identity(device):
    """leading_identity with no learned matrix: the kernel is the weight, its gradient passes through."""
    weight = make_logits(3, 2, 9, seed=1).to(device).requires_grad_()
    reps = torch.empty(0, 9, 9, device=device, requires_grad=True)
    kernel = triton_expand_kernel(reps, weight, 3, leading_identity=True)
    torch.testing.assert_close(kernel, weight.reshape(3, 2, 3, 3), rtol=0, atol=0)
    grad = make_logits(3, 2, 3, 3, seed=2).to(device)
    grad_reps, grad_weight = torch.autograd.grad(kernel, (reps, weight), grad)
    assert grad_reps.shape == (0, 9, 9)
    torch.testing.assert_close(grad_weight, grad.reshape(3, 2, 9), rtol=0, atol=0)


@pytest.mark.parametrize(
    "shape,leading_identity",
    [((0, 1, 3, 2, 1), False), ((3, 1, 3, 0, 2), False), ((3, 4, 1, 2, 0), True), ((2, 1, 2, 1, 1), False)],
    ids=["G0", "Cout0", "Cin0", "G2"],
)
def test_empty_sizes_mirror_expand_kernel(shape, leading_identity, device):
    """Sizes the public expand_kernel accepts (no groups, no channels) give the same shapes and zero grads."""
    groups, in_groups, k, out_channels, in_channels = shape
    reps, weight = make_inputs(groups, in_groups, k, out_channels, in_channels)
    reps = reps.float().to(device).requires_grad_()
    weight = weight.float().to(device).requires_grad_()
    expected = symkernels.expand_kernel(full_stack(reps, leading_identity), weight, k, backend="reference")
    kernel = triton_expand_kernel(reps, weight, k, leading_identity=leading_identity)
    assert kernel.shape == expected.shape
    torch.testing.assert_close(kernel, expected)
    grad = torch.ones_like(expected)
    got = torch.autograd.grad(kernel, (reps, weight), grad)
    want = torch.autograd.grad(expected, (reps, weight), grad)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("channels_last", [False, True])
def test_layouts_and_strided_operands(channels_last, device):
    """channels_last output; non-contiguous reps/weight; channels_last and expanded (stride-0) gradients."""
    reps, weight = make_inputs(3, 2, 3, 4, 3, seed=5)
    reps, weight = reps.float().to(device), weight.float().to(device)
    kernel = triton_expand_kernel(
        non_contiguous(reps), non_contiguous(weight), 3, channels_last=channels_last
    )
    assert kernel.is_contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )
    torch.testing.assert_close(kernel, expand_kernel_reference(reps, weight, 3), rtol=1e-5, atol=1e-6)
    reps64, weight64 = make_inputs(3, 2, 3, 4, 3, seed=6)
    check_against_reference(
        reps64,
        weight64,
        3,
        torch.float32,
        device,
        channels_last=channels_last,
        grad_layout=lambda g: g.to(memory_format=torch.channels_last),
    )
    # The gradient of a sum arrives as an expanded tensor with zero strides.
    check_against_reference(
        reps64, weight64, 3, torch.float32, device, grad_layout=lambda g: g[:1, :1, :1, :1].expand(g.shape)
    )


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_out_dtype_writes_the_compute_dtype(out_dtype, device):
    """float32 parameters, a low-precision conv kernel: no separate cast, float32 gradients."""
    reps, weight = make_inputs(4, 1, 3, 3, 2, seed=2)
    check_against_reference(
        reps, weight, 3, torch.float32, device, out_dtype=out_dtype, leading_identity=True
    )


def test_split_reduction_of_grad_reps(device):
    """A reduction long enough to be split into float32 partials summed in a second, fixed-order pass."""
    groups, in_groups, k, out_channels, in_channels = 2, 1, 2, 16, 8
    plan = backward_plan(out_channels, in_channels, groups, groups, in_groups * k * k)
    assert plan.splits >= 2
    reps, weight = make_inputs(groups, in_groups, k, out_channels, in_channels, seed=3)
    check_against_reference(reps, weight, k, torch.float32, device)
    check_against_reference(reps[1:], weight, k, torch.float32, device, leading_identity=True)


def test_backward_plan_balances_and_covers_the_reduction():
    plan = backward_plan(64, 32, 4, 3, 196)
    rows = 64 * 32
    assert plan.rows_per_split % plan.block_r == 0
    assert (plan.splits - 1) * plan.rows_per_split < rows <= plan.splits * plan.rows_per_split
    assert plan.rows_per_split >= 4 * 196
    assert backward_plan(32, 1, 4, 3, 25).splits == 1  # a lifting layer's short reduction stays whole


def poisoned_outputs_check(groups, in_groups, k, out_channels, in_channels, dtype, device, leading_identity):
    """The launchers overwrite every element of NaN-filled outputs with the reference values."""
    reps, weight = make_inputs(groups, in_groups, k, out_channels, in_channels, seed=9)
    reps = (reps[1:] if leading_identity else reps).to(device=device, dtype=dtype)
    weight = weight.to(device=device, dtype=dtype)
    expected = expand_kernel_reference(full_stack(reps, leading_identity), weight, k)
    kernel = torch.full(expected.shape, float("nan"), dtype=dtype, device=device)
    expand_forward_into(reps, weight, kernel, k, leading_identity=leading_identity)
    assert not kernel.isnan().any()
    torch.testing.assert_close(kernel, expected, rtol=2e-2, atol=2e-2)
    grad = make_logits(*expected.shape, seed=4).to(device=device, dtype=dtype)
    grad_reps = torch.full_like(reps, float("nan"))
    grad_weight = torch.full_like(weight, float("nan"))
    expand_backward_into(grad, reps, weight, grad_reps, grad_weight, k, leading_identity=leading_identity)
    assert not grad_reps.isnan().any() and not grad_weight.isnan().any()
    r, w = reps.clone().requires_grad_(), weight.clone().requires_grad_()
    want = torch.autograd.grad(expand_kernel_reference(full_stack(r, leading_identity), w, k), (r, w), grad)
    scale = max(t.abs().max().item() for t in want)
    for got, ref in zip((grad_reps, grad_weight), want, strict=True):
        torch.testing.assert_close(got / scale, ref / scale, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("leading_identity", [False, True])
def test_poisoned_outputs_fully_written(leading_identity, device):
    poisoned_outputs_check(3, 1, 3, 17, 5, torch.float32, device, leading_identity)


def test_opcheck(device):
    reps, weight = make_inputs(3, 1, 3, 2, 2, seed=1)
    reps = reps.float().to(device).requires_grad_()
    weight = weight.float().to(device).requires_grad_()
    grad = make_logits(6, 2, 3, 3, seed=2).to(device)
    cases = [
        (torch.ops.symkernels.triton_expand_kernel.default, (reps, weight, 3, None, False, False)),
        (torch.ops.symkernels.triton_expand_kernel.default, (reps[1:], weight, 3, torch.float16, True, True)),
        (
            torch.ops.symkernels.triton_expand_kernel_backward.default,
            (grad, reps.detach(), weight.detach(), 3, False),
        ),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph_matches_eager(device):
    reps, weight = make_inputs(3, 2, 3, 3, 2, seed=8)
    reps = reps.float().to(device).requires_grad_()
    weight = weight.float().to(device).requires_grad_()

    def loss(r, w):
        return triton_expand_kernel(r, w, 3, channels_last=True, leading_identity=True).sin().sum()

    # The interpreter's ops are opaque to the compiler: aot_eager checks their fake and autograd registration.
    backend = "aot_eager" if device.type == "cpu" else "inductor"
    compiled = torch.compile(loss, fullgraph=True, backend=backend)
    eager_value = loss(reps, weight)
    eager_grads = torch.autograd.grad(eager_value, (reps, weight))
    value = compiled(reps, weight)
    grads = torch.autograd.grad(value, (reps, weight))
    torch.testing.assert_close(value, eager_value)
    for got, want in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want)


def mirror_cases():
    good_reps, good_weight = torch.rand(4, 9, 9), torch.randn(2, 3, 9)
    return {
        "reps-not-tensor": ([[1.0]], good_weight, 3),
        "weight-int": (good_reps, torch.ones(2, 3, 9, dtype=torch.int64), 3),
        "reps-2d": (torch.rand(9, 9), good_weight, 3),
        "reps-not-square": (torch.rand(4, 9, 8), good_weight, 3),
        "weight-2d": (good_reps, torch.randn(2, 9), 3),
        "weight-wrong-d": (good_reps, torch.randn(2, 3, 8), 3),
        "k-does-not-divide": (good_reps, good_weight, 2),
        "k-zero": (good_reps, good_weight, 0),
        "k-bool": (good_reps, good_weight, True),
        "k-float": (good_reps, good_weight, 3.0),
        "dtype-mismatch": (good_reps.half(), good_weight, 3),
    }


@pytest.mark.parametrize("case", list(mirror_cases()))
def test_errors_mirror_expand_kernel(case):
    """Bad input raises the same exception, with the same message, as the public expand_kernel."""
    args = mirror_cases()[case]
    with pytest.raises((TypeError, ValueError)) as expected:
        symkernels.expand_kernel(*args, backend="reference")
    with pytest.raises(expected.type, match=re.escape(str(expected.value))):
        triton_expand_kernel(*args)


def test_errors_of_the_triton_path():
    reps, weight = torch.rand(4, 9, 9), torch.randn(2, 3, 9)
    with pytest.raises(TypeError, match="float64"):
        triton_expand_kernel(reps.double(), weight.double(), 3)
    with pytest.raises(TypeError, match="out_dtype"):
        triton_expand_kernel(reps, weight, 3, out_dtype=torch.int32)
    with pytest.raises(TypeError, match="leading_identity"):
        triton_expand_kernel(reps, weight, 3, leading_identity=1)
    with pytest.raises(TypeError, match="channels_last"):
        triton_expand_kernel(reps, weight, 3, channels_last="yes")
    with pytest.raises(ValueError, match="reps and weight must be"):
        triton_expand_kernel(reps.to("meta"), weight.to("meta"), 3)


AOT_COMPILE = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from symkernels.triton_kernels import expansion as E

    def compile(fn, pointers, constexprs):
        signature = {}
        for name in fn.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            else:
                signature[name] = pointers.get(name, "i32")
        triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32))

    for dtype, dot_f32, identity in (("fp32", True, 1), ("bf16", False, 0)):
        ptr = "*" + dtype
        blocks = dict(BLOCK_R=64, BLOCK_N=64, BLOCK_M=32)
        flags = dict(LEADING_IDENTITY=identity, DOT_F32=dot_f32, **blocks)
        compile(E._expand_forward_kernel, dict(reps_ptr=ptr, weight_ptr=ptr, out_ptr=ptr), flags)
        pointers = dict(grad_ptr=ptr, reps_ptr=ptr, weight_ptr=ptr, grad_weight_ptr=ptr, target_ptr="*fp32")
        compile(E._expand_backward_kernel, pointers, flags)
    compile(E._sum_partials_kernel, dict(partials_ptr="*fp32", out_ptr="*bf16"), dict(BLOCK=1024))
    print("compiled")
    """
)


@pytest.mark.slow
def test_kernels_compile_for_hopper():
    """The interpreter accepts code the GPU compiler rejects: compile each kernel for sm_90 without a GPU."""
    import triton.backends

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton build has no NVIDIA backend")
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", AOT_COMPILE], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-4000:]


# GPU cases: the paper's layer shapes, bf16, poisoned buffers, determinism.

GPU_SHAPES = [(4, 1, 5, 32, 1), (4, 4, 5, 32, 32), (4, 1, 7, 32, 3), (4, 4, 7, 64, 32), (8, 2, 3, 48, 24)]


@pytest.mark.cuda
@pytest.mark.parametrize("leading_identity", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "G{}-Gin{}-k{}-O{}-I{}".format(*s))
def test_gpu_matches_reference(shape, dtype, leading_identity, gpu):
    groups, in_groups, k, out_channels, in_channels = shape
    reps, weight = make_inputs(groups, in_groups, k, out_channels, in_channels, seed=sum(shape))
    if leading_identity:
        reps = reps[1:]
    check_against_reference(reps, weight, k, dtype, gpu, leading_identity=leading_identity)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("leading_identity", [False, True])
def test_gpu_poisoned_outputs_fully_written(dtype, leading_identity, gpu):
    poisoned_outputs_check(4, 4, 7, 64, 32, dtype, gpu, leading_identity)
    poisoned_outputs_check(4, 1, 5, 33, 3, dtype, gpu, leading_identity)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_backward_is_bit_identical(dtype, gpu):
    reps, weight = make_inputs(4, 4, 7, 128, 64, seed=12)
    reps = reps[1:].to(device=gpu, dtype=dtype).requires_grad_()
    weight = weight.to(device=gpu, dtype=dtype).requires_grad_()
    assert backward_plan(128, 64, 4, 3, 196).splits > 1
    kernel = triton_expand_kernel(reps, weight, 7, leading_identity=True)
    grad = torch.randn_like(kernel)
    first = torch.autograd.grad(kernel, (reps, weight), grad, retain_graph=True)
    for _ in range(3):
        again = torch.autograd.grad(kernel, (reps, weight), grad, retain_graph=True)
        assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


@pytest.mark.cuda
def test_gpu_forward_and_backward_capture_in_a_cuda_graph(gpu):
    """No host syncs: the expansion and its backward replay from a CUDA graph with the eager results."""
    reps, weight = make_inputs(4, 4, 5, 32, 32, seed=13)
    reps = reps[1:].to(device=gpu, dtype=torch.float32).requires_grad_()
    weight = weight.to(device=gpu, dtype=torch.float32).requires_grad_()
    grad = make_logits(128, 128, 5, 5, seed=14).to(gpu)

    def step():
        kernel = triton_expand_kernel(reps, weight, 5, leading_identity=True)
        return (kernel, *torch.autograd.grad(kernel, (reps, weight), grad))

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        eager = step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(captured, eager, strict=True):
        assert torch.equal(got, want)
