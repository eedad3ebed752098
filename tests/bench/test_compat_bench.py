"""The published-API training-step benchmark ``bench/compat.py``: its providers compute the same step (the
pure-PyTorch one really is the published computation), and its rows reach the report."""

from __future__ import annotations

import torch

from bench import compat as compat_bench
from bench import harness
from bench.__main__ import main as bench_main
from symkernels import compat

QUICK = next(iter(compat_bench.QUICK))


def loss_and_gradients(provider):
    model, x, labels = compat_bench.build(provider, QUICK, "cpu")
    loss = compat_bench.training_loss(model, x, labels)
    trained = [p for p in model.parameters() if p.requires_grad]
    return model, loss, torch.autograd.grad(loss, trained)


def test_providers_compute_the_same_training_step():
    model, loss, grads = loss_and_gradients("compat")
    published, loss_published, grads_published = loss_and_gradients("reference-authors-loop")
    layers = [m for m in published.modules() if isinstance(m, (compat.WSLiftConv2d, compat.WSConv2d))]
    assert len(layers) == 5 and all({"forward", "get_representations"} <= set(m.__dict__) for m in layers)
    assert not any("forward" in m.__dict__ for m in model.modules())
    torch.testing.assert_close(loss, loss_published, rtol=1e-5, atol=1e-6)
    for g, w in zip(grads, grads_published, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    _, loss_fixed, _ = loss_and_gradients("compat-fixed")
    torch.testing.assert_close(loss_fixed, loss, rtol=1e-3, atol=1e-4)  # 20 iterations, not the early exit


def test_compat_rows_are_timed_and_reported(tmp_path):
    out = tmp_path / "compat.jsonl"
    assert bench_main(["--ops", "compat", "--quick", "--rounds", "1", "--out", str(out)]) == 0
    _, rows = harness.read_records(out)
    assert sorted((row["provider"], row["status"]) for row in rows) == [
        (provider, "ok") for provider in sorted(compat_bench.PROVIDERS)
    ]
    assert all(row["threads"] == 1 and row["median_ms"] > 0 for row in rows)
    text = out.with_suffix(".md").read_text()
    assert "### Published-API training step (symkernels.compat)" in text
    assert "authors' loop vs compat" in text
