"""Triton kernels of symkernels.

They live in this top-level folder and are installed inside the package as ``symkernels.triton_kernels``
(a top-level import name ``triton_kernels`` is already taken by other packages): import them from there.

* ``sinkhorn_tiles``: tile-level pieces of the Sinkhorn kernels (both domains);
* ``sinkhorn``: what the Sinkhorn kernels share (the math, the saved state, the backward's recurrence);
* ``sinkhorn_packed``, ``sinkhorn_chunked``, ``sinkhorn_chunked_backward``: the fused Sinkhorn forward
  (per-matrix early exit) and exact backward, one launch each (packed and chunked layouts);
* ``sinkhorn_stepped``: the multi-program Sinkhorn kernels for large matrices (one launch per iteration);
* ``expansion``: the kernel expansion and its backward.

Their launchers are ``symkernels.ops.sinkhorn_triton`` and ``symkernels.ops.expansion_triton``.
"""
