"""``PMatDense``: the full ``P × P`` matrix."""
import torch

from ..map import PFMapDense
from ..vector import PVector
from .abstract import PMatAbstract


class PMatDense(PMatAbstract):
    """Stores ``M = (1/n) Σ_x J(x)ᵀ J(x)`` as a dense ``(P, P)`` tensor (``data``).

    Exact, and costs ``P²`` memory: use it on small models, or on a sub-collection of layers.
    """

    def _build(self, examples, **kwargs):
        p = self.layer_collection.numel()
        _check_dense_fits(p, self._model_dtype_size())
        return self.generator.get_covariance_matrix(examples, self.layer_collection)

    def _model_dtype_size(self):
        for param in self.generator.model.parameters():
            return param.element_size()
        return 4

    # ------------------------------------------------------------------ products
    def mv(self, v):
        self._check_pvector(v)
        return PVector(self.layer_collection, vector_repr=self.data @ v.get_flat_representation())

    def vTMv(self, v):
        self._check_pvector(v)
        f = v.get_flat_representation()
        return f @ (self.data @ f)

    def mmap(self, pfmap):
        self._check_pfmap(pfmap)
        return PFMapDense(None, data=pfmap.to_torch() @ self.data, layer_collection=self.layer_collection)

    def mapTMmap(self, pfmap, reduction="sum"):
        self._check_pfmap(pfmap)
        J = pfmap.to_torch()
        MJ = J @ self.data
        if reduction == "sum":
            return torch.einsum("kip,kjp->ij", J, MJ)
        if reduction == "diag":
            return torch.einsum("kip,kip->i", J, MJ)
        raise ValueError(f"unknown reduction '{reduction}': use 'sum' or 'diag'")

    def mm(self, other):
        self._check_same_kind(other)
        return PMatDense(self.layer_collection, None, data=self.data @ other.data)

    # ------------------------------------------------------------------ solves and functions
    def _damped(self, regul):
        return self.data + regul * torch.eye(self.data.shape[0], dtype=self.data.dtype,
                                             device=self.data.device)

    def _solve_matrix(self, b, regul, solve):
        """Solve ``(M + regul I) X = B`` for the columns of ``b`` (shape (P, m))."""
        if solve in ("default", "solve"):
            return torch.linalg.solve(self._damped(regul), b)
        if solve == "cholesky":
            L = torch.linalg.cholesky(self._damped(regul))
            return torch.cholesky_solve(b, L)
        if solve == "lstsq":
            return torch.linalg.lstsq(self._damped(regul), b).solution
        if solve == "eigh":
            evals, evecs = self.get_eigendecomposition()
            return evecs @ ((evecs.t() @ b) / (evals + regul).unsqueeze(1))
        raise ValueError(f"unknown solve '{solve}': use 'solve', 'cholesky', 'lstsq' or 'eigh'")

    def solvePVec(self, x, regul=1e-8, solve="solve"):
        """``(M + regul·I)⁻¹ x``, exactly."""
        self._check_pvector(x)
        y = self._solve_matrix(x.get_flat_representation().unsqueeze(1), regul, solve)
        return PVector(self.layer_collection, vector_repr=y.squeeze(1))

    def solvePFMap(self, x, regul=1e-8, solve="solve"):
        """``(M + regul·I)⁻¹`` applied to every row of the PFMap."""
        self._check_pfmap(x)
        J = x.to_torch()
        K, n, P = J.shape
        Y = self._solve_matrix(J.reshape(K * n, P).t(), regul, solve)
        return PFMapDense(None, data=Y.t().reshape(K, n, P), layer_collection=self.layer_collection)

    def inverse(self, regul=1e-8):
        """``(M + regul·I)⁻¹`` as a PMatDense."""
        return PMatDense(self.layer_collection, None, data=torch.linalg.inv(self._damped(regul)))

    def pow(self, x, regul=0.0):
        """``(M + regul·I)^x`` through the eigendecomposition (eigenvalues below 0, which are
        round-off for a PSD matrix, are clipped to 0 for fractional powers)."""
        evals, evecs = self.get_eigendecomposition()
        ev = evals + regul
        if not float(x).is_integer():
            ev = ev.clamp(min=0)
        return PMatDense(self.layer_collection, None, data=(evecs * ev ** x) @ evecs.t())

    def logdet(self, regul=0.0):
        evals, _ = self.get_eigendecomposition()
        return torch.log(evals + regul).sum()

    def compute_eigendecomposition(self, impl="eigh"):
        """Eigendecomposition of the symmetric matrix, cached in ``evals``, ``evecs``."""
        if impl != "eigh":
            raise NotImplementedError(f"unknown eigendecomposition implementation '{impl}'; use 'eigh'")
        self.evals, self.evecs = torch.linalg.eigh(self.data)

    def get_eigendecomposition(self):
        """``(evals ascending, evecs as columns)``, computed once."""
        if getattr(self, "evals", None) is None:
            self.compute_eigendecomposition()
        return self.evals, self.evecs

    # ------------------------------------------------------------------ reductions
    def get_diag(self):
        return torch.diagonal(self.data)

    def trace(self):
        return torch.trace(self.data)

    def frobenius_norm(self):
        return torch.linalg.norm(self.data)

    def norm(self, ord=None):
        if ord in (None, "fro"):
            return self.frobenius_norm()
        return torch.linalg.matrix_norm(self.data, ord=ord)

    def to_torch(self):
        return self.data

    # ------------------------------------------------------------------ arithmetic
    def _scaled(self, x):
        return PMatDense(self.layer_collection, None, data=self.data * x)

    def __add__(self, other):
        self._check_same_kind(other)
        return PMatDense(self.layer_collection, None, data=self.data + other.data)

    def __sub__(self, other):
        self._check_same_kind(other)
        return PMatDense(self.layer_collection, None, data=self.data - other.data)


def _check_dense_fits(p, itemsize, limit_bytes=None):
    """Refuse, with the size, a dense ``P × P`` matrix that can't be allocated."""
    need = p * p * itemsize
    if limit_bytes is None:
        limit_bytes = _available_memory()
    if limit_bytes is not None and need > limit_bytes:
        raise MemoryError(
            f"a dense {p} × {p} matrix needs {need / 2**30:.1f} GiB, more than the "
            f"{limit_bytes / 2**30:.1f} GiB available; use a lower-memory representation "
            "(PMatKFAC, PMatEKFAC, PMatDiag, PMatBlockDiag, PMatImplicit) or a smaller "
            "LayerCollection")


def _available_memory():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
