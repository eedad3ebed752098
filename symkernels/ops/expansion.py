"""Kernel expansion: a stack of (soft) permutations applied to a canonical kernel, in the conv layout.

The op family, the same contract on every device::

    symkernels::expand_kernel(reps, weight, kernel_size, leading_identity, backend) -> kernel
    symkernels::expand_kernel_backward(grad, reps, weight, kernel_size, leading_identity, backend)
        -> (grad_reps, grad_weight)

``reps [G', d, d]`` and ``weight [C_out, C_in, d]`` (``d = G_in·k²``) give the conv-ready kernel
``[C_out·G, C_in·G_in, k, k]`` with ``K[o, g, i, :] = R_g θ[o, i, :]`` (output channels o-major, g-minor),
where the stack is ``reps`` or, with ``leading_identity``, ``[I, reps...]`` (``G = G' + 1``) without the
identity ever being materialised. Reductions in the backward are deterministic.

Implementations: ``cpu`` and ``cuda`` (the native library's ``expand_forward``/``expand_backward``),
``triton`` (:mod:`symkernels.ops.expansion_triton`); the pure-PyTorch ``reference`` is called directly by
:func:`expand_kernel`.
"""

from __future__ import annotations

import torch

from symkernels import _native, backends
from symkernels._checks import check_expansion
from symkernels.reference.expansion import expand_kernel_reference

__all__ = ["expand_kernel", "prepend_identity"]

torch.library.define(
    "symkernels::expand_kernel",
    "(Tensor reps, Tensor weight, int kernel_size, bool leading_identity, str backend) -> Tensor",
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


def _kernel_shape(reps, weight, kernel_size: int, leading_identity: bool) -> tuple[int, int, int, int]:
    out_channels, in_channels, d = weight.shape
    groups = reps.shape[0] + int(leading_identity)
    return out_channels * groups, in_channels * (d // (kernel_size * kernel_size)), kernel_size, kernel_size


class _Native:
    """The native library's kernels; on the CPU, float16 and bfloat16 are computed in float32."""

    @staticmethod
    def _widen(tensor: torch.Tensor) -> torch.Tensor:
        low = tensor.device.type == "cpu" and tensor.dtype in (torch.float16, torch.bfloat16)
        return tensor.float() if low else tensor

    @classmethod
    def forward(cls, reps, weight, kernel_size, leading_identity):
        kernel = _native.library().expand_forward(
            cls._widen(reps), cls._widen(weight), kernel_size, leading_identity
        )
        return kernel.to(weight.dtype)

    @classmethod
    def backward(cls, grad, reps, weight, kernel_size, leading_identity):
        grad_reps, grad_weight = _native.library().expand_backward(
            cls._widen(grad), cls._widen(reps), cls._widen(weight), kernel_size, leading_identity
        )
        return grad_reps.to(reps.dtype), grad_weight.to(weight.dtype)


def _kernels(backend: str, tensor: torch.Tensor, op: str):
    """The implementation that runs ``op`` for ``backend`` (a name, or ``"auto"``) on ``tensor``."""
    name = backends.resolve(None if backend == "auto" else backend, tensor.device, tensor.dtype, op)
    if name == "triton":
        from symkernels.ops import expansion_triton

        return expansion_triton
    if name == "reference":
        raise RuntimeError(
            f"{op} has no {tensor.device.type} {tensor.dtype} kernel here "
            f"({backends.backend_status()['cpu'].detail}); "
            "symkernels.expand_kernel(..., backend='reference') computes it in pure PyTorch"
        )
    return _Native


@torch.library.impl("symkernels::expand_kernel", ("cpu", "cuda"))
def _forward(reps, weight, kernel_size, leading_identity, backend):
    return _kernels(backend, weight, "expand_kernel").forward(reps, weight, kernel_size, leading_identity)


@torch.library.impl("symkernels::expand_kernel_backward", ("cpu", "cuda"))
def _backward_impl(grad, reps, weight, kernel_size, leading_identity, backend):
    kernels = _kernels(backend, weight, "expand_kernel_backward")
    return kernels.backward(grad, reps, weight, kernel_size, leading_identity)


@torch.library.register_fake("symkernels::expand_kernel")
def _(reps, weight, kernel_size, leading_identity, backend):
    return weight.new_empty(_kernel_shape(reps, weight, kernel_size, leading_identity))


@torch.library.register_fake("symkernels::expand_kernel_backward")
def _(grad, reps, weight, kernel_size, leading_identity, backend):
    return torch.empty_like(reps), torch.empty_like(weight)


def _setup_context(ctx, inputs, output) -> None:
    reps, weight, kernel_size, leading_identity, backend = inputs
    ctx.save_for_backward(reps, weight)
    ctx.kernel_size, ctx.leading_identity, ctx.backend = kernel_size, leading_identity, backend


def _autograd(ctx, grad_kernel):
    reps, weight = ctx.saved_tensors
    grad_reps, grad_weight = torch.ops.symkernels.expand_kernel_backward(
        grad_kernel, reps, weight, ctx.kernel_size, ctx.leading_identity, ctx.backend
    )
    return grad_reps, grad_weight, None, None, None


torch.library.register_autograd("symkernels::expand_kernel", _autograd, setup_context=_setup_context)


def expand_kernel(
    reps: torch.Tensor,
    weight: torch.Tensor,
    kernel_size: int,
    *,
    leading_identity: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """reps ``[G', d, d]`` and weight ``[C_out, C_in, d]`` (``d = G_in·k²``) → ``[C_out·G, C_in·G_in, k, k]``.

    ``K[o, g, i, :] = R_g θ[o, i, :]``: output channels o-major, g-minor; input channels i-major. With
    ``leading_identity`` the stack is ``[I, reps...]`` (``G = G' + 1``) and the identity is not materialised.
    """
    check_expansion(reps, weight, kernel_size, leading_identity=leading_identity)
    name = backends.resolve(backend, weight.device, weight.dtype, "expand_kernel")
    if name == "reference":
        stack = prepend_identity(reps) if leading_identity else reps
        return expand_kernel_reference(stack, weight, kernel_size)
    return torch.ops.symkernels.expand_kernel(reps, weight, kernel_size, leading_identity, name)
