"""The Sinkhorn workloads the benchmarks time: the stacks of the paper's models, and large batches."""

from __future__ import annotations

import torch

# name -> the [G', d, d] logit shapes of every weight-sharing layer (identity fixed, T = 20).
STACKS: dict[str, list[tuple[int, int, int]]] = {
    "mnist-wscnn": [(3, 25, 25)] + [(3, 100, 100)] * 4,
    "cifar-wsresnet": [(3, 49, 49)] + [(3, 196, 196)] * 4,
    "batch-1024x16x16": [(1024, 16, 16)],
}
# Batches of one size, one call each.
BATCHES: dict[str, list[tuple[int, int, int]]] = {
    "batch-1024x64x64": [(1024, 64, 64)],
    "batch-64x256x256": [(64, 256, 256)],
}
SINKHORN_WORKLOADS: dict[str, list[tuple[int, int, int]]] = {**STACKS, **BATCHES}
MODEL_STACKS = ("mnist-wscnn", "cifar-wsresnet")

# Logit regimes: the paper's init U[0, 1) (the authors' loop stops after 2-3 iterations) and sharp logits as
# training produces them, N(0, 3²) (all iterations run).
REGIMES = ("init", "sharp")


def make_logits(shape: tuple[int, ...], regime: str, generator: torch.Generator, dtype=torch.float32):
    if regime == "init":
        return torch.rand(shape, generator=generator, dtype=dtype)
    if regime == "sharp":
        return 3.0 * torch.randn(shape, generator=generator, dtype=dtype)
    raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}")


def make_stack(
    name: str, regime: str, dtype: torch.dtype = torch.float32, seed: int = 0
) -> list[torch.Tensor]:
    """The CPU logits of workload ``name``: one tensor per call (per layer of a model's stack)."""
    generator = torch.Generator().manual_seed(seed)
    return [make_logits(shape, regime, generator, dtype) for shape in SINKHORN_WORKLOADS[name]]
