"""The dense block ``B`` (PMatDense's whole matrix, PMatBlockDiag's per-layer blocks, the
dense layers of PMatEKFACBlockDiag): functions through the eigendecomposition, computed once and
reused for every scalar damping; solves through a factorization of the damped block (LU by
default, or Cholesky), kept for the last damping."""
import torch

from .. import _checks, _spectral
from .base import Block, eye_like, is_entries, values_for_power, caller_of


class DenseBlock(Block):
    """A symmetric ``(d, d)`` tensor ``M`` on a layout of shape ``(d,)``.

    The eigendecomposition ``M = U diag(λ) Uᵀ`` is computed on first need and kept (unless
    ``M`` records an autograd graph): ``matpower``/``logdet``/``eigenvalues`` with a scalar
    damping then cost ``O(d²)`` / ``O(d)``; a per-entry damping ``Λ`` decomposes ``M + Λ``
    itself (``M`` and ``Λ`` share no eigenbasis)."""

    __slots__ = ("M", "_eig", "name", "_fact")

    def __init__(self, M, eig=None, name=None):
        self.M = M
        self._eig = eig
        self.name = name  # for the messages: "the block of layer 'fc1'" (a container sets it)
        self._fact = None  # (method, damping key, factorization) of the last solve

    @property
    def shape(self):
        return (self.M.shape[0],)

    def eigh(self):
        """``(λ ascending, U)`` of ``M``, cached (not when ``M`` records a graph); ``eig`` given
        to the constructor may be the pair, or a function returning it (a container's cache)."""
        if callable(self._eig):
            return self._eig()
        if self._eig is None:
            eig = _spectral.eigh(self.M)
            if _checks.needs_graph(self.M):
                return eig
            self._eig = eig
        return self._eig

    def damped(self, damping):
        """The dense ``M + Λ``."""
        if is_entries(damping):
            return self.M + torch.diag(damping.to(self.M.dtype))
        return self.M + damping * eye_like(self.M.shape[0], self.M)

    def damped_eigh(self, damping):
        if is_entries(damping):
            return _spectral.eigh(self.damped(damping))
        evals, evecs = self.eigh()
        return evals + damping, evecs

    # ------------------------------------------------------------------ products
    def apply(self, V):
        if V.dim() == 1:
            return self.M @ V
        return V @ self.M  # M symmetric: rows times M is M applied to each row

    def quadratic(self, V):
        if V.dim() == 1:
            return V @ (self.M @ V)
        return (V * (V @ self.M)).sum(-1)

    def solve(self, V, damping=0.0, caller=None, method="lu"):
        """``(M + Λ)⁻¹ v`` for the rows of ``V``. ``method``: ``'lu'`` (default; LU with
        partial pivoting, the result of ``torch.linalg.solve``) or ``'cholesky'``, through the
        factorization of the damped block, kept for the last ``(method, damping)`` (a second
        solve costs two triangular solves, about one product); ``'eigh'``, through the
        (cached) eigendecomposition; ``'lstsq'``. An undamped (``Λ ≤ 0``) singular ``M`` is
        refused through its (cached) eigenvalues first."""
        rep, regul = caller_of(self, damping, caller)
        if not _checks._float(regul) > 0:
            _checks.check_invertible(self.damped_eigh(damping)[0], rep, "solve", regul,
                                     detail=f"{self.name} is singular" if self.name else "")
        rows = _checks.upcast(V.reshape(-1, self.shape[0])).t()
        if method == "eigh":
            evals, evecs = self.damped_eigh(damping)
            evals, evecs = _checks.upcast(evals), _checks.upcast(evecs)
            X = evecs @ ((evecs.t() @ rows) / evals.unsqueeze(1))
        elif method == "lstsq":
            X = torch.linalg.lstsq(_checks.upcast(self.damped(damping)), rows).solution
        elif method == "cholesky":
            X = torch.cholesky_solve(rows, self._factor("cholesky", damping, rep, regul))
        elif method == "lu":
            X = torch.linalg.lu_solve(*self._factor("lu", damping, rep, regul), rows)
        else:
            raise ValueError(f"unknown solve method '{method}': use 'lu', 'cholesky', 'eigh' "
                             "or 'lstsq'")
        return X.t().to(V.dtype).reshape(V.shape)

    def _factor(self, method, damping, rep, regul):
        """The factorization of ``M + Λ`` for ``method`` (``lu_factor``, or the lower Cholesky
        factor), in float32 for half precision; the last one is kept (keyed on the damping;
        never when ``M`` or the damping records an autograd graph)."""
        entries = is_entries(damping)
        cached = self._fact
        if cached is not None and cached[0] == method:
            key = cached[1]
            if entries and torch.is_tensor(key) and key.shape == damping.shape \
                    and torch.equal(key, damping):
                return cached[2]
            if not entries and not torch.is_tensor(key) and \
                    key == _checks.regul_key(damping):
                return cached[2]
        self._fact = None  # freed before the next one is computed (as large as the block)
        A = _checks.upcast(self.damped(damping))
        try:
            out = torch.linalg.cholesky(A) if method == "cholesky" else torch.linalg.lu_factor(A)
        except torch.linalg.LinAlgError as e:
            where = self.name or "M"
            if method == "cholesky":
                raise ValueError(
                    f"{rep}.solve(solve='cholesky'): {where} + regul·I is not positive definite "
                    f"at {_checks.describe_regul(regul)} (torch: {str(e).splitlines()[0]}); pass "
                    "a larger regul > 0, or solve='solve' (LU) for an indefinite matrix") from None
            raise _checks.singular_error(rep, "solve", regul,
                                         f"{where} is singular: the LU factorization has a "
                                         "zero pivot") from None
        del A
        key = damping.detach().clone() if entries else _checks.regul_key(damping)
        if key is not None and not _checks.needs_graph(self.M, damping):
            self._fact = (method, key, out)
        return out

    # ------------------------------------------------------------------ functions
    def eigenvalues(self, damping=0.0):
        if is_entries(damping):
            return _spectral.eigvalsh(self.damped(damping))
        return self.eigh()[0] + damping

    def matpower(self, p, damping=0.0, caller=None):
        """``(M + Λ)^p``: ``p = 1`` the damped matrix; ``p = -1`` through an LU inverse (its
        gradient has no ``1/(λ_i - λ_j)`` terms, so it is finite for the repeated eigenvalues
        a per-layer damping of a rank-deficient ``M`` produces); other powers through the
        eigendecomposition."""
        rep, regul = caller_of(self, damping, caller)
        if float(p) == 1.0:
            return DenseBlock(self.damped(damping))
        if float(p) == -1.0:
            if not _checks._float(regul) > 0:
                _checks.check_invertible(self.damped_eigh(damping)[0], rep, "inverse", regul)
            A = self.damped(damping)
            try:
                inv = torch.linalg.inv(_checks.upcast(A)).to(A.dtype)
            except torch.linalg.LinAlgError:
                raise _checks.singular_error(rep, "inverse", regul,
                                             "the LU factorization has a zero pivot") from None
            return DenseBlock(inv)
        evals, evecs = self.damped_eigh(damping)
        ev = values_for_power(evals, p, rep, regul)
        return DenseBlock((evecs * ev ** p) @ evecs.t())

    # ------------------------------------------------------------------ reductions
    def diag(self):
        return torch.diagonal(self.M)

    def dense(self):
        return self.M

    def trace(self):
        return torch.trace(self.M)

    def frobenius_sq(self):
        return (self.M * self.M).sum()

    # ------------------------------------------------------------------ arithmetic
    def scaled(self, x):
        return DenseBlock(self.M * x)

    def add(self, other):
        if isinstance(other, Block) and other.shape == self.shape:
            if isinstance(other, DenseBlock):
                return DenseBlock(self.M + other.M)
            from .identity import ScaledIdentityBlock
            if isinstance(other, ScaledIdentityBlock):
                return DenseBlock(self.damped(other.s))
            return DenseBlock(self.M + other.dense())
        return super().add(other)
