"""GPU benchmark: Sinkhorn, kernel expansion, copy bandwidth and a training-step profile, with the goals.

    python bench/gpu.py --out DIR [--sections a,b] [--only REGEX] [--budget-s S] [--dry-run] [--report-only]

Sections (in this order by default):

``bandwidth``   device-to-device copy bandwidth (the memory roofline this device reaches).
``sinkhorn``    Sinkhorn, T = 20, float32, forward and forward + backward, for the MNIST and CIFAR model
                stacks (one call per layer) and the 1024×64×64 and 64×256×256 batches, logits at init
                (U[0, 1)) and sharp (N(0, 3²)); providers: every GPU backend of symkernels (``triton``, ...),
                the eager reference, the authors' early-exit loop and the grouped call (all layers at once).
``compiled``    the same workloads with ``torch.compile``'d reference (compile time recorded apart).
``expansion``   kernel expansion forward and forward + backward at the paper's layer shapes, triton vs the
                reference einsum, float32 and bfloat16.
``profile``     ``torch.profiler`` of one training step: reference WSCNN vs the plain CNN (and the triton
                WSCNN): kernel launches, device time, convolution time; and the Sinkhorn of the model alone.

Timings are medians over rounds of back-to-back calls between CUDA events after a warm-up ("eager": what a
training loop pays, launch overhead included), and, where the call can be captured, of a CUDA graph holding
several calls ("graph": launch overhead removed). Every case runs in its own try/except: an error is recorded
in the results and the run goes on. Rows are appended to ``DIR/rows.jsonl`` as they finish, so a run cut
short by a timeout keeps them; ``--report-only`` rebuilds ``DIR/gpu-bench.json`` and ``DIR/gpu-bench.md``
from them.

``--dry-run`` builds the plan, checks what each case needs (without a GPU and without timing) and writes
``DIR/plan.json``. ``--device cpu`` runs the cases on the CPU with wall-clock timing, only to test this
script.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/gpu.py` puts bench/, not the repository root, on the path
    sys.path.insert(0, str(ROOT))

import symkernels  # noqa: E402
from bench.workloads import REGIMES, STACKS  # noqa: E402
from symkernels.functional import prepend_identity  # noqa: E402
from symkernels.reference import (  # noqa: E402
    authors_representation_stack,
    expand_kernel_reference,
    representation_stack_reference,
    sinkhorn_early_exit,
    sinkhorn_reference,
)

SECTIONS = ("bandwidth", "sinkhorn", "compiled", "expansion", "profile")
N_ITER = 20
MODEL_STACKS = ("mnist-wscnn", "cifar-wsresnet")
BATCHES = {"batch-1024x64x64": (1024, 64, 64), "batch-64x256x256": (64, 256, 256)}
SINKHORN_WORKLOADS = (*MODEL_STACKS, *BATCHES)
MODES = ("fwd", "fwd+bwd")
# (C_out, C_in, G, G_in, k) of the paper's layers.
EXPANSION_SHAPES = {
    "mnist-lift": (32, 1, 4, 1, 5),
    "mnist-gconv": (32, 32, 4, 4, 5),
    "cifar-lift": (32, 3, 4, 1, 7),
    "cifar-gconv-32x32": (32, 32, 4, 4, 7),
    "cifar-gconv-64x32": (64, 32, 4, 4, 7),
    "cifar-gconv-64x64": (64, 64, 4, 4, 7),
}
EXPANSION_DTYPES = ("float32", "bfloat16")
# Providers that are ours (fast paths) and the baselines the goals compare them with.
GROUPED = "grouped"
AUTHORS = "authors-loop"
REFERENCE = "reference"
COMPILED = "reference-compiled"
GOAL_AUTHORS_SPEEDUP = 100.0
GOAL_COMPILED_SPEEDUP = 10.0
GOAL_BANDWIDTH_FRACTION = 0.70
BANDWIDTH_WORKLOAD = "batch-1024x64x64"

Closure = Callable[[], object]


@dataclass
class Case:
    """One benchmark row: ``make(device)`` builds the inputs and returns the closure to time."""

    id: str
    section: str
    kind: str  # sinkhorn | expansion | bandwidth | profile
    provider: str
    mode: str
    workload: str
    make: Callable[[torch.device], Closure] = field(repr=False)
    regime: str | None = None
    dtype: str = "float32"
    graph: bool = True  # also time a CUDA graph of the closure (False: it syncs with the host)
    requires: Callable[[torch.device], str | None] = field(default=lambda device: None, repr=False)
    bytes_moved: int | None = None  # minimum bytes read + written by one call, for achieved bandwidth

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "section": self.section,
            "kind": self.kind,
            "provider": self.provider,
            "mode": self.mode,
            "workload": self.workload,
            "regime": self.regime,
            "dtype": self.dtype,
            "graph": self.graph,
            "bytes_moved": self.bytes_moved,
        }


# ---------------------------------------------------------------------------------------------------------
# Inputs


def make_logits(shape: Sequence[int], regime: str, seed: int) -> torch.Tensor:
    """CPU float32 logits: ``init`` = U[0, 1) (the paper's init), ``sharp`` = N(0, 3²) (as training makes)."""
    generator = torch.Generator().manual_seed(seed)
    if regime == "init":
        return torch.rand(tuple(shape), generator=generator)
    return 3.0 * torch.randn(tuple(shape), generator=generator)


def workload_shapes(workload: str) -> list[tuple[int, int, int]]:
    if workload in STACKS:
        return list(STACKS[workload])
    return [BATCHES[workload]]


def _inputs(workload: str, regime: str, device: torch.device, grad: bool) -> list[torch.Tensor]:
    return [
        make_logits(shape, regime, seed).to(device).requires_grad_(grad)
        for seed, shape in enumerate(workload_shapes(workload))
    ]


def _output_grads(outputs: Sequence[torch.Tensor], seed: int = 99) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=generator).to(o) for o in outputs]


# ---------------------------------------------------------------------------------------------------------
# Providers


def _backend_reason(name: str, device: torch.device, op: str) -> str | None:
    """Why backend ``name`` cannot run ``op`` on float32 tensors of ``device`` (``None``: it can)."""
    try:
        symkernels.backends.resolve(name, device, torch.float32, op)
    except (RuntimeError, ValueError) as error:  # cannot serve / unknown name
        return str(error)
    return None


def gpu_backends() -> list[str]:
    """The backends other than the reference and the CPU kernels: the fast GPU paths."""
    return [name for name in symkernels.backends.BACKENDS if name not in ("reference", "cpu")]


# The grouped call: every layer's stack in one launch, through the backend's grouped kernel.
GROUPED_OP = "grouped_sinkhorn"
GROUPED_BACKEND = "triton"


def _grouped_stacks(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every layer's representation stack from one grouped call (the identity prepended to its output)."""
    stacks = symkernels.grouped_sinkhorn(xs, N_ITER, backend=GROUPED_BACKEND, check_finite=False)
    return [prepend_identity(s) for s in stacks]


def _stack_fn(provider: str, model_stack: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """One layer's (or one batch's) Sinkhorn for ``provider``."""
    if provider == AUTHORS:
        if model_stack:
            return lambda x: authors_representation_stack(x, N_ITER)
        return lambda x: sinkhorn_early_exit(x, N_ITER)
    if provider == COMPILED:
        # Every (shape, grad) variant is its own graph: keep them all instead of falling back to eager.
        for name in ("cache_size_limit", "recompile_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
        if model_stack:

            def stack(x: torch.Tensor) -> torch.Tensor:
                return representation_stack_reference(x, N_ITER)

            return torch.compile(stack, fullgraph=True, dynamic=False)

        def batch(x: torch.Tensor) -> torch.Tensor:
            return sinkhorn_reference(x, N_ITER)

        return torch.compile(batch, fullgraph=True, dynamic=False)
    if provider == REFERENCE:
        if model_stack:
            return lambda x: representation_stack_reference(x, N_ITER)
        return lambda x: sinkhorn_reference(x, N_ITER)
    if model_stack:
        return lambda x: symkernels.representation_stack(x, N_ITER, backend=provider, check_finite=False)
    return lambda x: symkernels.sinkhorn(x, N_ITER, backend=provider, check_finite=False)


def _sinkhorn_make(provider: str, workload: str, mode: str, regime: str) -> Callable[[torch.device], Closure]:
    model_stack = workload in STACKS

    def make(device: torch.device) -> Closure:
        backward = mode == "fwd+bwd"
        xs = _inputs(workload, regime, device, backward)
        if provider == GROUPED:

            def forward() -> list[torch.Tensor]:
                return _grouped_stacks(xs)

        else:
            one = _stack_fn(provider, model_stack)

            def forward() -> list[torch.Tensor]:
                return [one(x) for x in xs]

        if not backward:
            return forward
        with torch.no_grad():
            grads = _output_grads(forward())

        def forward_backward() -> tuple[torch.Tensor, ...]:
            return torch.autograd.grad(forward(), xs, grads)

        return forward_backward

    return make


def _sinkhorn_requires(provider: str, model_stack: bool) -> Callable[[torch.device], str | None]:
    def requires(device: torch.device) -> str | None:
        if provider in (REFERENCE, AUTHORS):
            return None
        if provider == COMPILED:
            return None if hasattr(torch, "compile") else "this torch has no torch.compile"
        if provider == GROUPED:
            return _backend_reason(GROUPED_BACKEND, device, GROUPED_OP)
        return _backend_reason(provider, device, "representation_stack" if model_stack else "sinkhorn")

    return requires


def _sinkhorn_bytes(workload: str) -> int:
    # Minimum traffic of a float32 forward: read the logits and write P once.
    return sum(2 * 4 * math.prod(shape) for shape in workload_shapes(workload))


def sinkhorn_cases(section: str) -> list[Case]:
    if section == "compiled":
        providers = [COMPILED]
    else:
        providers = [*gpu_backends(), GROUPED, REFERENCE, AUTHORS]
        if "triton" not in providers:
            providers.insert(0, "triton")  # listed even when not registered, so the report says why
    cases = []
    # The goal rows (model stacks, forward + backward) first, then the other model-stack rows, then the
    # batches: a run cut short by its time budget still has the rows that matter most.
    order = [
        (workload, mode)
        for stacks_first in (True, False)
        for mode in reversed(MODES)
        for workload in SINKHORN_WORKLOADS
        if (workload in STACKS) == stacks_first
    ]
    for workload, mode in order:
        for regime in REGIMES:
            for provider in providers:
                if provider == GROUPED and workload not in STACKS:
                    continue
                cases.append(
                    Case(
                        id=f"sinkhorn/{provider}/{mode}/{workload}/{regime}",
                        section=section,
                        kind="sinkhorn",
                        provider=provider,
                        mode=mode,
                        workload=workload,
                        regime=regime,
                        make=_sinkhorn_make(provider, workload, mode, regime),
                        graph=provider != AUTHORS,  # its early exit reads the device from the host
                        requires=_sinkhorn_requires(provider, workload in STACKS),
                        bytes_moved=_sinkhorn_bytes(workload) if mode == "fwd" else None,
                    )
                )
    return cases


def _expansion_make(provider: str, shape: tuple[int, ...], mode: str, dtype: str):
    out_channels, in_channels, groups, in_groups, k = shape

    def make(device: torch.device) -> Closure:
        d = in_groups * k * k
        generator = torch.Generator().manual_seed(0)
        reps = torch.rand(groups, d, d, generator=generator)
        reps = (reps / reps.sum(-1, keepdim=True)).to(device=device, dtype=getattr(torch, dtype))
        weight = torch.randn(out_channels, in_channels, d, generator=generator)
        weight = weight.to(device=device, dtype=getattr(torch, dtype))
        backward = mode == "fwd+bwd"
        reps.requires_grad_(backward)
        weight.requires_grad_(backward)
        if provider == "triton":

            def forward() -> torch.Tensor:
                return symkernels.expand_kernel(reps, weight, k, backend="triton")

        else:

            def forward() -> torch.Tensor:
                return expand_kernel_reference(reps, weight, k)

        if not backward:
            return forward
        with torch.no_grad():
            grad = _output_grads([forward()])[0]
        return lambda: torch.autograd.grad(forward(), (reps, weight), grad)

    return make


def _expansion_requires(provider: str) -> Callable[[torch.device], str | None]:
    def requires(device: torch.device) -> str | None:
        if provider == REFERENCE:
            return None
        return _backend_reason("triton", device, "expand_kernel")

    return requires


def expansion_cases() -> list[Case]:
    cases = []
    for name, shape in EXPANSION_SHAPES.items():
        out_channels, in_channels, groups, in_groups, k = shape
        d = in_groups * k * k
        for mode in MODES:
            for dtype in EXPANSION_DTYPES:
                size = 2 if dtype == "bfloat16" else 4
                moved = size * (groups * d * d + out_channels * in_channels * d * (1 + groups))
                for provider in ("triton", REFERENCE):
                    cases.append(
                        Case(
                            id=f"expansion/{provider}/{mode}/{name}/{dtype}",
                            section="expansion",
                            kind="expansion",
                            provider=provider,
                            mode=mode,
                            workload=name,
                            dtype=dtype,
                            make=_expansion_make(provider, shape, mode, dtype),
                            requires=_expansion_requires(provider),
                            bytes_moved=moved if mode == "fwd" else None,
                        )
                    )
    return cases


def copy_bytes(device: torch.device) -> int:
    """Buffer size of the copy-bandwidth case: large enough to defeat the L2 cache on the GPU."""
    return 512 * 2**20 if device.type == "cuda" else 8 * 2**20


def _copy_make(device: torch.device) -> Closure:
    numel = copy_bytes(device) // 4
    src = torch.rand(numel, generator=torch.Generator().manual_seed(0)).to(device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def bandwidth_cases() -> list[Case]:
    return [
        Case(
            id="bandwidth/torch/copy/device-to-device/float32",
            section="bandwidth",
            kind="bandwidth",
            provider="torch",
            mode="copy",
            workload="device-to-device",
            make=_copy_make,
            graph=False,
            bytes_moved=None,  # set at run time from the buffer size: read + write
        )
    ]


def _profile_case(provider: str, mode: str, workload: str) -> Case:
    return Case(
        id=f"profile/{provider}/{mode}/{workload}",
        section="profile",
        kind="profile",
        provider=provider,
        mode=mode,
        workload=workload,
        make=_no_make,
        graph=False,
        requires=_profile_requires(provider),
    )


def profile_cases() -> list[Case]:
    """Training steps: the reference WSCNN (the baseline), the plain CNN, the triton WSCNN per layer and with
    every stack precomputed by one grouped call; and each model's Sinkhorn alone, forward + backward."""
    cases = []
    for model, plain in (("wscnn", "cnn"), ("wsresnet", "resnet")):
        cases.append(_profile_case(REFERENCE, "train-step", model))
        cases.append(_profile_case("plain", "train-step", plain))
        cases.append(_profile_case("triton", "train-step", model))
        cases.append(_profile_case(GROUPED, "train-step", model))
        cases.append(_profile_case(REFERENCE, "sinkhorn-fwd+bwd", model))
        cases.append(_profile_case("triton", "sinkhorn-fwd+bwd", model))
    return cases


def _no_make(device: torch.device) -> Closure:  # profile cases are run by run_profile
    raise NotImplementedError


def _precompute() -> Callable[..., Any] | None:
    try:
        from symkernels.nn.grouped import precompute_representations
    except ImportError:
        return None
    return precompute_representations


def _profile_requires(provider: str) -> Callable[[torch.device], str | None]:
    def requires(device: torch.device) -> str | None:
        if provider in (REFERENCE, "plain"):
            return None
        if provider == GROUPED:
            if _precompute() is None:
                return "symkernels.nn.grouped.precompute_representations is not available"
            return _backend_reason(GROUPED_BACKEND, device, GROUPED_OP)
        return _backend_reason(provider, device, "representation_stack")

    return requires


def build_plan(sections: Sequence[str] = SECTIONS, only: str | None = None) -> list[Case]:
    """Every case of ``sections`` (in order), filtered by the regular expression ``only`` on the ids."""
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown sections {unknown}; expected some of {list(SECTIONS)}")
    builders = {
        "bandwidth": bandwidth_cases,
        "sinkhorn": lambda: sinkhorn_cases("sinkhorn"),
        "compiled": lambda: sinkhorn_cases("compiled"),
        "expansion": expansion_cases,
        "profile": profile_cases,
    }
    cases = [case for section in sections for case in builders[section]()]
    if only:
        pattern = re.compile(only)
        cases = [case for case in cases if pattern.search(case.id)]
    return cases


# ---------------------------------------------------------------------------------------------------------
# Timing


class Timer:
    """Device-event timing on CUDA; wall clock on the CPU (only for testing this script)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def elapsed_s(self, fn: Closure, calls: int) -> float:
        """Seconds for ``calls`` back-to-back calls, from an idle device."""
        self.sync()
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        begin = time.perf_counter()
        for _ in range(calls):
            fn()
        return time.perf_counter() - begin

    def per_call(self, fn: Closure, *, rounds: int, round_s: float, max_calls: int = 2000) -> dict[str, Any]:
        """Median (and 20th/80th percentiles) of the per-call time over ``rounds`` rounds of ~``round_s``."""
        for _ in range(2):  # warm-up: compilation, autotuning, allocator
            fn()
        estimate = self.elapsed_s(fn, 1)
        calls = max(1, min(max_calls, int(round_s / max(estimate, 1e-7))))
        samples = sorted(self.elapsed_s(fn, calls) / calls for _ in range(rounds))
        return {
            "median_ms": statistics.median(samples) * 1e3,
            "p20_ms": samples[int(0.2 * (len(samples) - 1))] * 1e3,
            "p80_ms": samples[int(math.ceil(0.8 * (len(samples) - 1)))] * 1e3,
            "calls_per_round": calls,
            "rounds": rounds,
        }

    def graph_per_call(self, fn: Closure, *, rounds: int, calls: int = 10) -> dict[str, Any]:
        """Per-call time of a CUDA graph holding ``calls`` calls of ``fn`` (launch overhead removed)."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm-up on a side stream, as graph capture requires
            for _ in range(3):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        graph.replay()
        samples = sorted(self.elapsed_s(graph.replay, 1) / calls for _ in range(rounds))
        return {"median_ms": statistics.median(samples) * 1e3, "calls_per_graph": calls, "rounds": rounds}

    def peak_bytes(self, fn: Closure) -> int | None:
        if self.device.type != "cuda":
            return None
        self.sync()
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        fn()
        self.sync()
        return torch.cuda.max_memory_allocated(self.device) - base


def _error_record(error: BaseException) -> dict[str, str]:
    return {
        "type": type(error).__name__,
        "message": str(error)[:2000],
        "traceback": traceback.format_exc()[-4000:],
    }


def run_case(
    case: Case, device: torch.device, timer: Timer, *, rounds: int, round_s: float
) -> dict[str, Any]:
    """Time one case; never raises: failures are recorded in the row."""
    row = case.describe()
    row["device"] = str(device)
    reason = _safe_requires(case, device)
    if reason is not None:
        row["status"] = "skipped"
        row["reason"] = reason
        return row
    try:
        started = time.perf_counter()
        fn = case.make(device)
        fn()  # first call: compilation (torch.compile, Triton JIT) happens here
        timer.sync()
        row["first_call_s"] = time.perf_counter() - started
        row["eager"] = timer.per_call(fn, rounds=rounds, round_s=round_s)
        row["peak_bytes"] = timer.peak_bytes(fn)
        if case.kind == "bandwidth":
            row["bytes_moved"] = 2 * copy_bytes(device)
            row["bandwidth_gbps"] = row["bytes_moved"] / (row["eager"]["median_ms"] * 1e-3) / 1e9
        row["status"] = "ok"
    except Exception as error:
        row["status"] = "error"
        row["error"] = _error_record(error)
        return row
    if case.graph and device.type == "cuda":
        try:
            row["graph"] = timer.graph_per_call(fn, rounds=rounds)
        except Exception as error:  # not capturable: keep the eager timing
            row["graph_error"] = _error_record(error)
            _reset_after_capture_failure(device)
    best = best_ms(row)
    if case.bytes_moved and best is not None:
        row["achieved_gbps"] = case.bytes_moved / (best * 1e-3) / 1e9
    return row


def _safe_requires(case: Case, device: torch.device) -> str | None:
    try:
        return case.requires(device)
    except Exception as error:
        return f"checking requirements failed: {type(error).__name__}: {error}"


def _reset_after_capture_failure(device: torch.device) -> None:
    try:
        torch.cuda.synchronize(device)
    except Exception:
        pass


def best_ms(row: dict[str, Any]) -> float | None:
    """The lowest per-call time measured for a row (graph replay when captured, else eager)."""
    times = [row[key]["median_ms"] for key in ("eager", "graph") if isinstance(row.get(key), dict)]
    return min(times) if times else None


# ---------------------------------------------------------------------------------------------------------
# Profile of a training step


def _profile_model(workload: str, device: torch.device) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    from symkernels import models

    generator = torch.Generator().manual_seed(0)
    if workload in ("wscnn", "cnn"):
        model = models.WSCNN() if workload == "wscnn" else models.CNN()
        x = torch.randn(64, 1, 28, 28, generator=generator)
    else:
        model = models.WSResNet() if workload == "wsresnet" else models.ResNet(hidden_channels=64)
        x = torch.randn(128, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 10, (x.shape[0],), generator=generator)
    return model.to(device), x.to(device), labels.to(device)


def _train_step_fn(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, grouped: bool) -> Closure:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    regularizers = getattr(model, "regularizers", None)
    precompute = _precompute() if grouped else None

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        # With `grouped`, every stack comes from one grouped Sinkhorn call, reused by layers and regularisers.
        with precompute(model) if precompute is not None else contextlib.nullcontext():
            loss = torch.nn.functional.cross_entropy(model(x), labels)
            if regularizers is not None:
                loss = loss + 0.1 * regularizers()[0]  # λ_norm = 0.1, as released
        loss.backward()
        optimizer.step()

    return step


def _sinkhorn_only_fn(model: torch.nn.Module) -> Closure:
    from symkernels.models import weight_sharing_layers

    layers = [layer for _, layer in weight_sharing_layers(model)]
    logits = [layer.reps.logits for layer in layers]

    def sinkhorn_step() -> None:
        stacks = [layer.representations() for layer in layers]
        torch.autograd.grad([s.sum() for s in stacks], logits)

    return sinkhorn_step


CONV_KERNEL = re.compile(
    r"conv|fprop|dgrad|wgrad|implicit|winograd|cudnn|nchwToNhwc|nhwcToNchw", re.IGNORECASE
)


def _kernel_summary(prof: Any) -> dict[str, Any]:
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


def run_profile(case: Case, device: torch.device, timer: Timer) -> dict[str, Any]:
    row = case.describe()
    row["device"] = str(device)
    reason = _safe_requires(case, device)
    if reason is not None:
        row.update(status="skipped", reason=reason)
        return row
    try:
        from torch.profiler import ProfilerActivity, profile

        model, x, labels = _profile_model(case.workload, device)
        if case.mode == "train-step":
            fn = _train_step_fn(model, x, labels, grouped=case.provider == GROUPED)
        else:
            fn = _sinkhorn_only_fn(model)
        backend = {GROUPED: GROUPED_BACKEND, "plain": None}.get(case.provider, case.provider)
        choice = symkernels.use_backend(backend) if backend is not None else contextlib.nullcontext()
        with choice:
            for _ in range(3):
                fn()
            timer.sync()
            row["eager"] = timer.per_call(fn, rounds=5, round_s=0.05, max_calls=20)
            activities = [ProfilerActivity.CPU]
            if device.type == "cuda":
                activities.append(ProfilerActivity.CUDA)
            with profile(activities=activities) as prof:
                fn()
                timer.sync()
        row["profile"] = _kernel_summary(prof)
        row["status"] = "ok"
    except Exception as error:
        row.update(status="error", error=_error_record(error))
    return row


# ---------------------------------------------------------------------------------------------------------
# Environment, goals and the report


def commit() -> str:
    if os.environ.get("SYMKERNELS_COMMIT"):
        return os.environ["SYMKERNELS_COMMIT"]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: torch.device) -> dict[str, Any]:
    try:
        import triton

        triton_version = triton.__version__
    except Exception as error:
        triton_version = f"unavailable ({type(error).__name__})"
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "symkernels": symkernels.__version__,
        "commit": commit(),
        "backends": {name: s.usable for name, s in symkernels.backend_status().items()},
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            device_name=props.name,
            capability=f"{props.major}.{props.minor}",
            sm_count=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
            cudnn=torch.backends.cudnn.version(),
        )
    else:
        env["device_name"] = f"CPU ({platform.processor() or platform.machine()})"
    return env


def _rows_by_id(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The last row recorded for each id (a rerun replaces an earlier result)."""
    return {row["id"]: row for row in rows}


def _eager_ms(row: dict[str, Any] | None) -> float | None:
    if row is None or row.get("status") != "ok":
        return None
    return row["eager"]["median_ms"]


def evaluate_goals(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's goals, each ``met`` / ``not met`` / ``unknown`` with the numbers behind it.

    Speed-ups compare eager per-call times (what a training step pays) of our fastest provider (a GPU
    backend or the grouped call) with the authors' loop and the compiled reference, per model stack and
    logit regime, forward + backward. Bandwidth: the 1024×64×64 forward's minimum bytes over its best time
    (CUDA graph when captured), as a fraction of the measured copy bandwidth.
    """
    by_id = _rows_by_id(rows)
    ours = {row["provider"] for row in rows if row.get("kind") == "sinkhorn"} - {REFERENCE, AUTHORS, COMPILED}
    goals = []
    for workload in MODEL_STACKS:
        for regime in REGIMES:
            mine = {
                p: _eager_ms(by_id.get(f"sinkhorn/{p}/fwd+bwd/{workload}/{regime}")) for p in sorted(ours)
            }
            mine = {p: t for p, t in mine.items() if t is not None}
            best = min(mine.items(), key=lambda item: item[1]) if mine else None
            for baseline, target in ((AUTHORS, GOAL_AUTHORS_SPEEDUP), (COMPILED, GOAL_COMPILED_SPEEDUP)):
                base = _eager_ms(by_id.get(f"sinkhorn/{baseline}/fwd+bwd/{workload}/{regime}"))
                goal = {
                    "goal": f"{workload} fwd+bwd ({regime} logits) >= {target:g}x faster than {baseline}",
                    "target": target,
                    "baseline_ms": base,
                    "ours_ms": best[1] if best else None,
                    "ours_provider": best[0] if best else None,
                }
                if best is None or base is None:
                    goal.update(status="unknown", speedup=None)
                else:
                    speedup = base / best[1]
                    goal.update(status="met" if speedup >= target else "not met", speedup=speedup)
                goals.append(goal)
    copy = by_id.get("bandwidth/torch/copy/device-to-device/float32")
    copy_gbps = copy.get("bandwidth_gbps") if copy and copy.get("status") == "ok" else None
    achieved = {}
    for row in rows:
        if (
            row.get("kind") == "sinkhorn"
            and row.get("workload") == BANDWIDTH_WORKLOAD
            and row.get("mode") == "fwd"
            and row.get("provider") in ours
            and row.get("achieved_gbps")
        ):
            achieved[f"{row['provider']}/{row['regime']}"] = row["achieved_gbps"]
    best_gbps = max(achieved.values()) if achieved else None
    goal = {
        "goal": f"{BANDWIDTH_WORKLOAD} forward >= {GOAL_BANDWIDTH_FRACTION:.0%} of copy bandwidth",
        "target": GOAL_BANDWIDTH_FRACTION,
        "copy_gbps": copy_gbps,
        "achieved_gbps": achieved,
    }
    if copy_gbps is None or best_gbps is None:
        goal.update(status="unknown", fraction=None)
    else:
        fraction = best_gbps / copy_gbps
        goal.update(status="met" if fraction >= GOAL_BANDWIDTH_FRACTION else "not met", fraction=fraction)
    goals.append(goal)
    return goals


def _ms(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "–"
    if row.get("status") == "skipped":
        return "skip"
    if row.get("status") != "ok":
        return "error"
    text = _ms(row["eager"]["median_ms"])
    if isinstance(row.get("graph"), dict):
        text += f" ({_ms(row['graph']['median_ms'])})"
    return text


def _table(rows: Sequence[dict[str, Any]], kind: str, keys: Sequence[str]) -> list[str]:
    selected = [row for row in rows if row.get("kind") == kind]
    providers = list(dict.fromkeys(row["provider"] for row in selected))
    groups: dict[tuple, dict[str, dict[str, Any]]] = {}
    for row in selected:
        groups.setdefault(tuple(row.get(k) for k in keys), {})[row["provider"]] = row
    lines = [
        "| " + " | ".join([*keys, *providers]) + " |",
        "|" + "---|" * (len(keys) + len(providers)),
    ]
    for key, by_provider in groups.items():
        cells = [str(k) for k in key] + [_cell(by_provider.get(p)) for p in providers]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(env: dict[str, Any], rows: Sequence[dict[str, Any]], goals: Sequence[dict[str, Any]]) -> str:
    lines = [
        "# GPU benchmark",
        "",
        f"{env.get('device_name', env.get('device'))} (capability {env.get('capability', '–')}), "
        f"torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}, "
        f"Python {env.get('python')}, commit {str(env.get('commit'))[:16]}, {env.get('date')}. "
        f"Reproduce: `{env.get('command', 'python bench/gpu.py --out DIR')}`.",
        "",
        "Times are per call in ms: median of rounds of back-to-back calls between CUDA events after a "
        "warm-up (eager, launch overhead included); in parentheses, one call inside a replayed CUDA graph. "
        "Sinkhorn: T = 20, float32; model stacks run one call per layer. "
        "Logits `init` = U[0, 1) (the authors' loop exits after 2-3 iterations), `sharp` = N(0, 3²).",
        "",
        "## Goals",
        "",
        "| goal | status | numbers |",
        "|---|---|---|",
    ]
    for goal in goals:
        if "speedup" in goal:
            numbers = (
                f"baseline {_ms(goal['baseline_ms'])} ms, ours ({goal['ours_provider'] or '–'}) "
                f"{_ms(goal['ours_ms'])} ms, speed-up "
                + ("–" if goal["speedup"] is None else f"{goal['speedup']:.1f}×")
            )
        else:
            achieved = ", ".join(f"{k}: {v:.0f} GB/s" for k, v in goal["achieved_gbps"].items()) or "–"
            copy = "–" if goal["copy_gbps"] is None else f"{goal['copy_gbps']:.0f} GB/s"
            fraction = "–" if goal["fraction"] is None else f"{goal['fraction']:.0%}"
            numbers = f"copy {copy}; achieved {achieved}; best fraction {fraction}"
        lines.append(f"| {goal['goal']} | **{goal['status']}** | {numbers} |")
    lines += ["", "## Sinkhorn", ""] + _table(rows, "sinkhorn", ("workload", "mode", "regime"))
    compiled = [r for r in rows if r.get("provider") == COMPILED and r.get("first_call_s") is not None]
    if compiled:
        lines += ["", "torch.compile time of the first call (s): "]
        lines.append(
            ", ".join(f"{r['workload']} {r['mode']} {r['regime']}: {r['first_call_s']:.1f}" for r in compiled)
        )
    lines += ["", "## Kernel expansion", ""] + _table(rows, "expansion", ("workload", "mode", "dtype"))
    copy = [r for r in rows if r.get("kind") == "bandwidth" and r.get("status") == "ok"]
    if copy:
        lines += ["", f"Device-to-device copy: {copy[-1]['bandwidth_gbps']:.0f} GB/s (read + write bytes)."]
    profiles = [r for r in rows if r.get("kind") == "profile"]
    if profiles:
        lines += [
            "",
            "## Profile of one training step",
            "",
            "Conv time counts kernels whose names look like convolutions (cuDNN/implicit GEMM); the "
            "`sinkhorn-fwd+bwd` rows run only the model's stacks and their backward.",
            "",
            "| model | provider | what | step (ms) | kernel launches | device time (ms) | conv kernels | "
            "conv time (ms) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in profiles:
            if row.get("status") != "ok":
                reason = row.get("reason") or row.get("error", {}).get("message", "")
                lines.append(
                    f"| {row['workload']} | {row['provider']} | {row['mode']} | {row['status']}: "
                    f"{reason[:80]} | | | | |"
                )
                continue
            p = row["profile"]
            lines.append(
                f"| {row['workload']} | {row['provider']} | {row['mode']} | "
                f"{_ms(row['eager']['median_ms'])} | "
                f"{p['kernel_launches']} | {_ms(p['device_time_ms'])} | {p['conv_kernel_launches']} | "
                f"{_ms(p['conv_device_time_ms'])} |"
            )
    problems = [r for r in rows if r.get("status") in ("error", "skipped") or r.get("graph_error")]
    if problems:
        lines += ["", "## Skipped and failed rows", ""]
        for row in problems:
            if row.get("status") == "skipped":
                lines.append(f"- `{row['id']}`: skipped: {row.get('reason')}")
            elif row.get("status") == "error":
                error = row.get("error") or {}
                lines.append(f"- `{row['id']}`: {error.get('type')}: {str(error.get('message'))[:200]}")
            else:
                lines.append(
                    f"- `{row['id']}`: no CUDA graph: {row['graph_error']['type']}: "
                    f"{row['graph_error']['message'][:160]}"
                )
    return "\n".join(lines) + "\n"


def read_rows(out: Path) -> list[dict[str, Any]]:
    path = out / "rows.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill mid-write
                continue
    return rows


def write_report(out: Path, env: dict[str, Any]) -> dict[str, Any]:
    rows = list(_rows_by_id(read_rows(out)).values())
    goals = evaluate_goals(rows)
    result = {"environment": env, "goals": goals, "rows": rows}
    (out / "gpu-bench.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "gpu-bench.md").write_text(markdown(env, rows, goals))
    return result


# ---------------------------------------------------------------------------------------------------------
# Command line


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (created)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated sections to run")
    parser.add_argument("--only", default=None, help="regular expression selecting case ids")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (to test this script)")
    parser.add_argument("--budget-s", type=float, default=None, help="start no new case after this many s")
    parser.add_argument("--rounds", type=int, default=9, help="timing rounds per case")
    parser.add_argument("--round-s", type=float, default=0.02, help="target seconds per timing round")
    parser.add_argument("--dry-run", action="store_true", help="check the plan; time nothing")
    parser.add_argument("--report-only", action="store_true", help="rebuild the report from DIR/rows.jsonl")
    return parser.parse_args(argv)


def dry_run(cases: Sequence[Case], out: Path, device: torch.device) -> dict[str, Any]:
    """The plan with what each case would do on ``device``: nothing is built, launched or timed."""
    plan = []
    for case in cases:
        entry = case.describe()
        reason = _safe_requires(case, device)
        entry["would_run"] = reason is None
        entry["reason"] = reason
        plan.append(entry)
    result = {
        "device": str(device),
        "sections": list(dict.fromkeys(case.section for case in cases)),
        "cases": plan,
        "grouped_api": f"symkernels.grouped_sinkhorn(backend={GROUPED_BACKEND!r})",
        "gpu_backends": gpu_backends(),
    }
    (out / "plan.json").write_text(json.dumps(result, indent=1))
    return result


def run_cases(cases: Sequence[Case], device: torch.device, args: argparse.Namespace) -> None:
    """Run ``cases`` in order, appending each finished row to ``DIR/rows.jsonl``."""
    timer = Timer(device)
    started = time.perf_counter()
    with (args.out / "rows.jsonl").open("a") as sink:
        for case in cases:
            if args.budget_s is not None and time.perf_counter() - started > args.budget_s:
                row = case.describe() | {
                    "status": "skipped",
                    "reason": f"time budget {args.budget_s} s spent",
                }
            elif case.kind == "profile":
                row = run_profile(case, device, timer)
            else:
                row = run_case(case, device, timer, rounds=args.rounds, round_s=args.round_s)
            sink.write(json.dumps(row, default=str) + "\n")
            sink.flush()
            shown = _cell(row) if row["kind"] != "profile" else row["status"]
            print(f"{row['id']}: {shown}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    cases = build_plan(sections, args.only)
    device = torch.device(args.device)
    if args.dry_run:
        # Checked against the device the real run will use, without touching it.
        result = dry_run(cases, args.out, device)
        runnable = sum(entry["would_run"] for entry in result["cases"])
        print(f"plan: {len(cases)} cases in {result['sections']}, {runnable} runnable here; wrote {args.out}")
        return 0
    saved_env = args.out / "environment.json"
    if args.report_only:
        # The environment of the run that measured the rows, when there was one.
        env = json.loads(saved_env.read_text()) if saved_env.exists() else environment(torch.device("cpu"))
    else:
        if device.type == "cuda" and not torch.cuda.is_available():
            print("bench/gpu.py: no CUDA device visible; use --dry-run or --device cpu", file=sys.stderr)
            return 2
        env = environment(device)
        env["command"] = "python bench/gpu.py " + " ".join(sys.argv[1:] if argv is None else argv)
        saved_env.write_text(json.dumps(env, indent=1))
        threads = torch.get_num_threads()
        if device.type == "cpu":
            torch.set_num_threads(1)  # the CPU mode only tests this script; one thread avoids contention
        try:
            run_cases(cases, device, args)
        finally:
            torch.set_num_threads(threads)
    result = write_report(args.out, env)
    for goal in result["goals"]:
        print(f"goal: {goal['goal']}: {goal['status']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
