"""``PMatLowRank``: ``M = UᵀU`` stored through its ``r × P`` factor ``U``, and
``PMatEyePlusLowRank``: ``αI + UᵀCU``, the family closed under damping, inversion and
differences that the low-rank operations return."""
import torch

from . import _checks, _spectral
from ._prior import scalar_or_prior
from ._statistics import check_tensor
from .abstract import PMatAbstract
from .blocks import LowRankBlock


class _LowRankBase(PMatAbstract):
    """Shared checks."""

    def _check_regul(self, regul, what):
        if not _checks._float(regul) > 0:
            raise _checks.singular_error(
                type(self).__name__, what, regul,
                f"a low-rank matrix (rank ≤ {self._rank()} < P = {self.layer_collection.numel()}) "
                "is singular without damping (pow(-1, on_range=True) is the pseudo-inverse on "
                "its range)")

    def _rank(self):
        return self._U().shape[0]

    # Caches, keyed on the data they were computed from (the tensors and their version
    # counters: see _checks.cached), so replacing ``data`` or changing it in place recomputes
    # them. The r × r Gram matrix G = U Uᵀ costs O(r² P), as much as a build, and is kept;
    # factorizations that depend on regul are kept for the last regul only (a sweep over
    # reguls does not pile them up); nothing that records an autograd graph is kept. Neither is
    # pickled (``__getstate__``): both are recomputed on demand.
    def _cached_gram(self):
        def compute():
            U = self._U()
            return U @ U.t()
        return _checks.cached(self.__dict__, "_gram_cache", "gram", compute, self.data)

    def _last_regul_cache(self, key, compute):
        """``compute()`` for ``key``, reused while ``key`` is the last one asked for and the
        data is unchanged."""
        return _checks.cached(self.__dict__, "_regul_cache", key, compute, self.data)

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_gram_cache", None)
        state.pop("_blocks_cache", None)
        state.pop("_regul_cache", None)
        state.pop("_thin_eig_cache", None)
        state.pop("_eig_snapshot", None)
        return state

    def _eigendecomposition_is_current(self):
        """Whether ``evals``/``evecs`` are there and were computed from the current data
        (set by hand, without a record of their source, they are trusted)."""
        if getattr(self, "evals", None) is None:
            return False
        if "_eig_snapshot" not in self.__dict__:
            return True
        snap = self._eig_snapshot
        return snap is not None and snap.matches(_checks.tensors_of(self.data))

    def _record_eigendecomposition_source(self):
        self._eig_snapshot = None if _checks.needs_graph(self.data) \
            else _checks.Snapshot(_checks.tensors_of(self.data))


class PMatLowRank(_LowRankBase):
    """``M = (1/n) Σ_x J(x)ᵀ J(x) = UᵀU`` with ``U = J / √n``, ``J`` the ``(K·n, P)`` stacked
    per-example Jacobian rows: *equal* to PMatDense, in ``O(P r)`` memory (``r = K·n``).

    ``data`` is ``J / √n`` with shape ``(n_output, n, P)`` (as built from examples) or any
    ``(r, P)`` factor. Every operation costs ``O(P r)`` (plus ``O(r³)`` for the ``r × r`` Gram
    matrix ``G = U Uᵀ``); nothing ``P × P`` is formed except in [`to_torch`][nngeometry.object.pspace.abstract.PMatAbstract.to_torch].

    Damping is exact, including on the orthogonal complement of the range of ``M``:
    ``solve(x, regul=λ)`` returns ``(M + λI)⁻¹ x = (x - Uᵀ (λI + G)⁻¹ U x) / λ`` (Woodbury).
    Upstream nngeometry dropped the component of ``x`` orthogonal to the range; we don't.
    """

    statistic = "get_jacobian"

    def _build(self, examples, **kwargs):
        return self._data_from_statistics(
            self.layer_collection, self.generator.get_jacobian(examples, self.layer_collection))

    @classmethod
    def _check_statistics(cls, layer_collection, statistics):
        check_tensor(cls.__name__, statistics, (None, None, layer_collection.numel()),
                     "the per-example Jacobians (n_output, n, P)")

    @classmethod
    def _data_from_statistics(cls, layer_collection, statistics):
        """``statistics``: the ``(n_output, n, P)`` per-example Jacobians ``J`` (not
        normalized); stored as ``J / √n``."""
        return statistics / statistics.shape[1] ** 0.5

    def _U(self):
        return self.data.reshape(-1, self.data.shape[-1])

    def _gram(self):
        """``G = U Uᵀ`` (``r × r``), computed once (by the block)."""
        return self._blocks()[0].gram()

    @property
    def dtype(self):
        return self.data.dtype

    def _new(self, U):
        return PMatLowRank(self.layer_collection, None, data=U)

    # the container of one LowRankBlock ``UᵀU``, kept while ``data`` is unchanged with its
    # caches (the Gram matrix, the Cholesky factor of the last solve): products, reductions,
    # solves, eigenvalues, diag_of_inverse are the base class's; the functions written here
    # return the PMatEyePlusLowRank family and take ``on_range``
    def _blocks(self):
        return _checks.cached(self.__dict__, "_blocks_cache", "blocks", lambda: [
            LowRankBlock(self._U(), eig=self.get_eigendecomposition)], self.data)

    def _from_blocks(self, blocks):
        """``JᵀJ`` stays a PMatLowRank; a block with a diagonal or a ``C`` (a negative scaling,
        a difference, ``+ s·I``) is a `PMatEyePlusLowRank`."""
        (b,) = blocks
        if b._pure():
            return self._new(b.J)
        J = b.J
        return PMatEyePlusLowRank(self.layer_collection, data=(
            torch.as_tensor(b.alpha, dtype=J.dtype, device=J.device), J, b._C()))

    # ``M + PMatEyePlusLowRank``: the block adds the other's
    _ADDS_WITH = ("PMatEyePlusLowRank",)

    # 'woodbury' (the default): through the Cholesky factor of λI + G; 'eigh': through the
    # thin eigendecomposition of M
    _SOLVE_METHODS = {"default": (None, "woodbury"), "woodbury": (None, "woodbury"),
                      "eigh": (None, "eigh")}

    def _like(self):
        return self.data

    def _as_update(self):
        U = self._U()
        return PMatEyePlusLowRank(self.layer_collection, alpha=torch.zeros((), dtype=U.dtype,
                                                                            device=U.device),
                                  U=U, C=torch.eye(U.shape[0], dtype=U.dtype, device=U.device))

    # ------------------------------------------------------------------ products
    def mm(self, other):
        raise NotImplementedError(
            "the product of two low-rank PSD matrices is not symmetric in general, so it has no "
            "PMatLowRank form; use mv/mmap, or to_torch() on small models")

    # ------------------------------------------------------------------ eigendecomposition
    def compute_eigendecomposition(self, impl="svd", rtol=None):
        """The nonzero eigenpairs ``M = V Λ Vᵀ`` (``V`` ``(P, k)`` with orthonormal columns),
        cached in ``evals`` (ascending) and ``evecs``.

        * ``impl='svd'`` (default): the thin SVD ``U = Q S Vᵀ`` of the ``r × P`` factor gives
          ``Λ = S²`` and ``V`` directly (``O(r² P)``, and no squaring of the condition number
          before the decomposition);
        * ``impl='eigh'``: from the ``r × r`` Gram matrix ``G = UUᵀ = QΛQᵀ``, ``V = Uᵀ Q
          Λ^{-1/2}`` (``O(r² P)`` too, reusing ``G`` when solves have computed it).

        Eigenvalues at or below ``rtol · λ_max`` (default ``r · eps``) are treated as zero and
        dropped, with their eigenvectors.
        """
        U = self._U()
        if rtol is None:
            rtol = U.shape[0] * torch.finfo(U.dtype).eps
        if impl == "svd":
            _, s, Vh = torch.linalg.svd(_checks.upcast(U), full_matrices=False)
            s, Vh = s.to(U.dtype), Vh.to(U.dtype)
            lam, V = (s * s).flip(0), Vh.flip(0).t()  # ascending
        elif impl == "eigh":
            lam, Q = _spectral.eigh(self._gram())
            V = None
        else:
            raise NotImplementedError(
                f"unknown eigendecomposition implementation '{impl}'; use 'svd' or 'eigh'")
        keep = lam > rtol * lam.abs().max().clamp(min=torch.finfo(U.dtype).tiny)
        lam = lam[keep]
        self.evals = lam
        self.evecs = V[:, keep] if V is not None else (U.t() @ Q[:, keep]) / lam.sqrt()
        self._record_eigendecomposition_source()

    def get_eigendecomposition(self):
        """``(evals ascending, evecs (P, k) as columns)`` of the nonzero part, computed once
        (and again when ``data`` has been replaced or changed in place)."""
        if not self._eigendecomposition_is_current():
            self.compute_eigendecomposition()
        return self.evals, self.evecs

    # ------------------------------------------------------------------ solves and functions
    def _with_prior(self, regul, what):
        """``(λ, None)`` for a scalar ``λ``; ``(None, Λ + UᵀU)`` as a
        `PMatEyePlusLowRank` with a diagonal ``α = diag(Λ)`` for a per-layer /
        per-parameter ``Λ`` (whose every entry must then be positive: a low-rank matrix is
        singular without damping)."""
        scalar, prior = scalar_or_prior(regul, self.layer_collection, "PMatLowRank", what)
        if prior is None:
            return scalar, None
        self._check_regul(prior, what)
        U = self._U()
        return None, PMatEyePlusLowRank(self.layer_collection, alpha=prior.flat(U), U=U,
                                        C=torch.eye(U.shape[0], dtype=U.dtype, device=U.device))

    def inverse(self, regul=1e-8, damping="exact"):
        """``(M + regul·I)⁻¹ = I/λ - Uᵀ(λI + G)⁻¹U/λ``, exact, as a `PMatEyePlusLowRank`
        (for a per-layer / per-parameter ``Λ``: ``Λ⁻¹ - Λ⁻¹Uᵀ(I + UΛ⁻¹Uᵀ)⁻¹UΛ⁻¹``, the same
        type with a diagonal ``α``); Woodbury in the block. Without a positive damping the
        shared singular error (a low-rank matrix is singular)."""
        return super()._inverse_impl(regul=regul, damping=damping)

    def pow(self, x, regul=0.0, on_range=False, damping="exact"):
        """``(M + regul·I)^x`` through the thin eigendecomposition ``M = V Λ Vᵀ``.

        * ``on_range=False`` (default): exact, ``λ^x I + V ((Λ + λ)^x - λ^x) Vᵀ`` as a
          `PMatEyePlusLowRank`; with ``regul = 0`` only ``x > 0`` is defined, and the
          result is the PMatLowRank ``V Λ^x Vᵀ``.
        * ``on_range=True``: the power restricted to the range of ``M`` (zero on its orthogonal
          complement): PMatLowRank ``V (Λ + λ)^x Vᵀ``; with ``x = -1, regul = 0`` this is the
          Moore-Penrose pseudo-inverse.

        A per-layer / per-parameter ``Λ``: ``x = ±1`` only (a `PMatEyePlusLowRank` with
        a diagonal ``α``); other powers of a diagonal plus a low-rank matrix have no low-rank
        form.
        """
        self._check_damping(damping, "pow")
        regul, damped = self._with_prior(regul, f"pow({x})")
        if damped is not None:
            if x in (1, -1) and not on_range:
                return damped.pow(x, 0.0)
            raise NotImplementedError(
                f"PMatLowRank.pow({x}) with a per-layer or per-parameter regul: M + Λ (Λ not a "
                "multiple of I) has no low-rank eigendecomposition, so only x = 1 and x = -1 are "
                "exact here; use a scalar regul, solve() / inverse(), or PMatDense on small "
                "models")
        evals, V = self.get_eigendecomposition()
        ev = evals + regul
        if _checks._float(regul) < 0:
            # M + λI with λ < 0: the range's eigenvalues, and λ itself on the orthogonal
            # complement when there is one, go through the shared checks (no silent NaN)
            P = self.layer_collection.numel()
            lam = torch.as_tensor(regul, dtype=evals.dtype, device=evals.device).reshape(1)
            _spectral.eigvals_for_power(torch.cat([ev, lam]) if evals.numel() < P and
                                        not on_range else ev, x, "PMatLowRank", regul)
        if on_range or (_checks._float(regul) == 0 and x > 0):
            return self._new((V * ev ** (x / 2)).t())
        if _checks._float(regul) == 0:
            self._check_regul(regul, f"pow({x})")
        lam = torch.as_tensor(regul, dtype=evals.dtype, device=evals.device)
        return PMatEyePlusLowRank(self.layer_collection, alpha=lam ** x, U=V.t(),
                                  C=torch.diag(ev ** x - lam ** x))

    def pinv(self, atol=1e-8):
        """Moore-Penrose pseudo-inverse ``V Λ⁻¹ Vᵀ`` over the eigenvalues ``λ > atol`` (the
        others, and the orthogonal complement of the range, are sent to 0), as a PMatLowRank
        ``(Λ^{-1/2} Vᵀ)ᵀ (Λ^{-1/2} Vᵀ)``."""
        evals, V = self.get_eigendecomposition()
        keep = evals > atol
        return self._new((V[:, keep] * evals[keep] ** -0.5).t())

    def logdet(self, regul=0.0, damping="exact"):
        """``log det(M + λI) = (P - r) log λ + log det(λI_r + G)`` (Sylvester); for a
        per-layer / per-parameter ``Λ``: ``Σ log Λ_pp + log det(I_r + UΛ⁻¹Uᵀ)``."""
        self._check_damping(damping, "logdet")
        regul, damped = self._with_prior(regul, "logdet")
        if damped is not None:
            return damped.logdet(0.0)
        self._check_regul(regul, "logdet")
        G = self._gram()
        P, r = self.layer_collection.numel(), G.shape[0]
        lam = torch.as_tensor(regul, dtype=G.dtype, device=G.device)
        return (P - r) * torch.log(lam) + torch.log(_spectral.eigvalsh(G) + lam).sum()


class PMatEyePlusLowRank(_LowRankBase):
    """``α I + Uᵀ C U`` with ``α`` a scalar (or a ``(P,)`` tensor: the diagonal matrix
    ``diag(α)``), ``U`` ``(r, P)`` and ``C`` a symmetric ``r × r`` matrix (not necessarily
    PSD): what [`PMatLowRank`][nngeometry.object.PMatLowRank] returns for damped inverses, exact damped powers,
    differences and negative scalings. The family is closed under damping (by any diagonal
    ``Λ``), inversion (Woodbury), scaling and sums; all operations cost ``O(P r + r³)``.

    ``data`` is the tuple ``(alpha, U, C)``.
    """

    def __init__(self, layer_collection, generator=None, data=None, examples=None, alpha=None,
                 U=None, C=None):
        if data is None:
            if U is None or C is None or alpha is None:
                raise ValueError("PMatEyePlusLowRank needs data=(alpha, U, C) or alpha, U and C")
            data = (torch.as_tensor(alpha, dtype=U.dtype, device=U.device), U, C)
        super().__init__(layer_collection, generator, data=data)

    def _U(self):
        return self.data[1]

    @property
    def dtype(self):
        return self.data[1].dtype

    def _new(self, alpha, U, C):
        return PMatEyePlusLowRank(self.layer_collection, data=(alpha, U, C))

    # the container of one LowRankBlock ``αI + UᵀCU``, kept while ``data`` is unchanged with
    # its caches (the Woodbury factors of the last damping, the thin eigendecomposition): every
    # operation is the base class's, the block holding the Woodbury solves and inverses, the
    # exact powers and the log-determinant (determinant lemma); a sum with a PMatLowRank adds
    # its block
    def _blocks(self):
        return _checks.cached(self.__dict__, "_blocks_cache", "blocks",
                              lambda: [LowRankBlock(self.data[1], self.data[0], self.data[2])],
                              self.data)

    def _from_blocks(self, blocks):
        (b,) = blocks
        J = b.J
        return self._new(torch.as_tensor(b.alpha, dtype=J.dtype, device=J.device), J, b._C())

    # the sums whose blocks add to a low-rank block (``M + PMatLowRank``: the factors are
    # stacked)
    _ADDS_WITH = ("PMatLowRank",)

    # 'woodbury' is the only method (any other name is refused)
    _SOLVE_METHODS = {"default": (None, None), "solve": (None, None),
                      "woodbury": (None, None)}

    def _like(self):
        return self.data[1]

    def mm(self, other):
        raise NotImplementedError(
            "the product of two PMatEyePlusLowRank is not symmetric in general; use mv/mmap")

    # ------------------------------------------------------------------ solves and functions
    # (the base class's, on the block: upstream's default regul of this family is 0, since
    # α I makes it invertible by itself)
    def solvePVec(self, x, regul=0.0, solve="default", damping="exact"):
        """``(αI + UᵀCU + Λ)⁻¹ x``, exact: Woodbury, ``(β⁻¹ - (Uβ⁻¹)ᵀ (I + C U β⁻¹ Uᵀ)⁻¹ C
        (Uβ⁻¹)) x`` with ``β = α + Λ`` (a scalar or a diagonal; ``β`` with a zero entry: the
        shared singular error)."""
        return super().solvePVec(x, regul=regul, solve=solve, damping=damping)

    def solvePFMap(self, x, regul=0.0, solve="default", damping="exact"):
        """``(αI + UᵀCU + Λ)⁻¹`` applied to every row of the PFMap (Woodbury, see
        `solvePVec`)."""
        return super().solvePFMap(x, regul=regul, solve=solve, damping=damping)

    def solve(self, x, regul=0.0, solve="default", **kwargs):
        return super().solve(x, regul=regul, solve=solve, **kwargs)

    def inverse(self, regul=0.0, damping="exact"):
        """``(αI + UᵀCU + Λ)⁻¹ = β⁻¹ - (Uβ⁻¹)ᵀ W (Uβ⁻¹)`` with ``β = α + Λ`` (Woodbury,
        ``W = C (I + U β⁻¹ Uᵀ C)⁻¹``), again of this form."""
        return super()._inverse_impl(regul=regul, damping=damping)

    def pow(self, x, regul=0.0, damping="exact"):
        """``(αI + UᵀCU + Λ)^x``, exact. ``x = 1``: the damped matrix; ``x = -1``:
        [`inverse`][nngeometry.object.pspace.abstract.PMatAbstract.inverse] (Woodbury). Other ``x`` (fractional: ``x = ±1/2``; integer) with a
        scalar ``β = α + λ``: through the thin eigendecomposition ``UᵀCU = V D Vᵀ``,
        ``β^x I + V ((β + D)^x - β^x) Vᵀ``, again a ``PMatEyePlusLowRank``; negative powers
        need the matrix invertible, fractional ones positive semi-definite (the shared errors:
        ``C`` need not be PSD). A diagonal ``β`` (a non-scalar ``α`` or a per-layer /
        per-parameter ``Λ``) has no low-rank eigendecomposition: ``x = ±1`` only."""
        return super().pow(x, regul=regul, damping=damping)

    def logdet(self, regul=0.0, damping="exact"):
        """``log det(αI + UᵀCU + Λ)``, which must be positive definite (else the shared
        errors): with a scalar ``β = α + λ``, ``Σ log`` of the eigenvalues ``β + D`` and ``β``
        (thin eigendecomposition); with a diagonal ``β``, the determinant lemma
        ``Σ log β_p + log det(I_r + U β⁻¹ Uᵀ C)``."""
        return super().logdet(regul=regul, damping=damping)
