"""Shared test matrix: dtypes, tolerances and input factories."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import symkernels

FLOAT_DTYPES = (torch.float32, torch.float64)

# Tolerances for comparing two computations of the same math in the same dtype.
TOLERANCES = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-12},
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
    torch.float16: {"rtol": 1e-2, "atol": 1e-3},
    torch.bfloat16: {"rtol": 2e-2, "atol": 1e-2},
}


def make_logits(
    *shape: int, dtype: torch.dtype = torch.float32, scale: float = 1.0, seed: int = 0
) -> torch.Tensor:
    """Gaussian logits ``scale·N(0, 1)`` from a private generator (reproducible, never all zeros)."""
    generator = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=generator, dtype=torch.float64)).to(dtype)


def random_permutation_matrix(n: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.eye(n, dtype=dtype)[torch.randperm(n, generator=generator)]


def non_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    """The same values, laid out transposed in memory (a non-contiguous view)."""
    view = tensor.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not view.is_contiguous() or tensor.shape[-1] == 1
    return view


def assert_as_accurate_as_reference(
    got: torch.Tensor,
    reference: torch.Tensor,
    truth: torch.Tensor,
    *,
    computed_from: float = 0.0,
    compute_dtype: torch.dtype = torch.float64,
) -> None:
    """The kernel's error against a float64 ground truth is at most ~2× the same-dtype reference's error
    (plus a floor of a few dozen ulps of the result's scale: summation order differs).

    ``computed_from``: the size of the quantities the result is a difference of (a Sinkhorn gradient:
    |grad_p| / tau), computed in ``compute_dtype``. An entry far below it (saturated logits, or a gradient
    that nearly cancels) is resolved only to a few ulps of it in the kernel's compute precision (one ulp of
    an entry of P moves it by that much; the reference's autograd can do better there by its structure, and
    the float64 truth is itself only that accurate), so the floor includes that much."""
    truth = truth.to(torch.float64)
    scale = truth.abs().max().item() if truth.numel() else 0.0
    floor = max(
        32 * torch.finfo(got.dtype).eps * max(scale, 1e-30),
        32 * torch.finfo(compute_dtype).eps * computed_from,
    )
    got_error = (got.to(torch.float64) - truth).abs().max().item() if truth.numel() else 0.0
    reference_error = (reference.to(torch.float64) - truth).abs().max().item() if truth.numel() else 0.0
    assert got_error <= 2 * reference_error + floor, (got_error, reference_error, floor)


# The largest n of the native CPU kernels' small-matrix path (csrc/sinkhorn/sinkhorn_cpu.h, kMaxLaneSize).
CPU_LANES_MAX_SIZE = 8


@dataclass(frozen=True)
class Implementation:
    """An implementation of the ops, where it runs, and the dtypes its tests cover."""

    name: str
    device: torch.device
    dtypes: tuple[torch.dtype, ...]
    interpreted: bool = False  # Triton in its CPU interpreter: tiny shapes only

    def compute_dtype(self, dtype: torch.dtype, n: int | None = None) -> torch.dtype:
        """The precision the kernels compute ``dtype`` inputs of n x n matrices in (``n=None``: any n):
        float64 on the native CPU but for float32 matrices of n <= 8 (its small-matrix path computes them in
        float32), else float32 at least (docs/ops.md, Numerics)."""
        if dtype == torch.float64:
            return torch.float64
        if self.name == "cpu" and (n is None or n > CPU_LANES_MAX_SIZE):
            return torch.float64
        return torch.float32


def implementation_for(name: str) -> Implementation:
    """The implementation ``name`` (``cpu``, ``triton`` or ``cuda``), or a skip naming the hardware it needs.

    The native CPU kernels are never skipped: a build that lost them must fail the tests.
    """
    status = symkernels.backend_status()[name]
    if name == "cpu":
        assert status.usable, f"the native CPU kernels are unavailable: {status.detail}"
        return Implementation("cpu", torch.device("cpu"), (torch.float32, torch.float64))
    if not status.usable:
        needs = (
            "a CUDA GPU, or Triton's CPU interpreter" if name == "triton" else "a CUDA GPU and a CUDA build"
        )
        pytest.skip(f"needs {needs} ({name} backend: {status.detail})")
    if name == "triton":
        from symkernels.ops.triton_support import INTERPRETED

        device = torch.device("cpu" if INTERPRETED else "cuda")
        return Implementation("triton", device, (torch.float32, torch.float16), interpreted=INTERPRETED)
    return Implementation("cuda", torch.device("cuda"), (torch.float32, torch.bfloat16, torch.float16))


def require_extras(*extras: str) -> None:
    """Skip the calling test module unless every package of these optional extras is installed.

    The GPU machines' lean stack (scripts/test_gpu_stack.sh) has none of them; the main test run installs all.
    """
    from symkernels.cli import EXTRA_OF_MODULE

    for module, extra in EXTRA_OF_MODULE.items():
        if extra in extras:
            pytest.importorskip(module, reason=f"the optional extra symkernels[{extra}] is not installed")
