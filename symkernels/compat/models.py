"""``WSCNN``, ``WSResBlock`` and ``WSResNet`` with the published constructors, submodule names and methods,
built from the compat layers.

Two differences from the published models, both on purpose: the head's input keeps its batch axis for a batch
of one (the published ``squeeze()`` drops it), and ``WSResNet`` creates its weight-sharing layers on torch's
default device like the rest of the model (the published one creates them on ``"cuda"`` and the rest on the
CPU, until ``.to(device)``). ``visualize`` (matplotlib and wandb plots) is not provided.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from symkernels.compat.arguments import resolve_device
from symkernels.compat.layers import WSConv2d, WSLiftConv2d, _PublishedWeightSharing
from symkernels.reference.sinkhorn import AUTHORS_TOLERANCE

__all__ = ["WSCNN", "WSResBlock", "WSResNet", "parameter_counts", "sum_losses"]

REPRESENTATIONS_DIR = "representations"


def sum_losses(layers: list[_PublishedWeightSharing]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norm, entropy)`` summed over ``layers``' ``get_loss()``."""
    norms, entropies = zip(*(layer.get_loss() for layer in layers), strict=True)
    return torch.stack(norms).sum(), torch.stack(entropies).sum()


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Trainable parameters as the published models count them: ``representations`` (the logits) apart from
    the rest (``free``); the frozen ``id`` is in neither."""
    counts = {"free": 0, "representations": 0}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            counts["representations" if "representations" in name else "free"] += parameter.numel()
    return counts


def _print_counts(counts: dict[str, int]) -> None:
    free, reps = float(counts["free"]), float(counts["representations"])
    print(f"# free parameters: {free}, # representations parameters: {reps}, Total: {free + reps}")


def _save(stack: torch.Tensor, name: str, suffix: str) -> str:
    os.makedirs(REPRESENTATIONS_DIR, exist_ok=True)
    path = os.path.join(".", REPRESENTATIONS_DIR, f"{name}_rep_{suffix}.pt")
    torch.save(stack.detach().cpu(), path)
    return path


class WSCNN(nn.Module):
    """The published MNIST model: a lifting layer and ``num_hidden`` group convolutions (no padding), each
    followed by a per-sample layer norm over (C, G, H, W) and ReLU; the mean over (G, H, W); a Linear head.

    Submodules ``first_conv``, ``convs``, ``projection_layer``, ``final_linear``. ``tol`` (keyword only): the
    layers' Sinkhorn tolerance (``None``: exactly ``n_iter`` iterations).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 10,
        kernel_size: int = 5,
        num_hidden: int = 4,
        group_size: int = 4,
        hidden_channels: int = 16,
        device: str | torch.device | None = "cuda",
        n_iter: int = 20,
        init_mode: str = "rand",
        fix_identity: bool = False,
        *,
        tol: float | None = AUTHORS_TOLERANCE,
    ) -> None:
        super().__init__()
        device = resolve_device(device, stacklevel=3)  # one warning for the model, not one per layer
        options = {"n_iter": n_iter, "init_mode": init_mode, "fix_identity": fix_identity, "tol": tol}
        self.first_conv = WSLiftConv2d(
            in_channels, hidden_channels, kernel_size, group_size, device=device, **options
        )
        self.num_hidden = num_hidden
        self.convs = nn.ModuleList(
            WSConv2d(
                hidden_channels,
                hidden_channels,
                kernel_size,
                group_size,
                group_size,
                device=device,
                **options,
            )
            for _ in range(num_hidden)
        )
        self.group_size = group_size
        self.hidden_channels = hidden_channels
        self.projection_layer = nn.AdaptiveAvgPool3d(1)
        self.final_linear = nn.Linear(hidden_channels, out_channels, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in (self.first_conv, *self.convs):
            x = conv(x)
            x = F.relu(F.layer_norm(x, x.shape[-4:]))
        return self.final_linear(self.projection_layer(x).flatten(1))

    def weight_sharing_layers(self) -> list[_PublishedWeightSharing]:
        return [self.first_conv, *self.convs]

    def get_loss(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(norm, entropy)`` summed over the layers."""
        return sum_losses(self.weight_sharing_layers())

    def get_parameter_counts(self) -> dict[str, int]:
        """Prints the published line (free, representations, total) and returns the counts."""
        counts = parameter_counts(self)
        _print_counts(counts)
        return counts

    def save_representations(self, name: str = "") -> None:
        """Each layer's stack to ``./representations/{name}_rep_{i}.pt`` (``i = 0`` the lifting layer; the
        folder is created if missing); prints the first path."""
        print(_save(self.first_conv.get_representations(), name, "0"))
        for index, conv in enumerate(self.convs):
            _save(conv.get_representations(), name, str(index + 1))


class WSResBlock(nn.Module):
    """Two "same"-padded group convolutions, each followed by a per-channel layer norm over (G, H, W) and
    ReLU; plus the shortcut (a Linear over channels when their number changes); BatchNorm3d, 2×2 max-pool
    over (H, W), ReLU. Submodules ``gconv1``, ``gconv2``, ``norm_out``, ``pool``, ``shortcut``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        group_size: int,
        kernel_size: int = 7,
        n_iter: int = 20,
        init_mode: str = "rand",
        fix_identity: bool = False,
        *,
        tol: float | None = AUTHORS_TOLERANCE,
    ) -> None:
        super().__init__()
        options = {
            "padding": "same",
            "n_iter": n_iter,
            "init_mode": init_mode,
            "fix_identity": fix_identity,
            "tol": tol,
            "device": None,
        }
        self.gconv1 = WSConv2d(in_channels, out_channels, kernel_size, group_size, group_size, **options)
        self.gconv2 = WSConv2d(out_channels, out_channels, kernel_size, group_size, group_size, **options)
        self.group_size = group_size
        self.norm_out = nn.BatchNorm3d(out_channels)
        self.pool = nn.MaxPool2d(kernel_size=2)
        self.out_channels = out_channels
        self.shortcut = nn.Linear(in_channels, out_channels) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.gconv1(x)
        out = F.relu(F.layer_norm(out, out.shape[-3:]))  # per sample and channel, over (G, H, W)
        out = self.gconv2(out)
        out = F.relu(F.layer_norm(out, out.shape[-3:]))
        shortcut = x if self.shortcut is None else self.shortcut(x.movedim(1, -1)).movedim(-1, 1)
        out = self.norm_out(out + shortcut)
        out = self.pool(out.flatten(1, 2)).unflatten(1, (self.out_channels, self.group_size))
        return F.relu(out)


class WSResNet(nn.Module):
    """The published CIFAR-10 model: a "same"-padded lifting layer, BatchNorm3d and ReLU, two
    :class:`WSResBlock` (width ×1, ×2), the mean over (G, H, W) and an MLP head (Linear, BatchNorm1d, ReLU,
    Dropout(0.3), Linear). Submodules ``lifting_conv``, ``norm1``, ``resblock1``, ``resblock2``,
    ``projection_layer``, ``final_linear``."""

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 10,
        kernel_size: int = 5,
        hidden_channels: int = 16,
        group_size: int = 4,
        n_iter: int = 20,
        init_mode: str = "rand",
        fix_identity: bool = False,
        *,
        tol: float | None = AUTHORS_TOLERANCE,
    ) -> None:
        super().__init__()
        options = {"n_iter": n_iter, "init_mode": init_mode, "fix_identity": fix_identity, "tol": tol}
        self.lifting_conv = WSLiftConv2d(
            in_channels, hidden_channels, kernel_size, group_size, padding="same", device=None, **options
        )
        self.norm1 = nn.BatchNorm3d(hidden_channels)
        wide = 2 * hidden_channels
        self.resblock1 = WSResBlock(hidden_channels, hidden_channels, group_size, kernel_size, **options)
        self.resblock2 = WSResBlock(hidden_channels, wide, group_size, kernel_size, **options)
        self.projection_layer = nn.AdaptiveAvgPool3d(1)
        self.final_linear = nn.Sequential(
            nn.Linear(wide, 256, bias=False),
            nn.BatchNorm1d(256),
            nn.ReLU(True),
            nn.Dropout(0.3),
            nn.Linear(256, out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.lifting_conv(x)))
        out = self.resblock2(self.resblock1(out))
        return self.final_linear(self.projection_layer(out).flatten(1))

    def weight_sharing_layers(self) -> list[_PublishedWeightSharing]:
        blocks = (self.resblock1, self.resblock2)
        return [self.lifting_conv, *(conv for block in blocks for conv in (block.gconv1, block.gconv2))]

    def get_loss(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(norm, entropy)`` summed over the layers."""
        return sum_losses(self.weight_sharing_layers())

    def get_parameter_counts(self) -> dict[str, int]:
        """Prints the published line (free, representations, total) and returns the counts."""
        counts = parameter_counts(self)
        _print_counts(counts)
        return counts

    def save_representations(self, name: str = "") -> None:
        """Each layer's stack to ``./representations/{name}_rep_{0, block1_g1, block1_g2, block2_g1,
        block2_g2}.pt``."""
        _save(self.lifting_conv.get_representations(), name, "0")
        for b, block in enumerate((self.resblock1, self.resblock2), start=1):
            _save(block.gconv1.get_representations(), name, f"block{b}_g1")
            _save(block.gconv2.get_representations(), name, f"block{b}_g2")
