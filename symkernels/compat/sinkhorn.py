"""The published modules' Sinkhorn loop, computed by the fused op.

The published loop tests, before every iteration, whether the whole stack ``exp(logits)`` already has every
row and column sum within ``torch.allclose`` of 1, and stops there; it runs ``n_iter`` iterations at most.
:func:`symkernels.sinkhorn` with ``tol=AUTHORS_TOLERANCE, stop="stack"`` is that loop from the first iteration
on (the op always runs at least one); the test before the first iteration, which passes for logits that are
already doubly stochastic (as the norm regulariser drives them to be), is added here, decided on the device.
"""

from __future__ import annotations

import torch

from symkernels.ops.sinkhorn import sinkhorn


def published_sinkhorn(logits: torch.Tensor, n_iter: int, tol: float | None) -> torch.Tensor:
    """``[G, n, n]`` logits → doubly stochastic ``[G, n, n]``: the published loop with tolerance ``tol``, or
    exactly ``n_iter`` iterations when ``tol`` is None or 0.

    Without host synchronisation: NaN or Inf logits give NaN matrices, as in the published loop (the op's
    opt-in finiteness test, which would read a flag from the device, stays off).
    """
    if not tol:
        return sinkhorn(logits, n_iter)
    iterated = sinkhorn(logits, n_iter, tol=tol, stop="stack")
    if logits.numel() == 0:  # no learned matrices (a stack of only the fixed identity)
        return iterated
    p = logits.exp()
    row_error = (p.sum(dim=-1) - 1).abs().amax()
    column_error = (p.sum(dim=-2) - 1).abs().amax()
    already_stochastic = torch.maximum(row_error, column_error) <= tol
    return torch.where(already_stochastic, p, iterated)
