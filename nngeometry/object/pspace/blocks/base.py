"""What every per-layer block offers, and the defaults written once from the primitives.

A block is a symmetric ``d × d`` matrix ``B`` acting on vectors in its own *layout*: a tensor of
shape ``block.shape`` (``(d,)`` for a dense or diagonal block; ``(dG, dA)`` for the Kronecker
blocks, whose layout is the layer's Kronecker layout, see `kron`). Every primitive
takes batches: ``V`` of shape ``(..., *block.shape)``.

A *damping* ``Λ`` added to the block is a scalar ``λ`` (a number or a 0-d tensor, ``Λ = λI``) or
a tensor of shape ``block.shape`` (one value per entry, ``Λ = diag(λ)``). Tensors keep their
autograd graph: results are differentiable with respect to them. A block whose structure cannot
absorb a per-entry damping exactly (the Kronecker blocks) raises ``NotImplementedError``.

Checks (singular, not positive semi-definite) raise the representations' shared errors
(``_checks``); ``caller = (representation name, regul)`` names the caller and its ``regul`` in the
messages (default: the block and its damping).
"""
import math

import torch

from .. import _checks, _spectral


class EntriesDamping:
    """A per-entry damping seen by the shared checks: positive when every entry is."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __float__(self):
        return float(self.value.detach().min()) if self.value.numel() else 0.0

    def describe(self):
        return f"per-entry damping (smallest {float(self):.3g})"


def is_entries(damping):
    """Whether ``damping`` is a per-entry tensor (not a scalar)."""
    return torch.is_tensor(damping) and damping.dim() > 0


def caller_of(block, damping, caller):
    """``(name, regul)`` for the shared error messages."""
    if caller is not None:
        return caller
    return type(block).__name__, EntriesDamping(damping) if is_entries(damping) else damping


def per_entry_refused(block):
    return NotImplementedError(
        f"{type(block).__name__}: a per-entry damping does not keep the Kronecker eigenbasis, so "
        "the damped block has no exact form here; damp with a scalar (one value per layer), or "
        "use a dense, diagonal, quasi-diagonal or low-rank block, where it is exact")


class Block:
    """The primitives every block implements (see the module docstring), with defaults written
    once from the others. Subclasses set ``shape`` and implement at least ``apply``,
    ``eigenvalues``, ``diag``, ``dense`` and ``matpower``."""

    shape = ()

    @property
    def numel(self):
        return math.prod(self.shape)

    @property
    def layout_dims(self):
        """The trailing dimensions of a batch ``V`` that hold one vector."""
        return tuple(range(-len(self.shape), 0))

    # ------------------------------------------------------------------ products
    def apply(self, V):
        """``B v`` for every vector ``v`` of the batch ``V`` (shape ``(..., *shape)``)."""
        raise NotImplementedError

    def quadratic(self, V):
        """``vᵀ B v`` for every vector of the batch: shape ``V.shape[:-len(shape)]``."""
        return (V * self.apply(V)).sum(dim=self.layout_dims)

    def solve(self, V, damping=0.0, caller=None):
        """``(B + Λ)⁻¹ v`` for every vector of the batch (exact; singular: the shared error)."""
        return self.matpower(-1.0, damping, caller).apply(V)

    # ------------------------------------------------------------------ functions
    def eigenvalues(self, damping=0.0):
        """The eigenvalues of ``B + λI`` (scalar ``λ``; for a per-entry damping those of
        ``B + diag(λ)``): a tensor whose entries are the ``d`` eigenvalues, in any order."""
        raise NotImplementedError

    def matpower(self, p, damping=0.0, caller=None):
        """The block ``(B + Λ)^p``: negative ``p`` needs ``B + Λ`` invertible, fractional ``p``
        positive semi-definite (round-off below 0 is clipped), else the shared errors."""
        raise NotImplementedError

    def logdet_is_spectral(self, damping=0.0):
        """Whether `logdet` is ``Σ log`` of `eigenvalues` under the shared positive-definite
        checks (then a container may check and sum the spectra of all its blocks at once)."""
        return type(self).logdet is Block.logdet

    def logdet(self, damping=0.0, caller=None):
        """``log det(B + Λ)`` (``B + Λ`` must be positive definite: the shared errors)."""
        rep, regul = caller_of(self, damping, caller)
        return _spectral.logdet_from_eigvals(self.eigenvalues(damping).reshape(-1), rep, regul)

    # ------------------------------------------------------------------ reductions
    def diag(self):
        """The diagonal of ``B``, shape ``shape``."""
        raise NotImplementedError

    def dense(self):
        """The dense ``(d, d)`` matrix, rows and columns in the layout's row-major order."""
        raise NotImplementedError

    def trace(self):
        return self.diag().sum()

    def frobenius_sq(self):
        """``‖B‖_F² = Σ λ²`` (``B`` symmetric)."""
        ev = self.eigenvalues()
        return (ev * ev).sum()

    # ------------------------------------------------------------------ arithmetic
    def scaled(self, x):
        """The block ``x·B``."""
        raise NotImplementedError

    def add(self, other):
        """The block ``B + other`` where the sum keeps a structure; else
        ``NotImplementedError``."""
        raise NotImplementedError(
            f"{type(self).__name__} + {type(other).__name__} has no structured form; convert "
            "both to dense blocks")

    def add_identity(self, s):
        """The block ``B + s·I`` (``s`` a scalar)."""
        from .identity import ScaledIdentityBlock
        return self.add(ScaledIdentityBlock(s, self.shape))


def check_shape(V, shape, name):
    if tuple(V.shape[V.dim() - len(shape):]) != tuple(shape):
        raise ValueError(f"{name}: expected vectors of shape (..., {', '.join(map(str, shape))}), "
                         f"got {tuple(V.shape)}")


def eye_like(n, like):
    return torch.eye(n, dtype=like.dtype, device=like.device)


def values_for_power(ev, p, rep, regul, exact=False):
    """The eigenvalues of ``B + Λ`` ready for the power ``p`` (shared checks)."""
    if exact:
        if float(p) < 0:
            _checks.check_invertible(ev, rep, f"pow({p})", regul, exact=True)
        if not float(p).is_integer():
            ev = _checks.psd_values(ev, rep, f"pow({p})", regul, exact=True)
        return ev
    return _spectral.eigvals_for_power(ev, p, rep, regul)
