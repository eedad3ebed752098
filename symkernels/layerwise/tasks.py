"""The data sets of the layer-wise experiments: real digits, upright, rotated, translated, or in a quadrant.

Each task transforms the images once, with a generator seeded by the run (the marginal likelihood needs a
fixed training set, so there is no on-the-fly augmentation):

- ``upright``: the digits at ``size × size``.
- ``rotated``: each image rotated by an angle drawn uniformly in [0°, 360°) (bilinear), as rotated MNIST.
- ``rotated4``: each image rotated by a random multiple of 90° (exact).
- ``translated``: the digit at half size, placed at a random position of an empty ``size × size`` canvas.
- ``quadrant10`` / ``quadrant40``: the digit at half size in a random quadrant; the label is the digit
  (translation helps) or ``4·digit + quadrant`` (position matters).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from symkernels import data

TASKS = ("upright", "rotated", "rotated4", "translated", "quadrant10", "quadrant40")
SOURCES = ("mnist5k", "digits")


@dataclass(frozen=True)
class TaskData:
    train_images: torch.Tensor  # [N, 1, size, size]
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int


def load_source(source: str, size: int) -> tuple[data.Split, data.Split]:
    """Digits of ``source`` at ``size × size``: ``mnist5k`` (5,000 real MNIST digits, 4,000 train / 1,000
    test) or ``digits`` (scikit-learn's 1,797 8×8 digits)."""
    if source == "mnist5k":
        (x_train, y_train), (x_test, y_test) = data.load_mnist5k(seed=0)
        return (_resize(x_train, size), y_train), (_resize(x_test, size), y_test)
    if source == "digits":
        return data.load_digits(size, seed=0)
    raise ValueError(f"source must be one of {list(SOURCES)}, got {source!r}")


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size:
        return images
    mode = "area" if images.shape[-1] > size else "bilinear"
    return F.interpolate(images, size=(size, size), mode=mode).clamp(0, 1)


def load_task(
    task: str,
    source: str,
    size: int,
    *,
    seed: int = 0,
    train_limit: int | None = None,
    test_limit: int | None = None,
) -> TaskData:
    """The images of ``task`` (one of :data:`TASKS`) made from ``source``; transforms drawn from ``seed``."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")
    placed = task in ("translated", "quadrant10", "quadrant40")
    if placed and size % 2:
        raise ValueError(f"task {task!r} places a half-size digit: size must be even, got {size}")
    (x_train, y_train), (x_test, y_test) = load_source(source, size // 2 if placed else size)
    x_train, y_train = x_train[:train_limit], y_train[:train_limit]
    x_test, y_test = x_test[:test_limit], y_test[:test_limit]
    splits = []
    for name, images, labels in (("train", x_train, y_train), ("test", x_test, y_test)):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + (0 if name == "train" else 1))
        splits.append(_transform(task, images, labels, size, generator))
    (x_train, y_train), (x_test, y_test) = splits
    return TaskData(x_train, y_train, x_test, y_test, num_classes=40 if task == "quadrant40" else 10)


def _transform(
    task: str, images: torch.Tensor, labels: torch.Tensor, size: int, generator: torch.Generator
) -> data.Split:
    n = len(images)
    if task == "upright":
        return images, labels
    if task == "rotated":
        angles = torch.rand(n, generator=generator) * 360.0
        return data.affine_resample(images, angles=angles).clamp(0, 1), labels
    if task == "rotated4":
        return data.rotate_quarter_turns(images, generator), labels
    half = size // 2
    if task == "translated":
        rows = torch.randint(0, size - half + 1, (n,), generator=generator)
        cols = torch.randint(0, size - half + 1, (n,), generator=generator)
    else:
        quadrant = torch.randint(0, 4, (n,), generator=generator)
        rows, cols = (quadrant // 2) * half, (quadrant % 2) * half
        if task == "quadrant40":
            labels = 4 * labels + quadrant
    canvas = images.new_zeros(n, images.shape[1], size, size)
    for i in range(n):
        canvas[i, :, rows[i] : rows[i] + half, cols[i] : cols[i] + half] = images[i]
    return canvas, labels
