"""Layer types of `nngeometry.layers`: WeightNorm1d, WeightNorm2d, Cosine1d, Affine1d.

WeightNorm / Cosine: the module uses ``Ŵ_o = w_o / s_o`` with ``s_o = sqrt(||w_o||² + eps)``
(per output row / channel; ``eps = module.eps``, 0 for modules without it). With ``D_o`` the
per-example gradient w.r.t. ``Ŵ_o`` (the Linear / convolution formula, with the input
normalized the same way for Cosine1d), the chain rule through the normalization gives

    ∂/∂w_o = (D_o - ŵ_o <ŵ_o, D_o>) / s_o          (ŵ_o = w_o / s_o)

(the projection orthogonal to ``ŵ_o``). The projection differs per row, so these layers have no
Kronecker structure: KFAC/EKFAC refuse them.

Affine1d: ``y = x * weight + bias`` is `ScaleShiftLayer` with ``x̂ = x``
(same per-example gradients, same dense-in-KFAC choice as the normalization layers).
"""
import torch

from .. import layers
from .base import AbstractLayer, register_layer_type
from .conv import Conv2dLayer
from .linear import LinearLayer
from .normalization import ScaleShiftLayer


def _project(D, w, eps=0.0):
    """``(D - ŵ <ŵ, D>) / s`` per output row, ``s = sqrt(||w||² + eps)``, ``ŵ = w / s``;
    ``D``: (K, n, out, ...), ``w``: (out, ...)."""
    out = w.shape[0]
    wf = w.detach().reshape(out, -1)
    norm = torch.sqrt((wf * wf).sum(dim=1, keepdim=True) + eps) if eps else \
        wf.norm(dim=1, keepdim=True)
    wh = wf / norm
    Df = D.reshape(*D.shape[:2], out, -1)
    Df = (Df - wh * (Df * wh).sum(dim=-1, keepdim=True)) / norm
    return Df.reshape(*D.shape[:2], -1)


class _RowNormalized:
    def kfac_factors(self, module, x, gy, approx="expand"):
        raise NotImplementedError(
            f"KFAC/EKFAC are not available for {type(self).__name__[:-5]}: the weight "
            "normalization makes the block non-Kronecker; use PMatDense, PMatBlockDiag, "
            "PMatDiag, PMatQuasiDiag, PMatLowRank or PMatImplicit for this layer")

    # the parent's in-place diagonal is for the plain weight: go through this class's diag
    diag_into = AbstractLayer.diag_into

    def diag(self, module, x, gy):
        return AbstractLayer.diag(self, module, x, gy)

    def kfac_permutation(self):
        return AbstractLayer.kfac_permutation(self)

    def kfe_diag(self, module, x, gy, UA, UG):
        # the Linear shortcut assumes a rank-one gradient, which the projection breaks
        return AbstractLayer.kfe_diag(self, module, x, gy, UA, UG)


@register_layer_type
class WeightNorm1dLayer(_RowNormalized, LinearLayer):
    module_types = (layers.WeightNorm1d,)
    supports_kfac = False

    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features, bias=False)

    @classmethod
    def from_module(cls, module):
        return cls(module.in_features, module.out_features)

    def per_example_grad(self, module, x, gy):
        return _project(LinearLayer.per_example_grad(self, module, x, gy), module.weight,
                        getattr(module, "eps", 0.0))


@register_layer_type
class Cosine1dLayer(WeightNorm1dLayer):
    module_types = (layers.Cosine1d,)

    def per_example_grad(self, module, x, gy):
        eps = getattr(module, "eps", 0.0)
        xh = x / (torch.sqrt((x * x).sum(dim=-1, keepdim=True) + eps) if eps else
                  x.norm(dim=-1, keepdim=True))
        return _project(LinearLayer.per_example_grad(self, module, xh, gy), module.weight, eps)


@register_layer_type
class WeightNorm2dLayer(_RowNormalized, Conv2dLayer):
    module_types = (layers.WeightNorm2d,)
    supports_kfac = False

    def __init__(self, in_channels, out_channels, kernel_size, groups=1):
        super().__init__(in_channels, out_channels, kernel_size, bias=False, groups=groups)

    @classmethod
    def from_module(cls, module):
        return cls(module.in_channels, module.out_channels, module.kernel_size,
                   groups=module.groups)

    def per_example_grad(self, module, x, gy):
        return _project(Conv2dLayer.per_example_grad(self, module, x, gy), module.weight,
                        getattr(module, "eps", 0.0))


@register_layer_type
class Affine1dLayer(ScaleShiftLayer):
    module_types = (layers.Affine1d,)
    channel_axis = False

    def __init__(self, num_features, bias=True):
        self.num_features = num_features
        super().__init__(num_features, bias=bias)

    @classmethod
    def from_module(cls, module):
        return cls(module.num_features, bias=module.bias is not None)

    def normalized(self, module, x):
        return x
