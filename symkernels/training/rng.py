"""Random streams of a run: independent, seeded generators whose states a checkpoint saves and restores.

Data order and augmentation draw from their own :class:`torch.Generator` (never the global RNG), so neither
model code nor a library call can shift them; the global RNG only serves layers that use it (dropout) and is
saved too.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch


def derive_seed(seed: int, stream: str) -> int:
    """A 63-bit seed for the named ``stream`` of run seed ``seed`` (stable across versions and platforms)."""
    digest = hashlib.sha256(f"symkernels:{seed}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def generator(seed: int, stream: str) -> torch.Generator:
    """A CPU generator seeded for ``stream``."""
    return torch.Generator().manual_seed(derive_seed(seed, stream))


@dataclass
class DataStreams:
    """The generators that drive training data: epoch order and augmentation parameters."""

    order: torch.Generator
    augment: torch.Generator

    @classmethod
    def from_seed(cls, seed: int) -> DataStreams:
        return cls(order=generator(seed, "order"), augment=generator(seed, "augment"))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"order": self.order.get_state(), "augment": self.augment.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.order.set_state(state["order"])
        self.augment.set_state(state["augment"])


def global_state() -> dict[str, Any]:
    """The process-wide RNG states: torch CPU, each CUDA device once CUDA is initialised, ``random``."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_global_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`global_state` (CUDA states are restored only when this process uses CUDA)."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def preserved_global_state() -> Iterator[None]:
    """Run the enclosed code (which may seed or restore the global RNGs) and put the caller's states back."""
    saved = global_state()
    try:
        yield
    finally:
        set_global_state(saved)
