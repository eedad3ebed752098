"""Pure-PyTorch mirror of every op: the test oracle, the fallback backend and the benchmark baseline.

This code is independent of the fast kernels and is never changed to match them.
"""

from symkernels.reference.authors_loop import authors_representation_stack, sinkhorn_early_exit
from symkernels.reference.expansion import expand_kernel_reference, permuted_conv2d_reference
from symkernels.reference.regularizers import entropy_regularizer, norm_regularizer
from symkernels.reference.sinkhorn import representation_stack_reference, sinkhorn_reference

__all__ = [
    "authors_representation_stack",
    "entropy_regularizer",
    "expand_kernel_reference",
    "norm_regularizer",
    "permuted_conv2d_reference",
    "representation_stack_reference",
    "sinkhorn_early_exit",
    "sinkhorn_reference",
]
