"""The Kronecker block ``A ⊗ G`` (KFAC's per-layer block), factors possibly diagonal (an
embedding's input factor, the counts of each index, is never densified).

Layout: the layer's Kronecker layout ``(dG, dA)``; the block maps ``V`` to ``G V Aᵀ`` (see
``pspace/_kron.py``). Products and reductions use the factors; functions of the damped block
(``matpower``, ``logdet``, ``solve``, ``eigenvalues``) go through the factors'
eigendecompositions, computed once: ``A ⊗ G + λI = (U_G ⊗ U_A)(λ_G ⊗ λ_A + λ)(U_G ⊗ U_A)ᵀ``
exactly, an `EigenKronBlock`. A per-entry damping has no such form and is refused.
"""
import torch

from .. import _kron as K
from .base import Block, is_entries, per_entry_refused
from .eigen_kron import EigenKronBlock


class KronBlock(Block):
    """``A ⊗ G`` in the Kronecker layout; ``A``, ``G`` 2-D symmetric or 1-D (diagonal)."""

    __slots__ = ("A", "G", "_eigen")

    def __init__(self, A, G, eigen=None):
        self.A, self.G = A, G
        self._eigen = eigen

    @property
    def shape(self):
        return (K.fdim(self.G), K.fdim(self.A))

    def eigen(self):
        """The same block as an `EigenKronBlock` (the factors' eigendecompositions,
        computed once; ``eigen`` given to the constructor may be that block, or a function
        returning it: a container's cache)."""
        if callable(self._eigen):
            return self._eigen()
        if self._eigen is None:
            self._eigen = EigenKronBlock.from_factors_eig(K.eig(self.A), K.eig(self.G))
        return self._eigen

    def _eigen_for(self, damping):
        if is_entries(damping):
            raise per_entry_refused(self)
        return self.eigen()

    # ------------------------------------------------------------------ products
    def apply(self, V):
        return K.kron_apply(self.A, self.G, V)

    def solve(self, V, damping=0.0, who=None):
        return self._eigen_for(damping).solve(V, damping, who)

    # ------------------------------------------------------------------ functions
    def eigenvalues(self, damping=0.0):
        return self._eigen_for(damping).eigenvalues(damping)

    def matpower(self, p, damping=0.0, who=None):
        """``(A ⊗ G + λI)^p`` exactly, as an `EigenKronBlock` (``p = 1`` undamped: the
        block itself)."""
        if float(p) == 1.0 and not is_entries(damping) and not torch.is_tensor(damping) \
                and float(damping) == 0.0:
            return self
        return self._eigen_for(damping).matpower(p, damping, who)

    def logdet(self, damping=0.0, who=None):
        return self._eigen_for(damping).logdet(damping, who)

    # ------------------------------------------------------------------ reductions
    def diag(self):
        return torch.outer(K.fdiag(self.G), K.fdiag(self.A))

    def dense(self):
        return torch.kron(K.dense(self.G), K.dense(self.A))

    def trace(self):
        return K.ftrace(self.A) * K.ftrace(self.G)

    def frobenius_sq(self):
        return (K.fnorm(self.A) * K.fnorm(self.G)) ** 2

    # ------------------------------------------------------------------ arithmetic
    def scaled(self, x):
        """``x·(A ⊗ G) = (x·A) ⊗ G`` (the eigenbasis is kept)."""
        eig = None if self._eigen is None or callable(self._eigen) else self._eigen.scaled(x)
        return KronBlock(self.A * x, self.G, eig)

    def add(self, other):
        """``A ⊗ G + s·I`` is exact in the factors' eigenbasis (an EigenKronBlock); the sum of two
        Kronecker products is not a Kronecker product: refused."""
        from .identity import ScaledIdentityBlock
        if isinstance(other, ScaledIdentityBlock):
            return self.eigen().add(other)
        return super().add(other)
