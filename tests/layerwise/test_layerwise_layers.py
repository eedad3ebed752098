"""Relaxed layers: shapes, parameter counts, the two forms of each path, the structure each path encodes."""

import pytest
import torch
import torch.nn.functional as F

import symkernels
from symkernels.layerwise import (
    PAPER_BLOCKS,
    PATH_SETS,
    FactoredDensePath,
    GroupConvPath,
    RelaxedBackbone,
    RelaxedLayer,
    SharingLayer,
    SharingNetwork,
    SparseConvPath,
    curvature_form,
    make_path,
)
from symkernels.layerwise.interpolation import anchor_count, grid_points, rbf_interpolation
from symkernels.layerwise.models import parse_blocks
from symkernels.layerwise.paths import PATHS, circular_pad

C_IN, C_OUT, SIZE, K = 3, 5, 8, 3


def expected_parameters(name: str, c_in: int, c_out: int, size: int, stride: int) -> int:
    """The paper's parameter counts of each path, written out."""
    x_in, x_out = size * size, (size // stride) ** 2
    if name == "gconv":  # one C → C' convolution shared by the four copies of the lifted G·C channels
        return c_out // 4 * c_in // 4 * K * K + c_out // 4
    if name == "fc":
        return c_in * x_in * c_out * x_out + c_out * x_out
    if name == "conv":
        return c_out * c_in * K * K + c_out
    if name == "sconv":
        return c_out * c_in * 7 + c_out  # M = round(0.8·9) = 7 anchors
    if name == "ffc":
        return c_out * c_in * (x_in + x_out) + c_out + x_out
    if name == "sfc":
        m_in, m_out = round(0.5 * x_in), round(0.5 * x_out)
        return c_out * c_in * (m_in + m_out) + c_out + m_out
    raise AssertionError(name)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("name", PATHS)
def test_each_path_has_the_papers_shape_and_parameter_count(name, stride):
    c_in, c_out = _channels(name)
    path = make_path(name, c_in, c_out, SIZE, stride)
    y = path(torch.randn(2, c_in, SIZE, SIZE))
    assert y.shape == (2, c_out, SIZE // stride, SIZE // stride)
    assert sum(p.numel() for p in path.parameters()) == expected_parameters(name, c_in, c_out, SIZE, stride)


def _channels(name: str) -> tuple[int, int]:
    """GCONV works on lifted maps: four copies of C_IN channels in, four of C_OUT out."""
    return (4 * C_IN, 4 * C_OUT) if name == "gconv" else (C_IN, C_OUT)


def test_anchor_counts_follow_the_fractions():
    assert anchor_count(0.8, 9) == 7 and anchor_count(0.5, 9) == 4 and anchor_count(0.5, 64) == 32
    with pytest.raises(ValueError, match="fraction"):
        anchor_count(0.0, 9)


def _backbone_count(in_channels: int, paths: tuple[str, ...], classes: int = 10) -> int:
    total, channels, size = 0, in_channels, 32
    G = 4 if "gconv" in paths else 1  # every block of a backbone with GCONV maps lifted channels
    for mult, stride in PAPER_BLOCKS:
        total += sum(expected_parameters(p, G * channels, G * 10 * mult, size, stride) for p in paths)
        channels, size = 10 * mult, size // stride
    assert (channels, size) == (160, 1)
    return total + (160 * 640 + 640) + (640 * classes + classes)


def test_the_papers_fc_conv_backbone_has_its_parameter_count():
    with torch.device("meta"):  # 200 M parameters: counted, never allocated
        model = RelaxedBackbone(3, 10, paths=PATH_SETS["fc-conv"])
    assert len(model.blocks) == 8
    assert sum(p.numel() for p in model.parameters()) == _backbone_count(3, ("fc", "conv"))


def test_the_papers_group_selection_backbone_runs_on_32x32():
    model = RelaxedBackbone(1, 10, paths=PATH_SETS["groups"])
    assert sum(p.numel() for p in model.parameters()) == _backbone_count(1, ("ffc", "conv", "gconv"))
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("name", ["ffc", "sfc", "gconv"])
def test_training_and_curvature_forms_agree_in_value_and_gradient(name, stride):
    torch.manual_seed(0)
    c_in, c_out = _channels(name)
    path = make_path(name, c_in, c_out, SIZE, stride).double()
    x = torch.randn(3, c_in, SIZE, SIZE, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(3, c_out, SIZE // stride, SIZE // stride, dtype=torch.float64)
    fast = path(x)
    fast_grads = torch.autograd.grad((fast * probe).sum(), [x, *path.parameters()])
    with curvature_form(path):
        slow = path(x)
    assert not path.in_curvature_form  # switched back
    slow_grads = torch.autograd.grad((slow * probe).sum(), [x, *path.parameters()])
    torch.testing.assert_close(fast, slow)
    for a, b in zip(fast_grads, slow_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_conv_pads_circularly():
    path = make_path("conv", 1, 1, 6)
    x = torch.randn(1, 1, 6, 6)
    expected = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="circular"), path.conv.weight, path.conv.bias)
    torch.testing.assert_close(path(x), expected)
    shifted = torch.roll(x, shifts=(2, -1), dims=(-2, -1))  # circular: shifting commutes exactly
    torch.testing.assert_close(path(shifted), torch.roll(path(x), shifts=(2, -1), dims=(-2, -1)))


def test_sparse_conv_is_the_dense_conv_of_its_interpolated_filters():
    path = SparseConvPath(C_IN, C_OUT, SIZE).double()
    x = torch.randn(2, C_IN, SIZE, SIZE, dtype=torch.float64)
    expected = F.conv2d(circular_pad(x, K), path.dense_weight(), path.conv.bias)
    torch.testing.assert_close(path(x), expected)
    # Ψ interpolates: the RBF regression reproduces the anchor values at the anchors (up to σ² = 1e-4).
    anchors = torch.tensor([[0.3, 1.7], [2.0, 0.1], [1.1, 1.2]], dtype=torch.float64)
    psi = rbf_interpolation(anchors, torch.cat([anchors, grid_points(3, 3)]))
    torch.testing.assert_close(psi[:, :3], torch.eye(3, dtype=torch.float64), atol=2e-3, rtol=0)


@pytest.mark.parametrize("sparse", [False, True])
def test_factored_fc_is_a_rank_one_spatial_map_per_channel_pair(sparse):
    anchors = {"in_anchors": 20, "out_anchors": 9} if sparse else {}
    path = FactoredDensePath(C_IN, C_OUT, 6, 2, **anchors).double()
    x = torch.randn(2, C_IN, 6, 6, dtype=torch.float64)
    U = path.first.weight.reshape(C_OUT, C_IN, -1)
    V = path.second.weight.reshape(-1, C_OUT, C_IN)
    if sparse:
        U, V = U @ path.psi_in, torch.einsum("mx,mdc->xdc", path.psi_out, V)
    rows = x.flatten(2)
    expected = torch.zeros(2, C_OUT, 9, dtype=torch.float64)
    for d in range(C_OUT):  # y[b,d,y] = Σ_c V[y,d,c] (Σ_x U[d,c,x] x[b,c,x] + bU[d]) + bV[y]
        for c in range(C_IN):
            z = rows[:, c] @ U[d, c] + path.first.bias[d]
            expected[:, d] += z[:, None] * V[:, d, c]
    bias = path.second.bias @ path.psi_out if sparse else path.second.bias
    torch.testing.assert_close(path(x).flatten(2), expected + bias)
    assert torch.linalg.matrix_rank(path.dense_weight().reshape(C_OUT, 9, C_IN, 36)[1, :, 2, :]) == 1


def test_group_conv_path_convolves_every_copy_with_one_filter_and_commutes_with_the_copies_shift():
    path = GroupConvPath(4 * C_IN, 4 * C_OUT, SIZE).double()
    x = torch.randn(2, 4 * C_IN, SIZE, SIZE, dtype=torch.float64)
    W = path.linear.weight.reshape(C_OUT, C_IN, K, K)
    copies = [F.conv2d(circular_pad(c, K), W, path.linear.bias) for c in x.split(C_IN, dim=1)]
    torch.testing.assert_close(path(x), torch.cat(copies, dim=1))
    shifted = torch.roll(x, C_IN, dims=1)  # what a quarter turn of the image does to its lifted copies
    torch.testing.assert_close(path(shifted), torch.roll(path(x), C_OUT, dims=1))
    with pytest.raises(ValueError, match="multiples of 4"):
        GroupConvPath(C_IN, 4 * C_OUT, SIZE)


def test_a_backbone_of_group_convolutions_is_invariant_to_quarter_turns_and_the_others_are_not():
    torch.manual_seed(0)
    x = torch.rand(3, 1, 16, 16, dtype=torch.float64)
    turned = torch.rot90(x, 1, (-2, -1))
    blocks = parse_blocks("1:1,2:2,2:2")
    for paths, invariant in ((("gconv",), True), (PATH_SETS["groups"], False)):
        model = RelaxedBackbone(1, 10, size=16, width=2, blocks=blocks, paths=paths).double()
        assert model.group_size == 4 and model.blocks[0].paths["gconv"].in_channels == 4
        if invariant:
            torch.testing.assert_close(model(turned), model(x))
        else:  # CONV and F-FC mix the copies without tying their weights
            assert (model(turned) - model(x)).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["conv", "sconv", "gconv"])
def test_strided_paths_keep_every_other_position_and_follow_even_shifts(name):
    torch.manual_seed(0)
    c_in, c_out = _channels(name)
    strided = make_path(name, c_in, c_out, SIZE, 2).double()
    full = make_path(name, c_in, c_out, SIZE, 1).double()
    full.load_state_dict(strided.state_dict())
    x = torch.randn(2, c_in, SIZE, SIZE, dtype=torch.float64)
    torch.testing.assert_close(strided(x), full(x)[..., ::2, ::2])
    with curvature_form(strided):
        torch.testing.assert_close(strided(x), full(x)[..., ::2, ::2])
    shifted = strided(torch.roll(x, (2, -4), dims=(-2, -1)))
    torch.testing.assert_close(shifted, torch.roll(strided(x), (1, -2), dims=(-2, -1)))


def test_relaxed_layer_averages_its_paths_and_keeps_activations_alive():
    torch.manual_seed(0)
    layer = RelaxedLayer(C_IN, C_OUT, SIZE, 1, ("fc", "conv"))
    x = torch.randn(4, C_IN, SIZE, SIZE)
    expected = F.relu(0.5 * (layer.paths["fc"](x) + layer.paths["conv"](x)))
    torch.testing.assert_close(layer(x), expected)
    model = RelaxedBackbone(1, 10, size=16, width=4, blocks=parse_blocks("1:1,2:2,2:2,4:2"))
    h = torch.rand(64, 1, 16, 16)
    for block in model.blocks:  # He-style initialisation: the signal neither vanishes nor explodes
        h = block(h)
        assert 0.05 < h.square().mean().sqrt() < 5


def test_sharing_path_matches_permuted_conv2d_and_exact_stacks_give_a_gcnn():
    torch.manual_seed(0)
    for lifting in (True, False):
        layer = SharingLayer(2, 3, lifting=lifting, stack="learned").double()
        x = torch.randn(2, 2, 6, 6, dtype=torch.float64) if lifting else torch.randn(2, 2, 4, 6, 6).double()
        ws = layer.paths["ws"]
        padded = circular_pad(x if lifting else x.flatten(1, 2), K)
        if not lifting:
            padded = padded.unflatten(1, (2, 4))
        weight = ws.linear.weight.reshape(3, 2, ws.dim)
        expected = symkernels.permuted_conv2d(padded, ws.reps(), weight, ws.linear.bias, kernel_size=K)
        torch.testing.assert_close(ws(x), expected)
        with curvature_form(layer):
            torch.testing.assert_close(ws(x), expected)
    # With the exact stacks the WS path alone is a C4 G-CNN: rotating the input rotates space and shifts G.
    net = SharingNetwork(1, 10, width=2, blocks=((1, 1), (1, 1)), stack="exact").double()
    x = torch.randn(1, 1, 6, 6, dtype=torch.float64)
    lift, group = net.blocks[0].paths["ws"], net.blocks[1].paths["ws"]
    features = group(lift(x))
    rotated = group(lift(torch.rot90(x, 1, (-2, -1))))
    torch.testing.assert_close(rotated, torch.roll(torch.rot90(features, 1, (-2, -1)), 1, dims=2))


def test_bad_inputs_are_refused_with_the_argument_named():
    with pytest.raises(ValueError, match="path must be one of"):
        make_path("dense", 1, 1, 4)
    with pytest.raises(ValueError, match="not divisible by stride"):
        make_path("conv", 1, 1, 5, 2)
    with pytest.raises(ValueError, match="expects input"):
        make_path("fc", 1, 1, 4)(torch.randn(1, 1, 5, 5))
    with pytest.raises(ValueError, match="paths must be"):
        RelaxedLayer(1, 1, 4, 1, ("conv", "conv"))
    with pytest.raises(ValueError, match="blocks"):
        parse_blocks("1:3")
    with pytest.raises(ValueError, match="stride"):
        RelaxedBackbone(1, 10, size=6, width=2, blocks=((1, 2), (1, 2)))
