"""The long-experiment script ``bench/recovery.py``: its side-by-side table and verdict, and a short run that
stops on its time budget, continues with the same command and writes every result file."""

from __future__ import annotations

import dataclasses
import json

from bench import recovery


def point(step: int, masses: tuple[float, float, float], names=("rot90", "rot180", "rot270")) -> dict:
    lift = [
        {"element": f"R{i + 1}", "assigned": name, "mass": mass}
        for i, (name, mass) in enumerate(zip(names, masses, strict=True))
    ]
    return {"step": step, "epoch": step // 62, "test_accuracy": 0.9, "layers": {"lift": lift}}


def test_side_by_side_compares_at_the_authors_steps():
    points = [point(62 * e, (0.3, 0.3, 0.3)) for e in range(1, 400)] + [point(24_800, (0.7, 0.65, 0.5))]
    table = recovery.side_by_side(points, channels=12).splitlines()
    assert table[0].startswith("| step | this run (12 ch, 4,000 digits)")
    rows = {line.split("|")[1].strip(): line for line in table[2:]}
    assert list(rows) == [
        "1,000",
        "2,500",
        "5,000",
        "10,000",
        "15,000",
        "23,000",
        "24,800",
        "47,000",
        "70,000",
        "94,000",
    ]
    # At step 23,000 the latest evaluation at or before it (step 22,940) stands next to the authors' row.
    assert "rot90 0.30 / rot180 0.30 / rot270 0.30 (step 22,940)" in rows["23,000"]
    assert rows["23,000"].endswith("| 0.64 / 0.66 / 0.48 |")
    assert "rot90 0.70 / rot180 0.65 / rot270 0.50" in rows["24,800"]
    assert "not reached" in rows["47,000"] and rows["47,000"].endswith("| 0.90 / 0.90 / 0.63 |")


def test_verdict_needs_every_element_on_a_distinct_quarter_turn():
    assert recovery.verdict_line(point(1, (0.9, 0.85, 0.95))["layers"]["lift"], 0.8).startswith("RECOVERED")
    low = recovery.verdict_line(point(1, (0.9, 0.79, 0.95))["layers"]["lift"], 0.8)
    assert low.startswith("not recovered") and "lowest mass 0.790" in low
    twice = recovery.verdict_line(
        point(1, (0.9, 0.9, 0.9), ("rot90", "rot90", "rot270"))["layers"]["lift"], 0.8
    )
    assert twice.startswith("not recovered") and "rot0, rot270, rot90" in twice
    on_identity = recovery.verdict_line(
        point(1, (0.9, 0.9, 0.9), ("rot0", "rot90", "rot270"))["layers"]["lift"], 0.8
    )
    assert on_identity.startswith("not recovered")


def test_a_stopped_run_continues_with_the_same_command_and_writes_every_result(tmp_path, capsys, monkeypatch):
    paper = recovery.experiment
    # The paper's configuration on a few digits only (two steps per epoch), to keep the test short.
    monkeypatch.setattr(
        recovery, "experiment", lambda args: dataclasses.replace(paper(args), train_limit=128, test_limit=64)
    )
    out, run = tmp_path / "recovery-test", tmp_path / "run"
    command = [
        "--steps",
        "100",
        "--channels",
        "1",
        "--threads",
        "1",
        "--out",
        str(out),
        "--run-dir",
        str(run),
    ]
    assert recovery.main([*command, "--max-minutes", "0.0001"]) == 0
    assert "--max-minutes 0.0001 reached; continue with" in capsys.readouterr().out
    first = json.loads((out / "trajectory.json").read_text())
    assert first["complete"] is False and [p["step"] for p in first["trajectory"]] == [2]
    assert first["config"]["epochs"] == 2 and first["config"]["channels"] == 1
    assert (out / "trajectory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert recovery.main(command) == 0
    printed = capsys.readouterr().out
    record = json.loads((out / "trajectory.json").read_text())
    assert record["complete"] is True and [p["step"] for p in record["trajectory"]] == [2, 4]
    assert record["trajectory"][0] == first["trajectory"][0]  # continued, not restarted
    lift = record["trajectory"][-1]["layers"]["lift"]
    assert [e["element"] for e in lift] == ["R1", "R2", "R3"]
    assert all(e["assigned"] in ("rot0", "rot90", "rot180", "rot270") and 0 < e["mass"] <= 1 for e in lift)
    assert set(record["trajectory"][-1]["layers"]) == {"lift", "convs.0", "convs.1", "convs.2", "convs.3"}
    assert record["verdict"].startswith(("RECOVERED", "not recovered"))
    assert record["commits"] and record["machine"]["threads"] == 1 and record["target_steps"] == 100
    assert json.loads((out / "config.json").read_text()) == record["config"]
    summary = (out / "summary.md").read_text()
    assert "| 4 |" in summary and "| 23,000 | not reached |" in summary and "Lift at step 4" in summary
    assert summary.splitlines()[0] in printed
