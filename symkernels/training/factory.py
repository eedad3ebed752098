"""Model and optimiser of a run, built reproducibly from its config."""

from __future__ import annotations

import torch
from torch import nn

from symkernels.models import CNN, GCNN, WSCNN, ResNet, WSResNet
from symkernels.training.config import TrainConfig
from symkernels.training.rng import derive_seed

LOGITS_SUFFIX = "reps.logits"


def build_model(config: TrainConfig, in_channels: int, num_classes: int) -> nn.Module:
    """The model named by ``config.model``, initialised from the run seed (the global RNG is untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(config.seed, "init"))
        return _construct(config, in_channels, num_classes).to(config.torch_dtype)


def _construct(config: TrainConfig, in_channels: int, num_classes: int) -> nn.Module:
    common = {"in_channels": in_channels, "num_classes": num_classes, "hidden_channels": config.channels}
    stack = {"n_iter": config.n_iter, "tau": config.tau}
    k, g = config.kernel_size, config.group_size
    if config.model == "wscnn":
        return WSCNN(
            **common,
            kernel_size=k,
            group_size=g,
            num_layers=config.num_layers,
            padding=config.padding,
            **stack,
        )
    if config.model == "gcnn":
        return GCNN(
            **common, kernel_size=k, group_size=g, num_layers=config.num_layers, padding=config.padding
        )
    if config.model == "cnn":
        return CNN(**common, kernel_size=k, num_layers=config.num_layers, padding=config.padding)
    if config.model == "wsresnet":
        return WSResNet(**common, kernel_size=k, group_size=g, **stack)
    if config.model == "resnet":
        return ResNet(**common, kernel_size=k)
    raise ValueError(f"unknown model {config.model!r}")


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with two learning rates: ``logits_lr`` for the representation logits, ``lr`` for the rest."""
    logits = [p for name, p in model.named_parameters() if name.endswith(LOGITS_SUFFIX)]
    others = [p for name, p in model.named_parameters() if not name.endswith(LOGITS_SUFFIX)]
    groups = [{"params": others, "lr": config.lr}]
    if logits:
        groups.append({"params": logits, "lr": config.logits_lr})
    return torch.optim.AdamW(groups, weight_decay=config.weight_decay)
