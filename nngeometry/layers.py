"""Extra layers whose Fisher geometry is studied in the literature, each with its layer type in
`nngeometry.layer_types.reparametrized`.

* `WeightNorm1d`: a linear map whose weight rows are normalized, no bias:
  ``y = x Ŵᵀ`` with ``Ŵ_o = w_o / sqrt(||w_o||² + eps)``.
* `WeightNorm2d`: the convolution version: each output channel's kernel
  ``(C_in, kh, kw)`` is normalized the same way, no bias.
* `Cosine1d`: cosine similarity between the input and each weight row:
  ``y_o = <x / sqrt(||x||² + eps), w_o / sqrt(||w_o||² + eps)>`` (norms over the last axis),
  no bias.

``eps`` (default ``1e-5``, as in upstream nngeometry) keeps the maps defined at zero norm;
``eps=0`` gives the exact unit-norm maps. The layer types in
`nngeometry.layer_types.reparametrized` read ``module.eps``, so the gradients always match
the forward.
* `Affine1d`: per-feature scale and shift ``y = x * weight + bias`` over the last axis
  (the affine part of a normalization layer, on its own).
"""
import torch
import torch.nn.functional as F
from torch import nn


def _unit_rows(w, eps=0.0):
    """``w`` with each slice ``w[o]`` divided by ``sqrt(||w[o]||² + eps)``."""
    flat = w.reshape(w.shape[0], -1)
    return (flat / _soft_norm(flat, eps)).reshape(w.shape)


def _soft_norm(t, eps=0.0):
    """``sqrt(||t||² + eps)`` over the last axis (kept), ``||t||`` exactly when ``eps = 0``."""
    if eps == 0:
        return t.norm(dim=-1, keepdim=True)
    return torch.sqrt((t * t).sum(dim=-1, keepdim=True) + eps)


class WeightNorm1d(nn.Linear):
    """``y = x Ŵᵀ`` with the rows of the weight ``(out_features, in_features)`` normalized:
    ``Ŵ_o = w_o / sqrt(||w_o||² + eps)``; no bias."""

    def __init__(self, in_features, out_features, eps=1e-5, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)
        self.eps = eps

    def forward(self, input):
        return F.linear(input, _unit_rows(self.weight, self.eps))

    def extra_repr(self):
        return super().extra_repr() + f", eps={self.eps}"


class WeightNorm2d(nn.Conv2d):
    """A ``Conv2d`` without bias whose kernel is normalized per output channel:
    ``Ŵ_o = w_o / sqrt(||w_o||² + eps)`` over ``(C_in, kh, kw)``. Takes ``Conv2d``'s arguments
    (``bias`` must be absent or False)."""

    def __init__(self, *args, eps=1e-5, **kwargs):
        if kwargs.pop("bias", False):
            raise ValueError("WeightNorm2d has no bias: drop bias=True (add a separate bias "
                             "layer, e.g. Affine1d on the channels, if one is needed)")
        super().__init__(*args, bias=False, **kwargs)
        self.eps = eps

    def forward(self, input):
        return self._conv_forward(input, _unit_rows(self.weight, self.eps), None)

    def extra_repr(self):
        return super().extra_repr() + f", eps={self.eps}"


class Cosine1d(nn.Linear):
    """``y_o = <x̂, ŵ_o>`` with ``x̂ = x / sqrt(||x||² + eps)`` (last axis) and
    ``ŵ_o = w_o / sqrt(||w_o||² + eps)``: the cosine similarity of the input and each weight
    row (for ``eps → 0``); no bias."""

    def __init__(self, in_features, out_features, eps=1e-5, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)
        self.eps = eps

    def forward(self, input):
        return F.linear(input / _soft_norm(input, self.eps), _unit_rows(self.weight, self.eps))

    def extra_repr(self):
        return super().extra_repr() + f", eps={self.eps}"


class Affine1d(nn.Module):
    """``y = x * weight + bias`` per feature (last axis); weight starts at 1, bias at 0."""

    def __init__(self, num_features, bias=True, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.weight = nn.Parameter(torch.empty(num_features, **kw))
        self.register_parameter("bias", nn.Parameter(torch.empty(num_features, **kw)) if bias
                                else None)
        self.reset_parameters()

    def reset_parameters(self):
        """The identity map: weight 1, bias 0."""
        with torch.no_grad():
            self.weight.fill_(1.0)
            if self.bias is not None:
                self.bias.zero_()

    def forward(self, input):
        out = input * self.weight
        return out if self.bias is None else out + self.bias

    def extra_repr(self):
        return f"num_features={self.num_features}, bias={self.bias is not None}"


__all__ = ["WeightNorm1d", "WeightNorm2d", "Cosine1d", "Affine1d"]

# Upstream import paths: re-exports only (upstream's module exposed these through its imports)
from torch import Tensor  # noqa: E402,F401
from torch.nn import Conv2d, Linear, Module, Parameter  # noqa: E402,F401
