"""Stopping a run whose loss is no longer finite, before the diverged epoch overwrites the last checkpoint."""

from __future__ import annotations

import math
from pathlib import Path


class TrainingDivergedError(RuntimeError):
    """``what`` became NaN or infinite in ``epoch``; the checkpoint of the epoch before is kept."""

    def __init__(self, run_dir: str | Path, epoch: int, what: str, advice: str) -> None:
        self.run_dir, self.epoch = str(run_dir), epoch
        kept = f"the checkpoint of epoch {epoch - 1}" if epoch > 1 else "no checkpoint"
        super().__init__(
            f"training diverged in epoch {epoch}: {what} became NaN or Inf, so the run stops and keeps "
            f"{kept} in {run_dir}. {advice}"
        )


def stop_if_diverged(value: float, *, run_dir: str | Path, epoch: int, what: str, advice: str) -> None:
    """Raise :class:`TrainingDivergedError` unless ``value`` is finite."""
    if not math.isfinite(value):
        raise TrainingDivergedError(run_dir, epoch, what, advice)
