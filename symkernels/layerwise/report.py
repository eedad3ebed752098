"""Reading a relaxed network: each path's effective dimension and share per layer, as a table and a figure.

A path's share of its layer is its normalised ``γ/P`` (effective dimension over parameter count, summed over
the path's tensors) among the layer's paths; the layer is called by the path with the largest share.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from symkernels.layerwise.models import path_layers
from symkernels.training.checkpoint import atomic_open

# Fixed colours per path, so that figures of different runs read alike.
PATH_COLOURS = {
    "fc": "#d95f02",
    "ffc": "#d95f02",
    "sfc": "#e6ab02",
    "conv": "#1b9e77",
    "sconv": "#66a61e",
    "gconv": "#7570b3",
    "ws": "#7570b3",
    "free": "#d95f02",
}
PATH_LABELS = {
    "fc": "FC",
    "ffc": "F-FC",
    "sfc": "S-FC",
    "conv": "CONV",
    "sconv": "S-CONV",
    "gconv": "GCONV",
    "ws": "WS",
    "free": "FREE",
}


def layer_shares(model: nn.Module, names: Sequence[str], sizes: Sequence[int], gamma: torch.Tensor) -> dict:
    """``{layer: {"paths": {path: {"parameters", "gamma", "share"}}, "winner": path}}`` for every layer of
    ``model`` with paths; ``names``/``sizes``/``gamma`` describe the tensors with a prior."""
    gamma_of = dict(zip(names, gamma.tolist(), strict=True))
    size_of = dict(zip(names, sizes, strict=True))
    layers = {}
    for layer, paths in path_layers(model):
        entries = {}
        for path in paths:
            prefix = f"{layer}.paths.{path}."
            members = [name for name in names if name.startswith(prefix)]
            if not members:
                raise ValueError(f"path {prefix[:-1]} has no parameter with a prior")
            parameters = sum(size_of[name] for name in members)
            entries[path] = {"parameters": parameters, "gamma": sum(gamma_of[name] for name in members)}
        fractions = {path: e["gamma"] / e["parameters"] for path, e in entries.items()}
        total = sum(fractions.values())
        for path, entry in entries.items():
            entry["share"] = fractions[path] / total if total > 0 else 1.0 / len(entries)
        layers[layer] = {"paths": entries, "winner": max(entries, key=lambda p: entries[p]["share"])}
    return layers


def mean_shares(layers: Mapping[str, Any]) -> dict[str, float]:
    """Each path's share averaged over the layers (paths in the order of the first layer)."""
    paths = list(next(iter(layers.values()))["paths"])
    return {
        path: sum(layer["paths"][path]["share"] for layer in layers.values()) / len(layers) for path in paths
    }


def format_share_table(layers: Mapping[str, Any], *, title: str | None = None) -> str:
    """A Markdown table: one row per layer (share of each path in %, the winner), then the mean."""
    if not layers:
        raise ValueError("no layers to tabulate")
    paths = list(next(iter(layers.values()))["paths"])
    labels = [PATH_LABELS.get(p, p) for p in paths]
    lines = [f"**{title}**", ""] if title else []
    lines.append("| layer | " + " | ".join(f"{label} share" for label in labels) + " | winner | P per path |")
    lines.append("|---" * (len(paths) + 3) + "|")
    for name, layer in layers.items():
        shares = " | ".join(f"{100 * layer['paths'][p]['share']:.1f} %" for p in paths)
        sizes = " / ".join(f"{layer['paths'][p]['parameters']:,}" for p in paths)
        lines.append(f"| {name} | {shares} | {PATH_LABELS.get(layer['winner'], layer['winner'])} | {sizes} |")
    means = mean_shares(layers)
    lines.append("| mean | " + " | ".join(f"{100 * means[p]:.1f} %" for p in paths) + " | | |")
    return "\n".join(lines) + "\n"


def save_share_figure(runs: Sequence[tuple[str, Mapping[str, Any]]], path: str | Path) -> Path:
    """One panel per ``(label, layers)``: each layer's path shares as a stacked bar (written atomically)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    target = Path(path)
    if target.suffix.lower() != ".png":
        raise ValueError(f"path must name a .png file, got {str(target)!r}")
    if not runs:
        raise ValueError("no runs to draw")
    figure = Figure(figsize=(3.2 * len(runs) + 0.8, 3.2), layout="constrained")
    FigureCanvasAgg(figure)
    axes_list = figure.subplots(1, len(runs), sharey=True, squeeze=False)[0]
    for axes, (label, layers) in zip(axes_list, runs, strict=True):
        names = list(layers)
        bottom = [0.0] * len(names)
        for path in next(iter(layers.values()))["paths"]:
            shares = [layers[name]["paths"][path]["share"] for name in names]
            axes.bar(
                range(len(names)),
                shares,
                bottom=bottom,
                color=PATH_COLOURS.get(path),
                label=PATH_LABELS.get(path, path),
                width=0.8,
            )
            bottom = [b + s for b, s in zip(bottom, shares, strict=True)]
        axes.set_xticks(range(len(names)), [str(i + 1) for i in range(len(names))])
        axes.set_xlabel("layer")
        axes.set_title(label, fontsize=9)
        axes.set_ylim(0, 1)
    axes_list[0].set_ylabel("share of the layer (normalised γ/P)")
    axes_list[-1].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    with atomic_open(target, "wb") as handle:
        figure.savefig(handle, format="png", dpi=110)
    return target
