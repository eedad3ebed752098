"""The CIFAR-10 models: WS-ResNet and its plain ResNet baseline (docs/design.md §7)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from symkernels.models.accounting import sum_regularizers
from symkernels.nn import WSConv2d, WSLiftConv2d, channel_layer_norm, precompute_representations

ConvFactory = Callable[[int, int], nn.Module]


def _spatial_max_pool(x: torch.Tensor, size: int) -> torch.Tensor:
    """Max-pool H and W only; a group axis (5-D input) is kept."""
    if x.dim() == 4:
        return F.max_pool2d(x, size)
    return F.max_pool2d(x.flatten(1, 2), size).unflatten(1, x.shape[1:3])


class ChannelLinear(nn.Linear):
    """A Linear map over the channel axis (dim 1) of ``[B, C, ...]`` feature maps."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


class ResBlock(nn.Module):
    """``[conv, norm, ReLU, conv, norm, ReLU] + shortcut``; norm is non-affine per channel over (G,)H,W."""

    def __init__(self, in_channels: int, out_channels: int, conv: ConvFactory) -> None:
        super().__init__()
        self.conv1 = conv(in_channels, out_channels)
        self.conv2 = conv(out_channels, out_channels)
        self.shortcut = (
            nn.Identity() if in_channels == out_channels else ChannelLinear(in_channels, out_channels)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(channel_layer_norm(self.conv1(x)))
        y = F.relu(channel_layer_norm(self.conv2(y)))
        return y + self.shortcut(x)


class _ResNetLayout(nn.Module):
    """stem → BN → ReLU; two ResBlocks (width ×1, ×2), each → BN, MaxPool(2), ReLU; head."""

    def __init__(
        self,
        stem: nn.Module,
        conv: ConvFactory,
        batch_norm: Callable[[int], nn.Module],
        hidden_channels: int,
        num_classes: int,
        dropout: float,
    ) -> None:
        super().__init__()
        wide = 2 * hidden_channels
        self.stem = stem
        self.stem_norm = batch_norm(hidden_channels)
        self.blocks = nn.ModuleList(
            [ResBlock(hidden_channels, hidden_channels, conv), ResBlock(hidden_channels, wide, conv)]
        )
        self.block_norms = nn.ModuleList([batch_norm(hidden_channels), batch_norm(wide)])
        self.head = nn.Sequential(
            nn.Linear(wide, 256, bias=False),
            nn.BatchNorm1d(256),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(256, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Every layer's stack from one grouped Sinkhorn (reused as is inside an enclosing context).
        with precompute_representations(self):
            x = F.relu(self.stem_norm(self.stem(x)))
            for block, norm in zip(self.blocks, self.block_norms, strict=True):
                x = F.relu(_spatial_max_pool(norm(block(x)), 2))
        return self.head(x.flatten(2).mean(dim=2))

    def regularizers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(norm, entropy)`` summed over all weight-sharing layers (zeros for the plain ResNet)."""
        return sum_regularizers(self)


class WSResNet(_ResNetLayout):
    """Weight-sharing ResNet; the defaults are the paper's CIFAR-10 model (k = 7, "same" padding)."""

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        hidden_channels: int = 32,
        kernel_size: int = 7,
        group_size: int = 4,
        *,
        n_iter: int = 20,
        tau: float = 1.0,
        fix_identity: bool = True,
        dropout: float = 0.3,
    ) -> None:
        stack = {"n_iter": n_iter, "tau": tau, "fix_identity": fix_identity, "padding": kernel_size // 2}

        def conv(c_in: int, c_out: int) -> nn.Module:
            return WSConv2d(c_in, c_out, kernel_size, group_size, **stack)

        stem = WSLiftConv2d(in_channels, hidden_channels, kernel_size, group_size, **stack)
        super().__init__(stem, conv, nn.BatchNorm3d, hidden_channels, num_classes, dropout)


class ResNet(_ResNetLayout):
    """The plain ResNet baseline with the WS-ResNet layout (Conv2d, BatchNorm2d)."""

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        hidden_channels: int = 32,
        kernel_size: int = 7,
        *,
        dropout: float = 0.3,
    ) -> None:
        def conv(c_in: int, c_out: int) -> nn.Module:
            return nn.Conv2d(c_in, c_out, kernel_size, padding=kernel_size // 2)

        stem = conv(in_channels, hidden_channels)
        super().__init__(stem, conv, nn.BatchNorm2d, hidden_channels, num_classes, dropout)
