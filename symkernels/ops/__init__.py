"""The ``torch.ops.symkernels`` operators: schemas come from the native library, fake (meta) implementations
and Python entry points from here. Each entry point validates its inputs, calls the native op when a kernel
serves the tensor's device and dtype, and otherwise computes the same result in pure PyTorch.
"""

from symkernels.ops import marginal_error

__all__ = ["marginal_error"]
