"""A training step reads nothing back from the device: forward, regularisers, backward and optimizer step of
the WSCNN and the WS-ResNet, with the defaults."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import symkernels
from symkernels.models import WSCNN, WSResNet
from symkernels.training import TrainConfig
from symkernels.training.factory import build_optimizer
from symkernels.training.steps import TrainingStep

# The paper's regularisers, both on: the step computes every term.
CONFIG = TrainConfig.for_dataset("mnist5k", lambda_ent=0.01)
MODELS = {
    "wscnn": (lambda: WSCNN(hidden_channels=4, kernel_size=3, num_layers=1), (4, 1, 12, 12)),
    "wsresnet": (lambda: WSResNet(hidden_channels=4, kernel_size=3), (4, 3, 8, 8)),
}


class HostReads(TorchDispatchMode):
    """Records every op that hands tensor values to the host (``.item()``, ``bool()``, ``torch.equal``: ops
    tagged ``data_dependent_output``) or whose output's size depends on them (``nonzero``, boolean indexing:
    ``dynamic_output_shape``). On a GPU each of them waits for the device.

    ``host_tensors()``: tensors that live on the host in every run (the optimizer's step counters, CPU tensors
    even when the model is on a GPU), whose reads wait for nothing."""

    def __init__(self, host_tensors: Callable[[], list[torch.Tensor]] = list) -> None:
        super().__init__()
        self.host_tensors = host_tensors
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if torch.Tag.data_dependent_output in func.tags or torch.Tag.dynamic_output_shape in func.tags:
            if not any(args[0] is tensor for tensor in self.host_tensors()):
                self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


def step_counters(optimizer: torch.optim.Optimizer) -> Callable[[], list[torch.Tensor]]:
    return lambda: [state["step"] for state in optimizer.state.values() if "step" in state]


def batch(shape: tuple[int, ...], device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator)
    y = torch.randint(0, 10, (shape[0],), generator=generator)
    return x.to(device), y.to(device)


@pytest.mark.parametrize("name", MODELS)
def test_a_training_step_reads_nothing_back(name):
    """Two steps (the first also creates the optimizer's state) through the ops' native kernels."""
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = build()
    optimizer = build_optimizer(model, CONFIG)
    step = TrainingStep(model, optimizer, CONFIG)
    x, y = batch(shape)
    before = [p.detach().clone() for p in model.parameters()]
    with HostReads(step_counters(optimizer)) as mode:
        for _ in range(2):
            loss, logits, norm, entropy = step(x, y)
    assert mode.reads == []
    assert torch.isfinite(loss) and norm > 0 and entropy > 0 and logits.shape == (shape[0], 10)
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("name", MODELS)
def test_a_training_step_runs_on_the_meta_device(name):
    """Meta tensors have no values: any read of one (or copy to the host) raises. The ops' choice there is the
    pure-PyTorch reference; the step around them is the same code."""
    build, shape = MODELS[name]
    model = build().to("meta")
    optimizer = build_optimizer(model, CONFIG)
    loss, logits, _, _ = TrainingStep(model, optimizer, CONFIG)(*batch(shape, "meta"))
    assert loss.is_meta and logits.shape == (shape[0], 10)


def test_the_detector_sees_a_read():
    """The opt-in finiteness check reads one flag back: what the tests above would catch."""
    logits = torch.rand(2, 4, 4)
    with HostReads() as mode:
        symkernels.sinkhorn(logits)
    assert mode.reads == []
    with HostReads() as mode:
        symkernels.sinkhorn(logits, check_finite=True)
    assert mode.reads == ["aten._local_scalar_dense.default"]


def test_a_compiled_step_refuses_a_wrapped_model():
    """torch.compile(fullgraph=True) cannot trace DistributedDataParallel's forward: --compile is refused
    under torchrun, before anything is written."""
    model = WSCNN(hidden_channels=2, kernel_size=3, num_layers=0)
    with pytest.raises(ValueError, match="--compile runs in one process"):
        TrainingStep(
            model, build_optimizer(model, CONFIG), CONFIG, net=torch.nn.Sequential(model), compile=True
        )
