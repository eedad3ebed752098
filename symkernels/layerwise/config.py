"""What defines a layer-wise run: data, model, the paper's schedule, seed (stored as ``config.json``)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from symkernels._checks import check_int
from symkernels.layerwise.marglik import FISHERS
from symkernels.layerwise.models import PATH_SETS, format_blocks, parse_blocks
from symkernels.layerwise.sharing import STACKS
from symkernels.layerwise.tasks import SOURCES, TASKS

MODELS = (*PATH_SETS, "sharing")

# Blocks on 16×16 inputs: the paper's pattern of channel multiples and strides, down to 1×1 for the relaxed
# backbones; three blocks (16 → 4) for the weight-sharing network, which pools over (G, H, W) at the end.
DEFAULT_BLOCKS = {"backbone": "1:1,2:2,2:1,4:2,4:2,8:2", "sharing": "1:1,1:2,2:2"}


@dataclass(frozen=True)
class LayerwiseConfig:
    """One experiment. Build it with :meth:`create` (fills the model's default blocks)."""

    task: str = "rotated"
    source: str = "mnist5k"
    model: str = "groups"
    stack: str = "learned"  # the sharing model's stacks: learned soft permutations or the exact C4 ones
    size: int = 16  # images are size × size
    width: int = 4  # α: block channels are multiples of it
    blocks: str = DEFAULT_BLOCKS["backbone"]  # "multiple:stride,..."
    epochs: int = 60
    batch_size: int = 64
    lr: float = 0.01  # SGD, momentum, cosine schedule over the epochs
    momentum: float = 0.9
    stack_lr: float = 0.01  # Adam on the learned stacks' logits (sharing model)
    burn_in: int = 10  # epochs before the first marginal-likelihood step
    marglik_every: int = 5  # epochs between marginal-likelihood steps (and one after the last epoch)
    hyper_steps: int = 20  # Adam steps on log δ per marginal-likelihood step
    hyper_lr: float = 0.1
    fisher: str = "exact"  # exact GGN (one backward pass per class) or "mc" (one sampled label per image)
    curvature_batch_size: int = 250  # images per batch while fitting the curvature
    train_limit: int | None = None
    test_limit: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name, choices in (
            ("task", TASKS),
            ("source", SOURCES),
            ("model", MODELS),
            ("stack", STACKS),
            ("fisher", FISHERS),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {list(choices)}, got {getattr(self, name)!r}")
        for name in ("size", "width", "epochs", "batch_size", "marglik_every", "curvature_batch_size"):
            check_int(name, getattr(self, name), minimum=1)
        for name in ("burn_in", "hyper_steps", "seed"):
            check_int(name, getattr(self, name), minimum=0)
        for name in ("train_limit", "test_limit"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), minimum=1)
        for name in ("lr", "stack_lr", "hyper_lr"):
            _check_float(name, getattr(self, name), minimum=0, inclusive=False)
        _check_float("momentum", self.momentum, minimum=0, inclusive=True)
        if self.momentum >= 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        stride = math.prod(s for _, s in parse_blocks(self.blocks))
        if self.size % stride:
            raise ValueError(f"size {self.size} is not divisible by the blocks' total stride {stride}")

    @classmethod
    def create(cls, **given: Any) -> LayerwiseConfig:
        """A config from the given fields; ``blocks`` defaults to :data:`DEFAULT_BLOCKS` of the model."""
        unknown = sorted(set(given) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"unknown LayerwiseConfig fields: {unknown}")
        if given.get("blocks") is None:
            family = "sharing" if given.get("model") == "sharing" else "backbone"
            given["blocks"] = DEFAULT_BLOCKS[family]
        given["blocks"] = format_blocks(parse_blocks(given["blocks"]))
        return cls(**given)

    def marglik_due(self, epoch: int) -> bool:
        """Whether the marginal-likelihood step follows epoch ``epoch`` (1-based)."""
        after_burn_in = epoch >= self.burn_in and (epoch - self.burn_in) % self.marglik_every == 0
        return after_burn_in or epoch == self.epochs

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Any) -> LayerwiseConfig:
        if not isinstance(values, dict):
            raise TypeError(f"a config must be a JSON object, got {type(values).__name__}")
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown config fields {unknown}")
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def load(cls, path: str | Path) -> LayerwiseConfig:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (ValueError, TypeError) as error:
            raise ValueError(f"{path} is not a valid layer-wise config: {error}") from error


def _check_float(name: str, value: object, *, minimum: float, inclusive: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < minimum or (value == minimum and not inclusive):
        raise ValueError(
            f"{name} must be a finite number {'>=' if inclusive else '>'} {minimum}, got {value}"
        )
