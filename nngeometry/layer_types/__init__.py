"""Layer types: one module per type, each holding its spec and its per-layer maths."""
from .base import AbstractLayer, Parameter, layer_type_for, register_layer_type
from .linear import LinearLayer
from .conv import Conv2dLayer

__all__ = ["AbstractLayer", "Parameter", "layer_type_for", "register_layer_type",
           "LinearLayer", "Conv2dLayer"]
