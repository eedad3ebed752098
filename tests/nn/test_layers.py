"""Kernel expansion, permuted convolution and the weight-sharing modules against independent computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import symkernels
from symkernels.groups import rotation_permutations, shift_twist
from symkernels.nn import DoublyStochasticStack, FixedStack, WSConv2d, WSLiftConv2d
from symkernels.reference import entropy_regularizer, norm_regularizer
from tests.testing import TOLERANCES, make_logits


def per_element_conv(x, reps, weight, bias, k, padding=0):
    """One conv2d per group element, ``R_g θ`` built by matrix-vector products (no einsum, no reshape)."""
    flat_x = x.flatten(1, 2) if x.dim() == 5 else x
    outputs = []
    for r_g in reps:
        kernel = torch.stack(
            [
                torch.stack([(r_g @ weight[o, i]).reshape(-1, k, k) for i in range(weight.shape[1])]).flatten(
                    0, 1
                )
                for o in range(weight.shape[0])
            ]
        )
        outputs.append(F.conv2d(flat_x, kernel, padding=padding))
    y = torch.stack(outputs, dim=2)
    return y if bias is None else y + bias.reshape(-1, 1, 1, 1)


def soft_stack(group_size, d, seed=0):
    return symkernels.sinkhorn(make_logits(group_size, d, d, dtype=torch.float64, seed=seed, scale=2.0))


@pytest.mark.parametrize("k,in_group", [(1, 1), (3, 1), (5, 1), (3, 4), (2, 3)])
def test_expand_kernel_matches_matrix_vector_products(k, in_group):
    d = in_group * k * k
    reps, weight = soft_stack(4, d), make_logits(3, 2, d, dtype=torch.float64, seed=1)
    kernel = symkernels.expand_kernel(reps, weight, k)
    assert kernel.shape == (3 * 4, 2 * in_group, k, k)
    for o in range(3):
        for g in range(4):
            for i in range(2):
                expected = (reps[g] @ weight[o, i]).reshape(in_group, k, k)
                torch.testing.assert_close(kernel[o * 4 + g, i * in_group : (i + 1) * in_group], expected)


@pytest.mark.parametrize("lifting", [True, False])
@pytest.mark.parametrize("padding", [0, 1])
def test_permuted_conv2d_matches_per_element_convolution(lifting, padding):
    k, group = 3, 4
    in_group = 1 if lifting else group
    d = in_group * k * k
    shape = (2, 3, 9, 9) if lifting else (2, 3, in_group, 9, 9)
    x = make_logits(*shape, dtype=torch.float64, seed=3)
    reps, weight = soft_stack(group, d), make_logits(5, 3, d, dtype=torch.float64, seed=4)
    bias = make_logits(5, 1, 1, 1, dtype=torch.float64, seed=5)
    y = symkernels.permuted_conv2d(x, reps, weight, bias, kernel_size=k, padding=padding)
    torch.testing.assert_close(
        y, per_element_conv(x, reps, weight, bias, k, padding), **TOLERANCES[torch.float64]
    )


def test_modules_expose_the_documented_attributes():
    lift = WSLiftConv2d(3, 8, 5, group_size=4)
    assert lift.weight.shape == (8, 3, 25) and lift.bias.shape == (8, 1, 1, 1)
    assert lift.reps.logits.shape == (3, 25, 25)
    assert ((lift.reps.logits >= 0) & (lift.reps.logits < 1)).all()
    assert torch.equal(lift.bias, torch.zeros(8, 1, 1, 1))
    conv = WSConv2d(8, 6, 3, group_size=4, bias=False)
    assert conv.weight.shape == (6, 8, 36) and conv.bias is None and conv.reps.logits.shape == (3, 36, 36)
    unfixed = WSConv2d(8, 6, 3, group_size=2, in_group_size=4, fix_identity=False)
    assert unfixed.reps.logits.shape == (2, 36, 36) and unfixed.weight.shape == (6, 8, 36)
    assert lift.representations().shape == (4, 25, 25)
    assert torch.equal(lift.representations()[0], torch.eye(25))
    assert lift.kernel().shape == (32, 3, 5, 5) and conv.kernel().shape == (24, 32, 3, 3)


def test_weight_init_scale_follows_kaiming_with_a_sqrt5():
    torch.manual_seed(0)
    conv = WSConv2d(32, 32, 5)
    bound = 1 / math.sqrt(32 * 100)  # kaiming_uniform_(a=√5) gives U(-1/√fan_in, 1/√fan_in)
    assert conv.weight.abs().max() <= bound and conv.weight.abs().max() > 0.9 * bound
    lift = WSLiftConv2d(32, 64, 5)
    expected_std = math.sqrt(1 / 3) / math.sqrt(32 * 25)  # kaiming_normal_(a=√5): gain √(2/6) over √fan_in
    torch.testing.assert_close(lift.weight.std().item(), expected_std, rtol=0.05, atol=0)


@pytest.mark.parametrize("layer_cls,shape", [(WSLiftConv2d, (2, 3, 12, 12)), (WSConv2d, (2, 3, 4, 12, 12))])
def test_module_forward_equals_functional(layer_cls, shape):
    layer = layer_cls(3, 4, 3, padding=1).double()
    x = make_logits(*shape, dtype=torch.float64)
    expected = per_element_conv(x, layer.representations(), layer.weight, layer.bias, 3, padding=1)
    torch.testing.assert_close(layer(x), expected, **TOLERANCES[torch.float64])


def test_gradients_reach_weight_logits_and_bias():
    layer = WSConv2d(2, 3, 3)
    layer(torch.randn(2, 2, 4, 7, 7)).square().sum().backward()
    for p in (layer.weight, layer.bias, layer.reps.logits):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_regularizers_follow_their_formulas():
    layer = WSConv2d(2, 3, 3).double()
    norm, entropy = layer.regularizers()
    logits = layer.reps.logits
    rows, cols = torch.logsumexp(logits, -1), torch.logsumexp(logits, -2)
    expected_norm = (rows.square()[..., :, None] + cols.square()[..., None, :]).mean()
    torch.testing.assert_close(norm, expected_norm)
    stack = layer.representations()
    torch.testing.assert_close(entropy, -(stack * torch.log(stack.clamp_min(1e-16))).sum())
    assert norm_regularizer(logits) == norm and entropy_regularizer(stack) == entropy


def test_fixed_stack_replaces_learned_stack():
    layer = WSLiftConv2d(1, 2, 3)
    layer.reps = FixedStack(rotation_permutations(3))
    assert list(layer.reps.parameters()) == []
    assert torch.equal(layer.representations(), rotation_permutations(3))
    norm, entropy = layer.regularizers()
    assert norm == 0 and entropy == 0


def rotate(x, r):
    return torch.rot90(x, r, dims=(-2, -1))


@pytest.mark.parametrize("r", [1, 2, 3])
def test_lifting_layer_with_exact_rotations_is_equivariant(r):
    layer = WSLiftConv2d(2, 3, 5).double()
    layer.reps = FixedStack(rotation_permutations(5, dtype=torch.float64))
    x = make_logits(2, 2, 13, 13, dtype=torch.float64)
    y = layer(x)
    torch.testing.assert_close(layer(rotate(x, r)), rotate(torch.roll(y, r, dims=2), r))


@pytest.mark.parametrize("r", [1, 2, 3])
def test_group_conv_with_shift_twist_is_equivariant(r):
    layer = WSConv2d(2, 3, 3, padding=1).double()
    layer.reps = FixedStack(shift_twist(3, dtype=torch.float64))
    x = make_logits(2, 2, 4, 9, 9, dtype=torch.float64)
    y = layer(x)
    rotated_input = rotate(torch.roll(x, r, dims=2), r)
    torch.testing.assert_close(layer(rotated_input), rotate(torch.roll(y, r, dims=2), r))


def test_learned_stack_is_not_equivariant():
    """The equivariance tests above can fail: a soft stack breaks the symmetry."""
    layer = WSLiftConv2d(2, 3, 5).double()
    x = make_logits(1, 2, 13, 13, dtype=torch.float64)
    rotated = layer(rotate(x, 1))
    assert not torch.allclose(rotated, rotate(torch.roll(layer(x), 1, dims=2), 1), atol=1e-3)


def test_doubly_stochastic_stack_shapes_and_identity():
    stack = DoublyStochasticStack(4, 9)
    assert stack.logits.shape == (3, 9, 9)
    out = stack()
    assert out.shape == (4, 9, 9) and torch.equal(out[0], torch.eye(9))
    assert list(dict(stack.named_parameters())) == ["logits"]
    free = DoublyStochasticStack(4, 9, fix_identity=False)
    assert free.logits.shape == (4, 9, 9)
    assert DoublyStochasticStack(1, 4)().shape == (1, 4, 4)


def test_doubly_stochastic_stack_init_from_a_generator_leaves_the_global_rng_alone():
    before = torch.random.get_rng_state()
    first = DoublyStochasticStack(4, 9, generator=torch.Generator().manual_seed(3)).logits.detach()
    second = DoublyStochasticStack(4, 9, generator=torch.Generator().manual_seed(3)).logits.detach()
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(first, second)
    assert torch.equal(first, torch.rand(3, 9, 9, generator=torch.Generator().manual_seed(3)))
    assert float(first.min()) >= 0 and float(first.max()) < 1
