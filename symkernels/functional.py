"""The functional API: input checks, then the backend chosen by :mod:`symkernels.backends`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from symkernels import backends
from symkernels._checks import (
    check_expansion,
    check_finite,
    check_floating,
    check_positive_int,
    check_same_device,
    check_same_dtype,
    check_square_stack,
    check_tau,
    check_tensor,
)
from symkernels.ops.representation import prepend_identity
from symkernels.ops.sinkhorn import attach_fixed_point_gradient

__all__ = ["expand_kernel", "permuted_conv2d", "representation_stack", "sinkhorn"]

BACKWARD_MODES = ("unrolled", "implicit")


def _check_logits(logits: object, n_iter: object, tau: object, backward: object, finite: bool) -> float:
    logits = check_tensor(logits, "logits")
    check_floating(logits, "logits")
    check_square_stack(logits, "logits")
    check_positive_int(n_iter, "n_iter")
    tau = check_tau(tau)
    if backward not in BACKWARD_MODES:
        raise ValueError(f"backward must be one of {BACKWARD_MODES}, got {backward!r}")
    if finite:
        check_finite(logits, "logits")
    return tau


def sinkhorn(
    logits: torch.Tensor,
    n_iter: int = 20,
    tau: float = 1.0,
    *,
    backend: str | None = None,
    backward: str = "unrolled",
    check_finite: bool = True,
) -> torch.Tensor:
    """Doubly stochastic matrices from ``[..., n, n]`` logits (log domain, rows then columns per iteration).

    Returns the input dtype; computes in float32 at least (float64 stays float64).

    ``backward="unrolled"`` (default) is the exact gradient of the ``n_iter``-step map, equal to autograd
    through the loop. ``backward="implicit"`` differentiates the fixed point instead (the converged map); the
    two agree only when the forward has converged, i.e. for large ``n_iter``.

    ``check_finite=False`` skips the NaN/Inf test, which reads a flag from the device (a host sync) on every
    call; the output is then NaN for matrices whose logits are not finite.
    """
    tau = _check_logits(logits, n_iter, tau, backward, check_finite)
    impl = backends.resolve("sinkhorn", backend, logits.device, logits.dtype)
    if backward == "implicit":
        with torch.no_grad():
            p = impl(logits, n_iter, tau)
        return attach_fixed_point_gradient(logits, p, tau)
    return impl(logits, n_iter, tau)


def representation_stack(
    logits: torch.Tensor,
    n_iter: int = 20,
    tau: float = 1.0,
    *,
    fix_identity: bool = True,
    backend: str | None = None,
    backward: str = "unrolled",
    check_finite: bool = True,
) -> torch.Tensor:
    """``[G', d, d]`` logits → ``[G, d, d]`` stack: Sinkhorn of the logits, the identity first if fixed."""
    tau = _check_logits(logits, n_iter, tau, backward, check_finite)
    if logits.dim() != 3:
        raise ValueError(f"logits must have shape [G, d, d], got {tuple(logits.shape)}")
    if backward == "implicit":
        stack = sinkhorn(logits, n_iter, tau, backend=backend, backward=backward, check_finite=False)
        return prepend_identity(stack) if fix_identity else stack
    impl = backends.resolve("representation_stack", backend, logits.device, logits.dtype)
    return impl(logits, n_iter, tau, fix_identity=fix_identity)


def expand_kernel(
    reps: torch.Tensor, weight: torch.Tensor, kernel_size: int, *, backend: str | None = None
) -> torch.Tensor:
    """reps ``[G, d, d]`` and weight ``[C_out, C_in, d]`` (``d = G_in·k²``) → ``[C_out·G, C_in·G_in, k, k]``.

    ``K[o, g, i, :] = R_g θ[o, i, :]``: output channels are o-major, g-minor; input channels i-major.
    """
    check_expansion(reps, weight, kernel_size)
    impl = backends.resolve("expand_kernel", backend, weight.device, weight.dtype)
    return impl(reps, weight, kernel_size)


def permuted_conv2d(
    x: torch.Tensor,
    reps: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    kernel_size: int,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] | str = 0,
    backend: str | None = None,
) -> torch.Tensor:
    """Convolve with the expanded kernel: ``[B, C_in, H, W]`` (lifting, G_in = 1) or
    ``[B, C_in, G_in, H, W]`` (group conv) → ``[B, C_out, G, H', W']``, plus ``bias`` ``[C_out, 1, 1, 1]``.
    """
    _, in_group_size = check_expansion(reps, weight, kernel_size)
    x = check_tensor(x, "x")
    check_floating(x, "x")
    out_channels, in_channels = weight.shape[:2]
    if x.dim() == 4:
        if in_group_size != 1:
            raise ValueError(
                f"x has shape {tuple(x.shape)} (no group axis) but the reps act on G_in = {in_group_size} "
                "input group elements; pass x as [B, C_in, G_in, H, W]"
            )
    elif x.dim() == 5:
        if x.shape[2] != in_group_size:
            raise ValueError(
                f"x's group axis (dim 2) has size {x.shape[2]}, expected G_in = {in_group_size} "
                f"(d / kernel_size²)"
            )
    else:
        raise ValueError(f"x must have shape [B, C, H, W] or [B, C, G, H, W], got {tuple(x.shape)}")
    if x.shape[1] != in_channels:
        raise ValueError(f"x has {x.shape[1]} channels (dim 1), weight expects C_in = {in_channels}")
    if bias is not None:
        bias = check_tensor(bias, "bias")
        if bias.numel() != out_channels or bias.dim() not in (1, 4):
            raise ValueError(
                f"bias must have shape [C_out] or [C_out, 1, 1, 1] with C_out = {out_channels}, "
                f"got {tuple(bias.shape)}"
            )
    check_same_device({"x": x, "reps": reps, "weight": weight, "bias": bias})
    check_same_dtype({"x": x, "reps": reps, "weight": weight, "bias": bias})
    kernel = expand_kernel(reps, weight, kernel_size, backend=backend)
    # The convolution itself stays with cuDNN/ATen: it is compute-bound and already fast.
    y = F.conv2d(x.flatten(1, 2) if x.dim() == 5 else x, kernel, stride=stride, padding=padding)
    y = y.unflatten(1, (out_channels, reps.shape[0]))
    if bias is not None:
        y = y + bias.reshape(-1, 1, 1, 1)
    return y
