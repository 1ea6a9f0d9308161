"""The prior precision / damping ``Λ`` added to a matrix by ``solve``, ``inverse``, ``pow`` and
``logdet`` (``regul=``), normalised once.

Every representation computes functions of ``M + Λ`` where ``Λ`` is a diagonal ``P × P``
matrix given as one of

* a Python number or a 0-d tensor ``λ``: ``Λ = λ I`` (kind ``'scalar'``);
* a dict ``{layer_id: λ_l}``: ``λ_l`` on the diagonal of layer ``l``'s parameters, 0 for the
  layers left out (kind ``'layer'``);
* a [`PVector`][nngeometry.object.vector.PVector] ``v``: ``Λ = diag(v)``, one value per parameter
  (kind ``'param'``);
* a `PMatEye` ``s I`` (kind ``'scalar'``) or a `PMatDiag` ``diag(d)`` (kind
  ``'param'``).

Values that are tensors keep their autograd graph: a result computed from ``M + Λ`` is
differentiable with respect to them (the gradient of a log marginal likelihood with respect to
prior precisions).
"""
import torch

from ..vector import PVector

SCALAR, LAYER, PARAM = "scalar", "layer", "param"


def _is_scalar(x):
    if isinstance(x, bool):
        return False
    if isinstance(x, (int, float)):
        return True
    return torch.is_tensor(x) and x.dim() == 0


def _as_float(x):
    return float(x.detach()) if torch.is_tensor(x) else float(x)


class Prior:
    """A normalised ``Λ`` (see the module docstring).

    ``kind`` is ``'scalar'`` (``value`` a number or 0-d tensor), ``'layer'`` (``value`` a dict
    with one number or 0-d tensor for *every* layer of the collection, in its order) or
    ``'param'`` (``value`` a ``(P,)`` tensor in the collection's flat layout).
    """

    __slots__ = ("kind", "value", "layer_collection")

    def __init__(self, kind, value, layer_collection):
        self.kind = kind
        self.value = value
        self.layer_collection = layer_collection

    # ------------------------------------------------------------------ views
    @property
    def is_scalar(self):
        return self.kind == SCALAR

    def layer_value(self, lid):
        """``λ_l`` of layer ``lid`` (kinds 'scalar' and 'layer')."""
        if self.kind == SCALAR:
            return self.value
        if self.kind == LAYER:
            return self.value[lid]
        raise ValueError("a per-parameter prior has no single value per layer")

    def layer_slice(self, lid, like):
        """The ``(p_l,)`` diagonal of ``Λ`` on layer ``lid`` (dtype and device of ``like``)."""
        if self.kind == PARAM:
            return self.value[self.layer_collection.slice(lid)].to(like.dtype)
        n = self.layer_collection[lid].numel()
        return _full(n, self.layer_value(lid), like)

    def flat(self, like):
        """The ``(P,)`` diagonal of ``Λ`` (dtype and device of ``like``)."""
        if self.kind == PARAM:
            return self.value.to(device=like.device, dtype=like.dtype)
        if self.kind == SCALAR:
            return _full(self.layer_collection.numel(), self.value, like)
        return torch.cat([self.layer_slice(lid, like) for lid in self.layer_collection.layer_ids()])

    def restrict(self, layer_collection):
        """The same ``Λ`` on a sub-collection (for PMatMixed's groups)."""
        if self.kind == SCALAR:
            return Prior(SCALAR, self.value, layer_collection)
        if self.kind == LAYER:
            return Prior(LAYER, {lid: self.value[lid] for lid in layer_collection.layer_ids()},
                         layer_collection)
        parts = [self.value[self.layer_collection.slice(lid)] for lid in layer_collection.layer_ids()]
        return Prior(PARAM, torch.cat(parts), layer_collection)

    def tensors(self):
        if self.kind == LAYER:
            return [v for v in self.value.values() if torch.is_tensor(v)]
        return [self.value] if torch.is_tensor(self.value) else []

    def requires_grad(self):
        return torch.is_grad_enabled() and any(t.requires_grad for t in self.tensors())

    def lower(self):
        """The smallest diagonal entry of ``Λ`` (a float, no graph)."""
        if self.kind == SCALAR:
            return _as_float(self.value)
        if self.kind == LAYER:
            return min(_as_float(v) for v in self.value.values())
        return float(self.value.detach().min()) if self.value.numel() else 0.0

    def __float__(self):
        # what the shared checks read: a damping is "positive" when every entry is
        return self.lower()

    def key(self):
        """A hashable cache key of the values, or None (do not cache: a graph-recording value,
        or a per-parameter vector, whose cache would be as large as the matrix)."""
        if self.requires_grad() or self.kind == PARAM:
            return None
        if self.kind == SCALAR:
            return _as_float(self.value)
        return tuple(_as_float(self.value[lid]) for lid in self.layer_collection.layer_ids())

    def describe(self):
        if self.kind == SCALAR:
            return f"regul={_as_float(self.value):.3g}"
        what = "per-layer" if self.kind == LAYER else "per-parameter"
        return f"{what} regul (smallest {self.lower():.3g})"

    def __repr__(self):
        return f"Prior({self.describe()})"


def _full(n, value, like):
    """``n`` copies of a scalar ``value`` (keeping its graph when it is a tensor)."""
    if torch.is_tensor(value):
        return value.to(dtype=like.dtype, device=like.device).expand(n)
    return torch.full((n,), float(value), dtype=like.dtype, device=like.device)


def as_prior(regul, layer_collection, rep="PMat", what="solve"):
    """Normalise ``regul`` into a `Prior` on ``layer_collection``; refuse anything else
    with a message naming the accepted kinds."""
    if isinstance(regul, Prior):
        if regul.layer_collection != layer_collection:
            raise ValueError(f"{rep}.{what}: the prior is built on another LayerCollection")
        return regul
    if _is_scalar(regul):
        return Prior(SCALAR, regul, layer_collection)
    if torch.is_tensor(regul) and regul.numel() == 1:
        return Prior(SCALAR, regul.reshape(()), layer_collection)
    if torch.is_tensor(regul):
        raise TypeError(
            f"{rep}.{what}: regul is a tensor of shape {tuple(regul.shape)}; for one value per "
            "parameter pass a PVector (PVector(layer_collection, vector_repr=t)) or a PMatDiag, "
            "for one per layer a dict {layer_id: value}")
    if isinstance(regul, dict):
        ids = layer_collection.layer_ids()
        unknown = [k for k in regul if k not in layer_collection.layers]
        if unknown:
            raise ValueError(
                f"{rep}.{what}: regul has values for layers {unknown} that are not in the "
                f"matrix's LayerCollection (its layers: {ids}); key the dict by layer id")
        bad = [k for k, v in regul.items() if not _is_scalar(v)]
        if bad:
            raise ValueError(
                f"{rep}.{what}: regul['{bad[0]}'] must be a number or a 0-d tensor (one value "
                "for the whole layer); for one value per parameter pass a PVector")
        return Prior(LAYER, {lid: regul.get(lid, 0.0) for lid in ids}, layer_collection)
    if isinstance(regul, PVector):
        if regul.layer_collection != layer_collection:
            raise ValueError(
                f"{rep}.{what}: the regul PVector's layout ({regul.layer_collection.numel()} "
                f"parameters) does not match the matrix's ({layer_collection.numel()}); build it "
                "on the matrix's LayerCollection")
        return Prior(PARAM, regul.get_flat_representation(), layer_collection)
    # PMatEye / PMatDiag: imported here (they import this module's users)
    from .diag import PMatDiag
    from .eye import PMatEye
    if isinstance(regul, (PMatEye, PMatDiag)):
        if regul.layer_collection != layer_collection:
            raise ValueError(f"{rep}.{what}: the regul {type(regul).__name__} is built on another "
                             "LayerCollection than the matrix; build it on the matrix's")
        if isinstance(regul, PMatEye):
            return Prior(SCALAR, regul.scaling, layer_collection)
        return Prior(PARAM, regul.data, layer_collection)
    raise TypeError(
        f"{rep}.{what}: regul must be a number or 0-d tensor, a dict {{layer_id: number}}, a "
        f"PVector (one value per parameter), a PMatEye or a PMatDiag; got {type(regul).__name__}")


def scalar_or_prior(regul, layer_collection, rep, what):
    """``(scalar, None)`` for a scalar ``Λ = λI`` (the representation's own fast path, with
    ``λ`` as given: number or 0-d tensor; a one-element tensor is read as its 0-d value),
    ``(None, prior)`` otherwise."""
    if _is_scalar(regul):
        return regul, None
    if torch.is_tensor(regul) and regul.numel() == 1:
        return regul.reshape(()), None
    prior = as_prior(regul, layer_collection, rep, what)
    if prior.is_scalar:
        return prior.value, None
    return None, prior


def layer_prior(regul, layer_collection, rep, what):
    """``regul`` for a representation that keeps a per-layer eigenbasis (KFAC, EKFAC): a scalar
    ``λ`` as given, the normalised per-layer prior for a dict; a per-parameter ``Λ`` is refused
    (it does not keep the Kronecker eigenbasis)."""
    scalar, prior = scalar_or_prior(regul, layer_collection, rep, what)
    if prior is None:
        return scalar
    if prior.kind != "layer":
        raise per_parameter_refused(rep, what)
    return prior


def unit_value(regul, key):
    """The scalar damping ``λ_l`` of a unit of a per-layer representation (``key`` a layer id,
    or a Kronecker term's ``Unit``: every term of a layer gets its layer's), from what
    `layer_prior` returned."""
    if hasattr(regul, "layer_value"):
        return regul.layer_value(getattr(key, "layer", key))
    return regul


def per_parameter_refused(rep, what):
    """The error for a per-parameter ``Λ`` on a Kronecker-structured representation."""
    return NotImplementedError(
        f"{rep}.{what}: a per-parameter regul (PVector or PMatDiag) does not keep the Kronecker "
        "eigenbasis, so M + Λ has no exact form here; pass a scalar or a per-layer dict "
        "{layer_id: value}, or use a representation where it is exact: PMatDense, PMatBlockDiag, "
        "PMatDiag, PMatQuasiDiag, PMatLowRank, PMatEye, PMatImplicit (solve), PMatMixed")
