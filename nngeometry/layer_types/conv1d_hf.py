"""Hugging Face ``transformers``' ``Conv1D`` (GPT-2's attention and MLP projections): a linear
layer ``y = x W + b`` whose weight is stored transposed, shape ``(in, out)``.

Its flat layout is the module's own (``weight.flatten()``, row-major ``(in, out)``, then the
bias); the maths is `LinearLayer`'s on the transposed weight: the same KFAC
factors (``A`` from the inputs, ``G`` from the output gradients) in the same Kronecker layout
(row-major ``[Wᵀ | b]`` of shape ``(out, in + 1)``), `kfac_permutation` mapping the flat
layout to it. The module is recognised by its class name (``transformers`` is not imported).
"""
import torch

from .base import Parameter, register_layer_type, row_chunked_diag_into
from .linear import LinearLayer


@register_layer_type
class HFConv1DLayer(LinearLayer):
    #: matched by qualified class name (see ``base.layer_type_for``)
    module_types = ()
    module_class_names = ("transformers.pytorch_utils.Conv1D",
                          "transformers.modeling_utils.Conv1D")
    #: QuasiDiag's per-output-neuron coupling assumes one weight row per output: not this layout
    quasidiag_rows = False

    def __init__(self, in_features, out_features, bias=True):
        super().__init__(in_features, out_features, bias)
        self.weight = Parameter(in_features, out_features)

    @classmethod
    def from_module(cls, module):
        nx, nf = module.weight.shape
        return cls(nx, nf, bias=module.bias is not None)

    def _to_own_layout(self, flat):
        """``(..., numel)`` in Linear's layout (weight ``(out, in)``) -> this layer's (weight
        ``(in, out)``)."""
        nw = self.weight.numel()
        lead = flat.shape[:-1]
        w = flat[..., :nw].reshape(*lead, self.out_features, self.in_features).transpose(-1, -2)
        parts = [w.reshape(*lead, nw)]
        if self.bias is not None:
            parts.append(flat[..., nw:])
        return torch.cat(parts, dim=-1)

    def per_example_grad(self, module, x, gy):
        return self._to_own_layout(super().per_example_grad(module, x, gy))

    def diag(self, module, x, gy):
        return self.diag_into(module, x, gy, gy.new_zeros(self.numel()))

    def diag_into(self, module, x, gy, out):
        xf, gf = self._flatten_positions(x, gy)
        if xf.shape[1] != 1:
            # positions: blocks of rows in this layer's own layout (no transposed copy)
            return row_chunked_diag_into([(self, (xf, gf))], gf.shape[0], xf.shape[0], out)
        out += self._to_own_layout(super().diag_into(module, x, gy,
                                                     gy.new_zeros(self.numel())))
        return out

    # row blocks: the weight (in, out) is `in` rows of `out` entries; row j of example i's
    # gradient is Σ_s x_{i,s,j} g_{i,s}ᵀ
    def grad_rows(self):
        return self.in_features, self.out_features

    def rows_into(self, state, k, i0, i1, r0, r1, out, accumulate):
        x, gy = state
        xt = x[i0:i1, :, r0:r1].transpose(-1, -2)
        if accumulate:
            out.baddbmm_(xt, gy[k, i0:i1])
        else:
            torch.bmm(xt, gy[k, i0:i1], out=out)

    def kfac_permutation(self):
        # flat W[i, o] (index i·out + o) -> Kronecker (o, i) of the (out, in + 1) matrix
        width = self.in_features + (1 if self.bias is not None else 0)
        i = torch.arange(self.in_features).unsqueeze(1)
        o = torch.arange(self.out_features).unsqueeze(0)
        perm = (o * width + i).reshape(-1)
        if self.bias is not None:
            perm = torch.cat([perm, torch.arange(self.out_features) * width + self.in_features])
        return perm

    def grad_sum(self, module, x, gy):
        x2, g2 = x.reshape(-1, self.in_features), gy.reshape(-1, self.out_features)
        parts = [x2.t() @ g2]
        if self.bias is not None:
            parts.append(g2.sum(dim=0))
        return parts
