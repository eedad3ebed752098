"""Whether the Triton kernels can run here, and whether they run in Triton's CPU interpreter.

Importing this module imports triton (and fails with it). Triton reads ``TRITON_INTERPRET`` when kernels are
decorated, i.e. when :mod:`symkernels` first imports them: under the interpreter they run on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["INTERPRETED", "problem"]


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
