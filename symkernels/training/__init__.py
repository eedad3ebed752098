"""Training runs: ``symkernels train`` and ``symkernels export`` as a library.

:func:`train` starts (or continues) a run in a run folder, :func:`resume` continues one, :func:`load_run`
reads one back and :func:`export_run` exports its model. :class:`TrainConfig` holds the experiment, with
per-dataset defaults (:data:`DATASET_DEFAULTS`); :class:`RuntimeOptions` says how it executes.
"""

from symkernels.training.config import DATASET_DEFAULTS, MODELS, RuntimeOptions, TrainConfig
from symkernels.training.exporting import ExportReport, export_run
from symkernels.training.interrupt import TrainingInterruptedError
from symkernels.training.loop import TIMING_KEYS, TrainResult, evaluate, resume, train
from symkernels.training.runs import LoadedRun, RunPaths, load_run

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
    "TrainingInterruptedError",
    "evaluate",
    "export_run",
    "load_run",
    "resume",
    "train",
]
