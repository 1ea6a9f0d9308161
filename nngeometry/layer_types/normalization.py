"""Normalization layers with affine parameters: BatchNorm{1,2,3}d, InstanceNorm{1,2,3}d,
GroupNorm, LayerNorm, RMSNorm; and `ScaleShiftLayer`, their shared maths.

All of them compute ``y = x̂ * weight + bias`` with ``x̂`` a normalization of the input that does
not depend on ``weight`` and ``bias``. So the per-example gradients are

    ∂y/∂weight:  Σ_positions gy · x̂        ∂y/∂bias:  Σ_positions gy

where the positions are everything but the batch and the parameter's own axes (the channel axis
for BatchNorm/InstanceNorm/GroupNorm, the trailing ``normalized_shape`` axes for LayerNorm and
RMSNorm). ``x̂`` is recomputed from the module's input with the module's own settings:

* BatchNorm: batch statistics in training mode (or without running statistics), running
  statistics in eval mode. In training mode the batch statistics couple the examples, so the
  "per-example gradient" is the one that treats those statistics as given (what the forward pass
  used), not the derivative of one example's output through the statistics;
* InstanceNorm: per-example statistics (running ones in eval mode if tracked);
* GroupNorm / LayerNorm / RMSNorm: per-example statistics.

KFAC: these layers have no Kronecker structure between an input and an output factor. The choice
made here, exact in its block: ``A = [[n]]`` (a ``1 × 1`` factor, the sum of 1 over the
examples) and ``G = Σ_{k,i} g gᵀ`` the full layer block of the per-example gradients, with the
identity `kfac_permutation`. So ``kron(G/n, A/n)`` is the layer's exact block: KFAC and
EKFAC hold such a layer as a dense block, which is cheap since these layers are small
(``2 × channels`` parameters).
"""
import torch
import torch.nn.functional as F
from torch import nn

from .base import AbstractLayer, Parameter, register_layer_type


class ScaleShiftLayer(AbstractLayer):
    """Base of the layer types computing ``y = x̂ * weight (+ bias)``.

    Subclasses implement `normalized` (``x̂``, same shape as the input) and set
    ``channel_axis``: ``True`` when the parameters index axis 1 of the input (BatchNorm,
    GroupNorm, InstanceNorm), ``False`` when they cover the trailing axes (LayerNorm, RMSNorm,
    Affine1d).
    """

    supports_kfac = True
    channel_axis = True

    def __init__(self, shape, bias=True):
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        self.weight = Parameter(*shape)
        self.bias = Parameter(*shape) if bias else None

    def normalized(self, module, x):
        raise NotImplementedError

    def _flat(self, t, lead):
        """``t`` of shape ``(*lead, n, ...)`` -> ``(*lead, n, F, positions)``."""
        F_ = self.weight.numel()
        if self.channel_axis:
            return t.reshape(*lead, F_, -1)
        # trailing parameter axes: positions are the axes between the batch and them
        return t.reshape(*lead, -1, F_).transpose(-1, -2)

    def per_example_grad(self, module, x, gy):
        K, n = gy.shape[:2]
        if not self.channel_axis:
            # trailing parameter axes: products in the natural (positions, F) layout, summed
            # over positions (no transposed copies; ~2x faster than the einsum below for a
            # small transformer)
            F_ = self.weight.numel()
            xh = self.normalized(module, x).to(gy.dtype).reshape(n, -1, F_)
            g = gy.reshape(K, n, -1, F_)
            gw = (g * xh).sum(dim=2)
            if self.bias is None:
                return gw
            return torch.cat([gw, g.sum(dim=2)], dim=2)
        xh = self._flat(self.normalized(module, x).to(gy.dtype), (n,))  # (n, F, L)
        g = self._flat(gy, (K, n))  # (K, n, F, L)
        gw = torch.einsum("knfl,nfl->knf", g, xh)
        if self.bias is None:
            return gw
        return torch.cat([gw, g.sum(dim=3)], dim=2)

    def kfac_factors(self, module, x, gy, approx="expand"):
        # A = [[n]], G = the layer's full block: kron(G/n, A/n) is the exact block
        g = self.per_example_grad(module, x, gy)
        g = g.reshape(-1, g.shape[-1])
        A = g.new_full((1, 1), float(gy.shape[1]))
        return A, g.t() @ g

    def kfac_permutation(self):
        return torch.arange(self.numel())


class _PerChannelNormLayer(ScaleShiftLayer):
    """Norm layers with one scale and shift per channel, built from ``num_features``."""

    def __init__(self, num_features):
        self.num_features = num_features
        super().__init__(num_features)

    @classmethod
    def from_module(cls, module):
        return cls(module.num_features)


class _BatchNormLayer(_PerChannelNormLayer):
    def normalized(self, module, x):
        use_batch = module.training or module.running_mean is None
        if use_batch:
            # no running buffers passed: nothing is updated
            return F.batch_norm(x, None, None, None, None, True, 0.0, module.eps)
        return F.batch_norm(x, module.running_mean, module.running_var, None, None, False, 0.0,
                            module.eps)


@register_layer_type
class BatchNorm1dLayer(_BatchNormLayer):
    module_types = (nn.BatchNorm1d,)


@register_layer_type
class BatchNorm2dLayer(_BatchNormLayer):
    module_types = (nn.BatchNorm2d,)


@register_layer_type
class BatchNorm3dLayer(_BatchNormLayer):
    module_types = (nn.BatchNorm3d,)


class _InstanceNormLayer(_PerChannelNormLayer):
    def normalized(self, module, x):
        if module.training or not module.track_running_stats:
            return F.instance_norm(x, None, None, None, None, True, 0.0, module.eps)
        return F.instance_norm(x, module.running_mean, module.running_var, None, None, False, 0.0,
                               module.eps)


@register_layer_type
class InstanceNorm1dLayer(_InstanceNormLayer):
    module_types = (nn.InstanceNorm1d,)


@register_layer_type
class InstanceNorm2dLayer(_InstanceNormLayer):
    module_types = (nn.InstanceNorm2d,)


@register_layer_type
class InstanceNorm3dLayer(_InstanceNormLayer):
    module_types = (nn.InstanceNorm3d,)


@register_layer_type
class GroupNormLayer(ScaleShiftLayer):
    module_types = (nn.GroupNorm,)

    def __init__(self, num_groups, num_channels):
        self.num_groups = num_groups
        self.num_channels = num_channels
        super().__init__(num_channels)

    @classmethod
    def from_module(cls, module):
        return cls(module.num_groups, module.num_channels)

    def _key(self):
        return super()._key() + (self.num_groups,)

    def normalized(self, module, x):
        return F.group_norm(x, module.num_groups, None, None, module.eps)


@register_layer_type
class LayerNormLayer(ScaleShiftLayer):
    module_types = (nn.LayerNorm,)
    channel_axis = False

    def __init__(self, normalized_shape, bias=True):
        self.normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) \
            else tuple(normalized_shape)
        super().__init__(self.normalized_shape, bias=bias)

    @classmethod
    def from_module(cls, module):
        return cls(module.normalized_shape, bias=module.bias is not None)

    def normalized(self, module, x):
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)


@register_layer_type
class RMSNormLayer(ScaleShiftLayer):
    module_types = (nn.RMSNorm,)
    channel_axis = False

    def __init__(self, normalized_shape):
        self.normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) \
            else tuple(normalized_shape)
        super().__init__(self.normalized_shape, bias=False)

    @classmethod
    def from_module(cls, module):
        return cls(module.normalized_shape)

    def normalized(self, module, x):
        return F.rms_norm(x, module.normalized_shape, None, module.eps)
