"""Reading off what a trained stack learned: the decomposition table and the recovery verdict."""

from __future__ import annotations

import torch

from symkernels import groups
from symkernels.training import report

NAMES = groups.rotation_names()


def lift_entry(stack: torch.Tensor) -> dict:
    bases = {"lift": (groups.rotation_permutations(5), NAMES)}
    return report.decomposition({"lift": stack}, bases)["lift"]


def test_exact_rotations_in_any_order_are_recovered():
    rotations = groups.rotation_permutations(5)
    entry = lift_entry(rotations[[0, 2, 3, 1]])
    verdict = report.recovery(entry)
    assert verdict["recovered"]
    assert verdict["assigned"] == ["rot0", "rot180", "rot270", "rot90"]
    assert min(verdict["mass"]) > 0.999
    assert "recovered: every element" in report.format_decomposition("lift", entry)


def test_soft_stack_is_not_recovered():
    rotations = groups.rotation_permutations(5)
    soft = 0.6 * rotations + 0.4 / 25  # each element 60% its rotation, 40% uniform
    entry = lift_entry(soft)
    verdict = report.recovery(entry)
    assert verdict["assigned"] == NAMES
    assert not verdict["recovered"]
    assert "lowest mass" in report.format_decomposition("lift", entry)


def test_two_elements_on_one_rotation_do_not_cover_the_group():
    rotations = groups.rotation_permutations(5)
    entry = lift_entry(rotations[[0, 1, 1, 2]])
    verdict = report.recovery(entry)
    assert not verdict["recovered"]
    assert "no element on rot270" in report.format_decomposition("lift", entry)
