"""``torch.ops.symkernels`` kernel expansion on Triton: ``triton_expand_kernel`` and its exact backward.

Two operators:

* ``symkernels::triton_expand_kernel(reps, weight, kernel_size, out_dtype, channels_last, leading_identity)``
  returns the conv-ready kernel ``[C_out·G, C_in·G_in, k, k]``, written in place by one launch;
* ``symkernels::triton_expand_kernel_backward(grad, reps, weight, kernel_size, leading_identity)`` returns
  ``(R̄, θ̄)`` from one launch (two when the ``R̄`` reduction is split), with deterministic reductions.

On a GPU they are ``torch.library.triton_op``s, so ``torch.compile`` sees the Triton kernels; under the
Triton interpreter, plain custom ops (:mod:`symkernels.ops.triton_registration`).
"""

from __future__ import annotations

import torch

from symkernels._checks import check_expansion
from symkernels.ops.triton_registration import INTERPRETED, define_op, wrap_triton
from symkernels.triton_kernels.expansion import expand_backward_into, expand_forward_into

__all__ = ["SUPPORTED_DTYPES", "triton_expand_kernel"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_FORWARD = "symkernels::triton_expand_kernel"
_BACKWARD = "symkernels::triton_expand_kernel_backward"


def _kernel_shape(reps: torch.Tensor, weight: torch.Tensor, kernel_size: int, leading_identity: bool):
    out_channels, in_channels, d = weight.shape
    groups = reps.shape[0] + int(leading_identity)
    in_groups = d // (kernel_size * kernel_size)
    return out_channels * groups, in_channels * in_groups, kernel_size, kernel_size


def _empty_kernel(
    reps: torch.Tensor,
    weight: torch.Tensor,
    kernel_size: int,
    out_dtype: torch.dtype | None,
    channels_last: bool,
    leading_identity: bool,
) -> torch.Tensor:
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(
        _kernel_shape(reps, weight, kernel_size, leading_identity),
        dtype=weight.dtype if out_dtype is None else out_dtype,
        device=weight.device,
        memory_format=memory_format,
    )


def _forward_impl(
    reps: torch.Tensor,
    weight: torch.Tensor,
    kernel_size: int,
    out_dtype: torch.dtype | None,
    channels_last: bool,
    leading_identity: bool,
) -> torch.Tensor:
    kernel = _empty_kernel(reps, weight, kernel_size, out_dtype, channels_last, leading_identity)
    expand_forward_into(
        reps, weight, kernel, kernel_size, leading_identity=leading_identity, wrap=wrap_triton
    )
    return kernel


def _backward_impl(
    grad: torch.Tensor, reps: torch.Tensor, weight: torch.Tensor, kernel_size: int, leading_identity: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    grad_reps = torch.empty(reps.shape, dtype=reps.dtype, device=reps.device)
    grad_weight = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    expand_backward_into(
        grad,
        reps,
        weight,
        grad_reps,
        grad_weight,
        kernel_size,
        leading_identity=leading_identity,
        wrap=wrap_triton,
    )
    return grad_reps, grad_weight


def _backward_fake(grad, reps, weight, kernel_size, leading_identity):
    return (
        torch.empty_like(reps, memory_format=torch.contiguous_format),
        torch.empty_like(weight, memory_format=torch.contiguous_format),
    )


_forward_op = define_op(_FORWARD, _forward_impl, _empty_kernel)
_backward_op = define_op(_BACKWARD, _backward_impl, _backward_fake)


def _setup_context(ctx, inputs, output) -> None:
    reps, weight, kernel_size, _, _, leading_identity = inputs
    ctx.save_for_backward(reps, weight)
    ctx.kernel_size, ctx.leading_identity = kernel_size, leading_identity


def _backward(ctx, grad_kernel):
    reps, weight = ctx.saved_tensors
    # The grad is read through its strides (contiguous, channels_last or expanded): no copy.
    grad_reps, grad_weight = _backward_op(grad_kernel, reps, weight, ctx.kernel_size, ctx.leading_identity)
    return grad_reps, grad_weight, None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _check_inputs(reps, weight, kernel_size, out_dtype, channels_last, leading_identity) -> None:
    check_expansion(reps, weight, kernel_size)  # reps and weight share one device and dtype
    device, dtype = weight.device, weight.dtype
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"reps and weight must be float16, bfloat16 or float32 for the triton expansion, got {dtype}; "
            "use the cpu or reference backend for float64"
        )
    if out_dtype is not None and out_dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"out_dtype must be None, float16, bfloat16 or float32, got {out_dtype}")
    for name, flag in (("channels_last", channels_last), ("leading_identity", leading_identity)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    if INTERPRETED:
        if device.type != "cpu":
            raise ValueError(f"under TRITON_INTERPRET=1 reps and weight must be CPU tensors, got {device}")
    elif device.type != "cuda":
        raise ValueError(
            f"reps and weight must be CUDA tensors for the triton expansion, got {device} "
            "(set TRITON_INTERPRET=1 before importing triton to run it on the CPU)"
        )


def triton_expand_kernel(
    reps: torch.Tensor,
    weight: torch.Tensor,
    kernel_size: int,
    *,
    out_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    leading_identity: bool = False,
) -> torch.Tensor:
    """reps ``[G, d, d]`` and weight ``[C_out, C_in, d]`` (``d = G_in·k²``) → ``[C_out·G, C_in·G_in, k, k]``.

    ``K[o, g, i, :] = R_g θ[o, i, :]``, written by one Triton launch straight into the conv layout:
    contiguous, or ``channels_last`` when asked, in ``out_dtype`` (default: the inputs' dtype), accumulated
    in float32. Inputs are read through their strides. Gradients are exact and deterministic (fixed-order
    reductions, no atomics) and come back in the inputs' dtype.

    ``leading_identity=True`` takes only the learned matrices ``reps [G-1, d, d]`` and uses ``R_0 = I``
    without materialising it (a stack with a fixed identity, without the concatenation).

    float16, bfloat16 and float32 on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``.
    """
    _check_inputs(reps, weight, kernel_size, out_dtype, channels_last, leading_identity)
    return _forward_op(reps, weight, kernel_size, out_dtype, channels_last, leading_identity)


def dispatched_expand_kernel(reps: torch.Tensor, weight: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """The backend's ``expand_kernel`` op (registered by ``symkernels.ops.triton_backend``): the arguments
    were checked by ``symkernels.expand_kernel``, the dtype and device by ``backends.resolve``."""
    return _forward_op(reps, weight, kernel_size, None, False, False)
