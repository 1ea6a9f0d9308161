"""``PMatEye``: a scaled identity ``s·I`` (e.g. an isotropic prior precision)."""
import torch

from ..map import PFMapDense
from ..vector import PVector
from . import _checks
from ._prior import scalar_or_prior
from .abstract import PMatAbstract, check_reduction, reduce_forms, resolve_layer_collection


class PMatEye(PMatAbstract):
    """``scaling · I`` in the parameter space of ``layer_collection``; nothing else is stored.

    Args:
        layer_collection: the parameter layout (optional when ``generator`` is given: its
            collection is used).
        scaling: a scalar (0-dim tensor or number); its dtype and device are those of
            ``to_torch()`` and ``get_diag()``.
    """

    def __init__(self, layer_collection=None, scaling=torch.tensor(1.0), generator=None, data=None,
                 **kwargs):
        if data is not None:  # PMatEye(lc, data=s) is accepted too
            scaling = data
        if not torch.is_tensor(scaling):
            scaling = torch.tensor(float(scaling))
        if scaling.dim() != 0:
            raise ValueError(
                f"PMatEye's scaling must be a scalar, got shape {tuple(scaling.shape)}; for a "
                "diagonal with different entries use PMatDiag")
        self.layer_collection = resolve_layer_collection(layer_collection, generator, "PMatEye")
        self.generator = None
        self.data = scaling

    @property
    def scaling(self):
        return self.data

    @property
    def dtype(self):
        return self.data.dtype

    def _new(self, s):
        return PMatEye(self.layer_collection, scaling=s)

    def _check_lc(self, other):
        if other.layer_collection != self.layer_collection:
            raise ValueError("the two matrices are built on different LayerCollections")

    # ------------------------------------------------------------------ products
    def mv(self, v):
        self._check_pvector(v)
        return PVector(self.layer_collection, vector_repr=self.data * v.get_flat_representation())

    def vTMv(self, v):
        self._check_pvector(v)
        f = v.get_flat_representation()
        return self.data * torch.dot(f, f)

    def mmap(self, pfmap):
        self._check_pfmap(pfmap)
        return PFMapDense(self.layer_collection, data=pfmap.to_torch() * self.data)

    def mapTMmap(self, pfmap, reduction="sum"):
        """``q[k, i] = s ||J[k, i]||²``: ``'diag'`` ``(K, n)``, ``'sum'`` ``Σ_k``, ``(n,)``."""
        self._check_pfmap(pfmap)
        check_reduction(reduction)
        J = pfmap.to_torch()
        return reduce_forms(self.data * (J * J).sum(dim=-1), reduction)

    def mm(self, other):
        """Product with another PMatEye; ``s·I @ A = s·A`` for any other representation."""
        if isinstance(other, PMatEye):
            self._check_lc(other)
            return self._new(self.data * other.data)
        if isinstance(other, PMatAbstract):
            self._check_lc(other)
            return other * self.data
        raise TypeError(f"mm takes a PMat, got {type(other).__name__}")

    # ------------------------------------------------------------------ solves and functions
    def _as_diag(self, regul, what):
        """For a per-layer / per-parameter ``Λ``: the PMatDiag ``s·I + Λ`` and the prior
        (``regul`` 0 left to apply); for a scalar ``λ``: ``(None, λ)``."""
        scalar, prior = scalar_or_prior(regul, self.layer_collection, "PMatEye", what)
        if prior is None:
            return None, scalar
        from .diag import PMatDiag
        return PMatDiag(self.layer_collection, None,
                        data=self.get_diag() + prior.flat(self.data)), prior

    def _damped_invertible(self, regul, what):
        d = self.data + regul
        _checks.check_invertible(d.reshape(1), "PMatEye", what, regul, exact=True,
                                 detail="scaling + regul = 0")
        return d

    def solvePVec(self, v, regul=0.0, solve="default"):
        """``v / (s + regul)``; a per-layer / per-parameter ``Λ`` (dict, PVector, PMatDiag):
        ``v / (s + Λ)``."""
        self._check_pvector(v)
        D, regul = self._as_diag(regul, "solve")
        if D is not None:
            return D.solvePVec(v, regul=0.0)
        return PVector(self.layer_collection,
                       vector_repr=v.get_flat_representation() / self._damped_invertible(regul, "solve"))

    def solvePFMap(self, x, regul=0.0, solve="default"):
        self._check_pfmap(x)
        D, regul = self._as_diag(regul, "solve")
        if D is not None:
            return D.solvePFMap(x, regul=0.0)
        return PFMapDense(self.layer_collection,
                          data=x.to_torch() / self._damped_invertible(regul, "solve"))

    def solve(self, x, regul=0.0, solve="default", **kwargs):
        """``(s + regul)⁻¹ x`` for a PVector or PFMap (exact)."""
        return super().solve(x, regul=regul, solve=solve, **kwargs)

    def inverse(self, regul=0.0):
        """``((s + regul)·I)⁻¹`` as a PMatEye (a PMatDiag for a per-layer / per-parameter
        ``Λ``)."""
        D, regul = self._as_diag(regul, "inverse")
        if D is not None:
            return D.inverse(regul=0.0)
        return self._new(1.0 / self._damped_invertible(regul, "inverse"))

    def pow(self, x, regul=0.0):
        """``((s + regul)·I)^x`` as a PMatEye (a PMatDiag for a per-layer / per-parameter
        ``Λ``)."""
        D, regul = self._as_diag(regul, f"pow({x})")
        if D is not None:
            return D.pow(x, regul=0.0)
        d = self._damped_invertible(regul, f"pow({x})") if float(x) < 0 else self.data + regul
        if not float(x).is_integer():
            d = _checks.psd_values(d.reshape(1), "PMatEye", f"pow({x})", regul, exact=True)[0]
        return self._new(d ** x)

    def logdet(self, regul=0.0):
        """``P · log(s + regul)`` (``Σ_p log(s + Λ_pp)`` for a per-layer / per-parameter
        ``Λ``)."""
        D, regul = self._as_diag(regul, "logdet")
        if D is not None:
            return D.logdet(regul=0.0)
        return _checks.logdet_of((self.data + regul).reshape(1), "PMatEye", regul, exact=True,
                                 multiplicity=self.layer_collection.numel())

    def pinv(self, atol=1e-8):
        """Pseudo-inverse: ``(1/s)·I``, or the zero matrix when ``|s| ≤ atol``."""
        if float(self.data.abs()) <= atol:
            return self._new(torch.zeros_like(self.data))
        return self._new(1.0 / self.data)

    # ------------------------------------------------------------------ reductions
    def get_diag(self):
        return self.data * torch.ones(self.layer_collection.numel(), dtype=self.data.dtype,
                                      device=self.data.device)

    def trace(self):
        return self.layer_collection.numel() * self.data

    def frobenius_norm(self):
        return self.data.abs() * self.layer_collection.numel() ** 0.5

    def _singular_values(self):
        return self.data.abs().reshape(1)  # all P singular values are |s|

    def to_torch(self):
        """The dense ``(P, P)`` matrix ``s·I`` (allocates ``P²``; refused with a MemoryError
        naming the size when it can't fit)."""
        _checks.check_dense_fits(self.layer_collection.numel(), self.data.element_size(),
                                 what="PMatEye.to_torch(): a dense")
        return self.data * torch.eye(self.layer_collection.numel(), dtype=self.data.dtype,
                                     device=self.data.device)

    # ------------------------------------------------------------------ arithmetic
    def _scaled(self, x):
        return self._new(self.data * x)

    def __add__(self, other):
        if isinstance(other, PMatEye):
            self._check_lc(other)
            return self._new(self.data + other.data)
        if isinstance(other, PMatAbstract):
            # the other representation knows how to absorb a scaled identity (Diag, BlockDiag,
            # QuasiDiag, LowRank), or says it can't
            return other.__add__(self)
        return NotImplemented

    __radd__ = __add__

    def __sub__(self, other):
        if isinstance(other, PMatEye):
            self._check_lc(other)
            return self._new(self.data - other.data)
        if isinstance(other, PMatAbstract):
            return (-other).__add__(self)
        return NotImplemented
