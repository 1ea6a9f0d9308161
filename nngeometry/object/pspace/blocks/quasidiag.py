"""The quasi-diagonal block of one layer (Ollivier 2015): per output unit ``o`` an arrowhead

    B_o = [[diag(a_o), c_o],
           [c_oᵀ,      s_o]]

over the unit's ``n`` incoming weights and its bias. Layout ``(out, n + 1)``: unit ``o``'s
weights then its bias (the layer's Kronecker layout ``[W | b]``). A diagonal damping keeps the
arrowhead shape, so every damping (scalar or per entry) is exact: solves and log-determinants
through each unit's Schur complement ``σ_o = s_o + λ_b - Σ_i c_oi² / (a_oi + λ_i)``.
"""
import torch

from .. import _checks
from .base import Block, caller_of


def _split_damping(damping):
    """``(λ on the weights, λ on the biases)``: broadcastable to ``(out, n)`` and ``(out,)``."""
    if torch.is_tensor(damping) and damping.dim() > 0:
        return damping[..., :-1], damping[..., -1]
    return damping, damping


class QuasiDiagBlock(Block):
    """Arrowheads ``(a, c, s)``: ``a``, ``c`` of shape ``(out, n)``, ``s`` of shape ``(out,)``."""

    __slots__ = ("a", "c", "s")

    def __init__(self, a, c, s):
        self.a, self.c, self.s = a, c, s

    @property
    def shape(self):
        return (self.a.shape[0], self.a.shape[1] + 1)

    # ------------------------------------------------------------------ products
    def apply(self, V):
        w, b = V[..., :-1], V[..., -1]
        yw = self.a * w + self.c * b.unsqueeze(-1)
        yb = self.s * b + (self.c * w).sum(-1)
        return torch.cat([yw, yb.unsqueeze(-1)], dim=-1)

    def schur(self, damping=0.0, caller=None, what="solve"):
        """``(1/(a+λ), c/(a+λ), 1/σ)`` per unit, after refusing a singular unit (shared error:
        an ``a + λ`` equal to 0, or a Schur complement at round-off level; exactly 0 when the
        damping is positive)."""
        rep, regul = caller_of(self, damping, caller)
        lw, lb = _split_damping(damping)
        aw = self.a + lw
        _checks.check_invertible(aw, rep, what, regul, exact=True,
                                 detail="a weight's diagonal entry plus regul is 0")
        inv_a = 1.0 / aw
        a_inv_c = self.c * inv_a
        sb = self.s + lb
        sigma = sb - (self.c * a_inv_c).sum(-1)
        sig = sigma.detach()
        if _checks._is_damped(regul):
            tol = torch.zeros_like(sig)
        else:
            size = sb.detach().abs() + (self.c * a_inv_c).detach().abs().sum(-1)
            tol = (self.c.shape[-1] + 1) * torch.finfo(sig.dtype).eps * size
        if bool((sig.abs() <= tol).any()):
            raise _checks.singular_error(
                rep, what, regul, f"the Schur complement of {int((sig.abs() <= tol).sum())} "
                f"output unit(s) is 0 (smallest |σ| {float(sig.abs().min()):.3g})")
        return inv_a, a_inv_c, 1.0 / sigma

    def solve(self, V, damping=0.0, caller=None):
        """Eliminate the weights (diagonal), solve each bias on its Schur complement, then
        back-substitute: ``O(out·n)`` per vector."""
        inv_a, a_inv_c, inv_sigma = self.schur(damping, caller)
        return ArrowInverseBlock(inv_a, a_inv_c, inv_sigma).apply(V)

    # ------------------------------------------------------------------ functions
    def arrowheads(self, damping=0.0):
        """The ``(out, n + 1, n + 1)`` dense arrowheads of ``B + Λ``."""
        lw, lb = _split_damping(damping)
        out, n = self.a.shape
        H = torch.diag_embed(torch.cat([self.a + lw * torch.ones_like(self.a),
                                        (self.s + lb * torch.ones_like(self.s)).unsqueeze(-1)],
                                       dim=-1))
        H[:, :n, n] = self.c
        H[:, n, :n] = self.c
        return H

    def eigenvalues(self, damping=0.0):
        return torch.linalg.eigvalsh(self.arrowheads(damping)).reshape(-1)

    def matpower(self, p, damping=0.0, caller=None):
        """``p = 1``: the damped arrowheads; ``p = -1``: the exact inverse, diagonal plus one
        rank-one term per unit (an `ArrowInverseBlock`). Other powers of an arrowhead are
        dense per unit: refused."""
        if float(p) == 1.0:
            lw, lb = _split_damping(damping)
            return QuasiDiagBlock(self.a + lw, self.c, self.s + lb)
        if float(p) == -1.0:
            return ArrowInverseBlock(*self.schur(damping, caller, "inverse"))
        raise NotImplementedError(
            f"QuasiDiagBlock.matpower({p}): powers other than 1 and -1 of a quasi-diagonal "
            "matrix are not quasi-diagonal; use solve()/inverse(), or diagonal / dense blocks")

    def logdet(self, damping=0.0, caller=None):
        """``Σ_units (Σ_i log(a_oi + λ) + log σ_o)``: the pivots of the units' LDLᵀ, whose signs
        are those of the eigenvalues; ``log |det|`` when ``det > 0``, refused when ``det ≤ 0``
        (the quasi-diagonal of a PSD matrix need not be PSD)."""
        rep, regul = caller_of(self, damping, caller)
        return _checks.logdet_of(self.pivots(damping, caller), rep, regul, exact=True,
                                 require_pd=False)

    def pivots(self, damping=0.0, caller=None):
        """The pivots of the units' LDLᵀ, ``a + λ`` and ``σ``: their product is the
        determinant, their signs those of the eigenvalues."""
        inv_a, _, inv_sigma = self.schur(damping, caller, "logdet")
        return torch.cat([(1.0 / inv_a).reshape(-1), 1.0 / inv_sigma])

    # ------------------------------------------------------------------ reductions
    def diag(self):
        return torch.cat([self.a, self.s.unsqueeze(-1)], dim=-1)

    def dense(self):
        return torch.block_diag(*self.arrowheads())

    def frobenius_sq(self):
        return (self.a * self.a).sum() + (self.s * self.s).sum() + 2 * (self.c * self.c).sum()

    # ------------------------------------------------------------------ arithmetic
    def scaled(self, x):
        return QuasiDiagBlock(self.a * x, self.c * x, self.s * x)

    def add(self, other):
        from .diag import DiagBlock
        from .identity import ScaledIdentityBlock
        if isinstance(other, QuasiDiagBlock):
            return QuasiDiagBlock(self.a + other.a, self.c + other.c, self.s + other.s)
        if isinstance(other, ScaledIdentityBlock):
            return QuasiDiagBlock(self.a + other.s, self.c, self.s + other.s)
        if isinstance(other, DiagBlock) and other.shape == self.shape:
            return self.matpower(1.0, other.d)
        return super().add(other)


def _undamped(damping):
    """Whether ``damping`` is exactly zero (a scalar, or every entry of a per-entry one)."""
    if torch.is_tensor(damping):
        return not bool((damping.detach() != 0).any())
    return float(damping) == 0.0


class ArrowInverseBlock(Block):
    """The inverse of damped arrowheads: per unit ``diag(1/(a+λ), 0) + σ⁻¹ u uᵀ`` with
    ``u = [-c/(a+λ), 1]``, stored as ``(1/(a+λ), c/(a+λ), 1/σ)`` (``O(out·n)``).

    Undamped, its inverse is the arrowhead it came from (a `QuasiDiagBlock`); damped by ``Λ``
    it is a diagonal plus one rank-one term per unit (a `DiagPlusRankOneBlock`), whose solves,
    inverse and log-determinant are exact by Sherman-Morrison and the matrix determinant
    lemma."""

    __slots__ = ("inv_a", "a_inv_c", "inv_sigma")

    def __init__(self, inv_a, a_inv_c, inv_sigma):
        self.inv_a, self.a_inv_c, self.inv_sigma = inv_a, a_inv_c, inv_sigma

    @property
    def shape(self):
        return (self.inv_a.shape[0], self.inv_a.shape[1] + 1)

    def apply(self, V):
        u, beta = V[..., :-1], V[..., -1]
        y = (beta - (self.a_inv_c * u).sum(-1)) * self.inv_sigma
        x = u * self.inv_a - self.a_inv_c * y.unsqueeze(-1)
        return torch.cat([x, y.unsqueeze(-1)], dim=-1)

    def _rank_one(self):
        """The same matrix as a `DiagPlusRankOneBlock`: ``d = [1/(a+λ), 0]``,
        ``u = [-c/(a+λ), 1]``, ``β = 1/σ``."""
        zero = torch.zeros_like(self.inv_sigma).unsqueeze(-1)
        u = torch.cat([-self.a_inv_c, torch.ones_like(zero)], dim=-1)
        return DiagPlusRankOneBlock(torch.cat([self.inv_a, zero], dim=-1), u, self.inv_sigma)

    def _arrowhead(self):
        """The arrowheads ``(a+λ, c, s+λ)`` this block is the inverse of."""
        aw = 1.0 / self.inv_a
        c = self.a_inv_c * aw
        return QuasiDiagBlock(aw, c, 1.0 / self.inv_sigma + (c * self.a_inv_c).sum(-1))

    def _units(self):
        return self._rank_one()._units()

    def eigenvalues(self, damping=0.0):
        return self._rank_one().eigenvalues(damping)

    def solve(self, V, damping=0.0, caller=None):
        if _undamped(damping):
            return self._arrowhead().apply(V)
        return self._rank_one().solve(V, damping, caller)

    def matpower(self, p, damping=0.0, caller=None):
        """``p = -1`` undamped: the arrowheads (a `QuasiDiagBlock`); ``p = 1`` undamped: the
        block itself; damped, or another ``p``: see `DiagPlusRankOneBlock.matpower`."""
        if _undamped(damping) and float(p) == 1.0:
            return self
        if _undamped(damping) and float(p) == -1.0:
            rep, regul = caller_of(self, damping, caller)
            _checks.check_invertible(torch.cat([self.inv_a.reshape(-1), self.inv_sigma]), rep,
                                     "inverse", regul, exact=True)
            return self._arrowhead()
        return self._rank_one().matpower(p, damping, caller)

    def logdet(self, damping=0.0, caller=None):
        """Undamped: ``Σ_units (Σ_i log(1/(a_oi+λ)) + log(1/σ_o))``, minus the arrowheads'
        (same sign rule as `QuasiDiagBlock.logdet`); damped: the matrix determinant lemma."""
        rep, regul = caller_of(self, damping, caller)
        return _checks.logdet_of(self.pivots(damping, caller), rep, regul, exact=True,
                                 require_pd=False)

    def pivots(self, damping=0.0, caller=None):
        """Values whose product is the determinant and whose signs are those of the
        eigenvalues: undamped, the inverses of the arrowheads' pivots; damped, see
        `DiagPlusRankOneBlock.pivots`."""
        if not _undamped(damping):
            return self._rank_one().pivots(damping, caller)
        rep, regul = caller_of(self, damping, caller)
        out = torch.cat([self.inv_a.reshape(-1), self.inv_sigma])
        _checks.check_invertible(out, rep, "logdet", regul, exact=True)
        return out

    def diag(self):
        return torch.cat([self.inv_a + self.inv_sigma.unsqueeze(-1) * self.a_inv_c ** 2,
                          self.inv_sigma.unsqueeze(-1)], dim=-1)

    def dense(self):
        return torch.block_diag(*self._units())

    def scaled(self, x):
        return ArrowInverseBlock(self.inv_a * x, self.a_inv_c, self.inv_sigma * x)

    def add(self, other):
        return self._rank_one().add(other)


class DiagPlusRankOneBlock(Block):
    """Per unit ``diag(d_o) + β_o u_o u_oᵀ``: ``d``, ``u`` of shape ``(out, n + 1)`` (the unit
    layout of `QuasiDiagBlock`), ``β`` of shape ``(out,)``. What an `ArrowInverseBlock` becomes
    once damped; closed under damping, scaling and inversion (Sherman-Morrison)."""

    __slots__ = ("d", "u", "beta")

    def __init__(self, d, u, beta):
        self.d, self.u, self.beta = d, u, beta

    @property
    def shape(self):
        return tuple(self.d.shape)

    def apply(self, V):
        return self.d * V + (self.beta * (self.u * V).sum(-1)).unsqueeze(-1) * self.u

    def _units(self, damping=0.0):
        d = self.d + damping
        return torch.diag_embed(d) + self.beta[:, None, None] * self.u.unsqueeze(-1) \
            * self.u.unsqueeze(-2)

    def eigenvalues(self, damping=0.0):
        return torch.linalg.eigvalsh(self._units(damping)).reshape(-1)

    def _sherman_morrison(self, damping, caller, what):
        """``(1/(d+Λ), (d+Λ)⁻¹u, 1 + β uᵀ(d+Λ)⁻¹u)`` per unit, after refusing a zero entry of
        ``d + Λ`` (an undamped inverse of arrowheads: use its arrowheads instead) or a zero
        ``1 + β uᵀ(d+Λ)⁻¹u`` (singular)."""
        rep, regul = caller_of(self, damping, caller)
        dd = self.d + damping
        if bool((dd.detach() == 0).any()):
            raise NotImplementedError(
                f"{rep}.{what}: the damping leaves {int((dd.detach() == 0).sum())} diagonal "
                "entries at 0 (a bias not damped), where this block's Sherman-Morrison form does "
                "not apply; use a damping that is positive on every parameter, or go back to "
                "the PMatQuasiDiag this inverse came from")
        inv_d = 1.0 / dd
        w = self.u * inv_d
        denom = 1.0 + self.beta * (self.u * w).sum(-1)
        _checks.check_invertible(denom, rep, what, regul,
                                 detail="a unit's rank-one update cancels its diagonal")
        return inv_d, w, denom

    def solve(self, V, damping=0.0, caller=None):
        inv_d, w, denom = self._sherman_morrison(damping, caller, "solve")
        y = V * inv_d
        return y - ((self.beta / denom) * (w * V).sum(-1)).unsqueeze(-1) * w

    def matpower(self, p, damping=0.0, caller=None):
        """``p = 1``: ``d + Λ``, the same rank-one terms; ``p = -1``: Sherman-Morrison,
        ``(D + β u uᵀ)⁻¹ = D⁻¹ - β/(1 + β uᵀD⁻¹u) · D⁻¹u uᵀD⁻¹``. Other powers are dense per
        unit: refused."""
        if float(p) == 1.0:
            return DiagPlusRankOneBlock(self.d + damping, self.u, self.beta)
        if float(p) == -1.0:
            inv_d, w, denom = self._sherman_morrison(damping, caller, "inverse")
            return DiagPlusRankOneBlock(inv_d, w, -self.beta / denom)
        raise NotImplementedError(
            f"{type(self).__name__}.matpower({p}): powers other than 1 and -1 of the inverse of "
            "a quasi-diagonal matrix are dense per unit; use solve() or inverse(), or take the "
            "power of the PMatQuasiDiag it came from")

    def logdet(self, damping=0.0, caller=None):
        """``Σ log(d + Λ) + Σ_units log(1 + β uᵀ(d+Λ)⁻¹u)`` (the matrix determinant lemma; the
        same sign rule as `QuasiDiagBlock.logdet`)."""
        rep, regul = caller_of(self, damping, caller)
        return _checks.logdet_of(self.pivots(damping, caller), rep, regul, exact=True,
                                 require_pd=False)

    def pivots(self, damping=0.0, caller=None):
        """``d + Λ`` and ``1 + β uᵀ(d+Λ)⁻¹u`` per unit: the pivots of eliminating the diagonal
        first (their product is the determinant, their signs those of the eigenvalues)."""
        inv_d, _, denom = self._sherman_morrison(damping, caller, "logdet")
        return torch.cat([(1.0 / inv_d).reshape(-1), denom])

    def diag(self):
        return self.d + self.beta.unsqueeze(-1) * self.u ** 2

    def dense(self):
        return torch.block_diag(*self._units())

    def scaled(self, x):
        return DiagPlusRankOneBlock(self.d * x, self.u, self.beta * x)

    def add(self, other):
        from .diag import DiagBlock
        from .identity import ScaledIdentityBlock
        if isinstance(other, ScaledIdentityBlock):
            return DiagPlusRankOneBlock(self.d + other.s, self.u, self.beta)
        if isinstance(other, DiagBlock) and other.shape == self.shape:
            return DiagPlusRankOneBlock(self.d + other.d, self.u, self.beta)
        return super().add(other)
