"""The two regularisers of a representation stack (docs/design.md §6)."""

from __future__ import annotations

import torch


def norm_regularizer(logits: torch.Tensor) -> torch.Tensor:
    """On raw logits ``[G', d, d]``: ``mean(logsumexp(Θ, -2)² + logsumexp(Θ, -1)²)``, broadcast to Θ's shape.

    It pushes ``exp(Θ)`` itself toward double stochasticity.
    """
    if logits.numel() == 0:
        return logits.new_zeros(())
    columns = torch.logsumexp(logits, dim=-2, keepdim=True)
    rows = torch.logsumexp(logits, dim=-1, keepdim=True)
    return (columns.square() + rows.square()).mean()


def entropy_regularizer(stack: torch.Tensor) -> torch.Tensor:
    """On the full stack (identity included): ``−Σ R log(clamp(R, 1e-16))``, a sum, not a mean."""
    return -(stack * stack.clamp(min=1e-16).log()).sum()
