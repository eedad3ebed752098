"""Modules: representation stacks and the weight-sharing convolutions built on them."""

from symkernels.nn.conv import WSConv2d, WSLiftConv2d
from symkernels.nn.grouped import precompute_representations
from symkernels.nn.norm import channel_layer_norm, sample_layer_norm
from symkernels.nn.stacks import DoublyStochasticStack, FixedStack

__all__ = [
    "DoublyStochasticStack",
    "FixedStack",
    "WSConv2d",
    "WSLiftConv2d",
    "channel_layer_norm",
    "precompute_representations",
    "sample_layer_norm",
]
