"""Layer-wise equivariance learned through the marginal likelihood.

After van der Ouderaa, Immer and van der Wilk, *Learning Layer-wise Equivariances Automatically using
Gradients*, NeurIPS 2023.

Relaxed layers average several parameterisations of one map ("paths": FC, CONV, factored or sparsified ones,
a C4 group convolution; or a weight-sharing layer next to an unconstrained one), each parameter tensor gets
its own prior precision δ, and the δ's are learned by a Kronecker-factored Laplace approximation of the
marginal likelihood. A path whose δ grows is switched off; each layer's paths get shares from their effective
dimensions.

- :mod:`~symkernels.layerwise.paths`: the relaxed layers; :mod:`~symkernels.layerwise.models`: the backbone;
  :mod:`~symkernels.layerwise.sharing`: a WSCNN layer plus an unconstrained path.
- :mod:`~symkernels.layerwise.marglik`: the KFAC Laplace marginal likelihood (laplace-torch + curvlinops, the
  optional extra ``symkernels[layerwise]``, imported only when a curvature is fitted).
- :mod:`~symkernels.layerwise.trainer`: the paper's training schedule in a resumable run folder
  (:mod:`~symkernels.layerwise.runs`: that folder);
  :mod:`~symkernels.layerwise.report`: shares, table and figure; :mod:`~symkernels.layerwise.tasks`: the data.
"""

import importlib
from typing import Any

# Imported on first use: the trainer needs the command line's packages (tqdm, ...), which building the
# command line's parser does not.
_LAZY = {
    "ConvPath": "paths",
    "Curvature": "marglik",
    "DensePath": "paths",
    "FactoredDensePath": "paths",
    "GroupConvPath": "paths",
    "LayerwiseConfig": "config",
    "LayerwiseResult": "trainer",
    "PAPER_BLOCKS": "models",
    "PATH_SETS": "models",
    "RelaxedBackbone": "models",
    "RelaxedLayer": "paths",
    "SharingLayer": "sharing",
    "SharingNetwork": "sharing",
    "SparseConvPath": "paths",
    "curvature_form": "paths",
    "fit_curvature": "marglik",
    "format_share_table": "report",
    "layer_shares": "report",
    "make_path": "paths",
    "prior_parameters": "marglik",
    "train_layerwise": "trainer",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"symkernels.layerwise.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'symkernels.layerwise' has no attribute {name!r}")


__all__ = [
    "PAPER_BLOCKS",
    "PATH_SETS",
    "ConvPath",
    "Curvature",
    "DensePath",
    "FactoredDensePath",
    "GroupConvPath",
    "LayerwiseConfig",
    "LayerwiseResult",
    "RelaxedBackbone",
    "RelaxedLayer",
    "SharingLayer",
    "SharingNetwork",
    "SparseConvPath",
    "curvature_form",
    "fit_curvature",
    "format_share_table",
    "layer_shares",
    "make_path",
    "prior_parameters",
    "train_layerwise",
]
