"""A training step of the published-API MNIST model through symkernels.compat, against the same step computed
as the published modules compute it.

    python bench/compat.py [--quick] [--threads 1 2] [--only REGEX] [--device cpu|cuda] [--busy N]

The model is the published MNIST ``WSCNN`` (lifting + 4 group convolutions, 32 fields of C4, k = 5, a fixed
identity, T = 20) built with :mod:`symkernels.compat`, batch 64 of 28×28, and the same at 8 fields and batch 8
(where the convolutions no longer dominate the step; the only workload of ``--quick``). One step
is the published training script's: one parameter group per parameter, AdamW (lr 0.01, weight decay 1e-4),
cross-entropy + 0.1 × norm + 0.0 × entropy from ``model.get_loss()``, backward, update.

Providers (the same model, the same initial parameters and batch):

``compat``                  :mod:`symkernels.compat` as it is: the fused Sinkhorn with the published stopping
                            rule, the permuted convolution;
``compat-fixed``            the same with ``tol=None`` (exactly 20 Sinkhorn iterations);
``reference-authors-loop``  each layer computed as the published modules compute it, in pure PyTorch:
                            the authors' loop of :mod:`symkernels.reference` (a host-side ``allclose``
                            before every iteration), the stored identity, an einsum expansion, one conv2d.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

if __name__ == "__main__":  # `python bench/compat.py` puts bench/, not the repository root, on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import Case, Closure
from symkernels import AUTHORS_TOLERANCE, compat
from symkernels.reference.authors_loop import sinkhorn_early_exit
from symkernels.reference.expansion import permuted_conv2d_reference

OP = "compat"
MODE = "train-step"
PROVIDERS = ("compat", "compat-fixed", "reference-authors-loop")
# The published MNIST configuration: learning rate, weight decay, regulariser scales.
LR, WEIGHT_DECAY, NORM_SCALE, ENTROPY_SCALE = 1e-2, 1e-4, 0.1, 0.0
# name -> (batch, fields)
WORKLOADS = {"mnist-wscnn": (64, 32)}
QUICK = {"mnist-wscnn-c8-b8": (8, 8)}


def _published_representations(layer: nn.Module) -> torch.Tensor:
    learned = sinkhorn_early_exit(layer.representations, layer.n_iter)
    return torch.cat([layer.id, learned]) if layer.fix_identity else learned


def _published_forward(layer: nn.Module, input: torch.Tensor) -> torch.Tensor:
    return permuted_conv2d_reference(
        input,
        layer.get_representations(),
        layer.weight,
        layer.bias,
        kernel_size=layer.kernel_size,
        padding=layer.padding,
    )


def use_published_computation(model: nn.Module) -> nn.Module:
    """Make every compat layer of ``model`` compute its stack, kernel and convolution in pure PyTorch, as the
    published modules do (``get_loss`` follows: it calls ``get_representations``)."""
    for layer in model.modules():
        if isinstance(layer, (compat.WSLiftConv2d, compat.WSConv2d)):
            layer.get_representations = types.MethodType(_published_representations, layer)
            layer.forward = types.MethodType(_published_forward, layer)
    return model


def build(provider: str, workload: str, device: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The provider's model (seed 0: the same initial parameters for every provider) and the batch."""
    batch, fields = {**WORKLOADS, **QUICK}[workload]
    torch.manual_seed(0)
    tol = None if provider == "compat-fixed" else AUTHORS_TOLERANCE
    model = compat.WSCNN(hidden_channels=fields, device=device, fix_identity=True, tol=tol)
    if provider == "reference-authors-loop":
        use_published_computation(model)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, 28, 28, generator=generator).to(device)
    labels = torch.randint(0, 10, (batch,), generator=generator).to(device)
    return model.train(), x, labels


def training_loss(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The published script's loss: cross-entropy plus the scaled regularisers of ``model.get_loss()``."""
    loss = F.cross_entropy(model(x), labels)
    norm, entropy = model.get_loss()
    return loss + ENTROPY_SCALE * entropy + NORM_SCALE * norm


def make_closure(provider: str, workload: str, device: str) -> Callable[[], Closure]:
    def make() -> Closure:
        model, x, labels = build(provider, workload, device)
        # One parameter group per parameter, as the published script builds them.
        groups = [{"params": p, "lr": LR} for p in model.parameters()]
        optimizer = torch.optim.AdamW(groups, lr=LR, weight_decay=WEIGHT_DECAY)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            training_loss(model, x, labels).backward()
            optimizer.step()

        return step

    return make


def cases(device: str = "cpu", *, quick: bool = False) -> list[Case]:
    workloads = QUICK if quick else {**WORKLOADS, **QUICK}
    return [
        Case(
            op=OP,
            workload=workload,
            mode=MODE,
            provider=provider,
            device=device,
            make=make_closure(provider, workload, device),
            info={"batch": batch, "fields": fields},
        )
        for workload, (batch, fields) in workloads.items()
        for provider in PROVIDERS
    ]


if __name__ == "__main__":
    from bench.__main__ import main

    sys.exit(main(ops=[OP]))
