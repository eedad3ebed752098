"""The Sinkhorn workloads the benchmarks time: the stacks of the paper's models, and a large batch."""

from __future__ import annotations

import torch

# name -> the [G', d, d] logit shapes of every weight-sharing layer (identity fixed, T = 20).
STACKS: dict[str, list[tuple[int, int, int]]] = {
    "mnist-wscnn": [(3, 25, 25)] + [(3, 100, 100)] * 4,
    "cifar-wsresnet": [(3, 49, 49)] + [(3, 196, 196)] * 4,
    "batch-1024x16x16": [(1024, 16, 16)],
}

# Logit regimes: the paper's init U[0, 1) (the authors' loop stops after 2-3 iterations) and sharp logits as
# training produces them, N(0, 3²) (all iterations run).
REGIMES = ("init", "sharp")


def make_stack(
    name: str, regime: str, dtype: torch.dtype = torch.float32, seed: int = 0
) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tensors = []
    for shape in STACKS[name]:
        if regime == "init":
            tensors.append(torch.rand(shape, generator=generator, dtype=dtype))
        else:
            tensors.append(3.0 * torch.randn(shape, generator=generator, dtype=dtype))
    return tensors
