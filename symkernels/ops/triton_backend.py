"""The ``triton`` backend of :mod:`symkernels.backends`: Triton kernels for CUDA tensors.

Without a visible CUDA device the backend reports itself unusable (``symkernels info``, ``backend_status()``).

Under ``TRITON_INTERPRET=1`` (read by Triton when the kernels are imported, i.e. with ``import symkernels``)
the kernels run in Triton's CPU interpreter on CPU tensors. That is for debugging and tests, and slow, so the
automatic choice never picks it: it serves CPU tensors only when asked for by name (``backend="triton"``,
``use_backend("triton")`` or ``SYMKERNELS_BACKEND=triton``).
"""

from __future__ import annotations

import torch

from symkernels import backends

__all__ = ["TRITON_DTYPES"]

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_ops: dict = {}
_unavailable: str | None = None
_partial: str | None = None  # why an op is missing from a backend that otherwise loaded
_interpreted = False
try:
    from symkernels.ops import triton_sinkhorn
except ImportError as error:
    _unavailable = f"triton is not importable: {error}"
except Exception as error:  # a broken triton install must not break `import symkernels`
    _unavailable = f"the Triton kernels failed to load: {type(error).__name__}: {error}"
else:
    from symkernels.ops.triton_registration import interpreter_problem

    _interpreted = triton_sinkhorn.INTERPRETED
    _unavailable = interpreter_problem()
    if not _interpreted and not torch.cuda.is_available():
        _unavailable = (
            "no CUDA device is visible, and the Triton kernels run on CUDA tensors (set TRITON_INTERPRET=1 "
            "before importing symkernels to run them in Triton's CPU interpreter)"
        )
    # Every call comes through symkernels.functional or symkernels.nn.grouped_sinkhorn, which check the
    # arguments, and through backends.resolve, which checks the dtype and device with _can_serve below: the
    # ops skip those checks (the public triton_* functions keep them). "sinkhorn" is the public function
    # itself, whose checks are cheap next to those of the others.
    _ops = {
        "sinkhorn": triton_sinkhorn.triton_sinkhorn,
        "representation_stack": triton_sinkhorn.dispatched_representation_stack,
        "grouped_sinkhorn": triton_sinkhorn.dispatched_grouped_sinkhorn,
    }
    try:
        from symkernels.ops.triton_expansion import dispatched_expand_kernel
    except Exception as error:  # an op this torch/triton cannot register must not break the others
        _partial = f"expand_kernel unavailable: {type(error).__name__}: {error}"
    else:
        _ops["expand_kernel"] = dispatched_expand_kernel


def _can_serve(device: torch.device, dtype: torch.dtype) -> str | None:
    if dtype not in TRITON_DTYPES:
        return f"the triton backend supports float16, bfloat16 and float32, got {dtype}"
    if _interpreted:
        if device.type != "cpu":
            return f"under TRITON_INTERPRET=1 the triton backend runs on CPU tensors, got {device.type}"
        return None
    if device.type != "cuda":
        return (
            f"the triton backend runs on CUDA tensors, got {device.type} (set TRITON_INTERPRET=1 before "
            "importing symkernels to run its kernels in Triton's CPU interpreter)"
        )
    return None


def _auto_can_serve(device: torch.device, dtype: torch.dtype) -> str | None:
    if _interpreted and device.type == "cpu":
        return "the Triton CPU interpreter is slow: it runs only when chosen by name (backend='triton')"
    return _can_serve(device, dtype)


_DESCRIPTION = (
    "Triton kernels in the CPU interpreter (TRITON_INTERPRET=1; fp16/bf16/fp32, chosen by name only)"
    if _interpreted
    else "Triton kernels (CUDA; fp16/bf16 computed in fp32, fp32)"
) + (f"; {_partial}" if _partial else "")

backends.register_backend(
    "triton",
    priority=20,
    description=_DESCRIPTION,
    can_serve=_can_serve,
    auto_can_serve=_auto_can_serve,
    ops=_ops,
    unavailable_reason=_unavailable,
)
