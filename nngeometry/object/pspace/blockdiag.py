"""``PMatBlockDiag``: one dense block per layer, zero between layers (a container of
`DenseBlock`)."""
import functools

import torch

from ..._memory import check_fits
from ..map import PFMapDense
from ..vector import PVector
from . import _checks, _spectral
from ._prior import PARAM, scalar_or_prior
from .abstract import PMatAbstract
from .blocks import DenseBlock


class PMatBlockDiag(PMatAbstract):
    """Block-diagonal approximation of ``M = (1/n) Σ_x J(x)ᵀ J(x)``: the per-layer blocks
    ``M_l = (1/n) Σ_x J_l(x)ᵀ J_l(x)`` (``J_l`` the Jacobian w.r.t. layer ``l``'s parameters,
    weight then bias), cross-layer terms dropped.

    ``data`` is ``{layer_id: (p_l, p_l) tensor}``. Memory ``Σ_l p_l²``; solves, inverses and
    powers act block by block and are exact for this matrix (``(M_l + λI)⁻¹`` per block).
    """

    def _build(self, examples, **kwargs):
        _check_blocks_fit(self.layer_collection, self.generator)
        return self.generator.get_covariance_layer_blocks(examples, self.layer_collection)

    def _new(self, blocks):
        return PMatBlockDiag(self.layer_collection, None, data=blocks)

    def _blocks_items(self):
        """``(layer_id, slice in the flat layout, block)`` in layout order."""
        for lid in self.layer_collection.layer_ids():
            yield lid, self.layer_collection.slice(lid), self.data[lid]

    def _eye_like(self, b):
        return torch.eye(b.shape[0], dtype=b.dtype, device=b.device)

    # ------------------------------------------------------------------ the container
    def _blocks(self):
        """One `DenseBlock` per layer, sharing the cached eigendecompositions."""
        return [DenseBlock(b, functools.partial(self._block_eigh, lid, b))
                for lid, _, b in self._blocks_items()]

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
    def _block_eigh(self, lid, b):
        """The eigendecomposition of block ``lid``, computed once, and again when the block is
        replaced or changed in place (see ``_checks.cached``)."""
        cache = self.__dict__.setdefault("_eigh_cache", {})
        return _checks.cached(cache, lid, "eigh", lambda: _spectral.eigh(b), b)

    def _regul(self, regul, what):
        """``regul`` as given for a scalar ``λ`` (``Λ = λI``), else the normalised per-layer /
        per-parameter `Prior`."""
        scalar, prior = scalar_or_prior(regul, self.layer_collection, "PMatBlockDiag", what)
        return scalar if prior is None else prior

    @staticmethod
    def _block_regul(regul, lid):
        """The scalar damping of block ``lid``, or None for a per-parameter ``Λ``."""
        if not hasattr(regul, "kind"):
            return regul
        return None if regul.kind == PARAM else regul.layer_value(lid)

    def _damped_block(self, lid, b, regul):
        """``M_l + Λ_l``."""
        lam = self._block_regul(regul, lid)
        if lam is None:
            return b + torch.diag(regul.layer_slice(lid, b))
        return b + lam * self._eye_like(b)

    def _damped_block_eig(self, lid, b, regul):
        """Eigendecomposition of ``M_l + Λ_l``: the block's cached one shifted by ``λ_l``
        (scalar or per-layer ``Λ``: reused for every new value), or that of ``M_l + Λ_l``
        (per-parameter)."""
        lam = self._block_regul(regul, lid)
        if lam is None:
            return _spectral.eigh(self._damped_block(lid, b, regul))
        evals, evecs = self._block_eigh(lid, b)
        return evals + lam, evecs

    def _check_invertible(self, regul, what):
        """Refuse an undamped (``regul <= 0``) operation on a singular block (shared
        singular-matrix error), through the blocks' cached eigenvalues."""
        if not _checks._float(regul) > 0:
            for lid, _, b in self._blocks_items():
                _checks.check_invertible(self._damped_block_eig(lid, b, regul)[0], "PMatBlockDiag",
                                         what, regul, detail=f"block of layer '{lid}' is singular")

    def _factorizations(self, regul, solve):
        """``{layer_id: factorization of M_l + regul·I}`` ('lu': ``lu_factor``, 'cholesky': the
        lower Cholesky factor), computed once per ``(solve, regul)`` (in float32 for a
        half-precision matrix).

        Cache policy (as PMatDense): only the last ``(solve, regul)`` is kept (the factors take
        as much memory as the blocks); a later solve with the same regul costs triangular solves
        (about one ``mv``). Keyed on the blocks themselves (tensors and version counters): a
        replaced or in-place-updated block refactorizes. Not pickled (see ``__getstate__``)."""
        if solve not in ("lu", "cholesky"):
            raise ValueError(f"unknown factorization '{solve}'")

        def compute():
            facs = {}
            for lid, _, b in self._blocks_items():
                A = _checks.upcast(self._damped_block(lid, b, regul))
                try:
                    facs[lid] = (torch.linalg.cholesky(A) if solve == "cholesky"
                                 else torch.linalg.lu_factor(A))
                except torch.linalg.LinAlgError as e:
                    if solve == "cholesky":
                        raise ValueError(
                            f"PMatBlockDiag.solve(solve='cholesky'): the block of layer '{lid}' "
                            f"plus regul·I is not positive definite at regul={_checks._float(regul):.3g} "
                            f"(torch: {str(e).splitlines()[0]}); pass a larger regul > 0, or "
                            "solve='solve' (LU) for an indefinite matrix") from None
                    raise _checks.singular_error("PMatBlockDiag", "solve", regul,
                                                 f"block of layer '{lid}' is singular") from None
                del A
            return facs

        blocks = [b for _, _, b in self._blocks_items()]
        return _checks.cached(self.__dict__, "_solve_cache", (solve, _checks.regul_key(regul)),
                              compute, blocks)

    def __getstate__(self):
        state = super().__getstate__()
        # factorizations and eigendecompositions: as large as the blocks and recomputable
        state.pop("_solve_cache", None)
        state.pop("_eigh_cache", None)
        return state

    def _solver(self, regul, solve):
        """``solve_block(lid, b, rhs) = (M_l + regul I)⁻¹ rhs`` for columns ``rhs`` ``(p_l, m)``,
        reusing cached factorizations ('solve' is LU with partial pivoting, the same result as
        ``torch.linalg.solve``). ``regul <= 0`` with a singular block is refused."""
        if solve not in ("default", "solve", "cholesky", "eigh"):
            raise ValueError(f"unknown solve '{solve}': use 'solve', 'cholesky' or 'eigh'")
        self._check_invertible(regul, "solve")
        if solve in ("default", "solve"):
            facs = self._factorizations(regul, "lu")
            return lambda lid, b, rhs: torch.linalg.lu_solve(
                *facs[lid], _checks.upcast(rhs)).to(rhs.dtype)
        if solve == "cholesky":
            facs = self._factorizations(regul, "cholesky")
            return lambda lid, b, rhs: torch.cholesky_solve(
                _checks.upcast(rhs), facs[lid]).to(rhs.dtype)

        def solve_block(lid, b, rhs):
            evals, evecs = self._damped_block_eig(lid, b, regul)
            return evecs @ ((evecs.t() @ rhs) / evals.unsqueeze(1))
        return solve_block

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
        rows = d.reshape(-1, b.shape[0])
        regul = self._regul(regul, "solve_block")
        out = self._solver(regul, solve)(layer_id, b, rows.t()).t()
        return out.reshape(d.shape)

    def solvePVec(self, x, regul=1e-8, solve="default", damping="exact"):
        """``(M_l + Λ_l)⁻¹ x_l`` for every layer ``l`` (exact); ``regul`` gives ``Λ``: a scalar
        ``λ`` (``λI``), a dict ``{layer_id: λ_l}``, a PVector (one value per parameter), a
        PMatEye or a PMatDiag. The factorizations of the last ``(solve, regul)`` are kept (see
        ``_factorizations``)."""
        self._check_damping(damping, "solve")
        self._check_pvector(x)
        regul = self._regul(regul, "solve")
        f = x.get_flat_representation()
        solve_block = self._solver(regul, solve)
        out = [solve_block(lid, b, f[s].unsqueeze(1)).squeeze(1) for lid, s, b in self._blocks_items()]
        return PVector(self.layer_collection, vector_repr=torch.cat(out))

    def solvePFMap(self, x, regul=1e-8, solve="default", damping="exact"):
        """The same, for every row of a PFMap."""
        self._check_damping(damping, "solve")
        self._check_pfmap(x)
        regul = self._regul(regul, "solve")
        J = x.to_torch()
        K, n, _ = J.shape
        solve_block = self._solver(regul, solve)
        out = []
        for lid, s, b in self._blocks_items():
            rhs = J[:, :, s].reshape(K * n, -1).t()
            out.append(solve_block(lid, b, rhs).t().reshape(K, n, -1))
        return PFMapDense(self.layer_collection, data=torch.cat(out, dim=2))

    def get_eigendecomposition(self):
        """``{layer_id: (evals ascending, evecs as columns)}`` of each block."""
        return {lid: self._block_eigh(lid, b) for lid, _, b in self._blocks_items()}

    def pinv(self, atol=1e-8):
        """Pseudo-inverse block by block: in each block's eigenbasis the eigenvalues with
        ``|λ| ≤ atol`` are treated as zero, the others inverted."""
        out = {}
        for lid, _, b in self._blocks_items():
            evals, evecs = self._block_eigh(lid, b)
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

    # ------------------------------------------------------------------ arithmetic
    def __add__(self, other):
        return self._add_blocks(other)

    __radd__ = __add__

    def __sub__(self, other):
        return self._add_blocks(other, -1.0)


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
