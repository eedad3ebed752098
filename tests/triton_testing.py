"""Helpers shared by the Triton launchers' tests (``test_sinkhorn_triton.py``, ``test_expansion_triton.py``);
their ``triton_device`` fixture is in conftest.py."""

from __future__ import annotations

import math

import torch


def poison(monkeypatch, module) -> None:
    """Fresh allocations of ``module`` come filled with NaN (or -7 for integers)."""

    def poisoned(factory):
        def make(*args, **kwargs):
            out = factory(*args, **kwargs)
            return out.fill_(math.nan) if out.dtype.is_floating_point else out.fill_(-7)

        return make

    monkeypatch.setattr(module.torch, "empty", poisoned(torch.empty))
    monkeypatch.setattr(module.torch, "empty_like", poisoned(torch.empty_like))
