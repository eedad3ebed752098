"""What a trained model's stacks learned: each layer decomposed onto the exact group elements, the recovery
trajectory over training, and figures.

The lifting layer (named ``"lift"``) is read against the rotations of its ``k × k`` grid (with ``flip`` and
at least eight stack elements: the dihedral group, rotations and reflections); a group-conv layer with
``G_in`` ∈ {1, 2, 4} input group elements against the shift-twist representation of the rotations of order
``G_in`` (docs/design.md §4). Layers of other shapes have no exact basis here and are left out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from symkernels import analysis, groups
from symkernels.models import weight_sharing_layers
from symkernels.nn import DoublyStochasticStack, WSLiftConv2d, precompute_representations

Basis = tuple[torch.Tensor, list[str]]

_SHIFT_TWIST_ORDERS = (1, 2, 4)
# A stack recovered its group when each element puts at least this much of its mass on one exact element.
RECOVERY_THRESHOLD = 0.8

# The authors' published run (their MNIST config: 32 channels, 60,000 rotated digits, batch 64, ≈ 937 steps
# per epoch), decomposed onto C4: each learned lifting element's best-rotation mass after epochs 25-100.
AUTHORS_LIFT_TRAJECTORY: tuple[dict[str, Any], ...] = (
    {"epoch": 25, "step": 23_000, "mass": (0.64, 0.66, 0.48)},
    {"epoch": 50, "step": 47_000, "mass": (0.90, 0.90, 0.63)},
    {"epoch": 75, "step": 70_000, "mass": (0.95, 0.96, 0.79)},
    {"epoch": 100, "step": 94_000, "mass": (0.95, 0.99, 0.91)},
)


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


def learned_rows(model: nn.Module) -> dict[str, list[int]]:
    """Which rows of each layer's stack are learned: all but the fixed identity; none for a fixed stack."""
    rows = {}
    for name, layer in _named_layers(model):
        if isinstance(layer.reps, DoublyStochasticStack):
            rows[name] = list(range(1 if layer.reps.fix_identity else 0, layer.group_size))
        else:
            rows[name] = []
    return rows


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
    """Whether one layer's stack recovered its group (docs/design.md §10): every element puts at least
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


def best_elements(names: list[str], coefficients: list[list[float]], rows: list[int]) -> list[dict[str, Any]]:
    """For each stack row in ``rows``: ``{"element": "R<row>", "assigned": best exact element, "mass": its
    coefficient}``."""
    out = []
    for row in rows:
        values = coefficients[row]
        best = max(range(len(values)), key=values.__getitem__)
        out.append({"element": f"R{row}", "assigned": names[best], "mass": float(values[best])})
    return out


def trajectory(metrics: dict[str, Any], layer: str = "lift") -> list[dict[str, Any]]:
    """The recovery trajectory of ``layer`` from a run's ``metrics.json`` content: one entry per evaluated
    epoch, ``{"step", "epoch", "test_accuracy", "elements": [best_elements of each learned row]}``."""
    names = metrics.get("group_elements", {}).get(layer)
    rows = metrics.get("learned_rows", {}).get(layer)
    if names is None or rows is None:
        return []
    out = []
    for record in metrics["epochs"]:
        coefficients = record.get("decomposition", {}).get(layer)
        if coefficients is None:
            continue
        out.append(
            {
                "step": record["step"],
                "epoch": record["epoch"],
                "test_accuracy": record["test_accuracy"],
                "elements": best_elements(names, coefficients, rows),
            }
        )
    return out


def format_trajectory(points: list[dict[str, Any]], layer: str = "lift", *, max_lines: int = 12) -> str:
    """A table of a :func:`trajectory`: per evaluation, each learned element's best exact element and mass
    (at most ``max_lines`` evaluations, evenly spaced, the last always included)."""
    if not points:
        return f"{layer}: no learned elements to follow"
    chosen = points
    if len(points) > max_lines:
        picks = {round(i * (len(points) - 1) / (max_lines - 1)) for i in range(max_lines)}
        chosen = [points[i] for i in sorted(picks)]
    header = f"{'step':>7} {'epoch':>6} {'test acc':>9}  " + "".join(
        f"{e['element']:>16}" for e in points[0]["elements"]
    )
    lines = [f"{layer}: best exact element and its mass for each learned element", header]
    for point in chosen:
        cells = "".join(f"{e['assigned']:>10} {e['mass']:5.3f}" for e in point["elements"])
        lines.append(f"{point['step']:>7} {point['epoch']:>6} {point['test_accuracy']:>9.4f}  {cells}")
    return "\n".join(lines)


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
    lines.append(
        "best: "
        + ", ".join(
            f"R{i} on {assigned} ({mass:.3f})"
            for i, (assigned, mass) in enumerate(zip(verdict["assigned"], verdict["mass"], strict=True))
        )
    )
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


def save_trajectory_figure(
    metrics: dict[str, Any],
    path: str | Path,
    *,
    reference: tuple[dict[str, Any], ...] | None = None,
    reference_label: str = "authors' run (32 ch, 60,000 digits)",
    max_step: float | None = None,
) -> Path | None:
    """Each learned element's best-element mass against steps, one panel per layer (the lift first); with
    ``reference`` (e.g. :data:`AUTHORS_LIFT_TRAJECTORY`) drawn on the lift's panel, every step axis up to
    ``max_step`` when given. None: nothing to draw."""
    layers = {name: trajectory(metrics, name) for name in metrics.get("group_elements", {})}
    layers = {name: points for name, points in layers.items() if points and points[0]["elements"]}
    if not layers:
        return None
    from symkernels import plots  # deferred: matplotlib is only needed for the figures

    return plots.save_trajectory_figure(
        layers,
        path,
        threshold=RECOVERY_THRESHOLD,
        reference={"lift": reference} if reference else None,
        reference_label=reference_label,
        max_step=max_step,
    )
