"""Grouped Sinkhorn of a model's stacks: one computation per training step, reused by the layers' forward and
the regularisers, equal (values and gradients) to the per-layer path on every backend."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import symkernels
from symkernels import functional
from symkernels.models import CNN, GCNN, WSCNN, WSResNet, sum_regularizers
from symkernels.models import accounting as accounting_module
from symkernels.models import cnn as cnn_module
from symkernels.models import resnet as resnet_module
from symkernels.nn import DoublyStochasticStack, precompute_representations
from symkernels.nn import grouped as grouped_module
from symkernels.ops import sinkhorn as sinkhorn_module


def triton_on_cpu() -> bool:
    """Whether the triton backend serves CPU tensors in this process (Triton's interpreter)."""
    if not symkernels.backend_status()["triton"].usable:
        return False
    from symkernels.ops.triton_support import INTERPRETED

    return INTERPRETED


BACKENDS = [
    "reference",
    "cpu",
    pytest.param(
        "triton",
        marks=[pytest.mark.triton, pytest.mark.skipif(not triton_on_cpu(), reason="no Triton interpreter")],
    ),
]


def counted(monkeypatch, owner, name: str) -> list:
    """Replace ``owner.name`` by a wrapper that records each call; returns the record."""
    calls = []
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return calls


@pytest.mark.parametrize("backend", BACKENDS[1:])
def test_grouped_sinkhorn_is_one_op_call(backend, monkeypatch):
    """All stacks of a group in one call of the op (one launch each way on a GPU); the reference loops."""
    stacks = [torch.rand(2, n, n).requires_grad_() for n in (3, 4, 6)]
    calls = counted(monkeypatch, sinkhorn_module, "_run_op")
    outputs = symkernels.grouped_sinkhorn(stacks, 3, backend=backend)
    torch.autograd.grad(sum(o.square().sum() for o in outputs), stacks)
    assert len(calls) == 1
    symkernels.grouped_sinkhorn(stacks, 3, backend="reference")
    assert len(calls) == 1


def small_wscnn() -> WSCNN:
    torch.manual_seed(0)
    return WSCNN(hidden_channels=2, kernel_size=3, num_layers=2, n_iter=4)


def training_step(model, x, y, *contexts) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Loss (task + both regularisers) and the gradient of every parameter."""
    with contextlib.ExitStack() as stack:
        for context in contexts:
            stack.enter_context(context)
        norm, entropy = model.regularizers()
        loss = F.cross_entropy(model(x), y) + 0.1 * norm + 0.01 * entropy
    return loss, list(torch.autograd.grad(loss, list(model.parameters())))


@pytest.mark.parametrize(
    "model_factory",
    [small_wscnn, lambda: WSResNet(hidden_channels=2, kernel_size=3, n_iter=4, dropout=0.0)],
    ids=["WSCNN", "WSResNet"],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_precomputed_step_equals_the_per_layer_step(model_factory, backend, monkeypatch):
    torch.manual_seed(1)
    model = model_factory()
    size = 11 if isinstance(model, WSCNN) else 8
    x = torch.randn(2, model.lift.in_channels if isinstance(model, WSCNN) else 3, size, size)
    y = torch.tensor([1, 7])
    # The models group their stacks themselves; switch that off for the per-layer step.
    for module in (cnn_module, resnet_module, accounting_module):
        monkeypatch.setattr(module, "precompute_representations", lambda model: contextlib.nullcontext())
    expected_loss, expected_grads = training_step(model, x, y, symkernels.use_backend(backend))
    monkeypatch.undo()
    loss, grads = training_step(
        model, x, y, symkernels.use_backend(backend), precompute_representations(model)
    )
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_one_grouped_call_per_step_and_none_per_layer(monkeypatch):
    model = small_wscnn()
    x, y = torch.randn(2, 1, 11, 11), torch.tensor([0, 3])
    grouped = counted(monkeypatch, grouped_module, "grouped_sinkhorn")
    per_layer = counted(monkeypatch, functional, "sinkhorn")
    with precompute_representations(model) as stacks:
        assert set(stacks) == {"lift.reps", "convs.0.reps", "convs.1.reps"}
        assert len(grouped) == 1 and [s.shape[-1] for s in grouped[0][0]] == [9, 36, 36]
        model(x)
        model.regularizers()  # nested: reuses the stacks computed above
    assert len(grouped) == 1 and not per_layer
    for name, module in model.named_modules():
        if isinstance(module, DoublyStochasticStack):
            assert module._precomputed is None, name
    model(x)  # on its own, the model's forward groups its stacks too
    assert len(grouped) == 2 and not per_layer
    model.regularizers()  # on its own: one grouped computation
    assert len(grouped) == 3 and not per_layer
    training_step(model, x, y, precompute_representations(model))
    assert len(grouped) == 4 and not per_layer
    model.lift(x)  # a layer called outside any context computes its own stack
    assert len(per_layer) == 1


def test_stacks_with_different_settings_are_grouped_apart(monkeypatch):
    model = small_wscnn()
    model.convs[1].reps.n_iter = 6
    grouped = counted(monkeypatch, grouped_module, "grouped_sinkhorn")
    with precompute_representations(model) as stacks:
        pass
    assert sorted(len(call[0]) for call in grouped) == [1, 2]
    for name, module in model.named_modules():
        if isinstance(module, DoublyStochasticStack):
            expected = functional.sinkhorn(module.logits, module.n_iter, module.tau)
            torch.testing.assert_close(stacks[name], expected)


def test_contexts_nest_and_restore_on_errors():
    model = small_wscnn()
    with precompute_representations(model) as outer:
        with precompute_representations(model) as inner:
            assert all(inner[name] is outer[name] for name in outer)
        assert model.lift.reps.learned() is outer["lift.reps"]
        torch.testing.assert_close(model.lift.reps(), functional.prepend_identity(outer["lift.reps"]))
    assert model.lift.reps._precomputed is None
    with pytest.raises(RuntimeError, match="boom"), precompute_representations(model):
        raise RuntimeError("boom")
    assert model.lift.reps._precomputed is None
    model.lift.reps.logits.data[0, 0, 0] = float("nan")
    with precompute_representations(model) as stacks:  # by default nothing is read back: NaN flows on
        assert torch.isnan(stacks["lift.reps"]).any()
    model.lift.reps.check_finite = True
    with pytest.raises(ValueError, match="contains NaN"), precompute_representations(model):
        pass
    assert all(m._precomputed is None for m in model.modules() if isinstance(m, DoublyStochasticStack))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"), precompute_representations([]):
        pass


@pytest.mark.parametrize("model_cls", [GCNN, CNN])
def test_models_without_learned_stacks(model_cls):
    """Fixed stacks (G-CNN) and plain convolutions (CNN): nothing to precompute, results unchanged."""
    torch.manual_seed(2)
    model = model_cls(hidden_channels=4, kernel_size=3, num_layers=1)
    x = torch.randn(2, 1, 9, 9)
    expected = model(x)
    with precompute_representations(model) as stacks:
        assert stacks == {}
        torch.testing.assert_close(model(x), expected)
        norm, entropy = sum_regularizers(model)
    expected_norm, expected_entropy = sum_regularizers(model)
    torch.testing.assert_close((norm, entropy), (expected_norm, expected_entropy))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_compiled_model_step_traces_without_graph_breaks(backend):
    """The models' forward groups its stacks inside a context; torch.compile(fullgraph=True) traces it."""
    model = small_wscnn()
    x, y = torch.randn(2, 1, 11, 11), torch.tensor([2, 5])
    params = list(model.parameters())

    def step(x, y):
        return F.cross_entropy(model(x), y) + 0.1 * model.regularizers()[0]

    with symkernels.use_backend(backend):
        eager_loss = step(x, y)
        eager_grads = torch.autograd.grad(eager_loss, params)
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        loss = compiled(x, y)
        grads = torch.autograd.grad(loss, params)
    torch.testing.assert_close(loss, eager_loss)
    for got, want in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    for name, module in model.named_modules():
        if isinstance(module, DoublyStochasticStack):
            assert module._precomputed is None, name
