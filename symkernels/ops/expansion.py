"""Kernel expansion: a stack of (soft) permutations applied to a canonical kernel, in the conv layout.

The op family, the same contract on every device::

    symkernels::expand_kernel(reps, weight, kernel_size, leading_identity, channels_last, dtype, backend)
        -> kernel
    symkernels::expand_kernel_backward(grad, reps, weight, kernel_size, leading_identity, backend)
        -> (grad_reps, grad_weight)

``reps [G', d, d]`` and ``weight [C_out, C_in, d]`` (``d = G_in·k²``) give the conv-ready kernel
``[C_out·G, C_in·G_in, k, k]`` with ``K[o, g, i, :] = R_g θ[o, i, :]`` (output channels o-major, g-minor),
where the stack is ``reps`` or, with ``leading_identity``, ``[I, reps...]`` (``G = G' + 1``) without the
identity ever being materialised. The kernel is written in the layout (contiguous or ``channels_last``) and
``dtype`` the convolution wants, so that no copy or cast runs between the two; the gradient may come in any
layout and floating dtype, and the gradients are returned in reps' and weight's dtype. Reductions in the
backward are deterministic.

Implementations: ``cpu`` and ``cuda`` (the native library's ``expand_forward``/``expand_backward``),
``triton`` (:mod:`symkernels.ops.expansion_triton`); the pure-PyTorch ``reference`` is called directly by
:func:`expand_kernel`.

Where the calls run: as for :mod:`symkernels.ops.sinkhorn`, the native library registers the CPU, CUDA and
Autograd kernels in C++ (``csrc/expansion/expansion_op.cpp``) and hands the other calls to
:func:`_python_forward` / :func:`_python_backward`, which are the kernels themselves without the native
library.
"""

from __future__ import annotations

import torch

from symkernels import backends
from symkernels._checks import check_expansion, check_kernel_dtype
from symkernels.ops.python_kernels import register_python_kernels
from symkernels.reference.expansion import expand_kernel_reference

__all__ = ["expand_kernel", "prepend_identity"]

torch.library.define(
    "symkernels::expand_kernel",
    "(Tensor reps, Tensor weight, int kernel_size, bool leading_identity, bool channels_last,"
    " ScalarType dtype, str backend) -> Tensor",
)
torch.library.define(
    "symkernels::expand_kernel_backward",
    "(Tensor grad, Tensor reps, Tensor weight, int kernel_size, bool leading_identity, str backend)"
    " -> (Tensor, Tensor)",
)


def prepend_identity(stack: torch.Tensor) -> torch.Tensor:
    """``[G', d, d]`` → ``[G' + 1, d, d]`` with the exact identity first (the fixed element of a stack)."""
    identity = torch.eye(stack.shape[-1], dtype=stack.dtype, device=stack.device).unsqueeze(0)
    return torch.cat([identity, stack], dim=0)


def _new_kernel(
    reps, weight, kernel_size: int, leading_identity: bool, channels_last: bool, dtype
) -> torch.Tensor:
    """The uninitialised conv weight ``[C_out·G, C_in·G_in, k, k]`` that the forward writes."""
    out_channels, in_channels, d = weight.shape
    groups = reps.shape[0] + int(leading_identity)
    shape = (
        out_channels * groups,
        in_channels * (d // (kernel_size * kernel_size)),
        kernel_size,
        kernel_size,
    )
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, device=weight.device, memory_format=layout)


_FORWARD = torch.ops.symkernels.expand_kernel.default
_BACKWARD = torch.ops.symkernels.expand_kernel_backward.default


def _implementation(backend: str, tensor: torch.Tensor, op: str) -> str:
    """The backend that runs ``op`` for ``backend`` (a name, or ``"auto"``) on ``tensor``; raises if none."""
    name = backends.resolve(None if backend == "auto" else backend, tensor.device, tensor.dtype, op)
    if name == "reference":
        raise RuntimeError(
            f"{op} has no {tensor.device.type} {tensor.dtype} kernel here "
            f"({backends.backend_status()['cpu'].detail}); "
            "symkernels.expand_kernel(..., backend='reference') computes it in pure PyTorch"
        )
    return name


def _python_forward(reps, weight, kernel_size, leading_identity, channels_last, dtype, backend):
    """``symkernels::expand_kernel`` where the native kernels do not run it: Triton, an automatic choice
    (resolved here, then run by name), a choice that cannot serve (its error)."""
    name = _implementation(backend, weight, "expand_kernel")
    if name != "triton":
        return _FORWARD(reps, weight, kernel_size, leading_identity, channels_last, dtype, name)
    from symkernels.ops import expansion_triton

    kernel = _new_kernel(reps, weight, kernel_size, leading_identity, channels_last, dtype)
    expansion_triton.forward(reps, weight, kernel, kernel_size, leading_identity)
    return kernel


def _python_backward(grad, reps, weight, kernel_size, leading_identity, backend):
    """``symkernels::expand_kernel_backward`` where the native kernels do not run it."""
    name = _implementation(backend, weight, "expand_kernel_backward")
    if name != "triton":
        return _BACKWARD(grad, reps, weight, kernel_size, leading_identity, name)
    from symkernels.ops import expansion_triton

    return expansion_triton.backward(grad, reps, weight, kernel_size, leading_identity)


@torch.library.register_fake("symkernels::expand_kernel")
def _(reps, weight, kernel_size, leading_identity, channels_last, dtype, backend):
    return _new_kernel(reps, weight, kernel_size, leading_identity, channels_last, dtype)


@torch.library.register_fake("symkernels::expand_kernel_backward")
def _(grad, reps, weight, kernel_size, leading_identity, backend):
    # Every implementation returns contiguous gradients, whatever reps' and weight's strides.
    contiguous = torch.contiguous_format
    return torch.empty_like(reps, memory_format=contiguous), torch.empty_like(
        weight, memory_format=contiguous
    )


def _setup_context(ctx, inputs, output) -> None:
    reps, weight, kernel_size, leading_identity, _, _, backend = inputs
    ctx.save_for_backward(reps, weight)
    ctx.kernel_size, ctx.leading_identity, ctx.backend = kernel_size, leading_identity, backend


def _autograd(ctx, grad_kernel):
    reps, weight = ctx.saved_tensors
    grad_reps, grad_weight = _BACKWARD(
        grad_kernel, reps, weight, ctx.kernel_size, ctx.leading_identity, ctx.backend
    )
    return grad_reps, grad_weight, None, None, None, None, None


register_python_kernels("expand_kernel", _python_forward, _python_backward, _autograd, _setup_context)


def expand_kernel(
    reps: torch.Tensor,
    weight: torch.Tensor,
    kernel_size: int,
    *,
    leading_identity: bool = False,
    channels_last: bool = False,
    dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """reps ``[G', d, d]`` and weight ``[C_out, C_in, d]`` (``d = G_in·k²``) → ``[C_out·G, C_in·G_in, k, k]``.

    ``K[o, g, i, :] = R_g θ[o, i, :]``: output channels o-major, g-minor; input channels i-major. With
    ``leading_identity`` the stack is ``[I, reps...]`` (``G = G' + 1``) and the identity is not materialised.
    The kernel is ``channels_last`` or contiguous, in ``dtype`` (default: weight's), computed in float32 or
    float64 and rounded once; gradients flow back in reps' and weight's dtypes.
    """
    check_expansion(reps, weight, kernel_size, leading_identity=leading_identity)
    if not isinstance(channels_last, bool):
        raise TypeError(f"channels_last must be a bool, got {type(channels_last).__name__}")
    dtype = weight.dtype if dtype is None else check_kernel_dtype(dtype, "dtype")
    name = backends.resolve(backend, weight.device, weight.dtype, "expand_kernel")
    if name == "reference":
        stack = prepend_identity(reps) if leading_identity else reps
        layout = torch.channels_last if channels_last else torch.contiguous_format
        return expand_kernel_reference(stack, weight, kernel_size).to(dtype, memory_format=layout)
    return _FORWARD(reps, weight, kernel_size, leading_identity, channels_last, dtype, name)
