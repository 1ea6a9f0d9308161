"""``PMatDense``: the full ``P × P`` matrix (a container of one `DenseBlock`)."""
import torch

from ..map import PFMapDense
from ..vector import PVector
from . import _checks, _spectral
from ._prior import scalar_or_prior
from .abstract import PMatAbstract
from .blocks import DenseBlock


class PMatDense(PMatAbstract):
    """Stores ``M = (1/n) Σ_x J(x)ᵀ J(x)`` as a dense ``(P, P)`` tensor (``data``).

    Exact, and costs ``P²`` memory: use it on small models, or on a sub-collection of layers.
    """

    def _build(self, examples, **kwargs):
        p = self.layer_collection.numel()
        _checks.check_dense_fits(p, self._model_dtype_size())
        return self.generator.get_covariance_matrix(examples, self.layer_collection)

    def _model_dtype_size(self):
        for param in self.generator.model.parameters():
            return param.element_size()
        return 4

    # ------------------------------------------------------------------ the container
    def _blocks(self):
        """One `DenseBlock` for the whole matrix, sharing the cached
        eigendecomposition (`get_eigendecomposition`)."""
        return [DenseBlock(self.data, self.get_eigendecomposition)]

    def _from_blocks(self, blocks):
        (b,) = blocks
        return PMatDense(self.layer_collection, None, data=b.dense())

    def _like(self):
        return self.data

    # ------------------------------------------------------------------ products
    def mm(self, other):
        self._check_same_kind(other)
        return PMatDense(self.layer_collection, None, data=self.data @ other.data)

    # ------------------------------------------------------------------ solves and functions
    def _regul(self, regul, what):
        """``regul`` as given when it is a scalar ``λ`` (``Λ = λI``), else the normalised
        per-layer / per-parameter `Prior`."""
        scalar, prior = scalar_or_prior(regul, self.layer_collection, "PMatDense", what)
        return scalar if prior is None else prior

    def _damped(self, regul):
        """The dense ``M + Λ``."""
        if hasattr(regul, "flat"):  # a per-layer / per-parameter prior
            return self.data + torch.diag(regul.flat(self.data))
        return self.data + regul * torch.eye(self.data.shape[0], dtype=self.data.dtype,
                                             device=self.data.device)

    def _damped_eig(self, regul):
        """``(eigenvalues, eigenvectors)`` of ``M + Λ``: for a scalar ``λ`` the cached
        eigendecomposition of ``M`` shifted by ``λ`` (reused for every new ``λ``); for a
        per-layer / per-parameter ``Λ`` the eigendecomposition of ``M + Λ`` itself (``M`` and
        ``Λ`` then share no eigenbasis)."""
        if hasattr(regul, "flat"):
            return _spectral.eigh(self._damped(regul))
        evals, evecs = self.get_eigendecomposition()
        return evals + regul, evecs

    def _check_invertible(self, regul, what):
        """Refuse (shared singular-matrix error) an undamped ``regul <= 0`` solve of a singular
        or rank-deficient matrix, through its eigenvalues (computed once, and the ``O(P³)`` the
        solve costs anyway). With ``regul > 0`` the damped matrix is trusted."""
        if not _checks._float(regul) > 0:
            evals, _ = self._damped_eig(regul)
            _checks.check_invertible(evals, "PMatDense", what, regul)

    def _factorization(self, regul, solve):
        """The factorization of ``M + regul·I`` for ``solve`` ('lu': ``lu_factor``, 'cholesky':
        the lower Cholesky factor), computed once per ``(solve, regul)``; in float32 for a
        half-precision matrix (no half LAPACK kernels).

        Cache policy: only the *last* ``(solve, regul)`` is kept, because each factorization is
        as large as ``M`` (``P²``): a second solve with the same regul costs two triangular
        solves (``O(P²)``, about one ``mv``) instead of an ``O(P³)`` factorization, and a sweep
        over reguls does not pile up ``P²`` tensors. The cache is keyed on ``data`` itself (the
        tensor and its version counter, see ``_checks.cached``): replacing ``data`` or changing
        it in place (``M.data.mul_(0.9).add_(0.1 * new)``) refactorizes. A ``regul`` or ``data``
        that records an autograd graph is never cached. Not pickled (see ``__getstate__``).
        """
        def compute():
            A = _checks.upcast(self._damped(regul))
            try:
                if solve == "cholesky":
                    return torch.linalg.cholesky(A)
                return torch.linalg.lu_factor(A)
            except torch.linalg.LinAlgError as e:
                raise self._factorization_error(regul, solve, e) from None

        return _checks.cached(self.__dict__, "_solve_cache", (solve, _checks.regul_key(regul)),
                              compute, self.data)

    def _factorization_error(self, regul, solve, err):
        if solve == "cholesky":
            return ValueError(
                f"PMatDense.solve(solve='cholesky'): M + regul·I is not positive definite at "
                f"regul={_checks._float(regul):.3g} (torch: {str(err).splitlines()[0]}); pass a larger "
                "regul > 0, or solve='solve' (LU) for an indefinite matrix")
        return _checks.singular_error("PMatDense", "solve", regul,
                                      "the LU factorization has a zero pivot")

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_solve_cache", None)  # P² and recomputable: not worth pickling
        state.pop("_eig_snapshot", None)  # weak references: see get_eigendecomposition
        return state

    def _solve_matrix(self, b, regul, solve):
        """Solve ``(M + regul I) X = B`` for the columns of ``b`` (shape (P, m)).

        'solve' (default, LU with partial pivoting: the same factorization and result as
        ``torch.linalg.solve``) and 'cholesky' reuse the factorization of a previous call with
        the same regul (see `_factorization`); 'eigh' reuses the eigendecomposition.
        ``regul <= 0`` on a singular matrix is refused (shared singular-matrix error)."""
        if solve not in ("default", "solve", "cholesky", "lstsq", "eigh", "eigendecomposition"):
            raise ValueError(f"unknown solve '{solve}': use 'solve', 'cholesky', 'lstsq' or "
                             "'eigh' (alias 'eigendecomposition')")
        self._check_invertible(regul, "solve")
        out_dtype = b.dtype
        b = _checks.upcast(b)
        if solve in ("default", "solve"):
            LU, pivots = self._factorization(regul, "lu")
            x = torch.linalg.lu_solve(LU, pivots, b)
        elif solve == "cholesky":
            x = torch.cholesky_solve(b, self._factorization(regul, "cholesky"))
        elif solve == "lstsq":
            x = torch.linalg.lstsq(_checks.upcast(self._damped(regul)), b).solution
        else:  # 'eigh', and 'eigendecomposition': nngeometry 0.4's name
            evals, evecs = self._damped_eig(regul)
            evals, evecs = _checks.upcast(evals), _checks.upcast(evecs)
            x = evecs @ ((evecs.t() @ b) / evals.unsqueeze(1))
        return x.to(out_dtype)

    def solvePVec(self, x, regul=1e-8, solve="solve", damping="exact"):
        """``(M + Λ)⁻¹ x``, exactly; ``regul`` gives ``Λ``: a scalar ``λ`` (``λI``), a dict
        ``{layer_id: λ_l}``, a PVector (one value per parameter), a PMatEye or a PMatDiag. The
        factorization of the last ``(solve, regul)`` is kept (see ``_factorization``)."""
        self._check_damping(damping, "solve")
        self._check_pvector(x)
        regul = self._regul(regul, "solve")
        y = self._solve_matrix(x.get_flat_representation().unsqueeze(1), regul, solve)
        return PVector(self.layer_collection, vector_repr=y.squeeze(1))

    def solvePFMap(self, x, regul=1e-8, solve="solve", damping="exact"):
        """``(M + Λ)⁻¹`` applied to every row of the PFMap (``regul``: see [`solvePVec`][nngeometry.object.pspace.abstract.PMatAbstract.solvePVec])."""
        self._check_damping(damping, "solve")
        self._check_pfmap(x)
        regul = self._regul(regul, "solve")
        J = x.to_torch()
        K, n, P = J.shape
        Y = self._solve_matrix(J.reshape(K * n, P).t(), regul, solve)
        return PFMapDense(self.layer_collection, data=Y.t().reshape(K, n, P))

    def compute_eigendecomposition(self, impl="eigh"):
        """Eigendecomposition ``M = V diag(λ) Vᵀ`` of the symmetric matrix, cached in ``evals``
        (ascending) and ``evecs`` (columns, ``(P, P)``); recomputed by
        `get_eigendecomposition` when ``data`` is replaced or changed in place.

        ``impl='eigh'`` (default): ``torch.linalg.eigh``. ``impl='svd'``: from the SVD
        ``M = U diag(s) Vᵀ``; for a symmetric matrix the right singular vectors are eigenvectors
        and ``λ_i = ±s_i``, the sign read from the Rayleigh quotient ``v_iᵀ M v_i`` (exact for
        PSD matrices; for an indefinite matrix with two eigenvalues ``λ`` and ``-λ`` the SVD
        mixes their eigenvectors: use 'eigh').
        """
        if impl == "eigh":
            self.evals, self.evecs = _spectral.eigh(self.data)
        elif impl == "svd":
            D = _checks.upcast(self.data)
            _, s, Vh = torch.linalg.svd(D)
            V = Vh.transpose(-2, -1)
            signs = torch.where(((D @ V) * V).sum(dim=0) < 0, -1.0, 1.0).to(s.dtype)
            evals = s * signs
            order = torch.argsort(evals)
            self.evals = evals[order].to(self.data.dtype)
            self.evecs = V[:, order].to(self.data.dtype)
        else:
            raise NotImplementedError(
                f"unknown eigendecomposition implementation '{impl}'; use 'eigh' or 'svd'")
        # what it was computed from (see _checks.Snapshot); a graph-recording one is not reused
        self._eig_snapshot = None if _checks.needs_graph(self.data) \
            else _checks.Snapshot([self.data])

    def get_eigendecomposition(self):
        """``(evals ascending, evecs as columns)``, computed once, and again when ``data`` has
        been replaced or changed in place since (``evals``/``evecs`` set by hand, as upstream
        code may do, are used as they are)."""
        if getattr(self, "evals", None) is None or (
                "_eig_snapshot" in self.__dict__ and (
                    self._eig_snapshot is None or not self._eig_snapshot.matches([self.data]))):
            self.compute_eigendecomposition()
        return self.evals, self.evecs

    def project_to_diag(self, v):
        """Coordinates of the PVector ``v`` in the eigenbasis: ``Vᵀ v``, a ``(P,)`` tensor whose
        entry ``i`` goes with ``evals[i]`` (in that basis ``M`` is ``diag(evals)``)."""
        self._check_pvector(v)
        _, evecs = self.get_eigendecomposition()
        return evecs.t() @ v.get_flat_representation()

    def project_from_diag(self, v):
        """The PVector ``V c`` whose eigenbasis coordinates are the ``(P,)`` tensor ``c = v``:
        the inverse of `project_to_diag`."""
        _, evecs = self.get_eigendecomposition()
        if not torch.is_tensor(v) or v.shape != (evecs.shape[1],):
            raise ValueError(
                f"project_from_diag takes the ({evecs.shape[1]},) tensor of coordinates in the "
                f"eigenbasis (as project_to_diag returns), got "
                f"{tuple(v.shape) if torch.is_tensor(v) else type(v).__name__}")
        return PVector(self.layer_collection, vector_repr=evecs @ v)

    def pinv(self, atol=1e-8):
        """Moore-Penrose pseudo-inverse ``V diag(1/λ where |λ| > atol, else 0) Vᵀ``."""
        evals, evecs = self.get_eigendecomposition()
        keep = evals.abs() > atol
        inv = torch.where(keep, 1.0 / torch.where(keep, evals, torch.ones_like(evals)),
                          torch.zeros_like(evals))
        return PMatDense(self.layer_collection, None, data=(evecs * inv) @ evecs.t())

    # ------------------------------------------------------------------ reductions
    def get_diag(self):
        # the base class's, without building the block: a view, on a hot path of small loops
        return torch.diagonal(self.data)

    def norm(self, ord=None):
        if ord in (None, "fro"):
            return self._frobenius_norm_impl()
        return torch.linalg.matrix_norm(self.data, ord=ord)

    def to_torch(self):
        return self.data

    # ------------------------------------------------------------------ arithmetic
    def __add__(self, other):
        return self._add_blocks(other)

    __radd__ = __add__

    def __sub__(self, other):
        return self._add_blocks(other, -1.0)

