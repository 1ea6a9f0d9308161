"""The low-rank-plus-diagonal block ``B = diag(α) + Jᵀ C J`` (PMatLowRank: ``α = 0``,
``C = I``; PMatEyePlusLowRank: ``α`` a scalar or one value per entry).

``J`` has shape ``(r, d)`` with ``r`` small, ``C`` is a symmetric ``(r, r)`` matrix (``None``
for the identity), ``α`` a number, a 0-d tensor or a ``(d,)`` tensor. Nothing ``d × d`` is ever
formed (except by `dense`):

* products: ``α v + Jᵀ C (J v)``, ``O(r d)``;
* with a scalar ``α' = α + λ``: the thin eigendecomposition ``Jᵀ C J = Q E Qᵀ`` (``Q`` ``d × r``
  orthonormal, from a QR of ``Jᵀ``), so ``(α' I + Q E Qᵀ)^p = α'^p I + Q ((α' + E)^p - α'^p) Qᵀ``
  for every power ``p``, and ``log det = Σ log(α' + E) + (d - r) log α'``;
* with a per-entry ``α'``: Woodbury for ``p = -1``,
  ``(D + Jᵀ C J)⁻¹ = D⁻¹ - D⁻¹ Jᵀ C (I + S C)⁻¹ J D⁻¹`` with ``S = J D⁻¹ Jᵀ`` (``r × r``),
  and the matrix determinant lemma ``det(D + JᵀCJ) = det D · det(I + S C)``.
"""
import torch

from .. import _checks
from .base import Block, is_entries, values_for_power, who_of


class LowRankBlock(Block):
    """``diag(α) + Jᵀ C J`` (see the module docstring)."""

    __slots__ = ("alpha", "J", "C")

    def __init__(self, J, alpha=0.0, C=None):
        self.J, self.alpha, self.C = J, alpha, C

    @property
    def shape(self):
        return (self.J.shape[1],)

    def _C(self):
        r = self.J.shape[0]
        return torch.eye(r, dtype=self.J.dtype, device=self.J.device) if self.C is None else self.C

    def _low(self, V):
        """``Jᵀ C J v`` for the rows of ``V``."""
        W = V @ self.J.t()
        if self.C is not None:
            W = W @ self.C
        return W @ self.J

    # ------------------------------------------------------------------ products
    def apply(self, V):
        return self.alpha * V + self._low(V)

    def quadratic(self, V):
        W = V @ self.J.t()
        q = (W * (W if self.C is None else W @ self.C)).sum(-1)
        return q + (self.alpha * V * V).sum(-1)

    # ------------------------------------------------------------------ thin eigendecomposition
    def thin_eigh(self):
        """``(E, Q)``: ``Jᵀ C J = Q diag(E) Qᵀ`` with ``Q`` ``(d, r')`` orthonormal."""
        Q, R = torch.linalg.qr(self.J.t())  # Jᵀ = Q R
        core = R @ self._C() @ R.t()
        E, W = torch.linalg.eigh((core + core.t()) / 2)
        return E, Q @ W

    def _shifted(self, damping):
        """``α + λ``: a scalar (number or 0-d tensor) or a ``(d,)`` tensor."""
        return self.alpha + damping

    def eigenvalues(self, damping=0.0):
        a = self._shifted(damping)
        if is_entries(a):
            # a diagonal plus a low-rank term shares no eigenbasis with either: dense, and only
            # where that is affordable
            if self.shape[0] > 4096:
                raise NotImplementedError(
                    "LowRankBlock.eigenvalues with a diagonal that is not a multiple of the "
                    f"identity needs the dense {self.shape[0]} × {self.shape[0]} matrix; use a "
                    "scalar damping, or to_torch() and torch.linalg.eigvalsh on a smaller model")
            return torch.linalg.eigvalsh(self.dense() + torch.diag(a - self.alpha))
        E, Q = self.thin_eigh()
        d, r = self.shape[0], E.shape[0]
        a_t = torch.as_tensor(a, dtype=E.dtype, device=E.device)
        return torch.cat([E + a_t, a_t.expand(d - r)])

    # ------------------------------------------------------------------ functions
    def _woodbury(self, D, rep, regul, what):
        """``(1/D, -C (I + S C)⁻¹)`` for ``(D + JᵀCJ)⁻¹ = diag(1/D) + (J/D)ᵀ C' (J/D)``."""
        _checks.check_invertible(D, rep, what, regul, exact=True,
                                 detail="a diagonal entry plus regul is 0")
        JD = self.J / D
        S = JD @ self.J.t()
        C = self._C()
        cap = torch.eye(S.shape[0], dtype=S.dtype, device=S.device) + S @ C
        try:
            Cn = -C @ torch.linalg.inv(cap)
        except torch.linalg.LinAlgError:
            raise _checks.singular_error(rep, what, regul,
                                         "the capacitance matrix I + S C is singular") from None
        return 1.0 / D, JD, (Cn + Cn.t()) / 2

    def matpower(self, p, damping=0.0, who=None):
        rep, regul = who_of(self, damping, who)
        a = self._shifted(damping)
        if float(p) == 1.0:
            return LowRankBlock(self.J, a, self.C)
        if is_entries(a):
            if float(p) != -1.0:
                raise NotImplementedError(
                    f"LowRankBlock.matpower({p}) with a per-entry damping: only p = 1 and p = -1 "
                    "(Woodbury) keep the low-rank-plus-diagonal form; damp with a scalar for "
                    "other powers")
            invD, JD, Cn = self._woodbury(a, rep, regul, f"pow({p})")
            return LowRankBlock(JD, invD, Cn)
        E, Q = self.thin_eigh()
        d, r = self.shape[0], E.shape[0]
        a_t = torch.as_tensor(a, dtype=E.dtype, device=E.device)
        vals = values_for_power(torch.cat([E + a_t, a_t.expand(d - r)]), p, rep, regul)
        top, rest = vals[:r], vals[r:]
        base = rest[0] ** p if d > r else torch.zeros((), dtype=E.dtype, device=E.device)
        core = top ** p - base
        return LowRankBlock(Q.t(), base, torch.diag(core))

    def solve(self, V, damping=0.0, who=None):
        rep, regul = who_of(self, damping, who)
        a = self._shifted(damping)
        if is_entries(a):
            invD, JD, Cn = self._woodbury(a, rep, regul, "solve")
            return LowRankBlock(JD, invD, Cn).apply(V)
        return self.matpower(-1.0, damping, who).apply(V)

    def logdet(self, damping=0.0, who=None):
        rep, regul = who_of(self, damping, who)
        a = self._shifted(damping)
        if not is_entries(a):
            return _checks.logdet_of(self.eigenvalues(damping), rep, regul)
        # matrix determinant lemma; positive definite needs D > 0 and det(I + S C) > 0
        low = float(a.detach().min())
        if low <= 0:
            if low == 0:
                raise _checks.singular_error(rep, "logdet", regul,
                                             "a diagonal entry plus regul is 0")
            raise _checks.not_psd_error(rep, "logdet", low, regul)
        S = (self.J / a) @ self.J.t()
        cap = torch.eye(S.shape[0], dtype=S.dtype, device=S.device) + S @ self._C()
        sign, lad = torch.linalg.slogdet(cap)
        if float(sign.detach()) <= 0:
            raise _checks.not_psd_error(rep, "logdet", float("nan"), regul)
        return torch.log(a).sum() + lad

    # ------------------------------------------------------------------ reductions
    def diag(self):
        CJ = self.J if self.C is None else self.C @ self.J
        return (self.J * CJ).sum(0) + self.alpha

    def dense(self):
        CJ = self.J if self.C is None else self.C @ self.J
        low = self.J.t() @ CJ
        if is_entries(self.alpha):
            return low + torch.diag(self.alpha)
        return low + self.alpha * torch.eye(self.shape[0], dtype=low.dtype, device=low.device)

    def trace(self):
        return self.diag().sum()

    def frobenius_sq(self):
        D = self.dense()
        return (D * D).sum() if self.shape[0] <= 4096 else super().frobenius_sq()

    # ------------------------------------------------------------------ arithmetic
    def scaled(self, x):
        C = self._C() * x
        return LowRankBlock(self.J, self.alpha * x, C)

    def add(self, other):
        from .diag import DiagBlock
        from .identity import ScaledIdentityBlock
        if isinstance(other, ScaledIdentityBlock):
            return LowRankBlock(self.J, self.alpha + other.s, self.C)
        if isinstance(other, DiagBlock) and other.shape == self.shape:
            return LowRankBlock(self.J, self.alpha + other.d, self.C)
        if isinstance(other, LowRankBlock) and other.shape == self.shape:
            return LowRankBlock(torch.cat([self.J, other.J]), self.alpha + other.alpha,
                                torch.block_diag(self._C(), other._C()))
        return super().add(other)
