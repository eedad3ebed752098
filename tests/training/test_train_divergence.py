"""``symkernels train`` stops when its loss is no longer finite, keeping the last finite checkpoint."""

from __future__ import annotations

import pytest
import torch

from tests.testing import require_extras

require_extras("train")

from symkernels import cli  # noqa: E402
from symkernels.training import loop  # noqa: E402
from symkernels.training.checkpoint import load_checkpoint  # noqa: E402

TINY_FLAGS = ["--dataset", "digits", "--channels", "4", "--num-layers", "1", "--batch-size", "16"]
TINY_FLAGS += ["--train-limit", "64", "--test-limit", "32", "--epochs", "3", "--threads", "1", "--quiet"]


# A step reads nothing back: the NaN reaches the loss, which the epoch's check reads (also when it started in
# a learned stack's logits Θ, which Sinkhorn turns into NaN matrices).
@pytest.mark.parametrize(
    ("model", "poisoned"), [("wscnn", "head.bias"), ("wscnn", "lift.reps.logits"), ("cnn", "head.bias")]
)
def test_a_diverging_run_stops_with_a_clear_message_and_keeps_the_last_finite_checkpoint(
    tmp_path, monkeypatch, capsys, model, poisoned
):
    original_epoch = loop._Trainer.train_epoch

    def poisoned_in_epoch_2(self, stop):
        if self.epoch == 1:
            with torch.no_grad():
                # As an overshooting step would leave it.
                self.model.get_parameter(poisoned).fill_(float("nan"))
        return original_epoch(self, stop)

    monkeypatch.setattr(loop._Trainer, "train_epoch", poisoned_in_epoch_2)
    run = tmp_path / "run"
    assert cli.main(["train", *TINY_FLAGS, "--model", model, "--lr", "0.03", "--out", str(run)]) == 2
    error = capsys.readouterr().err
    assert "diverged in epoch 2: the training loss became NaN or Inf" in error
    assert (
        "keeps the checkpoint of epoch 1" in error
        and "smaller --lr or --logits-lr (this run's: 0.03," in error
    )
    checkpoint = load_checkpoint(run / "checkpoint.pt")
    assert checkpoint["epoch"] == 1
    assert all(torch.isfinite(value).all() for value in checkpoint["model"].values())
