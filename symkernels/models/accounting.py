"""What every model shares: finding its weight-sharing layers, summing their regularisers, counting."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from symkernels.nn.conv import _WeightSharingConv2d
from symkernels.nn.grouped import precompute_representations


def weight_sharing_layers(model: nn.Module) -> Iterator[tuple[str, _WeightSharingConv2d]]:
    """``(name, layer)`` for every weight-sharing convolution in ``model``, in registration order."""
    for name, module in model.named_modules():
        if isinstance(module, _WeightSharingConv2d):
            yield name, module


def sum_regularizers(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norm, entropy)`` summed over the weight-sharing layers (zeros when there are none).

    The stacks come from one grouped computation (or from the one already active, see
    :func:`~symkernels.nn.precompute_representations`).
    """
    with precompute_representations(model):
        terms = [layer.regularizers() for _, layer in weight_sharing_layers(model)]
    if not terms:
        # Zeros where the model computes (no copy to the device inside a training step).
        parameter = next(model.parameters(), None)
        zero = torch.zeros(()) if parameter is None else parameter.new_zeros(())
        return zero, zero
    norms, entropies = zip(*terms, strict=True)
    return sum(norms[1:], norms[0]), sum(entropies[1:], entropies[0])


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """``{"free": ..., "logits": ...}``: representation logits counted apart from every other parameter."""
    logits = sum(
        layer.reps.logits.numel()
        for _, layer in weight_sharing_layers(model)
        if isinstance(getattr(layer.reps, "logits", None), nn.Parameter)
    )
    total = sum(p.numel() for p in model.parameters())
    return {"free": total - logits, "logits": logits}
