"""Nothing a run saved is lost: a kill or a full disk while a checkpoint is written, a damaged checkpoint, a
read-only run folder, and a resume under another backend or thread count."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.testing import require_extras

require_extras("train")

from symkernels import backends, cli  # noqa: E402
from symkernels.training import (  # noqa: E402
    RuntimeOptions,
    TrainConfig,
    checkpoint,
    load_run,
    resume,
    train,
)
from symkernels.training.checkpoint import atomic_save, atomic_write_text, load_checkpoint  # noqa: E402

TINY = {"channels": 4, "num_layers": 1, "batch_size": 16, "train_limit": 64, "test_limit": 32}
TINY_FLAGS = ["--dataset", "digits", "--channels", "4", "--num-layers", "1", "--batch-size", "16"]
TINY_FLAGS += ["--train-limit", "64", "--test-limit", "32"]
QUIET = RuntimeOptions(threads=1, quiet=True)


def tiny_config(epochs: int = 4) -> TrainConfig:
    return TrainConfig.for_dataset("digits", **TINY, epochs=epochs)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(".*.tmp"))


def assert_same_weights(a: Path, b: Path) -> None:
    x, y = load_checkpoint(a), load_checkpoint(b)
    assert x["epoch"] == y["epoch"]
    for name in x["model"]:
        assert torch.equal(x["model"][name], y["model"][name]), name


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted 4-epoch run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train(tiny_config(), QUIET, out=out)
    return out


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory) -> Path:
    """A run of 2 epochs (resumed with epochs=4, it continues as the reference run)."""
    out = tmp_path_factory.mktemp("two") / "run"
    train(tiny_config(epochs=2), QUIET, out=out)
    return out


def copy_run(run: Path, dst: Path) -> Path:
    shutil.copytree(run, dst)
    return dst


# -- a writer that stops in the middle of a checkpoint -------------------------------------------------------


class _HalfWriter:
    """Writes the first half of what it is given, then calls ``then`` (which raises or never returns)."""

    def __init__(self, file, then) -> None:
        self.file, self.then = file, then

    def write(self, data) -> int:
        view = memoryview(data)
        self.file.write(view[: len(view) // 2])
        self.file.flush()
        os.fsync(self.file.fileno())
        self.then()
        raise AssertionError("unreachable")  # pragma: no cover


def stop_in_checkpoint_write(number: int, then):
    """An ``atomic_open`` whose ``number``-th checkpoint.pt write stops half way through (in ``then``)."""
    real = checkpoint.atomic_open
    calls = {"checkpoint.pt": 0}

    @contextlib.contextmanager
    def opener(path, mode="wb"):
        with real(path, mode) as file:
            if Path(path).name == "checkpoint.pt":
                calls["checkpoint.pt"] += 1
                if calls["checkpoint.pt"] == number:
                    yield _HalfWriter(file, then)
                    return
            yield file

    return opener


KILLED_CHILD = r"""
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from tests.training.test_checkpoints import QUIET, stop_in_checkpoint_write, tiny_config
from symkernels.training import checkpoint, train

marker = Path(sys.argv[2])
def wait_to_be_killed():
    marker.touch()
    time.sleep(600)
checkpoint.atomic_open = stop_in_checkpoint_write(3, wait_to_be_killed)
train(tiny_config(), QUIET, out=sys.argv[1])
"""


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one_and_resumes(reference, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "writing"
    repo = Path(__file__).resolve().parents[2]
    child = subprocess.Popen([sys.executable, "-c", KILLED_CHILD, str(out), str(marker), str(repo)])
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert child.poll() is None, f"the run ended with {child.returncode} before its third checkpoint"
            assert time.monotonic() < deadline, "the third checkpoint write never started"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)  # half of epoch 3's checkpoint is on disk
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 2
    assert json.loads((out / "metrics.json").read_text())["epochs_completed"] == 2
    assert len(temporaries(out)) == 1  # the torn write, under its temporary name

    resumed = resume(out, QUIET)
    assert [e["epoch"] for e in resumed.history] == [1, 2, 3, 4]
    assert_same_weights(out / "checkpoint.pt", reference / "checkpoint.pt")
    assert temporaries(out) == []  # the torn write was cleared when the run resumed


def test_full_disk_while_writing_a_checkpoint_fails_clearly_and_keeps_the_previous_one(
    reference, tmp_path, monkeypatch, capsys
):
    def disk_full():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    out = tmp_path / "run"
    monkeypatch.setattr(checkpoint, "atomic_open", stop_in_checkpoint_write(3, disk_full))
    flags = [*TINY_FLAGS, "--epochs", "4", "--threads", "1", "--quiet"]
    assert cli.main(["train", *flags, "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert f"cannot write {out / 'checkpoint.pt'}: No space left on device" in error, error
    assert "the previous checkpoint.pt is unchanged" in error
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 2
    assert temporaries(out) == []

    monkeypatch.undo()  # space again: the run continues where its last checkpoint left it
    assert cli.main(["train", "--resume", str(out), "--quiet"]) == 0
    assert_same_weights(out / "checkpoint.pt", reference / "checkpoint.pt")


def test_atomic_writes_name_the_file_and_keep_the_errno(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    atomic_save({"v": torch.ones(3)}, path)

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match=f"cannot write {path}: No space left on device") as raised:
        atomic_save({"v": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert raised.value.errno == errno.ENOSPC
    assert torch.equal(torch.load(path)["v"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]
    with pytest.raises(FileNotFoundError, match="no notes.txt was written"):
        atomic_write_text(tmp_path / "missing" / "notes.txt", "x")


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flipped-bit":
        data[len(data) // 2] ^= 0x10  # inside the weights: torch.load alone would load it silently
    elif how == "truncated":
        data = data[: len(data) * 2 // 3]
    else:
        data = bytearray()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["flipped-bit", "truncated", "empty"])
def test_damaged_checkpoint_is_refused_naming_the_file_and_nothing_is_overwritten(
    two_epochs, tmp_path, capsys, how
):
    out = copy_run(two_epochs, tmp_path / "run")
    _damage(out / "checkpoint.pt", how)
    before = folder_bytes(out)

    with pytest.raises(ValueError, match="damaged") as raised:
        load_checkpoint(out / "checkpoint.pt")
    assert str(out / "checkpoint.pt") in str(raised.value)
    assert cli.main(["train", "--resume", str(out), "--epochs", "4", "--quiet"]) == 2
    error = capsys.readouterr().err
    assert str(out / "checkpoint.pt") in error and "damaged" in error, error
    assert cli.main(["train", *TINY_FLAGS, "--epochs", "2", "--out", str(out), "--quiet"]) == 2
    assert "damaged" in capsys.readouterr().err
    with pytest.raises(ValueError, match="damaged"):
        load_run(out)
    assert folder_bytes(out) == before


def _without_write_override() -> None:
    """In the child: give up root's power to write where the permissions say no (CAP_DAC_OVERRIDE)."""
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_capbset_drop, cap_dac_override = 24, 1  # linux/prctl.h, linux/capability.h
        if libc.prctl(pr_capbset_drop, cap_dac_override, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP, CAP_DAC_OVERRIDE) failed")


# Both commands in one child: `symkernels train` as the command line runs it, stderr captured per command.
READ_ONLY_CHILD = r"""
import contextlib, io, json, sys
from symkernels import cli
results = []
for flags in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main(["train", *flags])
    results.append({"code": code, "stderr": err.getvalue()})
print(json.dumps(results))
"""


def _train_unprivileged(*commands: list[str]) -> list[dict]:
    result = subprocess.run(
        [sys.executable, "-c", READ_ONLY_CHILD, json.dumps(commands)],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_without_write_override,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="read-only folders for root need Linux prctl"
)
def test_read_only_run_folder_fails_before_training_and_keeps_everything(two_epochs, tmp_path):
    out = copy_run(two_epochs, tmp_path / "run")
    before = folder_bytes(out)
    inside = out / "new"
    out.chmod(0o555)
    try:
        resumed, fresh = _train_unprivileged(
            ["--resume", str(out), "--epochs", "4", "--quiet"],
            [*TINY_FLAGS, "--epochs", "1", "--out", str(inside), "--quiet"],
        )
    finally:
        out.chmod(0o755)
    assert resumed["code"] == 2, resumed
    assert f"cannot write {out / 'config.json'}: Permission denied" in resumed["stderr"], resumed
    assert folder_bytes(out) == before
    assert fresh["code"] == 2, fresh
    assert "Permission denied" in fresh["stderr"] and str(inside) in fresh["stderr"], fresh
    assert not inside.exists()


def test_resume_under_another_backend_and_thread_count_is_allowed_and_recorded(two_epochs, tmp_path):
    out = copy_run(two_epochs, tmp_path / "run")
    first = json.loads((out / "metrics.json").read_text())
    first_backend = first["backend"]
    assert [(e["backend"], e["threads"]) for e in first["epochs"]] == [(first_backend, 1)] * 2

    other = "reference" if first_backend != "reference" else "cpu"
    if backends.backend_status()[other].usable is False:
        other = first_backend  # only the thread count changes then
    resumed = resume(out, RuntimeOptions(threads=2, quiet=True, backend=other), given={"epochs": 4})
    assert [e["epoch"] for e in resumed.history] == [1, 2, 3, 4]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["complete"] and metrics["backend"] == other and metrics["threads"] == 2
    runs = [(e["epoch"], e["backend"], e["threads"]) for e in metrics["epochs"]]
    assert runs == [(1, first_backend, 1), (2, first_backend, 1), (3, other, 2), (4, other, 2)]


LAYERWISE_TINY = {
    "task": "quadrant10",
    "source": "digits",
    "size": 8,
    "width": 2,
    "batch_size": 32,
    "lr": 0.05,
    "burn_in": 1,
    "marglik_every": 1,
    "hyper_steps": 5,
    "train_limit": 64,
    "test_limit": 32,
}


def test_layerwise_runs_share_the_guarantees(tmp_path, monkeypatch):
    pytest.importorskip("laplace", reason="the optional extra symkernels[layerwise] is not installed")
    from symkernels.layerwise import LayerwiseConfig, train_layerwise

    def disk_full():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    out = tmp_path / "run"
    config = LayerwiseConfig.create(model="fc-conv", blocks="1:2,2:2", epochs=2, **LAYERWISE_TINY)
    monkeypatch.setattr(checkpoint, "atomic_open", stop_in_checkpoint_write(2, disk_full))
    with pytest.raises(OSError, match=f"cannot write {out / 'checkpoint.pt'}: No space left on device"):
        train_layerwise(config, out, threads=1, quiet=True)
    monkeypatch.undo()
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1
    assert temporaries(out) == []

    _damage(out / "checkpoint.pt", "flipped-bit")
    before = folder_bytes(out)
    with pytest.raises(ValueError, match="damaged") as raised:
        train_layerwise(resume=out, threads=1, quiet=True)
    assert str(out / "checkpoint.pt") in str(raised.value)
    assert folder_bytes(out) == before
