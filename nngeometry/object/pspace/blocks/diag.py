"""The diagonal block ``diag(d)``: every primitive is elementwise and exact, for any damping."""
import torch

from .. import _checks
from .base import Block, caller_of, values_for_power


class DiagBlock(Block):
    """``diag(d)``, ``d`` a tensor of the block's layout shape (``(p,)`` for a layer, or the
    whole flat vector for PMatDiag)."""

    __slots__ = ("d",)

    def __init__(self, d):
        self.d = d

    @property
    def shape(self):
        return tuple(self.d.shape)

    def apply(self, V):
        return V * self.d

    def quadratic(self, V):
        if self.d.dim() == 1:
            return (V * self.d * V).sum(-1)
        return (V * V * self.d).sum(dim=self.layout_dims)

    def solve(self, V, damping=0.0, caller=None):
        rep, regul = caller_of(self, damping, caller)
        dd = self.d + damping
        _checks.check_invertible(dd, rep, "solve", regul, exact=True,
                                 detail=f"{int((dd == 0).sum())} diagonal entries of M + regul "
                                        "are 0 (parameters with no gradient)")
        return V / dd

    def eigenvalues(self, damping=0.0):
        return (self.d + damping).reshape(-1)

    def matpower(self, p, damping=0.0, caller=None):
        rep, regul = caller_of(self, damping, caller)
        dd = self.d + damping
        if float(p) < 0:
            _checks.check_invertible(dd, rep, f"pow({p})", regul, exact=True,
                                     detail=f"{int((dd == 0).sum())} diagonal entries of M + "
                                            "regul are 0 (parameters with no gradient)")
        dd = values_for_power(dd, p, rep, regul, exact=True)
        return DiagBlock(dd ** p)

    def logdet(self, damping=0.0, caller=None):
        rep, regul = caller_of(self, damping, caller)
        return _checks.logdet_of((self.d + damping).reshape(-1), rep, regul, exact=True)

    def diag(self):
        return self.d

    def dense(self):
        return torch.diag(self.d.reshape(-1))

    def trace(self):
        return self.d.sum()

    def frobenius_sq(self):
        return (self.d * self.d).sum()

    def scaled(self, x):
        return DiagBlock(self.d * x)

    def add(self, other):
        from .identity import ScaledIdentityBlock
        if isinstance(other, DiagBlock):
            return DiagBlock(self.d + other.d)
        if isinstance(other, ScaledIdentityBlock):
            return DiagBlock(self.d + other.s)
        return super().add(other)
