"""``PMatEye``: a scaled identity ``s·I`` (e.g. an isotropic prior precision); a container of
one `ScaledIdentityBlock`."""
import torch

from .abstract import PMatAbstract, resolve_layer_collection
from .blocks import ScaledIdentityBlock


class PMatEye(PMatAbstract):
    """``scaling · I`` in the parameter space of ``layer_collection``; nothing else is stored.

    Args:
        layer_collection: the parameter layout (optional when ``generator`` is given: its
            collection is used).
        scaling: a scalar (0-dim tensor or number); its dtype and device are those of
            ``to_torch()`` and ``get_diag()``.
    """

    def __init__(self, layer_collection=None, scaling=torch.tensor(1.0), generator=None, data=None,
                 **kwargs):
        if data is not None:  # PMatEye(lc, data=s) is accepted too
            scaling = data
        if not torch.is_tensor(scaling):
            scaling = torch.tensor(float(scaling))
        if scaling.dim() != 0:
            raise ValueError(
                f"PMatEye's scaling must be a scalar, got shape {tuple(scaling.shape)}; for a "
                "diagonal with different entries use PMatDiag")
        self.layer_collection = resolve_layer_collection(layer_collection, generator, "PMatEye")
        self.generator = None
        self.data = scaling

    @property
    def scaling(self):
        return self.data

    @property
    def dtype(self):
        return self.data.dtype

    def _new(self, s):
        return PMatEye(self.layer_collection, scaling=s)

    def _check_lc(self, other):
        if other.layer_collection != self.layer_collection:
            raise ValueError("the two matrices are built on different LayerCollections")

    # ------------------------------------------------------------------ the container
    def _blocks(self):
        return [ScaledIdentityBlock(self.data, (self.layer_collection.numel(),))]

    def _from_blocks(self, blocks):
        """``s·I`` stays a PMatEye; with a per-layer / per-parameter ``Λ`` it is a PMatDiag."""
        (b,) = blocks
        if isinstance(b, ScaledIdentityBlock):
            return self._new(b.s if torch.is_tensor(b.s) else torch.as_tensor(b.s, dtype=self.data.dtype))
        from .diag import PMatDiag
        return PMatDiag(self.layer_collection, None, data=b.d)

    def _like(self):
        return self.data.reshape(1)

    def mm(self, other):
        """Product with another PMatEye; ``s·I @ A = s·A`` for any other representation."""
        if isinstance(other, PMatEye):
            self._check_lc(other)
            return self._new(self.data * other.data)
        if isinstance(other, PMatAbstract):
            self._check_lc(other)
            return other * self.data
        raise TypeError(f"mm takes a PMat, got {type(other).__name__}")

    # ------------------------------------------------------------------ solves and functions
    # (written once in the base class from the block; the default regul of a scaled identity
    # is 0: it is invertible by itself)
    def solvePVec(self, v, regul=0.0, solve="default", damping="exact"):
        """``v / (s + regul)``; a per-layer / per-parameter ``Λ``: ``v / (s + Λ)``."""
        return super().solvePVec(v, regul=regul, solve=solve, damping=damping)

    def solvePFMap(self, x, regul=0.0, solve="default", damping="exact"):
        return super().solvePFMap(x, regul=regul, solve=solve, damping=damping)

    def solve(self, x, regul=0.0, solve="default", **kwargs):
        """``(s + regul)⁻¹ x`` for a PVector or PFMap (exact)."""
        return super().solve(x, regul=regul, solve=solve, **kwargs)

    def inverse(self, regul=0.0, damping="exact"):
        """``((s + regul)·I)⁻¹`` as a PMatEye (a PMatDiag for a per-layer / per-parameter
        ``Λ``)."""
        return super()._inverse_impl(regul=regul, damping=damping)

    def pinv(self, atol=1e-8):
        """Pseudo-inverse: ``(1/s)·I``, or the zero matrix when ``|s| ≤ atol``."""
        if float(self.data.abs()) <= atol:
            return self._new(torch.zeros_like(self.data))
        return self._new(1.0 / self.data)

    # ------------------------------------------------------------------ reductions
    def _singular_values(self):
        return self.data.abs().reshape(1)  # all P singular values are |s|

    # ------------------------------------------------------------------ arithmetic
    def __add__(self, other):
        if isinstance(other, PMatEye):
            self._check_lc(other)
            return self._new(self.data + other.data)
        if isinstance(other, PMatAbstract):
            # the other representation knows how to absorb a scaled identity (Diag, BlockDiag,
            # QuasiDiag, LowRank), or says it can't
            return other.__add__(self)
        return NotImplemented

    __radd__ = __add__

    def __sub__(self, other):
        if isinstance(other, PMatEye):
            self._check_lc(other)
            return self._new(self.data - other.data)
        if isinstance(other, PMatAbstract):
            return (-other).__add__(self)
        return NotImplemented
