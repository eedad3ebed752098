"""The run folder: what a run writes where, which folders a run may write into, and reloading a run.

Layout of ``RUN_DIR``::

    config.json          the experiment (TrainConfig), written when the run starts
    checkpoint.pt        the state after the last complete epoch (atomic; resume from it)
    metrics.json         per-epoch metrics, updated every epoch; final accuracy and decomposition at the end
    stacks.png           learned stacks next to the nearest exact group elements (weight-sharing models)
    trajectory.png       each learned element's best-element mass against training steps
    decomposition.png    decomposition coefficients onto the exact group elements
    export.json          written by ``symkernels export``: soft / exported / hardened test accuracy
    exported.pt2         written by ``symkernels export``: the plain-convolution model (torch.export)
    exported-hardened.pt2  the same with ``--harden``: every learned stack snapped to permutations
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from symkernels.data import DATASET_INFO
from symkernels.training.checkpoint import load_checkpoint
from symkernels.training.config import RuntimeOptions, TrainConfig, conflicts, same_experiment
from symkernels.training.factory import build_model


@dataclass(frozen=True)
class RunFiles:
    """The files of every run folder (this package's runs and the layer-wise ones)."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint.pt"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"


@dataclass(frozen=True)
class RunPaths(RunFiles):
    """File names inside a training run folder."""

    @property
    def stacks_plot(self) -> Path:
        return self.root / "stacks.png"

    @property
    def decomposition_plot(self) -> Path:
        return self.root / "decomposition.png"

    @property
    def trajectory_plot(self) -> Path:
        return self.root / "trajectory.png"

    @property
    def export_report(self) -> Path:
        return self.root / "export.json"

    @property
    def exported_model(self) -> Path:
        return self.root / "exported.pt2"

    @property
    def hardened_model(self) -> Path:
        return self.root / "exported-hardened.pt2"


@dataclass(frozen=True)
class RunPlan:
    """Where a run writes, and whether it continues from a checkpoint found there."""

    paths: RunPaths
    config: TrainConfig
    resume: bool  # a checkpoint exists and training continues from it
    # The checkpoint read while planning (resume only), so that the trainer need not load it again.
    checkpoint: dict[str, Any] | None = field(default=None, repr=False, compare=False)


def default_run_dir(base: str | Path = "runs") -> Path:
    """``runs/<timestamp>`` (relative to the working folder), made unique with a suffix if taken."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    candidate = Path(base) / stamp
    suffix = 1
    while candidate.exists():
        candidate = Path(base) / f"{stamp}-{suffix}"
        suffix += 1
    return candidate


def read_config(run_dir: str | Path) -> TrainConfig:
    """The config stored in ``run_dir``; a clear error when the folder is not a run."""
    paths = RunPaths(Path(run_dir))
    if not paths.root.is_dir():
        raise FileNotFoundError(f"run folder {paths.root} does not exist")
    if not paths.config.is_file():
        raise ValueError(f"{paths.root} is not a symkernels run folder (no config.json)")
    return TrainConfig.load(paths.config)


def plan_new_or_matching(out: str | Path, config: TrainConfig) -> RunPlan:
    """A run of ``config`` in ``out``: a new run if ``out`` is missing or empty; the continuation of the run
    there if it is a run of the same experiment; otherwise an error (user files are never overwritten).

    Reads only; writes nothing.
    """
    paths = RunPaths(Path(out))
    if paths.root.exists() and not paths.root.is_dir():
        raise FileExistsError(f"--out {paths.root} exists and is not a folder")
    if not paths.root.exists() or not any(paths.root.iterdir()):
        return RunPlan(paths, config, resume=False)
    if not paths.config.is_file():
        raise FileExistsError(
            f"--out {paths.root} is not empty and is not a symkernels run; choose an empty or new folder"
        )
    stored = read_config(paths.root)
    differences = conflicts(stored, config.to_dict())  # empty: the same experiment (same_experiment)
    if differences:
        raise FileExistsError(
            f"--out {paths.root} holds a run of a different config ({'; '.join(differences)}); choose "
            f"another folder or resume it with: symkernels train --resume {paths.root}"
        )
    return _plan_from_checkpoint(paths, config)


def _plan_from_checkpoint(paths: RunPaths, config: TrainConfig) -> RunPlan:
    """The plan for ``config`` in ``paths``: resumed (holding the checkpoint) when ``paths`` has one; raises
    if it is unreadable or ahead of ``config.epochs``."""
    if not paths.checkpoint.is_file():
        return RunPlan(paths, config, resume=False)
    checkpoint = load_checkpoint(paths.checkpoint)  # fail now, before data is loaded or anything written
    if checkpoint["epoch"] > config.epochs:
        raise ValueError(
            f"cannot continue {paths.root} with epochs={config.epochs}: its checkpoint is at epoch "
            f"{checkpoint['epoch']}"
        )
    return RunPlan(paths, config, resume=True, checkpoint=checkpoint)


def plan_resume(run_dir: str | Path, given: dict[str, Any]) -> RunPlan:
    """Continue the run in ``run_dir``; ``given`` are config fields set explicitly on the command line.

    Refuses (before anything is written) when ``given`` conflicts with the stored config; ``epochs`` may grow.
    """
    stored = read_config(run_dir)
    problems = conflicts(stored, given)
    if problems:
        raise ValueError(
            f"cannot resume {run_dir}: the given flags conflict with its config.json "
            f"({'; '.join(problems)}). Drop those flags, or start a new run with --out"
        )
    config = TrainConfig.from_dict({**stored.to_dict(), **{k: v for k, v in given.items() if k == "epochs"}})
    return _plan_from_checkpoint(RunPaths(Path(run_dir)), config)


@dataclass
class LoadedRun:
    """A finished (or stopped) run, ready for evaluation or export."""

    paths: RunPaths
    config: TrainConfig
    model: nn.Module  # weights of the last complete epoch, in eval mode, on the CPU
    epoch: int
    metrics: dict[str, Any] | None  # metrics.json, when present


def load_run(run_dir: str | Path, runtime: RuntimeOptions | None = None) -> LoadedRun:
    """The model of ``run_dir`` at its last checkpoint, with its config and metrics."""
    config = read_config(run_dir)
    paths = RunPaths(Path(run_dir))
    checkpoint = load_checkpoint(paths.checkpoint)
    if not same_experiment(TrainConfig.from_dict(checkpoint["config"]), config):
        raise ValueError(f"{paths.checkpoint} was written by a different config than {paths.config}")
    info = DATASET_INFO[config.dataset]
    model = build_model(config, info.in_channels, info.num_classes)
    model.load_state_dict(checkpoint["model"])
    model.eval()
    metrics = json.loads(paths.metrics.read_text()) if paths.metrics.is_file() else None
    return LoadedRun(paths, config, model, int(checkpoint["epoch"]), metrics)
