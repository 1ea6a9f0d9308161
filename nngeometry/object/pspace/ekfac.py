"""``PMatEKFAC``: KFAC's eigenbasis with a re-estimated diagonal (George, Laurent et al., Fast
Approximate Natural Gradient Descent in a Kronecker-factored Eigenbasis, NeurIPS 2018)."""
import torch

from ..map import PFMapDense
from ..vector import PVector
from . import _kron as K
from .abstract import PMatAbstract
from .eye import PMatEye
from .kfac import check_kfac_support


class PMatEKFAC(PMatAbstract):
    """EKFAC: per layer ``M_layer ≈ U diag(d) Uᵀ`` with ``U = U_G ⊗ U_A`` the Kronecker-factored
    eigenbasis (KFE) of the layer's KFAC factors and ``d`` a diagonal in that basis.

    Built from examples, ``U_A``, ``U_G`` are the eigenvectors of KFAC's ``A`` and ``G`` and
    ``d = λ_G ⊗ λ_A``: the matrix then equals PMatKFAC. :meth:`update_diag` replaces ``d`` by the
    best diagonal in the fixed basis, ``d = diag(Uᵀ F U) = (1/n) Σ_x Σ_k (Uᵀ J_k(x)ᵀ)²``, the mean
    over examples (summed over the function's outputs) of the squared per-example gradients
    expressed in the eigenbasis.

    Args:
        layer_collection, generator, examples: as for every representation.
        data: ``{layer_id: (U_A, U_G, D)}``: orthogonal ``U_A`` (``dA × dA``) and ``U_G``
            (``dG × dG``), eigenvectors as columns, or an int ``d`` for the identity of size ``d``
            (the basis of a diagonal factor); ``D`` of shape ``(dG, dA)``, ``D[p, q]`` the value
            on the eigenvector ``U_G[:, p] ⊗ U_A[:, q]`` (Kronecker layout, see PMatKFAC). A
            layer with several Kronecker blocks (see PMatKFAC) has the tuple
            ``((U_A_0, U_G_0, D_0), (U_A_1, U_G_1, D_1), ...)``.
        eigendecomposition: optional ``{layer_id: (U_A, U_G)}`` (or a PMatKFAC / PMatEKFAC, whose
            eigenbases are taken): reuse that basis instead of computing KFAC on ``examples``; the
            diagonal is then estimated on ``examples`` as in :meth:`update_diag`.
        kfac_approx: see PMatKFAC.

    ``solve``/``inverse``/``pow``/``logdet`` with ``regul=λ`` are exact for this matrix:
    ``(M + λI)^x = U diag((d + λ)^x) Uᵀ``.
    """

    def __init__(self, layer_collection, generator, data=None, examples=None,
                 eigendecomposition=None, kfac_approx="expand", **kwargs):
        super().__init__(layer_collection, generator, data=data, examples=examples,
                         eigendecomposition=eigendecomposition, kfac_approx=kfac_approx, **kwargs)
        self._check_data()

    # ------------------------------------------------------------------ building
    def _build(self, examples, eigendecomposition=None, kfac_approx="expand"):
        check_kfac_support(self.layer_collection, type(self).__name__)
        if eigendecomposition is not None:
            bases = self._bases_from(eigendecomposition)
            diags = self.generator.get_kfe_diag(bases, examples, self.layer_collection)
            return {lid: self._replace_entry(b, diags[lid]) for lid, b in bases.items()}
        kfac = self.generator.get_kfac_blocks(examples, self.layer_collection, approx=kfac_approx)
        return {lid: self._entry_from_kfac(e) for lid, e in kfac.items()}

    @classmethod
    def _entry_from_kfac(cls, entry):
        """A layer's EKFAC entry from its KFAC entry (``(A, G)`` or a tuple of those)."""
        if K.is_multi(entry):
            return tuple(cls._entry_from_factors(A, G) for A, G in entry)
        return cls._entry_from_factors(*entry)

    @staticmethod
    def _replace_entry(entry, diag):
        """``entry`` (``(U_A, U_G[, ...])`` or a tuple of those) with its diagonal set to
        ``diag`` (a tensor, or a list of tensors for a multi-block entry)."""
        if K.is_multi(entry):
            return tuple(tuple(e[:2]) + (d,) for e, d in zip(entry, diag))
        return tuple(entry[:2]) + (diag,)

    @staticmethod
    def _entry_from_factors(A, G):
        lA, UA = K.eig(A)
        lG, UG = K.eig(G)
        return (UA, UG, torch.outer(lG, lA))

    def _bases_from(self, eigendecomposition):
        from .kfac import PMatKFAC

        if isinstance(eigendecomposition, PMatKFAC):
            return K.repack(eigendecomposition.data, {
                key: (eA[1], eG[1]) for key, (eA, eG) in
                ((key, eigendecomposition._eig(key)) for key, _, _ in eigendecomposition._units())})
        if isinstance(eigendecomposition, PMatEKFAC):
            return K.repack(eigendecomposition.data,
                            {key: tuple(ent[:2]) for key, ent in eigendecomposition._units()})
        bases = {}
        for lid in self.layer_collection.layer_ids():
            e = eigendecomposition[lid]
            bases[lid] = (tuple(tuple(b)[:2] for b in e) if K.is_multi(e) else tuple(e)[:2])
        return bases

    @classmethod
    def from_kfac(cls, kfac):
        """The EKFAC with ``kfac``'s eigenbases and diagonal ``λ_G ⊗ λ_A`` (equal to ``kfac``)."""
        data = kfac._map_units(lambda key, A, G: (kfac._eig(key)[0][1], kfac._eig(key)[1][1],
                                                  torch.outer(kfac._eig(key)[1][0],
                                                              kfac._eig(key)[0][0])))
        return cls(kfac.layer_collection, kfac.generator, data=data)

    def _check_data(self):
        ids = self.layer_collection.layer_ids()
        if set(self.data) != set(ids):
            raise ValueError(f"{type(self).__name__} data must have one entry per layer {ids}, "
                             f"got {list(self.data)}")
        for lid in ids:
            blocks = self._entries(lid)
            for b, (UA, UG, D) in enumerate(blocks):
                where = f"layer '{lid}'" + (f" (block {b})" if len(blocks) > 1 else "")
                if tuple(D.shape) != (K.fdim(UG), K.fdim(UA)):
                    raise ValueError(
                        f"{where}: diagonal of shape {tuple(D.shape)} does not match the bases "
                        f"(dG={K.fdim(UG)}, dA={K.fdim(UA)}); expected ({K.fdim(UG)}, {K.fdim(UA)})")

    # hooks for PMatEKFACBlockDiag, whose dense layers are stored differently
    def _entry(self, lid):
        """``(U_A, U_G, D)`` of a single-block layer."""
        return self.data[lid]

    def _entries(self, lid):
        """The ``(U_A, U_G, D)`` of each Kronecker block of a layer, in layout order."""
        e = self.data[lid]
        return list(e) if K.is_multi(e) else [self._entry(lid)]

    def _units(self):
        """``(unit key, (U_A, U_G, D))`` for every Kronecker block (unit keys: see ``_kron``)."""
        out = []
        for lid, e in self.data.items():
            multi = K.is_multi(e)
            for b, ent in enumerate(self._entries(lid)):
                out.append(((lid, b) if multi else lid, ent))
        return out

    def _unit(self, key):
        if isinstance(key, tuple):
            return self.data[key[0]][key[1]]
        return self._entry(key)

    def _perm(self, lid):
        return self.layer_collection[lid].kfac_permutation()

    def _kfe_request(self, lid):
        e = self.data[lid]
        if K.is_multi(e):
            return tuple((UA, UG) for UA, UG, _ in e)
        UA, UG, _ = self._entry(lid)
        return (UA, UG)

    def _replace_diags(self, diags):
        """``data`` with each layer's ``D`` replaced by ``diags[lid]`` (a list of ``D_b`` for a
        multi-block layer)."""
        return {lid: self._replace_entry(self.data[lid] if K.is_multi(self.data[lid])
                                         else self._entry(lid), diags[lid]) for lid in self.data}

    def _map_diags(self, fn):
        """``{lid: D'}`` (lists for multi-block layers) with ``D' = fn(D)`` per block."""
        out = {}
        for lid, e in self.data.items():
            ds = [fn(D) for _, _, D in self._entries(lid)]
            out[lid] = ds if K.is_multi(e) else ds[0]
        return out

    def _with_diags(self, diags):
        """The same representation with each layer's ``D`` replaced by ``diags[lid]``."""
        return type(self)(self.layer_collection, self.generator, data=self._replace_diags(diags))

    @property
    def _layout(self):
        lay = self.__dict__.get("_layout_obj")
        if lay is None:
            dims = {}
            for lid, e in self.data.items():
                sizes = [tuple(D.shape) for _, _, D in self._entries(lid)]
                dims[lid] = sizes if K.is_multi(e) else sizes[0]
            perms = {lid: self._perm(lid) for lid in self.layer_collection.layer_ids()}
            lay = self._layout_obj = K.Layout(self.layer_collection, dims, perms)
        return lay

    @property
    def dtype(self):
        return self._units()[0][1][2].dtype

    def update_diag(self, examples):
        """Re-estimate the diagonal in the (fixed) eigenbasis with the model's current
        parameters: ``D = (1/n) Σ_x Σ_k (U_Gᵀ Ĝ_k(x) U_A)²`` (see the class docstring)."""
        if self.generator is None:
            raise ValueError("update_diag needs a generator (it was dropped when pickling); set "
                             "matrix.generator = TorchHooksJacobianBackend(model, function)")
        req = {lid: self._kfe_request(lid) for lid in self.data}
        diags = self.generator.get_kfe_diag(req, examples, self.layer_collection)
        self.data = self._replace_diags(diags)

    # ------------------------------------------------------------------ per-layer machinery
    def _apply(self, flat, fn):
        parts = self._layout.split(flat)
        return self._layout.join({lid: fn(lid, V) for lid, V in parts.items()})

    def _scale_layer(self, key, V, f=None):
        """``U f(D) Uᵀ`` applied to ``V`` (``f`` default identity), for one unit."""
        UA, UG, D = self._unit(key)
        W = K.to_kfe(V, UA, UG)
        return K.from_kfe(W * (D if f is None else f(D)), UA, UG)

    def get_KFE(self, layer_id=None, layer=None, split_weight_bias=True):
        """The dense eigenbasis ``U_G ⊗ U_A`` of a layer (``(p_l, p_l)``, eigenvectors as
        columns, column ``p·dA + q`` for ``D[p, q]``), rows in the flat layout
        (``split_weight_bias=True``) or the Kronecker layout; ``layer_id=None``: a dict over
        layers. ``layer`` is accepted for compatibility and ignored. For a multi-block layer the
        basis is block-diagonal (``block_diag(U_G_0 ⊗ U_A_0, ...)`` in the Kronecker layout) and
        its columns follow the concatenated ``D_b.reshape(-1)``."""
        if layer_id is None:
            return {lid: self.get_KFE(lid, split_weight_bias=split_weight_bias) for lid in self.data}
        U = torch.block_diag(*[
            torch.kron(K.dense_basis(UG, D).contiguous(), K.dense_basis(UA, D).contiguous())
            for UA, UG, D in self._entries(layer_id)])
        return self._layout.to_flat_order(layer_id, U) if split_weight_bias else U

    def _layer_diag(self, lid):
        """A layer's diagonal in its eigenbasis, flat in the column order of :meth:`get_KFE`."""
        return torch.cat([D.reshape(-1) for _, _, D in self._entries(lid)])

    # ------------------------------------------------------------------ products
    def mv(self, v):
        self._check_pvector(v)
        return PVector(self.layer_collection,
                       vector_repr=self._apply(v.get_flat_representation(), self._scale_layer))

    def vTMv(self, v):
        self._check_pvector(v)
        total = 0
        for key, V in self._layout.split(v.get_flat_representation()).items():
            UA, UG, D = self._unit(key)
            W = K.to_kfe(V, UA, UG)
            total = total + (D * W * W).sum()
        return total

    def mmap(self, pfmap):
        self._check_pfmap(pfmap)
        return PFMapDense(None, data=self._apply(pfmap.to_torch(), self._scale_layer),
                          layer_collection=self.layer_collection)

    def mapTMmap(self, pfmap, reduction="sum"):
        """``reduction='sum'``: ``(n, n)`` ``Σ_k J_k M J_kᵀ``; ``'diag'``: its diagonal ``(n,)``;
        computed in the eigenbasis as ``Σ d (Uᵀ J)²``-type contractions."""
        self._check_pfmap(pfmap)
        if reduction not in ("sum", "diag"):
            raise ValueError(f"unknown reduction '{reduction}': use 'sum' or 'diag'")
        out = 0
        for key, V in self._layout.split(pfmap.to_torch()).items():
            UA, UG, D = self._unit(key)
            W = K.to_kfe(V, UA, UG)
            if reduction == "sum":
                out = out + torch.einsum("kiab,ab,kjab->ij", W, D, W)
            else:
                out = out + torch.einsum("kiab,ab,kiab->i", W, D, W)
        return out

    # ------------------------------------------------------------------ solves and functions
    def _check_solve(self, solve, damping="exact"):
        if solve not in ("default", "solve", "eigh"):
            raise ValueError(f"unknown solve '{solve}' for {type(self).__name__}: use 'default'")
        if damping != "exact":
            raise ValueError(f"{type(self).__name__} damps exactly in its eigenbasis; damping "
                             f"'{damping}' is not available (use damping='exact')")

    def solvePVec(self, x, regul=1e-8, solve="default", damping="exact"):
        """``(M + regul·I)⁻¹ x``, exactly (``U (D + regul)⁻¹ Uᵀ x``)."""
        self._check_pvector(x)
        self._check_solve(solve, damping)
        f = lambda D: 1.0 / (D + regul)  # noqa: E731
        return PVector(self.layer_collection, vector_repr=self._apply(
            x.get_flat_representation(), lambda lid, V: self._scale_layer(lid, V, f)))

    def solvePFMap(self, x, regul=1e-8, solve="default", damping="exact"):
        self._check_pfmap(x)
        self._check_solve(solve, damping)
        f = lambda D: 1.0 / (D + regul)  # noqa: E731
        return PFMapDense(None, data=self._apply(x.to_torch(), lambda lid, V: self._scale_layer(lid, V, f)),
                          layer_collection=self.layer_collection)

    def inverse(self, regul=1e-8):
        """``(M + regul·I)⁻¹``, same representation."""
        return self.pow(-1.0, regul=regul)

    def pow(self, x, regul=0.0):
        """``(M + regul·I)^x = U diag((D + regul)^x) Uᵀ`` (values below 0, round-off, are clipped
        to 0 for fractional ``x``)."""
        def f(D):
            d = D + regul
            if not float(x).is_integer():
                d = d.clamp(min=0)
            return d ** x

        return self._with_diags(self._map_diags(f))

    def logdet(self, regul=0.0):
        """``log det(M + regul·I) = Σ log(D + regul)``."""
        return sum(torch.log(ent[2] + regul).sum() for _, ent in self._units())

    # ------------------------------------------------------------------ reductions
    def get_diag(self, split_weight_bias=True):
        """Diagonal ``(P,)``: per layer ``(U_G∘U_G) D (U_A∘U_A)ᵀ``, in the flat layout
        (``split_weight_bias=True``) or each layer's Kronecker layout."""
        parts = []
        for lid in self.data:
            ds = []
            for UA, UG, D in self._entries(lid):
                d = D
                if not isinstance(UA, int):
                    d = d @ (UA * UA).t()
                if not isinstance(UG, int):
                    d = (UG * UG) @ d
                ds.append(d.reshape(-1))
            d = torch.cat(ds)
            parts.append(self._layout.to_flat_order(lid, d) if split_weight_bias else d)
        return torch.cat(parts)

    def trace(self):
        return sum(ent[2].sum() for _, ent in self._units())

    def frobenius_norm(self):
        """``sqrt(Σ D²)`` (the basis is orthogonal)."""
        return torch.sqrt(sum((ent[2] ** 2).sum() for _, ent in self._units()))

    def to_torch(self, split_weight_bias=True):
        """Dense ``(P, P)``; inside a layer the flat order (``split_weight_bias=True``) or the
        Kronecker order."""
        P = self.layer_collection.numel()
        out = None
        for lid in self.data:
            U = self.get_KFE(lid, split_weight_bias=split_weight_bias)
            D = self._layer_diag(lid)
            if out is None:
                out = torch.zeros(P, P, dtype=D.dtype, device=D.device)
            s = self.layer_collection.slice(lid)
            out[s, s] = (U * D) @ U.t()
        return out

    # ------------------------------------------------------------------ arithmetic
    def _scaled(self, x):
        return self._with_diags(self._map_diags(lambda D: D * x))

    def _same_basis(self, other):
        self._check_same_kind(other)
        for (key, a), (_, b) in zip(self._units(), other._units()):
            lid = key[0] if isinstance(key, tuple) else key
            for U1, U2 in ((a[0], b[0]), (a[1], b[1])):
                if U1 is U2:
                    continue
                if isinstance(U1, int) or isinstance(U2, int) or U1.shape != U2.shape \
                        or not torch.equal(U1, U2):
                    raise NotImplementedError(
                        f"the two {type(self).__name__} have different eigenbases on layer "
                        f"'{lid}': their sum/product is not diagonal in one basis; use to_torch() "
                        "(dense) or PMatDense")

    def __add__(self, other):
        """Sum of two matrices sharing their eigenbases (e.g. ``M + c·M``): ``D₁ + D₂``; with a
        :class:`PMatEye` ``s·I`` (a prior precision): ``D + s`` (the eigenbases are complete)."""
        if isinstance(other, PMatEye):
            if other.layer_collection != self.layer_collection:
                raise ValueError("the two matrices are built on different LayerCollections")
            return self._with_diags(self._map_diags(lambda D: D + other.scaling))
        self._same_basis(other)
        return self._with_diags(self._zip_diags(other, lambda D1, D2: D1 + D2))

    def _zip_diags(self, other, fn):
        """``{lid: fn(D₁, D₂)}`` per block (lists for multi-block layers)."""
        out = {}
        for lid, e in self.data.items():
            ds = [fn(a[2], b[2]) for a, b in zip(self._entries(lid), other._entries(lid))]
            out[lid] = ds if K.is_multi(e) else ds[0]
        return out

    def mm(self, other):
        """Product of two matrices sharing their eigenbases: ``D₁ ∘ D₂``."""
        self._same_basis(other)
        return self._with_diags(self._zip_diags(other, lambda D1, D2: D1 * D2))

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_layout_obj", None)
        return state
