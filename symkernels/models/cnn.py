"""The rotated-MNIST models: WSCNN, its plain CNN baseline and the exact C4 G-CNN (docs/design.md §7)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from symkernels.groups import rotation_permutations, shift_twist
from symkernels.models.accounting import sum_regularizers
from symkernels.nn import FixedStack, WSConv2d, WSLiftConv2d, precompute_representations, sample_layer_norm


class WSCNN(nn.Module):
    """Lifting layer + ``num_layers`` group-conv layers, each followed by a non-affine per-sample layer norm
    and ReLU; global mean over (G, H, W); Linear head. The defaults are the paper's MNIST model."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        hidden_channels: int = 32,
        kernel_size: int = 5,
        group_size: int = 4,
        *,
        num_layers: int = 4,
        padding: int | str = 0,
        n_iter: int = 20,
        tau: float = 1.0,
        fix_identity: bool = True,
    ) -> None:
        super().__init__()
        stack = {"n_iter": n_iter, "tau": tau, "fix_identity": fix_identity, "padding": padding}
        self.lift = WSLiftConv2d(in_channels, hidden_channels, kernel_size, group_size, **stack)
        self.convs = nn.ModuleList(
            WSConv2d(hidden_channels, hidden_channels, kernel_size, group_size, **stack)
            for _ in range(num_layers)
        )
        self.head = nn.Linear(hidden_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Every layer's stack from one grouped Sinkhorn (reused as is inside an enclosing context).
        with precompute_representations(self):
            x = F.relu(sample_layer_norm(self.lift(x)))
            for conv in self.convs:
                x = F.relu(sample_layer_norm(conv(x)))
        return self.head(x.mean(dim=(2, 3, 4)))

    def regularizers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(norm, entropy)`` summed over all weight-sharing layers."""
        return sum_regularizers(self)


class GCNN(WSCNN):
    """The WSCNN layout with exact rotation representations (a C4 regular G-CNN for ``group_size=4``)."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        hidden_channels: int = 32,
        kernel_size: int = 5,
        group_size: int = 4,
        *,
        num_layers: int = 4,
        padding: int | str = 0,
    ) -> None:
        super().__init__(
            in_channels,
            num_classes,
            hidden_channels,
            kernel_size,
            group_size,
            num_layers=num_layers,
            padding=padding,
        )
        self.lift.reps = FixedStack(rotation_permutations(kernel_size, order=group_size))
        for conv in self.convs:
            conv.reps = FixedStack(shift_twist(kernel_size, order=group_size))


class CNN(nn.Module):
    """Plain CNN with the WSCNN layout (defaults: 64 channels, the paper's baseline)."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        hidden_channels: int = 64,
        kernel_size: int = 5,
        *,
        num_layers: int = 4,
        padding: int | str = 0,
    ) -> None:
        super().__init__()
        self.lift = nn.Conv2d(in_channels, hidden_channels, kernel_size, padding=padding)
        self.convs = nn.ModuleList(
            nn.Conv2d(hidden_channels, hidden_channels, kernel_size, padding=padding)
            for _ in range(num_layers)
        )
        self.head = nn.Linear(hidden_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(sample_layer_norm(self.lift(x)))
        for conv in self.convs:
            x = F.relu(sample_layer_norm(conv(x)))
        return self.head(x.mean(dim=(2, 3)))

    def regularizers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """No weight-sharing layers: ``(0, 0)``."""
        return sum_regularizers(self)
