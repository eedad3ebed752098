"""``symkernels export``: plain-convolution programs equal to the soft model, hardened variant, reports."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.testing import require_extras

require_extras("train")

from symkernels import cli, export  # noqa: E402
from symkernels.training import RuntimeOptions, TrainConfig, load_run, train  # noqa: E402
from symkernels.training.datasets import prepare_data  # noqa: E402

# Float tolerance for two float32 computations of the same logits (conv2d on the same expanded kernel).
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    config = TrainConfig.for_dataset(
        "digits", epochs=2, channels=4, num_layers=1, batch_size=16, train_limit=96, test_limit=40
    )
    out = tmp_path_factory.mktemp("export") / "run"
    train(config, RuntimeOptions(threads=1, quiet=True), out=out)
    return out


@pytest.fixture(scope="module")
def test_images(run_dir):
    return prepare_data(load_run(run_dir).config).test_images


def test_export_writes_a_program_equal_to_the_soft_model(run_dir, test_images, capsys):
    assert cli.main(["export", str(run_dir), "--threads", "1"]) == 0
    table = capsys.readouterr().out
    for name in ("soft", "exported", "hardened"):
        assert any(line.split()[:1] == [name] for line in table.splitlines()), table
    report = json.loads((run_dir / "export.json").read_text())
    assert report["file"] == str(run_dir / "exported.pt2") and report["harden"] is False
    assert report["epoch"] == 2 and report["test_images"] == 40
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert report["accuracy"]["soft"] == metrics["test_accuracy"]  # same model, same fixed test set
    assert report["max_abs_logit_difference"] <= 1e-5
    assert set(report["accuracy"]) == {"soft", "exported", "hardened"}
    soft = load_run(run_dir).model
    program = torch.export.load(str(run_dir / "exported.pt2")).module()
    with torch.no_grad():
        torch.testing.assert_close(program(test_images), soft(test_images), **TOLERANCE)
        torch.testing.assert_close(program(test_images[:3]), soft(test_images[:3]), **TOLERANCE)  # any batch


def test_export_harden_saves_the_snapped_model(run_dir, test_images, tmp_path, capsys):
    target = tmp_path / "hard.pt2"
    assert cli.main(["export", str(run_dir), "--harden", "--out", str(target), "--threads", "1"]) == 0
    assert "wrote the hardened model" in capsys.readouterr().out
    report = json.loads((run_dir / "export.json").read_text())
    assert report["harden"] is True and report["file"] == str(target)
    hardened = export.harden_model(load_run(run_dir).model).eval()  # the soft forward on snapped stacks
    program = torch.export.load(str(target)).module()
    with torch.no_grad():
        torch.testing.assert_close(program(test_images), hardened(test_images), **TOLERANCE)
        assert not torch.allclose(program(test_images), load_run(run_dir).model(test_images), **TOLERANCE)


def test_exported_program_runs_without_symkernels(run_dir):
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["symkernels"] = None  # any import of symkernels now fails
        import torch
        program = torch.export.load({str(run_dir / "exported.pt2")!r}).module()
        print(tuple(program(torch.rand(3, 1, 28, 28)).shape))
        """
    )
    if not (run_dir / "exported.pt2").exists():
        assert cli.main(["export", str(run_dir), "--threads", "1"]) == 0
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(3, 10)"


def test_export_errors_are_clear(run_dir, tmp_path, capsys):
    assert cli.main(["export", str(tmp_path)]) == 2
    assert "not a symkernels run folder" in capsys.readouterr().err
    assert cli.main(["export", str(run_dir), "--out", str(tmp_path / "model.txt")]) == 2
    assert "must name a .pt2 file" in capsys.readouterr().err
    assert cli.main(["export", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
