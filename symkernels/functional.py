"""The functional API: the ops of :mod:`symkernels.ops` and what the layers compose from them."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from symkernels._checks import (
    check_expansion,
    check_floating,
    check_same_device,
    check_same_dtype,
    check_tensor,
)
from symkernels.ops.expansion import expand_kernel, prepend_identity
from symkernels.ops.sinkhorn import grouped_sinkhorn, sinkhorn

__all__ = [
    "expand_kernel",
    "grouped_sinkhorn",
    "permuted_conv2d",
    "prepend_identity",
    "representation_stack",
    "sinkhorn",
]


def representation_stack(
    logits: torch.Tensor,
    n_iter: int = 20,
    tau: float = 1.0,
    *,
    fix_identity: bool = True,
    backend: str | None = None,
    backward: str = "unrolled",
    check_finite: bool = False,
) -> torch.Tensor:
    """``[G', d, d]`` logits → ``[G, d, d]`` stack: Sinkhorn of the logits, the identity first if fixed."""
    if isinstance(logits, torch.Tensor) and logits.dim() != 3:
        raise ValueError(f"logits must have shape [G, d, d], got {tuple(logits.shape)}")
    stack = sinkhorn(logits, n_iter, tau, backend=backend, backward=backward, check_finite=check_finite)
    return prepend_identity(stack) if fix_identity else stack


def permuted_conv2d(
    x: torch.Tensor,
    reps: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    kernel_size: int,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] | str = 0,
    leading_identity: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Convolve with the expanded kernel: ``[B, C_in, H, W]`` (lifting, G_in = 1) or
    ``[B, C_in, G_in, H, W]`` (group conv) → ``[B, C_out, G, H', W']``, plus ``bias`` ``[C_out, 1, 1, 1]``.

    ``leading_identity``: the stack is ``[I, reps...]`` (see :func:`expand_kernel`).
    """
    _, in_group_size = check_expansion(reps, weight, kernel_size, leading_identity=leading_identity)
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
    conv_input = x.flatten(1, 2) if x.dim() == 5 else x
    # The kernel comes in the layout and dtype the convolution computes in: it is neither copied nor cast.
    kernel = expand_kernel(
        reps,
        weight,
        kernel_size,
        leading_identity=leading_identity,
        channels_last=_is_channels_last(conv_input),
        dtype=_convolution_dtype(conv_input, weight),
        backend=backend,
    )
    # The convolution itself stays with cuDNN/ATen: it is compute-bound and already fast.
    y = F.conv2d(conv_input, kernel, stride=stride, padding=padding)
    y = y.unflatten(1, (out_channels, reps.shape[0] + int(leading_identity)))
    if bias is not None:
        y = y + bias.reshape(-1, 1, 1, 1)
    return y


def _is_channels_last(x: torch.Tensor) -> bool:
    """Whether ``x`` is channels_last: the convolution then computes in that layout, kernel included."""
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _convolution_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype ``F.conv2d`` computes in: autocast's where it is on (except float64), else weight's."""
    device = x.device.type
    if weight.dtype == torch.float64 or not torch.amp.is_autocast_available(device):  # e.g. meta tensors
        return weight.dtype
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
