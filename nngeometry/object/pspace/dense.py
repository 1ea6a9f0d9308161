"""``PMatDense``: the full ``P × P`` matrix (a container of one `DenseBlock`)."""
import torch

from ..vector import PVector
from . import _checks, _spectral
from ._statistics import check_tensor
from .abstract import PMatAbstract
from .blocks import DenseBlock


class PMatDense(PMatAbstract):
    """Stores ``M = (1/n) Σ_x J(x)ᵀ J(x)`` as a dense ``(P, P)`` tensor (``data``).

    Exact, and costs ``P²`` memory: use it on small models, or on a sub-collection of layers.
    """

    statistic = "get_covariance_matrix"

    def _build(self, examples, **kwargs):
        p = self.layer_collection.numel()
        _checks.check_dense_fits(p, self._model_dtype_size())
        return self._data_from_statistics(
            self.layer_collection,
            self.generator.get_covariance_matrix(examples, self.layer_collection))

    @classmethod
    def _check_statistics(cls, layer_collection, statistics):
        p = layer_collection.numel()
        check_tensor(cls.__name__, statistics, (p, p), "the covariance matrix")

    @classmethod
    def _data_from_statistics(cls, layer_collection, statistics):
        """``statistics``: the ``(P, P)`` matrix ``(1/n) Σ_x J(x)ᵀ J(x)``, stored as it is."""
        return statistics

    def _model_dtype_size(self):
        for param in self.generator.model.parameters():
            return param.element_size()
        return 4

    # ------------------------------------------------------------------ the container
    def _blocks(self):
        """One `DenseBlock` for the whole matrix, sharing the cached eigendecomposition
        (`get_eigendecomposition`); kept while ``data`` is unchanged, with the factorization
        of the last solve (see `DenseBlock.solve`)."""
        return _checks.cached(self.__dict__, "_blocks_cache", "blocks",
                              lambda: [DenseBlock(self.data, self.get_eigendecomposition)],
                              self.data)

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
    # 'solve' (the default: LU with partial pivoting, as torch.linalg.solve) and 'cholesky'
    # reuse the factorization of the last regul, 'eigh' (nngeometry 0.4: 'eigendecomposition')
    # the eigendecomposition, 'lstsq' factorizes each time (see DenseBlock.solve)
    _SOLVE_METHODS = {"default": (None, None), "solve": (None, None),
                      "cholesky": (None, "cholesky"), "lstsq": (None, "lstsq"),
                      "eigh": (None, "eigh"), "eigendecomposition": (None, "eigh")}

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_blocks_cache", None)  # the factorization: P² and recomputable
        state.pop("_eig_snapshot", None)  # weak references: see get_eigendecomposition
        return state

    def solvePVec(self, x, regul=1e-8, solve="solve", damping="exact"):
        """``(M + Λ)⁻¹ x``, exactly; ``regul`` gives ``Λ``: a scalar ``λ`` (``λI``), a dict
        ``{layer_id: λ_l}``, a PVector (one value per parameter), a PMatEye or a PMatDiag.
        ``solve``: ``'solve'`` (LU, default), ``'cholesky'``, ``'eigh'`` or ``'lstsq'``; the
        factorization of the last ``(solve, regul)`` is kept."""
        return super().solvePVec(x, regul, solve, damping)

    def solvePFMap(self, x, regul=1e-8, solve="solve", damping="exact"):
        """``(M + Λ)⁻¹`` applied to every row of the PFMap (``regul``: see [`solvePVec`][nngeometry.object.pspace.abstract.PMatAbstract.solvePVec])."""
        return super().solvePFMap(x, regul, solve, damping)

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

