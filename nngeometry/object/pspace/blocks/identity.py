"""The scaled identity block ``s·I`` (PMatEye; a prior ``λI``)."""
import torch

from .. import _checks
from .base import Block, is_entries, caller_of, values_for_power


class ScaledIdentityBlock(Block):
    """``s·I`` on a layout of shape ``shape``; ``s`` a number or a 0-d tensor."""

    __slots__ = ("s", "_shape")

    def __init__(self, s, shape):
        self.s = s
        self._shape = tuple(shape)

    @property
    def shape(self):
        return self._shape

    def _tensor(self, like=None):
        if torch.is_tensor(self.s):
            return self.s
        return torch.as_tensor(self.s, dtype=None if like is None else like.dtype)

    def apply(self, V):
        return self.s * V

    def quadratic(self, V):
        return self.s * (V * V).sum(dim=self.layout_dims)

    def _as_diag(self, damping):
        from .diag import DiagBlock
        return DiagBlock(self.s + damping)

    def solve(self, V, damping=0.0, caller=None):
        if is_entries(damping):
            return self._as_diag(damping).solve(V, 0.0, caller_of(self, damping, caller))
        rep, regul = caller_of(self, damping, caller)
        v = self._tensor(V) + damping
        _checks.check_invertible(v.reshape(1), rep, "solve", regul, exact=True,
                                 detail="scaling + regul = 0")
        return V / v

    def eigenvalues(self, damping=0.0):
        s = self._tensor()
        return (s + damping) * torch.ones(self.shape, dtype=s.dtype, device=s.device).reshape(-1)

    def matpower(self, p, damping=0.0, caller=None):
        if is_entries(damping):
            return self._as_diag(damping).matpower(p, 0.0, caller_of(self, damping, caller))
        rep, regul = caller_of(self, damping, caller)
        v = (self._tensor() + damping).reshape(1)
        if float(p) < 0:
            _checks.check_invertible(v, rep, f"pow({p})", regul, exact=True,
                                     detail="scaling + regul = 0")
        v = values_for_power(v, p, rep, regul, exact=True)
        return ScaledIdentityBlock(v[0] ** p, self.shape)

    def logdet(self, damping=0.0, caller=None):
        if is_entries(damping):
            return self._as_diag(damping).logdet(0.0, caller_of(self, damping, caller))
        rep, regul = caller_of(self, damping, caller)
        return _checks.logdet_of((self._tensor() + damping).reshape(1), rep, regul, exact=True,
                                 multiplicity=self.numel)

    def diag(self):
        s = self._tensor()
        return s * torch.ones(self.shape, dtype=s.dtype, device=s.device)

    def dense(self):
        s = self._tensor()
        return s * torch.eye(self.numel, dtype=s.dtype, device=s.device)

    def trace(self):
        return self.numel * self._tensor()

    def frobenius_sq(self):
        s = self._tensor()
        return self.numel * s * s

    def scaled(self, x):
        return ScaledIdentityBlock(self.s * x, self.shape)

    def add(self, other):
        if isinstance(other, ScaledIdentityBlock):
            return ScaledIdentityBlock(self.s + other.s, self.shape)
        return other.add(self)  # every block absorbs a scaled identity it can represent

