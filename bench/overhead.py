"""What one ``symkernels.sinkhorn`` call costs besides its kernel: checks, backend choice, dispatch, autograd.

    python bench/overhead.py [--threads 1] [--device cpu|cuda] [--out FILE]

The same forward (T = 20) called through each layer of the stack, outermost first:

``functional``            ``symkernels.sinkhorn(x, 20)`` with its defaults (argument checks, the finiteness
                          test, the backend choice, the op);
``functional-unchecked``  the same with ``check_finite=False``;
``op``                    ``torch.ops.symkernels.sinkhorn`` on the stack (the dispatcher, the op's Python
                          implementation and the kernel's entry checks);
``kernel``                the native library's ``sinkhorn_forward`` called directly (pybind11 and the kernel).
``aten-clone``            ``x.clone()``: the floor of any op call through the dispatcher.

Workloads: one 2×2 matrix (the kernel costs next to nothing: the difference is the overhead) and one MNIST
group-conv layer's 3×100×100 stack (how much of a real call the overhead is). ``fwd+bwd`` rows time the
functional call and the op with the backward through autograd.
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
WORKLOADS = {"tiny-1x2x2": (1, 2, 2), "layer-3x100x100": (3, 100, 100)}
FORWARD_PROVIDERS = ("functional", "functional-unchecked", "op", "kernel", "aten-clone")
BACKWARD_PROVIDERS = ("functional", "functional-unchecked", "op")


def make_closure(provider: str, workload: str, mode: str, backend: str, device: str) -> Callable[[], Closure]:
    shape = WORKLOADS[workload]

    def make() -> Closure:
        generator = torch.Generator().manual_seed(0)
        backward = mode == "fwd+bwd"
        x = (3.0 * torch.randn(shape, generator=generator)).to(device).requires_grad_(backward)
        if provider == "functional":

            def forward() -> torch.Tensor:
                return symkernels.sinkhorn(x, N_ITER, TAU, backend=backend)

        elif provider == "functional-unchecked":

            def forward() -> torch.Tensor:
                return symkernels.sinkhorn(x, N_ITER, TAU, backend=backend, check_finite=False)

        elif provider == "op":

            def forward() -> torch.Tensor:
                return torch.ops.symkernels.sinkhorn([x], N_ITER, TAU, 0.0, "matrix", None, backend)[0][0]

        elif provider == "kernel":
            library = symkernels._native.library()
            stacks = [x.detach()]

            def forward() -> torch.Tensor:
                return library.sinkhorn_forward(stacks, N_ITER, TAU, 0.0, False, None)[0][0]

        elif provider == "aten-clone":

            def forward() -> torch.Tensor:
                return x.clone()

        else:
            raise ValueError(f"unknown provider {provider!r}")
        if not backward:

            def no_grad() -> torch.Tensor:
                with torch.no_grad():
                    return forward()

            return no_grad
        with torch.no_grad():
            grad = torch.randn(forward().shape, generator=generator).to(device)
        return lambda: torch.autograd.grad(forward(), x, grad)

    return make


def cases(device: str = "cpu", *, quick: bool = False) -> list[Case]:
    backend = native_backends(device)[0]
    out = []
    for workload in WORKLOADS:
        for mode, names in (("fwd", FORWARD_PROVIDERS), ("fwd+bwd", BACKWARD_PROVIDERS)):
            for provider in names:
                out.append(
                    Case(
                        op=OP,
                        workload=workload,
                        mode=mode,
                        provider=provider,
                        device=device,
                        make=make_closure(provider, workload, mode, backend, device),
                        requires=(
                            lambda p=provider: (
                                None if p == "aten-clone" else backend_reason(backend, device, "sinkhorn")
                            )
                        ),
                        info={"backend": backend},
                    )
                )
    return out


if __name__ == "__main__":
    from bench.__main__ import main

    sys.exit(main(ops=[OP]))
