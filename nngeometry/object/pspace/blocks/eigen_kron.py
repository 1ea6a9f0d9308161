"""The eigen-Kronecker block ``U diag(D) Uᵀ`` with ``U = U_G ⊗ U_A`` (EKFAC's per-layer block;
also KFAC's ``A ⊗ G`` with exact damping, ``D = λ_G ⊗ λ_A``).

Layout: the layer's Kronecker layout (see `kron`): a vector of the layer is a
``(dG, dA)`` matrix ``V`` and ``U v`` is ``U_G V U_Aᵀ``; ``D`` has shape ``(dG, dA)``, entry
``[p, q]`` the eigenvalue of ``U_G[:, p] ⊗ U_A[:, q]``. A basis may be an ``int`` ``d`` (the
identity of size ``d``: the basis of a diagonal factor), never densified.

Every primitive takes batches: ``V`` of shape ``(..., dG, dA)``. A scalar damping ``λ`` is exact
(``D + λ``); a per-entry damping does not keep the basis and is refused.
"""
import torch

from .. import _checks
from .base import Block, is_entries, per_entry_refused, values_for_power, caller_of


# ---------------------------------------------------------------------- eigenbases
def to_kfe(V, UA, UG):
    """Coordinates of ``V`` (``(..., dG, dA)``) in the eigenbasis ``kron(U_G, U_A)``:
    ``U_Gᵀ V U_A``."""
    if not isinstance(UA, int):
        V = V @ UA
    if not isinstance(UG, int):
        V = UG.t() @ V
    return V


def from_kfe(W, UA, UG):
    """Inverse of `to_kfe`: ``U_G W U_Aᵀ``."""
    if not isinstance(UA, int):
        W = W @ UA.t()
    if not isinstance(UG, int):
        W = UG @ W
    return W


def dense_basis(U, like):
    if isinstance(U, int):
        return torch.eye(U, dtype=like.dtype, device=like.device)
    return U


class EigenKronBlock(Block):
    """``U diag(D) Uᵀ``, ``U = U_G ⊗ U_A`` (see the module docstring)."""

    __slots__ = ("UA", "UG", "D", "_low")

    def __init__(self, UA, UG, D):
        self.UA, self.UG, self.D = UA, UG, D
        self._low = None  # the smallest eigenvalue, when D is finite (for a container's solves)

    def _lowest(self):
        """``min D`` (a float) when every entry of ``D`` is finite, else None; computed once
        (not kept for a ``D`` that records a graph)."""
        if self._low is not None:
            return self._low
        D = self.D.detach()
        low = float(D.min()) if D.numel() and bool(torch.isfinite(D).all()) else None
        if low is not None and not _checks.needs_graph(self.D):
            self._low = low
        return low

    @classmethod
    def from_factors_eig(cls, eig_A, eig_G):
        """The block ``A ⊗ G`` from ``(λ_A, U_A)`` and ``(λ_G, U_G)``: ``D = λ_G ⊗ λ_A``."""
        (lA, UA), (lG, UG) = eig_A, eig_G
        return cls(UA, UG, torch.outer(lG, lA))

    def as_entry(self):
        """PMatEKFAC's stored entry ``(U_A, U_G, D)``."""
        return (self.UA, self.UG, self.D)

    @property
    def shape(self):
        return tuple(self.D.shape)

    def _scalar(self, damping):
        if is_entries(damping):
            raise per_entry_refused(self)
        return damping

    # ------------------------------------------------------------------ primitives
    def to_eigenbasis(self, V):
        """Coordinates of ``V`` in the eigenbasis: ``U_Gᵀ V U_A``."""
        return to_kfe(V, self.UA, self.UG)

    def from_eigenbasis(self, W):
        return from_kfe(W, self.UA, self.UG)

    def eigenvalues(self, damping=0.0):
        """The ``(dG, dA)`` eigenvalues of the block plus ``damping·I``."""
        return self.D + self._scalar(damping)

    def apply(self, V, fn=None):
        """``U fn(D) Uᵀ`` applied to ``V`` (``fn`` default: the identity, i.e. the block)."""
        W = self.to_eigenbasis(V)
        return self.from_eigenbasis(W * (self.D if fn is None else fn(self.D)))

    def apply_power(self, V, p, damping=0.0):
        """``(B + damping·I)^p`` applied to ``V`` (no checks: the caller has made them)."""
        return self.apply(V, lambda D: (D + damping) ** p)

    def solve(self, V, damping=0.0, caller=None):
        """``(B + λI)⁻¹ v`` for every vector of ``V`` (singular: the shared error)."""
        rep, regul = caller_of(self, damping, caller)
        low = self._lowest() if _checks._float(regul) > 0 else None
        if low is None or not low + _checks._float(self._scalar(damping)) > 0:
            # (a damped block whose smallest eigenvalue stays positive needs no check)
            _checks.check_invertible(self.eigenvalues(damping).reshape(-1), rep, "solve", regul)
        return self.apply_power(V, -1.0, damping)

    def quadratic(self, V):
        """``vᵀ B v`` for each ``(dG, dA)`` matrix of the batch ``V``: shape ``V.shape[:-2]``."""
        W = self.to_eigenbasis(V)
        return (self.D * W * W).sum(dim=(-2, -1))

    def matpower(self, p, damping=0.0, caller=None, clip=False):
        """The block ``(B + λI)^p``, in the same eigenbasis (shared checks: invertible for
        ``p < 0``, PSD for fractional ``p``, round-off below 0 clipped). ``clip``: every
        negative value set to 0 first, unchecked (the caller has refused genuine ones)."""
        d = self.D + self._scalar(damping)
        if clip:
            d = d.clamp(min=0)
        else:
            rep, regul = caller_of(self, damping, caller)
            d = values_for_power(d, p, rep, regul)
        return EigenKronBlock(self.UA, self.UG, d ** p)

    def diagonal(self):
        """The ``(dG, dA)`` diagonal of the block (Kronecker layout): ``(U_G∘U_G) D (U_A∘U_A)ᵀ``."""
        d = self.D
        if not isinstance(self.UA, int):
            d = d @ (self.UA * self.UA).t()
        if not isinstance(self.UG, int):
            d = (self.UG * self.UG) @ d
        return d

    diag = diagonal

    def dense(self):
        """The dense ``(dG·dA, dG·dA)`` block, Kronecker layout."""
        U = torch.kron(dense_basis(self.UG, self.D).contiguous(),
                       dense_basis(self.UA, self.D).contiguous())
        return (U * self.D.reshape(-1)) @ U.t()

    def trace(self):
        return self.D.sum()

    def frobenius_sq(self):
        """``‖B‖_F²`` (the basis is orthogonal)."""
        return (self.D * self.D).sum()

    def logdet_is_spectral(self, damping=0.0):
        return not is_entries(damping)

    def logdet(self, damping=0.0, caller=None):
        """``Σ log(D + λ)`` (positive definite, or the shared errors)."""
        rep, regul = caller_of(self, damping, caller)
        return _checks.logdet_of(self.eigenvalues(damping).reshape(-1), rep, regul)

    # ------------------------------------------------------------------ arithmetic
    def scaled(self, x):
        return EigenKronBlock(self.UA, self.UG, self.D * x)

    def add(self, other):
        """``+ s·I`` and ``+`` a block on the same eigenbasis stay eigen-Kronecker."""
        from .identity import ScaledIdentityBlock
        if isinstance(other, ScaledIdentityBlock):
            return EigenKronBlock(self.UA, self.UG, self.D + other.s)
        if isinstance(other, EigenKronBlock) and _same_basis(self, other):
            return EigenKronBlock(self.UA, self.UG, self.D + other.D)
        return super().add(other)


def _same_basis(a, b):
    def same(x, y):
        if isinstance(x, int) or isinstance(y, int):
            return isinstance(x, int) and isinstance(y, int) and x == y
        return x is y or (x.shape == y.shape and bool(torch.equal(x, y)))
    return same(a.UA, b.UA) and same(a.UG, b.UG)
