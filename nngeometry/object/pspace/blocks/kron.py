"""The Kronecker block ``A ⊗ G`` (KFAC's per-layer block), factors possibly diagonal (an
embedding's input factor, the counts of each index, is never densified).

Layout: the layer's Kronecker layout ``(dG, dA)``; the block maps ``V`` to ``G V Aᵀ`` (see
``pspace/_kron.py``). Products and reductions use the factors. The block owns the caches of
its factorizations, so that a container which keeps its blocks (PMatKFAC) pays each one once:

* damping ``λ`` (a scalar, exact): functions of ``A ⊗ G + λI`` go through the factors'
  eigendecompositions, computed once: ``A ⊗ G + λI = (U_G ⊗ U_A)(λ_G ⊗ λ_A + λ)(U_G ⊗ U_A)ᵀ``
  exactly, an `EigenKronBlock`. A per-entry damping has no such form and is refused.
* damping `PiDamping` ``(λ, use_pi)``: Tikhonov damping split over the factors,
  ``(A + π√λ I) ⊗ (G + (√λ/π) I)`` (Martens & Grosse 2015), which stays Kronecker. Its inverse
  factors are cached for the last damping (see `KronBlock.solve`).
"""
import torch

from .. import _checks
from .. import _kron as K
from .base import Block, is_entries, per_entry_refused
from .eigen_kron import EigenKronBlock

#: π-damped solves factorize a factor wider than this lazily (see `KronBlock.solve`)
LAZY_INVERSE_WIDTH = 1024


class PiDamping:
    """A damping ``λ ≥ 0`` split over the two factors of a Kronecker block with π:
    ``(A + π√λ I) ⊗ (G + (√λ/π) I)``, ``π = sqrt((tr A/dA)/(tr G/dG))`` (``use_pi=False``:
    ``π = 1``). This is ``A ⊗ G + λI + √λ (π I ⊗ G + A ⊗ I / π)``, not ``A ⊗ G + λI``.

    ``value`` is a number or a 0-d tensor, kept with its autograd graph (``sqrt``); ``key`` is
    what caches are keyed on (None: not cached, for a value that records a graph)."""

    __slots__ = ("value", "use_pi", "float", "sqrt", "key")

    def __init__(self, value, use_pi=True):
        self.value = value
        self.use_pi = bool(use_pi)
        self.float = _checks._float(value)
        graph = _checks.needs_graph(value)
        self.sqrt = value ** 0.5 if graph else max(self.float, 0.0) ** 0.5
        self.key = None if graph else (self.float, self.use_pi)

    def describe(self):
        return f"regul={self.float:.3g} (π-damped)"


class KronBlock(Block):
    """``A ⊗ G`` in the Kronecker layout; ``A``, ``G`` 2-D symmetric or 1-D (diagonal).

    ``eig``, if given, is the factors' eigendecompositions ``((λ_A, U_A), (λ_G, U_G))``
    (see `factor_eig`); ``name`` says which block it is in the messages."""

    __slots__ = ("A", "G", "name", "_eig", "_eigen", "_pi", "_At")

    def __init__(self, A, G, eig=None, name=None):
        self.A, self.G = A, G
        self.name = name  # for the messages: "layer 'fc1'" (a container sets it)
        self._eig = eig
        self._eigen = None
        # π-damped cache: (damping key, 'chol' | 'inv', (factor_A, factor_G)) for the last key
        self._pi = None
        self._At = None

    @property
    def shape(self):
        return (K.factor_size(self.G), K.factor_size(self.A))

    # ------------------------------------------------------------------ caches
    def factor_eig(self):
        """``((λ_A, U_A), (λ_G, U_G))``: the factors' eigendecompositions, computed once
        (not kept when the factors record an autograd graph)."""
        if self._eig is not None:
            return self._eig
        eig = (K.eig(self.A), K.eig(self.G))
        if not _checks.needs_graph(self.A, self.G):
            self._eig = eig
        return eig

    def set_factor_eig(self, eig):
        """Replace the factors' eigendecompositions (e.g. computed through an SVD)."""
        self._eig, self._eigen, self._pi = eig, None, None

    def eigen(self):
        """The same block as an `EigenKronBlock` on the factors' eigenbases (computed once)."""
        if self._eigen is not None:
            return self._eigen
        eig = self.factor_eig()
        out = EigenKronBlock.from_factors_eig(*eig)
        if eig is self._eig:
            self._eigen = out
        return out

    def _eigen_for(self, damping):
        if is_entries(damping):
            raise per_entry_refused(self)
        return self.eigen()

    # ------------------------------------------------------------------ products
    def apply(self, V):
        return K.kron_apply(self.A, self.G, V)

    def right_factor(self):
        """``Aᵀ`` for the products ``G V Aᵀ``: ``A`` itself when it is exactly symmetric (the
        factors KFAC builds are: their sums are mirrored), else its transposed view. A product
        with a row-major operand reads it faster than through a transposed view when the other
        side has few rows (7% on a 10 × 2049 by 2049 × 2049 product); the values are the same.
        Checked once (one comparison pass over ``A``) and kept with the block."""
        A = self.A
        if A.dim() == 1:
            return A
        At = getattr(self, "_At", None)  # (a block unpickled from before has none)
        if At is None or At[0] is not A or At[1] != A._version:
            sym = bool(torch.equal(A, A.mT))
            At = self._At = (A, A._version, A if sym else A.mT)
        return At[2]

    def solve(self, V, damping=0.0, who=None):
        """``(B + λI)⁻¹ v`` (scalar ``λ``, exact, in the eigenbasis), or with a `PiDamping`
        ``G̃⁻¹ V Ã⁻¹`` for the π-damped factors ``Ã``, ``G̃``.

        π-damped, wide factors (wider than `LAZY_INVERSE_WIDTH`): the first solve with a given
        damping factorizes each damped factor (Cholesky, ``d³/3``) and solves by triangular
        solves; the second turns the same factors into explicit inverses (``2d³/3`` more),
        which later solves apply by matrix products (faster than triangular solves: 2.2x on a
        785-wide factor). One solve thus costs a third of what inverting up front costs, and a
        loop of solves the same. Narrower factors are inverted on the first solve (they cost
        little, and every solve takes the same path, bit for bit)."""
        if not isinstance(damping, PiDamping):
            return self._eigen_for(damping).solve(V, damping, who)
        who = who or (type(self).__name__, damping)
        if damping.float < 0:
            raise _negative(who, "solve")
        key = damping.key
        wide = any(F.dim() == 2 and F.shape[0] > LAZY_INVERSE_WIDTH for F in (self.A, self.G))
        state = self._pi if self._pi is not None and key is not None and \
            self._pi[0] == key else None
        if key is None or not wide or (state is not None and state[1] == "inv"):
            return K.kron_apply(*self._pi_power(-1.0, damping, who, "solve"), V)
        if state is not None:  # the second solve: the inverses from the factors computed
            LA, LG = state[2]
            inv = (K.cholesky_inverse_of(LA, self.A.dtype), K.cholesky_inverse_of(LG, self.A.dtype))
            self._pi = (key, "inv", inv)
            return K.kron_apply(*inv, V)
        chol = self._pi_cholesky(damping)
        if chol is None:  # undamped, or not positive definite once damped: the general path
            return K.kron_apply(*self._pi_power(-1.0, damping, who, "solve"), V)
        self._pi = None if _checks.needs_graph(self.A, self.G) else (key, "chol", chol)
        return K.cholesky_kron_solve(*chol, V)

    # ------------------------------------------------------------------ π-damping
    def _pi_shifts(self, damping):
        """The shifts ``(π√λ, √λ/π)`` of the factors ``A`` and ``G``."""
        s = damping.sqrt
        pi = K.pi_damping(self.A, self.G, damping.use_pi)
        return pi * s, s / pi

    def _pi_cholesky(self, damping):
        """The Cholesky factors of both damped factors, or None (``λ = 0``, or one is not
        positive definite once damped)."""
        if not damping.float > 0:
            return None
        sA, sG = self._pi_shifts(damping)
        LA, LG = K.damped_cholesky(self.A, sA), K.damped_cholesky(self.G, sG)
        return None if LA is None or LG is None else (LA, LG)

    def _pi_power(self, p, damping, who, what):
        """``(Ã^p, G̃^p)`` for the π-damped factors; ``p = -1`` cached for the last damping.

        ``p = -1`` with ``λ > 0``: through the Cholesky factorization of each damped factor (PD
        when the factor is PSD), cheaper than an eigendecomposition of the wide input factors of
        convolutions; a factor that is not PD once damped (e.g. a product from ``mm``) falls back
        to the eigendecomposition. Other powers and ``λ = 0`` go through the factors'
        eigendecompositions; a singular damped factor is refused for negative powers (shared
        singular-matrix error), a negative one for fractional powers."""
        key = damping.key if float(p) == -1.0 else None
        if key is not None and self._pi is not None and self._pi[0] == key \
                and self._pi[1] == "inv":
            return self._pi[2]
        out = None
        if float(p) == -1.0:
            chol = self._pi_cholesky(damping)
            if chol is not None:
                out = tuple(K.cholesky_inverse_of(L, self.A.dtype) for L in chol)
        if out is None:
            rep, regul = who
            sA, sG = self._pi_shifts(damping)
            (lA, UA), (lG, UG) = self.factor_eig()
            dA, dG = lA + sA, lG + sG
            if float(p) < 0:
                for name, d in (("input factor A", dA), ("output-gradient factor G", dG)):
                    _checks.check_invertible(d, rep, what, regul,
                                             detail=f"the {name} of {self.name or 'the block'} is singular")
            if not float(p).is_integer():
                dA = _checks.psd_values(dA, rep, what, regul)
                dG = _checks.psd_values(dG, rep, what, regul)
            out = (K.from_eig(dA ** p, UA), K.from_eig(dG ** p, UG))
        if key is not None and not _checks.needs_graph(self.A, self.G, *out):
            self._pi = (key, "inv", out)
        return out

    # ------------------------------------------------------------------ functions
    def eigenvalues(self, damping=0.0):
        if isinstance(damping, PiDamping):
            sA, sG = self._pi_shifts(damping)
            (lA, _), (lG, _) = self.factor_eig()
            return torch.outer(lG + sG, lA + sA)
        return self._eigen_for(damping).eigenvalues(damping)

    def matpower(self, p, damping=0.0, who=None):
        """``(A ⊗ G + λI)^p`` exactly, as an `EigenKronBlock`; with a `PiDamping`, the
        Kronecker block ``Ã^p ⊗ G̃^p`` of the π-damped factors."""
        if isinstance(damping, PiDamping):
            who = who or (type(self).__name__, damping)
            what = "inverse" if float(p) == -1.0 else f"pow({p})"
            if damping.float < 0:
                raise _negative(who, what)
            return KronBlock(*self._pi_power(float(p), damping, who, what))
        return self._eigen_for(damping).matpower(p, damping, who)

    def logdet_is_spectral(self, damping=0.0):
        return not isinstance(damping, PiDamping) and not is_entries(damping)

    def logdet(self, damping=0.0, who=None):
        """``log det`` of the damped block: exact, or of the π-damped factors
        (``dG log det Ã + dA log det G̃``)."""
        if isinstance(damping, PiDamping):
            rep, regul = who or (type(self).__name__, damping)
            if damping.float < 0:
                raise _negative((rep, regul), "logdet")
            sA, sG = self._pi_shifts(damping)
            (lA, _), (lG, _) = self.factor_eig()
            return _checks.logdet_of(lA + sA, rep, regul, multiplicity=lG.numel()) \
                + _checks.logdet_of(lG + sG, rep, regul, multiplicity=lA.numel())
        return self._eigen_for(damping).logdet(damping, who)

    # ------------------------------------------------------------------ reductions
    def diag(self):
        return torch.outer(K.factor_diag(self.G), K.factor_diag(self.A))

    def dense(self):
        # torch.kron views its operands: a transposed factor (an inverse from a Cholesky
        # factor) must be made contiguous first
        return torch.kron(K.dense(self.G).contiguous(), K.dense(self.A).contiguous())

    def trace(self):
        return K.factor_trace(self.A) * K.factor_trace(self.G)

    def frobenius_sq(self):
        return (K.factor_norm(self.A) * K.factor_norm(self.G)) ** 2

    # ------------------------------------------------------------------ arithmetic
    def scaled(self, x):
        """``x·(A ⊗ G) = A ⊗ (x·G)`` (the eigenbasis is kept)."""
        eig = None
        if self._eig is not None:
            eig_A, (lG, UG) = self._eig
            eig = (eig_A, (lG * x, UG))
        return KronBlock(self.A, self.G * x, eig, self.name)

    def add(self, other):
        """``A ⊗ G + s·I`` is exact in the factors' eigenbasis (an EigenKronBlock); the sum of
        two Kronecker products is a Kronecker product when a factor of one is proportional to
        the same factor of the other; otherwise refused."""
        from .identity import ScaledIdentityBlock
        if isinstance(other, ScaledIdentityBlock):
            return self.eigen().add(other)
        if isinstance(other, KronBlock):
            tol = 1e3 * torch.finfo(self.G.dtype).eps
            c = K.proportional(self.A, other.A, tol)
            if c is not None:
                return KronBlock(self.A, self.G + c * other.G, name=self.name)
            c = K.proportional(self.G, other.G, tol)
            if c is not None:
                return KronBlock(self.A + c * other.A, self.G, name=self.name)
            raise NotImplementedError(
                f"KronBlock + KronBlock has no structured form for {self.name or 'this block'}: "
                "the sum of two Kronecker products is not one (neither factor of one is "
                "proportional to the other's). For an online / running estimate (e.g. online EWC, F ← γF + F_new) "
                "average the factors instead, F.factor_average(F_new, γ, 1) (an approximation "
                "of the sum, the usual KFAC one); or use PMatEKFAC on one shared eigenbasis "
                "(build the second with eigendecomposition= the first), where sums are exact; "
                "or to_torch() / PMatDense on small models")
        return super().add(other)


def _negative(who, what):
    """The error for a negative π-damping (the shared message)."""
    try:
        _checks.check_regul_nonnegative(
            who[0], what, who[1], "π-damping adds π√regul·I and √regul/π·I to the factors "
            "(use damping='exact' for M + regul·I with any regul)")
    except ValueError as e:
        return e
    return ValueError(f"{who[0]}.{what}: negative π-damping")
