"""Whether the Triton kernels can run here, and whether they run in Triton's CPU interpreter.

Importing this module imports triton (and fails with it). Triton reads ``TRITON_INTERPRET`` when kernels are
decorated, i.e. when :mod:`symkernels` first imports them: under the interpreter they run on CPU tensors.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import TypeVar

import torch
import triton
import triton.language as tl

__all__ = ["INTERPRETED", "launched_on_its_device", "on_device", "problem"]


@triton.jit
def _runtime_loop_probe(out_ptr, count):
    total = 0
    for _ in range(count):
        total += 1
    tl.store(out_ptr, total)


def _detect_interpreter() -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - every supported triton has the interpreter
        return False
    return isinstance(_runtime_loop_probe, InterpretedFunction)


# Triton decides when kernels are decorated (at import) whether they run in its CPU interpreter.
INTERPRETED = _detect_interpreter()


def problem() -> str | None:
    """Why Triton's CPU interpreter cannot run the kernels here, or None (also None outside the interpreter).

    Triton 3.6's interpreter turns a loop bound passed at run time into a Python int through a conversion
    that numpy 2.4 removed; a probe launch tells, whatever the versions.
    """
    if not INTERPRETED:
        return None
    out = torch.zeros(1, dtype=torch.int32)
    try:
        _runtime_loop_probe[(1,)](out, 3)
    except Exception as error:
        import numpy

        return (
            f"Triton {triton.__version__}'s interpreter fails with numpy {numpy.__version__} "
            f"({type(error).__name__}: {error}); numpy < 2.4 works with triton 3.6"
        )
    if int(out.item()) != 3:
        return f"Triton {triton.__version__}'s interpreter ran a probe loop wrongly"
    return None


_SAME_DEVICE = contextlib.nullcontext()


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """A context in which Triton launches run on ``device``, where the tensors are.

    Triton launches on the current CUDA device and its current stream, not the tensors' device: tensors on
    ``cuda:1`` launched with device 0 current would fault. The C++ entry points switch with a ``CUDAGuard``;
    this is their Python counterpart, and costs one comparison when the device is already current (a
    launcher's usual case, and the interpreter's, on CPU tensors).
    """
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return _SAME_DEVICE
    return torch.cuda.device(device.index)


Launcher = TypeVar("Launcher", bound=Callable)


def launched_on_its_device(launcher: Launcher) -> Launcher:
    """``launcher`` (whose first argument is a tensor) launches under :func:`on_device` of that tensor."""

    @functools.wraps(launcher)
    def launch(first: torch.Tensor, *args, **kwargs):
        with on_device(first.device):
            return launcher(first, *args, **kwargs)

    return launch  # type: ignore[return-value]
