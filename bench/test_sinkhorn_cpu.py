"""Sinkhorn on the CPU: native kernels vs the eager reference vs the authors' loop (pytest-benchmark).

Each case runs one Sinkhorn per layer of a model's stack, T = 20, forward or forward + backward.
Run with ``python bench/run.py`` (writes bench/results/) or ``pytest bench/test_sinkhorn_cpu.py``.
"""

from __future__ import annotations

import pytest
import torch

import symkernels
from bench.workloads import REGIMES, STACKS, make_stack
from symkernels.reference import authors_representation_stack

N_ITER = 20


def run_stack(provider: str, logits: list[torch.Tensor], backward: bool) -> None:
    if provider == "cpu-grouped":
        outputs = symkernels.grouped_sinkhorn(logits, N_ITER, backend="cpu", check_finite=False)
    elif provider == "authors-loop":
        outputs = [authors_representation_stack(x, N_ITER) for x in logits]
    elif provider == "cpu-tol":
        # The authors' stopping rule, decided per stack on the device: same iterations as their loop.
        outputs = [
            symkernels.sinkhorn(
                x, N_ITER, tol=symkernels.AUTHORS_TOLERANCE, stop="stack", backend="cpu", check_finite=False
            )
            for x in logits
        ]
    else:
        outputs = [
            symkernels.representation_stack(x, N_ITER, backend=provider, check_finite=False) for x in logits
        ]
    if backward:
        torch.autograd.backward([o.sum() for o in outputs])


PROVIDERS = ["reference", "authors-loop", "cpu", "cpu-grouped", "cpu-tol"]


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("workload", list(STACKS))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_sinkhorn(benchmark, provider, workload, mode, regime):
    if provider.startswith("cpu") and not symkernels.backend_status()["cpu"].usable:
        pytest.skip(f"native CPU kernels unavailable: {symkernels.backend_status()['cpu'].detail}")
    logits = [x.requires_grad_(mode == "fwd+bwd") for x in make_stack(workload, regime)]
    benchmark.group = f"{workload} {mode} {regime}"
    benchmark.extra_info.update(provider=provider, workload=workload, mode=mode, regime=regime, n_iter=N_ITER)
    benchmark.pedantic(run_stack, args=(provider, logits, mode == "fwd+bwd"), rounds=7, warmup_rounds=1)
