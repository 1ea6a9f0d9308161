"""``torch.nn.Conv2d``: spec and per-layer maths (any stride, padding, dilation, groups).

A convolution is a Linear layer shared over the output locations: with the input unfolded into
patches ``U`` of shape ``(n, C_in/g * kh * kw, L)`` per group and the output gradient ``gy`` of
shape ``(K, n, C_out, L)``, the per-example weight gradient is ``sum_l gy[..., l] U[..., l]ᵀ``.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .base import AbstractLayer, Parameter, register_layer_type


@register_layer_type
class Conv2dLayer(AbstractLayer):
    module_types = (nn.Conv2d,)
    supports_kfac = True

    def __init__(self, in_channels, out_channels, kernel_size, bias=True, groups=1):
        kernel_size = tuple(kernel_size) if isinstance(kernel_size, (tuple, list)) else (kernel_size,) * 2
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.groups = groups
        self.weight = Parameter(out_channels, in_channels // groups, *kernel_size)
        self.bias = Parameter(out_channels) if bias else None

    @classmethod
    def from_module(cls, module):
        return cls(module.in_channels, module.out_channels, module.kernel_size,
                   bias=module.bias is not None, groups=module.groups)

    def _key(self):
        return super()._key() + (self.groups,)

    def _patches(self, module, x):
        """Unfolded input grouped by conv group: (n, g, C_in/g * kh * kw, L)."""
        if module.padding_mode != "zeros":
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
            padding = 0
        else:
            padding = module.padding
        if isinstance(padding, str):  # 'same' / 'valid'
            padding = self._explicit_padding(module, padding)
        u = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding,
                     stride=module.stride)
        n, d, L = u.shape
        return u.reshape(n, self.groups, d // self.groups, L)

    @staticmethod
    def _explicit_padding(module, padding):
        if padding == "valid":
            return 0
        # 'same' with stride 1: total padding d*(k-1); torch pads the extra element on the right,
        # which unfold can't express unless the total is even
        pads = []
        for k, d in zip(module.kernel_size, module.dilation):
            total = d * (k - 1)
            if total % 2:
                raise NotImplementedError(
                    f"padding='same' with an even kernel ({module.kernel_size}) is not supported "
                    "by Conv2dLayer; give the padding explicitly")
            pads.append(total // 2)
        return tuple(pads)

    def _grads_by_group(self, module, x, gy):
        u = self._patches(module, x)
        K, n, c_out = gy.shape[:3]
        g = gy.reshape(K, n, self.groups, c_out // self.groups, -1)
        return u, g

    def per_example_grad(self, module, x, gy):
        u, g = self._grads_by_group(module, x, gy)
        K, n = g.shape[:2]
        gw = torch.einsum("kngol,ngdl->kngod", g, u).reshape(K, n, -1)
        if self.bias is None:
            return gw
        return torch.cat([gw, gy.reshape(K, n, self.out_channels, -1).sum(dim=3)], dim=2)

    def kfac_factors(self, module, x, gy, approx="expand"):
        if self.groups != 1:
            raise NotImplementedError(
                "KFAC for grouped convolutions (groups > 1) is not implemented; use PMatBlockDiag "
                "or PMatDiag for this layer")
        u = self._patches(module, x)[:, 0]  # (n, d, L)
        n, d, L = u.shape
        u = u.transpose(1, 2).reshape(-1, d)  # every output location is a row
        if self.bias is not None:
            u = torch.cat([u, u.new_ones(u.shape[0], 1)], dim=1)
        A = u.t() @ u
        g = gy.reshape(gy.shape[0], gy.shape[1], self.out_channels, -1)
        g = g.permute(0, 1, 3, 2).reshape(-1, self.out_channels)
        # KFC (Grosse & Martens 2016): A sums over locations, G is divided by their count
        G = (g.t() @ g) / L
        return A, G
