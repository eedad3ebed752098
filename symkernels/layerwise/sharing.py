"""Where the two methods meet: a weight-sharing layer next to an unconstrained path, each with its own prior.

A :class:`SharingLayer` averages two paths over ``[B, C, G, H, W]`` features: ``ws``, one canonical kernel
``θ`` permuted by a stack ``R`` (learned soft permutations, or the exact C4 rotations / shift-twists), and
``free``, an unconstrained convolution with the whole expanded kernel as its parameters. The marginal
likelihood learns both paths' prior precisions, so each layer chooses how much weight sharing to keep.

The WS kernel is linear in ``θ`` for a fixed stack: ``y[o, g] = Σ_{c,m} θ[o, c, m] Σ_n R[g, n, m] p[c, n]``.
Its curvature form is therefore an ``nn.Linear`` on patches projected through the stack (fixed at its current
value, the same projection idea as S-CONV), shared over positions and group elements. The stack's logits are
fitted by the data term only and carry no prior.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

import symkernels
from symkernels._checks import check_int
from symkernels.groups import rotation_permutations, shift_twist
from symkernels.layerwise.paths import TwoFormModule, circular_pad, circular_patches
from symkernels.nn import DoublyStochasticStack, FixedStack

STACKS = ("learned", "exact")


def _flat(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, G, H, W] → [B, C·G, H, W]`` (channel-major), ``[B, C, H, W]`` unchanged."""
    return x.flatten(1, 2) if x.dim() == 5 else x


class SharedKernelPath(TwoFormModule):
    """WS: ``[B, C_in(, G_in), H, W] → [B, C_out, G, H, W]``, the kernel ``θ`` permuted by each ``R_g``.

    ``θ`` and the bias live in ``self.linear`` (``[C_out, C_in·d]``, ``d = G_in·k²``); ``in_group_size=1`` is
    a lifting layer. The training form is :func:`symkernels.permuted_conv2d`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        kernel_size: int = 3,
        group_size: int = 4,
        in_group_size: int = 1,
        stride: int = 1,
        stack: str = "learned",
        n_iter: int = 20,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.stride = check_int("stride", stride)
        self.in_channels = check_int("in_channels", in_channels)
        self.out_channels = check_int("out_channels", out_channels)
        self.kernel_size = k = check_int("kernel_size", kernel_size)
        self.group_size = check_int("group_size", group_size)
        self.in_group_size = check_int("in_group_size", in_group_size)
        if stack not in STACKS:
            raise ValueError(f"stack must be one of {list(STACKS)}, got {stack!r}")
        self.dim = d = in_group_size * k * k
        self.linear = nn.Linear(in_channels * d, out_channels)
        if stack == "learned":
            self.reps: DoublyStochasticStack | FixedStack = DoublyStochasticStack(
                group_size, d, n_iter=n_iter, generator=generator
            )
        elif in_group_size == 1:
            self.reps = FixedStack(rotation_permutations(k, group_size))
        elif in_group_size == group_size:
            self.reps = FixedStack(shift_twist(k, group_size))
        else:
            raise ValueError(f"exact stacks need in_group_size 1 or {group_size}, got {in_group_size}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expected = 4 if self.in_group_size == 1 else 5
        if x.dim() != expected or x.shape[1] != self.in_channels:
            raise ValueError(
                f"SharedKernelPath expects [B, {self.in_channels}"
                f"{'' if expected == 4 else f', {self.in_group_size}'}, H, W], got {tuple(x.shape)}"
            )
        reps = self.reps()
        batch, height, width = x.shape[0], x.shape[-2] // self.stride, x.shape[-1] // self.stride
        if not self.in_curvature_form:
            padded = circular_pad(_flat(x), self.kernel_size)
            if x.dim() == 5:
                padded = padded.unflatten(1, (self.in_channels, self.in_group_size))
            weight = self.linear.weight.reshape(self.out_channels, self.in_channels, self.dim)
            return symkernels.permuted_conv2d(
                padded, reps, weight, self.linear.bias, kernel_size=self.kernel_size, stride=self.stride
            )
        patches = circular_patches(_flat(x), self.kernel_size, self.stride)  # [B, C_in·G_in, k², L]
        patches = patches.reshape(batch, self.in_channels, self.dim, -1)  # d = (h, ky, kx)
        projected = torch.einsum("gnm,bcnl->blgcm", reps.detach(), patches).flatten(3)  # [B, L, G, C_in·d]
        y = self.linear(projected)  # [B, L, G, C_out]
        return y.permute(0, 3, 2, 1).reshape(batch, self.out_channels, self.group_size, height, width)


class FreeKernelPath(nn.Module):
    """FREE: an unconstrained circular convolution ``C_in·G_in → C_out·G``, as ``[B, C_out, G, H, W]``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        kernel_size: int = 3,
        group_size: int = 4,
        in_group_size: int = 1,
        stride: int = 1,
    ) -> None:
        super().__init__()
        self.kernel_size = check_int("kernel_size", kernel_size)
        self.out_channels = check_int("out_channels", out_channels)
        self.group_size = check_int("group_size", group_size)
        self.conv = nn.Conv2d(
            in_channels * in_group_size, out_channels * group_size, kernel_size, stride=stride, padding=0
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(circular_pad(_flat(x), self.kernel_size))
        return y.unflatten(1, (self.out_channels, self.group_size))


class SharingLayer(nn.Module):
    """``ReLU(0.5·(WS(x) + FREE(x)))`` on ``[B, C, G, H, W]`` (the first layer lifts ``[B, C, H, W]``)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        lifting: bool,
        stride: int = 1,
        kernel_size: int = 3,
        group_size: int = 4,
        stack: str = "learned",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        in_group_size = 1 if lifting else group_size
        self.paths = nn.ModuleDict(
            {
                "ws": SharedKernelPath(
                    in_channels,
                    out_channels,
                    kernel_size=kernel_size,
                    group_size=group_size,
                    in_group_size=in_group_size,
                    stride=stride,
                    stack=stack,
                    generator=generator,
                ),
                "free": FreeKernelPath(
                    in_channels,
                    out_channels,
                    kernel_size=kernel_size,
                    group_size=group_size,
                    in_group_size=in_group_size,
                    stride=stride,
                ),
            }
        )
        self.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(0.5 * (self.paths["ws"](x) + self.paths["free"](x)))

    def reset_parameters(self) -> None:
        """He initialisation with the gain √(2·2) of two averaged paths; zero biases."""
        gain = math.sqrt(4)
        for module in (self.paths["ws"].linear, self.paths["free"].conv):
            fan_in = module.weight[0].numel()
            nn.init.normal_(module.weight, std=gain / math.sqrt(fan_in))
            nn.init.zeros_(module.bias)


class SharingNetwork(nn.Module):
    """A lifting :class:`SharingLayer`, group-conv sharing layers, a mean over ``(G, H, W)`` and the head."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        *,
        width: int = 4,
        blocks: Sequence[tuple[int, int]] = ((1, 1), (1, 2), (2, 2)),
        kernel_size: int = 3,
        group_size: int = 4,
        stack: str = "learned",
        seed: int = 0,
    ) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)  # the stacks' initial logits
        layers, channels = [], check_int("in_channels", in_channels)
        for index, (mult, stride) in enumerate(blocks):
            layers.append(
                SharingLayer(
                    channels,
                    mult * width,
                    lifting=index == 0,
                    stride=stride,
                    kernel_size=kernel_size,
                    group_size=group_size,
                    stack=stack,
                    generator=generator,
                )
            )
            channels = mult * width
        self.blocks = nn.ModuleList(layers)
        self.head = nn.Sequential(
            nn.Linear(channels, 4 * channels),
            nn.ReLU(),
            nn.Linear(4 * channels, check_int("num_classes", num_classes)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=(-3, -2, -1)))

    def stack_parameters(self) -> list[nn.Parameter]:
        """The learned stacks' logits (fitted by the data term; no prior, no curvature)."""
        return [p for m in self.modules() if isinstance(m, DoublyStochasticStack) for p in m.parameters()]
