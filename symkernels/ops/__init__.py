"""The ``torch.ops.symkernels`` operators: schemas come from the native library, fake (meta) implementations
and autograd formulas from here. The native CPU kernels are registered as the ``cpu`` backend of
:mod:`symkernels.backends` when the library loaded and has them.
"""

import torch

import symkernels.ops.triton_backend  # noqa: F401  (registers the "triton" backend)
from symkernels import _native, backends
from symkernels.ops import expansion, marginal_error, representation, sinkhorn

__all__ = ["expansion", "marginal_error", "representation", "sinkhorn"]

_CPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _cpu_can_serve(device: torch.device, dtype: torch.dtype) -> str | None:
    if device.type != "cpu":
        return f"the cpu backend runs on CPU tensors, got {device.type}"
    if dtype not in _CPU_DTYPES:
        return f"the cpu backend supports {', '.join(str(d) for d in _CPU_DTYPES)}, got {dtype}"
    return None


def _cpu_unavailable_reason() -> str | None:
    status = _native.native_status()
    if not status.loaded:
        return f"native library not loaded: {status.reason}"
    for op in ("sinkhorn_forward", "sinkhorn_backward", "expand_kernel_forward", "expand_kernel_backward"):
        if not _native.has_ops((op,)) or not torch._C._dispatch_has_kernel_for_dispatch_key(
            f"symkernels::{op}", "CPU"
        ):
            return f"the native library has no CPU kernel for {op}; rebuild it"
    return None


backends.register_backend(
    "cpu",
    priority=10,
    description="fused C++ kernels (CPU; fp16/bf16 computed in fp32, fp32, fp64)",
    can_serve=_cpu_can_serve,
    ops={
        "sinkhorn": sinkhorn.native_sinkhorn,
        "representation_stack": representation.native_representation_stack,
        "expand_kernel": expansion.native_expand_kernel,
    },
    unavailable_reason=_cpu_unavailable_reason(),
)
