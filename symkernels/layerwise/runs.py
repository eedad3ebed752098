"""A layer-wise run's folder: the files it holds, what a new or resumed run continues from, and what its
metrics record besides the numbers."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from symkernels.layerwise.config import LayerwiseConfig
from symkernels.training.checkpoint import load_checkpoint
from symkernels.training.runs import RunFiles

__all__ = ["RunPaths", "finite_json", "library_versions", "plan_run"]


def finite_json(value: Any) -> Any:
    """JSON has no NaN/Inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_json(v) for v in value]
    return value


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("laplace-torch", "curvlinops-for-pytorch"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            continue
    return versions


@dataclass(frozen=True)
class RunPaths(RunFiles):
    """File names inside a layer-wise run folder."""

    @property
    def table(self) -> Path:
        return self.root / "shares.md"

    @property
    def figure(self) -> Path:
        return self.root / "shares.png"


def plan_run(
    out: Path, config: LayerwiseConfig | None
) -> tuple[RunPaths, LayerwiseConfig, dict[str, Any] | None]:
    """Where to write and what to continue from; refuses a folder holding anything else (writes nothing).

    ``config`` None: continue the run in ``out`` with its stored config.
    """
    paths = RunPaths(out)
    if paths.root.exists() and not paths.root.is_dir():
        raise FileExistsError(f"{paths.root} exists and is not a folder")
    if config is None:
        if not paths.config.is_file():
            raise FileNotFoundError(f"{paths.root} is not a layer-wise run folder (no config.json)")
        config = LayerwiseConfig.load(paths.config)
    elif paths.root.exists() and any(paths.root.iterdir()):
        if not paths.config.is_file():
            raise FileExistsError(
                f"--out {paths.root} is not empty and is not a layer-wise run; choose another"
            )
        stored = LayerwiseConfig.load(paths.config)
        if stored != config:
            changed = [k for k, v in config.to_dict().items() if stored.to_dict()[k] != v]
            raise FileExistsError(
                f"--out {paths.root} holds a run of a different config (differs in {changed}); "
                "choose another "
                f"folder or continue it with: symkernels layerwise train --resume {paths.root}"
            )
    checkpoint = load_checkpoint(paths.checkpoint) if paths.checkpoint.is_file() else None
    return paths, config, checkpoint
