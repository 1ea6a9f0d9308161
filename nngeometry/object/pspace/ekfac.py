"""``PMatEKFAC``: KFAC's eigenbasis with a re-estimated diagonal (George, Laurent et al., Fast
Approximate Natural Gradient Descent in a Kronecker-factored Eigenbasis, NeurIPS 2018)."""
import torch

from ..map import PFMapDense
from ..vector import PVector
from . import _checks
from ._statistics import check_layers
from ...layer_types.base import check_kfac_support
from .abstract import PMatAbstract, check_same_function, function_origin
from .blocks import EigenKronBlock, kron
from .blocks.eigen_kron import dense_basis
from .eye import PMatEye


def _holds_bases(entry):
    """Whether an entry of a dict over layers holds eigenbases (2-D tensors or int identities,
    possibly per block) rather than eigenvalues or diagonals (1-D tensors)."""
    if isinstance(entry, int):
        return True
    if torch.is_tensor(entry):
        return entry.dim() == 2
    if isinstance(entry, (tuple, list)):
        return any(_holds_bases(e) for e in entry)
    return False


class PMatEKFAC(kron.KronBlocksInLayout, PMatAbstract):
    """EKFAC: per layer ``M_layer ≈ U diag(d) Uᵀ`` with ``U = U_G ⊗ U_A`` the Kronecker-factored
    eigenbasis (KFE) of the layer's KFAC factors and ``d`` a diagonal in that basis.

    Built from examples, ``U_A``, ``U_G`` are the eigenvectors of KFAC's ``A`` and ``G`` and
    ``d = λ_G ⊗ λ_A``: the matrix then equals PMatKFAC. [`update_diag`][nngeometry.object.pspace.PMatEKFAC.update_diag] replaces ``d`` by the
    best diagonal in the fixed basis, ``d = diag(Uᵀ F U) = (1/n) Σ_x Σ_k (Uᵀ J_k(x)ᵀ)²``, the mean
    over examples (summed over the function's outputs) of the squared per-example gradients
    expressed in the eigenbasis.

    ``data`` is upstream nngeometry's pair ``(evecs, diags)`` of dicts over layers:

    * ``evecs[layer_id] = (U_A, U_G)``: orthogonal ``U_A`` (``dA × dA``) and ``U_G``
      (``dG × dG``), eigenvectors as columns, or an int ``d`` for the identity of size ``d``
      (the basis of a diagonal factor, e.g. an Embedding's input factor);
    * ``diags[layer_id]``: the diagonal in that basis, a 1-D tensor of ``dG · dA`` values,
      entry ``p · dA + q`` on the eigenvector ``U_G[:, p] ⊗ U_A[:, q]`` (Kronecker layout, see
      PMatKFAC).

    A layer with several Kronecker blocks (see PMatKFAC) has a tuple of pairs
    ``((U_A_0, U_G_0), (U_A_1, U_G_1), ...)`` in ``evecs`` and a tuple of diagonals in ``diags``.

    Args:
        layer_collection: as for every representation.
        generator: as for every representation.
        examples: as for every representation.
        data: ``(evecs, diags)`` as above (``diags`` entries of any shape with ``dG · dA``
            values, e.g. upstream's ``(dG · dA, 1)``); also accepted: the dict
            ``{layer_id: (U_A, U_G, D)}`` with ``D`` of shape ``(dG, dA)`` (a tuple of those for
            a multi-block layer).
        eigendecomposition: optional bases to reuse instead of computing KFAC on ``examples``:
            ``{layer_id: (U_A, U_G)}``, the pair ``(evals, evecs)`` of
            ``PMatKFAC.get_eigendecomposition()``, an EKFAC's ``(evecs, diags)``, or a PMatKFAC
            / PMatEKFAC; the diagonal is then estimated on ``examples`` as in
            [`update_diag`][nngeometry.object.pspace.PMatEKFAC.update_diag].
        kfac_approx: see PMatKFAC.
        separate_weight_and_bias: see PMatKFAC (the eigenbases are then those of the separated
            factors; the joint ``[W | b]`` stays the default).

    ``solve``/``inverse``/``pow``/``logdet`` with ``regul=λ`` are exact for this matrix:
    ``(M + λI)^x = U diag((d + λ)^x) Uᵀ``.
    """

    def __init__(self, layer_collection=None, generator=None, data=None, examples=None,
                 eigendecomposition=None, kfac_approx="expand", separate_weight_and_bias=False,
                 **kwargs):
        if separate_weight_and_bias:  # only meaningful when the bases come from KFAC factors
            kwargs["separate_weight_and_bias"] = True
        super().__init__(layer_collection, generator, data=data, examples=examples,
                         eigendecomposition=eigendecomposition, kfac_approx=kfac_approx, **kwargs)
        self._check_data()

    # ------------------------------------------------------------------ data
    # Stored as ``_store = {layer_id: (U_A, U_G, D (dG, dA))}`` (tuples of those for multi-block
    # layers): the per-block form every operation uses. ``data`` converts to and from
    # upstream's ``(evecs, diags)``.
    @property
    def data(self):
        """``(evecs, diags)``: see the class docstring."""
        evecs, diags = {}, {}
        for lid, e in self._store.items():
            evecs[lid], diags[lid] = self._public_entry(e)
        return evecs, diags

    @data.setter
    def data(self, value):
        self._store = self._store_from(value)
        self.__dict__.pop("_layout_obj", None)

    @staticmethod
    def _public_entry(e):
        """``(evecs entry, diags entry)`` of one stored layer entry."""
        if kron.is_multi(e):
            return tuple((UA, UG) for UA, UG, _ in e), tuple(D.reshape(-1) for _, _, D in e)
        UA, UG, D = e
        return (UA, UG), D.reshape(-1)

    def _store_from(self, value):
        """The stored form from ``(evecs, diags)`` or from the stored form itself."""
        if isinstance(value, dict):
            return dict(value)
        if not (isinstance(value, (tuple, list)) and len(value) == 2
                and all(isinstance(v, dict) for v in value)):
            raise TypeError(f"{type(self).__name__} data must be the pair (evecs, diags) of dicts "
                            "over layers (see the class docstring), got "
                            f"{type(value).__name__}")
        evecs, diags = value
        if set(evecs) != set(diags):
            raise ValueError(f"evecs and diags name different layers: {sorted(evecs)} vs "
                             f"{sorted(diags)}")
        return {lid: self._stored_entry(lid, evecs[lid], diags[lid]) for lid in evecs}

    def _stored_entry(self, lid, basis, diag):
        """One layer's stored entry from its ``evecs`` and ``diags`` entries."""
        if kron.is_multi(basis):
            if not isinstance(diag, (tuple, list)) or len(diag) != len(basis):
                raise ValueError(f"layer '{lid}' has {len(basis)} Kronecker blocks in evecs: its "
                                 "diags entry must be a tuple of as many diagonals")
            return tuple(self._block_entry(f"layer '{lid}' (block {b})", UA, UG, d)
                         for b, ((UA, UG), d) in enumerate(zip(basis, diag)))
        if not isinstance(basis, (tuple, list)) or len(basis) != 2:
            raise ValueError(f"layer '{lid}': evecs entry must be the pair (U_A, U_G), got "
                             f"{type(basis).__name__}")
        return self._block_entry(f"layer '{lid}'", basis[0], basis[1], diag)

    @staticmethod
    def _block_entry(where, UA, UG, d):
        dA, dG = kron.factor_size(UA), kron.factor_size(UG)
        if d.numel() != dA * dG:
            raise ValueError(f"{where}: the diagonal has {d.numel()} values, the bases need "
                             f"dG · dA = {dG} · {dA} = {dG * dA}")
        return (UA, UG, d.reshape(dG, dA))

    # ------------------------------------------------------------------ building
    statistic = "get_kfac_blocks"

    def _build(self, examples, eigendecomposition=None, kfac_approx="expand",
               separate_weight_and_bias=False):
        lc = self.layer_collection
        check_kfac_support(lc, type(self).__name__)
        if eigendecomposition is not None:
            self._check_bases_options(separate_weight_and_bias)
            statistics = self.generator.get_kfe_diag(self._bases_from(lc, eigendecomposition),
                                                     examples, lc)
        else:
            statistics = self.generator.get_kfac_blocks(examples, lc, approx=kfac_approx)
        return self._data_from_statistics(lc, statistics, eigendecomposition=eigendecomposition,
                                          separate_weight_and_bias=separate_weight_and_bias)

    @classmethod
    def _check_statistics(cls, layer_collection, statistics, eigendecomposition=None,
                          separate_weight_and_bias=False):
        check_kfac_support(layer_collection, cls.__name__)
        check_layers(cls.__name__, layer_collection, statistics,
                     "the Kronecker factors" if eigendecomposition is None else "the diagonals")

    @classmethod
    def _data_from_statistics(cls, layer_collection, statistics, eigendecomposition=None,
                              separate_weight_and_bias=False):
        """``statistics``: KFAC's factors ``{layer_id: (A, G)}`` (``get_kfac_blocks``), whose
        eigendecompositions give the bases and the diagonal ``λ_G ⊗ λ_A``; or, with
        ``eigendecomposition`` (the bases, in any form the constructor takes), the diagonals in
        those bases ``{layer_id: (dG, dA)}`` (``get_kfe_diag``)."""
        if eigendecomposition is not None:
            cls._check_bases_options(separate_weight_and_bias)
            bases = cls._bases_from(layer_collection, eigendecomposition)
            return {lid: cls._replace_entry(b, statistics[lid]) for lid, b in bases.items()}
        if separate_weight_and_bias:
            statistics = kron.separate_weight_and_bias(layer_collection, statistics)
        return {lid: cls._entry_from_kfac(e) for lid, e in statistics.items()}

    @classmethod
    def _check_bases_options(cls, separate_weight_and_bias):
        if separate_weight_and_bias:
            raise ValueError(
                f"{cls.__name__}: separate_weight_and_bias=True chooses how KFAC's "
                "factors are split, but eigendecomposition= gives the bases already; build "
                "the bases from a PMatKFAC(..., separate_weight_and_bias=True) instead")

    @classmethod
    def _entry_from_kfac(cls, entry):
        """A layer's EKFAC entry from its KFAC entry (``(A, G)`` or a tuple of those)."""
        if kron.is_multi(entry):
            return tuple(cls._entry_from_factors(A, G) for A, G in entry)
        return cls._entry_from_factors(*entry)

    @staticmethod
    def _replace_entry(entry, diag):
        """``entry`` (``(U_A, U_G[, ...])`` or a tuple of those) with its diagonal set to
        ``diag`` (a tensor, or a list of tensors for a multi-block entry)."""
        if kron.is_multi(entry):
            return tuple(tuple(e[:2]) + (d,) for e, d in zip(entry, diag))
        return tuple(entry[:2]) + (diag,)

    @staticmethod
    def _entry_from_factors(A, G):
        lA, UA = kron.eig(A)
        lG, UG = kron.eig(G)
        return (UA, UG, torch.outer(lG, lA))

    @classmethod
    def _bases_from(cls, layer_collection, eigendecomposition):
        if hasattr(eigendecomposition, "kronecker_eigenbases"):  # a PMatKFAC
            return eigendecomposition.kronecker_eigenbases()
        if isinstance(eigendecomposition, PMatEKFAC):
            return kron.repack(eigendecomposition._store,
                            {key: tuple(ent[:2]) for key, ent in eigendecomposition._units()})
        if isinstance(eigendecomposition, (tuple, list)) and len(eigendecomposition) == 2 \
                and all(isinstance(v, dict) for v in eigendecomposition):
            # (evals, evecs) of PMatKFAC.get_eigendecomposition(), or an EKFAC's (evecs, diags):
            # the bases are the dict whose entries hold matrices (or int identities)
            first, second = eigendecomposition
            eigendecomposition = second if _holds_bases(next(iter(second.values()), None)) \
                else first
        bases = {}
        for lid in layer_collection.layer_ids():
            e = eigendecomposition[lid]
            bases[lid] = (tuple(tuple(b)[:2] for b in e) if kron.is_multi(e) else tuple(e)[:2])
        return bases

    @classmethod
    def from_kfac(cls, kfac):
        """The EKFAC with ``kfac``'s eigenbases and diagonal ``λ_G ⊗ λ_A`` (equal to ``kfac``)."""
        data = kfac._map_units(lambda key, A, G: kfac._eigen_block(key).as_entry())
        return cls(kfac.layer_collection, kfac.generator, data=data)

    def _check_data(self):
        ids = self.layer_collection.layer_ids()
        if set(self._store) != set(ids):
            raise ValueError(f"{type(self).__name__} data must have one entry per layer {ids}, "
                             f"got {list(self._store)}")
        for lid in ids:
            blocks = self._entries(lid)
            for b, (UA, UG, D) in enumerate(blocks):
                where = f"layer '{lid}'" + (f" (block {b})" if len(blocks) > 1 else "")
                if tuple(D.shape) != (kron.factor_size(UG), kron.factor_size(UA)):
                    raise ValueError(
                        f"{where}: diagonal of shape {tuple(D.shape)} does not match the bases "
                        f"(dG={kron.factor_size(UG)}, dA={kron.factor_size(UA)}); expected ({kron.factor_size(UG)}, {kron.factor_size(UA)})")

    # hooks for PMatEKFACBlockDiag, whose dense layers are stored differently
    def _entry(self, lid):
        """``(U_A, U_G, D)`` of a single-block layer."""
        return self._store[lid]

    def _entries(self, lid):
        """The ``(U_A, U_G, D)`` of each Kronecker block of a layer, in layout order."""
        e = self._store[lid]
        return list(e) if kron.is_multi(e) else [self._entry(lid)]

    def _units(self):
        """``(unit key, (U_A, U_G, D))`` for every Kronecker block (unit keys: see `kron.Unit`)."""
        return [(kron.Unit(lid, b), ent) for lid in self._store
                for b, ent in enumerate(self._entries(lid))]

    def _unit(self, key):
        return self._entries(key.layer)[key.index]

    def _perm(self, lid):
        return self.layer_collection[lid].kfac_permutation()

    def _kfe_request(self, lid):
        e = self._store[lid]
        if kron.is_multi(e):
            return tuple((UA, UG) for UA, UG, _ in e)
        UA, UG, _ = self._entry(lid)
        return (UA, UG)

    def _replace_diags(self, diags):
        """``data`` with each layer's ``D`` replaced by ``diags[lid]`` (a list of ``D_b`` for a
        multi-block layer)."""
        return {lid: self._replace_entry(self._store[lid] if kron.is_multi(self._store[lid])
                                         else self._entry(lid), diags[lid]) for lid in self._store}

    def _map_diags(self, fn, with_layer=False):
        """``{lid: D'}`` (lists for multi-block layers) with ``D' = fn(D)`` per block
        (``fn(lid, D)`` with ``with_layer``)."""
        out = {}
        for lid, e in self._store.items():
            ds = [fn(lid, D) if with_layer else fn(D) for _, _, D in self._entries(lid)]
            out[lid] = ds if kron.is_multi(e) else ds[0]
        return out

    def _with_diags(self, diags):
        """The same representation with each layer's ``D`` replaced by ``diags[lid]``."""
        return type(self)(self.layer_collection, self.generator, data=self._replace_diags(diags))

    @property
    def _layout(self):
        lay = self.__dict__.get("_layout_obj")
        if lay is None:
            dims = {}
            for lid, e in self._store.items():
                sizes = [tuple(D.shape) for _, _, D in self._entries(lid)]
                dims[lid] = sizes if kron.is_multi(e) else sizes[0]
            perms = {lid: self._perm(lid) for lid in self.layer_collection.layer_ids()}
            lay = self._layout_obj = kron.Layout(self.layer_collection, dims, perms)
        return lay

    @property
    def dtype(self):
        return self._units()[0][1][2].dtype

    def update_diag(self, examples):
        """Re-estimate the diagonal in the (fixed) eigenbasis with the model's current
        parameters: ``D = (1/n) Σ_x Σ_k (U_Gᵀ Ĝ_k(x) U_A)²`` (see the class docstring)."""
        if not hasattr(self.generator, "get_kfe_diag"):
            raise AttributeError(
                f"update_diag needs this {type(self).__name__}'s Jacobian generator, which it does "
                "not have: a generator holds the model and its function and is not pickled, so an "
                "unpickled matrix has none. Set matrix.generator = "
                "TorchHooksJacobianBackend(model, function) (the same function as when it was "
                "built), then call update_diag again")
        check_same_function(self, type(self).__name__)
        req = {lid: self._kfe_request(lid) for lid in self._store}
        diags = self.generator.get_kfe_diag(req, examples, self.layer_collection)
        self._store = self._replace_diags(diags)

    # ------------------------------------------------------------------ per-layer machinery
    def _apply(self, flat, fn):
        parts = self._layout.split(flat)
        return self._layout.join({lid: fn(lid, V) for lid, V in parts.items()})

    def get_KFE(self, layer_id=None, layer=None, split_weight_bias=True):
        """The dense eigenbasis ``U_G ⊗ U_A`` of a layer (``(p_l, p_l)``, eigenvectors as
        columns, column ``p·dA + q`` for ``D[p, q]``), rows in the flat layout
        (``split_weight_bias=True``) or the Kronecker layout; ``layer_id=None``: a dict over
        layers. ``layer`` is accepted for compatibility and ignored. For a multi-block layer the
        basis is block-diagonal (``block_diag(U_G_0 ⊗ U_A_0, ...)`` in the Kronecker layout) and
        its columns follow the concatenated ``D_b.reshape(-1)``."""
        if layer_id is None:
            return {lid: self.get_KFE(lid, split_weight_bias=split_weight_bias) for lid in self._store}
        _checks.check_dense_fits(self.layer_collection[layer_id].numel(),
                                 self._layer_diag(layer_id).element_size(),
                                 what=f"the eigenbasis of layer '{layer_id}': a dense")
        U = torch.block_diag(*[
            torch.kron(dense_basis(UG, D).contiguous(), dense_basis(UA, D).contiguous())
            for UA, UG, D in self._entries(layer_id)])
        return self._layout.to_flat_order(layer_id, U) if split_weight_bias else U

    def _layer_diag(self, lid):
        """A layer's diagonal in its eigenbasis, flat in the column order of [`get_KFE`][nngeometry.object.pspace.PMatEKFAC.get_KFE]."""
        return torch.cat([D.reshape(-1) for _, _, D in self._entries(lid)])

    # ------------------------------------------------------------------ the container
    # one EigenKronBlock per Kronecker unit (a layer, or each block of a multi-block layer), in
    # the layer's Kronecker layout; every operation below that is not written here is the base
    # class's, from the blocks' primitives
    _flat_layouts = False
    _per_entry_exact = False

    def _blocks(self):
        # kept while the stored entries are unchanged, with what each block computed once
        return _checks.cached(self.__dict__, "_blocks_cache", "blocks",
                              lambda: [EigenKronBlock(*ent) for _, ent in self._units()],
                              self._store)

    def _from_blocks(self, blocks):
        """The same eigenbases with each block's new ``D``."""
        diags = {}
        for (key, _), b in zip(self._units(), blocks):
            diags.setdefault(key.layer, []).append(b.D)
        return self._with_diags({lid: ds if kron.is_multi(self._store[lid]) else ds[0]
                                 for lid, ds in diags.items()})

    def _like(self):
        return self._units()[0][1][2]

    # ------------------------------------------------------------------ products
    def mv(self, vs):
        """``M v`` for a PVector ``vs``: ``U (D ∘ (Uᵀ v))`` per layer."""
        return super().mv(vs)

    def vTMv(self, vector):
        """``vᵀ M v = Σ D ∘ (Uᵀ v)²`` for a PVector ``vector``."""
        return super().vTMv(vector)

    # ------------------------------------------------------------------ solves and functions
    # the base class's, from the blocks: exact damping in the eigenbasis, ``U (D + λ_l)^p Uᵀ``
    # per layer (``regul``: a scalar ``λ``, a per-layer dict ``{layer_id: λ_l}`` with the layers
    # left out at 0, or a PMatEye; a per-parameter ``Λ`` raises NotImplementedError)
    _SOLVE_METHODS = {"default": (None, None), "solve": (None, None), "eigh": (None, None)}

    def pow(self, pow, regul=0.0, impl="default", damping="exact"):
        """``(M + regul·I)^pow = U diag((D + regul)^pow) Uᵀ`` (values below 0, round-off, are
        clipped to 0 for fractional ``pow``). ``impl``: only ``'default'`` (upstream's
        parameter; the power is always taken on the diagonal)."""
        if impl != "default":
            raise ValueError(f"unknown impl '{impl}' for {type(self).__name__}.pow: use 'default'")
        return super().pow(pow, regul, damping)

    def pinv(self, atol=1e-8):
        """The Moore-Penrose pseudo-inverse ``U diag(D⁺) Uᵀ``, with ``D⁺ = 1/D`` where
        ``|D| > atol`` and 0 elsewhere (eigenvalues at most ``atol`` in absolute value are
        treated as zero). Same representation."""
        def f(D):
            keep = D.abs() > atol
            return torch.where(keep, 1.0 / torch.where(keep, D, torch.ones_like(D)),
                               torch.zeros_like(D))

        return self._with_diags(self._map_diags(f))

    # ------------------------------------------------------------------ reductions
    def get_diag(self, v=None, split_weight_bias=True):
        """Diagonal ``(P,)``: per layer ``(U_G∘U_G) D (U_A∘U_A)ᵀ``, in the flat layout
        (``split_weight_bias=True``) or each layer's Kronecker layout. ``v`` is upstream's
        (unused) first parameter: leave it None."""
        if v is not None:
            raise TypeError(f"{type(self).__name__}.get_diag takes no vector (v must be None); "
                            "pass split_weight_bias by keyword: get_diag(split_weight_bias=False)")
        parts = []
        for lid in self._store:
            d = torch.cat([EigenKronBlock(*ent).diagonal().reshape(-1)
                           for ent in self._entries(lid)])
            parts.append(self._layout.to_flat_order(lid, d) if split_weight_bias else d)
        return torch.cat(parts)

    def get_block_torch(self, layer_id, layer=None, split_weight_bias=True):
        """The dense ``(p_l, p_l)`` block ``U diag(D) Uᵀ`` of layer ``layer_id``, in the flat
        order (``split_weight_bias=True``) or the Kronecker order. ``layer`` is accepted for
        compatibility and not needed."""
        if layer_id not in self._store:
            raise KeyError(f"no layer '{layer_id}' in this matrix; its layers are "
                           f"{self.layer_collection.layer_ids()}")
        U = self.get_KFE(layer_id, split_weight_bias=split_weight_bias)
        return (U * self._layer_diag(layer_id)) @ U.t()

    def to_torch(self, split_weight_bias=True):
        """Dense ``(P, P)``; inside a layer the flat order (``split_weight_bias=True``) or the
        Kronecker order (see `get_block_torch`)."""
        P = self.layer_collection.numel()
        _checks.check_dense_fits(P, self.get_diag().element_size(),
                                 what=f"{type(self).__name__}.to_torch(): a dense")
        out = None
        for lid in self._store:
            B = self.get_block_torch(lid, split_weight_bias=split_weight_bias)
            if out is None:
                out = torch.zeros(P, P, dtype=B.dtype, device=B.device)
            s = self.layer_collection.slice(lid)
            out[s, s] = B
        return out

    # ------------------------------------------------------------------ arithmetic
    def _same_basis(self, other):
        self._check_same_kind(other)
        for (key, a), (_, b) in zip(self._units(), other._units()):
            lid = key.layer
            for U1, U2 in ((a[0], b[0]), (a[1], b[1])):
                if U1 is U2:
                    continue
                if isinstance(U1, int) or isinstance(U2, int) or U1.shape != U2.shape \
                        or not torch.equal(U1, U2):
                    raise NotImplementedError(
                        f"the two {type(self).__name__} have different eigenbases on layer "
                        f"'{lid}': their sum/product is not diagonal in one basis; use to_torch() "
                        "(dense) or PMatDense")

    def _add_blocks(self, other, sign=1.0):
        """Sums of two matrices sharing their eigenbases (e.g. ``M + c·M``): ``D₁ ± D₂``; with a
        `PMatEye` ``s·I`` (a prior precision): ``D ± s`` (the eigenbases are complete)."""
        if not isinstance(other, PMatEye):
            self._same_basis(other)  # the error names the layer
        return super()._add_blocks(other, sign)

    def _zip_diags(self, other, fn):
        """``{lid: fn(D₁, D₂)}`` per block (lists for multi-block layers)."""
        out = {}
        for lid, e in self._store.items():
            ds = [fn(a[2], b[2]) for a, b in zip(self._entries(lid), other._entries(lid))]
            out[lid] = ds if kron.is_multi(e) else ds[0]
        return out

    def mm(self, other):
        """Product of two matrices sharing their eigenbases: ``D₁ ∘ D₂``."""
        self._same_basis(other)
        return self._with_diags(self._zip_diags(other, lambda D1, D2: D1 * D2))

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_layout_obj", None)
        # the generator is dropped: its function's description is kept (see update_diag)
        origin = function_origin(self.generator)
        if origin is not None:
            state["_function_origin"] = origin
        return state

