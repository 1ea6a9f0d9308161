"""``PMatDense``: the full ``P × P`` matrix."""
import torch

from ..map import PFMapDense
from ..vector import PVector
from . import _spectral
from ._spectral import eigvals_for_power, logdet_from_eigvals
from .abstract import PMatAbstract, check_reduction, reduce_forms
from .eye import PMatEye


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
        return PFMapDense(self.layer_collection, data=pfmap.to_torch() @ self.data)

    def mapTMmap(self, pfmap, reduction="sum"):
        """``q[k, i] = J[k, i] M J[k, i]ᵀ``: ``'diag'`` ``(K, n)``, ``'sum'`` ``Σ_k``, ``(n,)``."""
        self._check_pfmap(pfmap)
        check_reduction(reduction)
        J = pfmap.to_torch()
        return reduce_forms(torch.einsum("kip,kip->ki", J @ self.data, J), reduction)

    def mm(self, other):
        self._check_same_kind(other)
        return PMatDense(self.layer_collection, None, data=self.data @ other.data)

    # ------------------------------------------------------------------ solves and functions
    def _damped(self, regul):
        return self.data + regul * torch.eye(self.data.shape[0], dtype=self.data.dtype,
                                             device=self.data.device)

    def _factorization(self, regul, solve):
        """The factorization of ``M + regul·I`` for ``solve`` ('lu': ``lu_factor``, 'cholesky':
        the lower Cholesky factor), computed once per ``(solve, regul)``.

        Cache policy: a matrix object is immutable (every operation returns a new object), so a
        factorization never goes stale and is never invalidated. Only the *last* ``(solve,
        regul)`` is kept, because each factorization is as large as ``M`` (``P²``): a second
        solve with the same regul costs two triangular solves (``O(P²)``, about one ``mv``)
        instead of an ``O(P³)`` factorization, and a sweep over reguls does not pile up ``P²``
        tensors. The cache is not pickled (see ``__getstate__``): it is recomputed on demand.
        """
        key = (solve, float(regul))
        cached = self.__dict__.get("_solve_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        self._solve_cache = None  # free the previous factorization before making the new one
        A = self._damped(regul)
        fac = torch.linalg.cholesky(A) if solve == "cholesky" else torch.linalg.lu_factor(A)
        del A
        self._solve_cache = (key, fac)
        return fac

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_solve_cache", None)  # P² and recomputable: not worth pickling
        return state

    def _solve_matrix(self, b, regul, solve):
        """Solve ``(M + regul I) X = B`` for the columns of ``b`` (shape (P, m)).

        'solve' (default, LU with partial pivoting: the same factorization and result as
        ``torch.linalg.solve``) and 'cholesky' reuse the factorization of a previous call with
        the same regul (see :meth:`_factorization`); 'eigh' reuses the eigendecomposition."""
        if solve in ("default", "solve"):
            LU, pivots = self._factorization(regul, "lu")
            return torch.linalg.lu_solve(LU, pivots, b)
        if solve == "cholesky":
            return torch.cholesky_solve(b, self._factorization(regul, "cholesky"))
        if solve == "lstsq":
            return torch.linalg.lstsq(self._damped(regul), b).solution
        if solve in ("eigh", "eigendecomposition"):  # the second: nngeometry 0.4's name
            evals, evecs = self.get_eigendecomposition()
            return evecs @ ((evecs.t() @ b) / (evals + regul).unsqueeze(1))
        raise ValueError(f"unknown solve '{solve}': use 'solve', 'cholesky', 'lstsq' or 'eigh' "
                         "(alias 'eigendecomposition')")

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
        return PFMapDense(self.layer_collection, data=Y.t().reshape(K, n, P))

    def inverse(self, regul=1e-8):
        """``(M + regul·I)⁻¹`` as a PMatDense."""
        return PMatDense(self.layer_collection, None, data=torch.linalg.inv(self._damped(regul)))

    def pow(self, x, regul=0.0):
        """``(M + regul·I)^x`` through the eigendecomposition (for fractional powers, negative
        round-off eigenvalues are clipped to 0 and a genuinely indefinite matrix is refused)."""
        evals, evecs = self.get_eigendecomposition()
        ev = eigvals_for_power(evals + regul, x)
        return PMatDense(self.layer_collection, None, data=(evecs * ev ** x) @ evecs.t())

    def logdet(self, regul=0.0):
        evals, _ = self.get_eigendecomposition()
        return logdet_from_eigvals(evals + regul)

    def compute_eigendecomposition(self, impl="eigh"):
        """Eigendecomposition ``M = V diag(λ) Vᵀ`` of the symmetric matrix, cached in ``evals``
        (ascending) and ``evecs`` (columns, ``(P, P)``).

        ``impl='eigh'`` (default): ``torch.linalg.eigh``. ``impl='svd'``: from the SVD
        ``M = U diag(s) Vᵀ``; for a symmetric matrix the right singular vectors are eigenvectors
        and ``λ_i = ±s_i``, the sign read from the Rayleigh quotient ``v_iᵀ M v_i`` (exact for
        PSD matrices; for an indefinite matrix with two eigenvalues ``λ`` and ``-λ`` the SVD
        mixes their eigenvectors: use 'eigh').
        """
        if impl == "eigh":
            self.evals, self.evecs = _spectral.eigh(self.data)
        elif impl == "svd":
            _, s, Vh = torch.linalg.svd(self.data)
            V = Vh.transpose(-2, -1)
            signs = torch.where(((self.data @ V) * V).sum(dim=0) < 0, -1.0, 1.0).to(s.dtype)
            evals = s * signs
            order = torch.argsort(evals)
            self.evals, self.evecs = evals[order], V[:, order]
        else:
            raise NotImplementedError(
                f"unknown eigendecomposition implementation '{impl}'; use 'eigh' or 'svd'")

    def get_eigendecomposition(self):
        """``(evals ascending, evecs as columns)``, computed once."""
        if getattr(self, "evals", None) is None:
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
        the inverse of :meth:`project_to_diag`."""
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
        return PMatDense(self.layer_collection, None, data=self.data + self._dense_operand(other))

    __radd__ = __add__

    def __sub__(self, other):
        return PMatDense(self.layer_collection, None, data=self.data - self._dense_operand(other))

    def _dense_operand(self, other):
        """Another PMatDense's data, or a PMatEye's ``s·I`` (e.g. a prior precision)."""
        if isinstance(other, PMatEye):
            if other.layer_collection != self.layer_collection:
                raise ValueError("the two matrices are built on different LayerCollections")
            return other.scaling * torch.eye(self.data.shape[0], dtype=self.data.dtype,
                                             device=self.data.device)
        self._check_same_kind(other)
        return other.data


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
    """Bytes this process can still allocate, as far as is known: the least of the system's
    ``MemAvailable``, what the cgroup's memory limit leaves (containers, where ``MemAvailable``
    shows the host) and what the address-space limit ``RLIMIT_AS`` leaves; None if none is
    known (then the dense matrix is attempted)."""
    known = []
    meminfo = _read_kb("/proc/meminfo", "MemAvailable:")
    if meminfo is not None:
        known.append(meminfo)
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 2 ** 60:  # huge = unlimited
            known.append(max(limit - usage, 0))
            break
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            used = _read_kb("/proc/self/status", "VmSize:")
            known.append(max(soft - (used or 0), 0))
    except (ImportError, OSError, ValueError):
        pass
    return min(known) if known else None


def _read_kb(path, key):
    """The value in bytes of a ``key: N kB`` line of a /proc file, or None."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _read_int(path):
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):  # missing file, or "max" (no limit)
        return None
