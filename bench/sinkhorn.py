"""Sinkhorn, τ = 1: every implementation against the peers a user would pick instead.

    python bench/sinkhorn.py [--quick] [--threads 1 2] [--only REGEX] [--device cpu|cuda] [--out FILE]

Workloads (``bench/workloads.py``), T = 20: the stacks of the paper's MNIST WSCNN (3×25×25 + 4 × 3×100×100)
and CIFAR WS-ResNet (3×49×49 + 4 × 3×196×196), run as the models do without grouping (one call per layer),
and batches of 1024×16×16, 1024×64×64 and 64×256×256; logits at the paper's init U[0, 1) and sharp N(0, 3²);
forward, and forward + backward with a fixed random output gradient.

Tiny workloads (``hc-BxNxN-TT``, the hyper-connection shape: one n×n matrix per token): B = 32,768 and 262,144
matrices of 4×4 and 8×8, T = 10 and 20, logits N(0, 1). Their providers: every native backend through
``symkernels.sinkhorn`` and through the op ``torch.ops.symkernels.sinkhorn`` (``-op``, without the public
function's Python), on the CPU the native library's forward and backward called directly (``cpu-kernel``), the
eager and compiled reference and POT; and ``copy-floor``, a copy moving as many bytes as the memory-traffic
floor of the row (:func:`floor_bytes`), the time a kernel bound by memory alone would take.

Providers: the eager reference (``sinkhorn_reference``) and its ``torch.compile``d version (section
``compiled``, compile time in ``first_call_s``; on the CPU only for the model stacks and 1024×16×16), the
authors' loop (early exit on ``allclose``, a host sync per iteration), every native backend that serves the
device through ``symkernels.sinkhorn`` (``check_finite=False``: the finiteness test is a separate pass, and a
host sync on a GPU; ``bench/overhead.py`` measures it), the grouped call (every layer's stack in one call),
the authors' stopping rule decided in the kernel (``tol=AUTHORS_TOLERANCE, stop="stack"``), and POT's batched
solvers on torch tensors (``ot.batch``: ``solve_batch(method="sinkhorn")`` and the Bregman projections in the
scaling and the log domain, 20 iterations, tolerance 0, uniform marginals of ones), which are checked to give
the same P and gradients as ``symkernels.sinkhorn`` in float64 before they are timed.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path

import torch

if __name__ == "__main__":  # `python bench/sinkhorn.py` puts bench/, not the repository root, on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import symkernels
from bench.environment import backend_reason, native_backends
from bench.harness import Case, Closure
from bench.workloads import (
    MODEL_STACKS,
    REGIMES,
    SINKHORN_WORKLOADS,
    TINY_REGIME,
    TINY_WORKLOADS,
    make_logits,
    tiny_workload,
)
from symkernels.reference import sinkhorn_early_exit, sinkhorn_reference

OP = "sinkhorn"
N_ITER, TAU = 20, 1.0
MODES = ("fwd", "fwd+bwd")
QUICK_WORKLOADS = ("mnist-wscnn", "batch-1024x16x16")
COMPILED_CPU_WORKLOADS = ("mnist-wscnn", "cifar-wsresnet", "batch-1024x16x16")
REFERENCE, COMPILED, AUTHORS = "reference", "reference-compiled", "authors-loop"
POT_PROVIDERS = ("pot-solve", "pot-scaling", "pot-log")
COPY = "copy-floor"
# The tiny group in --quick: the hyper-connection workload's most common call, 32,768 4×4 at T = 20, fwd+bwd.
QUICK_TINY = (tiny_workload(32768, 4, 20), "fwd+bwd")
# On the CPU inductor compiles each shape for minutes: the compiled reference runs the smaller batch only.
COMPILED_CPU_TINY = tuple(name for name, ((batch, _, _), _) in TINY_WORKLOADS.items() if batch == 32768)
POT_HINT = "POT is not installed (pip install -e '.[bench]')"


# ---------------------------------------------------------------------------------------------------------
# POT


def pot_module():
    try:
        import ot.batch
    except ImportError:
        return None
    return ot


def pot_plan(provider: str, x: torch.Tensor, tau: float = TAU, n_iter: int = N_ITER) -> torch.Tensor:
    """P of ``[B, n, n]`` logits by one of POT's batched solvers, with gradients through autograd."""
    from ot.batch import solve_batch
    from ot.batch._utils import bregman_log_projection_batch, bregman_projection_batch

    ones = torch.ones(x.shape[:-1], dtype=x.dtype, device=x.device)
    options = {"max_iter": n_iter, "tol": 0, "grad": "autodiff"}
    if provider == "pot-solve":
        return solve_batch(M=-x, reg=tau, a=ones, b=ones, method="sinkhorn", **options).plan
    if provider == "pot-scaling":
        return bregman_projection_batch(torch.exp(x / tau), ones, ones, **options)["T"]
    if provider == "pot-log":
        return bregman_log_projection_batch(x / tau, ones, ones, **options)["T"]
    raise ValueError(f"provider must be one of {POT_PROVIDERS}, got {provider!r}")


def pot_disagreement(tolerance: float = 1e-12) -> str | None:
    """None when every POT solver gives the same P and gradient as ``symkernels.sinkhorn`` in float64 (both
    regimes, τ = 1 and 0.5, n = 25, 7, 4 and 8, 20 iterations), else what differs."""
    if pot_module() is None:
        return POT_HINT
    return _pot_disagreement(tolerance)


@functools.cache
def _pot_disagreement(tolerance: float) -> str | None:
    generator = torch.Generator().manual_seed(1)
    for regime in REGIMES:
        for tau in (1.0, 0.5):
            for shape in ((3, 25, 25), (2, 7, 7), (9, 4, 4), (3, 8, 8)):
                x = make_logits(shape, regime, generator, torch.float64).requires_grad_()
                grad = torch.randn(shape, generator=generator, dtype=torch.float64)
                ours = symkernels.sinkhorn(x, N_ITER, tau)
                (our_grad,) = torch.autograd.grad(ours, x, grad)
                for provider in POT_PROVIDERS:
                    theirs = pot_plan(provider, x, tau)
                    (their_grad,) = torch.autograd.grad(theirs, x, grad)
                    error = max(
                        (theirs - ours).abs().max().item(), (their_grad - our_grad).abs().max().item()
                    )
                    if not error <= tolerance:
                        return (
                            f"{provider} differs from symkernels.sinkhorn by {error:.1e} in float64 "
                            f"({regime} logits, tau {tau}, shape {shape}): not timed"
                        )
    return None


# ---------------------------------------------------------------------------------------------------------
# Providers: each maps the list of logits of a workload (one tensor per call) to the list of outputs.


@functools.cache
def compiled_reference(n_iter: int = N_ITER) -> Callable[[torch.Tensor], torch.Tensor]:
    # Every (shape, grad) variant is its own graph: keep them all instead of falling back to eager.
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))

    def reference(x: torch.Tensor) -> torch.Tensor:
        return sinkhorn_reference(x, n_iter, TAU)

    return torch.compile(reference, fullgraph=True, dynamic=False)


def provider_fn(provider: str, n_iter: int = N_ITER) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
    """What ``provider`` computes: the list of P of a list of logits (``cpu-kernel`` and ``copy-floor`` are
    timed by :func:`kernel_closure` and :func:`copy_closure` instead)."""
    if provider == REFERENCE:
        return lambda xs: [sinkhorn_reference(x, n_iter, TAU) for x in xs]
    if provider == COMPILED:
        return lambda xs: [compiled_reference(n_iter)(x) for x in xs]
    if provider == AUTHORS:
        return lambda xs: [sinkhorn_early_exit(x, n_iter, TAU) for x in xs]
    if provider in POT_PROVIDERS:
        return lambda xs: [pot_plan(provider, x, TAU, n_iter) for x in xs]
    backend, _, variant = provider.partition("-")
    if variant == "op":
        return lambda xs: [
            torch.ops.symkernels.sinkhorn([x], n_iter, TAU, 0.0, "matrix", None, backend)[0][0] for x in xs
        ]
    grouped = variant.startswith("grouped")
    variant = variant.removeprefix("grouped").removeprefix("-")
    options = {"backend": backend, "check_finite": False}
    if variant == "authors-tol":
        options.update(tol=symkernels.AUTHORS_TOLERANCE, stop="stack")
    elif variant:
        raise ValueError(f"unknown provider {provider!r}")
    if grouped:
        return lambda xs: symkernels.grouped_sinkhorn(xs, n_iter, TAU, **options)
    return lambda xs: [symkernels.sinkhorn(x, n_iter, TAU, **options) for x in xs]


def floor_bytes(shape: tuple[int, int, int], n_iter: int, mode: str, element_size: int = 4) -> int:
    """The memory traffic no implementation of the op can avoid for ``[B, n, n]`` logits: the forward reads
    the logits and writes P and the saved state (``cols`` float64 ``[B, T, n]``, ``domain`` and ``iterations``
    int32); the backward reads the incoming gradient, the logits, domain and iterations and writes the
    gradient (it need not read ``cols``: the CPU kernels recompute the scalings)."""
    batch, n, _ = shape
    matrices = batch * n * n * element_size
    flags = batch * 2 * 4
    forward = 2 * matrices + batch * n_iter * n * 8 + flags
    return forward if mode == "fwd" else forward + 3 * matrices + flags


def copy_buffers(num_bytes: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A source and a destination of ``num_bytes / 2`` bytes each: copying one into the other moves
    ``num_bytes`` (half read, half written)."""
    src = torch.rand(max(1, num_bytes // 8), generator=torch.Generator().manual_seed(0)).to(device)
    return src, torch.empty_like(src)


def copy_closure(num_bytes: int, device: str) -> Closure:
    src, dst = copy_buffers(num_bytes, device)
    return lambda: dst.copy_(src)


def kernel_closure(
    backend: str, xs: list[torch.Tensor], grads: list[torch.Tensor] | None, n_iter: int
) -> Closure:
    """The native library's forward (and backward, with ``grads``) called directly: the kernels with their
    input checks and output allocations, no op dispatch, autograd or Python of the public function."""
    from symkernels import _native

    library = _native.library()

    def forward() -> list:
        return [library.sinkhorn_forward([x], n_iter, TAU, 0.0, False, None) for x in xs]

    if grads is None:
        return forward

    def forward_backward() -> list:
        return [
            library.sinkhorn_backward([g], [x], cols, domain, iterations, TAU)
            for x, g, (_, cols, domain, iterations) in zip(xs, grads, forward(), strict=True)
        ]

    return forward_backward


def workload_shapes(workload: str) -> tuple[list[tuple[int, int, int]], int]:
    """The logit shapes of a workload (one call each) and its T."""
    if workload in TINY_WORKLOADS:
        shape, n_iter = TINY_WORKLOADS[workload]
        return [shape], n_iter
    return SINKHORN_WORKLOADS[workload], N_ITER


def make_closure(provider: str, workload: str, mode: str, regime: str, device: str) -> Callable[[], Closure]:
    def make() -> Closure:
        shapes, n_iter = workload_shapes(workload)
        if provider == COPY:
            return copy_closure(sum(floor_bytes(shape, n_iter, mode) for shape in shapes), device)
        generator = torch.Generator().manual_seed(0)
        backward = mode == "fwd+bwd"
        kernel = provider.endswith("-kernel")
        xs = [
            make_logits(shape, regime, generator).to(device).requires_grad_(backward and not kernel)
            for shape in shapes
        ]
        if kernel:
            grads = [torch.randn(x.shape, generator=generator).to(device) for x in xs] if backward else None
            return kernel_closure(provider.partition("-")[0], xs, grads, n_iter)
        run = provider_fn(provider, n_iter)
        if not backward:

            def forward() -> list[torch.Tensor]:
                with torch.no_grad():
                    return run(xs)

            return forward
        grads = [torch.randn(x.shape, generator=generator).to(device) for x in xs]

        def forward_backward() -> tuple[torch.Tensor, ...]:
            return torch.autograd.grad(run(xs), xs, grads)

        return forward_backward

    return make


def requirement(provider: str, device: str) -> Callable[[], str | None]:
    def requires() -> str | None:
        if provider in (REFERENCE, AUTHORS, COPY):
            return None
        if provider == COMPILED:
            return None if hasattr(torch, "compile") else "this torch has no torch.compile"
        if provider in POT_PROVIDERS:
            return pot_disagreement()
        return backend_reason(provider.partition("-")[0], device, "sinkhorn")

    return requires


def providers(device: str, workload: str, *, compiled: bool) -> list[str]:
    if compiled:
        return [COMPILED]
    names = [REFERENCE, AUTHORS]
    for backend in native_backends(device):
        names.append(backend)
        if workload in MODEL_STACKS:
            names.append(f"{backend}-grouped")
        names.append(f"{backend}-authors-tol")
        if workload in MODEL_STACKS:
            names.append(f"{backend}-grouped-authors-tol")
    return names + list(POT_PROVIDERS)


def tiny_providers(device: str, *, compiled: bool) -> list[str]:
    if compiled:
        return [COMPILED]
    names = [REFERENCE]
    for backend in native_backends(device):
        names += [backend, f"{backend}-op"]
        if backend == "cpu":
            names.append("cpu-kernel")
    return names + list(POT_PROVIDERS) + [COPY]


def tiny_cases(device: str, *, quick: bool) -> list[Case]:
    """The tiny workloads: forward + backward before forward, the smaller batch first; the compiled reference
    in the section ``compiled``. --quick: the group QUICK_TINY only, without the compiled reference."""
    cpu = torch.device(device).type == "cpu"
    out = []
    for compiled in (False,) if quick else (False, True):
        for mode in reversed(MODES):
            for workload in sorted(TINY_WORKLOADS, key=lambda w: TINY_WORKLOADS[w][0][0]):
                if quick and (workload, mode) != QUICK_TINY:
                    continue
                if compiled and cpu and workload not in COMPILED_CPU_TINY:
                    continue
                shape, n_iter = TINY_WORKLOADS[workload]
                for provider in tiny_providers(device, compiled=compiled):
                    out.append(
                        Case(
                            op=OP,
                            section="compiled" if compiled else OP,
                            workload=workload,
                            mode=mode,
                            provider=provider,
                            regime=TINY_REGIME,
                            device=device,
                            make=make_closure(provider, workload, mode, TINY_REGIME, device),
                            requires=requirement(provider, device),
                            graph=provider not in POT_PROVIDERS,
                            info={
                                "shapes": [list(shape)],
                                "n_iter": n_iter,
                                "tau": TAU,
                                "floor_bytes": floor_bytes(shape, n_iter, mode),
                                **(
                                    {"bytes_moved": floor_bytes(shape, n_iter, mode)}
                                    if provider == COPY
                                    else {}
                                ),
                            },
                        )
                    )
    return out


def cases(device: str = "cpu", *, quick: bool = False) -> list[Case]:
    """The Sinkhorn cases: forward + backward before forward, model stacks before batches, then the tiny
    workloads; the compiled reference last, in its own section (its compile takes minutes)."""
    workloads = QUICK_WORKLOADS if quick else tuple(SINKHORN_WORKLOADS)
    out = []
    for compiled in (False, True) if not quick else (False,):
        # On the CPU, inductor takes minutes per shape: the compiled reference runs on the smaller workloads.
        cpu = torch.device(device).type == "cpu"
        for mode in reversed(MODES):
            for workload in COMPILED_CPU_WORKLOADS if compiled and cpu else workloads:
                for regime in REGIMES:
                    for provider in providers(device, workload, compiled=compiled):
                        shapes = SINKHORN_WORKLOADS[workload]
                        out.append(
                            Case(
                                op=OP,
                                section="compiled" if compiled else OP,
                                workload=workload,
                                mode=mode,
                                provider=provider,
                                regime=regime,
                                device=device,
                                make=make_closure(provider, workload, mode, regime, device),
                                requires=requirement(provider, device),
                                graph=provider not in (AUTHORS, *POT_PROVIDERS),  # host syncs
                                info={
                                    "shapes": [list(s) for s in shapes],
                                    "n_iter": N_ITER,
                                    "tau": TAU,
                                    # Minimum traffic of a float32 forward: read the logits, write P.
                                    "bytes_moved": sum(8 * s[0] * s[1] * s[2] for s in shapes),
                                },
                            )
                        )
    return out + tiny_cases(device, quick=quick)


if __name__ == "__main__":
    from bench.__main__ import main

    sys.exit(main(ops=[OP]))
