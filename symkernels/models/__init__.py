"""The paper's models (docs/design.md §7) with their exact parameter counts (§8)."""

from symkernels.models.accounting import parameter_counts, sum_regularizers, weight_sharing_layers
from symkernels.models.cnn import CNN, GCNN, WSCNN
from symkernels.models.resnet import ResNet, WSResNet

__all__ = [
    "CNN",
    "GCNN",
    "ResNet",
    "WSCNN",
    "WSResNet",
    "parameter_counts",
    "sum_regularizers",
    "weight_sharing_layers",
]
