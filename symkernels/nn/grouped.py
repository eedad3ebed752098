"""One Sinkhorn computation for every learned stack of a model, reused by the layers and the regularisers.

Every :class:`~symkernels.nn.DoublyStochasticStack` of a model is data-independent, so all of them can be
computed together: :func:`grouped_sinkhorn` runs a list of logit stacks of different sizes in one launch
forward and one backward on the ``triton`` backend (a loop over the stacks on the others), and
:func:`precompute_representations` makes a model's layers use that one result::

    with precompute_representations(model):
        loss = F.cross_entropy(model(x), y) + 0.1 * model.regularizers()[0]
    loss.backward()
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from symkernels import backends, functional
from symkernels._checks import check_all_finite, check_positive_int, check_stack_list, check_tau
from symkernels.nn.stacks import DoublyStochasticStack
from symkernels.ops.representation import prepend_identity

__all__ = ["grouped_sinkhorn", "precompute_representations"]


def grouped_sinkhorn(
    stacks: Sequence[torch.Tensor],
    n_iter: int = 20,
    tau: float = 1.0,
    *,
    backend: str | None = None,
    check_finite: bool = True,
) -> list[torch.Tensor]:
    """Sinkhorn (as :func:`symkernels.sinkhorn`) of each ``[G_l, n_l, n_l]`` stack; sizes may differ.

    A backend with a grouped kernel (``triton``) computes all stacks in one launch forward and one
    backward; on the others this is a loop over the stacks through the same backend choice. Gradients are
    the exact unrolled ones either way.
    """
    checked = check_stack_list(stacks)
    check_positive_int(n_iter, "n_iter")
    tau = check_tau(tau)
    if not checked:
        return []
    if check_finite:
        check_all_finite(checked)
    try:
        impl = backends.resolve("grouped_sinkhorn", backend, checked[0].device, checked[0].dtype)
    except RuntimeError:
        impl = None  # no backend with a grouped kernel serves these tensors: one call per stack
    if impl is not None:
        return list(impl(checked, n_iter, tau))
    return [functional.sinkhorn(s, n_iter, tau, backend=backend, check_finite=False) for s in checked]


@contextlib.contextmanager
def precompute_representations(
    model: nn.Module, *, backend: str | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Compute every :class:`DoublyStochasticStack` of ``model`` at once, and make each stack's ``forward()``
    return its result while the context is active (so the layers' forward and ``model.regularizers()`` reuse
    it instead of running Sinkhorn again).

    Stacks sharing ``(n_iter, tau)``, dtype and device (all of them in the paper's models) go through one
    :func:`grouped_sinkhorn` call, connected to autograd: gradients reach every stack's logits. Yields
    ``{module name: [G, d, d] stack}``. Leaving the context restores per-call computation; inside an active
    context (nested use, e.g. by ``sum_regularizers``) the stacks already computed are reused as they are.
    Fixed stacks (:class:`~symkernels.nn.FixedStack`) need no computation and are left alone.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    named = [(name, m) for name, m in model.named_modules() if isinstance(m, DoublyStochasticStack)]
    pending = [(name, m) for name, m in named if m._precomputed is None]
    groups: dict[tuple, list[tuple[str, DoublyStochasticStack]]] = {}
    for name, stack in pending:
        key = (stack.n_iter, stack.tau, stack.logits.dtype, stack.logits.device)
        groups.setdefault(key, []).append((name, stack))
    computed: list[DoublyStochasticStack] = []
    try:
        for (n_iter, tau, _, _), members in groups.items():
            finite = [s.logits for _, s in members if s.check_finite]
            if finite:
                check_all_finite(finite)
            results = grouped_sinkhorn(
                [s.logits for _, s in members], n_iter, tau, backend=backend, check_finite=False
            )
            for (_, stack), result in zip(members, results, strict=True):
                stack._precomputed = prepend_identity(result) if stack.fix_identity else result
                computed.append(stack)
        yield {name: stack._precomputed for name, stack in named}
    finally:
        for stack in computed:
            stack._precomputed = None
