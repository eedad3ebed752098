"""``symkernels train``: bit-exact resume (also after a SIGINT), DDP equivalence, run folders, metrics."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.testing import require_extras

require_extras("train")

from symkernels import backends, cli, groups  # noqa: E402
from symkernels.training import (  # noqa: E402
    DATASET_DEFAULTS,
    TIMING_KEYS,
    RuntimeOptions,
    TrainConfig,
    TrainingInterruptedError,
    distributed,
    report,
    resume,
    train,
)
from symkernels.training.checkpoint import atomic_save, load_checkpoint  # noqa: E402
from symkernels.training.interrupt import StopRequest  # noqa: E402

# Small enough for seconds per run, large enough that an epoch lasts several steps (the kill test needs time
# to land its signal inside epoch 3).
TINY = {"channels": 4, "num_layers": 1, "batch_size": 16, "train_limit": 128, "test_limit": 48}
TINY_FLAGS = [
    "--dataset",
    "digits",
    "--channels",
    "4",
    "--num-layers",
    "1",
    "--batch-size",
    "16",
    "--train-limit",
    "128",
    "--test-limit",
    "48",
]
QUIET = RuntimeOptions(threads=1, quiet=True)


def tiny_config(**overrides) -> TrainConfig:
    return TrainConfig.for_dataset("digits", **{**TINY, "epochs": 4, **overrides})


def comparable(history: list[dict]) -> list[dict]:
    """Per-epoch metrics without the timing fields (they measure the machine, not the run)."""
    return [{k: v for k, v in epoch.items() if k not in TIMING_KEYS} for epoch in history]


def assert_same_state(a: dict, b: dict) -> None:
    assert a["epoch"] == b["epoch"]
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        for key in sa:
            assert torch.equal(torch.as_tensor(sa[key]), torch.as_tensor(sb[key])), key
    assert comparable(a["history"]) == comparable(b["history"])
    assert torch.equal(a["rng"]["data"]["order"], b["rng"]["data"]["order"])
    assert torch.equal(a["rng"]["data"]["augment"], b["rng"]["data"]["augment"])


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted 4-epoch run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train(tiny_config(), QUIET, out=out)
    return out


def test_two_epochs_then_resume_equals_four_uninterrupted(reference, tmp_path):
    out = tmp_path / "run"
    first = train(tiny_config(epochs=2), QUIET, out=out)
    assert len(first.history) == 2 and load_checkpoint(out / "checkpoint.pt")["epoch"] == 2
    resumed = resume(out, QUIET, given={"epochs": 4})
    assert [e["epoch"] for e in resumed.history] == [1, 2, 3, 4]
    assert_same_state(load_checkpoint(out / "checkpoint.pt"), load_checkpoint(reference / "checkpoint.pt"))
    ours, theirs = (json.loads((d / "metrics.json").read_text()) for d in (out, reference))
    assert comparable(ours["epochs"]) == comparable(theirs["epochs"])
    assert (
        ours["test_accuracy"] == theirs["test_accuracy"] and ours["decomposition"] == theirs["decomposition"]
    )


def test_sigint_during_epoch_3_keeps_epoch_2_and_resume_is_bit_for_bit(reference, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "symkernels", "train", *TINY_FLAGS, "--epochs", "4"]
    command += ["--out", str(out), "--threads", "1", "--quiet"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        completed = 0
        while completed < 2:
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the run did not reach epoch 2"
            if (out / "metrics.json").is_file():  # written atomically after each epoch's checkpoint
                completed = json.loads((out / "metrics.json").read_text())["epochs_completed"]
            time.sleep(0.005)
        assert completed == 2
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signal.SIGINT, stderr
    assert f"symkernels train --resume {out}" in stderr and "epoch 2" in stderr
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 2
    assert json.loads((out / "metrics.json").read_text())["complete"] is False
    assert not (out / "stacks.png").exists()  # final outputs are written only by a finished run
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    resume(out, QUIET)
    assert_same_state(load_checkpoint(out / "checkpoint.pt"), load_checkpoint(reference / "checkpoint.pt"))


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_on_the_same_global_batch(tmp_path):
    # float64: both runs compute the same math, only the order of the gradient sums differs (DDP averages
    # two half-batch means). Adam divides by sqrt(v) + 1e-8, which can amplify rounding in near-zero logit
    # gradients by up to lr/eps = 1e7; in float64 (rounding ~1e-16) that stays below ~1e-9. Measured: 3e-13.
    flags = [*TINY_FLAGS, "--train-limit", "64", "--test-limit", "32", "--epochs", "2", "--dtype", "float64"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "symkernels", "train", *flags, "--out", str(tmp_path / "ddp"), "--threads", "1"]
    command += ["--device", "cpu", "--quiet"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    single = train(
        tiny_config(train_limit=64, test_limit=32, epochs=2, dtype="float64"), QUIET, out=tmp_path / "one"
    )
    a, b = (
        load_checkpoint(tmp_path / "ddp" / "checkpoint.pt"),
        load_checkpoint(single.run_dir / "checkpoint.pt"),
    )
    for name in a["model"]:
        assert a["model"][name].dtype == torch.float64
        torch.testing.assert_close(a["model"][name], b["model"][name], rtol=0, atol=1e-10, msg=name)
    for x, y in zip(a["history"], b["history"], strict=True):
        for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "norm"):
            assert x[key] == pytest.approx(y[key], rel=1e-10), key
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["complete"]


def test_metrics_json_checkpoint_and_plots(reference):
    metrics = json.loads((reference / "metrics.json").read_text())
    assert metrics["complete"] and metrics["epochs_completed"] == 4
    assert TrainConfig.from_dict(metrics["config"]) == tiny_config()
    assert TrainConfig.load(reference / "config.json") == tiny_config()
    cpu = torch.device("cpu")
    assert metrics["backend"] == backends.resolve(None, cpu, torch.float32)
    assert metrics["backend"] in backends.BACKENDS
    assert metrics["versions"]["torch"] == torch.__version__
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2, 3, 4]
    for epoch in metrics["epochs"]:
        assert epoch["seconds_per_step"] > 0 and epoch["steps"] == 128 // 16
        assert 0 <= epoch["train_accuracy"] <= 1 and 0 <= epoch["test_accuracy"] <= 1
        assert epoch["norm"] > 0 and epoch["entropy"] > 0 and epoch["train_loss"] > 0
    assert metrics["test_accuracy"] == metrics["epochs"][-1]["test_accuracy"]
    decomposition = metrics["decomposition"]
    assert list(decomposition) == ["lift", "convs.0"]
    assert decomposition["lift"]["elements"] == groups.rotation_names()
    assert decomposition["convs.0"]["elements"] == [f"shift-twist r{g}" for g in range(4)]
    for layer in decomposition.values():
        rows = torch.tensor(layer["coefficients"], dtype=torch.float64)
        assert rows.shape == (4, 4) and bool((rows >= 0).all())
        torch.testing.assert_close(rows.sum(dim=1), torch.ones(4, dtype=rows.dtype))
        assert rows[0].tolist() == pytest.approx([1, 0, 0, 0], abs=1e-9)  # the fixed identity
    assert load_checkpoint(reference / "checkpoint.pt")["epoch"] == 4
    for name in ("stacks.png", "decomposition.png", "trajectory.png"):
        assert (reference / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_epoch_records_the_decomposition_of_every_layer(reference):
    metrics = json.loads((reference / "metrics.json").read_text())
    assert metrics["group_elements"] == {
        "lift": groups.rotation_names(),
        "convs.0": [f"shift-twist r{g}" for g in range(4)],
    }
    assert metrics["learned_rows"] == {"lift": [1, 2, 3], "convs.0": [1, 2, 3]}  # R0: the fixed identity
    assert [e["step"] for e in metrics["epochs"]] == [8, 16, 24, 32]
    for epoch in metrics["epochs"]:
        assert set(epoch["decomposition"]) == {"lift", "convs.0"}
        rows = torch.tensor(epoch["decomposition"]["lift"], dtype=torch.float64)
        assert rows.shape == (4, 4)
        torch.testing.assert_close(rows.sum(dim=1), torch.ones(4, dtype=rows.dtype))
    # The last epoch's rows are the final decomposition (the same model state).
    assert metrics["epochs"][-1]["decomposition"]["lift"] == metrics["decomposition"]["lift"]["coefficients"]
    points = report.trajectory(metrics, "lift")
    assert [p["step"] for p in points] == [8, 16, 24, 32]
    assert [e["element"] for e in points[0]["elements"]] == ["R1", "R2", "R3"]
    first = metrics["epochs"][0]["decomposition"]["lift"][1]
    assert points[0]["elements"][0]["mass"] == max(first)
    assert points[0]["elements"][0]["assigned"] == groups.rotation_names()[first.index(max(first))]


def test_on_epoch_sees_each_epoch_after_its_checkpoint(tmp_path):
    seen = []

    def after_epoch(metrics: dict) -> None:
        seen.append(
            (metrics["epochs_completed"], load_checkpoint(tmp_path / "run" / "checkpoint.pt")["epoch"])
        )

    train(
        tiny_config(epochs=2, train_limit=32, test_limit=16),
        QUIET,
        out=tmp_path / "run",
        on_epoch=after_epoch,
    )
    assert seen == [(1, 1), (2, 2)]


def test_flips_with_eight_element_stacks_read_the_lift_against_the_dihedral_group(tmp_path):
    config = tiny_config(group_size=8, flip=True, epochs=1, train_limit=32, test_limit=16, kernel_size=3)
    decomposition = train(config, QUIET, out=tmp_path / "run").metrics["decomposition"]
    # The group-conv layers act on 8 input group elements: no shift-twist basis, so only the lift is read.
    assert list(decomposition) == ["lift"]
    assert decomposition["lift"]["elements"] == groups.dihedral_names()
    assert len(decomposition["lift"]["coefficients"]) == 8


@pytest.mark.parametrize("model", ["gcnn", "cnn", "wsresnet", "resnet"])
def test_other_models_train_and_report(model, tmp_path):
    config = tiny_config(model=model, epochs=1, train_limit=32, test_limit=16, kernel_size=3)
    caller_state = torch.get_rng_state()
    result = train(config, QUIET, out=tmp_path / "run")
    assert torch.equal(torch.get_rng_state(), caller_state)  # the run seeds its own dropout stream
    assert torch.isfinite(torch.tensor(result.history[0]["train_loss"]))
    decomposition = result.metrics["decomposition"]
    if model in ("cnn", "resnet"):
        assert decomposition == {} and not (tmp_path / "run" / "stacks.png").exists()
    elif model == "wsresnet":
        assert list(decomposition)[0] == "lift" and "blocks.1.conv2" in decomposition
    else:  # exact rotations: element g of each layer is exactly basis element g
        for layer in decomposition.values():
            coefficients = torch.tensor(layer["coefficients"], dtype=torch.float64)
            torch.testing.assert_close(coefficients, torch.eye(4, dtype=torch.float64))


def test_cli_train_refuses_a_foreign_folder_and_touches_nothing(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    code = cli.main(
        ["train", *TINY_FLAGS, "--epochs", "1", "--out", str(tmp_path), "--quiet", "--threads", "1"]
    )
    assert code == 2 and "is not empty and is not a symkernels run" in capsys.readouterr().err
    assert folder_bytes(tmp_path) == {"notes.txt": b"mine"}


def test_cli_out_continues_the_same_config_and_refuses_another(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", *TINY_FLAGS, "--train-limit", "32", "--epochs", "1", "--out", str(out), "--threads", "1"]
    assert cli.main([*args, "--quiet"]) == 0
    assert "test accuracy" in capsys.readouterr().out
    before = load_checkpoint(out / "checkpoint.pt")
    assert cli.main(args) == 0  # the same command again: the run is complete, nothing retrains
    assert "resuming after epoch 1" in capsys.readouterr().out
    assert_same_state(load_checkpoint(out / "checkpoint.pt"), before)
    snapshot = folder_bytes(out)
    assert cli.main([*args, "--lr", "0.5", "--quiet"]) == 2
    assert "lr: the run has 0.003, given 0.5" in capsys.readouterr().err
    assert folder_bytes(out) == snapshot


def test_cli_resume_refuses_conflicting_flags_and_writes_nothing(reference, capsys):
    snapshot = folder_bytes(reference)
    assert cli.main(["train", "--resume", str(reference), "--lr", "0.5", "--model", "cnn", "--quiet"]) == 2
    error = capsys.readouterr().err
    assert "conflict" in error and "lr: the run has 0.003, given 0.5" in error and "model" in error
    assert cli.main(["train", "--resume", str(reference), "--epochs", "2", "--quiet"]) == 2
    assert "its checkpoint is at epoch 4" in capsys.readouterr().err
    flags = [*TINY_FLAGS, "--epochs", "2", "--out", str(reference), "--quiet"]  # the same, via --out
    assert cli.main(["train", *flags]) == 2
    assert "its checkpoint is at epoch 4" in capsys.readouterr().err
    assert cli.main(["train", "--resume", str(reference.parent / "missing"), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert folder_bytes(reference) == snapshot


def test_config_defaults_round_trip_and_validation():
    config = TrainConfig.for_dataset("mnist")
    assert (config.model, config.lr, config.logits_lr, config.lambda_norm) == ("wscnn", 1e-2, 1e-2, 0.1)
    assert (config.batch_size, config.epochs, config.channels, config.n_iter) == (64, 100, 32, 20)
    cifar = TrainConfig.for_dataset("cifar10")
    assert (cifar.model, cifar.lr, cifar.logits_lr, cifar.kernel_size, cifar.batch_size) == (
        "wsresnet",
        1e-4,
        1e-2,
        7,
        128,
    )
    assert set(DATASET_DEFAULTS) == {"mnist5k", "digits", "mnist", "cifar10"}
    real = TrainConfig.for_dataset()  # the default: 5,000 real digits with the paper's protocol
    assert real.dataset == "mnist5k" and real.rotate == "continuous"
    assert (real.lr, real.logits_lr, real.lambda_norm, real.weight_decay, real.batch_size) == (
        1e-2,
        1e-2,
        0.1,
        1e-4,
        64,
    )
    assert (real.input_mean, real.input_std) == (0.1307, 0.3081) == (config.input_mean, config.input_std)
    assert (TrainConfig.for_dataset("digits").input_mean, TrainConfig.for_dataset("digits").input_std) == (
        0,
        1,
    )
    tweaked = TrainConfig.for_dataset("digits", rotate="continuous", rotate_range=90.0, flip=True, seed=5)
    assert TrainConfig.from_json(tweaked.to_json()) == tweaked
    with pytest.raises(ValueError, match="unknown config fields"):
        TrainConfig.from_dict({**tweaked.to_dict(), "colour": "red"})
    with pytest.raises(ValueError, match="rotate must be one of"):
        TrainConfig(rotate="sideways")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        TrainConfig(batch_size=0)
    with pytest.raises(TypeError, match="lr must be a number"):
        TrainConfig(lr="fast")
    with pytest.raises(ValueError, match="rotate_range must be in"):
        TrainConfig(rotate_range=400.0)
    with pytest.raises(ValueError, match="gcnn"):
        TrainConfig(model="gcnn", group_size=3)
    with pytest.raises(ValueError, match="input_std must be a finite number > 0"):
        TrainConfig(input_std=0.0)
    with pytest.raises(TypeError, match="input_mean must be a number"):
        TrainConfig(input_mean="grey")


def test_bad_runtime_settings_fail_before_writing(tmp_path):
    with pytest.raises(ValueError, match="batch_size=64 exceeds the 32 training images"):
        train(tiny_config(batch_size=64, train_limit=32), QUIET, out=tmp_path / "a")
    with pytest.raises(ValueError, match="not a known backend"):
        train(tiny_config(), RuntimeOptions(backend="abacus", quiet=True), out=tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_stop_request_turns_sigterm_into_a_flag_and_restores_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not stop.requested and time.monotonic() < deadline:
            time.sleep(0.001)
        assert stop.signum == signal.SIGTERM and stop.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before
    stopped = TrainingInterruptedError("runs/x", 3, signal.SIGTERM)
    assert stopped.exit_code == 143 and "symkernels train --resume runs/x" in str(stopped)


def test_shards_split_the_global_batch_evenly():
    envs = [distributed.DistEnv(rank, 4) for rank in range(4)]
    assert [distributed.shard(16, env) for env in envs] == [slice(4 * r, 4 * r + 4) for r in range(4)]
    with pytest.raises(ValueError, match="must be divisible by the number of processes"):
        distributed.shard(10, envs[0])
    parts = [distributed.even_range(10, env) for env in envs]
    assert sum((list(range(10))[p] for p in parts), []) == list(range(10))


def test_atomic_save_leaves_the_previous_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    atomic_save({"v": torch.ones(3)}, path)

    def crash(src, dst):
        raise KeyboardInterrupt  # as if killed between writing the temporary file and renaming it

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"v": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path)["v"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]
    with pytest.raises(ValueError, match="not a symkernels training checkpoint"):
        load_checkpoint(path)


def test_cli_train_defaults_to_real_digits_and_prints_the_trajectory(tmp_path, capsys):
    flags = ["--channels", "2", "--num-layers", "1", "--train-limit", "128", "--test-limit", "32"]
    assert cli.main(["train", *flags, "--epochs", "2", "--out", str(tmp_path / "run"), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    config = TrainConfig.load(tmp_path / "run" / "config.json")
    assert config == TrainConfig.for_dataset(
        "mnist5k", channels=2, num_layers=1, train_limit=128, test_limit=32, epochs=2
    )
    assert "wscnn on mnist5k (128 train, 32 test images" in out
    assert "lift: best exact element and its mass for each learned element" in out
    assert re.search(r"^\s+4\s+2\s+[01]\.\d{4}\s+rot\d+ \d\.\d{3}", out, re.MULTILINE)  # step 4, epoch 2
    assert re.search(r"^best: R0 on rot0 \(1\.000\), R1 on rot\d+ \(\d\.\d{3}\)", out, re.MULTILINE)
    assert "bench/recovery.py" in out
