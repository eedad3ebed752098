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


def metrics_with(rows_per_epoch: list[list[list[float]]], steps_per_epoch: int = 10) -> dict:
    """A metrics.json content whose lift decomposition follows ``rows_per_epoch`` (identity fixed)."""
    return {
        "group_elements": {"lift": NAMES},
        "learned_rows": {"lift": [1, 2, 3]},
        "epochs": [
            {
                "epoch": e + 1,
                "step": (e + 1) * steps_per_epoch,
                "test_accuracy": 0.5,
                "decomposition": {"lift": rows},
            }
            for e, rows in enumerate(rows_per_epoch)
        ],
    }


IDENTITY_ROW = [1.0, 0.0, 0.0, 0.0]


def test_trajectory_follows_each_learned_element_and_skips_the_fixed_identity():
    early = [IDENTITY_ROW, [0.3, 0.4, 0.2, 0.1], [0.25, 0.25, 0.3, 0.2], [0.1, 0.2, 0.3, 0.4]]
    late = [IDENTITY_ROW, [0.0, 0.9, 0.1, 0.0], [0.0, 0.05, 0.85, 0.1], [0.05, 0.0, 0.0, 0.95]]
    points = report.trajectory(metrics_with([early, late]))
    assert [p["step"] for p in points] == [10, 20]
    assert points[0]["elements"] == [
        {"element": "R1", "assigned": "rot90", "mass": 0.4},
        {"element": "R2", "assigned": "rot180", "mass": 0.3},
        {"element": "R3", "assigned": "rot270", "mass": 0.4},
    ]
    assert [e["mass"] for e in points[1]["elements"]] == [0.9, 0.85, 0.95]
    table = report.format_trajectory(points)
    assert table.splitlines()[-1].split() == [
        "20",
        "2",
        "0.5000",
        "rot90",
        "0.900",
        "rot180",
        "0.850",
        "rot270",
        "0.950",
    ]
    assert report.trajectory({"epochs": []}) == []  # a run without weight-sharing layers


def test_format_trajectory_shows_at_most_max_lines_evaluations_and_always_the_last():
    row = [IDENTITY_ROW, [0.3, 0.4, 0.2, 0.1], [0.25, 0.25, 0.3, 0.2], [0.1, 0.2, 0.3, 0.4]]
    points = report.trajectory(metrics_with([row] * 30))
    lines = report.format_trajectory(points, max_lines=5).splitlines()[2:]
    assert [int(line.split()[0]) for line in lines] == [10, 80, 150, 230, 300]


def test_verdict_names_each_element_its_rotation_and_its_mass():
    rotations = groups.rotation_permutations(5)
    text = report.format_decomposition("lift", lift_entry(rotations[[0, 2, 2, 1]]))
    assert "best: R0 on rot0 (1.000), R1 on rot180 (1.000), R2 on rot180 (1.000), R3 on rot90 (1.000)" in text
