"""Extra layers whose Fisher geometry is studied in the literature, each with its layer type in
:mod:`nngeometry.layer_types.reparametrized`.

* :class:`WeightNorm1d`: a linear map whose weight rows are normalized to unit norm, no bias:
  ``y = x Ŵᵀ`` with ``Ŵ_o = w_o / ||w_o||``.
* :class:`WeightNorm2d`: the convolution version: each output channel's kernel
  ``(C_in, kh, kw)`` is normalized to unit norm, no bias.
* :class:`Cosine1d`: cosine similarity between the input and each weight row:
  ``y_o = <x / ||x||, w_o / ||w_o||>`` (norms over the last axis), no bias.
* :class:`Affine1d`: per-feature scale and shift ``y = x * weight + bias`` over the last axis
  (the affine part of a normalization layer, on its own).
"""
import torch
import torch.nn.functional as F
from torch import nn


def _unit_rows(w):
    """``w`` with each slice ``w[o]`` divided by its Euclidean norm."""
    flat = w.reshape(w.shape[0], -1)
    return (flat / flat.norm(dim=1, keepdim=True)).reshape(w.shape)


class WeightNorm1d(nn.Linear):
    """``y = x Ŵᵀ`` with the rows of the weight ``(out_features, in_features)`` normalized."""

    def __init__(self, in_features, out_features, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)

    def forward(self, input):
        return F.linear(input, _unit_rows(self.weight))


class WeightNorm2d(nn.Conv2d):
    """A ``Conv2d`` without bias whose kernel is normalized per output channel."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=False, device=device, dtype=dtype)

    def forward(self, input):
        return self._conv_forward(input, _unit_rows(self.weight), None)


class Cosine1d(nn.Linear):
    """``y_o = cos(x, w_o)``: normalized input against normalized weight rows, no bias."""

    def __init__(self, in_features, out_features, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)

    def forward(self, input):
        return F.linear(input / input.norm(dim=-1, keepdim=True), _unit_rows(self.weight))


class Affine1d(nn.Module):
    """``y = x * weight + bias`` per feature (last axis); weight starts at 1, bias at 0."""

    def __init__(self, num_features, bias=True, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.weight = nn.Parameter(torch.ones(num_features, **kw))
        self.register_parameter("bias", nn.Parameter(torch.zeros(num_features, **kw)) if bias
                                else None)

    def forward(self, input):
        out = input * self.weight
        return out if self.bias is None else out + self.bias

    def extra_repr(self):
        return f"num_features={self.num_features}, bias={self.bias is not None}"


__all__ = ["WeightNorm1d", "WeightNorm2d", "Cosine1d", "Affine1d"]
