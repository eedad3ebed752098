"""Toy symmetry discovery: one layer recovers shifts, quarter turns and cube rotations (full and partial)."""

from __future__ import annotations

import argparse
import json
import math
import re

import pytest
import torch

from symkernels import groups
from symkernels.toy import PROBLEMS, ToyLayer, make_problem, run_toy
from symkernels.toy_command import add_toy_arguments, format_toy_result, run_toy_command

# Everything the data use, per (problem, partial), at the default sizes (8, 5, 3).
EXPECTED_TARGETS = {
    ("shift1d", False): [f"shift{s}" for s in range(8)],
    ("shift1d", True): ["shift0", "shift1", "shift2", "shift3"],
    ("rot2d", False): ["rot0", "rot90", "rot180", "rot270"],
    ("rot2d", True): ["rot0", "rot90"],
    ("cube", False): groups.cube_rotation_names(),
}


def assert_recovered(result) -> None:
    """The verdict, and the facts it rests on, checked independently of run_toy's own bookkeeping."""
    coefficients = result.coefficients
    assert coefficients.shape == (len(result.target), len(result.element_names))
    assert bool((coefficients >= 0).all())
    torch.testing.assert_close(coefficients.sum(dim=1), torch.ones(len(result.target), dtype=torch.float64))
    best = coefficients.argmax(dim=1).tolist()
    assert [result.element_names[i] for i in best] == result.target  # each element found its own transform
    assert float(coefficients.max(dim=1).values.min()) >= result.threshold
    assert result.recovered and result.matches_labels, format_toy_result(result)


@pytest.mark.parametrize("partial", [False, True], ids=["full", "partial"])
@pytest.mark.parametrize("problem", PROBLEMS)
def test_recovers_at_the_default_seed(problem, partial):
    result = run_toy(problem, partial=partial)
    assert result.problem == problem and result.partial == partial
    assert len(result.target) == len(make_problem(problem, partial=partial).target)
    assert_recovered(result)
    assert result.seconds < 60  # CI-sized: a few seconds on two cores


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("partial", [False, True], ids=["full", "partial"])
@pytest.mark.parametrize("problem", PROBLEMS)
def test_recovers_over_seeds(problem, partial, seed):
    assert_recovered(run_toy(problem, partial=partial, seed=seed))


@pytest.mark.parametrize(("problem", "size"), [("shift1d", 16), ("rot2d", 3), ("cube", 2)])
def test_recovers_at_other_sizes(problem, size):
    result = run_toy(problem, size=size, partial=True)
    assert result.size == size
    assert_recovered(result)


def test_untrained_stack_is_not_recovered():
    result = run_toy("rot2d", steps=0)
    assert not result.recovered and not result.matches_labels
    # The identity is fixed and exact; every learned element is still near uniform over the four rotations.
    assert result.mass[0] == pytest.approx(1.0)
    assert max(result.mass[1:]) < 0.5
    assert format_toy_result(result).splitlines()[-1].startswith("NOT RECOVERED")


def test_kernel_only_training_is_not_recovered():
    # All steps inside the warm-up: the kernel fits, the logits never move.
    result = run_toy("shift1d", steps=50, warmup=50)
    assert not result.recovered
    assert max(result.mass[1:]) < 0.5


def test_verdict_follows_the_threshold():
    result = run_toy("shift1d", partial=True, threshold=1.0)
    assert not result.recovered  # soft matrices never put all their mass on one permutation
    assert result.assigned == result.target  # ...although each is clearly the right one
    assert "below 1.00" in format_toy_result(result).splitlines()[-1]


def test_runs_are_deterministic_and_leave_global_state_alone():
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    threads = torch.get_num_threads()
    first = run_toy("shift1d", partial=True, steps=150)
    assert torch.equal(torch.rand(3), expected_draw)
    assert torch.get_num_threads() == threads
    second = run_toy("shift1d", partial=True, steps=150)
    assert torch.equal(first.coefficients, second.coefficients)
    assert first.loss == second.loss


def test_learned_identity_is_read_relative_to_the_first_element():
    result = run_toy("shift1d", fix_identity=False)
    assert not result.fix_identity
    assert result.assigned[0] == "shift0" and result.mass[0] == pytest.approx(1.0, abs=1e-6)
    assert result.recovered, format_toy_result(result)


def test_problems_and_partial_subsets():
    for (problem, partial), names in EXPECTED_TARGETS.items():
        spec = make_problem(problem, partial=partial)
        assert [spec.element_names[i] for i in spec.target] == names
    full = make_problem("cube")
    partial = make_problem("cube", partial=True)
    assert full.dim == 27 and partial.target[0] == 0  # identity first: the fixed stack element
    assert len(set(partial.target)) == 16
    # The targets are exactly the 16 products z^a · x^b of the quarter turns about z and x ...
    z, x = full.basis[full.element_names.index("z:90")], full.basis[full.element_names.index("x:90")]
    targets = full.basis[partial.target]
    for a in range(4):
        for b in range(4):
            product = torch.linalg.matrix_power(z, a) @ torch.linalg.matrix_power(x, b)
            assert (targets == product).flatten(1).all(dim=1).sum() == 1
    # ... and the subset is not a subgroup: it is not closed under composition.
    closed = all(bool((targets == p @ q).flatten(1).all(dim=1).any()) for p in targets for q in targets)
    assert not closed
    assert make_problem("shift1d", size=12, partial=True).target == list(range(6))


def test_layer_expands_the_kernel_with_each_stack_element():
    layer = ToyLayer(3, 5, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.kernel.normal_()
        expanded = layer()
        stack = layer.reps()
    assert expanded.shape == (3, 2, 5)
    torch.testing.assert_close(expanded, torch.einsum("gnm,cm->gcn", stack, layer.kernel[0]))
    torch.testing.assert_close(expanded[0], layer.kernel[0])  # the fixed identity


def test_format_lists_every_element_and_a_verdict():
    result = run_toy("rot2d", partial=True)
    lines = format_toy_result(result).splitlines()
    rows = [line.split() for line in lines if re.match(r"R\d+ ", line)]
    assert [row[0] for row in rows] == ["R0", "R1"]
    assert [row[1] for row in rows] == ["rot0", "rot90"]  # the transform each element was trained on
    assert [row[2] for row in rows] == result.assigned
    assert [float(row[3]) for row in rows] == pytest.approx(result.mass, abs=5e-4)
    assert lines[-1].startswith("RECOVERED")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"problem": "hexagon"}, ValueError, "problem must be one of"),
        ({"problem": 3}, TypeError, "problem must be a str"),
        ({"partial": "yes"}, TypeError, "partial must be a bool"),
        ({"size": 3}, ValueError, "size must be >= 4"),
        ({"size": 2.5}, TypeError, "size must be an int"),
        ({"steps": -1}, ValueError, "steps must be >= 0"),
        ({"steps": True}, TypeError, "steps must be an int"),
        ({"seed": -1}, ValueError, "seed must be >= 0"),
        ({"noise": -0.1}, ValueError, "noise must be >= 0"),
        ({"noise": math.nan}, ValueError, "noise must be finite"),
        ({"threshold": 0.0}, ValueError, r"threshold must be in \(0, 1\]"),
        ({"threshold": 1.5}, ValueError, r"threshold must be in \(0, 1\]"),
        ({"channels": 0}, ValueError, "channels must be >= 1"),
        ({"samples": 0}, ValueError, "samples must be >= 1"),
        ({"warmup": -1}, ValueError, "warmup must be >= 0"),
        ({"lr": 0.0}, ValueError, "lr must be > 0"),
        ({"kernel_lr": "fast"}, TypeError, "kernel_lr must be a number"),
        ({"fix_identity": 1}, TypeError, "fix_identity must be a bool"),
        ({"threads": 0}, ValueError, "threads must be >= 1"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, error, match):
    kwargs = {"problem": "shift1d", "steps": 0, **kwargs}
    with pytest.raises(error, match=match):
        run_toy(kwargs.pop("problem"), **kwargs)


def test_rot2d_and_cube_sizes_are_checked():
    with pytest.raises(ValueError, match="size must be >= 2"):
        make_problem("rot2d", size=1)
    with pytest.raises(ValueError, match="size must be >= 2"):
        make_problem("cube", size=1)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="symkernels toy")
    add_toy_arguments(parser)
    return parser


def test_command_prints_the_table_and_writes_json(tmp_path, capsys):
    path = tmp_path / "toy.json"
    args = make_parser().parse_args(["rot2d", "--partial", "--seed", "1", "--json", str(path)])
    assert args.run is run_toy_command  # what symkernels.cli dispatches on
    assert args.run(args) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1].startswith("RECOVERED")
    saved = json.loads(path.read_text())
    assert saved["problem"] == "rot2d" and saved["partial"] is True and saved["seed"] == 1
    assert saved["recovered"] is True and saved["target"] == ["rot0", "rot90"]
    assert len(saved["coefficients"]) == 2 and len(saved["coefficients"][0]) == 4
    assert saved["assigned"] == ["rot0", "rot90"]


def test_command_exits_1_when_not_recovered(capsys):
    args = make_parser().parse_args(["shift1d", "--steps", "0", "--threads", "1"])
    assert run_toy_command(args) == 1
    assert "NOT RECOVERED" in capsys.readouterr().out


def test_command_reports_bad_values_with_exit_2(tmp_path, capsys):
    args = make_parser().parse_args(["cube", "--size", "1"])
    assert run_toy_command(args) == 2
    assert "symkernels toy: error: size must be >= 2" in capsys.readouterr().err
    args = make_parser().parse_args(
        ["shift1d", "--steps", "0", "--json", str(tmp_path / "missing" / "x.json")]
    )
    assert run_toy_command(args) == 2
    assert "symkernels toy: error:" in capsys.readouterr().err


def test_command_rejects_unknown_problems(capsys):
    with pytest.raises(SystemExit) as exit_info:
        make_parser().parse_args(["hexagon"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
