"""The ``torch.ops.symkernels`` operators, one module per op family: schema, fake, autograd, argument checks,
and the choice of kernel (native C++/CUDA, Triton) per call.

* :mod:`.sinkhorn`: ``symkernels::sinkhorn`` and ``symkernels::sinkhorn_backward``;
* :mod:`.expansion`: ``symkernels::expand_kernel`` and ``symkernels::expand_kernel_backward``.

Their Triton launchers are :mod:`.sinkhorn_triton` and :mod:`.expansion_triton` (imported on first use); the
native kernels are in ``csrc/<family>/``; the pure-PyTorch references in :mod:`symkernels.reference`.
"""

from symkernels.ops import expansion, sinkhorn

__all__ = ["expansion", "sinkhorn"]
