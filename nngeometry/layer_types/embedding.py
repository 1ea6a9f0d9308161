"""``torch.nn.Embedding``: spec and per-layer maths.

An embedding is a Linear layer applied to one-hot inputs: the weight ``(V, D)`` (row ``v`` is
the vector of index ``v``) gets, for an example with indices ``idx_1..idx_S`` and output
gradients ``gy_1..gy_S`` (``D`` each), the gradient ``Σ_s e_{idx_s} gy_sᵀ``: the output
gradients scattered (summed) into the rows of their indices. Rows of ``padding_idx`` get no
gradient; with ``scale_grad_by_freq`` each row is divided by the number of times its index
appears in the example (what autograd does for a batch of one example).

KFAC (``'expand'``, positions as examples, the Linear-on-one-hot rule): the input factor
``A = Σ_{i,s} e_{idx} e_{idx}ᵀ`` is diagonal, the count of each index (``padding_idx``
excluded), returned as a 1-D tensor of length ``V``: never a dense ``V × V``. ``G`` is
``Σ_{k,i,s} gy gyᵀ / S``. The Kronecker order is the Linear one for the transposed weight
``(D, V)``, see `EmbeddingLayer.kfac_permutation`. ``'reduce'`` would make ``A`` dense
(counts per example, outer products) and is refused.
"""
import torch
from torch import nn

from .base import AbstractLayer, Parameter, register_layer_type


@register_layer_type
class EmbeddingLayer(AbstractLayer):
    module_types = (nn.Embedding,)
    supports_kfac = True
    supports_rows = True
    rows_dense = False

    def __init__(self, num_embeddings, embedding_dim):
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.weight = Parameter(num_embeddings, embedding_dim)
        self.bias = None

    @classmethod
    def from_module(cls, module):
        return cls(module.num_embeddings, module.embedding_dim)

    def constant_entries(self, module):
        if module.padding_idx is None:
            return {}
        mask = torch.zeros(self.num_embeddings, 1, dtype=torch.bool, device=module.weight.device)
        mask[module.padding_idx] = True
        return {"weight": mask}

    def _flat(self, module, x, gy):
        """indices ``(n, S)`` and output gradients ``(K, n, S, D)``, with the gradients of
        ``padding_idx`` positions zeroed and the ``scale_grad_by_freq`` division applied."""
        n = x.shape[0]
        idx = x.reshape(n, -1).long()
        K, D = gy.shape[0], self.embedding_dim
        g = gy.reshape(K, n, -1, D)
        if module.padding_idx is not None:
            g = g * (idx != module.padding_idx).to(g.dtype).unsqueeze(-1)
        if module.scale_grad_by_freq:
            counts = torch.zeros(n, self.num_embeddings, dtype=g.dtype, device=g.device)
            counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=g.dtype))
            g = g / counts.gather(1, idx).unsqueeze(-1)
        return idx, g

    def per_example_grad(self, module, x, gy):
        idx, g = self._flat(module, x, gy)
        K, n, S, D = g.shape
        out = g.new_zeros(K, n, self.num_embeddings, D)
        out.scatter_add_(2, idx.view(1, n, S, 1).expand(K, n, S, D), g)
        return out.reshape(K, n, -1)

    # row blocks: row v of example i's gradient is the sum of the output gradients of the
    # positions holding index v (a scatter of at most S rows per example)
    def grad_rows(self):
        return self.num_embeddings, self.embedding_dim

    def rows_prepare(self, module, x, gy):
        return self._flat(module, x, gy)

    def rows_into(self, state, k, i0, i1, r0, r1, out, accumulate):
        idx, g = state
        if not accumulate:
            out.zero_()
        ids = idx[i0:i1]
        sel = (ids >= r0) & (ids < r1)
        ex = sel.nonzero()[:, 0]
        rows = ex * (r1 - r0) + (ids[sel] - r0)
        out.view(-1, out.shape[-1]).index_add_(0, rows, g[k, i0:i1][sel])

    def grad_sum(self, module, x, gy):
        if module.scale_grad_by_freq:
            # autograd divides by the counts over the whole batch, not per example
            return None
        idx, g = self._flat(module, x, gy.unsqueeze(0))
        w = g.new_zeros(self.num_embeddings, self.embedding_dim)
        w.index_add_(0, idx.reshape(-1), g.reshape(-1, self.embedding_dim))
        return [w]

    def diag(self, module, x, gy):
        """Σ_{k,i} (Σ_{s: idx_s = v} gy_s[d])², without the dense per-example gradients:
        positions are first summed per distinct (example, index) pair."""
        idx, g = self._flat(module, x, gy)
        return self._pair_squares(idx, g).reshape(-1)

    def kfe_diag(self, module, x, gy, UA, UG):
        """EKFAC: the input factor is diagonal (identity eigenbasis, ``UA`` an int), so the
        projected per-example gradient ``U_Gᵀ Ĝ`` has column ``v`` equal to
        ``Σ_{s: idx_s = v} U_Gᵀ g_s``: the output gradients are projected per position and
        summed per (example, index) pair as in `diag`; no ``(K, n, V D)`` tensor."""
        if not isinstance(UA, int):
            return super().kfe_diag(module, x, gy, UA, UG)
        idx, g = self._flat(module, x, gy)
        if not isinstance(UG, int):
            g = g @ UG
        return self._pair_squares(idx, g).t().contiguous()  # Kronecker layout (D, V)

    def _pair_squares(self, idx, g):
        """``(V, D)``: Σ over directions and examples of the squared sums of ``g`` ``(K, n, S,
        D)`` over the positions holding each index."""
        K, n, S, D = g.shape
        V = self.num_embeddings
        key = (torch.arange(n, device=idx.device).unsqueeze(1) * V + idx).reshape(-1)
        uniq, inverse = torch.unique(key, return_inverse=True)
        summed = g.new_zeros(K, uniq.numel(), D)
        summed.index_add_(1, inverse, g.reshape(K, n * S, D))
        out = g.new_zeros(V, D)
        out.index_add_(0, uniq % V, (summed * summed).sum(dim=0))
        return out

    def kfac_locations(self, module, x, gy, approx="expand"):
        return x.numel() // max(1, x.shape[0])

    def kfac_factors(self, module, x, gy, approx="expand"):
        if approx == "reduce":
            raise NotImplementedError(
                "the 'reduce' KFAC approximation is not available for Embedding layers: its input "
                "factor would be a dense num_embeddings x num_embeddings matrix; use 'expand'")
        if approx != "expand":
            raise ValueError(f"unknown KFAC approximation '{approx}': use 'expand' or 'reduce'")
        if module.scale_grad_by_freq:
            raise NotImplementedError(
                "KFAC for an Embedding with scale_grad_by_freq=True is not implemented (the "
                "per-example scaling breaks the Kronecker structure); use PMatBlockDiag or PMatDiag")
        n = x.shape[0]
        idx = x.reshape(n, -1).long()
        S = idx.shape[1]
        valid = torch.ones_like(idx, dtype=gy.dtype)
        if module.padding_idx is not None:
            valid = (idx != module.padding_idx).to(gy.dtype)
        A = gy.new_zeros(self.num_embeddings)
        A.index_add_(0, idx.reshape(-1), valid.reshape(-1))
        g = gy.reshape(-1, self.embedding_dim)
        return A, (g.t() @ g) / S

    def kfac_permutation(self):
        """Flat index ``v * D + d`` (weight ``(V, D)`` row-major) is Kronecker index
        ``d * V + v`` of ``kron(G, A)`` (``G``: ``D × D``, ``A``: ``V``)."""
        V, D = self.num_embeddings, self.embedding_dim
        return (torch.arange(D).unsqueeze(0) * V + torch.arange(V).unsqueeze(1)).reshape(-1)
