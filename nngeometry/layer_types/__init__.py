"""Layer types: one module per type, each holding its spec and its per-layer maths."""
from .base import AbstractLayer, Parameter, layer_type_for, register_layer_type
from .linear import LinearLayer
from .conv1d_hf import HFConv1DLayer
from .conv import (Conv1dLayer, Conv2dLayer, Conv3dLayer, ConvTranspose1dLayer,
                   ConvTranspose2dLayer, ConvTranspose3dLayer)
from .normalization import (BatchNorm1dLayer, BatchNorm2dLayer, BatchNorm3dLayer, GroupNormLayer,
                            InstanceNorm1dLayer, InstanceNorm2dLayer, InstanceNorm3dLayer,
                            LayerNormLayer, RMSNormLayer, ScaleShiftLayer)
from .embedding import EmbeddingLayer
from .attention import MultiheadAttentionLayer
from .reparametrized import Affine1dLayer, Cosine1dLayer, WeightNorm1dLayer, WeightNorm2dLayer
from .generic import GenericLayer
from .parametrized import ParametrizedLayer

__all__ = ["AbstractLayer", "Parameter", "layer_type_for", "register_layer_type",
           "LinearLayer", "HFConv1DLayer", "Conv1dLayer", "Conv2dLayer", "Conv3dLayer", "ConvTranspose1dLayer",
           "ConvTranspose2dLayer", "ConvTranspose3dLayer", "BatchNorm1dLayer", "BatchNorm2dLayer",
           "BatchNorm3dLayer", "GroupNormLayer", "InstanceNorm1dLayer", "InstanceNorm2dLayer",
           "InstanceNorm3dLayer", "LayerNormLayer", "RMSNormLayer", "ScaleShiftLayer",
           "EmbeddingLayer", "MultiheadAttentionLayer", "Affine1dLayer", "Cosine1dLayer",
           "WeightNorm1dLayer", "WeightNorm2dLayer", "GenericLayer", "ParametrizedLayer"]
