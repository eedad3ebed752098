"""Plain-Conv2d export and hardening: parity with the soft model, nearest permutations, clear errors."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

from symkernels import analysis, functional, groups
from symkernels.export import ExpandedConv2d, evaluate, export_model, export_program, harden_model
from symkernels.models import CNN, GCNN, WSCNN, ResNet, WSResNet, weight_sharing_layers
from symkernels.nn import DoublyStochasticStack, FixedStack
from tests.testing import TOLERANCES

# float32: the exported conv adds the bias inside the convolution and pools over a flattened view, so the
# summation order differs from the soft model's; a few ulps of the output scale.
EXPORT_TOLERANCES = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.float64: TOLERANCES[torch.float64]}

CONVNET_INPUT = (3, 1, 12, 12)
RESNET_INPUT = (3, 3, 8, 8)
FAMILIES = {
    "WSCNN": (lambda: WSCNN(hidden_channels=3, num_classes=5, kernel_size=3, num_layers=2), CONVNET_INPUT),
    "WSCNN-same-free-identity": (
        lambda: WSCNN(
            hidden_channels=2, num_classes=4, kernel_size=3, num_layers=1, padding="same", fix_identity=False
        ),
        CONVNET_INPUT,
    ),
    "GCNN": (lambda: GCNN(hidden_channels=3, num_classes=5, kernel_size=3, num_layers=2), CONVNET_INPUT),
    "CNN": (lambda: CNN(hidden_channels=4, num_classes=5, kernel_size=3, num_layers=2), CONVNET_INPUT),
    "WSResNet": (lambda: WSResNet(hidden_channels=3, num_classes=5, kernel_size=3), RESNET_INPUT),
    "ResNet": (lambda: ResNet(hidden_channels=4, num_classes=5, kernel_size=3), RESNET_INPUT),
}


def perturb(model: nn.Module, seed: int = 0) -> nn.Module:
    """Move every parameter and BN statistic away from its initial value: stacks far from uniform, non-zero
    biases, non-trivial running statistics."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            scale = 3.0 if name.endswith("logits") else 0.5
            parameter.copy_(scale * torch.randn(parameter.shape, generator=generator, dtype=torch.float64))
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.copy_(0.3 * torch.randn(buffer.shape, generator=generator, dtype=torch.float64))
            elif name.endswith("running_var"):
                buffer.copy_(0.5 + torch.rand(buffer.shape, generator=generator, dtype=torch.float64))
    return model


def make(family: str, dtype: torch.dtype = torch.float32, *, perturbed: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    factory, shape = FAMILIES[family]
    model = factory().to(dtype)
    if perturbed:
        perturb(model, seed)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).to(dtype)
    return model, x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("perturbed", [False, True], ids=["init", "perturbed"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_exported_model_matches_the_soft_model(family, perturbed, dtype):
    model, x = make(family, dtype, perturbed=perturbed)
    exported = export_model(model)
    with torch.no_grad():
        expected = model.eval()(x)
        got = exported(x)
    assert got.dtype == dtype and got.shape == expected.shape
    torch.testing.assert_close(got, expected, **EXPORT_TOLERANCES[dtype])
    assert not exported.training
    assert not any(isinstance(m, (DoublyStochasticStack, FixedStack)) for m in exported.modules())
    convs = [m for m in exported.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == sum(isinstance(m, nn.Conv2d) for m in model.modules()) + len(
        list(weight_sharing_layers(model))
    )


def test_stacks_are_far_from_uniform_after_perturbing():
    model, _ = make("WSCNN")
    for _, layer in weight_sharing_layers(model):
        stack = layer.representations()
        assert (stack.amax(dim=(-2, -1))[1:] > 4.0 / stack.shape[-1]).all()  # uniform would be 1/d


def test_kernels_are_baked_in_not_recomputed(monkeypatch):
    model, x = make("WSResNet")
    exported = export_model(model)
    with torch.no_grad():
        expected = model.eval()(x)
        model.stem.reps.logits.add_(5.0)  # later changes to the source do not reach the export

    def forbidden(*args, **kwargs):
        raise AssertionError("the exported model called a symkernels op")

    for name in ("sinkhorn", "representation_stack", "expand_kernel", "permuted_conv2d"):
        monkeypatch.setattr(functional, name, forbidden)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), expected, **EXPORT_TOLERANCES[torch.float32])
    lift = exported.stem
    assert isinstance(lift, ExpandedConv2d) and type(lift.conv) is nn.Conv2d
    assert lift.conv.weight.shape == (3 * 4, 3, 3, 3)


def test_batch_norm_is_exported_in_eval_mode_and_the_source_is_untouched():
    model, x = make("WSResNet")
    model.train()
    exported = export_model(model)
    assert model.training  # export_model does not switch the source's mode
    assert isinstance(model.stem.reps, DoublyStochasticStack)
    with torch.no_grad():
        train_out = copy.deepcopy(model)(x)  # a copy: a training forward updates the running statistics
        eval_out = model.eval()(x)
        got = exported(x)
    torch.testing.assert_close(got, eval_out, **EXPORT_TOLERANCES[torch.float32])
    assert (got - train_out).abs().max() > 1e-3  # batch statistics would give a different answer


def test_exported_program_loads_and_runs_without_symkernels(tmp_path):
    saved = {}
    for family in ("WSCNN", "WSResNet"):
        model, x = make(family)
        program = export_program(export_model(model), x)
        torch.export.save(program, tmp_path / f"{family}.pt2")
        wider = torch.randn(5, *x.shape[1:], generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            saved[family] = {"x": wider, "y": model.eval()(wider)}
    torch.save(saved, tmp_path / "io.pt")
    script = f"""
import sys
sys.modules["symkernels"] = None  # any import of symkernels now fails
import torch
io = torch.load({str(tmp_path / "io.pt")!r})
for family, pair in io.items():
    program = torch.export.load({str(tmp_path)!r} + "/" + family + ".pt2").module()
    torch.testing.assert_close(program(pair["x"]), pair["y"], rtol=1e-5, atol=1e-5)
print("loaded", sorted(io))
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "loaded ['WSCNN', 'WSResNet']" in result.stdout


def test_export_program_checks_its_arguments():
    model, x = make("CNN")
    exported = export_model(model)
    with pytest.raises(ValueError, match="at least 2 samples"):
        export_program(exported, x[:1])
    program = export_program(exported, x[:1], dynamic_batch=False)
    torch.testing.assert_close(program.module()(x[:1]), exported(x[:1]))
    with pytest.raises(TypeError, match="example must be a torch.Tensor"):
        export_program(exported, [1, 2])
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        export_program("model", x)


def test_hardened_model_equals_the_model_with_fixed_nearest_permutations():
    model, x = make("WSResNet")
    hardened = harden_model(model)
    expected = WSResNet(hidden_channels=3, num_classes=5, kernel_size=3)
    expected.load_state_dict(model.state_dict())
    for _, layer in weight_sharing_layers(expected):
        with torch.no_grad():
            layer.reps = FixedStack(analysis.nearest_permutation(layer.representations()))
    with torch.no_grad():
        torch.testing.assert_close(hardened.eval()(x), expected.eval()(x), rtol=0, atol=0)
    for (_, soft), (_, hard) in zip(
        weight_sharing_layers(model), weight_sharing_layers(hardened), strict=True
    ):
        assert isinstance(soft.reps, DoublyStochasticStack)  # the source keeps its learned stacks
        assert isinstance(hard.reps, FixedStack)
        matrices = hard.reps.matrices
        assert set(matrices.unique().tolist()) == {0.0, 1.0}
        assert (matrices.sum(-1) == 1).all() and (matrices.sum(-2) == 1).all()
        torch.testing.assert_close(matrices[0], torch.eye(matrices.shape[-1]), rtol=0, atol=0)
    # The soft model really differs from its hardening, so the comparison above is not vacuous.
    with torch.no_grad():
        assert (model.eval()(x) - hardened(x)).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["WSCNN", "WSResNet"])
def test_export_with_harden_matches_the_hardened_model(family):
    model, x = make(family)
    exported = export_model(model, harden=True)
    with torch.no_grad():
        torch.testing.assert_close(
            exported(x), harden_model(model).eval()(x), **EXPORT_TOLERANCES[torch.float32]
        )


def test_hardening_exact_permutation_stacks_is_a_no_op():
    model = WSCNN(hidden_channels=2, num_classes=3, kernel_size=3, num_layers=2)
    exact = {"lift": groups.rotation_permutations(3), "convs": groups.shift_twist(3)}
    with torch.no_grad():
        for name, layer in weight_sharing_layers(model):
            # Logits 40 on the permutation's entries: Sinkhorn returns it up to e^-40.
            layer.reps.logits.copy_(40.0 * exact[name.split(".")[0]][1:])
    x = torch.randn(CONVNET_INPUT)
    hardened = harden_model(model)
    for name, layer in weight_sharing_layers(hardened):
        torch.testing.assert_close(layer.reps.matrices, exact[name.split(".")[0]], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(hardened(x), model(x), **EXPORT_TOLERANCES[torch.float32])


def test_hardening_a_gcnn_changes_nothing():
    model, x = make("GCNN")
    hardened = harden_model(model)
    assert hardened is not model
    for (_, a), (_, b) in zip(weight_sharing_layers(model), weight_sharing_layers(hardened), strict=True):
        assert torch.equal(a.reps.matrices, b.reps.matrices)
    with torch.no_grad():
        assert torch.equal(hardened(x), model(x))


def test_hardening_a_bare_stack_gives_a_fixed_stack():
    stack = DoublyStochasticStack(3, 4)
    hard = harden_model(stack)
    assert isinstance(hard, FixedStack)
    torch.testing.assert_close(hard.matrices, analysis.nearest_permutation(stack()), rtol=0, atol=0)


class _OwnForward(WSCNN):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


def test_export_rejects_what_it_cannot_mirror():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        export_model("WSCNN")
    with pytest.raises(TypeError, match="symkernels model"):
        export_model(nn.Sequential(nn.Conv2d(1, 2, 3)))
    with pytest.raises(TypeError, match="symkernels model"):
        export_model(_OwnForward(hidden_channels=2, kernel_size=3, num_layers=1))
    with pytest.raises(TypeError, match="harden must be a bool"):
        export_model(CNN(hidden_channels=2), harden=1)

    model, _ = make("WSCNN")
    model.convs[1] = nn.Identity()
    with pytest.raises(TypeError, match=r"convs\.1.*Identity"):
        export_model(model)
    resnet, _ = make("WSResNet")
    resnet.blocks[1].shortcut = nn.Conv2d(3, 6, 1)
    with pytest.raises(TypeError, match=r"blocks\.1\.shortcut.*Conv2d"):
        export_model(resnet)
    resnet, _ = make("ResNet")
    resnet.stem_norm = nn.LayerNorm(4)
    with pytest.raises(TypeError, match="stem_norm.*LayerNorm"):
        export_model(resnet)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        harden_model(torch.zeros(3))


def test_evaluate_counts_correct_predictions_and_restores_the_mode():
    model, _ = make("ResNet")
    images = torch.randn(11, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    model.train()
    with torch.no_grad():
        predicted = model.eval()(images).argmax(dim=1)
    model.train()
    labels = predicted.clone()
    labels[:4] = (labels[:4] + 1) % 5  # exactly 4 wrong
    assert evaluate(model, images, labels, batch_size=3) == pytest.approx(7 / 11)
    assert model.training
    assert evaluate(export_model(model), images, labels, batch_size=4) == pytest.approx(7 / 11)


def test_evaluate_rejects_bad_inputs():
    model, _ = make("CNN")
    images = torch.randn(4, 1, 12, 12)
    with pytest.raises(ValueError, match="same number of samples"):
        evaluate(model, images, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="1-D integer"):
        evaluate(model, images, torch.zeros(4))
    with pytest.raises(ValueError, match="at least one sample"):
        evaluate(model, images[:0], torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(model, images, torch.zeros(4, dtype=torch.long), batch_size=0)
    with pytest.raises(TypeError, match="images must be a torch.Tensor"):
        evaluate(model, images.tolist(), torch.zeros(4, dtype=torch.long))
