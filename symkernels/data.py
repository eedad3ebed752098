"""Image data: the embedded digits, MNIST / CIFAR-10 through torchvision, and batched random transforms.

Every random transform takes an explicit :class:`torch.Generator`, so a training run's data stream is
reproducible from its seed and can be saved and restored with the generator's state.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROTATIONS = ("none", "c4", "continuous")
DATASETS = ("digits", "mnist", "cifar10")


@dataclass(frozen=True)
class DatasetInfo:
    """Shape facts a model needs before seeing the data."""

    in_channels: int
    num_classes: int
    size: int


DATASET_INFO = {
    "digits": DatasetInfo(in_channels=1, num_classes=10, size=28),
    "mnist": DatasetInfo(in_channels=1, num_classes=10, size=28),
    "cifar10": DatasetInfo(in_channels=3, num_classes=10, size=32),
}

_TORCHVISION_CLASSES = {"mnist": "MNIST", "cifar10": "CIFAR10"}

Split = tuple[torch.Tensor, torch.Tensor]


def load_digits(size: int = 28, *, test_fraction: float = 0.25, seed: int = 0) -> tuple[Split, Split]:
    """``((x_train, y_train), (x_test, y_test))``: images ``[N, 1, size, size]`` in [0, 1], labels ``[N]``.

    The 1,797 8×8 digits that ship with scikit-learn, bilinearly upsampled, split at random by ``seed``.
    """
    images, labels = (t.clone() for t in _upsampled_digits(size))  # clones: callers may modify theirs
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(labels)))
    test, train = order[:n_test], order[n_test:]
    return (images[train], labels[train]), (images[test], labels[test])


@functools.lru_cache(maxsize=2)
def _upsampled_digits(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits as sklearn_digits  # deferred: only the data path needs sklearn

    digits = sklearn_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return images, torch.as_tensor(digits.target, dtype=torch.long)


def _torchvision_split(dataset: Any) -> Split:
    """A torchvision MNIST/CIFAR10 object → ``(images [N, C, H, W] float32 in [0, 1], labels [N] int64)``.

    MNIST holds ``data`` as a uint8 tensor ``[N, H, W]``; CIFAR10 as a uint8 numpy array ``[N, H, W, C]`` and
    its targets as a list.
    """
    data = torch.as_tensor(dataset.data)
    if data.dim() == 3:
        data = data.unsqueeze(1)
    elif data.dim() == 4:
        data = data.permute(0, 3, 1, 2)
    else:
        raise ValueError(f"expected dataset images [N, H, W] or [N, H, W, C], got {tuple(data.shape)}")
    images = data.contiguous().to(torch.float32) / 255.0
    labels = torch.as_tensor(dataset.targets, dtype=torch.long).reshape(-1)
    if len(labels) != len(images):
        raise ValueError(f"dataset has {len(images)} images but {len(labels)} labels")
    return images, labels


def load_torchvision(
    name: str, data_dir: str | Path | None, *, download: bool = False
) -> tuple[Split, Split]:
    """MNIST or CIFAR-10 through torchvision (the extra ``symkernels[vision]``), as :func:`load_digits`.

    ``data_dir`` is the torchvision root folder; nothing is downloaded unless ``download`` is true.
    """
    if name not in _TORCHVISION_CLASSES:
        raise ValueError(f"dataset must be one of {sorted(_TORCHVISION_CLASSES)}, got {name!r}")
    try:
        import torchvision
    except ImportError as error:
        raise RuntimeError(
            f"--dataset {name} needs torchvision: install the optional extra with "
            "`pip install 'symkernels[vision]'`, then pass --data-dir PATH "
            "(add --download to fetch the files)"
        ) from error
    if data_dir is None:
        raise ValueError(f"--dataset {name} needs --data-dir PATH (the torchvision root folder)")
    root = Path(data_dir).expanduser()
    factory = getattr(torchvision.datasets, _TORCHVISION_CLASSES[name])
    try:
        train = factory(root=str(root), train=True, download=download)
        test = factory(root=str(root), train=False, download=download)
    except RuntimeError as error:  # torchvision's "Dataset not found" when the files are missing
        hint = "" if download else "; add --download to fetch it"
        raise RuntimeError(f"could not load {name} from --data-dir {root}: {error}{hint}") from error
    return _torchvision_split(train), _torchvision_split(test)


def load_dataset(
    name: str, *, data_dir: str | Path | None = None, download: bool = False
) -> tuple[Split, Split]:
    """``((x_train, y_train), (x_test, y_test))`` of ``name`` in :data:`DATASETS`; images in [0, 1].

    The digits split is fixed (seed 0) so that runs with different seeds see the same test images.
    """
    if name == "digits":
        return load_digits(DATASET_INFO["digits"].size, seed=0)
    if name in _TORCHVISION_CLASSES:
        return load_torchvision(name, data_dir, download=download)
    raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")


def rotate_quarter_turns(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Rotate each image ``[N, C, H, W]`` by an independent random multiple of 90°."""
    turns = torch.randint(0, 4, (images.shape[0],), generator=generator)
    return apply_quarter_turns(images, turns)


def apply_quarter_turns(images: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Rotate image ``i`` of ``[N, C, H, W]`` by ``turns[i]`` counter-clockwise quarter turns (exact)."""
    turns = turns.remainder(4)
    rotated = images.clone()
    for k in range(1, 4):
        chosen = turns == k
        if bool(chosen.any()):
            rotated[chosen] = torch.rot90(images[chosen], k, dims=(-2, -1))
    return rotated


def affine_resample(
    images: torch.Tensor, angles: torch.Tensor | None = None, scales: torch.Tensor | None = None
) -> torch.Tensor:
    """Rotate image ``i`` by ``angles[i]`` degrees counter-clockwise (as :func:`torch.rot90`) and shrink it by
    ``scales[i]`` about its centre; bilinear, zeros outside. ``None`` means 0° / scale 1."""
    n = images.shape[0]
    angles = images.new_zeros(n) if angles is None else angles.to(images)
    scales = images.new_ones(n) if scales is None else scales.to(images)
    radians = angles * (math.pi / 180.0)
    cos, sin = torch.cos(radians) / scales, torch.sin(radians) / scales
    zero = torch.zeros_like(cos)
    # affine_grid maps each output position to the input position it reads: the inverse map, x_in = A x_out.
    theta = torch.stack([torch.stack([cos, -sin, zero], -1), torch.stack([sin, cos, zero], -1)], dim=1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def flip_horizontal(images: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Mirror left-right the images ``[N, C, H, W]`` where the boolean mask ``chosen [N]`` is true."""
    return torch.where(chosen.reshape(-1, 1, 1, 1), images.flip(-1), images)


def add_noise(images: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """``images + std·N(0, 1)`` (no clipping), drawn from ``generator``."""
    if std < 0:
        raise ValueError(f"std must be >= 0, got {std}")
    if std == 0:
        return images
    noise = torch.randn(images.shape, generator=generator, dtype=images.dtype)
    return images + std * noise.to(images.device)
