"""The paper's models: exact parameter counts (docs/design.md §8), shapes, invariance, regularisers."""

from __future__ import annotations

import pytest
import torch

from symkernels.models import CNN, GCNN, WSCNN, ResNet, WSResNet, parameter_counts
from tests.testing import make_logits

PUBLISHED_COUNTS = [
    (WSCNN, {}, 410_890, 121_875),
    (CNN, {}, 412_170, 0),
    (GCNN, {}, 410_890, 0),
    (GCNN, {"hidden_channels": 16}, 103_050, 0),
    (WSResNet, {}, 1_632_394, 468_195),
    (ResNet, {}, 428_170, 0),
    (ResNet, {"hidden_channels": 64}, 1_660_170, 0),
    (ResNet, {"hidden_channels": 128}, 6_544_906, 0),
]


@pytest.mark.parametrize("model_cls,kwargs,free,logits", PUBLISHED_COUNTS)
def test_parameter_counts_match_the_paper(model_cls, kwargs, free, logits):
    assert parameter_counts(model_cls(**kwargs)) == {"free": free, "logits": logits}


def test_logit_count_formula():
    # (|G|−1)·k⁴ for the lifting layer, (|G|−1)·|G|²·k⁴ per group-conv layer.
    model = WSCNN(hidden_channels=4, kernel_size=3, group_size=2, num_layers=2)
    assert parameter_counts(model)["logits"] == 1 * 3**4 + 2 * 1 * 2**2 * 3**4


@pytest.mark.smoke
@pytest.mark.parametrize(
    "model_cls,shape",
    [
        (WSCNN, (2, 1, 28, 28)),
        (CNN, (2, 1, 28, 28)),
        (GCNN, (2, 1, 28, 28)),
        (WSResNet, (2, 3, 32, 32)),
        (ResNet, (2, 3, 32, 32)),
    ],
)
def test_forward_backward(model_cls, shape):
    model = model_cls(hidden_channels=4, num_classes=7)
    out = model(torch.randn(shape))
    assert out.shape == (2, 7)
    norm, entropy = model.regularizers()
    (out.square().mean() + norm + entropy).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_gcnn_logits_are_invariant_to_quarter_turns():
    model = GCNN(hidden_channels=4).double().eval()
    x = make_logits(3, 1, 28, 28, dtype=torch.float64)
    out = model(x)
    for r in (1, 2, 3):
        torch.testing.assert_close(model(torch.rot90(x, r, dims=(-2, -1))), out, rtol=1e-9, atol=1e-10)


def test_regularizers_sum_over_layers():
    model = WSCNN(hidden_channels=2, num_layers=2)
    norms, entropies = zip(*(layer.regularizers() for layer in [model.lift, *model.convs]), strict=True)
    norm, entropy = model.regularizers()
    torch.testing.assert_close(norm, sum(norms))
    torch.testing.assert_close(entropy, sum(entropies))
    assert norm > 0 and entropy > 0
    zero_norm, zero_entropy = CNN(hidden_channels=2).regularizers()
    assert zero_norm == 0 and zero_entropy == 0


def test_defaults_are_the_papers_layouts():
    model = WSCNN()
    assert model.lift.kernel_size == 5 and model.lift.group_size == 4 and len(model.convs) == 4
    assert model.lift.reps.n_iter == 20 and model.lift.padding == 0
    resnet = WSResNet()
    assert resnet.stem.kernel_size == 7 and resnet.stem.padding == 3
    assert resnet(torch.randn(2, 3, 32, 32)).shape == (2, 10)
