"""The marginal-likelihood trainer: run folder, bit-exact resume, the command, the optional extra."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from tests.testing import require_extras

require_extras("train", "layerwise")

from symkernels.cli import main  # noqa: E402
from symkernels.layerwise import LayerwiseConfig, train_layerwise  # noqa: E402
from symkernels.layerwise import trainer as trainer_module  # noqa: E402
from symkernels.layerwise.trainer import TIMING_KEYS, LayerwiseInterruptedError  # noqa: E402
from symkernels.training.divergence import TrainingDivergedError  # noqa: E402

TINY = {
    "task": "quadrant10",
    "source": "digits",
    "size": 8,
    "width": 2,
    "epochs": 4,
    "batch_size": 32,
    "lr": 0.05,
    "burn_in": 1,
    "marglik_every": 1,
    "hyper_steps": 5,
    "train_limit": 128,
    "test_limit": 64,
}


def _config(model: str) -> LayerwiseConfig:
    blocks = "1:1,1:2" if model == "sharing" else "1:2,2:2"
    return LayerwiseConfig.create(model=model, blocks=blocks, **TINY)


def _without_timings(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


@pytest.mark.parametrize("model", ["fc-conv", "groups", "sharing"])
def test_a_stopped_run_resumes_bit_for_bit(tmp_path, monkeypatch, model):
    config = _config(model)
    straight = train_layerwise(config, tmp_path / "straight", threads=1, quiet=True)
    written = {p.name for p in (tmp_path / "straight").iterdir()}
    assert {"config.json", "checkpoint.pt", "metrics.json", "shares.md", "shares.png"} <= written

    original_save = trainer_module._Trainer.save

    def save_then_stop(self):
        original_save(self)
        if self.epoch == 2:
            os.kill(os.getpid(), signal.SIGINT)  # as if the user pressed Ctrl-C during epoch 3

    monkeypatch.setattr(trainer_module._Trainer, "save", save_then_stop)
    with pytest.raises(LayerwiseInterruptedError, match="epoch 2.*--resume") as stopped:
        train_layerwise(config, tmp_path / "stopped", threads=1, quiet=True)
    assert stopped.value.exit_code == 128 + signal.SIGINT
    monkeypatch.setattr(trainer_module._Trainer, "save", original_save)
    resumed = train_layerwise(resume=tmp_path / "stopped", threads=1, quiet=True)

    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    assert _without_timings(straight.metrics["epochs"]) == _without_timings(resumed.metrics["epochs"])
    assert _without_timings(straight.metrics["marglik"]) == _without_timings(resumed.metrics["marglik"])
    assert len(resumed.metrics["marglik"]) == 4  # burn-in 1, then after every epoch
    layers = resumed.final_layers
    assert all(abs(sum(p["share"] for p in layer["paths"].values()) - 1) < 1e-9 for layer in layers.values())


def test_a_diverging_run_stops_and_keeps_its_last_finite_checkpoint(tmp_path, monkeypatch):
    original_epoch = trainer_module._Trainer.train_epoch

    def poisoned_in_epoch_2(self, stop):
        if self.epoch == 1:
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("nan"))  # as an overshooting step would leave it
        return original_epoch(self, stop)

    monkeypatch.setattr(trainer_module._Trainer, "train_epoch", poisoned_in_epoch_2)
    run = tmp_path / "run"
    expected = r"epoch 2: the training loss became NaN or Inf.* epoch 1 .* --lr \(this run's is 0.05\)"
    with pytest.raises(TrainingDivergedError, match=expected):
        train_layerwise(_config("fc-conv"), run, threads=1, quiet=True)
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=False)
    assert checkpoint["epoch"] == 1
    assert all(torch.isfinite(value).all() for value in checkpoint["model"].values())


def test_a_folder_holding_something_else_is_refused_before_writing(tmp_path):
    config = _config("fc-conv")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a layer-wise run"):
        train_layerwise(config, other, quiet=True)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(config.to_json())
    different = LayerwiseConfig.create(**{**config.to_dict(), "seed": 7})
    with pytest.raises(FileExistsError, match=r"differs in \['seed'\]"):
        train_layerwise(different, run, quiet=True)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        train_layerwise(resume=tmp_path / "missing", quiet=True)


def test_config_refuses_bad_values():
    with pytest.raises(ValueError, match="task must be one of"):
        LayerwiseConfig.create(task="spinning")
    with pytest.raises(ValueError, match="momentum"):
        LayerwiseConfig.create(momentum=1.0)
    with pytest.raises(TypeError, match="epochs must be an int"):
        LayerwiseConfig.create(epochs=2.5)
    with pytest.raises(ValueError, match="total stride"):
        LayerwiseConfig.create(size=12, blocks="1:2,1:2,1:2")
    with pytest.raises(TypeError, match="unknown LayerwiseConfig fields"):
        LayerwiseConfig.create(depth=3)


def test_command_trains_and_reports(tmp_path, capsys):
    run = tmp_path / "run"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items() if k != "epochs"]
    command = ["layerwise", "train", "--model", "ffc-sconv", "--blocks", "1:2,2:2", "--epochs", "2", *flags]
    code = main([*command, "--out", str(run), "--quiet", "--threads", "1"])
    assert code == 0
    assert "test accuracy" in capsys.readouterr().out
    assert json.loads((run / "config.json").read_text())["model"] == "ffc-sconv"
    out = tmp_path / "report"
    assert main(["layerwise", "report", str(run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| layer | F-FC share | S-CONV share | winner |" in printed and "| mean |" in printed
    assert (out / "shares.md").read_text() == printed and (out / "shares.png").stat().st_size > 0
    assert main(["layerwise", "train", "--resume", str(run), "--seed", "3"]) == 2
    assert "drop ['seed']" in capsys.readouterr().err


def test_missing_extra_names_the_pip_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "laplace", None)  # as if laplace-torch were not installed
    code = main(["layerwise", "train", "--source", "digits", "--out", str(tmp_path / "run")])
    assert code == 2
    assert "pip install 'symkernels[layerwise]'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_importing_symkernels_never_imports_the_curvature_libraries():
    code = (
        "import sys, symkernels, symkernels.cli, symkernels.layerwise; "
        "print(sorted(m for m in ('laplace', 'curvlinops', 'asdl') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
