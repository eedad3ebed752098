"""Where an op's Python implementation (Triton launches, an automatic backend choice) is registered.

With the native library, its C++ CPU and CUDA kernels call the Python implementation for the backends they
do not compute, and its C++ Autograd kernel serves; without it (a pure-Python install) the Python
implementation is the op's CPU and CUDA kernel and the autograd formula is registered from Python.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from symkernels import _native


def register_python_kernels(
    op: str, forward: Callable, backward: Callable, autograd: Callable, setup_context: Callable
) -> None:
    """Register ``forward`` and ``backward`` as the Python implementation of ``symkernels::<op>`` and
    ``symkernels::<op>_backward``; ``autograd`` and ``setup_context`` only without the native library."""
    library = _native.library()
    if library is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"symkernels::{op}", "CPU"):
        library.set_python_kernel(op, forward)
        library.set_python_kernel(f"{op}_backward", backward)
        return
    torch.library.impl(f"symkernels::{op}", ("cpu", "cuda"))(forward)
    torch.library.impl(f"symkernels::{op}_backward", ("cpu", "cuda"))(backward)
    torch.library.register_autograd(f"symkernels::{op}", autograd, setup_context=setup_context)
