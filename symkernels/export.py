"""Plain-PyTorch copies of trained models: expanded kernels baked into ``nn.Conv2d``, no Sinkhorn.

:func:`export_model` turns a model from :mod:`symkernels.models` into an equivalent network of standard
modules whose forward uses only ATen ops, so it can be captured with :func:`torch.export.export` (see
:func:`export_program`) and loaded where symkernels is not installed. :func:`harden_model` snaps every learned
stack to its nearest permutations first; :func:`evaluate` measures test accuracy.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from symkernels import analysis
from symkernels.models.cnn import CNN, WSCNN
from symkernels.models.resnet import ChannelLinear, ResBlock, _ResNetLayout
from symkernels.nn.conv import _WeightSharingConv2d
from symkernels.nn.grouped import precompute_representations
from symkernels.nn.stacks import DoublyStochasticStack, FixedStack

__all__ = [
    "ExpandedConv2d",
    "ExportedChannelLinear",
    "ExportedConvNet",
    "ExportedResBlock",
    "ExportedResNet",
    "ExportedStage",
    "evaluate",
    "export_model",
    "export_program",
    "harden_model",
]

# The eps of symkernels.nn.norm's layer norms, which every model uses with its default.
_NORM_EPS = 1e-5


class ExpandedConv2d(nn.Module):
    """A weight-sharing convolution with its expanded kernel stored in a plain ``nn.Conv2d``.

    Input ``[B, C_in, H, W]`` (lifting) or ``[B, C_in, G_in, H, W]`` (flattened to ``C_in·G_in`` channels,
    i-major as the kernel expects); output ``[B, C_out, G, H', W']``. The per-channel bias, shared over the
    group axis, is repeated ``G`` times into the conv's bias.
    """

    def __init__(self, conv: nn.Conv2d, out_channels: int, group_size: int) -> None:
        super().__init__()
        if conv.out_channels != out_channels * group_size:
            raise ValueError(
                f"conv has {conv.out_channels} output channels, expected out_channels·group_size = "
                f"{out_channels}·{group_size}"
            )
        self.conv = conv
        self.out_channels = out_channels
        self.group_size = group_size

    @classmethod
    def from_layer(cls, layer: _WeightSharingConv2d) -> ExpandedConv2d:
        """Bake ``layer``'s current kernel (computed once, without gradient) into a new module."""
        with torch.no_grad():
            kernel = layer.kernel()
            conv = nn.Conv2d(
                kernel.shape[1],
                kernel.shape[0],
                layer.kernel_size,
                stride=layer.stride,
                padding=layer.padding,
                bias=layer.bias is not None,
                device=kernel.device,
                dtype=kernel.dtype,
            )
            conv.weight.copy_(kernel)
            if layer.bias is not None:
                conv.bias.copy_(layer.bias.reshape(-1).repeat_interleave(layer.group_size))
        return cls(conv, layer.out_channels, layer.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 5:
            x = x.flatten(1, 2)
        y = self.conv(x)
        return y.reshape(y.shape[0], self.out_channels, self.group_size, y.shape[-2], y.shape[-1])

    def extra_repr(self) -> str:
        return f"out_channels={self.out_channels}, group_size={self.group_size}"


class ExportedConvNet(nn.Module):
    """The WSCNN / GCNN / CNN forward: each layer, then per-sample layer norm and ReLU; global mean; head."""

    def __init__(self, layers: list[nn.Module], head: nn.Linear) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            y = layer(x)
            x = F.relu(F.layer_norm(y, y.shape[1:], eps=_NORM_EPS))
        return self.head(x.flatten(2).mean(dim=2))


class ExportedChannelLinear(nn.Linear):
    """A Linear map over the channel axis (dim 1) of ``[B, C, ...]`` feature maps."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.movedim(1, -1), self.weight, self.bias).movedim(-1, 1)


class ExportedResBlock(nn.Module):
    """``[conv, channel norm, ReLU] × 2 + shortcut``; the norm is per sample and channel over (G,)H,W."""

    def __init__(self, conv1: nn.Module, conv2: nn.Module, shortcut: nn.Module) -> None:
        super().__init__()
        self.conv1 = conv1
        self.conv2 = conv2
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x)
        y = F.relu(F.layer_norm(y, y.shape[2:], eps=_NORM_EPS))
        y = self.conv2(y)
        y = F.relu(F.layer_norm(y, y.shape[2:], eps=_NORM_EPS))
        return y + self.shortcut(x)


class ExportedStage(nn.Module):
    """A residual block, then batch norm, a 2×2 spatial max-pool (group axis kept) and ReLU."""

    def __init__(self, block: ExportedResBlock, norm: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.block(x))
        if x.dim() == 5:
            b, c, g = x.shape[0], x.shape[1], x.shape[2]
            pooled = F.max_pool2d(x.flatten(1, 2), 2)
            x = pooled.reshape(b, c, g, pooled.shape[-2], pooled.shape[-1])
        else:
            x = F.max_pool2d(x, 2)
        return F.relu(x)


class ExportedResNet(nn.Module):
    """The (WS-)ResNet forward: stem → BN → ReLU; the stages; global mean pool; the MLP head."""

    def __init__(self, stem: nn.Module, stem_norm: nn.Module, stages: list[ExportedStage], head: nn.Module):
        super().__init__()
        self.stem = stem
        self.stem_norm = stem_norm
        self.stages = nn.ModuleList(stages)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem_norm(self.stem(x)))
        for stage in self.stages:
            x = stage(x)
        return self.head(x.flatten(2).mean(dim=2))


def _check_module(model: object, name: str = "model") -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}")
    return model


def _export_conv(layer: object, where: str) -> nn.Module:
    """A weight-sharing conv becomes :class:`ExpandedConv2d`; a plain ``nn.Conv2d`` is copied."""
    if isinstance(layer, _WeightSharingConv2d):
        return ExpandedConv2d.from_layer(layer)
    if type(layer) is nn.Conv2d:
        return copy.deepcopy(layer)
    raise TypeError(
        f"cannot export {where}: expected a symkernels weight-sharing convolution or nn.Conv2d, "
        f"got {type(layer).__name__}"
    )


def _copy_exact(module: object, allowed: tuple[type[nn.Module], ...], where: str) -> nn.Module:
    """Copy a standard module whose forward the exported model reuses as is."""
    if type(module) not in allowed:
        names = ", ".join(t.__name__ for t in allowed)
        raise TypeError(f"cannot export {where}: expected one of {names}, got {type(module).__name__}")
    return copy.deepcopy(module)


def _export_shortcut(shortcut: object, where: str) -> nn.Module:
    if type(shortcut) is nn.Identity:
        return nn.Identity()
    if type(shortcut) is ChannelLinear:
        out = ExportedChannelLinear(
            shortcut.in_features,
            shortcut.out_features,
            bias=shortcut.bias is not None,
            device=shortcut.weight.device,
            dtype=shortcut.weight.dtype,
        )
        out.load_state_dict(shortcut.state_dict())
        return out
    raise TypeError(
        f"cannot export {where}: expected nn.Identity or ChannelLinear, got {type(shortcut).__name__}"
    )


def _export_convnet(model: WSCNN | CNN) -> ExportedConvNet:
    layers = [_export_conv(model.lift, "lift")]
    layers += [_export_conv(conv, f"convs.{i}") for i, conv in enumerate(model.convs)]
    return ExportedConvNet(layers, _copy_exact(model.head, (nn.Linear,), "head"))


def _export_resnet(model: _ResNetLayout) -> ExportedResNet:
    norms = (nn.BatchNorm2d, nn.BatchNorm3d)
    stages = []
    for i, (block, norm) in enumerate(zip(model.blocks, model.block_norms, strict=True)):
        if type(block) is not ResBlock:
            raise TypeError(f"cannot export blocks.{i}: expected ResBlock, got {type(block).__name__}")
        exported = ExportedResBlock(
            _export_conv(block.conv1, f"blocks.{i}.conv1"),
            _export_conv(block.conv2, f"blocks.{i}.conv2"),
            _export_shortcut(block.shortcut, f"blocks.{i}.shortcut"),
        )
        stages.append(ExportedStage(exported, _copy_exact(norm, norms, f"block_norms.{i}")))
    return ExportedResNet(
        _export_conv(model.stem, "stem"),
        _copy_exact(model.stem_norm, norms, "stem_norm"),
        stages,
        _copy_exact(model.head, (nn.Sequential,), "head"),
    )


def export_model(model: nn.Module, *, harden: bool = False) -> nn.Module:
    """A plain-PyTorch model equal to ``model.eval()`` (up to float rounding), in eval mode.

    ``model`` is a :class:`~symkernels.models.WSCNN`, ``GCNN``, ``CNN``, ``WSResNet`` or ``ResNet``. Every
    weight-sharing convolution becomes an ``nn.Conv2d`` holding its expanded kernel (computed once, on the
    model's device and dtype); the rest is copied. The result uses no symkernels op, so
    :func:`export_program` can capture it. With ``harden=True`` the learned stacks are first replaced by
    their nearest permutations (:func:`harden_model`). ``model`` itself is not modified.
    """
    _check_module(model)
    if not isinstance(harden, bool):
        raise TypeError(f"harden must be a bool, got {type(harden).__name__}")
    forward = type(model).forward
    if isinstance(model, (WSCNN, CNN)) and forward in (WSCNN.forward, CNN.forward):
        build = _export_convnet
    elif isinstance(model, _ResNetLayout) and forward is _ResNetLayout.forward:
        build = _export_resnet
    else:
        raise TypeError(
            "model must be a symkernels model (WSCNN, GCNN, CNN, WSResNet or ResNet, with its own forward), "
            f"got {type(model).__name__}"
        )
    source = harden_model(model) if harden else model
    # Every learned stack in one grouped Sinkhorn call where a backend has one, not one call per layer.
    with torch.no_grad(), precompute_representations(source):
        return build(source).eval()


def harden_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every :class:`DoublyStochasticStack` replaced by a :class:`FixedStack` of
    its nearest permutation matrices (Hungarian matching; the fixed identity stays the identity).

    Models without learned stacks (CNN, GCNN) come back as plain copies; a bare stack becomes a
    :class:`FixedStack`. ``model`` itself is not modified.
    """
    if isinstance(_check_module(model), DoublyStochasticStack):
        return _snap(model)
    hardened = copy.deepcopy(model)
    targets = [name for name, module in hardened.named_modules() if isinstance(module, DoublyStochasticStack)]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(hardened.get_submodule(parent_name), child, _snap(hardened.get_submodule(name)))
    return hardened


def _snap(stack: DoublyStochasticStack) -> FixedStack:
    with torch.no_grad():
        return FixedStack(analysis.nearest_permutation(stack()))


def export_program(
    model: nn.Module, example: torch.Tensor, *, dynamic_batch: bool = True
) -> torch.export.ExportedProgram:
    """Capture an exported model (from :func:`export_model`) with :func:`torch.export.export`.

    ``example`` is one input batch; with ``dynamic_batch`` the program accepts any batch size >= 1 (the
    example then needs at least 2 samples, since torch.export specialises sizes 0 and 1). Save the result
    with :func:`torch.export.save`; :func:`torch.export.load` reads it back without symkernels.
    """
    _check_module(model)
    if not isinstance(example, torch.Tensor):
        raise TypeError(f"example must be a torch.Tensor, got {type(example).__name__}")
    if example.dim() < 1:
        raise ValueError("example must have a batch dimension")
    dynamic_shapes = None
    if dynamic_batch:
        if example.shape[0] < 2:
            raise ValueError(
                f"example must hold at least 2 samples for a dynamic batch size, got {example.shape[0]}; "
                "pass dynamic_batch=False to fix the batch size"
            )
        dynamic_shapes = ({0: torch.export.Dim("batch", min=1)},)
    return torch.export.export(model.eval(), (example,), dynamic_shapes=dynamic_shapes)


def _module_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` in eval mode on ``images`` ``[N, ...]`` and integer ``labels`` ``[N]``.

    Batches are moved to the model's device; the model's train/eval mode is restored afterwards.
    """
    _check_module(model)
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(
            f"labels must be a 1-D integer tensor, got shape {tuple(labels.shape)} and dtype {labels.dtype}"
        )
    if images.dim() < 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"images and labels must hold the same number of samples, got {tuple(images.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if labels.numel() == 0:
        raise ValueError("labels must hold at least one sample")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    device = _module_device(model)
    was_training = model.training
    model.eval()
    correct = 0
    try:
        with torch.no_grad():
            for start in range(0, labels.shape[0], batch_size):
                batch = images[start : start + batch_size].to(device)
                predicted = model(batch).argmax(dim=1)
                correct += int((predicted.cpu() == labels[start : start + batch_size].cpu()).sum())
    finally:
        model.train(was_training)
    return correct / labels.shape[0]
