"""Both op families on inputs that are not contiguous (transposed, sliced, expanded, channels_last), on each
implementation: the fake kernels describe the real outputs (opcheck), and a compiled graph (inductor,
``fullgraph=True``, whose generated code asserts every op output's strides) equals eager, values and
gradients.
Every implementation returns contiguous results (the kernel expansion: the layout it is asked for)."""

from __future__ import annotations

import pytest
import torch
import torch._functorch.config
import torch._inductor.config

import symkernels
from tests.testing import make_logits

LAYOUTS = ("transposed", "sliced", "expanded", "channels_last")


def sinkhorn_stack(layout: str, device: torch.device) -> torch.Tensor:
    """A ``[3, 5, 5]`` stack of logits laid out as ``layout`` (a leaf, requiring gradients)."""
    if layout == "transposed":
        stack = make_logits(3, 5, 5, seed=1).to(device).transpose(-1, -2)
    elif layout == "sliced":
        stack = make_logits(6, 7, 7, seed=2).to(device)[::2, 1:6, 1:6]
    elif layout == "expanded":
        stack = make_logits(1, 5, 5, seed=3).to(device).expand(3, 5, 5)
    else:  # one image of a channels_last batch: channels innermost
        stack = make_logits(2, 3, 5, 5, seed=4).to(device).contiguous(memory_format=torch.channels_last)[0]
    assert not stack.is_contiguous()
    return stack.requires_grad_()


def expansion_inputs(layout: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """reps ``[2, 9, 9]`` and weight ``[3, 2, 9]`` (k = 3) laid out as ``layout`` (leaves)."""
    if layout == "transposed":
        reps = make_logits(2, 9, 9, seed=1).transpose(-1, -2)
        weight = make_logits(2, 3, 9, seed=2).transpose(0, 1)
    elif layout == "sliced":
        reps = make_logits(4, 9, 9, seed=3)[::2]
        weight = make_logits(3, 4, 9, seed=4)[:, ::2]
    elif layout == "expanded":
        reps = make_logits(1, 9, 9, seed=5).expand(2, 9, 9)
        weight = make_logits(1, 2, 9, seed=6).expand(3, 2, 9)
    else:  # permuted as a channels_last tensor's dimensions are
        reps = make_logits(1, 2, 9, 9, seed=7).contiguous(memory_format=torch.channels_last)[0]
        weight = make_logits(1, 3, 2, 9, seed=8).contiguous(memory_format=torch.channels_last)[0]
    assert not reps.is_contiguous() and not weight.is_contiguous()
    return reps.to(device).requires_grad_(), weight.to(device).requires_grad_()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sinkhorn_opcheck_on_strided_stacks(implementation, layout):
    stacks = [sinkhorn_stack(layout, implementation.device), make_logits(2, 3, 3).to(implementation.device)]
    args = (stacks, 3, 1.0, 1e-3, "stack", None, implementation.name)
    torch.library.opcheck(torch.ops.symkernels.sinkhorn.default, args)
    p, cols, domain, iterations = torch.ops.symkernels.sinkhorn.default(*args)
    assert all(q.is_contiguous() for q in p)
    grad_p = [make_logits(3, 5, 5, seed=5).transpose(-1, -2), make_logits(2, 3, 1, seed=6).expand(2, 3, 3)]
    grad_p = [g.to(implementation.device) for g in grad_p]
    state = (cols, domain, iterations, 1.0, implementation.name)
    plain = [s.detach() for s in stacks]  # the backward op is not differentiable itself
    torch.library.opcheck(torch.ops.symkernels.sinkhorn_backward.default, (grad_p, plain, *state))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_expansion_opcheck_on_strided_inputs(implementation, layout):
    reps, weight = expansion_inputs(layout, implementation.device)
    for channels_last in (False, True):
        args = (reps, weight, 3, True, channels_last, torch.float32, implementation.name)
        torch.library.opcheck(torch.ops.symkernels.expand_kernel.default, args)
    kernel = torch.ops.symkernels.expand_kernel.default(reps, weight, 3, True, False, torch.float32, "auto")
    grad = torch.randn(kernel.shape).to(implementation.device).contiguous(memory_format=torch.channels_last)
    args = (grad, reps.detach(), weight.detach(), 3, True, implementation.name)
    torch.library.opcheck(torch.ops.symkernels.expand_kernel_backward.default, args)


@pytest.fixture
def fresh_compiles():
    """Compiles from scratch: a graph that inductor cached (on disk) while the fake kernels were another
    version would hide what these ones describe."""
    torch._dynamo.reset()
    caches_off = (
        torch._inductor.config.patch(fx_graph_cache=False),
        torch._functorch.config.patch(enable_autograd_cache=False),
    )
    with caches_off[0], caches_off[1]:
        yield
    torch._dynamo.reset()


def compiled_equals_eager(fn, inputs: list[torch.Tensor]) -> None:
    compiled = torch.compile(fn, fullgraph=True, dynamic=False)
    value = compiled(*inputs)
    grads = torch.autograd.grad(value, inputs)
    eager_value = fn(*inputs)
    eager_grads = torch.autograd.grad(eager_value, inputs)
    torch.testing.assert_close(value, eager_value)
    for got, want in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.usefixtures("fresh_compiles")
def test_sinkhorn_compiles_on_strided_inputs(implementation):
    """One graph over every layout: the public function (a [B, C, n, n] channels_last batch included)."""
    stacks = [sinkhorn_stack(layout, implementation.device) for layout in LAYOUTS[:3]]
    batch = make_logits(2, 3, 5, 5, seed=9).to(implementation.device)
    stacks.append(batch.contiguous(memory_format=torch.channels_last).requires_grad_())
    weights = torch.linspace(0.5, 2.0, 25).view(5, 5).to(implementation.device)

    def loss(*logits):
        outputs = [symkernels.sinkhorn(x, 4, backend=implementation.name) for x in logits]
        grouped = symkernels.grouped_sinkhorn(list(logits[:3]), 4, backend=implementation.name)
        return sum(((p * weights).sum() for p in outputs), start=sum(p.square().sum() for p in grouped))

    compiled_equals_eager(loss, stacks)


@pytest.mark.usefixtures("fresh_compiles")
def test_expansion_compiles_on_strided_inputs(implementation):
    """One graph over every layout: the kernel expansion, and the convolution of a channels_last input (its
    kernel written channels_last, its gradient coming back channels_last)."""
    inputs = [tensor for layout in LAYOUTS for tensor in expansion_inputs(layout, implementation.device)]
    x = (
        make_logits(2, 2, 6, 6, seed=10)
        .to(implementation.device)
        .contiguous(memory_format=torch.channels_last)
    )
    weights = torch.linspace(0.5, 2.0, 162).view(9, 2, 3, 3).to(implementation.device)  # the kernel's shape

    def loss(*tensors):
        total = x.new_zeros(())
        for reps, weight in zip(tensors[::2], tensors[1::2], strict=True):
            kernel = symkernels.expand_kernel(
                reps, weight, 3, leading_identity=True, backend=implementation.name
            )
            total = total + (kernel * weights).sum()
            out = symkernels.permuted_conv2d(
                x, reps, weight, kernel_size=3, leading_identity=True, backend=implementation.name
            )
            total = total + out.square().mean()
        return total

    compiled_equals_eager(loss, inputs)
