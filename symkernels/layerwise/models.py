"""The backbone of relaxed layers: blocks of (channel multiple of α, stride), a global pool and a small head.

The paper's backbone (α = 10, 32×32 inputs) has 8 blocks ``(in→α,1)(α→2α,2)(2α→2α,1)(2α→4α,2)(4α→4α,1)
(4α→8α,2)(8α→8α,2)(8α→16α,2)`` and the head ``Linear(16α, 64α)–ReLU–Linear(64α, classes)``, no BatchNorm.
After the blocks the features are averaged over the remaining positions (1×1 on 32×32, so the pool is the
identity there): the head never sees where a feature is, only the relaxed layers can keep position.

With a GCONV path (selecting among groups, the paper's §6.3) the backbone works on the image lifted to its
four quarter turns: every block maps ``G·C → G·C'`` channels (copy ``g`` of the lifted map in channels
``g·C …``), GCONV shares one convolution over the copies while CONV and F-FC see the ``G·C`` channels as
one map, and the copies are max-pooled before the average pool. So only GCONV keeps the network invariant
to quarter turns.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from symkernels._checks import check_int
from symkernels.layerwise.paths import PATHS, RelaxedLayer

Blocks = tuple[tuple[int, int], ...]

PAPER_BLOCKS: Blocks = ((1, 1), (2, 2), (2, 1), (4, 2), (4, 1), (8, 2), (8, 2), (16, 2))
PAPER_WIDTH = 10
PAPER_SIZE = 32
LIFTED_GROUP_SIZE = 4  # C4: a backbone with a GCONV path lifts its input to the four quarter turns

# The layer types of the paper: FC+CONV (residual pathways), F-FC+S-CONV, S-FC+S-CONV, and selecting among
# groups (F-FC / CONV / C4 GCONV on the lifted input).
PATH_SETS: dict[str, tuple[str, ...]] = {
    "fc-conv": ("fc", "conv"),
    "ffc-sconv": ("ffc", "sconv"),
    "sfc-sconv": ("sfc", "sconv"),
    "groups": ("ffc", "conv", "gconv"),
}


def parse_blocks(spec: str) -> Blocks:
    """``"1:1,2:2,4:2"`` → ``((1, 1), (2, 2), (4, 2))``: channel multiple of α and stride per block."""
    try:
        blocks = tuple(
            (int(mult), int(stride)) for mult, stride in (item.split(":") for item in spec.split(","))
        )
    except ValueError as error:
        raise ValueError(
            f"blocks must look like '1:1,2:2,4:2' (multiple:stride, ...), got {spec!r}"
        ) from error
    if not blocks or any(mult < 1 or stride not in (1, 2) for mult, stride in blocks):
        raise ValueError(f"blocks need channel multiples >= 1 and strides 1 or 2, got {spec!r}")
    return blocks


def format_blocks(blocks: Blocks) -> str:
    return ",".join(f"{mult}:{stride}" for mult, stride in blocks)


class RelaxedBackbone(nn.Module):
    """Blocks of :class:`RelaxedLayer` with the paths ``paths``, a global average pool, then the head."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        *,
        size: int = PAPER_SIZE,
        width: int = PAPER_WIDTH,
        blocks: Sequence[tuple[int, int]] = PAPER_BLOCKS,
        paths: Sequence[str] = PATH_SETS["fc-conv"],
        kernel_size: int = 3,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_int("in_channels", in_channels)
        check_int("num_classes", num_classes)
        check_int("width", width)
        unknown = [p for p in paths if p not in PATHS]
        if unknown:
            raise ValueError(f"unknown paths {unknown}; choose from {list(PATHS)}")
        generator = torch.Generator().manual_seed(seed)  # anchor points of the sparsified paths
        self.group_size = G = LIFTED_GROUP_SIZE if "gconv" in paths else 1
        layers, channels = [], in_channels
        for index, (mult, stride) in enumerate(blocks):
            if size % stride:
                raise ValueError(f"block {index} has stride {stride} but its input is {size}×{size}")
            layers.append(
                RelaxedLayer(
                    G * channels,
                    G * mult * width,
                    size,
                    stride,
                    paths,
                    kernel_size=kernel_size,
                    generator=generator,
                    group_size=G,
                )
            )
            channels, size = mult * width, size // stride
        self.blocks = nn.ModuleList(layers)
        self.head = nn.Sequential(
            nn.Linear(channels, 4 * channels), nn.ReLU(), nn.Linear(4 * channels, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        G = self.group_size
        if G > 1:  # copy g holds the image turned by g quarter turns
            x = torch.cat([torch.rot90(x, g, dims=(-2, -1)) for g in range(G)], dim=1)
        for block in self.blocks:
            x = block(x)
        if G > 1:
            x = x.unflatten(1, (G, -1)).amax(dim=1)
        return self.head(x.mean(dim=(-2, -1)))


def path_layers(model: nn.Module) -> Iterator[tuple[str, nn.ModuleDict]]:
    """``(layer name, paths)`` for every module of ``model`` that owns a ``paths`` ModuleDict."""
    for name, module in model.named_modules():
        paths = getattr(module, "paths", None)
        if isinstance(paths, nn.ModuleDict):
            yield name, paths
