"""The paper's models (method.md §7) with their exact parameter counts (§8)."""

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
