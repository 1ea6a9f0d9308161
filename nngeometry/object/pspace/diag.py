"""``PMatDiag``: the diagonal of the matrix, nothing else (a container of one
`DiagBlock`)."""
import torch

from ..vector import PVector
from . import _checks
from ._statistics import check_tensor
from .abstract import PMatAbstract
from .blocks import DiagBlock, ScaledIdentityBlock


class PMatDiag(PMatAbstract):
    """Diagonal approximation ``diag(M)`` of ``M = (1/n) Σ_x J(x)ᵀ J(x)``.

    ``data`` is the ``(P,)`` tensor of diagonal entries ``M_pp = (1/n) Σ_{x,k} J_k(x)_p²`` in the
    collection's layout. Every operation is ``O(P)`` (``O(P)`` per row of a PFMap), and every
    function of ``M + Λ`` is exact for every kind of ``regul`` (a sum of diagonals): products,
    solves, powers, log-determinants come from the block's primitives (see ``abstract``).
    """

    statistic = "get_covariance_diag"

    def _build(self, examples, **kwargs):
        return self._data_from_statistics(
            self.layer_collection,
            self.generator.get_covariance_diag(examples, self.layer_collection))

    @classmethod
    def _check_statistics(cls, layer_collection, statistics):
        check_tensor(cls.__name__, statistics, (layer_collection.numel(),), "the diagonal")

    @classmethod
    def _data_from_statistics(cls, layer_collection, statistics):
        """``statistics``: the ``(P,)`` diagonal of ``(1/n) Σ_x J(x)ᵀ J(x)``, stored as it is."""
        return statistics

    def _new(self, d):
        return PMatDiag(self.layer_collection, None, data=d)

    # ------------------------------------------------------------------ the container
    def _blocks(self):
        return [DiagBlock(self.data)]

    def _from_blocks(self, blocks):
        (b,) = blocks
        if isinstance(b, ScaledIdentityBlock):
            return self._new(b.diag())
        return self._new(b.d)

    def _like(self):
        return self.data

    # ------------------------------------------------------------------ the rest
    def mv(self, v):
        # the hot path of natural-gradient loops: one product, no per-block dispatch
        self._check_pvector(v)
        return PVector(self.layer_collection, vector_repr=self.data * v.get_flat_representation())

    def vTMv(self, v):
        # one fused product and reduction (Σ d v² as ⟨v, d·v⟩: one temporary, not two)
        self._check_pvector(v)
        f = v.get_flat_representation()
        return torch.dot(f, self.data * f)

    def solvePVec(self, x, regul=1e-8, solve="default", damping="exact"):
        """``(M + Λ)⁻¹ x``, exact. For a scalar ``regul`` (the hot path of natural-gradient
        and EWC loops) the reciprocal ``1/(M_pp + λ)`` is computed and checked once per
        ``(data, λ)`` and reused: one product per call."""
        if type(regul) in (float, int) and damping == "exact" and solve == "default":
            self._check_pvector(x)
            inv = _checks.cached(self.__dict__, "_solve_cache", ("reciprocal", float(regul)),
                                 lambda: self._damped_reciprocal(float(regul)), self.data)
            return PVector(self.layer_collection,
                           vector_repr=x.get_flat_representation() * inv)
        return super().solvePVec(x, regul=regul, solve=solve, damping=damping)

    def _damped_reciprocal(self, regul):
        # the block's own checks (singular entries) on the first call only
        return DiagBlock(self.data).matpower(-1, regul, (type(self).__name__, regul)).d

    def mm(self, other):
        """Product with another PMatDiag (still diagonal)."""
        self._check_same_kind(other)
        return self._new(self.data * other.data)

    def pinv(self, atol=1e-8):
        """Pseudo-inverse: ``1/M_pp`` where ``|M_pp| > atol``, 0 elsewhere, as a PMatDiag."""
        keep = self.data.abs() > atol
        safe = torch.where(keep, self.data, torch.ones_like(self.data))
        return self._new(torch.where(keep, 1.0 / safe, torch.zeros_like(self.data)))

    def get_diag(self):
        return self.data

    def _singular_values(self):
        return self.data.abs()
