"""symkernels.compat: the published module API computed by symkernels' ops.

Each compat module is checked against symkernels' own module with the same parameters (a fixed iteration
count), and its default against the published computation written here in pure PyTorch (the authors' loop from
symkernels.reference, the stored ``id``, an einsum expansion and ``F.conv2d``). The published checkpoint
layout (keys, shapes, order) is written out here from the published modules' definitions.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import symkernels
from symkernels import compat, models
from symkernels import nn as sknn
from symkernels.reference import entropy_regularizer, norm_regularizer
from symkernels.reference.authors_loop import sinkhorn_early_exit
from symkernels.reference.expansion import permuted_conv2d_reference
from tests.testing import TOLERANCES

F64 = TOLERANCES[torch.float64]
F32 = TOLERANCES[torch.float32]
IDENTITY_OFFSET = 1e-16  # the published modules store the fixed identity as eye + 1e-16


def make_compat(kind, c_in, c_out, k, group, **kwargs):
    kwargs.setdefault("device", "cpu")
    if kind == "lift":
        return compat.WSLiftConv2d(c_in, c_out, k, group, 20, **kwargs)
    return compat.WSConv2d(c_in, c_out, k, group, group, 20, **kwargs)


def make_own(kind, c_in, c_out, k, group, *, padding, fix_identity, bias=True):
    cls = sknn.WSLiftConv2d if kind == "lift" else sknn.WSConv2d
    return cls(c_in, c_out, k, group, padding=padding, fix_identity=fix_identity, bias=bias, n_iter=20)


def copy_into_own(layer, own):
    with torch.no_grad():
        own.weight.copy_(layer.weight)
        own.reps.logits.copy_(layer.representations)
        if layer.bias is not None:
            own.bias.copy_(layer.bias)


def input_for(kind, c_in, group, size=9, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shape = (2, c_in, size, size) if kind == "lift" else (2, c_in, group, size, size)
    return torch.randn(shape, generator=generator, dtype=dtype)


def published_forward(layer, x):
    """The published layer's computation: the authors' loop (with its test before every iteration), the
    stored ``id`` concatenated in front, the einsum expansion and one conv2d."""
    learned = sinkhorn_early_exit(layer.representations, layer.n_iter)
    stack = torch.cat([layer.id, learned]) if layer.fix_identity else learned
    y = permuted_conv2d_reference(
        x, stack, layer.weight, layer.bias, kernel_size=layer.kernel_size, padding=layer.padding
    )
    return y, stack


def gradients(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


LAYER_CASES = [
    ("lift", True, 0),
    ("lift", False, "same"),
    ("group", True, 1),
    ("group", False, 0),
]


@pytest.mark.parametrize("kind,fix_identity,padding", LAYER_CASES)
def test_layers_equal_symkernels_layers_with_a_fixed_iteration_count(kind, fix_identity, padding):
    torch.manual_seed(0)
    c_in, c_out, k, group = 2, 3, 3, 4
    layer = make_compat(kind, c_in, c_out, k, group, padding=padding, fix_identity=fix_identity, tol=None)
    own = make_own(kind, c_in, c_out, k, group, padding=padding, fix_identity=fix_identity)
    with torch.no_grad():
        layer.bias.normal_()
    copy_into_own(layer, own)
    layer, own = layer.double(), own.double()
    x = input_for(kind, c_in, group).requires_grad_(True)

    y, y_own = layer(x), own(x)
    torch.testing.assert_close(y, y_own, **F64)
    torch.testing.assert_close(layer.get_W(), own.kernel(), **F64)
    torch.testing.assert_close(layer.get_representations(), own.representations(), **F64)
    norm, entropy = layer.get_loss()
    norm_own, entropy_own = own.regularizers()
    torch.testing.assert_close(norm, norm_own, **F64)
    # The stored id's 1e-16 off the diagonal adds ~1e-12 of entropy over symkernels' exact identity.
    torch.testing.assert_close(entropy, entropy_own, rtol=1e-10, atol=1e-10)

    weights = torch.randn_like(y)
    loss = (y * weights).sum() + norm + 0.01 * entropy
    loss_own = (y_own * weights).sum() + norm_own + 0.01 * entropy_own
    got = gradients(loss, [x, layer.weight, layer.bias, layer.representations])
    want = gradients(loss_own, [x, own.weight, own.bias, own.reps.logits])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **F64)


@pytest.mark.parametrize("kind,fix_identity,padding", LAYER_CASES)
def test_default_is_the_published_stopping_rule(kind, fix_identity, padding):
    torch.manual_seed(1)
    c_in, c_out, k, group = 2, 3, 3, 4
    layer = make_compat(kind, c_in, c_out, k, group, padding=padding, fix_identity=fix_identity).double()
    assert layer.tol == symkernels.AUTHORS_TOLERANCE
    x = input_for(kind, c_in, group).requires_grad_(True)

    y = layer(x)
    y_published, stack_published = published_forward(layer, x)
    torch.testing.assert_close(y, y_published, **F64)
    torch.testing.assert_close(layer.get_representations(), stack_published, **F64)
    norm, entropy = layer.get_loss()
    torch.testing.assert_close(norm, norm_regularizer(layer.representations), **F64)
    torch.testing.assert_close(entropy, entropy_regularizer(stack_published), **F64)

    weights = torch.randn_like(y)
    params = [x, layer.weight, layer.bias, layer.representations]
    got = gradients((y * weights).sum() + norm + 0.01 * entropy, params)
    norm_published = norm_regularizer(layer.representations)
    want = gradients(
        (y_published * weights).sum() + norm_published + 0.01 * entropy_regularizer(stack_published), params
    )
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **F64)

    # U[0, 1) logits pass the published test after a few iterations: the early exit is not 20 iterations.
    _, iterations = symkernels.sinkhorn(
        layer.representations, 20, tol=layer.tol, stop="stack", return_iterations=True
    )
    assert int(iterations.max()) < 20
    fixed = symkernels.sinkhorn(layer.representations, 20)
    assert not torch.allclose(layer.learned_representations(), fixed, rtol=0, atol=1e-9)


def test_logits_already_doubly_stochastic_run_no_iteration_as_published():
    """The published loop tests exp(logits) before its first iteration (the norm regulariser drives the logits
    there); the fused op alone always runs one iteration, whose gradient differs."""
    torch.manual_seed(2)
    layer = make_compat("lift", 1, 2, 3, 3, fix_identity=True).double()
    n = 9
    shifts = [torch.eye(n, dtype=torch.float64).roll(s, dims=1) for s in (1, 2)]
    doubly_stochastic = torch.stack([0.7 * p + 0.3 / n for p in shifts])
    with torch.no_grad():
        layer.representations.copy_(doubly_stochastic.log())
    upstream = torch.randn(2, n, n, dtype=torch.float64)

    learned = layer.learned_representations()
    (grad,) = torch.autograd.grad((learned * upstream).sum(), layer.representations)
    published = sinkhorn_early_exit(layer.representations, layer.n_iter)
    (grad_published,) = torch.autograd.grad((published * upstream).sum(), layer.representations)
    torch.testing.assert_close(learned, published, **F64)
    torch.testing.assert_close(grad, grad_published, **F64)
    torch.testing.assert_close(grad, upstream * doubly_stochastic, **F64)  # d exp(Θ) = exp(Θ) dΘ

    one_iteration = symkernels.sinkhorn(layer.representations, 20, tol=layer.tol, stop="stack")
    (grad_one,) = torch.autograd.grad((one_iteration * upstream).sum(), layer.representations)
    assert (grad_one - grad_published).abs().max() > 1e-2


def test_float32_forward_and_gradients_match_the_published_computation():
    """The published dtype: the fused op and the authors' loop decide the same iteration counts."""
    torch.manual_seed(3)
    layer = make_compat("group", 3, 2, 3, 4, fix_identity=True, padding=1)
    x = input_for("group", 3, 4, dtype=torch.float32)
    y, (y_published, _) = layer(x), published_forward(layer, x)
    torch.testing.assert_close(y, y_published, **F32)
    weights = torch.randn_like(y)
    params = [layer.weight, layer.representations]
    got, want = gradients((y * weights).sum(), params), gradients((y_published * weights).sum(), params)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_non_finite_representations_give_nan_outputs_as_published():
    layer = make_compat("lift", 1, 2, 3, 4)
    with torch.no_grad():
        layer.representations[0, 0, 0] = float("nan")
    assert layer(torch.randn(1, 1, 5, 5)).isnan().any()


# ------------------------------------------------------------------------------------------------------------
# Checkpoints: the published layout, written out from the published modules' definitions.


def published_layer_layout(prefix, c_in, c_out, k, g_in, g_out, *, fix_identity=False, bias=True):
    """``[(key, shape)]`` in registration order: weight, bias, id, representations."""
    d = g_in * k * k
    layout = [(f"{prefix}weight", (c_out, c_in, d))]
    if bias:
        layout.append((f"{prefix}bias", (c_out, 1, 1, 1)))
    if fix_identity:
        layout.append((f"{prefix}id", (1, d, d)))
    layout.append((f"{prefix}representations", (g_out - 1 if fix_identity else g_out, d, d)))
    return layout


def batch_norm_layout(prefix, channels):
    return [
        (f"{prefix}weight", (channels,)),
        (f"{prefix}bias", (channels,)),
        (f"{prefix}running_mean", (channels,)),
        (f"{prefix}running_var", (channels,)),
        (f"{prefix}num_batches_tracked", ()),
    ]


def published_wscnn_layout(in_channels, out_channels, k, num_hidden, group, hidden, fix_identity):
    layout = published_layer_layout(
        "first_conv.", in_channels, hidden, k, 1, group, fix_identity=fix_identity
    )
    for i in range(num_hidden):
        layout += published_layer_layout(
            f"convs.{i}.", hidden, hidden, k, group, group, fix_identity=fix_identity
        )
    return layout + [("final_linear.weight", (out_channels, hidden)), ("final_linear.bias", (out_channels,))]


def published_wsresnet_layout(in_channels, out_channels, k, hidden, group, fix_identity):
    layout = published_layer_layout(
        "lifting_conv.", in_channels, hidden, k, 1, group, fix_identity=fix_identity
    )
    layout += batch_norm_layout("norm1.", hidden)
    for name, c_in, c_out in (("resblock1", hidden, hidden), ("resblock2", hidden, 2 * hidden)):
        for conv, conv_in in (("gconv1", c_in), ("gconv2", c_out)):
            layout += published_layer_layout(
                f"{name}.{conv}.", conv_in, c_out, k, group, group, fix_identity=fix_identity
            )
        layout += batch_norm_layout(f"{name}.norm_out.", c_out)
        if c_in != c_out:
            layout += [(f"{name}.shortcut.weight", (c_out, c_in)), (f"{name}.shortcut.bias", (c_out,))]
    layout += [("final_linear.0.weight", (256, 2 * hidden))]
    layout += batch_norm_layout("final_linear.1.", 256)
    return layout + [("final_linear.4.weight", (out_channels, 256)), ("final_linear.4.bias", (out_channels,))]


def checkpoint_for(layout, seed=0):
    """A state_dict in the given layout: random values, ``id`` as published (eye + 1e-16)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in layout:
        if key.endswith(".id") or key == "id":
            state[key] = torch.eye(shape[-1]).unsqueeze(0) + IDENTITY_OFFSET
        elif key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        else:
            state[key] = torch.rand(shape, generator=generator)
    return state


def layout_of(module):
    return [(key, tuple(value.shape)) for key, value in module.state_dict().items()]


@pytest.mark.parametrize("kind", ["lift", "group"])
@pytest.mark.parametrize("fix_identity", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_layer_checkpoints_have_the_published_layout_and_load_both_ways(kind, fix_identity, bias):
    c_in, c_out, k, group = 2, 3, 3, 4
    g_in = 1 if kind == "lift" else group
    layout = published_layer_layout("", c_in, c_out, k, g_in, group, fix_identity=fix_identity, bias=bias)
    layer = make_compat(kind, c_in, c_out, k, group, fix_identity=fix_identity, bias=bias)
    assert layout_of(layer) == layout
    assert [name for name, _ in layer.named_parameters()] == [key for key, _ in layout]
    if fix_identity:
        assert not layer.id.requires_grad
        torch.testing.assert_close(layer.id, torch.eye(g_in * k * k).unsqueeze(0) + IDENTITY_OFFSET)

    published = checkpoint_for(layout)
    layer.load_state_dict(published)  # strict
    for key, value in published.items():
        assert torch.equal(layer.state_dict()[key], value), key
    x = input_for(kind, c_in, group, dtype=torch.float32)
    expected = layer(x)

    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh = make_compat(kind, c_in, c_out, k, group, fix_identity=fix_identity, bias=bias)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("fix_identity", [False, True])
def test_model_checkpoints_have_the_published_layout_and_round_trip(fix_identity):
    wscnn = compat.WSCNN(1, 10, 3, 2, 4, 4, "cpu", fix_identity=fix_identity)
    wscnn_layout = published_wscnn_layout(1, 10, 3, 2, 4, 4, fix_identity)
    resnet = compat.WSResNet(3, 10, 3, 4, 4, fix_identity=fix_identity)
    resnet_layout = published_wsresnet_layout(3, 10, 3, 4, 4, fix_identity)
    cases = [
        (wscnn, wscnn_layout, lambda: compat.WSCNN(1, 10, 3, 2, 4, 4, "cpu", fix_identity=fix_identity), 12),
        (resnet, resnet_layout, lambda: compat.WSResNet(3, 10, 3, 4, 4, fix_identity=fix_identity), 8),
    ]
    for model, layout, build, size in cases:
        assert layout_of(model) == layout
        # Parameters in the published order: optimizer state saved next to a checkpoint lines up too.
        parameter_keys = [key for key, _ in layout if "running" not in key and "num_batches" not in key]
        assert [name for name, _ in model.named_parameters()] == parameter_keys
        model.load_state_dict(checkpoint_for(layout, seed=4))
        x = torch.randn(2, 3 if model is resnet else 1, size, size)
        expected = model.eval()(x)
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        buffer.seek(0)
        torch.manual_seed(99)
        fresh = build()
        fresh.load_state_dict(torch.load(buffer, weights_only=True))
        torch.testing.assert_close(fresh.eval()(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["lift", "group"])
@pytest.mark.parametrize("init_mode", ["rand", "kaiming_uniform"])
def test_a_seed_gives_the_published_initial_parameters(kind, init_mode):
    """The published draw order: representations first, then the weight (normal for the lifting layer,
    uniform for the group convolution), the bias zero."""
    c_in, c_out, k, group = 2, 3, 3, 4
    d = (1 if kind == "lift" else group) * k * k
    torch.manual_seed(5)
    layer = make_compat(kind, c_in, c_out, k, group, fix_identity=True, init_mode=init_mode)
    torch.manual_seed(5)
    if init_mode == "rand":
        representations = torch.rand(group - 1, d, d)
    else:
        representations = torch.nn.init.kaiming_uniform_(torch.empty(group - 1, d, d))
    init = torch.nn.init.kaiming_normal_ if kind == "lift" else torch.nn.init.kaiming_uniform_
    weight = init(torch.empty(c_out, c_in, d), a=math.sqrt(5))
    assert torch.equal(layer.representations, representations)
    assert torch.equal(layer.weight, weight)
    assert torch.equal(layer.bias, torch.zeros(c_out, 1, 1, 1))


# ------------------------------------------------------------------------------------------------------------
# Models


def copy_models(model, own, pairs):
    """Copy ``model``'s parameters and buffers into ``own``; ``pairs``: (compat prefix, own prefix); a
    weight-sharing layer's ``representations`` go to ``reps.logits``, its ``id`` has no counterpart."""
    own_state = own.state_dict()
    copied = set()
    for key, value in model.state_dict().items():
        if key.endswith(".id"):
            continue
        prefix = next(p for p in pairs if key.startswith(p[0] + "."))
        rest = key.removeprefix(prefix[0] + ".").replace("representations", "reps.logits")
        target = f"{prefix[1]}.{rest}"
        own_state[target].copy_(value)
        copied.add(target)
    assert copied == set(own_state), set(own_state) - copied


def test_wscnn_equals_symkernels_wscnn():
    torch.manual_seed(6)
    model = compat.WSCNN(1, 10, 3, 2, 4, 4, "cpu", fix_identity=True, tol=None).double()
    own = models.WSCNN(1, 10, 4, 3, 4, num_layers=2).double()
    pairs = [("first_conv", "lift"), ("convs", "convs"), ("final_linear", "head")]
    copy_models(model, own, pairs)
    x = torch.randn(3, 1, 10, 10, dtype=torch.float64)
    y, y_own = model(x), own(x)
    torch.testing.assert_close(y, y_own, **F64)
    (norm, entropy), (norm_own, entropy_own) = model.get_loss(), own.regularizers()
    torch.testing.assert_close(norm, norm_own, **F64)
    torch.testing.assert_close(entropy, entropy_own, rtol=1e-10, atol=1e-10)
    labels = torch.tensor([1, 5, 9])
    grads = torch.autograd.grad(F.cross_entropy(y, labels) + 0.1 * norm, model.first_conv.representations)
    grads_own = torch.autograd.grad(F.cross_entropy(y_own, labels) + 0.1 * norm_own, own.lift.reps.logits)
    torch.testing.assert_close(grads[0], grads_own[0], **F64)
    assert model.get_parameter_counts()["representations"] == models.parameter_counts(own)["logits"]


def test_wsresnet_equals_symkernels_wsresnet():
    torch.manual_seed(7)
    model = compat.WSResNet(3, 10, 3, 4, 4, fix_identity=True, tol=None).double().train()
    own = models.WSResNet(3, 10, 4, 3, 4).double().train()
    pairs = [
        ("lifting_conv", "stem"),
        ("norm1", "stem_norm"),
        ("resblock1.gconv1", "blocks.0.conv1"),
        ("resblock1.gconv2", "blocks.0.conv2"),
        ("resblock1.norm_out", "block_norms.0"),
        ("resblock2.gconv1", "blocks.1.conv1"),
        ("resblock2.gconv2", "blocks.1.conv2"),
        ("resblock2.norm_out", "block_norms.1"),
        ("resblock2.shortcut", "blocks.1.shortcut"),
        ("final_linear", "head"),
    ]
    copy_models(model, own, pairs)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    torch.manual_seed(8)  # the same dropout mask
    y = model(x)
    torch.manual_seed(8)
    y_own = own(x)
    torch.testing.assert_close(y, y_own, **F64)
    (norm, entropy), (norm_own, entropy_own) = model.get_loss(), own.regularizers()
    torch.testing.assert_close(norm, norm_own, **F64)
    torch.testing.assert_close(entropy, entropy_own, rtol=1e-10, atol=1e-10)
    labels = torch.tensor([0, 1, 2, 3])
    params = [model.resblock2.gconv2.weight, model.resblock2.gconv2.representations]
    own_params = [own.blocks[1].conv2.weight, own.blocks[1].conv2.reps.logits]
    grads = torch.autograd.grad(F.cross_entropy(y, labels) + 0.1 * norm, params)
    grads_own = torch.autograd.grad(F.cross_entropy(y_own, labels) + 0.1 * norm_own, own_params)
    for g, w in zip(grads, grads_own, strict=True):
        torch.testing.assert_close(g, w, **F64)


def test_parameter_counts_are_the_published_ones(capsys):
    counts = compat.WSCNN(hidden_channels=32, device="cpu", fix_identity=True).get_parameter_counts()
    assert counts == {"free": 410_890, "representations": 121_875}
    assert capsys.readouterr().out.strip() == (
        "# free parameters: 410890.0, # representations parameters: 121875.0, Total: 532765.0"
    )
    counts = compat.WSResNet(3, 10, 7, 8, 4, fix_identity=True).get_parameter_counts()
    # The logits do not depend on the width: 3·49² (lifting) + 4 · 3·196² (group convolutions).
    assert counts["representations"] == 468_195
    own = models.parameter_counts(models.WSResNet(hidden_channels=8))
    assert counts == {"free": own["free"], "representations": own["logits"]}


def test_save_representations_writes_each_layers_stack(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    compat.WSCNN(1, 10, 3, 2, 4, 4, "cpu", fix_identity=True).save_representations("run")
    stacks = [torch.load(tmp_path / "representations" / f"run_rep_{i}.pt") for i in range(3)]
    assert [tuple(s.shape) for s in stacks] == [(4, 9, 9), (4, 36, 36), (4, 36, 36)]
    torch.testing.assert_close(stacks[1].sum(dim=-1), torch.ones(4, 36), rtol=0, atol=1e-4)
    compat.WSResNet(3, 10, 3, 4, 4).save_representations("res")
    names = ["0", "block1_g1", "block1_g2", "block2_g1", "block2_g2"]
    assert all((tmp_path / "representations" / f"res_rep_{n}.pt").exists() for n in names)


# ------------------------------------------------------------------------------------------------------------
# A script-shaped training loop without host synchronisation


class HostSyncError(AssertionError):
    pass


# The ops that hand a tensor's value to the host: ``.item()`` and ``bool(t)`` (``_local_scalar_dense``), and
# the comparisons that return a Python bool (their kernels read the value below the dispatcher).
HOST_READS = (
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.allclose.default,
    torch.ops.aten.equal.default,
)


class NoHostSync(TorchDispatchMode):
    """Fails on any read of a tensor's value by the host."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            raise HostSyncError(f"host synchronisation: {func}")
        return func(*args, **(kwargs or {}))


def test_the_detector_catches_the_published_loops_host_reads():
    with pytest.raises(HostSyncError), NoHostSync():
        sinkhorn_early_exit(torch.rand(3, 9, 9))  # allclose before every iteration
    with pytest.raises(HostSyncError), NoHostSync():
        torch.rand(3).sum().item()
    with pytest.raises(HostSyncError), NoHostSync():
        symkernels.sinkhorn(torch.rand(3, 9, 9), 20, check_finite=True)  # the opt-in test reads a flag


def test_a_script_shaped_training_loop_runs_without_host_synchronisation():
    """The published script's step: per-parameter groups (a learning rate for the representations),
    AdamW, cross-entropy + 0.1 × norm + 0.0 × entropy. ``fused=True``: the default AdamW reads its step
    count with ``.item()`` (a host tensor on a GPU run, but indistinguishable from a sync here)."""
    torch.manual_seed(9)
    model = compat.WSCNN(1, 10, 5, 2, 4, 4, "cpu", init_mode="rand", fix_identity=1)
    groups = [
        {"params": p, "lr": 5e-3 if "representation" in name else 1e-2}
        for name, p in model.named_parameters()
    ]
    optimizer = torch.optim.AdamW(groups, lr=1e-2, weight_decay=1e-4, fused=True)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(0)
    x, labels = (
        torch.randn(8, 1, 20, 20, generator=generator),
        torch.randint(0, 10, (8,), generator=generator),
    )
    losses = []
    with NoHostSync():
        for _ in range(4):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), labels)
            norm_loss, entropy_loss = model.get_loss()
            loss = loss + 0.0 * entropy_loss + 0.1 * norm_loss
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
    assert torch.isfinite(torch.stack(losses)).all()
    assert losses[-1] < losses[0]
    for name, p in model.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == (not name.endswith(".id")), name


# ------------------------------------------------------------------------------------------------------------
# Constructor arguments


BAD_ARGUMENTS = [
    ({"device": "banana"}, ValueError, "device must be"),
    ({"init_mode": "identity"}, ValueError, "init_mode must be one of"),
    ({"n_iter": 0}, ValueError, "n_iter must be >= 1"),
    ({"kernel_size": 0}, ValueError, "kernel_size must be >= 1"),
    ({"group_size": 2.5}, TypeError, "group_size must be an int"),
    ({"padding": -1}, ValueError, "padding must be"),
    ({"padding": "full"}, ValueError, "padding must be"),
    ({"fix_identity": "yes"}, TypeError, "fix_identity must be a bool"),
    ({"bias": 2}, TypeError, "bias must be a bool"),
    ({"tol": -1.0}, ValueError, "tol must be None or a finite number"),
    ({"in_channels": 0}, ValueError, "in_channels must be >= 1"),
]


@pytest.mark.parametrize("change,error,message", BAD_ARGUMENTS)
def test_bad_arguments_are_named(change, error, message):
    arguments = {
        "in_channels": 1,
        "out_channels": 2,
        "kernel_size": 3,
        "group_size": 4,
        "n_iter": 20,
        "device": "cpu",
        **change,
    }
    with pytest.raises(error, match=message):
        compat.WSLiftConv2d(**arguments)


def test_bad_group_conv_sizes_are_named():
    with pytest.raises(ValueError, match="g_in must be >= 1"):
        compat.WSConv2d(1, 2, 3, 0, 4, 20, device="cpu")
    with pytest.raises(TypeError, match="g_out must be an int"):
        compat.WSConv2d(1, 2, 3, 4, "4", 20, device="cpu")


def test_cuda_default_falls_back_to_the_cpu_with_a_warning(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(UserWarning, match="CUDA is not available"):
        layer = compat.WSLiftConv2d(1, 2, 3, 4, 20)  # the published default: device="cuda"
    assert {p.device.type for p in layer.parameters()} == {"cpu"}
    with pytest.warns(UserWarning, match="CUDA is not available") as caught:
        model = compat.WSCNN(hidden_channels=2, num_hidden=1)
    assert len(caught) == 1  # one warning for the model
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_a_cuda_device_that_does_not_exist_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="'cuda:3' does not exist: 1 CUDA device"):
        compat.WSLiftConv2d(1, 2, 3, 4, 20, device="cuda:3")
