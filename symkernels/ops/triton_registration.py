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

from symkernels.triton_kernels.expansion import is_interpreted

__all__ = ["INTERPRETED", "define_op", "wrap_triton"]

# Triton decides when the kernels are decorated (at import) whether they run in its CPU interpreter.
INTERPRETED = is_interpreted()

if INTERPRETED:

    def wrap_triton(kernel):
        """Under the interpreter the ops launch their kernels directly."""
        return kernel

else:
    from torch.library import wrap_triton


def define_op(name: str, schema: str, impl: Callable, fake: Callable):
    """The operator ``name`` running ``impl``; ``fake`` gives its output shapes where it cannot be traced."""
    if INTERPRETED:
        op = torch.library.custom_op(name, impl, mutates_args=(), schema=schema)
        op.register_fake(fake)
        return op
    return torch.library.triton_op(name, impl, mutates_args=(), schema=schema)
