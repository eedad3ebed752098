"""Figures of learned stacks and decompositions: valid PNGs, the right nearest elements, atomic writes."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from symkernels import analysis, groups, plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the IHDR chunk, after checking the signature and that the image decodes."""
    from PIL import Image

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    with Image.open(path) as image:
        image.load()  # decodes every chunk: a truncated or corrupt file raises here
        assert image.format == "PNG"
    return struct.unpack(">II", data[16:24])


def mix(basis: torch.Tensor, index: int, weight: float) -> torch.Tensor:
    """``weight`` on one basis element, the rest spread evenly over the others (doubly stochastic)."""
    others = (basis.sum(0) - basis[index]) / (basis.shape[0] - 1)
    return weight * basis[index] + (1 - weight) * others


def pair(basis: torch.Tensor, index: int, weight: float) -> torch.Tensor:
    """``weight`` on one basis element, the rest on the next one (a cheap decomposition for large groups)."""
    return weight * basis[index] + (1 - weight) * basis[(index + 1) % basis.shape[0]]


def lifting_and_group_stacks(kernel_size: int = 3):
    rotations, shift_twist = groups.rotation_permutations(kernel_size), groups.shift_twist(kernel_size)
    stacks = {
        # A lifting stack close to the rotations, in a shuffled order; a group-conv stack near uniform.
        "lift": torch.stack([mix(rotations, i, w) for i, w in [(0, 1.0), (2, 0.9), (3, 0.7), (1, 0.6)]]),
        "convs.0": torch.stack([mix(shift_twist, i, 0.4) for i in (0, 1, 1, 3)]),
    }
    bases = {"lift": (rotations, groups.rotation_names()), "convs.0": (shift_twist, groups.rotation_names())}
    return stacks, bases


def decomposition_of(stacks, bases) -> dict[str, dict]:
    return {
        name: {"elements": bases[name][1], "coefficients": analysis.decompose(stack, bases[name][0]).tolist()}
        for name, stack in stacks.items()
    }


def test_stack_figure_is_a_readable_png(tmp_path):
    stacks, bases = lifting_and_group_stacks()
    target = tmp_path / "stacks.png"
    assert plots.save_stack_figure(stacks, bases, str(target)) == target
    width, height = png_size(target)
    assert 800 <= width <= 2500 and 250 <= height <= 1500
    assert 5_000 < target.stat().st_size < 2_000_000
    assert os.listdir(tmp_path) == ["stacks.png"]  # no temporary file left behind
    assert target.stat().st_mode & 0o777 == 0o644


def test_each_learned_element_sits_next_to_its_largest_coefficient(tmp_path, monkeypatch):
    stacks, bases = lifting_and_group_stacks()
    drawn = []
    original = plots._heatmap

    def record(axes, matrix, title):
        drawn.append((matrix, title))
        return original(axes, matrix, title)

    monkeypatch.setattr(plots, "_heatmap", record)
    plots.save_stack_figure(stacks, bases, tmp_path / "stacks.png")
    assert len(drawn) == 2 * 8
    pairs = iter(drawn)
    for name, stack in stacks.items():
        basis, names = bases[name]
        coefficients = analysis.decompose(stack, basis)
        for i in range(stack.shape[0]):
            (learned, learned_title), (nearest, nearest_title) = next(pairs), next(pairs)
            best = int(coefficients[i].argmax())
            assert learned_title == f"R{i}"
            torch.testing.assert_close(torch.from_numpy(learned), stack[i].double())
            torch.testing.assert_close(torch.from_numpy(nearest), basis[best].double())
            assert nearest_title == f"≈ {names[best]} (c={coefficients[i, best]:.2f})"
    # The lifting stack was built in the order rot0, rot180, rot270, rot90, with falling weights.
    lift_titles = [title for _, title in drawn[1:8:2]]
    assert lift_titles == ["≈ rot0 (c=1.00)", "≈ rot180 (c=0.90)", "≈ rot270 (c=0.70)", "≈ rot90 (c=0.60)"]


def test_paper_sized_layers_and_large_groups_stay_readable(tmp_path):
    # Five layers as in the MNIST model (a 25×25 lifting stack, four 100×100 group-conv stacks).
    rotations, shift_twist = groups.rotation_permutations(5), groups.shift_twist(5)
    stacks = {"lift": torch.stack([mix(rotations, i, 0.8) for i in range(4)])}
    bases = {"lift": (rotations, groups.rotation_names())}
    for layer in range(4):
        stacks[f"convs.{layer}"] = torch.stack([mix(shift_twist, i, 0.5) for i in range(4)])
        bases[f"convs.{layer}"] = (shift_twist, groups.rotation_names())
    width, height = png_size(plots.save_stack_figure(stacks, bases, tmp_path / "mnist.png"))
    assert width <= 2000 and height <= 1500 and height > width / 2
    # Eight dihedral elements wrap onto two lines instead of one very wide row.
    dihedral = groups.dihedral_permutations(3)
    stack = {"d4": torch.stack([pair(dihedral, i, 0.9) for i in range(8)])}
    d4_basis = {"d4": (dihedral, groups.dihedral_names())}
    width, height = png_size(plots.save_stack_figure(stack, d4_basis, tmp_path / "d4.png"))
    assert width <= 1500 and height >= 400


def test_decomposition_figure_is_a_readable_png(tmp_path):
    stacks, bases = lifting_and_group_stacks()
    decomposition = decomposition_of(stacks, bases)
    decomposition["lift"]["residual"] = [0.0, 0.1, 0.2, 0.3]  # extra keys are ignored
    target = tmp_path / "decomposition.png"
    assert plots.save_decomposition_figure(decomposition, target) == target
    width, height = png_size(target)
    assert 500 <= width <= 2500 and 200 <= height <= 1500
    assert os.listdir(tmp_path) == ["decomposition.png"]
    # Many elements (here 12 shifts, 2 layers): one panel per line keeps the figure narrow.
    shifts = groups.cyclic_shifts(12)
    stack = torch.stack([pair(shifts, i, 0.9) for i in range(12)])
    names = groups.shift_names(12)
    many = decomposition_of({"a": stack, "b": stack.flip(0)}, {"a": (shifts, names), "b": (shifts, names)})
    width, height = png_size(plots.save_decomposition_figure(many, tmp_path / "shifts.png"))
    assert width <= 2500 and height > width / 2


def test_an_existing_file_is_replaced(tmp_path):
    target = tmp_path / "figure.png"
    target.write_bytes(b"old")
    stacks, bases = lifting_and_group_stacks()
    plots.save_decomposition_figure(decomposition_of(stacks, bases), target)
    assert target.read_bytes()[:8] == PNG_SIGNATURE
    assert os.listdir(tmp_path) == ["figure.png"]


@pytest.mark.parametrize("which", ["stacks", "decomposition"])
def test_a_failed_save_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch, which):
    from matplotlib.figure import Figure

    target = tmp_path / "figure.png"
    target.write_bytes(b"old")

    def broken_savefig(self, handle, **kwargs):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    stacks, bases = lifting_and_group_stacks()
    with pytest.raises(OSError, match="disk full"):
        if which == "stacks":
            plots.save_stack_figure(stacks, bases, target)
        else:
            plots.save_decomposition_figure(decomposition_of(stacks, bases), target)
    assert os.listdir(tmp_path) == ["figure.png"]
    assert target.read_bytes() == b"old"


def test_stack_figure_rejects_mismatched_inputs(tmp_path):
    stacks, bases = lifting_and_group_stacks()
    target = tmp_path / "stacks.png"
    rotations = groups.rotation_permutations(3)
    cases = [
        (ValueError, "no basis for \\['convs.0'\\]", stacks, {"lift": bases["lift"]}),
        (ValueError, "no stack for \\['extra'\\]", stacks, {**bases, "extra": bases["lift"]}),
        (ValueError, "disagree on d", stacks, {**bases, "lift": bases["convs.0"]}),
        (ValueError, "3 names for 4 basis elements", stacks, {**bases, "lift": (rotations, ["a", "b", "c"])}),
        (TypeError, "list of str", stacks, {**bases, "lift": (rotations, [0, 1, 2, 3])}),
        (TypeError, "tuple", stacks, {**bases, "lift": rotations}),
        (TypeError, "must be a torch.Tensor", {**stacks, "lift": stacks["lift"].tolist()}, bases),
        (ValueError, "shape \\[G, d, d\\]", {**stacks, "lift": stacks["lift"][0]}, bases),
        (ValueError, "at least one layer", {}, {}),
        (TypeError, "dict keyed by layer name", [stacks["lift"]], bases),
        (
            ValueError,
            "layer 'lift': reps contains NaN",
            {**stacks, "lift": stacks["lift"] * float("nan")},
            bases,
        ),
    ]
    for error, message, bad_stacks, bad_bases in cases:
        with pytest.raises(error, match=message):
            plots.save_stack_figure(bad_stacks, bad_bases, target)
    assert os.listdir(tmp_path) == []


def test_decomposition_figure_rejects_mismatched_inputs(tmp_path):
    target = tmp_path / "decomposition.png"
    good = {"elements": ["a", "b"], "coefficients": [[1.0, 0.0], [0.3, 0.7]]}
    cases = [
        (ValueError, "one entry per element \\(2\\)", {"lift": {**good, "coefficients": [[1.0, 0.0, 0.0]]}}),
        (ValueError, "'elements' and 'coefficients'", {"lift": {"elements": ["a"]}}),
        (ValueError, "NaN or Inf", {"lift": {**good, "coefficients": [[1.0, float("nan")], [0.0, 1.0]]}}),
        (TypeError, "list of rows of numbers", {"lift": {**good, "coefficients": [[1.0, 0.0], [0.5]]}}),
        (ValueError, "non-empty list of rows", {"lift": {**good, "coefficients": []}}),
        (TypeError, "list of str", {"lift": {**good, "elements": "ab"}}),
        (ValueError, "at least one element", {"lift": {"elements": [], "coefficients": [[]]}}),
        (ValueError, "at least one layer", {}),
        (TypeError, "keyed by layer name", {0: good}),
    ]
    for error, message, decomposition in cases:
        with pytest.raises(error, match=message):
            plots.save_decomposition_figure(decomposition, target)
    assert os.listdir(tmp_path) == []


def test_paths_are_checked_before_drawing(tmp_path):
    decomposition = {"lift": {"elements": ["a"], "coefficients": [[1.0]]}}
    with pytest.raises(ValueError, match=r"\.png"):
        plots.save_decomposition_figure(decomposition, tmp_path / "figure.jpg")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        plots.save_decomposition_figure(decomposition, tmp_path / "missing" / "figure.png")
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(IsADirectoryError):
        plots.save_decomposition_figure(decomposition, tmp_path / "folder.png")
    with pytest.raises(TypeError, match="path must be a str"):
        plots.save_decomposition_figure(decomposition, 3)
    assert os.listdir(tmp_path) == ["folder.png"]


def test_importing_symkernels_does_not_load_matplotlib():
    script = "import sys, symkernels, symkernels.plots, symkernels.export; print('matplotlib' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def trajectory_points(steps: list[int], masses: list[tuple[float, float, float]]) -> list[dict]:
    return [
        {
            "step": step,
            "elements": [
                {"element": f"R{i + 1}", "assigned": name, "mass": mass}
                for i, (name, mass) in enumerate(zip(("rot90", "rot180", "rot270"), row, strict=True))
            ],
        }
        for step, row in zip(steps, masses, strict=True)
    ]


def test_trajectory_figure_is_a_readable_png_with_a_reference(tmp_path):
    lift = trajectory_points([100, 200, 300], [(0.3, 0.3, 0.25), (0.5, 0.4, 0.3), (0.7, 0.6, 0.4)])
    conv = trajectory_points([100, 200, 300], [(0.26, 0.25, 0.25)] * 3)
    reference = {"lift": [{"step": 250, "mass": (0.64, 0.66, 0.48)}]}
    target = plots.save_trajectory_figure(
        {"lift": lift, "convs.0": conv}, tmp_path / "trajectory.png", threshold=0.8, reference=reference
    )
    width, height = png_size(target)
    assert width > 500 and 300 < height < 1000
    # One panel per layer: a third layer keeps the figure on one row, a fourth starts a second row.
    layers = {name: conv for name in ("a", "b", "c", "d")}
    assert png_size(plots.save_trajectory_figure(layers, tmp_path / "four.png"))[1] > height


def test_trajectory_figure_rejects_bad_input(tmp_path):
    good = trajectory_points([1, 2], [(0.3, 0.3, 0.3), (0.4, 0.4, 0.4)])
    with pytest.raises(ValueError, match="must hold at least one layer"):
        plots.save_trajectory_figure({}, tmp_path / "t.png")
    with pytest.raises(ValueError, match="non-empty list of evaluations"):
        plots.save_trajectory_figure({"lift": []}, tmp_path / "t.png")
    with pytest.raises(ValueError, match=r"mass must be a number in \[0, 1\]"):
        plots.save_trajectory_figure({"lift": trajectory_points([1], [(0.3, 1.5, 0.3)])}, tmp_path / "t.png")
    changed = [good[0], {"step": 2, "elements": good[1]["elements"][:2]}]
    with pytest.raises(ValueError, match="must list the same elements"):
        plots.save_trajectory_figure({"lift": changed}, tmp_path / "t.png")
    with pytest.raises(ValueError, match="keys 'step' and 'elements'"):
        plots.save_trajectory_figure({"lift": [{"elements": []}]}, tmp_path / "t.png")
    with pytest.raises(ValueError, match=r"must name a \.png file"):
        plots.save_trajectory_figure({"lift": good}, tmp_path / "t.jpg")
    assert not list(tmp_path.iterdir())
