"""symkernels: fast learned weight sharing with doubly stochastic matrices.

The functional ops (:func:`sinkhorn`, :func:`expand_kernel`, :func:`permuted_conv2d`) run on the backend
chosen by :mod:`symkernels.backends`; :mod:`symkernels.nn` and :mod:`symkernels.models` build on them, and
:mod:`symkernels.reference` is the pure-PyTorch oracle.
"""

from symkernels import analysis, backends, groups, models, nn, ops, reference
from symkernels.backends import BACKEND_ENV_VAR, backend_status, use_backend
from symkernels.functional import (
    expand_kernel,
    grouped_sinkhorn,
    permuted_conv2d,
    representation_stack,
    sinkhorn,
)
from symkernels.reference.sinkhorn import AUTHORS_TOLERANCE

__version__ = "0.1.0"

__all__ = [
    "AUTHORS_TOLERANCE",
    "BACKEND_ENV_VAR",
    "__version__",
    "analysis",
    "backend_status",
    "backends",
    "expand_kernel",
    "grouped_sinkhorn",
    "groups",
    "models",
    "nn",
    "ops",
    "permuted_conv2d",
    "reference",
    "representation_stack",
    "sinkhorn",
    "use_backend",
]
