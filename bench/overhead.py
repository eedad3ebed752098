"""What a public call costs besides its kernels: checks, backend choice, dispatcher, autograd.

    python bench/overhead.py [--threads 1] [--device cpu|cuda] [--out FILE]

The same computation called through each layer of the stack, outermost first:

``functional``          the public function with its defaults (``symkernels.sinkhorn(x, 20)``,
                        ``symkernels.expand_kernel(reps, weight, k, leading_identity=True)``): argument
                        checks, the backend choice, the op;
``functional-checked``  Sinkhorn with ``check_finite=True`` (the opt-in NaN/Inf test: one flag read back);
``op``                  the op itself (``torch.ops.symkernels.<op>.default``): the dispatcher, the op's
                        registered kernels and autograd;
``bare-function``       a plain ``torch.autograd.Function`` whose forward and backward call the native
                        library's entry points directly (pybind11 and the kernels): the floor the layers
                        above are held to;
``kernel``              the native forward entry point alone (no autograd);
``aten-clone``          ``x.clone()``: the floor of any op call through the dispatcher.

Workloads: Sinkhorn (T = 20) of one 2×2 matrix (the kernel costs next to nothing: the difference is the
overhead), of a 3×25×25 stack and of an MNIST group-conv layer's 3×100×100 stack; the kernel expansion of a
small layer (reps 3×9×9, weight 2×2×9, k = 3) and of the MNIST group-conv layer (reps 3×100×100, weight
32×32×100, k = 5), both with the fixed identity. ``fwd+bwd`` rows time the call and its backward through
autograd.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch

if __name__ == "__main__":  # `python bench/overhead.py` puts bench/, not the repository root, on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import symkernels
from bench.environment import backend_reason, native_backends
from bench.harness import Case, Closure

OP = "overhead"
N_ITER, TAU = 20, 1.0
SINKHORN = {"tiny-1x2x2": (1, 2, 2), "small-3x25x25": (3, 25, 25), "layer-3x100x100": (3, 100, 100)}
# name -> (reps [G', d, d], weight [O, I, d], kernel_size); the identity is the stack's fixed first element.
EXPANSION = {
    "expand-small": ((3, 9, 9), (2, 2, 9), 3),
    "expand-mnist-layer": ((3, 100, 100), (32, 32, 100), 5),
}
WORKLOADS = (*SINKHORN, *EXPANSION)
PROVIDERS = {
    "fwd": ("functional", "functional-checked", "op", "bare-function", "kernel", "aten-clone"),
    "fwd+bwd": ("functional", "functional-checked", "op", "bare-function"),
}


class BareSinkhorn(torch.autograd.Function):
    """Sinkhorn of one stack through the native entry points, nothing else."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        p, cols, domain, iterations = symkernels._native.library().sinkhorn_forward(
            [x], N_ITER, TAU, 0.0, False, None
        )
        ctx.save_for_backward(x, cols, domain, iterations)
        return p[0]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        x, cols, domain, iterations = ctx.saved_tensors
        return symkernels._native.library().sinkhorn_backward([grad], [x], cols, domain, iterations, TAU)[0]


class BareExpansion(torch.autograd.Function):
    """The kernel expansion (fixed identity first) through the native entry points, nothing else."""

    @staticmethod
    def forward(ctx, reps: torch.Tensor, weight: torch.Tensor, kernel_size: int) -> torch.Tensor:
        out, inp, d = weight.shape
        groups, in_groups = reps.shape[0] + 1, d // (kernel_size * kernel_size)
        kernel = weight.new_empty(out * groups, inp * in_groups, kernel_size, kernel_size)
        symkernels._native.library().expand_forward(reps, weight, kernel_size, True, kernel)
        ctx.save_for_backward(reps, weight)
        ctx.kernel_size = kernel_size
        return kernel

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        reps, weight = ctx.saved_tensors
        grad_reps, grad_weight = symkernels._native.library().expand_backward(
            grad, reps, weight, ctx.kernel_size, True
        )
        return grad_reps, grad_weight, None


def sinkhorn_forward(provider: str, x: torch.Tensor, backend: str) -> Callable[[], torch.Tensor] | None:
    if provider == "functional":
        return lambda: symkernels.sinkhorn(x, N_ITER, TAU, backend=backend)
    if provider == "functional-checked":
        return lambda: symkernels.sinkhorn(x, N_ITER, TAU, backend=backend, check_finite=True)
    if provider == "op":
        op = torch.ops.symkernels.sinkhorn.default
        return lambda: op([x], N_ITER, TAU, 0.0, "matrix", None, backend)[0][0]
    if provider == "bare-function":
        return lambda: BareSinkhorn.apply(x)
    if provider == "kernel":
        library, stacks = symkernels._native.library(), [x.detach()]
        return lambda: library.sinkhorn_forward(stacks, N_ITER, TAU, 0.0, False, None)[0][0]
    if provider == "aten-clone":
        return lambda: x.clone()
    return None


def expansion_forward(
    provider: str, reps: torch.Tensor, weight: torch.Tensor, k: int, backend: str
) -> Callable[[], torch.Tensor] | None:
    if provider == "functional":
        return lambda: symkernels.expand_kernel(reps, weight, k, leading_identity=True, backend=backend)
    if provider == "op":
        op = torch.ops.symkernels.expand_kernel.default
        return lambda: op(reps, weight, k, True, False, weight.dtype, backend)
    if provider == "bare-function":
        return lambda: BareExpansion.apply(reps, weight, k)
    if provider == "kernel":
        library = symkernels._native.library()
        out, inp, d = weight.shape
        kernel = weight.new_empty(out * (reps.shape[0] + 1), inp * d // (k * k), k, k)
        plain_reps, plain_weight = reps.detach(), weight.detach()
        return lambda: library.expand_forward(plain_reps, plain_weight, k, True, kernel)
    if provider == "aten-clone":
        return lambda: weight.clone()
    return None


def make_closure(provider: str, workload: str, mode: str, backend: str, device: str) -> Callable[[], Closure]:
    def make() -> Closure:
        generator = torch.Generator().manual_seed(0)
        backward = mode == "fwd+bwd"

        def tensor(*shape: int, scale: float = 1.0) -> torch.Tensor:
            return (scale * torch.randn(shape, generator=generator)).to(device).requires_grad_(backward)

        if workload in SINKHORN:
            inputs = [tensor(*SINKHORN[workload], scale=3.0)]
            forward = sinkhorn_forward(provider, inputs[0], backend)
        else:
            reps_shape, weight_shape, k = EXPANSION[workload]
            inputs = [tensor(*reps_shape), tensor(*weight_shape)]
            forward = expansion_forward(provider, *inputs, k, backend)
        if forward is None:
            raise ValueError(f"provider {provider!r} does not compute {workload}")
        if not backward:

            def no_grad() -> object:
                with torch.no_grad():
                    return forward()

            return no_grad
        with torch.no_grad():
            grad = torch.randn(forward().shape, generator=generator).to(device)
        return lambda: torch.autograd.grad(forward(), inputs, grad)

    return make


def providers(workload: str, mode: str) -> tuple[str, ...]:
    names = PROVIDERS[mode]
    return names if workload in SINKHORN else tuple(p for p in names if p != "functional-checked")


def cases(device: str = "cpu", *, quick: bool = False) -> list[Case]:
    backend = native_backends(device)[0]
    out = []
    for workload in WORKLOADS:
        op = "sinkhorn" if workload in SINKHORN else "expand_kernel"
        for mode in PROVIDERS:
            for provider in providers(workload, mode):
                out.append(
                    Case(
                        op=OP,
                        workload=workload,
                        mode=mode,
                        provider=provider,
                        device=device,
                        make=make_closure(provider, workload, mode, backend, device),
                        requires=(
                            lambda p=provider, o=op: (
                                None if p == "aten-clone" else backend_reason(backend, device, o)
                            )
                        ),
                        info={"backend": backend},
                    )
                )
    return out


if __name__ == "__main__":
    from bench.__main__ import main

    sys.exit(main(ops=[OP]))
