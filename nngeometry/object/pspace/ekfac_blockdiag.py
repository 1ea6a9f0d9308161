"""``PMatEKFACBlockDiag``: EKFAC for the layers that have KFAC, exact dense blocks for the
others (e.g. layer types without KFAC maths, grouped convolutions)."""
import torch

from . import _spectral
from .blocks import kron
from ._statistics import check_layers, check_tensor
from .ekfac import PMatEKFAC


class PMatEKFACBlockDiag(PMatEKFAC):
    """Block-diagonal over layers: EKFAC blocks (see `PMatEKFAC`) for the layers whose
    layer type computes KFAC factors, the exact dense block ``(1/n) Σ_x J_l(x)ᵀ J_l(x)`` for the
    other layers. Computed in one pass over the data.

    A dense block ``B`` is stored as its eigendecomposition ``B = U diag(d) Uᵀ`` (computed once),
    which makes it an EKFAC block with a trivial input factor, and every operation of PMatEKFAC
    (including exact damping, ``pow``, ``logdet``) applies to it. [`update_diag`][nngeometry.object.pspace.PMatEKFAC.update_diag]
    re-estimates every layer's diagonal in its fixed basis: for a dense layer that is
    ``diag(Uᵀ B' U)`` with ``B'`` the block on the new examples (unchanged when the examples and
    parameters are the same).

    ``data`` is the pair ``(evecs, diags)`` of PMatEKFAC for the EKFAC layers; a dense layer has
    ``evecs[layer_id] = U`` (one ``(p_l, p_l)`` orthogonal matrix, rows in the flat layout) and
    ``diags[layer_id] = d`` (``(p_l,)``): its block is ``U diag(d) Uᵀ``.

    Args:
        data: ``(evecs, diags)`` as above; also accepted: the dict with
            ``{layer_id: (U_A, U_G, D)}`` for EKFAC layers (see PMatEKFAC) and
            ``{layer_id: (U, d)}`` for dense layers.

    The build takes KFAC's ``kfac_approx`` keyword (see PMatKFAC).
    """

    def __init__(self, layer_collection=None, generator=None, data=None, examples=None,
                 **kwargs):
        super().__init__(layer_collection, generator, data=data, examples=examples, **kwargs)

    @classmethod
    def from_mapping(cls, layer_collection, generator, default_representation=None,
                     map_layers_to=None, data=None, examples=None, **kwargs):
        """`PMatMixed.from_mapping <nngeometry.object.pspace.PMatMixed.from_mapping>`
        with this class (EKFAC where the layer type has KFAC, a dense block elsewhere) as the
        default representation and no other mapping by default."""
        from .mixed import PMatMixed

        return PMatMixed.from_mapping(layer_collection, generator, default_representation or cls,
                                      map_layers_to or {}, data=data, examples=examples, **kwargs)

    # upstream's parameter names for this class (PMatEKFAC has mv(vs), vTMv(vector))
    def mv(self, v):
        """``M v`` for a PVector ``v``."""
        return super().mv(v)

    def vTMv(self, v):
        """``vᵀ M v`` for a PVector ``v``."""
        return super().vTMv(v)

    def _public_entry(self, e):
        if self._is_dense(e):
            return e[0], e[1]
        return super()._public_entry(e)

    def _stored_entry(self, lid, basis, diag):
        if torch.is_tensor(basis):
            p = self.layer_collection[lid].numel() if self.layer_collection is not None \
                else basis.shape[0]
            if basis.shape != (p, p) or diag.numel() != p:
                raise ValueError(f"dense layer '{lid}': evecs must be ({p}, {p}) and diags have "
                                 f"{p} values, got {tuple(basis.shape)} and {diag.numel()}")
            return (basis, diag.reshape(-1))
        return super()._stored_entry(lid, basis, diag)

    statistic = "get_kfac_or_layer_blocks"

    def _build(self, examples, eigendecomposition=None, kfac_approx="expand",
               separate_weight_and_bias=False):
        if eigendecomposition is not None:
            raise ValueError("PMatEKFACBlockDiag computes its own bases; eigendecomposition is not "
                             "supported")
        return self._data_from_statistics(
            self.layer_collection,
            self.generator.get_kfac_or_layer_blocks(examples, self.layer_collection,
                                                    approx=kfac_approx),
            separate_weight_and_bias=separate_weight_and_bias)

    @classmethod
    def _check_statistics(cls, layer_collection, statistics, separate_weight_and_bias=False):
        if not (isinstance(statistics, (tuple, list)) and len(statistics) == 2):
            raise TypeError(f"{cls.__name__}.from_statistics: expected the pair (factors, "
                            f"blocks) of get_kfac_or_layer_blocks, got {type(statistics).__name__}")
        factors, blocks = statistics
        check_layers(cls.__name__, layer_collection, {**factors, **blocks},
                     "the factors and blocks")
        for lid, block in blocks.items():
            p = layer_collection[lid].numel()
            check_tensor(cls.__name__, block, (p, p), f"the block of layer '{lid}'")

    @classmethod
    def _data_from_statistics(cls, layer_collection, statistics, separate_weight_and_bias=False):
        """``statistics``: the pair ``(factors, blocks)`` of ``get_kfac_or_layer_blocks``:
        KFAC's ``{layer_id: (A, G)}`` for the layers that have KFAC, the exact
        ``{layer_id: (p_l, p_l)}`` blocks for the others (stored through their
        eigendecompositions)."""
        factors, blocks = statistics
        if separate_weight_and_bias:  # see PMatKFAC: the KFAC layers only
            factors = kron.separate_weight_and_bias(layer_collection, factors)
        data = {}
        for lid in layer_collection.layer_ids():
            if lid in factors:
                data[lid] = cls._entry_from_kfac(factors[lid])
            else:
                evals, U = _spectral.eigh(blocks[lid])
                data[lid] = (U, evals)
        return data

    @staticmethod
    def _is_dense(e):
        # (U, d): a dense block; EKFAC entries have 3 items, multi-block ones are tuples of those
        return not kron.is_multi(e) and len(e) == 2

    @property
    def dense_layers(self):
        """Ids of the layers stored as dense blocks."""
        return [lid for lid, e in self._store.items() if self._is_dense(e)]

    @property
    def ekfac_layers(self):
        """Ids of the layers stored as EKFAC blocks."""
        return [lid for lid, e in self._store.items() if not self._is_dense(e)]

    def _entry(self, lid):
        e = self._store[lid]
        if self._is_dense(e):
            U, d = e
            return (1, U, d.unsqueeze(1))
        return e

    def _perm(self, lid):
        if self._is_dense(self._store[lid]):
            return torch.arange(self.layer_collection[lid].numel())
        return super()._perm(lid)

    def _kfe_request(self, lid):
        if self._is_dense(self._store[lid]):
            return (1, self._store[lid][0], self._perm(lid))
        return super()._kfe_request(lid)

    def _replace_diags(self, diags):
        out = {}
        for lid, e in self._store.items():
            out[lid] = ((e[0], diags[lid].reshape(-1)) if self._is_dense(e)
                        else self._replace_entry(e, diags[lid]))
        return out
