"""Registering Triton launchers as ``torch.ops.symkernels`` operators, on a GPU and under the interpreter.

On a GPU an op is a ``torch.library.triton_op`` whose launches go through ``wrap_triton``, so
``torch.compile`` sees the kernels (``triton_op`` registers the function itself as the fake implementation).
Under the Triton interpreter (``TRITON_INTERPRET=1`` set before triton is imported; CPU tensors)
``wrap_triton`` cannot trace an interpreted kernel: the op is a plain custom op with an explicit fake, and
``wrap_triton`` hands the kernel back unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from symkernels.triton_kernels.expansion import is_interpreted

__all__ = ["INTERPRETED", "define_op", "interpreter_problem", "wrap_triton"]

# Triton decides when the kernels are decorated (at import) whether they run in its CPU interpreter.
INTERPRETED = is_interpreted()

if INTERPRETED:

    def wrap_triton(kernel):
        """Under the interpreter the ops launch their kernels directly."""
        return kernel

else:
    from torch.library import wrap_triton


def define_op(name: str, impl: Callable, fake: Callable):
    """The operator ``name`` running ``impl``, its schema inferred from ``impl``'s annotations (torch 2.11's
    ``triton_op`` ignores an explicit schema); ``fake`` gives its output shapes where it cannot be traced."""
    if INTERPRETED:
        op = torch.library.custom_op(name, impl, mutates_args=())
        op.register_fake(fake)
        return op
    return torch.library.triton_op(name, impl, mutates_args=())


@triton.jit
def _runtime_loop_probe(out_ptr, count):
    total = 0
    for _ in range(count):
        total += 1
    tl.store(out_ptr, total)


def interpreter_problem() -> str | None:
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
