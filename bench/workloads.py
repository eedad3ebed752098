"""The Sinkhorn workloads the benchmarks time: the stacks of the paper's models, large batches, and tiny
matrices at huge batch (the hyper-connection workload)."""

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


def tiny_workload(batch: int, n: int, n_iter: int) -> str:
    return f"hc-{batch}x{n}x{n}-T{n_iter}"


# Manifold-constrained hyper-connections make one n x n doubly stochastic matrix per token (n = 4, sometimes
# 8): name -> ([B, n, n], T), one call each, logits N(0, 1).
TINY_WORKLOADS: dict[str, tuple[tuple[int, int, int], int]] = {
    tiny_workload(batch, n, n_iter): ((batch, n, n), n_iter)
    for n in (4, 8)
    for batch in (32768, 262144)
    for n_iter in (20, 10)
}
TINY_REGIME = "normal"

# Logit regimes: the paper's init U[0, 1) (the authors' loop stops after 2-3 iterations) and sharp logits as
# training produces them, N(0, 3²) (all iterations run); the tiny workloads' N(0, 1).
REGIMES = ("init", "sharp")


def make_logits(shape: tuple[int, ...], regime: str, generator: torch.Generator, dtype=torch.float32):
    if regime == "init":
        return torch.rand(shape, generator=generator, dtype=dtype)
    if regime == "sharp":
        return 3.0 * torch.randn(shape, generator=generator, dtype=dtype)
    if regime == TINY_REGIME:
        return torch.randn(shape, generator=generator, dtype=dtype)
    raise ValueError(f"regime must be one of {(*REGIMES, TINY_REGIME)}, got {regime!r}")


def make_stack(
    name: str, regime: str, dtype: torch.dtype = torch.float32, seed: int = 0
) -> list[torch.Tensor]:
    """The CPU logits of workload ``name``: one tensor per call (per layer of a model's stack)."""
    generator = torch.Generator().manual_seed(seed)
    return [make_logits(shape, regime, generator, dtype) for shape in SINKHORN_WORKLOADS[name]]
