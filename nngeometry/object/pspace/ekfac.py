"""``PMatEKFAC``: KFAC's eigenbasis with a re-estimated diagonal (George, Laurent et al., Fast
Approximate Natural Gradient Descent in a Kronecker-factored Eigenbasis, NeurIPS 2018)."""
import torch

from ..map import PFMapDense
from ..vector import PVector
from . import _kron as K
from .abstract import PMatAbstract
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
            on the eigenvector ``U_G[:, p] ⊗ U_A[:, q]`` (Kronecker layout, see PMatKFAC).
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
            return {lid: (UA, UG, diags[lid]) for lid, (UA, UG) in bases.items()}
        kfac = self.generator.get_kfac_blocks(examples, self.layer_collection, approx=kfac_approx)
        return {lid: self._entry_from_factors(A, G) for lid, (A, G) in kfac.items()}

    @staticmethod
    def _entry_from_factors(A, G):
        lA, UA = K.eig(A)
        lG, UG = K.eig(G)
        return (UA, UG, torch.outer(lG, lA))

    def _bases_from(self, eigendecomposition):
        from .kfac import PMatKFAC

        if isinstance(eigendecomposition, PMatKFAC):
            return {lid: (e[0][1], e[1][1]) for lid, e in eigendecomposition.get_eigendecomposition().items()}
        if isinstance(eigendecomposition, PMatEKFAC):
            return {lid: (UA, UG) for lid, (UA, UG, _) in eigendecomposition.data.items()}
        bases = {lid: tuple(eigendecomposition[lid])[:2] for lid in self.layer_collection.layer_ids()}
        return bases

    @classmethod
    def from_kfac(cls, kfac):
        """The EKFAC with ``kfac``'s eigenbases and diagonal ``λ_G ⊗ λ_A`` (equal to ``kfac``)."""
        data = {}
        for lid, ((lA, UA), (lG, UG)) in kfac.get_eigendecomposition().items():
            data[lid] = (UA, UG, torch.outer(lG, lA))
        return cls(kfac.layer_collection, kfac.generator, data=data)

    def _check_data(self):
        ids = self.layer_collection.layer_ids()
        if set(self.data) != set(ids):
            raise ValueError(f"{type(self).__name__} data must have one entry per layer {ids}, "
                             f"got {list(self.data)}")
        for lid in ids:
            UA, UG, D = self._entry(lid)
            if tuple(D.shape) != (K.fdim(UG), K.fdim(UA)):
                raise ValueError(
                    f"layer '{lid}': diagonal of shape {tuple(D.shape)} does not match the bases "
                    f"(dG={K.fdim(UG)}, dA={K.fdim(UA)}); expected ({K.fdim(UG)}, {K.fdim(UA)})")

    # hooks for PMatEKFACBlockDiag, whose dense layers are stored differently
    def _entry(self, lid):
        """``(U_A, U_G, D)`` of a layer."""
        return self.data[lid]

    def _perm(self, lid):
        return self.layer_collection[lid].kfac_permutation()

    def _kfe_request(self, lid):
        UA, UG, _ = self._entry(lid)
        return (UA, UG)

    def _replace_diags(self, diags):
        """``data`` with each layer's ``D`` replaced by ``diags[lid]``."""
        return {lid: self._entry(lid)[:2] + (diags[lid],) for lid in self.data}

    def _with_diags(self, diags):
        """The same representation with each layer's ``D`` replaced by ``diags[lid]``."""
        return type(self)(self.layer_collection, self.generator, data=self._replace_diags(diags))

    @property
    def _layout(self):
        lay = self.__dict__.get("_layout_obj")
        if lay is None:
            dims = {lid: tuple(self._entry(lid)[2].shape) for lid in self.data}
            perms = {lid: self._perm(lid) for lid in self.layer_collection.layer_ids()}
            lay = self._layout_obj = K.Layout(self.layer_collection, dims, perms)
        return lay

    @property
    def dtype(self):
        return self._entry(next(iter(self.data)))[2].dtype

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

    def _scale_layer(self, lid, V, f=None):
        """``U f(D) Uᵀ`` applied to ``V`` (``f`` default identity)."""
        UA, UG, D = self._entry(lid)
        W = K.to_kfe(V, UA, UG)
        return K.from_kfe(W * (D if f is None else f(D)), UA, UG)

    def get_KFE(self, layer_id=None, layer=None, split_weight_bias=True):
        """The dense eigenbasis ``U_G ⊗ U_A`` of a layer (``(p_l, p_l)``, eigenvectors as
        columns, column ``p·dA + q`` for ``D[p, q]``), rows in the flat layout
        (``split_weight_bias=True``) or the Kronecker layout; ``layer_id=None``: a dict over
        layers. ``layer`` is accepted for compatibility and ignored."""
        if layer_id is None:
            return {lid: self.get_KFE(lid, split_weight_bias=split_weight_bias) for lid in self.data}
        UA, UG, D = self._entry(layer_id)
        U = torch.kron(K.dense_basis(UG, D).contiguous(), K.dense_basis(UA, D).contiguous())
        return self._layout.to_flat_order(layer_id, U) if split_weight_bias else U

    # ------------------------------------------------------------------ products
    def mv(self, v):
        self._check_pvector(v)
        return PVector(self.layer_collection,
                       vector_repr=self._apply(v.get_flat_representation(), self._scale_layer))

    def vTMv(self, v):
        self._check_pvector(v)
        total = 0
        for lid, V in self._layout.split(v.get_flat_representation()).items():
            UA, UG, D = self._entry(lid)
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
        for lid, V in self._layout.split(pfmap.to_torch()).items():
            UA, UG, D = self._entry(lid)
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
        out = {}
        for lid in self.data:
            d = self._entry(lid)[2] + regul
            if not float(x).is_integer():
                d = d.clamp(min=0)
            out[lid] = d ** x
        return self._with_diags(out)

    def logdet(self, regul=0.0):
        """``log det(M + regul·I) = Σ log(D + regul)``."""
        return sum(torch.log(self._entry(lid)[2] + regul).sum() for lid in self.data)

    # ------------------------------------------------------------------ reductions
    def get_diag(self, split_weight_bias=True):
        """Diagonal ``(P,)``: per layer ``(U_G∘U_G) D (U_A∘U_A)ᵀ``, in the flat layout
        (``split_weight_bias=True``) or each layer's Kronecker layout."""
        parts = []
        for lid in self.data:
            UA, UG, D = self._entry(lid)
            d = D
            if not isinstance(UA, int):
                d = d @ (UA * UA).t()
            if not isinstance(UG, int):
                d = (UG * UG) @ d
            d = d.reshape(-1)
            parts.append(self._layout.to_flat_order(lid, d) if split_weight_bias else d)
        return torch.cat(parts)

    def trace(self):
        return sum(self._entry(lid)[2].sum() for lid in self.data)

    def frobenius_norm(self):
        """``sqrt(Σ D²)`` (the basis is orthogonal)."""
        return torch.sqrt(sum((self._entry(lid)[2] ** 2).sum() for lid in self.data))

    def to_torch(self, split_weight_bias=True):
        """Dense ``(P, P)``; inside a layer the flat order (``split_weight_bias=True``) or the
        Kronecker order."""
        P = self.layer_collection.numel()
        out = None
        for lid in self.data:
            U = self.get_KFE(lid, split_weight_bias=split_weight_bias)
            D = self._entry(lid)[2].reshape(-1)
            if out is None:
                out = torch.zeros(P, P, dtype=D.dtype, device=D.device)
            s = self.layer_collection.slice(lid)
            out[s, s] = (U * D) @ U.t()
        return out

    # ------------------------------------------------------------------ arithmetic
    def _scaled(self, x):
        return self._with_diags({lid: self._entry(lid)[2] * x for lid in self.data})

    def _same_basis(self, other):
        self._check_same_kind(other)
        for lid in self.data:
            a, b = self._entry(lid), other._entry(lid)
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
        """Sum of two matrices sharing their eigenbases (e.g. ``M + c·M``): ``D₁ + D₂``."""
        self._same_basis(other)
        return self._with_diags({lid: self._entry(lid)[2] + other._entry(lid)[2] for lid in self.data})

    def mm(self, other):
        """Product of two matrices sharing their eigenbases: ``D₁ ∘ D₂``."""
        self._same_basis(other)
        return self._with_diags({lid: self._entry(lid)[2] * other._entry(lid)[2] for lid in self.data})

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_layout_obj", None)
        return state
