"""The marginal-likelihood training loop (the paper's schedule), resumable, with a run folder.

Each minibatch takes an SGD step (momentum, cosine learning rate over the epochs) on
``mean CE + (1/2N) Σ_l δ_l ||θ_l||²`` (the prior term as a per-tensor weight decay ``δ_l/N``); the learned
stacks of the sharing network take an Adam step on the same loss (they carry no prior). After a burn-in,
every few epochs and after the last epoch, a KFAC Laplace approximation is fitted over the whole training
set and ``η = log δ`` takes Adam steps on ``−log p(D|δ)/N``.

Run folder::

    config.json      the experiment (LayerwiseConfig)
    checkpoint.pt    the state after the last complete epoch (atomic; resume from it)
    metrics.json     per epoch: losses and accuracies; per marginal-likelihood step: log p(D|δ)/N, and per
                     tensor δ, γ and P, per layer each path's γ, P and share and the winner
    shares.md        the final per-layer share table
    shares.png       the final shares as stacked bars

On one machine with the same thread count, a run stopped after epoch ``e`` and resumed reproduces the
uninterrupted run bit for bit.
"""

from __future__ import annotations

import json
import math
import platform
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from symkernels.layerwise.config import LayerwiseConfig
from symkernels.layerwise.marglik import fit_curvature, prior_parameters, require_laplace
from symkernels.layerwise.models import PATH_SETS, RelaxedBackbone, parse_blocks
from symkernels.layerwise.report import format_share_table, layer_shares, save_share_figure
from symkernels.layerwise.runs import RunPaths, finite_json, library_versions, plan_run
from symkernels.layerwise.sharing import SharingNetwork
from symkernels.layerwise.tasks import TaskData, load_task
from symkernels.training.checkpoint import atomic_write_text, save_checkpoint
from symkernels.training.config import torch_threads
from symkernels.training.divergence import stop_if_diverged
from symkernels.training.interrupt import StopRequest, TrainingInterruptedError
from symkernels.training.rng import (
    derive_seed,
    generator,
    global_state,
    preserved_global_state,
    set_global_state,
)
from symkernels.training.runs import default_run_dir

EVAL_BATCH_SIZE = 500
TIMING_KEYS = ("epoch_seconds", "fit_seconds", "hyper_seconds")  # measure the machine, not the run


class LayerwiseInterruptedError(TrainingInterruptedError):
    """A layer-wise run stopped on a signal; ``epoch`` epochs are complete and saved in ``run_dir``."""

    def __init__(self, run_dir: str, epoch: int, signum: int) -> None:
        super().__init__(run_dir, epoch, signum)
        saved = f"the last complete checkpoint (epoch {epoch})" if epoch else "no epoch was complete yet"
        self.args = (
            f"stopped by {signal.Signals(signum).name}; {saved} in {run_dir}. "
            f"Continue with: symkernels layerwise train --resume {run_dir}",
        )


@dataclass
class LayerwiseResult:
    run_dir: Path
    config: LayerwiseConfig
    model: nn.Module
    metrics: dict[str, Any]  # the content of metrics.json

    @property
    def final_layers(self) -> dict[str, Any]:
        """Per-layer shares of the last marginal-likelihood step."""
        return self.metrics["marglik"][-1]["layers"]


def build_model(config: LayerwiseConfig, in_channels: int, num_classes: int) -> nn.Module:
    """The model of ``config``, initialised from its seed (the caller's global RNG state is kept)."""
    blocks = parse_blocks(config.blocks)
    with preserved_global_state():
        torch.manual_seed(derive_seed(config.seed, "layerwise:init"))
        if config.model == "sharing":
            return SharingNetwork(
                in_channels,
                num_classes,
                width=config.width,
                blocks=blocks,
                stack=config.stack,
                seed=config.seed,
            )
        return RelaxedBackbone(
            in_channels,
            num_classes,
            size=config.size,
            width=config.width,
            blocks=blocks,
            paths=PATH_SETS[config.model],
            seed=config.seed,
        )


def cosine_lr(config: LayerwiseConfig, epoch: int) -> float:
    """The learning rate of (0-based) epoch ``epoch``: ``lr · ½(1 + cos(π·epoch/epochs))``."""
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / config.epochs))


class _Trainer:
    """One run's state between epochs."""

    def __init__(self, config: LayerwiseConfig, paths: RunPaths, device: torch.device, quiet: bool) -> None:
        self.config, self.paths, self.device, self.quiet = config, paths, device, quiet
        task: TaskData = load_task(
            config.task,
            config.source,
            config.size,
            seed=config.seed,
            train_limit=config.train_limit,
            test_limit=config.test_limit,
        )
        if len(task.train_labels) < config.batch_size:
            raise ValueError(
                f"batch_size={config.batch_size} exceeds the {len(task.train_labels)} training images"
            )
        self.task = task
        self.train_images, self.train_labels = task.train_images.to(device), task.train_labels.to(device)
        self.test_images, self.test_labels = task.test_images.to(device), task.test_labels.to(device)
        self.n_data = len(task.train_labels)
        self.steps = self.n_data // config.batch_size
        self.model = build_model(config, task.train_images.shape[1], task.num_classes).to(device)
        named = prior_parameters(self.model)
        self.names = [name for name, _ in named]
        self.sizes = [p.numel() for _, p in named]
        self.priors = [p for _, p in named]
        others = [p for p in self.model.parameters() if all(p is not q for q in self.priors)]
        # One group per tensor: its weight decay δ_l/N is the gradient of the prior term δ_l/(2N)·||θ_l||².
        groups = [{"params": [p], "weight_decay": 1.0 / self.n_data} for p in self.priors]
        self.optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
        self.stack_optimizer = torch.optim.Adam(others, lr=config.stack_lr) if others else None
        self.log_delta = torch.zeros(len(self.priors), dtype=torch.float64, device=device, requires_grad=True)
        self.hyper_optimizer = torch.optim.Adam([self.log_delta], lr=config.hyper_lr)
        self.order = generator(config.seed, "layerwise:order")
        self.history: list[dict[str, Any]] = []
        self.marglik: list[dict[str, Any]] = []
        self.epoch = 0

    # -- state -----------------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "stack_optimizer": self.stack_optimizer.state_dict() if self.stack_optimizer else None,
            "log_delta": self.log_delta.detach().clone(),
            "hyper_optimizer": self.hyper_optimizer.state_dict(),
            "marglik": self.marglik,
        }

    def save(self) -> None:
        state = self.state()
        save_checkpoint(
            self.paths.checkpoint,
            epoch=self.epoch,
            config=self.config.to_dict(),
            model=self.model.state_dict(),
            optimizer=state.pop("optimizer"),
            rng={"order": self.order.get_state(), "global": global_state()},
            history=self.history,
            extra=state,
        )
        self.write_metrics(complete=False)

    def restore(self, checkpoint: dict[str, Any]) -> None:
        if LayerwiseConfig.from_dict(checkpoint["config"]) != self.config:
            raise ValueError(
                f"{self.paths.checkpoint} was written by a different config than {self.paths.config}"
            )
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if self.stack_optimizer is not None:
            self.stack_optimizer.load_state_dict(checkpoint["stack_optimizer"])
        with torch.no_grad():
            self.log_delta.copy_(checkpoint["log_delta"])
        self.hyper_optimizer.load_state_dict(checkpoint["hyper_optimizer"])
        self.order.set_state(checkpoint["rng"]["order"])
        set_global_state(checkpoint["rng"]["global"])
        self.history = list(checkpoint["history"])
        self.marglik = list(checkpoint["marglik"])
        self.epoch = int(checkpoint["epoch"])

    # -- one epoch -------------------------------------------------------------------------------------

    def train_epoch(self, stop: StopRequest) -> dict[str, Any]:
        config = self.config
        lr = cosine_lr(config, self.epoch)
        delta = self.log_delta.detach().exp().tolist()
        for group, d in zip(self.optimizer.param_groups, delta, strict=True):
            group["lr"], group["weight_decay"] = lr, d / self.n_data
        order = torch.randperm(self.n_data, generator=self.order).to(self.device)
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # CE·n, correct
        bar = tqdm(
            total=self.steps, desc=f"epoch {self.epoch + 1}/{config.epochs}", disable=self.quiet, leave=False
        )
        start = time.perf_counter()
        self.model.train()
        with bar:
            for step in range(self.steps):
                index = order[step * config.batch_size : (step + 1) * config.batch_size]
                x, y = self.train_images[index], self.train_labels[index]
                logits = self.model(x)
                loss = F.cross_entropy(logits, y)  # the prior term enters as each group's weight decay
                self.optimizer.zero_grad(set_to_none=True)
                if self.stack_optimizer is not None:
                    self.stack_optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                if self.stack_optimizer is not None:
                    self.stack_optimizer.step()
                with torch.no_grad():
                    sums += torch.stack([loss.detach() * len(y), (logits.argmax(1) == y).sum()]).double()
                bar.update()
                if stop.requested:
                    raise self.interrupted(stop)
        seconds = time.perf_counter() - start
        seen = self.steps * config.batch_size
        test_loss, test_accuracy = self.evaluate()
        return {
            "epoch": self.epoch + 1,
            "lr": lr,
            "train_loss": sums[0].item() / seen,
            "train_accuracy": sums[1].item() / seen,
            "test_loss": test_loss,
            "test_accuracy": test_accuracy,
            "epoch_seconds": seconds,
        }

    def evaluate(self) -> tuple[float, float]:
        loss, correct = 0.0, 0
        self.model.eval()
        with torch.no_grad():
            for start in range(0, len(self.test_labels), EVAL_BATCH_SIZE):
                x = self.test_images[start : start + EVAL_BATCH_SIZE]
                y = self.test_labels[start : start + EVAL_BATCH_SIZE]
                logits = self.model(x)
                loss += F.cross_entropy(logits, y, reduction="sum").item()
                correct += int((logits.argmax(1) == y).sum())
        self.model.train()
        return loss / len(self.test_labels), correct / len(self.test_labels)

    def marglik_step(self) -> dict[str, Any]:
        """Fit the curvature at the current parameters, then Adam steps on log δ."""
        config = self.config
        start = time.perf_counter()
        curvature = fit_curvature(
            self.model,
            self.train_images,
            self.train_labels,
            batch_size=config.curvature_batch_size,
            fisher=config.fisher,
        )
        fitted = time.perf_counter()
        for _ in range(config.hyper_steps):
            self.hyper_optimizer.zero_grad(set_to_none=True)
            loss = -curvature.log_marginal_likelihood(self.log_delta.exp()) / self.n_data
            loss.backward()
            self.hyper_optimizer.step()
        delta = self.log_delta.detach().exp()
        with torch.no_grad():
            log_marglik = curvature.log_marginal_likelihood(delta).item() / self.n_data
        gamma = curvature.effective_dimensions(delta)
        done = time.perf_counter()
        return {
            "epoch": self.epoch,
            "log_marginal_likelihood": log_marglik,
            "fit_seconds": fitted - start,
            "hyper_seconds": done - fitted,
            "tensors": {
                name: {"delta": d, "gamma": g, "parameters": size}
                for name, d, g, size in zip(
                    self.names, delta.tolist(), gamma.tolist(), self.sizes, strict=True
                )
            },
            "layers": layer_shares(self.model, self.names, self.sizes, gamma),
        }

    def interrupted(self, stop: StopRequest) -> LayerwiseInterruptedError:
        return LayerwiseInterruptedError(str(self.paths.root), self.epoch, stop.signum or int(signal.SIGTERM))

    # -- outputs ---------------------------------------------------------------------------------------

    def metrics(self, *, complete: bool) -> dict[str, Any]:
        import symkernels

        last = self.history[-1] if self.history else None
        return {
            "config": self.config.to_dict(),
            "complete": complete,
            "epochs_completed": self.epoch,
            "train_images": self.n_data,
            "test_images": len(self.test_labels),
            "num_classes": self.task.num_classes,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "device": str(self.device),
            "threads": torch.get_num_threads(),
            "versions": {
                "symkernels": symkernels.__version__,
                "torch": torch.__version__,
                "python": platform.python_version(),
                **library_versions(),
            },
            "test_accuracy": last["test_accuracy"] if last else None,
            "epochs": self.history,
            "marglik": self.marglik,
        }

    def write_metrics(self, *, complete: bool) -> dict[str, Any]:
        metrics = self.metrics(complete=complete)
        atomic_write_text(self.paths.metrics, json.dumps(finite_json(metrics), indent=2) + "\n")
        return metrics

    def finish(self) -> dict[str, Any]:
        metrics = self.write_metrics(complete=True)
        layers = self.marglik[-1]["layers"]
        c = self.config
        title = f"{c.model} on {c.task} {c.source} ({c.size}×{c.size}), seed {c.seed}, epoch {self.epoch}"
        atomic_write_text(self.paths.table, format_share_table(layers, title=title))
        save_share_figure([(f"{c.model}, {c.task}", layers)], self.paths.figure)
        return metrics


def train_layerwise(
    config: LayerwiseConfig | None = None,
    out: str | Path | None = None,
    *,
    resume: str | Path | None = None,
    threads: int | None = None,
    device: str = "cpu",
    quiet: bool = False,
) -> LayerwiseResult:
    """Train ``config`` into ``out`` (default ``runs/<timestamp>``), or continue the run in ``resume``.

    A folder holding a run of the same config continues from its checkpoint; any other content is refused
    before anything is written. The caller's global RNG states and thread count are kept.
    """
    if (config is None) == (resume is None):
        raise ValueError("give either a config (a new run) or resume=RUN_DIR, not both")
    require_laplace()  # before anything is loaded or written
    if resume is not None and out is not None and Path(out).resolve() != Path(resume).resolve():
        raise ValueError("out and resume name different folders; resume continues in RUN_DIR")
    target = Path(resume if resume is not None else (out if out is not None else default_run_dir()))
    paths, config, checkpoint = plan_run(target, config)
    with torch_threads(threads), StopRequest() as stop, preserved_global_state():
        trainer = _Trainer(config, paths, torch.device(device), quiet)
        if checkpoint is not None:
            trainer.restore(checkpoint)
            del checkpoint
        paths.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(paths.config, config.to_json())
        _say(quiet, _banner(trainer, resumed=trainer.epoch > 0))
        while trainer.epoch < config.epochs:
            record = trainer.train_epoch(stop)
            stop_if_diverged(
                record["train_loss"],
                run_dir=paths.root,
                epoch=record["epoch"],
                what="the training loss",
                advice=f"Start a new run with a smaller --lr (this run's is {config.lr:g}).",
            )
            trainer.epoch = record["epoch"]
            trainer.history.append(record)
            if config.marglik_due(trainer.epoch):
                step = trainer.marglik_step()
                stop_if_diverged(
                    step["log_marginal_likelihood"],
                    run_dir=paths.root,
                    epoch=trainer.epoch,
                    what="log p(D|δ)",
                    advice=f"Start a new run with a smaller --hyper-lr (this run's is {config.hyper_lr:g}).",
                )
                trainer.marglik.append(step)
                _say(quiet, _marglik_line(step))
            trainer.save()
            _say(quiet, _epoch_line(record, config.epochs))
            if stop.requested:
                raise trainer.interrupted(stop)
        metrics = trainer.finish()
    _say(quiet, format_share_table(trainer.marglik[-1]["layers"]))
    return LayerwiseResult(paths.root, config, trainer.model, metrics)


def _banner(trainer: _Trainer, *, resumed: bool) -> str:
    c = trainer.config
    action = f"resuming after epoch {trainer.epoch}" if resumed else "new run"
    return (
        f"{action} in {trainer.paths.root}: {c.model} on {c.task} {c.source} {c.size}×{c.size} "
        f"({trainer.n_data} train, {len(trainer.test_labels)} test images, "
        f"{trainer.task.num_classes} classes), "
        f"{sum(trainer.sizes):,} parameters in {len(trainer.sizes)} tensors with a prior, "
        f"{c.epochs} epochs of {trainer.steps} steps, {torch.get_num_threads()} threads"
    )


def _epoch_line(record: dict[str, Any], epochs: int) -> str:
    return (
        f"epoch {record['epoch']}/{epochs}  train loss {record['train_loss']:.4f} acc "
        f"{record['train_accuracy']:.4f}  test loss {record['test_loss']:.4f} "
        f"acc {record['test_accuracy']:.4f}  "
        f"({record['epoch_seconds']:.1f} s)"
    )


def _marglik_line(step: dict[str, Any]) -> str:
    winners = " ".join(layer["winner"] for layer in step["layers"].values())
    return (
        f"marglik after epoch {step['epoch']}: log p(D|δ)/N {step['log_marginal_likelihood']:.4f}, "
        f"layer winners {winners} (fit {step['fit_seconds']:.1f} s, hypersteps {step['hyper_seconds']:.2f} s)"
    )


def _say(quiet: bool, line: str) -> None:
    if not quiet:
        tqdm.write(line)
