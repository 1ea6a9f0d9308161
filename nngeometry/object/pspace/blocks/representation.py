"""A whole representation on a group of layers seen as one block (PMatMixed's groups).

Its layout is the group's flat ``(P_g,)`` vector. Each primitive calls the representation's own
operation (so a KFAC group keeps its π-damping and its caches, a PMatImplicit group its
conjugate gradients), with the group's share of the damping: `GroupDamping`, the ``regul`` of
the group's layers and the keywords its operations take.
"""
import inspect

from ...map import PFMapDense
from ...vector import PVector
from ..eye import PMatEye
from .base import Block


class GroupDamping:
    """The damping of one group: ``regul`` (a scalar or the prior restricted to the group's
    layers, which keeps its kind: a per-layer dict stays per layer) and ``options``, the
    keywords of the call (``damping``, ``use_pi``, ``tol``, ...); ``damping=None``: the group's
    own default."""

    __slots__ = ("regul", "options")

    def __init__(self, regul, options):
        self.regul, self.options = regul, options


def accepted(fn, options):
    """The keywords of ``options`` that ``fn`` (a representation's method) takes; a ``damping``
    that its representation does not offer (``'pi'`` for a non-KFAC group) becomes
    ``'exact'``, and ``damping=None`` is left out (the representation's default)."""
    options = {k: v for k, v in options.items() if not (k == "damping" and v is None)}
    owner = getattr(fn, "__self__", None)
    if "damping" in options and owner is not None and options["damping"] not in owner._DAMPINGS:
        options["damping"] = "exact"
    params = inspect.signature(fn).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return options
    return {k: v for k, v in options.items() if k in params}


def call_group(fn, damping, *args, **kwargs):
    return fn(*args, regul=damping.regul, **kwargs, **accepted(fn, damping.options))


class RepresentationBlock(Block):
    """The block ``M_g`` of a representation ``matrix`` on the group's layers."""

    __slots__ = ("matrix",)

    def __init__(self, matrix):
        self.matrix = matrix

    @property
    def shape(self):
        return (self.matrix.layer_collection.numel(),)

    def _pfmap(self, V):
        """``V`` (``(..., P_g)``) as a PFMap of one output direction."""
        return PFMapDense(self.matrix.layer_collection,
                          data=V.reshape(1, -1, V.shape[-1]))

    def _pvector(self, v):
        return PVector(self.matrix.layer_collection, vector_repr=v)

    # ------------------------------------------------------------------ products
    def apply(self, V):
        if V.dim() == 1:
            return self.matrix.mv(self._pvector(V)).get_flat_representation()
        return self.matrix.mmap(self._pfmap(V)).to_torch().reshape(V.shape)

    def quadratic(self, V):
        if V.dim() == 1:
            return self.matrix.vTMv(self._pvector(V))
        return self.matrix.mapTMmap(self._pfmap(V), reduction="diag").reshape(V.shape[:-1])

    def solve(self, V, damping=None, caller=None, method="default"):
        if V.dim() == 1:
            out = call_group(self.matrix.solvePVec, damping, self._pvector(V), solve=method)
            return out.get_flat_representation()
        out = call_group(self.matrix.solvePFMap, damping, self._pfmap(V), solve=method)
        return out.to_torch().reshape(V.shape)

    # ------------------------------------------------------------------ functions
    def eigenvalues(self, damping=None):
        return call_group(self.matrix.eigenvalues, damping).reshape(-1)

    def matpower(self, p, damping=None, caller=None):
        if float(p) == -1.0:  # the representation's inverse (its own solver choices)
            return RepresentationBlock(call_group(self.matrix._inverse_impl, damping))
        return RepresentationBlock(call_group(self.matrix.pow, damping, p))

    def logdet(self, damping=None, caller=None):
        return call_group(self.matrix.logdet, damping)

    # ------------------------------------------------------------------ reductions
    def diag(self):
        return self.matrix.get_diag()

    def dense(self):
        return self.matrix.to_torch()

    def trace(self):
        return self.matrix.trace()

    def frobenius_sq(self):
        return self.matrix._frobenius_norm_impl() ** 2

    # ------------------------------------------------------------------ arithmetic
    def scaled(self, x):
        return RepresentationBlock(self.matrix * x)

    def add(self, other):
        if not isinstance(other, RepresentationBlock):
            return super().add(other)
        if other.matrix.layer_collection != self.matrix.layer_collection:
            raise NotImplementedError("the two PMatMixed group their layers differently; use "
                                      "to_torch() (dense)")
        return RepresentationBlock(self.matrix + other.matrix)

    def add_identity(self, s):
        return RepresentationBlock(self.matrix + PMatEye(self.matrix.layer_collection, scaling=s))
