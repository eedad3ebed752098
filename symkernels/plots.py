"""Figures of learned representation stacks: heatmaps next to the nearest exact group elements, and the
decomposition coefficients (docs/design.md §10).

Matplotlib is imported inside the functions (``import symkernels`` never loads it) and drawn with the Agg
canvas directly, so the pyplot backend of the caller is left alone. Files are written atomically: a
temporary file in the target folder, then :func:`os.replace`.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from symkernels import analysis

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["save_decomposition_figure", "save_stack_figure", "save_trajectory_figure"]

_DPI = 110
_CMAP = "viridis"
# At most this many (learned, nearest) pairs per line of panels; larger stacks wrap onto more lines.
_PAIRS_PER_LINE = 4
_PANEL_INCHES = 1.45
# Cells are annotated with their value only while the text still fits.
_MAX_ANNOTATED_CELLS = 300


def _check_path(path: object) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    target = Path(path)
    if target.suffix.lower() != ".png":
        raise ValueError(f"path must name a .png file, got {str(target)!r}")
    if not target.parent.is_dir():
        raise FileNotFoundError(f"path's folder {str(target.parent)!r} does not exist")
    if target.is_dir():
        raise IsADirectoryError(f"path {str(target)!r} is a directory")
    return target


def _check_names(names: object, what: str) -> list[str]:
    if (
        not isinstance(names, Sequence)
        or isinstance(names, str)
        or not all(isinstance(n, str) for n in names)
    ):
        raise TypeError(f"{what} must be a list of str, got {names!r}")
    return list(names)


def _check_mapping(value: object, name: str) -> Mapping[Any, Any]:
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a dict keyed by layer name, got {type(value).__name__}")
    if not value:
        raise ValueError(f"{name} must hold at least one layer")
    for key in value:
        if not isinstance(key, str):
            raise TypeError(f"{name} must be keyed by layer name (str), got key {key!r}")
    return value


@dataclass
class _Layer:
    """One layer's learned stack, basis, basis names and decomposition coefficients, as NumPy arrays."""

    name: str
    stack: np.ndarray
    basis: np.ndarray
    names: list[str]
    coefficients: np.ndarray


def _given_coefficients(coefficients: object) -> Mapping[Any, Any]:
    if coefficients is None:
        return {}
    if not isinstance(coefficients, Mapping):
        raise TypeError(f"coefficients must be a dict keyed by layer name, got {type(coefficients).__name__}")
    return coefficients


def _layer_coefficients(value: object, name: str, rows: int, columns: int) -> np.ndarray:
    """Precomputed coefficients of one layer: ``[G, K]`` (tensor, array or rows), or a decomposition entry
    ``{"coefficients": rows, ...}`` as :func:`save_decomposition_figure` takes."""
    where = f"coefficients[{name!r}]"
    if isinstance(value, Mapping):
        if "coefficients" not in value:
            raise ValueError(f"{where} must be a [G, K] matrix or a dict with key 'coefficients'")
        value, where = value["coefficients"], f"{where}['coefficients']"
    if isinstance(value, torch.Tensor):
        value = value.detach().to(dtype=torch.float64, device="cpu").numpy()
    matrix = _as_matrix(value, where)
    if matrix.shape != (rows, columns):
        raise ValueError(f"{where} must have shape [G, K] = [{rows}, {columns}], got {list(matrix.shape)}")
    return matrix


def _prepare_stacks(stacks: object, bases: object, coefficients: object = None) -> list[_Layer]:
    stacks = _check_mapping(stacks, "stacks")
    bases = _check_mapping(bases, "bases")
    given = _given_coefficients(coefficients)
    if set(stacks) != set(bases):
        missing = sorted(set(stacks) - set(bases))
        extra = sorted(set(bases) - set(stacks))
        raise ValueError(
            f"stacks and bases must name the same layers; no basis for {missing}, no stack for {extra}"
        )
    layers = []
    for name, stack in stacks.items():
        if not isinstance(stack, torch.Tensor):
            raise TypeError(f"stacks[{name!r}] must be a torch.Tensor, got {type(stack).__name__}")
        if stack.dim() != 3 or stack.shape[-1] != stack.shape[-2] or stack.shape[0] == 0:
            raise ValueError(
                f"stacks[{name!r}] must have shape [G, d, d] with G >= 1, got {tuple(stack.shape)}"
            )
        entry = bases[name]
        if not isinstance(entry, tuple) or len(entry) != 2:
            raise TypeError(f"bases[{name!r}] must be a (basis tensor [K, d, d], element names) tuple")
        basis, names = entry
        if not isinstance(basis, torch.Tensor):
            raise TypeError(f"bases[{name!r}][0] must be a torch.Tensor, got {type(basis).__name__}")
        if basis.dim() != 3 or basis.shape[-1] != basis.shape[-2] or basis.shape[0] == 0:
            raise ValueError(
                f"bases[{name!r}][0] must have shape [K, d, d] with K >= 1, got {tuple(basis.shape)}"
            )
        if basis.shape[-1] != stack.shape[-1]:
            raise ValueError(
                f"layer {name!r}: stack {tuple(stack.shape)} and basis {tuple(basis.shape)} disagree on d"
            )
        names = _check_names(names, f"bases[{name!r}][1]")
        if len(names) != basis.shape[0]:
            raise ValueError(f"bases[{name!r}]: {len(names)} names for {basis.shape[0]} basis elements")
        if name in given:
            layer_coefficients = _layer_coefficients(given[name], name, stack.shape[0], basis.shape[0])
        else:
            try:
                layer_coefficients = analysis.decompose(stack, basis).cpu().numpy()
            except (TypeError, ValueError) as error:
                raise type(error)(f"layer {name!r}: {error}") from error
        as_numpy = {"dtype": torch.float64, "device": "cpu"}
        layers.append(
            _Layer(
                name,
                stack.detach().to(**as_numpy).numpy(),
                basis.detach().to(**as_numpy).numpy(),
                names,
                layer_coefficients,
            )
        )
    return layers


def _save_atomic(figure: Figure, target: Path) -> Path:
    """Render to a temporary file next to ``target``, then move it into place (removed on any failure)."""
    fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            figure.savefig(handle, format="png", dpi=_DPI)
        os.chmod(temporary, 0o644)  # mkstemp creates owner-only files; a figure is for everyone to read
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    return target


def _new_figure(width: float, height: float, *, constrained: bool) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained" if constrained else None)
    FigureCanvasAgg(figure)
    return figure


def _heatmap(axes: Any, matrix: np.ndarray, title: str) -> Any:
    # Antialiased resampling keeps isolated ones visible when a large matrix gets fewer pixels than entries.
    image = axes.imshow(matrix, vmin=0.0, vmax=1.0, cmap=_CMAP, interpolation="antialiased")
    axes.set_title(title, fontsize=8)
    axes.set_xticks([])
    axes.set_yticks([])
    return image


def save_stack_figure(
    stacks: dict[str, torch.Tensor],
    bases: dict[str, tuple[torch.Tensor, list[str]]],
    path: str | os.PathLike,
    *,
    coefficients: Mapping[str, Any] | None = None,
) -> Path:
    """One PNG: for each layer, each learned matrix ``R_i`` as a heatmap next to the exact basis element it is
    closest to (the largest coefficient of its decomposition, :func:`symkernels.analysis.decompose`).

    ``stacks`` maps layer name → learned stack ``[G, d, d]`` (the fixed identity included); ``bases`` maps the
    same names → ``(basis [K, d, d], element names)``, e.g. ``(groups.rotation_permutations(5),
    groups.rotation_names())``. One band of panels per layer (stacks of more than 4 elements wrap), one shared
    colour scale [0, 1]. ``path`` must end in ``.png`` and its folder must exist. Returns ``path`` as a Path.

    ``coefficients`` optionally maps layer name → its decomposition already computed: a ``[G, K]`` matrix
    (tensor, array or rows) or a ``{"coefficients": rows, ...}`` entry as in ``metrics.json``; layers not in
    it are decomposed here.
    """
    target = _check_path(path)
    layers = _prepare_stacks(stacks, bases, coefficients)
    pairs = min(max(layer.stack.shape[0] for layer in layers), _PAIRS_PER_LINE)
    lines = [math.ceil(layer.stack.shape[0] / pairs) for layer in layers]
    # Fixed margins in inches (tick-free panels need no automatic layout, which is slow for many axes).
    width, height = _PANEL_INCHES * 2 * pairs + 1.5, (_PANEL_INCHES + 0.3) * sum(lines) + 0.7
    figure = _new_figure(width, height, constrained=False)
    figure.subplots_adjust(
        left=0.4 / width,
        right=1 - 1.1 / width,
        bottom=0.1 / height,
        top=1 - 0.6 / height,
        wspace=0.1,
        hspace=0.25,
    )
    grid = figure.subplots(sum(lines), 2 * pairs, squeeze=False)
    for row in grid:
        for axes in row:
            axes.set_axis_off()
    image = None
    first_line = 0
    for layer, layer_lines in zip(layers, lines, strict=True):
        for i, matrix in enumerate(layer.stack):
            best = int(np.argmax(layer.coefficients[i]))
            line, pair = first_line + i // pairs, i % pairs
            learned, nearest = grid[line, 2 * pair], grid[line, 2 * pair + 1]
            learned.set_axis_on()
            nearest.set_axis_on()
            image = _heatmap(learned, matrix, f"R{i}")
            _heatmap(
                nearest, layer.basis[best], f"≈ {layer.names[best]} (c={layer.coefficients[i, best]:.2f})"
            )
            if pair == 0:
                learned.set_ylabel(layer.name if i == 0 else f"{layer.name} (cont.)", fontsize=9)
        first_line += layer_lines
    colorbar_axes = figure.add_axes((1 - 0.85 / width, 0.2, 0.15 / width, 0.6))
    figure.colorbar(image, cax=colorbar_axes, label="matrix entry")
    figure.suptitle(
        "Learned stack elements R_i and the nearest exact group element (decomposition coefficient c)"
    )
    return _save_atomic(figure, target)


def _as_matrix(value: object, where: str) -> np.ndarray:
    try:
        matrix = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{where} must be a list of rows of numbers: {error}") from error
    if matrix.ndim != 2 or matrix.shape[0] == 0:
        raise ValueError(
            f"{where} must be a non-empty list of rows (one per stack element), got shape {matrix.shape}"
        )
    if not np.isfinite(matrix).all():
        raise ValueError(f"{where} contains NaN or Inf")
    return matrix


def _prepare_decomposition(decomposition: object) -> list[tuple[str, list[str], np.ndarray]]:
    decomposition = _check_mapping(decomposition, "decomposition")
    layers = []
    for name, entry in decomposition.items():
        where = f"decomposition[{name!r}]"
        if not isinstance(entry, Mapping) or "elements" not in entry or "coefficients" not in entry:
            raise ValueError(f"{where} must be a dict with keys 'elements' and 'coefficients'")
        coefficients = _as_matrix(entry["coefficients"], f"{where}['coefficients']")
        names = _check_names(entry["elements"], f"{where}['elements']")
        if not names:
            raise ValueError(f"{where}['elements'] must name at least one element")
        if coefficients.shape[1] != len(names):
            raise ValueError(
                f"{where}: each coefficient row must have one entry per element ({len(names)}), "
                f"got rows of {coefficients.shape[1]}"
            )
        layers.append((name, names, coefficients))
    return layers


def save_decomposition_figure(decomposition: dict[str, dict], path: str | os.PathLike) -> Path:
    """One PNG of the decomposition coefficients: per layer, a matrix image (stack element × exact element),
    each cell annotated with its value while they fit, on one colour scale [0, 1].

    ``decomposition`` maps layer name → ``{"elements": [names], "coefficients": [[...] per stack element]}``
    (the layout of ``metrics.json``; extra keys are ignored). ``path`` must end in ``.png`` and its folder
    must exist. Returns ``path`` as a Path.
    """
    target = _check_path(path)
    layers = _prepare_decomposition(decomposition)
    most_elements = max(len(names) for _, names, _ in layers)
    most_rows = max(coefficients.shape[0] for _, _, coefficients in layers)
    columns = 1 if most_elements > 8 else min(len(layers), 3)
    rows = math.ceil(len(layers) / columns)
    panel_width = max(3.2, 0.5 * most_elements + 1.6)
    panel_height = max(2.6, 0.42 * most_rows + 1.6)
    figure = _new_figure(panel_width * columns + 1.0, panel_height * rows + 0.5, constrained=True)
    grid = figure.subplots(rows, columns, squeeze=False)
    for axes in grid.ravel()[len(layers) :]:
        axes.set_axis_off()
    image = None
    for axes, (name, names, coefficients) in zip(grid.ravel(), layers, strict=False):
        image = axes.imshow(
            coefficients, vmin=0.0, vmax=1.0, cmap=_CMAP, interpolation="nearest", aspect="auto"
        )
        axes.set_title(name, fontsize=10)
        tilted = len(names) > 4
        axes.set_xticks(
            range(len(names)),
            names,
            rotation=45 if tilted else 0,
            ha="right" if tilted else "center",
            fontsize=8,
        )
        axes.set_yticks(
            range(coefficients.shape[0]), [f"R{i}" for i in range(coefficients.shape[0])], fontsize=8
        )
        axes.set_xlabel("exact element", fontsize=8)
        axes.set_ylabel("learned element", fontsize=8)
        if coefficients.size <= _MAX_ANNOTATED_CELLS:
            for (i, j), value in np.ndenumerate(coefficients):
                colour = "black" if value > 0.6 else "white"  # readable on viridis' light and dark ends
                axes.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color=colour)
    figure.colorbar(image, ax=grid.ravel().tolist(), shrink=0.8, label="coefficient")
    figure.suptitle("Decomposition of each learned element onto the exact group elements")
    return _save_atomic(figure, target)


def _check_trajectory(name: str, points: object) -> list[Mapping[str, Any]]:
    where = f"trajectories[{name!r}]"
    if not isinstance(points, Sequence) or isinstance(points, str) or not points:
        raise ValueError(f"{where} must be a non-empty list of evaluations")
    for point in points:
        if not isinstance(point, Mapping) or "step" not in point or "elements" not in point:
            raise ValueError(f"{where} entries must be dicts with keys 'step' and 'elements'")
        labels = (
            [e.get("element") for e in point["elements"]] if isinstance(point["elements"], list) else None
        )
        first = [e.get("element") for e in points[0]["elements"]]
        if labels != first:
            raise ValueError(
                f"{where}: every evaluation must list the same elements, got {labels} and {first}"
            )
        for element in point["elements"]:
            mass = element.get("mass")
            if isinstance(mass, bool) or not isinstance(mass, (int, float)) or not 0 <= mass <= 1 + 1e-9:
                raise ValueError(f"{where}: each element's mass must be a number in [0, 1], got {mass!r}")
    return list(points)


def save_trajectory_figure(
    trajectories: Mapping[str, Sequence[Mapping[str, Any]]],
    path: str | os.PathLike,
    *,
    threshold: float | None = None,
    reference: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    reference_label: str = "reference run",
    max_step: float | None = None,
) -> Path:
    """One PNG: per layer, each learned element's best-element mass against training steps.

    ``trajectories`` maps layer name → evaluations ``{"step": int, "elements": [{"element": "R1",
    "assigned": "rot90", "mass": 0.93}, ...]}`` (as :func:`symkernels.training.report.trajectory` returns);
    each line's legend entry names the element it ends on. ``threshold`` draws the recovery level;
    ``reference`` maps a layer to points ``{"step": int, "mass": (one per element)}`` drawn as markers in
    each element's colour (e.g. another run's published trajectory; legend ``reference_label``). ``path``
    must end in ``.png`` and its folder must exist. ``max_step`` fixes the right end of every step axis.
    """
    target = _check_path(path)
    trajectories = _check_mapping(trajectories, "trajectories")
    layers = [(name, _check_trajectory(name, points)) for name, points in trajectories.items()]
    reference = dict(reference or {})
    columns = min(len(layers), 3)
    rows = math.ceil(len(layers) / columns)
    width, height = 4.6 * columns + 0.4, 3.3 * rows + 0.5
    # Fixed margins in inches: the automatic layout costs seconds per figure on a small machine.
    figure = _new_figure(width, height, constrained=False)
    figure.subplots_adjust(
        left=0.75 / width,
        right=1 - 0.2 / width,
        bottom=0.55 / height,
        top=1 - 0.6 / height,
        wspace=0.3,
        hspace=0.45,
    )
    grid = figure.subplots(rows, columns, squeeze=False)
    for axes in grid.ravel()[len(layers) :]:
        axes.set_axis_off()
    colours = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink")
    for axes, (name, points) in zip(grid.ravel(), layers, strict=False):
        steps = np.array([float(p["step"]) for p in points])
        for j, first in enumerate(points[0]["elements"]):
            masses = np.array([float(p["elements"][j]["mass"]) for p in points])
            colour = colours[j % len(colours)]
            end = points[-1]["elements"][j]
            label = f"{first['element']} (ends on {end['assigned']}, {end['mass']:.2f})"
            axes.plot(steps, masses, color=colour, linewidth=1.2, label=label)
            for point in reference.get(name) or ():
                mass = point["mass"][j] if j < len(point["mass"]) else None
                if mass is not None:
                    axes.plot(
                        [point["step"]], [mass], marker="o", color=colour, markersize=5, linestyle="none"
                    )
        if reference.get(name):
            axes.plot([], [], marker="o", color="grey", linestyle="none", label=reference_label)
        if threshold is not None:
            axes.axhline(threshold, color="grey", linestyle="--", linewidth=0.8)
        axes.set_ylim(0, 1.02)
        axes.set_xlim(left=0, right=max_step)
        axes.set_title(name, fontsize=10)
        axes.set_xlabel("training step", fontsize=8)
        axes.set_ylabel("mass on the best exact element", fontsize=8)
        axes.tick_params(labelsize=7)
        axes.legend(fontsize=6.5, loc="upper left")
    figure.suptitle("Recovery trajectory: each learned element's mass on its best exact group element")
    return _save_atomic(figure, target)
