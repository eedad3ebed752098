"""The data protocol of a run: which images, which random transforms, and the fixed transformed test set.

Training images are transformed on the fly, batch by batch, with parameters drawn for the whole global batch
(so that every process of a distributed run draws the same numbers and transforms only its shard). The test
set of a rotated or scaled protocol is transformed once, with its own fixed generator, plus Gaussian noise
(docs/design.md §7: rotated once, noise std 0.01). Flips are a training augmentation only. Model inputs are
normalised last, ``(image − input_mean) / input_std``, after the transforms (zeros outside a rotated image
become ``−mean/std``, as with torchvision's rotation before its normalisation).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from symkernels.data import (
    DATASET_INFO,
    ROTATIONS,
    add_noise,
    affine_resample,
    apply_quarter_turns,
    flip_horizontal,
    load_dataset,
    normalize,
)
from symkernels.training.config import RuntimeOptions, TrainConfig
from symkernels.training.rng import generator


@dataclass(frozen=True)
class TransformParams:
    """Per-image parameters of one batch; ``None`` where the transform is off."""

    turns: torch.Tensor | None = None  # quarter turns (c4)
    angles: torch.Tensor | None = None  # degrees (continuous)
    flips: torch.Tensor | None = None  # bool
    scales: torch.Tensor | None = None  # shrink factors in [scale_min, 1]

    def select(self, index: slice | torch.Tensor) -> TransformParams:
        """The parameters of a subset of the batch (a process's shard)."""
        return TransformParams(*(None if t is None else t[index] for t in self._fields()))

    def _fields(self) -> tuple[torch.Tensor | None, ...]:
        return (self.turns, self.angles, self.flips, self.scales)


@dataclass(frozen=True)
class Augmentation:
    """Random rotation, horizontal flip (probability 1/2) and shrink.

    ``rotate``: ``"c4"`` draws exact quarter turns among the multiples of 90° in ``[0, rotate_range]``;
    ``"continuous"`` draws an angle uniformly from ``[0, rotate_range)`` and resamples bilinearly. ``scale``
    shrinks each image about its centre by a factor uniform in ``[scale_min, 1]`` (zeros outside).
    """

    rotate: str = "none"
    rotate_range: float = 360.0
    flip: bool = False
    scale: bool = False
    scale_min: float = 0.3

    def __post_init__(self) -> None:
        if self.rotate not in ROTATIONS:
            raise ValueError(f"rotate must be one of {list(ROTATIONS)}, got {self.rotate!r}")
        if not 0 < self.rotate_range <= 360:
            raise ValueError(f"rotate_range must be in (0, 360] degrees, got {self.rotate_range}")
        if not 0 < self.scale_min <= 1:
            raise ValueError(f"scale_min must be in (0, 1], got {self.scale_min}")

    @classmethod
    def from_config(cls, config: TrainConfig) -> Augmentation:
        return cls(config.rotate, config.rotate_range, config.flip, config.scale, config.scale_min)

    @property
    def active(self) -> bool:
        return self.rotate != "none" or self.flip or self.scale

    @property
    def quarter_turns(self) -> int:
        """How many quarter turns c4 draws from: multiples of 90° in ``[0, rotate_range]``, at most four."""
        return min(4, int(self.rotate_range // 90) + 1)

    def sample(self, n: int, generator: torch.Generator) -> TransformParams:
        """Parameters for ``n`` images, drawn in a fixed order: rotation, flip, scale."""
        turns = angles = flips = scales = None
        if self.rotate == "c4":
            turns = torch.randint(0, self.quarter_turns, (n,), generator=generator)
        elif self.rotate == "continuous":
            angles = torch.rand(n, generator=generator, dtype=torch.float64) * self.rotate_range
        if self.flip:
            flips = torch.rand(n, generator=generator) < 0.5
        if self.scale:
            scales = self.scale_min + (1 - self.scale_min) * torch.rand(
                n, generator=generator, dtype=torch.float64
            )
        return TransformParams(turns, angles, flips, scales)

    def apply(self, images: torch.Tensor, params: TransformParams) -> torch.Tensor:
        """Flip, then rotate/shrink (one bilinear resampling), then exact quarter turns."""
        if params.flips is not None:
            images = flip_horizontal(images, params.flips.to(images.device))
        if params.angles is not None or params.scales is not None:
            images = affine_resample(images, params.angles, params.scales)
        if params.turns is not None:
            images = apply_quarter_turns(images, params.turns.to(images.device))
        return images


@dataclass
class TrainData:
    """Tensors of a run (CPU): training images are raw, test images already transformed and normalised."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    augmentation: Augmentation
    in_channels: int
    num_classes: int
    input_mean: float = 0.0
    input_std: float = 1.0

    def training_batch(self, index: torch.Tensor, params: TransformParams) -> torch.Tensor:
        """The model inputs of the training images ``index``: transformed by ``params``, then normalised."""
        images = self.augmentation.apply(self.train_images[index], params)
        return normalize(images, self.input_mean, self.input_std)


def transform_test_set(
    images: torch.Tensor, augmentation: Augmentation, noise_std: float, seed: int
) -> torch.Tensor:
    """The test set of a rotated/scaled protocol: transformed once (no flips) + noise; unchanged otherwise."""
    geometric = replace(augmentation, flip=False)
    if not geometric.active:
        return images
    fixed = generator(seed, "test-set")
    images = geometric.apply(images, geometric.sample(images.shape[0], fixed))
    return add_noise(images, noise_std, fixed)


def prepare_data(config: TrainConfig, runtime: RuntimeOptions | None = None) -> TrainData:
    """Load ``config.dataset``, apply the limits, build the augmentation and the fixed test set."""
    runtime = runtime or RuntimeOptions()
    (x_train, y_train), (x_test, y_test) = load_dataset(
        config.dataset, data_dir=runtime.data_dir, download=runtime.download
    )
    return build_data(config, (x_train, y_train), (x_test, y_test))


def build_data(
    config: TrainConfig,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
) -> TrainData:
    """The protocol applied to loaded tensors (shared by every dataset)."""
    (x_train, y_train), (x_test, y_test) = train, test
    if config.train_limit is not None:
        x_train, y_train = x_train[: config.train_limit], y_train[: config.train_limit]
    if config.test_limit is not None:
        x_test, y_test = x_test[: config.test_limit], y_test[: config.test_limit]
    info = DATASET_INFO[config.dataset]
    if x_train.shape[1] != info.in_channels:
        raise ValueError(
            f"{config.dataset} images should have {info.in_channels} channels, got {x_train.shape[1]}"
        )
    augmentation = Augmentation.from_config(config)
    x_test = transform_test_set(x_test, augmentation, config.test_noise, config.seed)
    x_test = normalize(x_test, config.input_mean, config.input_std)
    return TrainData(
        x_train,
        y_train,
        x_test,
        y_test,
        augmentation,
        info.in_channels,
        info.num_classes,
        config.input_mean,
        config.input_std,
    )
