"""One weight-sharing layer, forward and forward + backward, against a G-CNN layer, escnn and a plain conv.

    python bench/layer.py [--quick] [--threads 1 2] [--only REGEX] [--device cpu|cuda] [--out FILE]

Workloads: the MNIST WSCNN's lifting layer (batch 64, 1×28×28 → 32 fields of C4, k = 5) and one of its group
convolutions (32 fields → 32 fields, 24×24); on a GPU also the CIFAR WS-ResNet's (batch 128, 32×32, k = 7,
"same" padding). Providers: the symkernels layer (``WSLiftConv2d`` / ``WSConv2d``: Sinkhorn of the logits, the
kernel expansion and the convolution) on every native backend that serves the device and on the reference,
the same layer with the exact C4 permutations (a G-CNN layer, ``FixedStack``), escnn's ``R2Conv`` on the
same fields (its filter is rebuilt from the basis every call in train mode), and a plain ``nn.Conv2d`` with
the same expanded channels (the lower bound of a weight-sharing layer: the convolution alone). Modules in
train mode; ``fwd`` runs under ``torch.no_grad()``; ``fwd+bwd`` takes the gradients of the input and every
parameter.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

if __name__ == "__main__":  # `python bench/layer.py` puts bench/, not the repository root, on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import symkernels
from bench.environment import backend_reason, native_backends
from bench.harness import Case, Closure, package_version
from symkernels.groups import rotation_permutations, shift_twist
from symkernels.nn import FixedStack, WSConv2d, WSLiftConv2d

OP = "layer"
MODES = ("fwd", "fwd+bwd")
GROUP_SIZE = 4
ESCNN_HINT = "escnn is not installed (see bench/README.md: it needs a manual install next to torch)"


@functools.cache
def escnn_problem() -> str | None:
    """Why escnn cannot be used here (None: it can)."""
    if package_version("escnn") is None:
        return ESCNN_HINT
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # it warns that py3nj (only for SO(3)) is missing
            from escnn import gspaces  # noqa: F401
    except Exception as error:
        return f"escnn does not import: {type(error).__name__}: {error}"
    return None


def _escnn():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from escnn import gspaces
        from escnn import nn as enn
    return gspaces, enn


class EscnnC4Conv(nn.Module):
    """escnn's ``R2Conv`` between the fields of a WS layer: trivial (lifting) or regular C4 fields in, regular
    C4 fields out; plain tensors in and out, laid out as ``[B, C·G, H, W]`` (field-major, as a WS layer's
    flattened output)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, lifting: bool, padding: int):
        super().__init__()
        gspaces, enn = _escnn()
        space = gspaces.rot2dOnR2(N=GROUP_SIZE)
        field = space.trivial_repr if lifting else space.regular_repr
        self.in_type = enn.FieldType(space, in_channels * [field])
        out_type = enn.FieldType(space, out_channels * [space.regular_repr])
        self.conv = enn.R2Conv(self.in_type, out_type, kernel_size=kernel_size, padding=padding)
        self._wrap = enn.GeometricTensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self._wrap(x, self.in_type)).tensor


# name -> (batch, C_in, G_in, H, C_out, k, padding); G_in = 1 is a lifting layer.
LAYERS = {
    "mnist-lift": (64, 1, 1, 28, 32, 5, 0),
    "mnist-gconv": (64, 32, GROUP_SIZE, 24, 32, 5, 0),
    "cifar-lift": (128, 3, 1, 32, 32, 7, 3),
    "cifar-gconv": (128, 32, GROUP_SIZE, 32, 32, 7, 3),
}
CPU_LAYERS = ("mnist-lift", "mnist-gconv")
# The quick set: the MNIST lifting layer at batch 8.
QUICK_LAYERS = {"mnist-lift-b8": ("mnist-lift", 8)}


def layer_and_batch(workload: str) -> tuple[str, int]:
    """The layer a workload runs and its batch size."""
    if workload in QUICK_LAYERS:
        return QUICK_LAYERS[workload]
    return workload, LAYERS[workload][0]


def build_layer(provider: str, layer: str) -> nn.Module:
    _, c_in, g_in, _, c_out, k, padding = LAYERS[layer]
    lifting = g_in == 1
    if provider == "escnn":
        return EscnnC4Conv(c_in, c_out, k, lifting=lifting, padding=padding)
    if provider == "conv2d":
        return nn.Conv2d(c_in * g_in, c_out * GROUP_SIZE, k, padding=padding)
    if lifting:
        module = WSLiftConv2d(c_in, c_out, k, GROUP_SIZE, padding=padding)
    else:
        module = WSConv2d(c_in, c_out, k, GROUP_SIZE, padding=padding)
    if provider == "gcnn-exact":
        exact = rotation_permutations(k, order=GROUP_SIZE) if lifting else shift_twist(k, order=GROUP_SIZE)
        module.reps = FixedStack(exact)
    return module


def make_closure(provider: str, workload: str, mode: str, device: str) -> Callable[[], Closure]:
    layer, batch = layer_and_batch(workload)
    _, c_in, g_in, height, *_ = LAYERS[layer]

    def make() -> Closure:
        torch.manual_seed(0)
        module = build_layer(provider, layer).to(device).train()
        shape = (batch, c_in, height, height) if g_in == 1 else (batch, c_in, g_in, height, height)
        x = torch.randn(shape).to(device)
        if provider in ("escnn", "conv2d") and g_in > 1:
            x = x.flatten(1, 2)
        backward = mode == "fwd+bwd"
        x.requires_grad_(backward)
        backend = provider.removeprefix("ws-") if provider.startswith("ws-") else None
        choice = (lambda: symkernels.use_backend(backend)) if backend else contextlib.nullcontext

        def forward() -> torch.Tensor:
            with choice():
                return module(x)

        if not backward:

            def no_grad() -> torch.Tensor:
                with torch.no_grad():
                    return forward()

            return no_grad
        inputs = [x, *module.parameters()]
        with torch.no_grad():
            grad = torch.randn(forward().shape).to(device)
        return lambda: torch.autograd.grad(forward(), inputs, grad)

    return make


def providers(device: str) -> list[str]:
    return [*(f"ws-{b}" for b in native_backends(device)), "ws-reference", "gcnn-exact", "escnn", "conv2d"]


def requirement(provider: str, device: str) -> Callable[[], str | None]:
    def requires() -> str | None:
        if provider == "escnn":
            return escnn_problem()
        if provider.startswith("ws-") and provider != "ws-reference":
            return backend_reason(provider.removeprefix("ws-"), device, "sinkhorn")
        return None

    return requires


def cases(device: str = "cpu", *, quick: bool = False) -> list[Case]:
    if quick:
        workloads = tuple(QUICK_LAYERS)
    else:
        workloads = tuple(LAYERS) if torch.device(device).type == "cuda" else CPU_LAYERS
    out = []
    for mode in reversed(MODES):
        for workload in workloads:
            layer, batch = layer_and_batch(workload)
            _, c_in, g_in, height, c_out, k, padding = LAYERS[layer]
            for provider in providers(device):
                out.append(
                    Case(
                        op=OP,
                        workload=workload,
                        mode=mode,
                        provider=provider,
                        device=device,
                        make=make_closure(provider, workload, mode, device),
                        requires=requirement(provider, device),
                        info={
                            "layer": {
                                "batch": batch,
                                "C_in": c_in,
                                "G_in": g_in,
                                "H": height,
                                "C_out": c_out,
                                "G": GROUP_SIZE,
                                "k": k,
                                "padding": padding,
                            },
                        },
                    )
                )
    return out


if __name__ == "__main__":
    from bench.__main__ import main

    sys.exit(main(ops=[OP]))
