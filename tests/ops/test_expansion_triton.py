"""The Triton kernel expansion launchers (``symkernels.ops.expansion_triton``) against the reference: the
kernel and both gradients (with and without the leading identity, float32 and float16), kernels written
channels_last and in another dtype, gradients read through their strides (channels_last, expanded) with a
reduction split into partials, only the identity, and outputs fully written (every allocation NaN-poisoned).

Runs under the Triton interpreter (``TRITON_INTERPRET=1`` set before triton is imported, see conftest.py; CPU
tensors, tiny shapes) or on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from symkernels.reference import expand_kernel_reference, sinkhorn_reference
from tests.testing import assert_as_accurate_as_reference, make_logits
from tests.triton_testing import poison

pytest.importorskip("triton")

from symkernels.ops import expansion_triton  # noqa: E402
from symkernels.ops.expansion_triton import backward_plan  # noqa: E402
from symkernels.ops.triton_support import INTERPRETED  # noqa: E402

pytestmark = pytest.mark.triton


def expansion_inputs(groups, in_groups, k, out_channels, in_channels, seed=0):
    d = in_groups * k * k
    reps = sinkhorn_reference(make_logits(groups, d, d, dtype=torch.float64, scale=2.0, seed=seed))
    weight = make_logits(out_channels, in_channels, d, dtype=torch.float64, seed=seed + 1)
    return reps, weight


def with_identity(reps: torch.Tensor, leading_identity: bool) -> torch.Tensor:
    if not leading_identity:
        return reps
    identity = torch.eye(reps.shape[-1], dtype=reps.dtype, device=reps.device).unsqueeze(0)
    return torch.cat([identity, reps])


def check_expansion(reps64, weight64, k, leading_identity, dtype, device, grad_layout=lambda g: g):
    """The kernel and both gradients at least as accurate (vs float64) as the same-dtype reference."""
    exact = [t.clone().requires_grad_() for t in (reps64, weight64)]
    truth = expand_kernel_reference(with_identity(exact[0], leading_identity), exact[1], k)
    # The gradient as it arrives (its values too: an expanded one repeats its first entry).
    grad64 = grad_layout(make_logits(*truth.shape, dtype=torch.float64, seed=11))
    truth_grads = torch.autograd.grad(truth, exact, grad64)
    low = [t.to(dtype).requires_grad_() for t in (reps64, weight64)]
    expected = expand_kernel_reference(with_identity(low[0], leading_identity), low[1], k)
    expected_grads = torch.autograd.grad(expected, low, grad64.to(dtype))

    reps, weight = (t.detach().to(device) for t in low)
    kernel = torch.empty(truth.shape, dtype=dtype, device=device)
    expansion_triton.forward(reps, weight, kernel, k, leading_identity)
    assert_as_accurate_as_reference(kernel.cpu(), expected.detach(), truth.detach())
    grad = grad_layout(grad64.to(dtype).contiguous().to(device))
    grads = expansion_triton.backward(grad, reps, weight, k, leading_identity)
    for got, want, true, tensor in zip(grads, expected_grads, truth_grads, low, strict=True):
        assert got.shape == tensor.shape and got.dtype == dtype and got.is_contiguous()
        assert_as_accurate_as_reference(got.cpu(), want, true)


@pytest.mark.smoke
@pytest.mark.parametrize(
    "shape,leading_identity,dtype",
    [
        ((4, 1, 3, 2, 3), False, torch.float32),
        ((3, 2, 3, 3, 2), True, torch.float32),
        ((1, 1, 1, 1, 1), False, torch.float32),
        ((4, 1, 5, 3, 2), True, torch.float16),
    ],
    ids=["G4-k3", "identity-Gin2", "all-ones", "fp16-k5"],
)
def test_expansion_matches_reference(shape, leading_identity, dtype, triton_device):
    reps, weight = expansion_inputs(*shape, seed=sum(shape))
    check_expansion(
        reps[1:] if leading_identity else reps, weight, shape[2], leading_identity, dtype, triton_device
    )


def test_expansion_reads_gradients_through_their_strides(triton_device):
    """channels_last and expanded (stride-0, the gradient of a sum) kernel gradients; a reduction long enough
    to be split into partials."""
    reps, weight = expansion_inputs(3, 1, 2, 16, 8, seed=3)
    assert backward_plan(16, 8, 3, 2, 4, exact=True).splits > 1
    check_expansion(
        reps,
        weight,
        2,
        False,
        torch.float32,
        triton_device,
        lambda g: g.to(memory_format=torch.channels_last),
    )
    check_expansion(
        reps[1:], weight, 2, True, torch.float32, triton_device, lambda g: g[:1, :1, :1, :1].expand(g.shape)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expansion_writes_channels_last_kernels_in_any_dtype(dtype, triton_device):
    """Through the kernel's strides and in its dtype: the contiguous float32 kernel, rounded once."""
    reps, weight = (t.float().to(triton_device) for t in expansion_inputs(3, 2, 3, 5, 3, seed=5))
    want = torch.empty(5 * 3, 3 * 2, 3, 3, device=triton_device)
    expansion_triton.forward(reps, weight, want, 3, False)
    kernel = torch.full_like(want, float("nan"), dtype=dtype).to(memory_format=torch.channels_last)
    expansion_triton.forward(reps, weight, kernel, 3, False)
    assert kernel.is_contiguous(memory_format=torch.channels_last)
    # Triton's interpreter truncates float32 to bfloat16 (compiled, it rounds to nearest even, as torch does).
    ulps = 1 if INTERPRETED and dtype == torch.bfloat16 else 0
    torch.testing.assert_close(kernel, want.to(dtype), rtol=ulps * 2**-7, atol=0)


def test_expansion_of_only_the_identity(triton_device):
    weight = make_logits(3, 2, 9, seed=1).to(triton_device)
    reps = torch.empty(0, 9, 9, device=triton_device)
    kernel = torch.empty(3, 2, 3, 3, device=triton_device)
    expansion_triton.forward(reps, weight, kernel, 3, True)
    torch.testing.assert_close(kernel, weight.reshape(3, 2, 3, 3), rtol=0, atol=0)
    grad = make_logits(3, 2, 3, 3, seed=2).to(triton_device)
    grad_reps, grad_weight = expansion_triton.backward(grad, reps, weight, 3, True)
    assert grad_reps.shape == (0, 9, 9)
    torch.testing.assert_close(grad_weight, grad.reshape(3, 2, 9), rtol=0, atol=0)


@pytest.mark.parametrize("leading_identity", [False, True])
def test_expansion_outputs_fully_written(leading_identity, triton_device, monkeypatch):
    reps, weight = expansion_inputs(3, 1, 3, 17, 5, seed=9)
    reps = (reps[1:] if leading_identity else reps).float().to(triton_device)
    weight = weight.float().to(triton_device)
    grad = make_logits(17 * 3, 5, 3, 3, seed=4).to(triton_device)
    poison(monkeypatch, expansion_triton)
    kernel = torch.full((17 * 3, 5, 3, 3), float("nan"), device=triton_device)
    expansion_triton.forward(reps, weight, kernel, 3, leading_identity)
    grad_reps, grad_weight = expansion_triton.backward(grad, reps, weight, 3, leading_identity)
    monkeypatch.undo()
    for tensor in (kernel, grad_reps, grad_weight):
        assert bool(torch.isfinite(tensor).all())
    stack = with_identity(reps, leading_identity)
    torch.testing.assert_close(kernel, expand_kernel_reference(stack, weight, 3), rtol=1e-5, atol=1e-5)
