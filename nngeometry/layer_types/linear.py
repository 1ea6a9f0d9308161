"""``torch.nn.Linear``: spec and per-layer maths.

Inputs may carry extra dimensions between the batch and the features, ``(n, ..., in)`` (e.g.
sequences ``(n, T, in)``); the weight is shared over them, so a per-example gradient sums over
those positions.
"""
import torch
from torch import nn

from ..maths.gram_accumulator import GramRows
from .base import AbstractLayer, Parameter, register_layer_type, row_chunked_diag_into

#: memory for one chunk of per-example gradients formed by `seq_grad_squares`
SEQ_CHUNK_BYTES = 16 * 2 ** 20


def seq_grads(a, g):
    """Per-example gradients of a linear map shared over positions: ``Σ_s g_s a_sᵀ``.

    ``a``: inputs ``(n, S, d)``, ``g``: output gradients ``(K, n, S, rows)``; returns
    ``(K, n, rows, d)`` (row-major ``(rows, d)`` per example and direction), as one batched
    product (``a`` is broadcast over the directions, ``g`` read through a transposed view:
    1.4x faster than ``einsum`` for a small transformer's shapes). For ``S = 1`` (outer products, bound by
    writing the result) ``einsum`` is the faster of the two."""
    if a.shape[1] == 1:
        return torch.einsum("kno,ni->knoi", g[:, :, 0], a[:, 0])
    return torch.matmul(g.transpose(-1, -2), a)


def seq_grad_squares(a, g, chunk_bytes=None):
    """``Σ_{k,i} (Σ_s g_{k,i,s} a_{i,s}ᵀ)²`` (elementwise square), shape ``(rows, d)``: the
    per-example gradients of `seq_grads` are formed by chunks of directions that fit in
    ``chunk_bytes`` (default ``SEQ_CHUNK_BYTES``), squared in place and summed."""
    K, n, _, rows = g.shape
    per_dir = n * rows * a.shape[-1] * g.element_size()
    kc = max(1, (SEQ_CHUNK_BYTES if chunk_bytes is None else chunk_bytes) // max(1, per_dir))
    total = None
    for k0 in range(0, K, kc):
        s = seq_grads(a, g[k0:k0 + kc]).square_().sum(dim=(0, 1))
        total = s if total is None else total.add_(s)
    return total



@register_layer_type
class LinearLayer(AbstractLayer):
    module_types = (nn.Linear,)
    supports_kfac = True
    supports_rows = True

    def __init__(self, in_features, out_features, bias=True):
        self.in_features = in_features
        self.out_features = out_features
        self.weight = Parameter(out_features, in_features)
        self.bias = Parameter(out_features) if bias else None

    @classmethod
    def from_module(cls, module):
        return cls(module.in_features, module.out_features, bias=module.bias is not None)

    @staticmethod
    def _flatten_positions(x, gy):
        """x -> (n, S, in), gy -> (K, n, S, out), with S the number of weight-sharing positions."""
        n = x.shape[0]
        return x.reshape(n, -1, x.shape[-1]), gy.reshape(gy.shape[0], n, -1, gy.shape[-1])

    def per_example_grad(self, module, x, gy):
        x, gy = self._flatten_positions(x, gy)
        K, n = gy.shape[:2]
        if self.bias is None:
            return seq_grads(x, gy).reshape(K, n, -1)
        if torch.is_grad_enabled() and (x.requires_grad or gy.requires_grad):
            # out= writes are not differentiable: the concatenating form for callers that
            # differentiate through the per-example gradients
            return torch.cat([seq_grads(x, gy).reshape(K, n, -1), gy.sum(dim=2)], dim=2)
        # weight and bias parts are written into their slices of one (K, n, numel) tensor: a
        # weight part then a concatenated copy held two per-example gradients of the layer
        nw = self.weight.numel()
        out = gy.new_empty(K, n, nw + self.out_features)
        gw = out[:, :, :nw].view(K, n, self.out_features, self.in_features)
        if x.shape[1] == 1:
            # outer products (see seq_grads)
            torch.mul(gy[:, :, 0, :, None], x[None, :, 0, None, :], out=gw)
        else:
            torch.matmul(gy.transpose(-1, -2), x, out=gw)
        torch.sum(gy, dim=2, out=out[:, :, nw:])
        return out

    def diag(self, module, x, gy):
        return self.diag_into(module, x, gy, gy.new_zeros(self.numel()))

    def diag_into(self, module, x, gy, out):
        """``out += diag``: the weight part accumulates into ``out`` in place (one GEMM when
        there is no weight sharing), so no per-batch diagonal is allocated nor concatenated."""
        nw = self.weight.numel()
        if x.dim() == 2:
            # (n, in) inputs, the common case: no position axis to add then remove (these views
            # cost more than the bias sum on an MLP's batches)
            return self._diag_into_2d(x, gy, out, nw)
        x, gy = self._flatten_positions(x, gy)
        if x.shape[1] != 1:
            # positions share the weight: squares don't factor; per-example gradients by blocks
            # of examples and rows (memory-bounded, one buffer reused), never the whole
            # (K, n, numel)
            return row_chunked_diag_into([(self, (x, gy))], gy.shape[0], x.shape[0], out)
        return self._diag_into_2d(x[:, 0], gy[:, :, 0], out, nw)

    # row blocks: the weight (out, in) is `out` rows of `in` entries; row o of example i's
    # gradient is Σ_s g_{i,s,o} x_{i,s}ᵀ
    def grad_rows(self):
        return self.out_features, self.in_features

    def rows_prepare(self, module, x, gy):
        return self._flatten_positions(x, gy)

    def rows_into(self, state, k, i0, i1, r0, r1, out, accumulate):
        x, gy = state
        gt = gy[k, i0:i1, :, r0:r1].transpose(-1, -2)
        if accumulate:
            out.baddbmm_(gt, x[i0:i1])
        else:
            torch.bmm(gt, x[i0:i1], out=out)

    def grad_sum(self, module, x, gy):
        x2, g2 = x.reshape(-1, self.in_features), gy.reshape(-1, self.out_features)
        parts = [g2.t() @ x2]
        if self.bias is not None:
            parts.append(g2.sum(dim=0))
        return parts

    def rows_rest(self, state):
        return None if self.bias is None else state[1].sum(dim=2)

    def _diag_into_2d(self, x, gy, out, nw):
        """`diag_into` for inputs ``x`` ``(n, in)`` and ``gy`` ``(K, n, out)``."""
        # sum the squared output gradients over the K directions first, then one GEMM
        # (einsum would run it as K batched products: 2-3x slower for K = C - 1)
        gy2 = gy[0].square() if gy.shape[0] == 1 else (gy * gy).sum(dim=0)  # (n, out)
        out[:nw].view(self.out_features, self.in_features).addmm_(gy2.t(), x * x)
        if self.bias is not None:
            out[nw:] += gy2.sum(dim=0)
        return out

    def kfac_locations(self, module, x, gy, approx="expand"):
        return x.numel() // max(1, x.shape[0] * x.shape[-1]) if approx == "expand" else 1

    def kfac_factors(self, module, x, gy, approx="expand"):
        """KFAC factors; for inputs ``(n, S, in)`` with ``S`` weight-sharing positions:

        * ``'expand'`` (default): ``A = Σ_{i,s} a aᵀ`` (positions act as examples),
          ``G = Σ_{k,i,s} g gᵀ / S``;
        * ``'reduce'`` (Eschenhagen et al. 2023): ``A = Σ_i ā ā ᵀ`` with ``ā`` the mean over
          positions of the (bias-augmented) inputs of example ``i``, ``G = Σ_{k,i} ĝ ĝᵀ`` with
          ``ĝ`` the sum over positions of the output gradients. It approximates the per-example
          gradient ``Σ_s g_s a_sᵀ`` by ``ĝ āᵀ``, which is exact when the inputs do not depend
          on the position.

        Both give the exact block when ``S = 1``.
        """
        x, gy = self._flatten_positions(x, gy)
        if approx not in ("expand", "reduce"):
            raise ValueError(f"unknown KFAC approximation '{approx}': use 'expand' or 'reduce'")
        if approx == "reduce":
            a = x.mean(dim=1)
            g = gy.sum(dim=2).reshape(-1, gy.shape[-1])
            return GramRows(a, ones_column=self.bias is not None), GramRows(g)
        S = x.shape[1]
        # the bias-augmented inputs (x, 1) are not formed: the Gram accumulator adds the ones
        # column's row/column from the column sums of x (no copy of the inputs)
        x = x.reshape(-1, x.shape[-1])
        g = gy.reshape(-1, gy.shape[-1])
        # 'expand': positions act like examples in A; G sums over positions and is divided by
        # their count so that S = 1 gives the exact block (same rule as for convolutions).
        return GramRows(x, ones_column=self.bias is not None), GramRows(g, 1.0 / S)

    def kfe_diag(self, module, x, gy, UA, UG):
        x, gy = self._flatten_positions(x, gy)
        if x.shape[1] != 1:
            # positions share the weight: the per-example gradient Σ_s g_s ã_sᵀ projects to
            # Σ_s (U_Gᵀ g_s)(U_Aᵀ ã_s)ᵀ, so project the inputs and output gradients per position
            # first, then form the projected per-example gradients by chunks of directions
            if self.bias is not None:
                x = torch.cat([x, x.new_ones(x.shape[:-1] + (1,))], dim=-1)
            xp = x if isinstance(UA, int) else x @ UA
            gp = gy if isinstance(UG, int) else gy @ UG
            return seq_grad_squares(xp, gp)
        x, gy = x[:, 0], gy[:, :, 0]
        if self.bias is not None:
            x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
        # the gradient gy xᵀ is rank one, so in the eigenbasis it is (U_Gᵀ gy)(U_Aᵀ x)ᵀ and its
        # square factors: no per-example gradient is formed
        # squares summed over the directions first, then one GEMM (einsum: 1.7x slower on an MLP);
        # squared in place only when the projection made a tensor of our own
        xp2 = x.square() if isinstance(UA, int) else (x @ UA).square_()
        if isinstance(UG, int):
            gp2 = gy.square().sum(dim=0)
        else:
            gp = gy @ UG
            gp2 = gp[0].square_() if gp.shape[0] == 1 else gp.square_().sum(dim=0)
        return gp2.t() @ xp2
