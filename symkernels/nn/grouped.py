"""One Sinkhorn computation for every learned stack of a model, reused by the layers and the regularisers.

Every :class:`~symkernels.nn.DoublyStochasticStack` of a model is data-independent, so all of them can be
computed together: :func:`precompute_representations` puts them through one
:func:`symkernels.grouped_sinkhorn` call (one op call: one launch forward and one backward on a GPU) and makes
a model's layers use that result::

    with precompute_representations(model):
        loss = F.cross_entropy(model(x), y) + 0.1 * model.regularizers()[0]
    loss.backward()
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from symkernels._checks import check_all_finite
from symkernels.nn.stacks import DoublyStochasticStack
from symkernels.ops.sinkhorn import grouped_sinkhorn

__all__ = ["precompute_representations"]


@contextlib.contextmanager
def precompute_representations(
    model: nn.Module, *, backend: str | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Compute every :class:`DoublyStochasticStack` of ``model`` at once, and make each stack return its
    result while the context is active (so the layers' forward and ``model.regularizers()`` reuse it instead
    of running Sinkhorn again).

    Stacks sharing ``(n_iter, tau)``, dtype and device (all of them in the paper's models) go through one
    :func:`~symkernels.grouped_sinkhorn` call, connected to autograd: gradients reach every stack's logits.
    Yields ``{module name: learned matrices}`` (``DoublyStochasticStack.learned()``; the layers expand them
    with the fixed identity in the kernel). Leaving the context restores per-call computation; inside an
    active context (nested use) the stacks already computed are reused as they are. Fixed stacks
    (:class:`~symkernels.nn.FixedStack`) need no computation and are left alone.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    named = [(name, m) for name, m in model.named_modules() if isinstance(m, DoublyStochasticStack)]
    pending = [(name, m) for name, m in named if m._precomputed is None]
    groups: dict[tuple, list[DoublyStochasticStack]] = {}
    for _, stack in pending:
        key = (stack.n_iter, stack.tau, stack.logits.dtype, stack.logits.device)
        groups.setdefault(key, []).append(stack)
    computed: list[DoublyStochasticStack] = []
    try:
        for (n_iter, tau, _, _), members in groups.items():
            finite = [s.logits for s in members if s.check_finite]
            if finite:
                check_all_finite(finite)
            results = grouped_sinkhorn(
                [s.logits for s in members], n_iter, tau, backend=backend, check_finite=False
            )
            for stack, result in zip(members, results, strict=True):
                stack._precomputed = result
                computed.append(stack)
        yield {name: stack._precomputed for name, stack in named}
    finally:
        for stack in computed:
            stack._precomputed = None
