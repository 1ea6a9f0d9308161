"""``PMatBlockDiag``: one dense block per layer, zero between layers (a container of
`DenseBlock`)."""
import torch

from ..._memory import check_fits
from . import _checks
from ._statistics import check_layers, check_tensor
from .abstract import PMatAbstract
from .blocks import DenseBlock


class PMatBlockDiag(PMatAbstract):
    """Block-diagonal approximation of ``M = (1/n) Σ_x J(x)ᵀ J(x)``: the per-layer blocks
    ``M_l = (1/n) Σ_x J_l(x)ᵀ J_l(x)`` (``J_l`` the Jacobian w.r.t. layer ``l``'s parameters,
    weight then bias), cross-layer terms dropped.

    ``data`` is ``{layer_id: (p_l, p_l) tensor}``. Memory ``Σ_l p_l²``; solves, inverses and
    powers act block by block and are exact for this matrix (``(M_l + λI)⁻¹`` per block).
    """

    statistic = "get_covariance_layer_blocks"

    def _build(self, examples, **kwargs):
        _check_blocks_fit(self.layer_collection, self.generator)
        return self._data_from_statistics(
            self.layer_collection,
            self.generator.get_covariance_layer_blocks(examples, self.layer_collection))

    @classmethod
    def _check_statistics(cls, layer_collection, statistics):
        check_layers(cls.__name__, layer_collection, statistics, "the layer blocks")
        for lid in layer_collection.layer_ids():
            p = layer_collection[lid].numel()
            check_tensor(cls.__name__, statistics[lid], (p, p), f"the block of layer '{lid}'")

    @classmethod
    def _data_from_statistics(cls, layer_collection, statistics):
        """``statistics``: ``{layer_id: (p_l, p_l)}``, each layer's block of
        ``(1/n) Σ_x J(x)ᵀ J(x)``, stored as it is."""
        return statistics

    def _new(self, blocks):
        return PMatBlockDiag(self.layer_collection, None, data=blocks)

    def _blocks_items(self):
        """``(layer_id, slice in the flat layout, block)`` in layout order."""
        for lid in self.layer_collection.layer_ids():
            yield lid, self.layer_collection.slice(lid), self.data[lid]

    # ------------------------------------------------------------------ the container
    def _blocks(self):
        """One `DenseBlock` per layer, kept while the blocks are unchanged (the same tensors,
        no in-place change), with their eigendecompositions and the factorizations of the last
        solve (see `DenseBlock.solve`)."""
        return _checks.cached(self.__dict__, "_blocks_cache", "blocks", lambda: [
            DenseBlock(b, name=f"the block of layer '{lid}'") for lid, _, b in self._blocks_items()],
            self.data)

    def _block_keys(self):
        return self.layer_collection.layer_ids()

    def _from_blocks(self, blocks):
        return self._new({lid: b.dense() for lid, b in zip(self._block_keys(), blocks)})

    def _like(self):
        return next(iter(self.data.values()))

    # ------------------------------------------------------------------ products
    # (written once in the base class; upstream's parameter names kept)
    def mv(self, vs):
        return super().mv(vs)

    def vTMv(self, vector):
        return super().vTMv(vector)

    def mm(self, other):
        """Product with another PMatBlockDiag (block by block)."""
        self._check_same_kind(other)
        return self._new({lid: b @ other.data[lid] for lid, _, b in self._blocks_items()})

    # ------------------------------------------------------------------ solves and functions
    # block by block (the base class's): 'default' / 'solve' (LU) and 'cholesky' reuse the
    # factorizations of the last regul, 'eigh' the blocks' eigendecompositions
    _SOLVE_METHODS = {"default": (None, None), "solve": (None, None),
                      "cholesky": (None, "cholesky"), "eigh": (None, "eigh")}

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_blocks_cache", None)  # factorizations, eigendecompositions: recomputable
        return state

    def solve_block(self, d, layer_id, regul=1e-8, solve="default"):
        """``(M_l + regul·I)⁻¹`` applied to the rows of ``d``, a tensor of shape ``(..., p_l)``
        on layer ``layer_id``'s parameters (weight then bias, as in the flat layout); same
        ``solve`` choices and cached factorizations as [`solvePVec`][nngeometry.object.pspace.abstract.PMatAbstract.solvePVec]."""
        if layer_id not in self.data:
            raise KeyError(f"no block for layer '{layer_id}'; the layers are "
                           f"{self.layer_collection.layer_ids()}")
        b = self.data[layer_id]
        if not torch.is_tensor(d) or d.shape[-1:] != b.shape[:1]:
            raise ValueError(
                f"solve_block: d must be a tensor of shape (..., {b.shape[0]}) (layer "
                f"'{layer_id}' has {b.shape[0]} parameters), got "
                f"{tuple(d.shape) if torch.is_tensor(d) else type(d).__name__}")
        damping, method = self._solve_damping(solve, "exact")
        regul, blocks, dampings = self._dampings(regul, "solve_block", damping)
        i = self._block_keys().index(layer_id)
        return blocks[i].solve(d, dampings[i], (type(self).__name__, regul), method or "lu")

    def get_eigendecomposition(self):
        """``{layer_id: (evals ascending, evecs as columns)}`` of each block."""
        return {lid: b.eigh() for lid, b in zip(self._block_keys(), self._blocks())}

    def pinv(self, atol=1e-8):
        """Pseudo-inverse block by block: in each block's eigenbasis the eigenvalues with
        ``|λ| ≤ atol`` are treated as zero, the others inverted."""
        out = {}
        for lid, block in zip(self._block_keys(), self._blocks()):
            evals, evecs = block.eigh()
            keep = evals.abs() > atol
            inv = torch.where(keep, 1.0 / torch.where(keep, evals, torch.ones_like(evals)),
                              torch.zeros_like(evals))
            out[lid] = (evecs * inv) @ evecs.t()
        return self._new(out)

    def get_block_torch(self, layer_id, layer=None, split_weight_bias=True):
        """The dense ``(p_l, p_l)`` block of layer ``layer_id``.

        ``split_weight_bias=True`` (default): rows and columns in the flat layout (weight
        entries, then bias entries). ``False``: in the layer's Kronecker order (for a weight
        ``(out, ...)`` with bias, the row-major ``[W | b]``, the order of KFAC's factors; see
        ``kfac_permutation``). ``layer`` (the layer's spec, as in upstream nngeometry) is
        optional and checked against the collection when given.
        """
        if layer_id not in self.data:
            raise KeyError(f"no block for layer '{layer_id}'; the layers are "
                           f"{self.layer_collection.layer_ids()}")
        spec = self.layer_collection[layer_id]
        if layer is not None and layer != spec:
            raise ValueError(f"layer {layer!r} is not the collection's layer '{layer_id}' ({spec!r})")
        b = self.data[layer_id]
        if split_weight_bias:
            return b
        # flat coordinate i is Kronecker coordinate perm[i]: the Kronecker block puts B[i, j]
        # at (perm[i], perm[j]), i.e. it is B re-indexed by the inverse permutation
        inv = torch.argsort(spec.kfac_permutation()).to(b.device)
        return b[inv][:, inv]


def _check_blocks_fit(layer_collection, generator, limit_bytes=None):
    """Refuse, before the pass over the data, blocks ``Σ_l p_l²`` that can't be allocated (a
    ``MemoryError`` naming the largest layer and the alternatives, instead of the allocator's
    failure)."""
    itemsize = next((p.element_size() for p in generator.model.parameters()), 4) \
        if getattr(generator, "model", None) is not None else 4
    check_blocks_fit(layer_collection, itemsize, "PMatBlockDiag", limit_bytes)


def check_blocks_fit(layer_collection, itemsize, what, limit_bytes=None):
    """``MemoryError`` (with the alternatives) when the dense per-layer blocks ``Σ_l p_l²``
    of ``itemsize`` bytes can't be allocated; ``what`` names who builds them."""
    sizes = {lid: layer_collection[lid].numel() for lid in layer_collection.layer_ids()}
    if not sizes:
        return
    big = max(sizes, key=sizes.get)
    check_fits(sum(p * p for p in sizes.values()) * itemsize,
               f"{what}: dense per-layer blocks (the largest, layer {big!r}, is "
               f"{sizes[big]} × {sizes[big]})",
               "use PMatKFAC or PMatEKFAC (Kronecker factors per layer), PMatDiag, PMatQuasiDiag, "
               "PMatLowRank or PMatImplicit, or PMatMixed with a Kronecker or diagonal "
               "representation for the large layers", limit_bytes=limit_bytes)
