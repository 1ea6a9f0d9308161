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
from .base import Block, who_of


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

    def schur(self, damping=0.0, who=None, what="solve"):
        """``(1/(a+λ), c/(a+λ), 1/σ)`` per unit, after refusing a singular unit (shared error:
        an ``a + λ`` equal to 0, or a Schur complement at round-off level; exactly 0 when the
        damping is positive)."""
        rep, regul = who_of(self, damping, who)
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

    def solve(self, V, damping=0.0, who=None):
        """Eliminate the weights (diagonal), solve each bias on its Schur complement, then
        back-substitute: ``O(out·n)`` per vector."""
        inv_a, a_inv_c, inv_sigma = self.schur(damping, who)
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

    def matpower(self, p, damping=0.0, who=None):
        """``p = 1``: the damped arrowheads; ``p = -1``: the exact inverse, diagonal plus one
        rank-one term per unit (an `ArrowInverseBlock`). Other powers of an arrowhead are
        dense per unit: refused."""
        if float(p) == 1.0:
            lw, lb = _split_damping(damping)
            return QuasiDiagBlock(self.a + lw, self.c, self.s + lb)
        if float(p) == -1.0:
            return ArrowInverseBlock(*self.schur(damping, who, "inverse"))
        raise NotImplementedError(
            f"QuasiDiagBlock.matpower({p}): powers other than 1 and -1 of a quasi-diagonal "
            "matrix are not quasi-diagonal; use solve()/inverse(), or diagonal / dense blocks")

    def logdet(self, damping=0.0, who=None):
        """``Σ_units (Σ_i log(a_oi + λ) + log σ_o)``: the pivots of the units' LDLᵀ, whose signs
        are those of the eigenvalues; ``log |det|`` when ``det > 0``, refused when ``det ≤ 0``
        (the quasi-diagonal of a PSD matrix need not be PSD)."""
        rep, regul = who_of(self, damping, who)
        inv_a, _, inv_sigma = self.schur(damping, who, "logdet")
        pivots = torch.cat([(1.0 / inv_a).reshape(-1), 1.0 / inv_sigma])
        return _checks.logdet_of(pivots, rep, regul, exact=True, require_pd=False)

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


class ArrowInverseBlock(Block):
    """The inverse of damped arrowheads: per unit ``diag(1/(a+λ), 0) + σ⁻¹ u uᵀ`` with
    ``u = [-c/(a+λ), 1]``, stored as ``(1/(a+λ), c/(a+λ), 1/σ)`` (``O(out·n)``)."""

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

    def _units(self):
        n = self.inv_a.shape[1]
        u = torch.cat([-self.a_inv_c, torch.ones_like(self.inv_sigma).unsqueeze(-1)], dim=-1)
        D = torch.diag_embed(torch.cat([self.inv_a, torch.zeros_like(self.inv_sigma)
                                        .unsqueeze(-1)], dim=-1))
        assert D.shape[-1] == n + 1
        return D + self.inv_sigma[:, None, None] * u.unsqueeze(-1) * u.unsqueeze(-2)

    def eigenvalues(self, damping=0.0):
        H = self._units()
        if torch.is_tensor(damping) and damping.dim() > 0:
            H = H + torch.diag_embed(damping)
        else:
            H = H + damping * torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)
        return torch.linalg.eigvalsh(H).reshape(-1)

    def matpower(self, p, damping=0.0, who=None):
        raise NotImplementedError(
            "ArrowInverseBlock.matpower: powers of the inverse of a quasi-diagonal matrix are "
            "not available; take them from the quasi-diagonal matrix itself (pow(-1), solve)")

    def diag(self):
        return torch.cat([self.inv_a + self.inv_sigma.unsqueeze(-1) * self.a_inv_c ** 2,
                          self.inv_sigma.unsqueeze(-1)], dim=-1)

    def dense(self):
        return torch.block_diag(*self._units())

    def scaled(self, x):
        return ArrowInverseBlock(self.inv_a * x, self.a_inv_c, self.inv_sigma * x)
