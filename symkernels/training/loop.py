"""The training loop: epochs of AdamW steps on transformed batches, evaluation, checkpoints, final report.

Reproducibility: the model is initialised from the run seed, data order and augmentation come from their own
generators (:mod:`symkernels.training.rng`), and every state that a step reads is in the checkpoint written
after each epoch. On one machine with the same thread count and backend, a run that stopped after epoch ``e``
and was resumed reproduces the uninterrupted run bit for bit (parameters, optimiser state, metrics).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from symkernels import backends
from symkernels.models import parameter_counts
from symkernels.training import distributed, report
from symkernels.training.checkpoint import (
    atomic_write_text,
    load_checkpoint,
    remove_leftover_temporaries,
    save_checkpoint,
)
from symkernels.training.config import RuntimeOptions, TrainConfig, torch_threads
from symkernels.training.datasets import TrainData, prepare_data
from symkernels.training.distributed import DistEnv
from symkernels.training.divergence import stop_if_diverged
from symkernels.training.factory import build_model, build_optimizer
from symkernels.training.interrupt import StopRequest, TrainingInterruptedError
from symkernels.training.rng import (
    DataStreams,
    derive_seed,
    global_state,
    preserved_global_state,
    set_global_state,
)
from symkernels.training.runs import RunPlan, default_run_dir, plan_new_or_matching, plan_resume
from symkernels.training.steps import TrainingStep, evaluate, torch_device

# Per-epoch metrics that measure the machine, not the run: left out when comparing runs.
TIMING_KEYS = ("seconds_per_step", "epoch_seconds")

# A step reads nothing back from the device. The progress bar's loss and accuracy are read every this many
# steps (a read waits for the device to finish the steps queued before it), as is, under torchrun, whether a
# process was asked to stop (a collective).
READ_EVERY = 20

LONG_EXPERIMENT_HINT = (
    "The authors' 32-channel run on 60,000 digits put >= 0.8 of two lifting elements on rotations after ~47k "
    "steps and of all three after ~94k; to run that experiment: python bench/recovery.py --help"
)

# Called on the main process after each epoch's checkpoint with the metrics just written to metrics.json.
EpochCallback = Callable[[dict[str, Any]], None]


@dataclass
class TrainResult:
    """What :func:`train` and :func:`resume` return."""

    run_dir: Path
    config: TrainConfig
    model: nn.Module  # the trained model (unwrapped from DDP), in train mode
    history: list[dict[str, Any]]
    test_accuracy: float
    metrics: dict[str, Any]  # the content of metrics.json


def train(
    config: TrainConfig,
    runtime: RuntimeOptions | None = None,
    *,
    out: str | Path | None = None,
    on_epoch: EpochCallback | None = None,
) -> TrainResult:
    """Train ``config`` into ``out`` (default ``runs/<timestamp>``); the caller's global RNG states are kept.

    ``out`` may be missing or empty (a new run) or hold a run of the same config (continued from its
    checkpoint); anything else is refused without writing. Under ``torchrun`` the processes train together.
    ``on_epoch`` is called on the main process after each epoch's checkpoint with the metrics written.
    """
    runtime = runtime or RuntimeOptions()
    with _session(runtime) as (env, device):
        target = Path(out) if out is not None else distributed.broadcast_object(default_run_dir(), env)
        # Passed on directly: _run drops the plan's checkpoint once the trainer has restored it.
        return _run(plan_new_or_matching(target, config), runtime, env, device, on_epoch)


def resume(
    run_dir: str | Path,
    runtime: RuntimeOptions | None = None,
    *,
    given: dict[str, Any] | None = None,
    on_epoch: EpochCallback | None = None,
) -> TrainResult:
    """Continue the run in ``run_dir`` from its checkpoint to its ``epochs``.

    ``given`` are config fields the caller set explicitly: a value that differs from the stored config is an
    error, except ``epochs``, which may grow to extend a run. ``on_epoch`` as in :func:`train`.
    """
    runtime = runtime or RuntimeOptions()
    with _session(runtime) as (env, device):
        return _run(plan_resume(run_dir, dict(given or {})), runtime, env, device, on_epoch)


@contextlib.contextmanager
def _session(runtime: RuntimeOptions) -> Iterator[tuple[DistEnv, torch.device]]:
    """Threads, process group and device for one run; the process group is closed afterwards."""
    with torch_threads(runtime.threads):
        # A first guess of the device type picks gloo or NCCL; the local rank then fixes the CUDA index.
        env = distributed.init_from_env(torch_device(runtime.device))
        try:
            device = torch_device(runtime.device, env)
            if device.type == "cuda":
                torch.cuda.set_device(device)
            backends.resolve(runtime.backend, device, torch.float32, "the ops")  # fail early
            yield env, device
        finally:
            distributed.shutdown(env)


class _Trainer:
    """One run's state between epochs."""

    def __init__(self, plan: RunPlan, runtime: RuntimeOptions, env: DistEnv, device: torch.device) -> None:
        checkpoint = plan.checkpoint
        # The trainer keeps the plan without the checkpoint: no second copy of the weights during the run.
        plan = dataclasses.replace(plan, checkpoint=None)
        self.plan, self.runtime, self.env, self.device = plan, runtime, env, device
        self.config = config = plan.config
        self.paths = plan.paths
        self.data: TrainData = prepare_data(config, runtime)
        n = len(self.data.train_labels)
        if n < config.batch_size:
            raise ValueError(
                f"batch_size={config.batch_size} exceeds the {n} training images; the last incomplete "
                "batch of each epoch is dropped, so an epoch would have no step"
            )
        self.shard = distributed.shard(config.batch_size, env)
        self.steps = n // config.batch_size
        self.model = build_model(config, self.data.in_channels, self.data.num_classes).to(device)
        self.optimizer = build_optimizer(self.model, config)
        self.streams = DataStreams.from_seed(config.seed)
        torch.manual_seed(derive_seed(config.seed, f"global:{env.rank}"))  # dropout, per process
        self.history: list[dict[str, Any]] = []
        self.epoch = 0
        if plan.resume:
            self._restore(checkpoint if checkpoint is not None else load_checkpoint(self.paths.checkpoint))
        self.net: nn.Module = self.model
        if env.distributed:
            ids = [device.index] if device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids)
        self.step = TrainingStep(self.model, self.optimizer, config, net=self.net, compile=runtime.compile)
        # Every op of a step (the grouped Sinkhorn, the expansions) runs on this one backend.
        self.backend = backends.resolve(runtime.backend, device, config.torch_dtype, "the ops")
        self.bases = report.layer_bases(self.model, flip=config.flip)  # exact group of each layer's stack
        self.learned_rows = report.learned_rows(self.model)

    def _restore(self, checkpoint: dict[str, Any]) -> None:
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.streams.load_state_dict(checkpoint["rng"]["data"])
        states = checkpoint["rng"]["global"]
        set_global_state(states[self.env.rank] if len(states) == self.env.world_size else states[0])
        self.history = list(checkpoint["history"])
        self.epoch = int(checkpoint["epoch"])

    # -- one epoch -------------------------------------------------------------------------------------

    def train_epoch(self, stop: StopRequest) -> dict[str, Any]:
        config, data, device = self.config, self.data, self.device
        epoch = self.epoch + 1
        order = torch.randperm(len(data.train_labels), generator=self.streams.order)
        sums = torch.zeros(4, dtype=torch.float64, device=device)  # CE·n, correct, norm, entropy
        seen = 0
        show = not self.runtime.quiet and self.env.is_main
        bar = tqdm(total=self.steps, desc=f"epoch {epoch}/{config.epochs}", disable=not show, leave=False)
        start = time.perf_counter()
        with bar:
            for step in range(self.steps):
                index = order[step * config.batch_size : (step + 1) * config.batch_size]
                params = data.augmentation.sample(config.batch_size, self.streams.augment)
                index, params = index[self.shard], params.select(self.shard)
                x = data.training_batch(index, params).to(device, config.torch_dtype)
                y = data.train_labels[index].to(device)
                # Non-finite values are not looked for here: they reach the loss, read once per epoch.
                loss, logits, norm, entropy = self.step(x, y)
                with torch.no_grad():
                    correct = (logits.argmax(dim=1) == y).sum()
                    values = (loss * len(y), correct, norm, entropy)
                    sums += torch.stack([v.to(torch.float64) for v in values])
                seen += len(y)
                read = (step + 1) % READ_EVERY == 0 or step + 1 == self.steps
                if show:
                    bar.update()
                    if read:
                        # One read for both numbers (float64 holds the float32 loss and the count exactly).
                        shown_loss, shown_correct = torch.stack([loss.double(), correct.double()]).tolist()
                        bar.set_postfix(loss=f"{shown_loss:.3f}", acc=f"{shown_correct / len(y):.3f}")
                # Across processes, asking is a collective that reads back: every READ_EVERY steps.
                if (read or not self.env.distributed) and distributed.any_across(
                    stop.requested, self.env, device
                ):
                    raise self._interrupted(stop)
        seconds = time.perf_counter() - start
        loss_sum, correct_sum, norm_sum, entropy_sum = sums.tolist()
        loss_sum, correct_sum, count = distributed.sum_across(
            [loss_sum, correct_sum, float(seen)], self.env, device
        )
        # Before anything reads the model: a non-finite loss (summed over the ranks, so every rank stops
        # alike) means the parameters are no longer finite either.
        stop_if_diverged(
            loss_sum / count,
            run_dir=self.paths.root,
            epoch=epoch,
            what="the training loss",
            advice=_divergence_advice(config),
        )
        test_loss, test_accuracy = evaluate(
            self.model, data.test_images, data.test_labels, device=device, env=self.env
        )
        return {
            "epoch": epoch,
            "step": epoch * self.steps,
            "train_loss": loss_sum / count,
            "train_accuracy": correct_sum / count,
            "norm": norm_sum / self.steps,
            "entropy": entropy_sum / self.steps,
            "test_loss": test_loss,
            "test_accuracy": test_accuracy,
            "steps": self.steps,
            # How this epoch ran: a resumed run may use another backend or thread count than its first epochs.
            "backend": self.backend,
            "threads": torch.get_num_threads(),
            "compiled": self.step.compiled,
            "seconds_per_step": seconds / self.steps,
            "epoch_seconds": seconds,
            # Every layer's stack decomposed onto its exact group (rows: stack elements, identity included).
            "decomposition": {
                name: entry["coefficients"]
                for name, entry in report.decomposition(self.stacks(), self.bases).items()
            },
        }

    def stacks(self) -> dict[str, torch.Tensor]:
        """Every weight-sharing layer's current stack, by report name."""
        return report.learned_stacks(self.model)

    def _interrupted(self, stop: StopRequest) -> TrainingInterruptedError:
        import signal

        return TrainingInterruptedError(str(self.paths.root), self.epoch, stop.signum or int(signal.SIGTERM))

    # -- outputs ---------------------------------------------------------------------------------------

    def save(self) -> dict[str, Any] | None:
        """Checkpoint and metrics after a complete epoch (collective: every process takes part); returns the
        metrics written (the main process) or None."""
        metrics = None
        states = distributed.gather_objects(global_state(), self.env)
        if self.env.is_main:
            save_checkpoint(
                self.paths.checkpoint,
                epoch=self.epoch,
                config=self.config.to_dict(),
                model=self.model.state_dict(),
                optimizer=self.optimizer.state_dict(),
                rng={"data": self.streams.state_dict(), "global": states},
                history=self.history,
                extra={"world_size": self.env.world_size},
            )
            metrics = self.write_metrics(complete=False)
        distributed.barrier(self.env)
        return metrics

    def metrics(
        self,
        *,
        complete: bool,
        decomposition: dict[str, Any] | None = None,
        recovery: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        import symkernels

        last = self.history[-1] if self.history else None
        return {
            "config": self.config.to_dict(),
            "backend": self.backend,  # the one computing every op
            "device": str(self.device),
            "world_size": self.env.world_size,
            "threads": torch.get_num_threads(),
            "versions": {
                "symkernels": symkernels.__version__,
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
            "parameters": parameter_counts(self.model),
            "complete": complete,
            "epochs_completed": self.epoch,
            "epochs": self.history,
            "seconds_per_step": _mean([e["seconds_per_step"] for e in self.history]),
            "test_accuracy": last["test_accuracy"] if last and complete else None,
            # The exact elements each epoch's "decomposition" rows refer to, by layer.
            "group_elements": {name: names for name, (_, names) in self.bases.items()},
            "learned_rows": {name: self.learned_rows[name] for name in self.bases},  # not the fixed identity
            "decomposition": decomposition if decomposition is not None else {},
            "recovery": recovery if recovery is not None else {},  # per layer: assigned elements, verdict
        }

    def write_metrics(self, *, complete: bool, decomposition: dict[str, Any] | None = None) -> dict[str, Any]:
        metrics = self.metrics(complete=complete, decomposition=decomposition)
        atomic_write_text(self.paths.metrics, _json(metrics))
        return metrics

    def finish(self) -> dict[str, Any]:
        """Final metrics (test accuracy, decomposition) and figures; rank 0 writes them."""
        stacks, bases = self.stacks(), self.bases
        decomposition = report.decomposition(stacks, bases)
        metrics = self.metrics(
            complete=True,
            decomposition=decomposition,
            recovery={name: report.recovery(entry) for name, entry in decomposition.items()},
        )
        if self.env.is_main:
            report.save_figures(
                stacks, bases, decomposition, self.paths.stacks_plot, self.paths.decomposition_plot
            )
            report.save_trajectory_figure(metrics, self.paths.trajectory_plot)
            atomic_write_text(self.paths.metrics, _json(metrics))
        distributed.barrier(self.env)
        return metrics


def _run(
    plan: RunPlan,
    runtime: RuntimeOptions,
    env: DistEnv,
    device: torch.device,
    on_epoch: EpochCallback | None = None,
) -> TrainResult:
    config = plan.config
    choice = backends.use_backend(runtime.backend) if runtime.backend else contextlib.nullcontext()
    with StopRequest() as stop, choice, preserved_global_state():
        trainer = _Trainer(plan, runtime, env, device)  # loads and checks everything before writing
        plan = trainer.plan  # without the checkpoint it was restored from
        distributed.barrier(env)
        if env.is_main:
            plan.paths.root.mkdir(parents=True, exist_ok=True)
            remove_leftover_temporaries(plan.paths.root)  # of a run killed while writing
            atomic_write_text(plan.paths.config, config.to_json())
        distributed.barrier(env)
        _say(runtime, env, _banner(trainer))
        while trainer.epoch < config.epochs:
            if distributed.any_across(stop.requested, env, device):
                raise trainer._interrupted(stop)
            record = trainer.train_epoch(stop)  # raises TrainingDivergedError first if the loss diverged
            trainer.history.append(record)
            trainer.epoch = record["epoch"]
            written = trainer.save()
            _say(runtime, env, _epoch_line(record, config.epochs, trainer))
            if on_epoch is not None and written is not None:
                on_epoch(written)
            if distributed.any_across(stop.requested, env, device):
                raise trainer._interrupted(stop)
        metrics = trainer.finish()
    if "lift" in metrics["decomposition"]:
        _say(runtime, env, report.format_trajectory(report.trajectory(metrics, "lift"), "lift"))
        lift = report.format_decomposition(
            "lift", metrics["decomposition"]["lift"], verdict=metrics["recovery"]["lift"]
        )
        _say(runtime, env, lift)
        if not metrics["recovery"]["lift"]["recovered"]:
            _say(runtime, env, LONG_EXPERIMENT_HINT)
    _say(runtime, env, f"test accuracy {metrics['test_accuracy']:.4f}; run folder {plan.paths.root}")
    return TrainResult(
        plan.paths.root, config, trainer.model, trainer.history, metrics["test_accuracy"], metrics
    )


def _banner(trainer: _Trainer) -> str:
    c = trainer.config
    action = f"resuming after epoch {trainer.epoch}" if trainer.plan.resume else "new run"
    return (
        f"{action} in {trainer.paths.root}: {c.model} on {c.dataset} "
        f"({len(trainer.data.train_labels)} train, {len(trainer.data.test_labels)} test images, "
        f"rotate={c.rotate}), {c.epochs} epochs of {trainer.steps} steps, backend {trainer.backend}, "
        f"{trainer.device}{', compiled' if trainer.step.compiled else ''}, "
        f"{trainer.env.world_size} process(es)"
    )


def _epoch_line(record: dict[str, Any], epochs: int, trainer: _Trainer) -> str:
    line = (
        f"epoch {record['epoch']}/{epochs}  "
        f"train loss {record['train_loss']:.4f} acc {record['train_accuracy']:.4f}  "
        f"test loss {record['test_loss']:.4f} acc {record['test_accuracy']:.4f}  norm {record['norm']:.4f}  "
        f"entropy {record['entropy']:.2f}  ({1000 * record['seconds_per_step']:.1f} ms/step)"
    )
    rows = trainer.learned_rows.get("lift")
    if rows and "lift" in record["decomposition"]:
        names = trainer.bases["lift"][1]
        best = report.best_elements(names, record["decomposition"]["lift"], rows)
        line += "  lift " + " ".join(f"{e['element']}:{e['assigned']} {e['mass']:.2f}" for e in best)
    return line


def _divergence_advice(config: TrainConfig) -> str:
    return (
        f"Start a new run with a smaller --lr or --logits-lr (this run's: {config.lr:g}, "
        f"{config.logits_lr:g})."
    )


def _say(runtime: RuntimeOptions, env: DistEnv, line: str) -> None:
    if not runtime.quiet and env.is_main:
        tqdm.write(line)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _json(value: Any) -> str:
    import json

    def finite(x: Any) -> Any:  # JSON has no NaN/Inf: write them as null
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: finite(v) for k, v in x.items()}
        if isinstance(x, list):
            return [finite(v) for v in x]
        return x

    return json.dumps(finite(value), indent=2) + "\n"
