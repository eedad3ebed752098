"""The ``torch.ops.symkernels`` operators, one module per op family: schema, fake kernels, the public function
(argument checks, the backend choice) and the Python implementation (Triton, an automatic choice).

* :mod:`.sinkhorn`: ``symkernels::sinkhorn`` and ``symkernels::sinkhorn_backward``;
* :mod:`.expansion`: ``symkernels::expand_kernel`` and ``symkernels::expand_kernel_backward``.

The native library registers the ops' CPU, CUDA and Autograd kernels in C++
(``csrc/<family>/<family>_op.cpp``, next to the native kernels); their Triton launchers are
:mod:`.sinkhorn_triton` and :mod:`.expansion_triton` (imported on first use); :mod:`.python_kernels` registers
each family's Python implementation; the pure-PyTorch references are in :mod:`symkernels.reference`.
"""

from symkernels.ops import expansion, sinkhorn

__all__ = ["expansion", "sinkhorn"]
