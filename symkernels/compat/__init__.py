"""A drop-in for the method's published PyTorch modules (``wsmodules.py`` and the models built from them).

A script written against them changes one import::

    # import wsmodules / from models import WSCNN
    from symkernels.compat import WSCNN, WSConv2d, WSLiftConv2d, WSResNet

The constructors, defaults, parameter names and shapes, ``state_dict`` keys and methods
(``get_representations``, ``get_loss``, ``get_W``; ``get_loss``, ``get_parameter_counts``,
``save_representations`` on the models) are the published ones, so published checkpoints load unchanged and
these load into the published modules. What computes them is symkernels: the Sinkhorn through the fused op
with the published stopping rule by default (``tol=AUTHORS_TOLERANCE``; ``tol=None`` runs exactly ``n_iter``
iterations, as :mod:`symkernels.nn`), the convolution through :func:`symkernels.permuted_conv2d`. Without host
synchronisation: non-finite ``representations`` give NaN outputs (as published) rather than an error.
``device="cuda"`` (the published default) on a machine without CUDA creates the parameters on the CPU, with a
warning.
"""

from symkernels.compat.layers import WSConv2d, WSLiftConv2d
from symkernels.compat.models import WSCNN, WSResBlock, WSResNet, parameter_counts

__all__ = ["WSCNN", "WSConv2d", "WSLiftConv2d", "WSResBlock", "WSResNet", "parameter_counts"]
