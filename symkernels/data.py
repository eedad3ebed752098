"""The embedded dataset: scikit-learn's handwritten digits (no download), upsampled to 28×28."""

from __future__ import annotations

import torch
import torch.nn.functional as F

ROTATIONS = ("none", "c4")


def load_digits(
    size: int = 28, *, test_fraction: float = 0.25, seed: int = 0
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``((x_train, y_train), (x_test, y_test))``: images ``[N, 1, size, size]`` in [0, 1], labels ``[N]``.

    The 1,797 8×8 digits that ship with scikit-learn, bilinearly upsampled, split at random by ``seed``.
    """
    from sklearn.datasets import load_digits as sklearn_digits  # deferred: only the data path needs sklearn

    digits = sklearn_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    labels = torch.as_tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(labels)))
    test, train = order[:n_test], order[n_test:]
    return (images[train], labels[train]), (images[test], labels[test])


def rotate_quarter_turns(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Rotate each image ``[N, C, H, W]`` by an independent random multiple of 90°."""
    turns = torch.randint(0, 4, (images.shape[0],), generator=generator)
    rotated = images.clone()
    for k in range(1, 4):
        chosen = turns == k
        rotated[chosen] = torch.rot90(images[chosen], k, dims=(-2, -1))
    return rotated
