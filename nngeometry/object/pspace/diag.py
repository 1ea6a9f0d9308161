"""``PMatDiag``: the diagonal of the matrix, nothing else."""
import torch

from ..map import PFMapDense
from ..vector import PVector
from . import _checks
from ._prior import scalar_or_prior
from .abstract import PMatAbstract, check_reduction, reduce_forms
from .eye import PMatEye


class PMatDiag(PMatAbstract):
    """Diagonal approximation ``diag(M)`` of ``M = (1/n) Σ_x J(x)ᵀ J(x)``.

    ``data`` is the ``(P,)`` tensor of diagonal entries ``M_pp = (1/n) Σ_{x,k} J_k(x)_p²`` in the
    collection's layout. Every operation is ``O(P)`` (``O(P)`` per row of a PFMap), and the
    damped inverse ``(diag(M) + λI)⁻¹`` is exact.
    """

    def _build(self, examples, **kwargs):
        return self.generator.get_covariance_diag(examples, self.layer_collection)

    def _new(self, d):
        return PMatDiag(self.layer_collection, None, data=d)

    # ------------------------------------------------------------------ products
    def mv(self, v):
        self._check_pvector(v)
        return PVector(self.layer_collection, vector_repr=self.data * v.get_flat_representation())

    def vTMv(self, v):
        self._check_pvector(v)
        f = v.get_flat_representation()
        return (self.data * f * f).sum()

    def mmap(self, pfmap):
        self._check_pfmap(pfmap)
        return PFMapDense(self.layer_collection, data=pfmap.to_torch() * self.data)

    def mapTMmap(self, pfmap, reduction="sum"):
        """``q[k, i] = Σ_p M_pp J[k, i, p]²``: ``'diag'`` ``(K, n)``, ``'sum'`` ``Σ_k``, ``(n,)``."""
        self._check_pfmap(pfmap)
        check_reduction(reduction)
        J = pfmap.to_torch()
        return reduce_forms(torch.einsum("kip,p,kip->ki", J, self.data, J), reduction)

    def mm(self, other):
        """Product with another PMatDiag (still diagonal)."""
        self._check_same_kind(other)
        return self._new(self.data * other.data)

    # ------------------------------------------------------------------ solves and functions
    def _damped(self, regul):
        """The diagonal of ``M + Λ``; ``regul`` gives ``Λ``: a scalar ``λ`` (``λI``), a dict
        ``{layer_id: λ_l}`` (0 for the layers left out), a PVector (one value per parameter),
        a PMatEye or a PMatDiag. All are exact here (a sum of diagonals)."""
        regul = _as_checked(regul, self.layer_collection)
        return self.data + (regul.flat(self.data) if hasattr(regul, "flat") else regul)

    def _damped_invertible(self, regul, what):
        """``diag(M) + regul`` after refusing a zero entry (shared singular-matrix error; the
        entries are stored exactly, so only an exact 0 is singular)."""
        regul = _as_checked(regul, self.layer_collection)
        d = self._damped(regul)
        _checks.check_invertible(d, "PMatDiag", what, regul, exact=True,
                                 detail=f"{int((d == 0).sum())} diagonal entries of M + regul·I "
                                        "are 0 (parameters with no gradient)")
        return d

    def solvePVec(self, x, regul=1e-8, solve="default"):
        """``(diag(M) + regul·I)⁻¹ x`` (exact; ``solve`` is accepted for API compatibility and
        must be ``'default'`` or ``'solve'``)."""
        self._check_pvector(x)
        _check_solve(solve)
        return PVector(self.layer_collection,
                       vector_repr=x.get_flat_representation() / self._damped_invertible(regul, "solve"))

    def solvePFMap(self, x, regul=1e-8, solve="default"):
        """``(diag(M) + regul·I)⁻¹`` applied to every row of the PFMap."""
        self._check_pfmap(x)
        _check_solve(solve)
        return PFMapDense(self.layer_collection,
                          data=x.to_torch() / self._damped_invertible(regul, "solve"))

    def inverse(self, regul=1e-8):
        """``(diag(M) + regul·I)⁻¹`` as a PMatDiag."""
        return self._new(1.0 / self._damped_invertible(regul, "inverse"))

    def pow(self, x, regul=0.0):
        """``(diag(M) + regul·I)^x`` as a PMatDiag."""
        d = self._damped_invertible(regul, f"pow({x})") if float(x) < 0 else self._damped(regul)
        if not float(x).is_integer():
            d = _checks.psd_values(d, "PMatDiag", f"pow({x})",
                                   _as_checked(regul, self.layer_collection), exact=True)
        return self._new(d ** x)

    def logdet(self, regul=0.0):
        """``log det(diag(M) + Λ) = Σ_p log(M_pp + Λ_pp)``."""
        regul = _as_checked(regul, self.layer_collection)
        return _checks.logdet_of(self._damped(regul), "PMatDiag", regul, exact=True)

    def pinv(self, atol=1e-8):
        """Pseudo-inverse: ``1/M_pp`` where ``|M_pp| > atol``, 0 elsewhere, as a PMatDiag."""
        keep = self.data.abs() > atol
        safe = torch.where(keep, self.data, torch.ones_like(self.data))
        return self._new(torch.where(keep, 1.0 / safe, torch.zeros_like(self.data)))

    # ------------------------------------------------------------------ reductions
    def get_diag(self):
        return self.data

    def trace(self):
        return self.data.sum()

    def frobenius_norm(self):
        return torch.linalg.vector_norm(self.data)

    def _singular_values(self):
        return self.data.abs()

    def to_torch(self):
        """The dense ``(P, P)`` diagonal matrix (allocates ``P²``; refused with a MemoryError
        naming the size when it can't fit)."""
        _checks.check_dense_fits(self.data.numel(), self.data.element_size(),
                                 what="PMatDiag.to_torch(): a dense")
        return torch.diag(self.data)

    # ------------------------------------------------------------------ arithmetic
    def _scaled(self, x):
        return self._new(self.data * x)

    def __add__(self, other):
        if isinstance(other, PMatEye):
            _check_lc(self, other)
            return self._new(self.data + other.scaling)
        self._check_same_kind(other)
        return self._new(self.data + other.data)

    __radd__ = __add__

    def __sub__(self, other):
        if isinstance(other, PMatEye):
            _check_lc(self, other)
            return self._new(self.data - other.scaling)
        self._check_same_kind(other)
        return self._new(self.data - other.data)


def _as_checked(regul, layer_collection):
    """What the shared checks read of ``regul``: the scalar, or the normalised prior (a prior
    already normalised is returned as it is)."""
    if hasattr(regul, "flat"):
        return regul
    scalar, prior = scalar_or_prior(regul, layer_collection, "PMatDiag", "solve")
    return scalar if prior is None else prior


def _check_solve(solve):
    if solve not in ("default", "solve"):
        raise ValueError(f"unknown solve '{solve}' for a diagonal matrix: use 'default'")


def _check_lc(a, b):
    if a.layer_collection != b.layer_collection:
        raise ValueError("the two matrices are built on different LayerCollections")
