"""What defines a training run: :class:`TrainConfig`, the per-dataset defaults, JSON round trip, comparison.

A run folder stores its config as ``config.json``; resuming compares the stored config with the flags given
(:func:`conflicts`). Options that change how a run executes but not what it computes (backend, device,
threads, data folder, progress output) live in :class:`RuntimeOptions`, outside the stored experiment.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from symkernels.data import DATASETS, MNIST_MEAN, MNIST_STD, ROTATIONS

MODELS = ("wscnn", "cnn", "gcnn", "wsresnet", "resnet")
DTYPES = ("float32", "float64")

# Fields that may differ when a run is resumed: a finished run can be extended by more epochs.
RESUMABLE_CHANGES = frozenset({"epochs"})

# ---------------------------------------------------------------------------------------------------------
# Per-dataset defaults. Every entry is a TrainConfig field; flags override them.
#   mnist5k: 5,000 real MNIST digits (4,000 train / 1,000 test) with the paper's rotated-MNIST protocol and
#            optimisation (as mnist below), at a width and length sized for a few minutes on two CPU cores.
#   digits:  scikit-learn's embedded 8×8 digits at 28×28, C4-rotated, sized for minutes on two CPU cores
#   mnist:   the paper's rotated-MNIST setup (docs/design.md §7): AdamW, lr 1e-2 for weights and logits,
#            λ_norm 0.1, T = 20, batch 64, 100 epochs, 32 channels, k = 5, padding 0, continuous rotations
#            in [0°, 360°), inputs normalised with MNIST's mean and std.
#   cifar10: the paper's CIFAR-10 setup: WS-ResNet, k = 7, lr 1e-4 (weights) and 1e-2 (logits), batch 128,
#            200 epochs, no augmentation.
# ---------------------------------------------------------------------------------------------------------
_PAPER_MNIST: dict[str, Any] = {
    "model": "wscnn",
    "batch_size": 64,
    "num_layers": 4,
    "kernel_size": 5,
    "n_iter": 20,
    "lr": 1e-2,
    "logits_lr": 1e-2,
    "weight_decay": 1e-4,
    "lambda_norm": 0.1,
    "lambda_ent": 0.0,
    "rotate": "continuous",
    "input_mean": MNIST_MEAN,
    "input_std": MNIST_STD,
}

DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "mnist5k": {**_PAPER_MNIST, "epochs": 25, "channels": 8},
    "digits": {
        "model": "wscnn",
        "epochs": 100,
        "batch_size": 32,
        "channels": 8,
        "num_layers": 4,
        "kernel_size": 5,
        "n_iter": 20,
        "lr": 3e-3,
        "logits_lr": 3e-2,
        "weight_decay": 1e-4,
        "lambda_norm": 0.0,
        "lambda_ent": 0.0,
        "rotate": "c4",
        "input_mean": 0.0,
        "input_std": 1.0,
    },
    "mnist": {**_PAPER_MNIST, "epochs": 100, "channels": 32},
    "cifar10": {
        "model": "wsresnet",
        "epochs": 200,
        "batch_size": 128,
        "channels": 32,
        "kernel_size": 7,
        "n_iter": 20,
        "lr": 1e-4,
        "logits_lr": 1e-2,
        "weight_decay": 1e-4,
        "lambda_norm": 0.1,
        "lambda_ent": 0.0,
        "rotate": "none",
        "input_mean": 0.0,
        "input_std": 1.0,
    },
}


@dataclass(frozen=True)
class TrainConfig:
    """One experiment: data, transforms, model, optimisation, seed. Build it with :meth:`for_dataset` (a
    dataset's defaults, :data:`DATASET_DEFAULTS`); a field they leave out takes the default below."""

    dataset: str = "mnist5k"
    model: str = "wscnn"
    epochs: int = 25
    batch_size: int = 64
    lr: float = 1e-2  # every parameter but the representation logits
    logits_lr: float = 1e-2  # the representation logits Θ
    weight_decay: float = 1e-4  # AdamW, on all parameters (logits included)
    lambda_norm: float = 0.1
    lambda_ent: float = 0.0
    n_iter: int = 20  # Sinkhorn iterations T
    tau: float = 1.0
    channels: int = 8  # hidden channels (the ResNets: width of the first block)
    num_layers: int = 4  # group-conv layers after the lifting layer (CNN family; the ResNets have two blocks)
    kernel_size: int = 5
    group_size: int = 4
    padding: int = 0  # CNN family; the ResNets use "same" padding
    rotate: str = (
        "continuous"  # none | c4 (random quarter turns) | continuous (bilinear, angle in [0, range))
    )
    rotate_range: float = 360.0  # degrees: continuous angles in [0, range); c4 multiples of 90° in [0, range]
    flip: bool = False  # random horizontal flips of training images
    scale: bool = False  # random shrink by a factor in [scale_min, 1] (scaled MNIST uses [0.3, 1])
    scale_min: float = 0.3
    test_noise: float = 0.01  # std of the noise added to a rotated/scaled test set (docs/design.md §7)
    # Model inputs are (image − input_mean) / input_std, after the transforms (and the test set's noise).
    input_mean: float = 0.0
    input_std: float = 1.0
    train_limit: int | None = None  # use only the first N training images
    test_limit: int | None = None  # use only the first N test images
    seed: int = 0
    dtype: str = "float32"  # parameters and activations; float64 for numerical checks

    def __post_init__(self) -> None:
        _check_choice("dataset", self.dataset, DATASETS)
        _check_choice("model", self.model, MODELS)
        _check_choice("rotate", self.rotate, ROTATIONS)
        _check_choice("dtype", self.dtype, DTYPES)
        for name in ("epochs", "batch_size", "n_iter", "channels", "kernel_size", "group_size"):
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("num_layers", self.num_layers, minimum=0)
        _check_int("padding", self.padding, minimum=0)
        _check_int("seed", self.seed, minimum=0)
        for name in ("train_limit", "test_limit"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=1)
        for name in ("lr", "logits_lr", "tau", "input_std"):
            _check_float(name, getattr(self, name), positive=True)
        for name in ("weight_decay", "lambda_norm", "lambda_ent", "test_noise"):
            _check_float(name, getattr(self, name), positive=False)
        if isinstance(self.input_mean, bool) or not isinstance(self.input_mean, (int, float)):
            raise TypeError(f"input_mean must be a number, got {type(self.input_mean).__name__}")
        if not math.isfinite(self.input_mean):
            raise ValueError(f"input_mean must be finite, got {self.input_mean}")
        _check_float("rotate_range", self.rotate_range, positive=True)
        if self.rotate_range > 360:
            raise ValueError(f"rotate_range must be in (0, 360] degrees, got {self.rotate_range}")
        _check_float("scale_min", self.scale_min, positive=True)
        if self.scale_min > 1:
            raise ValueError(f"scale_min must be in (0, 1], got {self.scale_min}")
        for name in ("flip", "scale"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        if self.model == "gcnn" and self.group_size not in (1, 2, 4):
            raise ValueError(
                f"model 'gcnn' needs group_size 1, 2 or 4 (rotations of a grid), got {self.group_size}"
            )

    @classmethod
    def for_dataset(cls, dataset: str = "mnist5k", **overrides: Any) -> TrainConfig:
        """The defaults of ``dataset`` (:data:`DATASET_DEFAULTS`) with ``overrides`` applied."""
        _check_choice("dataset", dataset, DATASETS)
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"unknown TrainConfig fields: {unknown}")
        return cls(**{**DATASET_DEFAULTS[dataset], **overrides, "dataset": dataset})

    @property
    def weight_sharing(self) -> bool:
        """True when the model learns representation stacks."""
        return self.model in ("wscnn", "wsresnet")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error (a config from another version)."""
        if not isinstance(values, dict):
            raise TypeError(f"a config must be a JSON object, got {type(values).__name__}")
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown config fields {unknown}")
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        return cls.from_dict(json.loads(text))

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        try:
            return cls.from_json(Path(path).read_text())
        except (ValueError, TypeError) as error:
            raise ValueError(f"{path} is not a valid training config: {error}") from error


@dataclass(frozen=True)
class RuntimeOptions:
    """How a run executes; may differ between a run and its resumption."""

    backend: str | None = None  # a symkernels backend name; None chooses automatically
    device: str = "auto"  # "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...
    threads: int | None = None  # torch CPU threads
    quiet: bool = False  # no progress bar or epoch lines
    data_dir: str | None = None  # torchvision root for mnist/cifar10
    download: bool = False  # let torchvision download missing files
    compile: bool = False  # forward + regularisers (and their backward) under torch.compile

    def __post_init__(self) -> None:
        if self.threads is not None:
            _check_int("threads", self.threads, minimum=1)
        if not isinstance(self.compile, bool):
            raise TypeError(f"compile must be a bool, got {type(self.compile).__name__}")
        if not isinstance(self.device, str) or not self.device:
            raise TypeError(
                f"device must be a non-empty string such as 'auto', 'cpu' or 'cuda', got {self.device!r}"
            )


def conflicts(stored: TrainConfig, given: dict[str, Any]) -> list[str]:
    """Fields in ``given`` (values the user asked for) that disagree with the stored config.

    Fields in :data:`RESUMABLE_CHANGES` may change and are not reported.
    """
    stored_values = stored.to_dict()
    messages = []
    for name, value in sorted(given.items()):
        if name in RESUMABLE_CHANGES:
            continue
        if name not in stored_values:
            raise TypeError(f"unknown TrainConfig field {name!r}")
        if stored_values[name] != value:
            messages.append(f"{name}: the run has {stored_values[name]!r}, given {value!r}")
    return messages


def same_experiment(a: TrainConfig, b: TrainConfig) -> bool:
    """Equal but for :data:`RESUMABLE_CHANGES`."""
    return not conflicts(a, b.to_dict())


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` torch CPU threads (``None``: leave them alone); restored afterwards."""
    if threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_float(name: str, value: object, *, positive: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value}")
