"""Triton launches run on the device of their tensors.

Triton launches on the current CUDA device (and its current stream), not the tensors': tensors on ``cuda:1``
launched with device 0 current would fault. The launchers switch to the tensors' device for the launch
(``symkernels.ops.triton_support.on_device``), as the C++ entry points do with a ``CUDAGuard``.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

pytest.importorskip("triton")

from symkernels.ops import expansion_triton, sinkhorn_triton, triton_support  # noqa: E402
from symkernels.ops.triton_support import on_device  # noqa: E402
from tests.testing import make_logits  # noqa: E402

pytestmark = pytest.mark.triton


def test_on_device_switches_only_to_another_cuda_device(monkeypatch):
    entered = []

    class Switch:  # stands in for torch.cuda.device, which needs a GPU
        def __init__(self, index):
            entered.append(index)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", Switch)
    with on_device(torch.device("cuda", 1)):
        pass
    assert entered == [1]
    for device in (torch.device("cuda", 0), torch.device("cuda"), torch.device("cpu")):
        with on_device(device):
            pass
    assert entered == [1]


def test_every_launcher_launches_under_its_tensors_device(monkeypatch, triton_device):
    seen = []
    monkeypatch.setattr(
        triton_support, "on_device", lambda device: seen.append(device) or contextlib.nullcontext()
    )
    logits = make_logits(2 * 9, seed=1).to(triton_device)
    p, cols, domain, iterations = sinkhorn_triton.forward(logits, [3], [2], 3, 1.0, 0.0, None)
    sinkhorn_triton.backward(p, logits, [3], [2], cols, domain, iterations, 1.0)
    reps = torch.eye(9, device=triton_device).unsqueeze(0)
    weight = make_logits(2, 1, 9, seed=2).to(triton_device)
    kernel = torch.empty(4, 1, 3, 3, device=triton_device)
    expansion_triton.forward(reps, weight, kernel, 3, True)
    expansion_triton.backward(kernel, reps, weight, 3, True)
    assert seen == [triton_device] * 4


@pytest.mark.cuda
def test_tensors_on_another_device_than_the_current_one():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    import symkernels

    logits = make_logits(4, 20, 20, seed=3)
    with torch.cuda.device(1):
        want = symkernels.sinkhorn(logits.to("cuda:1"), 10, backend="triton")
    with torch.cuda.device(0):
        x = logits.to("cuda:1").requires_grad_()
        got = symkernels.sinkhorn(x, 10, backend="triton")
        (grad,) = torch.autograd.grad(got.square().sum(), x)
    torch.cuda.synchronize(1)
    assert got.device == grad.device == torch.device("cuda", 1)
    assert torch.equal(got, want) and bool(grad.isfinite().all())
