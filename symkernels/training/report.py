"""What a trained model's stacks learned: each layer decomposed onto the exact group elements, and figures.

The lifting layer (named ``"lift"``) is read against the rotations of its ``k × k`` grid (with ``flip`` and
at least eight stack elements: the dihedral group, rotations and reflections); a group-conv layer with
``G_in`` ∈ {1, 2, 4} input group elements against the shift-twist representation of the rotations of order
``G_in`` (method.md §4). Layers of other shapes have no exact basis here and are left out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from symkernels import analysis, groups
from symkernels.models import weight_sharing_layers
from symkernels.nn import WSLiftConv2d, precompute_representations

Basis = tuple[torch.Tensor, list[str]]

_SHIFT_TWIST_ORDERS = (1, 2, 4)
# A stack recovered its group when each element puts at least this much of its mass on one exact element.
RECOVERY_THRESHOLD = 0.8


def _named_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The weight-sharing layers of ``model`` by report name: a model's only lifting layer is ``"lift"``."""
    layers = list(weight_sharing_layers(model))
    lifts = sum(isinstance(layer, WSLiftConv2d) for _, layer in layers)
    return [
        ("lift" if isinstance(layer, WSLiftConv2d) and lifts == 1 else name, layer) for name, layer in layers
    ]


def learned_stacks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight-sharing layer's ``[G, d, d]`` stack (float32, CPU), by layer name."""
    # All stacks in one grouped Sinkhorn call where a backend has one.
    with torch.no_grad(), precompute_representations(model):
        return {name: layer.representations().detach().float().cpu() for name, layer in _named_layers(model)}


def layer_bases(model: nn.Module, *, flip: bool = False) -> dict[str, Basis]:
    """The exact group elements each layer's stack is read against: name → (``[K, d, d]``, K names)."""
    bases: dict[str, Basis] = {}
    for name, layer in _named_layers(model):
        k = layer.kernel_size
        if isinstance(layer, WSLiftConv2d):
            if flip and layer.group_size >= 8:
                basis: Basis = (groups.dihedral_permutations(k), groups.dihedral_names())
            else:
                basis = (groups.rotation_permutations(k), groups.rotation_names())
        elif layer.in_group_size in _SHIFT_TWIST_ORDERS:
            order = layer.in_group_size
            basis = (groups.shift_twist(k, order=order), [f"shift-twist r{g}" for g in range(order)])
        else:
            continue
        bases[name] = basis
    return bases


def decomposition(stacks: dict[str, torch.Tensor], bases: dict[str, Basis]) -> dict[str, dict[str, Any]]:
    """``layer → {"elements": names, "coefficients": [one row per stack element, identity included]}``:
    convex coefficients of the nearest mix of exact elements (:func:`symkernels.analysis.decompose`)."""
    out: dict[str, dict[str, Any]] = {}
    for name, (basis, names) in bases.items():
        coefficients = analysis.decompose(stacks[name], basis)
        out[name] = {"elements": list(names), "coefficients": coefficients.tolist()}
    return out


def recovery(entry: dict[str, Any], threshold: float = RECOVERY_THRESHOLD) -> dict[str, Any]:
    """Whether one layer's stack recovered its group (method.md §10): every element puts at least
    ``threshold`` of its mass on one exact element, and those elements are distinct and cover the basis."""
    names = entry["elements"]
    coefficients = torch.tensor(entry["coefficients"], dtype=torch.float64)
    mass, index = coefficients.max(dim=1)
    assigned = [names[i] for i in index.tolist()]
    covered = sorted(set(assigned)) == sorted(names) and len(assigned) == len(names)
    return {
        "assigned": assigned,
        "mass": mass.tolist(),
        "threshold": threshold,
        "recovered": bool(covered and mass.min().item() >= threshold),
    }


def format_decomposition(
    layer: str,
    entry: dict[str, Any],
    threshold: float = RECOVERY_THRESHOLD,
    *,
    verdict: dict[str, Any] | None = None,
) -> str:
    """One layer's coefficient table and a one-line verdict (``verdict``: :func:`recovery` of ``entry`` at
    ``threshold``, when already computed)."""
    names = entry["elements"]
    lines = [f"{layer}: each stack element decomposed onto the exact group elements", ""]
    lines.append("element   " + "".join(f"{name:>10}" for name in names))
    for i, row in enumerate(entry["coefficients"]):
        lines.append(f"R{i:<8} " + "".join(f"{value:10.3f}" for value in row))
    if verdict is None:
        verdict = recovery(entry, threshold)
    lowest = min(verdict["mass"])
    if verdict["recovered"]:
        lines.append(
            f"recovered: every element puts >= {threshold:.2f} of its mass on one element (lowest "
            f"{lowest:.3f}) and together they cover all {len(names)}"
        )
    else:
        missing = sorted(set(names) - set(verdict["assigned"]))
        reasons = [f"lowest mass {lowest:.3f} < {threshold:.2f}"] if lowest < threshold else []
        if missing:
            reasons.append(f"no element on {', '.join(missing)}")
        lines.append("not recovered: " + "; ".join(reasons))
    return "\n".join(lines)


def save_figures(
    stacks: dict[str, torch.Tensor],
    bases: dict[str, Basis],
    coefficients: dict[str, dict[str, Any]],
    stacks_path: str | Path,
    decomposition_path: str | Path,
) -> list[Path]:
    """Write the stack heatmaps and the decomposition plot; returns the files written (none if no stacks)."""
    if not bases:
        return []
    from symkernels import plots  # deferred: matplotlib is only needed for the figures

    plots.save_stack_figure(
        {name: stacks[name] for name in bases}, bases, stacks_path, coefficients=coefficients
    )
    plots.save_decomposition_figure(coefficients, decomposition_path)
    return [Path(stacks_path), Path(decomposition_path)]
