"""The training-step benchmark ``bench/train_step.py``: its peers are what they claim to be (the plain CNN
has the WS model's expanded convolutions, the escnn network is a C4 G-CNN), and the default run's step
trains."""

from __future__ import annotations

import pytest
import torch

from bench import train_step
from symkernels.models import weight_sharing_layers


@pytest.mark.parametrize("model", ["mnist-wscnn", "cifar-wsresnet"])
def test_plain_network_has_the_expanded_convolutions_of_the_ws_model(model):
    ws = train_step.build_model("ws-cpu", model, 8)
    plain = train_step.build_model("plain-cnn", model, 8)
    kernels = [layer.kernel().shape for _, layer in weight_sharing_layers(ws)]
    convs = [m.weight.shape for m in plain.modules() if isinstance(m, torch.nn.Conv2d)]
    assert kernels == convs


def test_escnn_network_is_a_c4_gcnn():
    pytest.importorskip("escnn", reason="escnn is an optional peer (manual install, see bench/README.md)")
    torch.manual_seed(0)
    net = train_step.EscnnC4CNN(hidden_channels=2).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        logits, rotated = net(x), net(torch.rot90(x, 1, dims=(-2, -1)))
    assert logits.shape == (2, 10)
    torch.testing.assert_close(rotated, logits, rtol=1e-4, atol=1e-4)  # invariant: a C4 G-CNN


def test_default_run_step_trains_the_default_model_on_new_batches():
    step = train_step.make_closure("ws-auto", train_step.DEFAULT_RUN, "cpu")()
    before = [p.detach().clone() for p in step.model.parameters()]
    step()
    step()
    assert step.position == 2 * step.config.batch_size  # each step draws its own batch
    assert all(not torch.equal(a, b) for a, b in zip(before, step.model.parameters(), strict=True))


def test_cases_cover_the_models_and_cap_the_slow_cpu_step():
    cases = {case.id: case for case in train_step.cases("cpu")}
    assert {"train-step/ws-cpu/train-step/mnist-wscnn", "train-step/escnn/train-step/mnist-wscnn"} <= set(
        cases
    )
    cifar = [c for c in cases.values() if c.workload == "cifar-wsresnet"]
    assert {c.provider for c in cifar} == {"ws-cpu", "plain-cnn"}
    assert all(c.rounds == train_step.CPU_CIFAR_ROUNDS and c.after is None for c in cifar)


def test_the_default_run_is_timed_eager_and_compiled():
    cases = {case.id for case in train_step.cases("cpu")}
    assert {
        "train-step/ws-auto/train-step/default-run",
        "train-step/ws-auto-compiled/train-step/default-run",
    } <= (cases)
    eager = train_step.make_closure("ws-auto", train_step.DEFAULT_RUN, "cpu")()
    compiled = train_step.make_closure("ws-auto-compiled", train_step.DEFAULT_RUN, "cpu")()
    assert (eager.step.compiled, compiled.step.compiled) == (False, True)  # (compiled on its first call)
