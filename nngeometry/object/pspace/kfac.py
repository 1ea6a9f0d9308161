"""``PMatKFAC``: block-diagonal over layers, each block a Kronecker product of two small factors
(Martens & Grosse 2015; convolutions: Grosse & Martens 2016)."""
import torch

from ..map import PFMapDense
from ..vector import PVector
from . import _kron as K
from .abstract import PMatAbstract

_DAMPINGS = ("pi", "exact")


def check_kfac_support(layer_collection, representation):
    """Refuse, naming the layer and its type, a collection with a layer that has no KFAC."""
    for lid, layer in layer_collection.layers.items():
        if not getattr(layer, "supports_kfac", False):
            raise NotImplementedError(
                f"{representation}: layer '{lid}' is of type {type(layer).__name__}, which has no "
                "KFAC approximation; use PMatEKFACBlockDiag (EKFAC where KFAC exists, dense blocks "
                "elsewhere), PMatBlockDiag, or a PMatMixed putting this layer in another "
                "representation")


def _check_damping(damping):
    if damping not in _DAMPINGS:
        raise ValueError(f"unknown damping '{damping}': use 'pi' (π-damped Kronecker factors) or "
                         "'exact' ((A⊗G + regul·I)⁻¹ through the factors' eigendecompositions)")


class PMatKFAC(PMatAbstract):
    """KFAC: per layer, ``M_layer ≈ kron(G, A)`` in the layer's Kronecker layout.

    ``A`` (size ``dA``) is the mean over examples of the input second moments (with a trailing 1
    when the layer has a bias), ``G`` (size ``dG``) the mean of the output-gradient second moments
    summed over the function's outputs, both divided by the number of examples ``n``, so that
    ``kron(G, A)`` approximates the layer's block of ``(1/n) Σ_x J(x)ᵀ J(x)`` (exact for a Linear
    layer on a single example). For a Linear layer the Kronecker layout is the row-major
    ``[W | b]`` of shape ``(out, in + 1)``; each layer type maps it to the flat layout with
    ``kfac_permutation()``. Off-diagonal (cross-layer) blocks are zero.

    Args:
        layer_collection: the layers (every layer type must support KFAC).
        generator: a Jacobian generator (e.g. ``TorchHooksJacobianBackend``).
        data: ``{layer_id: (A, G)}``; either factor may be a 1-D tensor standing for a diagonal
            matrix (e.g. an Embedding's input factor), which is never densified.
        examples: a DataLoader or a single mini-batch, used with ``generator`` when ``data`` is
            None.
        kfac_approx: ``'expand'`` (default) or ``'reduce'`` for layers with weight sharing
            (sequences), Eschenhagen et al. 2023.

    Damping (``solve``, ``inverse``, ``pow``, ``logdet``) takes ``damping='pi'`` or
    ``damping='exact'``:

    * ``'pi'`` (default for ``solve``/``inverse``/``pow``): Tikhonov damping split over the factors
      with π-damping, ``(A + π√λ I) ⊗ (G + (√λ/π) I)``, ``π = sqrt((tr A/dA)/(tr G/dG))``
      (``use_pi=False``: π = 1). Stays a PMatKFAC. This is *not* ``M + λI``.
    * ``'exact'`` (default for ``logdet``): ``M + λI`` exactly, through the eigendecompositions
      ``A = U_A Λ_A U_Aᵀ``, ``G = U_G Λ_G U_Gᵀ``: ``(M + λI)⁻¹ = U (Λ_G ⊗ Λ_A + λ)⁻¹ Uᵀ`` with
      ``U = U_G ⊗ U_A`` (``solve='eigh'`` is an alias). ``inverse``/``pow`` then return a
      :class:`~nngeometry.object.pspace.PMatEKFAC` (the result is no longer Kronecker).

    The factors' eigendecompositions are computed once and cached, and so are the π-damped
    inverse factors for each ``(regul, use_pi)``: after the first call, a solve costs about one
    ``mv``. ``mm`` results may have non-symmetric factors: use them for products and
    ``to_torch``, not for damped solves.
    """

    def __init__(self, layer_collection, generator, data=None, examples=None, kfac_approx="expand",
                 **kwargs):
        super().__init__(layer_collection, generator, data=data, examples=examples,
                         kfac_approx=kfac_approx, **kwargs)
        self._check_data()
        self._eig_cache = {}
        self._inv_cache = {}

    def _build(self, examples, kfac_approx="expand"):
        if kfac_approx not in ("expand", "reduce"):
            raise ValueError(f"unknown kfac_approx '{kfac_approx}': use 'expand' or 'reduce'")
        check_kfac_support(self.layer_collection, type(self).__name__)
        return self.generator.get_kfac_blocks(examples, self.layer_collection, approx=kfac_approx)

    def _check_data(self):
        ids = self.layer_collection.layer_ids()
        if set(self.data) != set(ids):
            raise ValueError(f"PMatKFAC data must have one (A, G) per layer {ids}, got {list(self.data)}")
        for lid in ids:
            A, G = self.data[lid]
            for name, F in (("A", A), ("G", G)):
                if F.dim() not in (1, 2) or (F.dim() == 2 and F.shape[0] != F.shape[1]):
                    raise ValueError(f"factor {name} of layer '{lid}' must be square or 1-D "
                                     f"(diagonal), got shape {tuple(F.shape)}")

    @property
    def _layout(self):
        lay = self.__dict__.get("_layout_obj")
        if lay is None:
            dims = {lid: (K.fdim(G), K.fdim(A)) for lid, (A, G) in self.data.items()}
            perms = {lid: l.kfac_permutation() for lid, l in self.layer_collection.layers.items()}
            lay = self._layout_obj = K.Layout(self.layer_collection, dims, perms)
        return lay

    @property
    def dtype(self):
        return next(iter(self.data.values()))[1].dtype

    # ------------------------------------------------------------------ per-layer machinery
    def _apply(self, flat, fn):
        """Apply ``fn(lid, V) -> V'`` per layer on ``flat`` of shape ``(..., P)``."""
        parts = self._layout.split(flat)
        return self._layout.join({lid: fn(lid, V) for lid, V in parts.items()})

    def _mul_layer(self, lid, V):
        A, G = self.data[lid]
        return K.kron_apply(A, G, V)

    def _eig(self, lid):
        """``((λ_A, U_A), (λ_G, U_G))``, computed once per layer."""
        e = self._eig_cache.get(lid)
        if e is None:
            A, G = self.data[lid]
            e = self._eig_cache[lid] = (K.eig(A), K.eig(G))
        return e

    def get_eigendecomposition(self):
        """``{layer_id: ((evals_A, U_A), (evals_G, U_G))}`` (cached); a diagonal factor's basis is
        the int identity size."""
        return {lid: self._eig(lid) for lid in self.data}

    def _pi_inverse_factors(self, regul, use_pi, power=-1.0):
        """``{lid: ((A + π√λ I)^power, (G + √λ/π I)^power)}``, cached for ``power = -1``."""
        key = (float(regul), bool(use_pi), float(power))
        out = self._inv_cache.get(key)
        if out is not None:
            return out
        out = {}
        s = float(regul) ** 0.5
        for lid, (A, G) in self.data.items():
            pi = K.pi_damping(A, G, use_pi)
            (lA, UA), (lG, UG) = self._eig(lid)
            dA, dG = lA + pi * s, lG + s / pi
            if not float(power).is_integer():
                dA, dG = dA.clamp(min=0), dG.clamp(min=0)
            out[lid] = (K.from_eig(dA ** power, UA), K.from_eig(dG ** power, UG))
        if power == -1.0:
            self._inv_cache[key] = out
        return out

    def _exact_layer(self, lid, V, regul, power=-1.0):
        (lA, UA), (lG, UG) = self._eig(lid)
        W = K.to_kfe(V, UA, UG)
        return K.from_kfe(W * (torch.outer(lG, lA) + regul) ** power, UA, UG)

    # ------------------------------------------------------------------ products
    def mv(self, v):
        """``M v`` (PVector), per layer ``G V Aᵀ`` on the reshaped vector."""
        self._check_pvector(v)
        return PVector(self.layer_collection,
                       vector_repr=self._apply(v.get_flat_representation(), self._mul_layer))

    def vTMv(self, v):
        self._check_pvector(v)
        parts = self._layout.split(v.get_flat_representation())
        return sum((V * self._mul_layer(lid, V)).sum() for lid, V in parts.items())

    def mmap(self, pfmap):
        """``M`` applied to every row of a PFMap ``(K, n, P)``: a PFMapDense."""
        self._check_pfmap(pfmap)
        return PFMapDense(None, data=self._apply(pfmap.to_torch(), self._mul_layer),
                          layer_collection=self.layer_collection)

    def mapTMmap(self, pfmap, reduction="sum"):
        """``reduction='sum'``: ``(n, n)`` ``Σ_k J_k M J_kᵀ``; ``'diag'``: its diagonal ``(n,)``."""
        self._check_pfmap(pfmap)
        if reduction not in ("sum", "diag"):
            raise ValueError(f"unknown reduction '{reduction}': use 'sum' or 'diag'")
        out = 0
        for lid, V in self._layout.split(pfmap.to_torch()).items():
            MV = self._mul_layer(lid, V)
            if reduction == "sum":
                out = out + torch.einsum("kiab,kjab->ij", V, MV)
            else:
                out = out + torch.einsum("kiab,kiab->i", V, MV)
        return out

    def mm(self, other):
        """``M₁ M₂`` for another PMatKFAC: per layer ``(G₁G₂) ⊗ (A₁A₂)``."""
        self._check_same_kind(other)
        data = {lid: (K.fmatmul(A, other.data[lid][0]), K.fmatmul(G, other.data[lid][1]))
                for lid, (A, G) in self.data.items()}
        return PMatKFAC(self.layer_collection, None, data=data)

    # ------------------------------------------------------------------ solves and functions
    def _solve_flat(self, flat, regul, solve, use_pi, damping):
        if solve == "eigh":
            damping = "exact"
        elif solve not in ("default", "solve"):
            raise ValueError(f"unknown solve '{solve}' for PMatKFAC: use 'default' (with "
                             "damping='pi' or 'exact') or 'eigh' (exact damping)")
        _check_damping(damping)
        if damping == "exact":
            return self._apply(flat, lambda lid, V: self._exact_layer(lid, V, regul))
        inv = self._pi_inverse_factors(regul, use_pi)
        return self._apply(flat, lambda lid, V: K.kron_apply(*inv[lid], V))

    def solvePVec(self, x, regul=1e-8, solve="default", use_pi=True, damping="pi"):
        """Solve with damping ``regul``: π-damped factors (``damping='pi'``, default;
        ``use_pi=False`` for π = 1) or ``(M + regul·I)⁻¹ x`` exactly (``damping='exact'``)."""
        self._check_pvector(x)
        return PVector(self.layer_collection, vector_repr=self._solve_flat(
            x.get_flat_representation(), regul, solve, use_pi, damping))

    def solvePFMap(self, x, regul=1e-8, solve="default", use_pi=True, damping="pi"):
        """:meth:`solvePVec` applied to every row of a PFMap."""
        self._check_pfmap(x)
        return PFMapDense(None, data=self._solve_flat(x.to_torch(), regul, solve, use_pi, damping),
                          layer_collection=self.layer_collection)

    def inverse(self, regul=1e-8, use_pi=True, damping="pi"):
        """``damping='pi'``: the PMatKFAC with factors ``(A + π√λ I)⁻¹``, ``(G + √λ/π I)⁻¹``;
        ``damping='exact'``: ``(M + λI)⁻¹`` as a PMatEKFAC."""
        return self.pow(-1.0, regul=regul, use_pi=use_pi, damping=damping)

    def pow(self, x, regul=0.0, use_pi=True, damping="pi"):
        """``damping='pi'``: PMatKFAC with π-damped factors to the power ``x`` (for ``regul=0``,
        exactly ``M^x``); ``damping='exact'``: ``(M + regul·I)^x`` as a PMatEKFAC. Negative
        eigenvalues (round-off) are clipped to 0 for fractional ``x``."""
        _check_damping(damping)
        if damping == "pi":
            return PMatKFAC(self.layer_collection, None,
                            data=self._pi_inverse_factors(regul, use_pi, power=float(x)))
        from .ekfac import PMatEKFAC

        data = {}
        for lid in self.data:
            (lA, UA), (lG, UG) = self._eig(lid)
            d = torch.outer(lG, lA) + regul
            if not float(x).is_integer():
                d = d.clamp(min=0)
            data[lid] = (UA, UG, d ** x)
        return PMatEKFAC(self.layer_collection, None, data=data)

    def logdet(self, regul=0.0, damping="exact", use_pi=True):
        """``log det(M + regul·I) = Σ log(λ_G,i λ_A,j + regul)`` (``damping='exact'``, default),
        or the log-determinant of the π-damped Kronecker product (``damping='pi'``)."""
        _check_damping(damping)
        total = 0
        s = float(regul) ** 0.5
        for lid, (A, G) in self.data.items():
            (lA, _), (lG, _) = self._eig(lid)
            if damping == "exact":
                total = total + torch.log(torch.outer(lG, lA) + regul).sum()
            else:
                pi = K.pi_damping(A, G, use_pi)
                total = total + lG.numel() * torch.log(lA + pi * s).sum() \
                    + lA.numel() * torch.log(lG + s / pi).sum()
        return total

    # ------------------------------------------------------------------ reductions
    def get_diag(self, split_weight_bias=True):
        """Diagonal ``(P,)``: per layer ``diag(G) ⊗ diag(A)``; in the flat layout
        (``split_weight_bias=True``) or each layer's Kronecker layout (False)."""
        parts = []
        for lid, (A, G) in self.data.items():
            d = torch.outer(K.fdiag(G), K.fdiag(A)).reshape(-1)
            parts.append(self._layout.to_flat_order(lid, d) if split_weight_bias else d)
        return torch.cat(parts)

    def trace(self):
        return sum(K.ftrace(A) * K.ftrace(G) for A, G in self.data.values())

    def frobenius_norm(self):
        """``sqrt(Σ_layers (‖A‖_F ‖G‖_F)²)``."""
        return torch.sqrt(sum((K.fnorm(A) * K.fnorm(G)) ** 2 for A, G in self.data.values()))

    def to_torch(self, split_weight_bias=True):
        """The dense ``(P, P)`` matrix: layers at their flat positions; inside a layer the flat
        order (``split_weight_bias=True``) or the Kronecker order of ``kron(G, A)`` (False)."""
        P = self.layer_collection.numel()
        A0, G0 = next(iter(self.data.values()))
        out = torch.zeros(P, P, dtype=G0.dtype, device=G0.device)
        for lid, (A, G) in self.data.items():
            block = torch.kron(K.dense(G).contiguous(), K.dense(A).contiguous())
            if split_weight_bias:
                block = self._layout.to_flat_order(lid, block, both=True)
            s = self.layer_collection.slice(lid)
            out[s, s] = block
        return out

    # ------------------------------------------------------------------ arithmetic
    def _scaled(self, x):
        return PMatKFAC(self.layer_collection, None,
                        data={lid: (A, G * x) for lid, (A, G) in self.data.items()})

    def __add__(self, other):
        """Sum of two PMatKFAC, where it stays Kronecker: per layer one factor of ``other`` must be
        proportional to the same factor of ``self`` (e.g. ``M + c·M``)."""
        self._check_same_kind(other)
        tol = 1e3 * torch.finfo(self.dtype).eps
        data = {}
        for lid, (A1, G1) in self.data.items():
            A2, G2 = other.data[lid]
            c = K.proportional(A1, A2, tol)
            if c is not None:
                data[lid] = (A1, G1 + c * G2)
                continue
            c = K.proportional(G1, G2, tol)
            if c is not None:
                data[lid] = (A1 + c * A2, G1)
                continue
            raise NotImplementedError(
                f"the sum of these two PMatKFAC is not a Kronecker product for layer '{lid}' (neither "
                "factor of one is proportional to the other's); use to_torch() and add the dense "
                "tensors, or PMatDense")
        return PMatKFAC(self.layer_collection, None, data=data)

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_layout_obj", None)
        return state
