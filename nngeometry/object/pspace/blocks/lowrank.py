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
from .base import Block, is_entries, values_for_power, caller_of


class LowRankBlock(Block):
    """``diag(α) + Jᵀ C J`` (see the module docstring)."""

    __slots__ = ("alpha", "J", "C", "_eig", "_gram", "_chol", "_wood", "_thin")

    def __init__(self, J, alpha=0.0, C=None, eig=None):
        self.J, self.alpha, self.C = J, alpha, C
        # ``eig``: a function returning the nonzero eigenpairs ``(E, V)`` of ``JᵀJ`` (a
        # container's cached eigendecomposition), for ``solve(method='eigh')``
        self._eig = eig
        self._gram = None  # J Jᵀ, computed once
        self._chol = None  # (damping key, Cholesky factor of λI + J Jᵀ) of the last solve
        self._wood = None  # (damping key, Woodbury factors) of the last scalar damping
        self._thin = None  # the thin eigendecomposition, computed once

    def _pure(self):
        """Whether the block is ``JᵀJ`` (``α = 0``, ``C = I``): PMatLowRank's."""
        return self.C is None and not torch.is_tensor(self.alpha) and self.alpha == 0

    def gram(self):
        """``S = J Jᵀ`` (``r × r``), computed once (not kept when ``J`` records a graph)."""
        if self._gram is not None:
            return self._gram
        S = self.J @ self.J.t()
        if not _checks.needs_graph(self.J):
            self._gram = S
        return S

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
        if self._pure():
            return self._low(V)
        return self.alpha * V + self._low(V)

    def quadratic(self, V):
        W = V @ self.J.t()
        q = (W * (W if self.C is None else W @ self.C)).sum(-1)
        if self._pure():
            return q
        return q + (self.alpha * V * V).sum(-1)

    # ------------------------------------------------------------------ thin eigendecomposition
    def thin_eigh(self):
        """``(E, Q)``: ``Jᵀ C J = Q diag(E) Qᵀ`` with ``Q`` ``(d, r')`` orthonormal,
        ``r' = min(r, d)`` (computed once, unless ``J`` or ``C`` records a graph; in float32
        for half-precision factors)."""
        if self._thin is not None:
            return self._thin
        J = self.J
        Q, R = torch.linalg.qr(_checks.upcast(J.t()))  # Jᵀ = Q R
        core = R @ _checks.upcast(self._C()) @ R.t()
        E, W = torch.linalg.eigh((core + core.t()) / 2)
        out = E.to(J.dtype), (Q @ W).to(J.dtype)
        if not _checks.needs_graph(J, self.C):
            self._thin = out
        return out

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
        """``(1/D, J/D, -C (I + S C)⁻¹)`` with ``S = J D⁻¹ Jᵀ``, for
        ``(D + JᵀCJ)⁻¹ = diag(1/D) + (J/D)ᵀ C' (J/D)`` (``D`` a scalar or per entry; the
        factors of the last scalar ``D`` are kept)."""
        D = torch.as_tensor(D, dtype=self.J.dtype, device=self.J.device)
        key = None if is_entries(D) else _checks.regul_key(D)
        if key is not None and self._wood is not None and self._wood[0] == key:
            return self._wood[1]
        _checks.check_invertible(D, rep, what, regul, exact=True,
                                 detail="a diagonal entry plus regul is 0" if is_entries(D)
                                 else "α + regul = 0: it is singular on the orthogonal "
                                 "complement of the rows of J")
        JD = self.J / D
        S = JD @ self.J.t()
        C = self._C()
        cap = torch.eye(S.shape[0], dtype=S.dtype, device=S.device) + S @ C
        try:
            # -C (I + S C)⁻¹ = -(I + C S)⁻¹ C: one solve, in float32 for half precision
            Cn = -torch.linalg.solve(_checks.upcast(cap.t()), _checks.upcast(C.t())).t()
        except torch.linalg.LinAlgError:
            raise _checks.singular_error(rep, what, regul,
                                         "the capacitance matrix I + S C is singular") from None
        out = 1.0 / D, JD, ((Cn + Cn.t()) / 2).to(C.dtype)
        if key is not None and not _checks.needs_graph(self.J, self.C, D):
            self._wood = (key, out)
        return out

    def matpower(self, p, damping=0.0, caller=None):
        rep, regul = caller_of(self, damping, caller)
        a = self._shifted(damping)
        if float(p) == 1.0:
            return LowRankBlock(self.J, a, self.C)
        if float(p) == -1.0:
            # Woodbury: O(r² d), no eigendecomposition
            if self._pure() and not _checks._is_damped(regul):
                raise self._undamped(rep, "inverse", regul)
            invD, JD, Cn = self._woodbury(a, rep, regul, f"pow({p})")
            return LowRankBlock(JD, invD, Cn)
        if is_entries(a):
            raise NotImplementedError(
                f"{rep}.pow({p}) with a diagonal α + regul that is not a multiple of I: a "
                "diagonal plus a low-rank matrix has no low-rank eigendecomposition, so only "
                "p = 1 and p = -1 (Woodbury) are exact here; use a scalar regul, solve() / "
                "inverse(), or to_torch() on small models")
        E, Q = self.thin_eigh()
        d, r = self.shape[0], E.shape[0]
        a_t = torch.as_tensor(a, dtype=E.dtype, device=E.device)
        vals = values_for_power(torch.cat([E + a_t, a_t.expand(d - r)]), p, rep, regul)
        top, rest = vals[:r], vals[r:]
        base = rest[0] ** p if d > r else torch.zeros((), dtype=E.dtype, device=E.device)
        core = top ** p - base
        return LowRankBlock(Q.t(), base, torch.diag(core))

    def _undamped(self, rep, what, regul):
        return _checks.singular_error(
            rep, what, regul,
            f"a low-rank matrix (rank ≤ {self.J.shape[0]} < P = {self.shape[0]}) is singular "
            "without damping (pow(-1, on_range=True) is the pseudo-inverse on its range)")

    def solve(self, V, damping=0.0, caller=None, method="woodbury"):
        """``(B + Λ)⁻¹ v`` for the rows of ``V``. A per-entry ``Λ``, or a block with a diagonal
        ``α`` or a ``C``: Woodbury (its factors kept for the last scalar damping). ``B = JᵀJ`` with a scalar ``λ > 0``: ``method='woodbury'`` (default),
        ``(v - Jᵀ (λI + JJᵀ)⁻¹ J v) / λ`` with the Cholesky factor of ``λI + JJᵀ`` kept for
        the last ``λ``; ``method='eigh'``, through the nonzero eigenpairs ``(E, V)`` of ``JᵀJ``:
        ``V (E + λ)⁻¹ Vᵀ v`` on the range and ``v / λ`` on its orthogonal complement."""
        rep, regul = caller_of(self, damping, caller)
        a = self._shifted(damping)
        if is_entries(a) or not self._pure():
            invD, JD, Cn = self._woodbury(a, rep, regul, "solve")
            return V * invD + ((V @ JD.t()) @ Cn) @ JD
        if not _checks._float(a) > 0:
            raise self._undamped(rep, "solve", regul)
        if method == "eigh":
            E, U = self._eig()
            XV = V @ U
            return (XV / (E + a)) @ U.t() + (V - XV @ U.t()) / a
        if method != "woodbury":
            raise ValueError(f"unknown solve '{method}': use 'woodbury' (default) or 'eigh'")
        key = _checks.regul_key(a)
        if key is not None and self._chol is not None and self._chol[0] == key:
            L = self._chol[1]
        else:
            self._chol = None
            S = self.gram()
            L = torch.linalg.cholesky(_checks.upcast(
                S + a * torch.eye(S.shape[0], dtype=S.dtype, device=S.device)))
            if key is not None and not _checks.needs_graph(self.J, a):
                self._chol = (key, L)
        XJ = V @ self.J.t()
        inner = torch.cholesky_solve(_checks.upcast(XJ.reshape(-1, self.J.shape[0]).t()),
                                     L).t().to(XJ.dtype).reshape(XJ.shape)
        return (V - inner @ self.J) / a

    def logdet(self, damping=0.0, caller=None):
        rep, regul = caller_of(self, damping, caller)
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
        if self._pure():
            return low
        if is_entries(self.alpha):
            return low + torch.diag(self.alpha)
        return low + self.alpha * torch.eye(self.shape[0], dtype=low.dtype, device=low.device)

    def trace(self):
        return self.diag().sum()

    def frobenius_sq(self):
        """``‖B‖_F²`` from ``r × r`` matrices: ``‖JᵀCJ‖_F² = tr(C S C S)`` with ``S = JJᵀ``, plus
        the diagonal's ``Σ α² + 2 Σ α_p (JᵀCJ)_pp``."""
        S = self.gram()
        CS = S if self.C is None else self.C @ S
        out = (CS * CS.t()).sum()
        if self._pure():
            return out
        CJ = self.J if self.C is None else self.C @ self.J
        low_diag = (self.J * CJ).sum(0)
        a = self.alpha
        if is_entries(a):
            return out + (a * a).sum() + 2 * (a * low_diag).sum()
        return out + self.shape[0] * a * a + 2 * a * low_diag.sum()

    # ------------------------------------------------------------------ arithmetic
    def scaled(self, x):
        if self._pure() and float(x) >= 0:  # x JᵀJ = (√x J)ᵀ (√x J): still pure
            return LowRankBlock(self.J * float(x) ** 0.5)
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
            if self._pure() and other._pure():  # JᵀJ + KᵀK: the rows stacked
                return LowRankBlock(torch.cat([self.J, other.J]))
            return LowRankBlock(torch.cat([self.J, other.J]), self.alpha + other.alpha,
                                torch.block_diag(self._C(), other._C()))
        return super().add(other)
