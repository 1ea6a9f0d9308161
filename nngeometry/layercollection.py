"""Where each layer's parameters sit in the flat parameter vector.

Layout (docs/index.md, "Parameter layout"): layers in the order of ``model.named_modules()``, restricted to modules
with parameters; a layer's id is its qualified module name; inside a layer ``weight.flatten()``
then ``bias.flatten()``. ``p_pos[layer_id]`` is the layer's offset.
"""
import contextlib
from collections import OrderedDict

from torch.nn.utils import parametrize

from .layer_types import AbstractLayer, layer_type_for
from .layer_types.generic import GenericLayer, refusal_reason
from .layer_types.parametrized import ParametrizedLayer, own_parameters
from .layer_types import *  # noqa: F401,F403  (re-export LinearLayer, Conv2dLayer, ...)
from .layer_types import __all__ as _layer_types_all
from .serialization import StateDictMixin


class UnsupportedLayerError(TypeError):
    """A module with parameters that cannot be handled (e.g. recurrent layers)."""


def _type_for(module):
    """The layer type of a module with direct parameters: the registered one, else the generic
    one (``None`` for modules that are refused, see ``layer_types.generic``)."""
    if parametrize.is_parametrized(module):
        return ParametrizedLayer
    cls = layer_type_for(module)
    if cls is not None:
        return cls
    if refusal_reason(module) is not None:
        return None
    return GenericLayer


def unwrap_compiled(model):
    """The module that a ``torch.compile``'d model wraps (``model._orig_mod``), else ``model``.

    A compiled model's parameters are its original module's, under names prefixed with
    ``_orig_mod.``; the collection uses the original names, so that it is the same for the
    model and its compiled version."""
    # by class name: importing torch._dynamo to test isinstance would cost every user a second
    while any(c.__name__ == "OptimizedModule" for c in type(model).__mro__) \
            and "_orig_mod" in getattr(model, "_modules", {}):
        model = model._orig_mod
    return model


@contextlib.contextmanager
def run_eagerly(model):
    """Within the block, the ``torch.compile``'d parts of ``model`` (the model itself when
    ``torch.compile(model)`` wrapped it, any submodule wrapped so, any module compiled in place
    with ``module.compile()``) run their original Python code: compiled code does not run the
    forward hooks registered after it was compiled, and the per-layer statistics come from
    those hooks. Per-instance attributes only (no global switch), restored on exit, also on an
    exception."""
    saved = []
    seen = set()
    stack = [model]
    try:
        while stack:
            m = stack.pop()
            if id(m) in seen:
                continue
            seen.add(id(m))
            if m is not unwrap_compiled(m):
                # OptimizedModule: its forward is an instance attribute set by torch.compile
                saved.append((m, "forward", vars(m)["forward"]))
                vars(m)["forward"] = m._orig_mod.__call__
            if getattr(m, "_compiled_call_impl", None) is not None:
                saved.append((m, "_compiled_call_impl", m._compiled_call_impl))
                m._compiled_call_impl = None
            stack.extend(m.children())
        yield
    finally:
        for m, name, value in reversed(saved):
            if name == "forward":
                vars(m)["forward"] = value
            else:
                setattr(m, name, value)


def _tied_owner(lc, model, module, name, own, claimed):
    """``(owner_layer_id, spec)`` when every parameter of ``module`` is the parameter of one
    layer already in ``lc``, in the same order and shapes (a tied use); else None."""
    cls = _type_for(module)
    if cls is None:
        return None
    spec = cls.from_module(module)
    owners = {claimed.get(id(p)) for _, p in own}
    if len(owners) != 1 or None in owners:
        return None
    owner = owners.pop()
    if owner not in lc.layers:
        return None
    mine = spec.parameters_of(module)
    theirs = lc[owner].parameters_of(model.get_submodule(owner))
    if len(mine) != len(theirs) or any(a is not b for a, b in zip(mine, theirs)):
        return None
    return owner, spec


class LayerCollection(StateDictMixin):
    """An ordered collection of layers with their offsets in the flat parameter vector."""

    def __init__(self, layers=None):
        self.layers = OrderedDict()
        self.p_pos = OrderedDict()
        self._numel = 0
        # dtype and device of the model the collection was read from (None when built by hand):
        # defaults for the random vectors and maps built on it; not part of equality
        self.dtype = None
        self.device = None
        #: ``{layer_id: [(module_name, layer_spec), ...]}``: other modules that use this layer's
        #: parameters (tied weights, ``from_model(..., tied_weights='sum')``); their uses are
        #: added to the layer's per-example gradients
        self.tied = OrderedDict()
        if layers is not None:
            for layer_id, layer in layers.items() if hasattr(layers, "items") else layers:
                self.add_layer(layer_id, layer)

    # ------------------------------------------------------------------ building
    @staticmethod
    def from_model(model, ignore_unsupported_layers=False, tied_weights="sum"):
        """All layers of ``model`` that have parameters, in ``named_modules()`` order.

        ``tied_weights``: what to do with a module whose parameters are those of an earlier
        layer (GPT-2's ``lm_head`` and ``wte``): ``'sum'`` (default): the module is a second
        use of the earlier layer's parameters (in `tied`), and the generator adds its
        per-example gradients to the layer's, so that the matrices are exact (Dense,
        BlockDiag, Diag, LowRank, QuasiDiag, Implicit, Jacobian, Gram). A KFAC/EKFAC block
        cannot hold such a layer (a sum of two Kronecker products is not one): the entry
        points (``FIM``, ...) give it the exact diagonal block instead, with a warning, and a
        ``PMatKFAC`` built directly refuses it. The module must hold no parameter of its own
        besides the shared ones, in the same layout (otherwise the shared parameter is
        refused as with ``'refuse'``). ``'refuse'``: ``ValueError`` on any shared parameter.

        Raises:
            UnsupportedLayerError: a module owns parameters but no layer type handles it (and
                ``ignore_unsupported_layers`` is False).
        """
        # a torch.compile'd model: the layers of the module it wraps, under their own names
        model = unwrap_compiled(model)
        lc = LayerCollection()
        seen = {}
        claimed = {}  # id(parameter) -> layer that holds it (possibly a submodule's parameter)
        for name, module in model.named_modules():
            # a parametrized module also holds the originals of its parametrized tensors
            own = own_parameters(module) if parametrize.is_parametrized(module) else \
                list(module.named_parameters(recurse=False))
            if not own:
                continue
            owners = {claimed.get(id(p)) for _, p in own}
            if None not in owners and all(name.startswith(o + ".") or o == "" for o in owners):
                # held by an enclosing layer (e.g. MultiheadAttention's out_proj)
                continue
            if tied_weights not in ("refuse", "sum"):
                raise ValueError(f"tied_weights must be 'refuse' or 'sum', got {tied_weights!r}")
            if tied_weights == "sum" and all(id(p) in seen for _, p in own):
                owner = _tied_owner(lc, model, module, name, own, claimed)
                if owner is not None:
                    lc.tied.setdefault(owner[0], []).append((name, owner[1]))
                    continue
            for pname, p in own:
                if id(p) in seen:
                    # leaving one module out of the collection is not enough: the hooks of
                    # the module kept do not see the other module's use of the parameter, and
                    # the matrix misses that part of the gradient (0.72-0.80 off)
                    raise ValueError(
                        f"parameter '{name}.{pname}' is shared with '{seen[id(p)]}' (tied weights): "
                        "the per-layer hooks of one module do not see the other module's use of "
                        "the parameter, so the hooks-based representations (PMatDense, PMatKFAC, "
                        "PMatDiag, PMatBlockDiag, PMatLowRank, ...) cannot compute this matrix. "
                        "For the exact matrix use PMatImplicit (mv, vTMv, solve: its products "
                        "go through torch.func and see every use of the parameter) with a "
                        "LayerCollection built by hand: lc = LayerCollection(); "
                        "lc.add_layer_from_model(model, module) for every layer but one of the "
                        "two modules (the parameters of the module left out that it does not "
                        "share, e.g. its bias, are then constants). "
                        + ("tied_weights='sum' cannot add this use: the module holds parameters "
                           "of its own besides the shared ones, or in another layout"
                           if tied_weights == "sum" else
                           "For exact hooks-based matrices of both uses: "
                           "LayerCollection.from_model(model, tied_weights='sum')"))
                seen[id(p)] = f"{name}.{pname}"
            cls = _type_for(module)
            if cls is None:
                if ignore_unsupported_layers:
                    continue
                raise UnsupportedLayerError(
                    f"module '{name}' of type {type(module).__name__} has parameters "
                    f"({', '.join(p for p, _ in own)}) but is not supported: "
                    f"{refusal_reason(module)}. Pass ignore_unsupported_layers=True to "
                    "LayerCollection.from_model to leave it out (its parameters are then treated "
                    "as constants)")
            layer = cls.from_module(module)
            for p in layer.parameters_of(module):
                claimed[id(p)] = name
            lc.add_layer(name, layer)
        for p in model.parameters():
            lc.dtype, lc.device = p.dtype, p.device
            break
        return lc

    def add_layer(self, name, layer):
        """Append ``layer`` (a layer spec such as ``LinearLayer(...)``) under the id ``name``
        (the module's qualified name in the model); its offset is the current size."""
        if not isinstance(layer, AbstractLayer):
            raise TypeError(f"layer '{name}' must be a layer spec (e.g. LinearLayer), got {type(layer)}")
        if name in self.layers:
            raise ValueError(f"layer '{name}' is already in the collection")
        self.layers[name] = layer
        self.p_pos[name] = self._numel
        self._numel += layer.numel()

    def add_layer_from_model(self, model, module):
        """Add ``module`` (a submodule of ``model``), with its qualified name as id."""
        for name, m in unwrap_compiled(model).named_modules():
            if m is module:
                cls = _type_for(module)
                if cls is None:
                    raise UnsupportedLayerError(
                        f"module '{name}' of type {type(module).__name__} is not supported: "
                        f"{refusal_reason(module)}")
                if not own_parameters(module):
                    raise ValueError(
                        f"module '{name}' ({type(module).__name__}) has no parameters of its own "
                        "(an enclosing layer such as MultiheadAttention may hold them, or they "
                        "belong to its submodules): add those modules instead")
                self.add_layer(name, cls.from_module(module))
                return
        raise ValueError("module is not a submodule of model")

    # ------------------------------------------------------------------ queries
    def numel(self):
        return self._numel

    def __len__(self):
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers.items())

    def __getitem__(self, layer_id):
        return self.layers[layer_id]

    def __contains__(self, layer_id):
        return layer_id in self.layers

    def layer_ids(self):
        return list(self.layers.keys())

    def slice(self, layer_id):
        """The layer's slice in the flat vector."""
        start = self.p_pos[layer_id]
        return slice(start, start + self.layers[layer_id].numel())

    def get_layerid_module_map(self, model):
        """``{layer_id: module}`` for this collection's layers in ``model`` (for a
        ``torch.compile``'d model, in the module it wraps)."""
        modules = dict(unwrap_compiled(model).named_modules())
        out = OrderedDict()
        for layer_id, layer in self.layers.items():
            if layer_id not in modules:
                raise ValueError(f"layer '{layer_id}' of the LayerCollection is not a module of the model")
            module = modules[layer_id]
            if _type_for(module) is not type(layer) or type(layer).from_module(module) != layer:
                raise ValueError(
                    f"module '{layer_id}' ({type(module).__name__}) does not match the collection's "
                    f"layer spec {layer}")
            out[layer_id] = module
        return out

    def get_layerid_module_maps(self, model):
        """``(layerid_to_module, module_to_layerid)``: the map of [`get_layerid_module_map`][nngeometry.layercollection.LayerCollection.get_layerid_module_map]
        and its inverse (nngeometry 0.4's form)."""
        layerid_to_module = self.get_layerid_module_map(model)
        module_to_layerid = OrderedDict((m, lid) for lid, m in layerid_to_module.items())
        return layerid_to_module, module_to_layerid

    def named_parameters(self, layerid_to_module):
        """``(name, tensor)`` for every parameter in layout order, ``name`` being
        ``"<layer_id>.<parameter name>"`` (e.g. ``"net.0.weight"``), the name under which
        ``model.named_parameters()`` lists it."""
        for layer_id, layer in self.layers.items():
            module = layerid_to_module[layer_id]
            for pname, p in zip(layer.param_names(), layer.parameters_of(module)):
                yield (f"{layer_id}.{pname}" if layer_id else pname), p

    def parameters(self, layerid_to_module):
        """Parameter tensors in layout order."""
        params = []
        for layer_id, layer in self.layers.items():
            params.extend(layer.parameters_of(layerid_to_module[layer_id]))
        return params

    # ------------------------------------------------------------------ algebra
    def __eq__(self, other):
        return isinstance(other, LayerCollection) and list(self.layers.items()) == list(other.layers.items())

    def __hash__(self):
        return hash(tuple(self.layers.items()))

    def get_common_layers(self, other):
        """Yield ``(layer_id, layer)`` for the layers of this collection that ``other`` has too,
        with the same spec, in this collection's order."""
        for layer_id, layer in self.layers.items():
            if layer_id in other.layers and other.layers[layer_id] == layer:
                yield layer_id, layer

    def merge(self, other):
        """The union: a new collection with this one's layers, then those of ``other`` that it
        does not have. A layer in both (same id, same spec) is kept once, where this collection
        has it; the same id with different specs is an error (they are different layers)."""
        out = LayerCollection(self.layers)
        for layer_id, layer in other.layers.items():
            if layer_id in out.layers:
                if out.layers[layer_id] != layer:
                    raise ValueError(
                        f"merge: layer '{layer_id}' is {out.layers[layer_id]} in one collection "
                        f"and {layer} in the other; rename one of them or build both "
                        "collections from the same model")
                continue
            out.add_layer(layer_id, layer)
        out.dtype, out.device = self.dtype or other.dtype, self.device or other.device
        return out

    def sub(self, layer_ids):
        """The sub-collection of the given layers, in this collection's order."""
        wanted = set(layer_ids)
        missing = wanted - set(self.layers)
        if missing:
            raise KeyError(f"layers not in the collection: {sorted(missing)}")
        out = LayerCollection([(lid, l) for lid, l in self.layers.items() if lid in wanted])
        out.dtype, out.device = self.dtype, self.device
        for lid, uses in self.tied.items():
            if lid in wanted:
                out.tied[lid] = list(uses)
        return out

    def last_layer(self):
        """The sub-collection made of the last layer only (last-layer curvature)."""
        if not self.layers:
            raise ValueError("empty LayerCollection")
        return self.sub([next(reversed(self.layers))])

    def __repr__(self):
        body = ", ".join(f"'{k}': {v}" for k, v in self.layers.items())
        return f"LayerCollection({{{body}}}, numel={self._numel})"


def resolve_layer_collection(layer_collection, generator, owner):
    """The collection a matrix is built on: ``layer_collection`` when given, else the
    generator's ``layer_collection`` attribute, else every layer of ``generator.model``.

    ``owner``: the class name of the object being built (named in the errors)."""
    name = owner
    if layer_collection is not None:
        if not isinstance(layer_collection, LayerCollection):
            raise TypeError(
                f"{name}: the first argument must be a LayerCollection, got "
                f"{type(layer_collection).__name__}. The constructor is (layer_collection, "
                "generator, data=None, examples=None); for nngeometry 0.4's order (generator, "
                f"data, examples) pass keywords, e.g. {name}(generator=generator, examples=loader)")
        return layer_collection
    if generator is not None:
        lc = getattr(generator, "layer_collection", None)
        if lc is not None:
            return lc
        model = getattr(generator, "model", None)
        if model is not None:
            return LayerCollection.from_model(model)
    raise ValueError(
        f"{name} needs a LayerCollection and none can be found: pass layer_collection=..., or a "
        "generator built on a model (whose layers are then used)")


__all__ = ["LayerCollection", "UnsupportedLayerError", "unwrap_compiled", "run_eagerly"] + list(_layer_types_all)

# Upstream import paths: re-exports only (upstream's module exposed these through its imports)
from abc import ABC  # noqa: E402,F401
from functools import reduce  # noqa: E402,F401
