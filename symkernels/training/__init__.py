"""Training runs: ``symkernels train`` and ``symkernels export`` as a library.

:func:`train` starts (or continues) a run in a run folder, :func:`resume` continues one, :func:`load_run`
reads one back and :func:`export_run` exports its model. :class:`TrainConfig` holds the experiment, with
per-dataset defaults (:data:`DATASET_DEFAULTS`); :class:`RuntimeOptions` says how it executes.
"""

import importlib
from typing import Any

from symkernels.training.config import DATASET_DEFAULTS, MODELS, RuntimeOptions, TrainConfig
from symkernels.training.divergence import TrainingDivergedError
from symkernels.training.interrupt import TrainingInterruptedError

# The rest is imported on first use: it needs the command line's packages (scipy, tqdm, ...), which
# `symkernels info` and the config alone do not.
_LAZY = {
    "ExportReport": "exporting",
    "export_run": "exporting",
    "TIMING_KEYS": "loop",
    "TrainResult": "loop",
    "evaluate": "steps",
    "resume": "loop",
    "train": "loop",
    "LoadedRun": "runs",
    "RunPaths": "runs",
    "load_run": "runs",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"symkernels.training.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'symkernels.training' has no attribute {name!r}")


__all__ = [
    "DATASET_DEFAULTS",
    "ExportReport",
    "MODELS",
    "TIMING_KEYS",
    "LoadedRun",
    "RunPaths",
    "RuntimeOptions",
    "TrainConfig",
    "TrainResult",
    "TrainingDivergedError",
    "TrainingInterruptedError",
    "evaluate",
    "export_run",
    "load_run",
    "resume",
    "train",
]
