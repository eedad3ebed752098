"""Triton kernels of symkernels.

They live in this top-level folder and are installed inside the package as ``symkernels.triton_kernels``
(a top-level import name ``triton_kernels`` is already taken by other packages): import them from there.
"""
