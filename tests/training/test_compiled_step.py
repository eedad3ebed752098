"""``symkernels train --compile``: the forward and regularisers as one torch.compile graph (inductor on the
CPU) train as the eager step does, within float rounding; and the loop reads its progress every READ_EVERY
steps."""

from __future__ import annotations

import json

import pytest
import torch

from tests.testing import require_extras

require_extras("train")

from symkernels import cli  # noqa: E402
from symkernels.training import loop  # noqa: E402
from symkernels.training.checkpoint import load_checkpoint  # noqa: E402

# One epoch of three steps. float64: a compiled graph rounds differently from eager (fusion, reordered sums),
# and AdamW's first steps divide each gradient by its own magnitude, which turns a rounding difference in a
# near-zero gradient into up to lr / eps = 3e5 times itself; from float64 rounding that stays below 1e-9.
FLAGS = ["--dataset", "digits", "--channels", "4", "--num-layers", "1", "--batch-size", "16"]
FLAGS += ["--train-limit", "48", "--test-limit", "16", "--epochs", "1", "--dtype", "float64"]
FLAGS += ["--threads", "1", "--quiet"]


def test_compiled_steps_equal_eager_within_float_tolerance(tmp_path):
    assert cli.main(["train", *FLAGS, "--out", str(tmp_path / "eager")]) == 0
    assert cli.main(["train", *FLAGS, "--compile", "--out", str(tmp_path / "compiled")]) == 0
    eager, compiled = (load_checkpoint(tmp_path / run / "checkpoint.pt") for run in ("eager", "compiled"))
    for name, value in eager["model"].items():
        torch.testing.assert_close(compiled["model"][name], value, rtol=0, atol=1e-9, msg=name)
    a, b = (json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("eager", "compiled"))
    assert [e["compiled"] for e in a["epochs"]] == [False] and [e["compiled"] for e in b["epochs"]] == [True]
    assert a["epochs"][0]["steps"] == 3
    for key in ("train_loss", "norm", "test_loss"):
        assert b["epochs"][0][key] == pytest.approx(a["epochs"][0][key], rel=1e-9), key


def test_the_progress_bar_reads_back_every_read_every_steps(tmp_path, monkeypatch):
    """Seven steps, read every three: the progress numbers are read after steps 3, 6 and 7 (the last)."""
    shown = []
    monkeypatch.setattr(loop, "READ_EVERY", 3)
    monkeypatch.setattr(loop.tqdm, "set_postfix", lambda bar, **values: shown.append(bar.n))
    flags = [flag for flag in FLAGS if flag != "--quiet"]
    flags[flags.index("--train-limit") + 1] = "112"
    assert cli.main(["train", *flags, "--out", str(tmp_path / "run")]) == 0
    assert shown == [3, 6, 7]
