"""Vectors in parameter space (``PVector``) and in function space (``FVector``)."""
import torch

from ..layercollection import LayerCollection
from ..serialization import StateDictMixin
from . import _moving


def _check_same_layout(a, b, what="PVector"):
    if not isinstance(b, type(a)):
        raise TypeError(f"expected a {what} as the other operand, got {type(b).__name__}")
    if a.layer_collection != b.layer_collection:
        raise ValueError(
            f"{what} layouts differ: the two operands were built on different LayerCollections "
            f"({a.layer_collection.numel()} vs {b.layer_collection.numel()} parameters); build both "
            "from the same LayerCollection")


class PVector(StateDictMixin):
    """A vector of the parameter space of a ``LayerCollection``.

    Stored either flat (``vector_repr``, shape ``(P,)`` in the collection's layout) or as a dict
    ``{layer_id: (weight,) or (weight, bias)}`` of tensors shaped like the module's parameters
    (``dict_repr``): exactly one of the two is set. The other form is computed on each request
    and never cached, so a vector that views a model's parameters (``from_model``) always reads
    their current values: the dict form of a flat vector is made of views of it, the flat form
    of a dict vector is a fresh ``torch.cat``.
    """

    def __init__(self, layer_collection, vector_repr=None, dict_repr=None):
        if not isinstance(layer_collection, LayerCollection):
            raise TypeError("PVector needs a LayerCollection as first argument")
        if (vector_repr is None) == (dict_repr is None):
            raise ValueError("give exactly one of vector_repr and dict_repr")
        self.layer_collection = layer_collection
        if vector_repr is not None:
            if vector_repr.dim() != 1 or vector_repr.numel() != layer_collection.numel():
                raise ValueError(
                    f"vector_repr has shape {tuple(vector_repr.shape)} but the LayerCollection has "
                    f"{layer_collection.numel()} parameters")
        else:
            dict_repr = self._check_dict(layer_collection, dict_repr)
        self.vector_repr = vector_repr
        self.dict_repr = dict_repr

    @staticmethod
    def _check_dict(lc, d):
        out = {}
        for layer_id, layer in lc.layers.items():
            if layer_id not in d:
                raise ValueError(f"dict_repr misses layer '{layer_id}' of the LayerCollection")
            ts = tuple(d[layer_id]) if isinstance(d[layer_id], (tuple, list)) else (d[layer_id],)
            shapes = [spec.size for _, spec in layer.param_specs()]
            if len(ts) != len(shapes) or any(tuple(t.shape) != s for t, s in zip(ts, shapes)):
                raise ValueError(
                    f"dict_repr['{layer_id}'] has shapes {[tuple(t.shape) for t in ts]}, the layer "
                    f"expects {shapes}")
            out[layer_id] = ts
        extra = set(d) - set(lc.layers)
        if extra:
            raise ValueError(f"dict_repr has layers that are not in the LayerCollection: {sorted(extra)}")
        return out

    # ------------------------------------------------------------------ constructors
    @staticmethod
    def from_model(model, layer_collection=None):
        """The model's current parameters (a view on them: not copied)."""
        lc = layer_collection or LayerCollection.from_model(model)
        modules = lc.get_layerid_module_map(model)
        return PVector(lc, dict_repr={lid: tuple(lc[lid].parameters_of(m)) for lid, m in modules.items()})

    @staticmethod
    def from_model_grad(model, layer_collection=None):
        """The ``.grad`` of the model's parameters (zeros where a grad is None)."""
        lc = layer_collection or LayerCollection.from_model(model)
        modules = lc.get_layerid_module_map(model)
        d = {}
        for lid, m in modules.items():
            d[lid] = tuple(p.grad if p.grad is not None else torch.zeros_like(p)
                           for p in lc[lid].parameters_of(m))
        return PVector(lc, dict_repr=d)

    # ------------------------------------------------------------------ representations
    def get_flat_representation(self):
        """The flat vector, shape ``(P,)`` in the collection's layout. For a dict-stored vector
        this is a new tensor (a copy), recomputed on each call: writing into it does not change
        this PVector."""
        if self.vector_repr is not None:
            return self.vector_repr
        parts = []
        for layer_id in self.layer_collection.layers:
            parts.extend(t.reshape(-1) for t in self.dict_repr[layer_id])
        return torch.cat(parts)

    to_torch = get_flat_representation

    def _layer_views(self, layer_id):
        """Views of the flat vector shaped like the parameters of layer ``layer_id``."""
        layer = self.layer_collection[layer_id]
        start = self.layer_collection.p_pos[layer_id]
        ts = []
        for _, spec in layer.param_specs():
            ts.append(self.vector_repr[start:start + spec.numel()].view(*spec.size))
            start += spec.numel()
        return tuple(ts)

    def get_dict_representation(self):
        """``{layer_id: (weight,) or (weight, bias)}``, tensors shaped like the module's
        parameters, in the collection's layer order. For a flat vector they are views of it
        (writing into them writes into this PVector)."""
        if self.dict_repr is not None:
            return self.dict_repr
        return {layer_id: self._layer_views(layer_id) for layer_id in self.layer_collection.layers}

    to_dict = get_dict_representation

    def to_torch_layer(self, layer_id):
        """The tensors of one layer: ``(weight,)`` or ``(weight, bias)``, shaped like the
        module's parameters (views of this PVector's storage, not copies)."""
        if layer_id not in self.layer_collection.layers:
            raise KeyError(f"'{layer_id}' is not a layer of this PVector's LayerCollection "
                           f"(its layers: {list(self.layer_collection.layers)})")
        if self.dict_repr is not None:
            return self.dict_repr[layer_id]
        return self._layer_views(layer_id)

    def size(self):
        return (self.layer_collection.numel(),)

    def __len__(self):
        return self.layer_collection.numel()

    def to(self, *args, **kwargs):
        """A PVector with its tensors moved: ``v.to(device)``, ``v.to(dtype)``,
        ``v.to(device, dtype)`` or ``v.to(tensor)``, as ``torch.Tensor.to``; the same
        storage (flat or per layer), on a copy of the LayerCollection recording the new dtype /
        device. A vector viewing a model's parameters (``from_model``) gives a copy when the
        device or dtype changes, as ``torch.Tensor.to``."""
        device, dtype, non_blocking = _moving.parse_to(args, kwargs, "PVector")
        lc = _moving.move_collection(self.layer_collection, device, dtype)
        if self.vector_repr is not None:
            return PVector(lc, vector_repr=_moving.move(self.vector_repr, device, dtype,
                                                        non_blocking))
        return PVector(lc, dict_repr=_moving.move(self.dict_repr, device, dtype, non_blocking))

    @property
    def dtype(self):
        return self._any_tensor().dtype

    @property
    def device(self):
        return self._any_tensor().device

    def _any_tensor(self):
        if self.vector_repr is not None:
            return self.vector_repr
        return next(iter(self.dict_repr.values()))[0]

    # ------------------------------------------------------------------ model interplay
    def copy_to_model(self, model):
        """Write this vector into the model's parameters."""
        modules = self.layer_collection.get_layerid_module_map(model)
        d = self.get_dict_representation()
        with torch.no_grad():
            for lid, m in modules.items():
                for p, t in zip(self.layer_collection[lid].parameters_of(m), d[lid]):
                    p.copy_(t)

    def add_to_model(self, model):
        """Add this vector to the model's parameters (in place)."""
        modules = self.layer_collection.get_layerid_module_map(model)
        d = self.get_dict_representation()
        with torch.no_grad():
            for lid, m in modules.items():
                for p, t in zip(self.layer_collection[lid].parameters_of(m), d[lid]):
                    p.add_(t)

    # ------------------------------------------------------------------ algebra
    def _binary(self, other, op):
        _check_same_layout(self, other)
        if self.dict_repr is not None and other.dict_repr is not None and self.vector_repr is None:
            d = {lid: tuple(op(a, b) for a, b in zip(self.dict_repr[lid], other.dict_repr[lid]))
                 for lid in self.layer_collection.layers}
            return PVector(self.layer_collection, dict_repr=d)
        return PVector(self.layer_collection,
                       vector_repr=op(self.get_flat_representation(), other.get_flat_representation()))

    def _unary(self, op):
        if self.vector_repr is not None:
            return PVector(self.layer_collection, vector_repr=op(self.vector_repr))
        d = {lid: tuple(op(t) for t in ts) for lid, ts in self.dict_repr.items()}
        return PVector(self.layer_collection, dict_repr=d)

    def __add__(self, other):
        return self._binary(other, torch.add)

    def __sub__(self, other):
        return self._binary(other, torch.sub)

    def __neg__(self):
        return self._unary(torch.neg)

    def __mul__(self, x):
        if isinstance(x, PVector):
            return self._binary(x, torch.mul)
        return self._unary(lambda t: t * x)

    __rmul__ = __mul__

    def __truediv__(self, x):
        if isinstance(x, PVector):
            return self._binary(x, torch.div)
        return self._unary(lambda t: t / x)

    def __pow__(self, exp):
        return self._unary(lambda t: t ** exp)

    # In-place operators write into this vector's storage, like torch's: every tensor sharing
    # it sees the change (the views given by to_dict / to_torch_layer, and the model's
    # parameters when this vector is a detached view of them, e.g. from_model(m).detach()).
    def _storage(self):
        """The tensors that hold this vector: the flat one, or the dict's."""
        if self.vector_repr is not None:
            return [self.vector_repr]
        return [t for lid in self.layer_collection.layers for t in self.dict_repr[lid]]

    def _inplace(self, other, op_name, what):
        tensors = self._storage()
        if any(t.requires_grad and t.is_leaf for t in tensors):
            # Without this check torch refuses with a message about leaf Variables, or, under
            # no_grad, silently changes the model's parameters through a vector meant as a value.
            raise RuntimeError(
                f"in-place '{what}' on a PVector that holds tensors requiring grad (leaves, such as "
                "the model's parameters given by PVector.from_model): it would modify them "
                "outside autograd. Use v = v " + what[0] + " w for a new PVector, take "
                "v.detach().clone() first, or update the model with add_to_model / copy_to_model")
        if isinstance(other, PVector):
            _check_same_layout(self, other)
            if self.vector_repr is not None:
                others = [other.get_flat_representation()]
            else:
                d = other.get_dict_representation()
                others = [t for lid in self.layer_collection.layers for t in d[lid]]
            for t, o in zip(tensors, others):
                getattr(t, op_name)(o)
        else:
            for t in tensors:
                getattr(t, op_name)(other)
        return self

    def __iadd__(self, other):
        """``v += w``: adds the PVector ``w`` into ``v``'s storage (see the note above)."""
        if not isinstance(other, PVector):
            return NotImplemented
        return self._inplace(other, "add_", "+=")

    def __isub__(self, other):
        """``v -= w``: subtracts the PVector ``w`` in ``v``'s storage."""
        if not isinstance(other, PVector):
            return NotImplemented
        return self._inplace(other, "sub_", "-=")

    def __imul__(self, other):
        """``v *= x``: scales ``v`` in place by a scalar (or, elementwise, by a PVector)."""
        return self._inplace(other, "mul_", "*=")

    def __matmul__(self, other):
        """``v @ w``: the inner product ``<v, w>`` of two PVectors (as [`dot`][nngeometry.object.vector.PVector.dot]). Any other
        right operand is left to its own ``__rmatmul__`` (e.g. a matrix's)."""
        if not isinstance(other, PVector):
            return NotImplemented
        return self.dot(other)

    def dot(self, other):
        """Euclidean inner product ``<self, other>`` (a 0-dim tensor)."""
        _check_same_layout(self, other)
        if self.vector_repr is None and other.vector_repr is None:
            return sum((a * b).sum() for lid in self.layer_collection.layers
                       for a, b in zip(self.dict_repr[lid], other.dict_repr[lid]))
        return torch.dot(self.get_flat_representation(), other.get_flat_representation())

    def norm(self, p=2):
        """The ``p``-norm of the flat vector."""
        return torch.linalg.vector_norm(self.get_flat_representation(), ord=p)

    def clone(self):
        return self._unary(torch.clone)

    def detach(self):
        return self._unary(torch.Tensor.detach)

    def restrict(self, layer_collection):
        """The components of this vector on the layers of ``layer_collection``, a
        sub-collection of this vector's (same layer ids and specs): a PVector on it (views,
        not copies)."""
        d = self.get_dict_representation()
        for lid, layer in layer_collection.layers.items():
            if lid not in self.layer_collection.layers or self.layer_collection[lid] != layer:
                raise ValueError(
                    f"layer '{lid}' ({layer}) is not a layer of this PVector's LayerCollection; "
                    "restrict to a sub-collection built with LayerCollection.sub")
        return PVector(layer_collection, dict_repr={lid: d[lid] for lid in layer_collection.layers})

    @staticmethod
    def concat(layer_collection, parts):
        """The PVector of ``layer_collection`` assembled from PVectors on disjoint
        sub-collections that together cover it (the inverse of [`restrict`][nngeometry.object.vector.PVector.restrict])."""
        d = {}
        for part in parts:
            for lid, ts in part.get_dict_representation().items():
                if lid in d:
                    raise ValueError(f"layer '{lid}' appears in two of the parts")
                d[lid] = ts
        missing = set(layer_collection.layers) - set(d)
        if missing:
            raise ValueError(f"no part covers the layers {sorted(missing)}")
        return PVector(layer_collection, dict_repr=d)

    def __repr__(self):
        return f"PVector(size={self.layer_collection.numel()})"


class FVector:
    """A vector in function space: one value per (output, example), shape ``(n_output, n)``.

    ``vector_repr`` may be left None (upstream's signature), but nothing can be computed
    from such an empty FVector until it is set."""

    def __init__(self, vector_repr=None):
        self.vector_repr = vector_repr

    def get_flat_representation(self):
        if self.vector_repr is None:
            raise ValueError("this FVector is empty (vector_repr is None): build it with "
                             "FVector(tensor of shape (n_output, n_examples))")
        return self.vector_repr

    to_torch = get_flat_representation

    def size(self):
        return tuple(self.get_flat_representation().shape)

    def __add__(self, other):
        return FVector(self.get_flat_representation() + other.get_flat_representation())

    def __sub__(self, other):
        return FVector(self.get_flat_representation() - other.get_flat_representation())

    def __mul__(self, x):
        return FVector(self.get_flat_representation() * x)

    __rmul__ = __mul__

    def norm(self, p=2):
        return torch.linalg.vector_norm(self.get_flat_representation(), ord=p)


def _lc_dtype_device(layer_collection, dtype, device):
    """Explicit arguments, else the model's (recorded by LayerCollection.from_model), else
    torch's defaults."""
    dtype = dtype or getattr(layer_collection, "dtype", None) or torch.get_default_dtype()
    device = device or getattr(layer_collection, "device", None) or "cpu"
    return dtype, device


def random_pvector(layer_collection, device=None, dtype=None):
    """A flat PVector with i.i.d. standard normal entries."""
    dtype, device = _lc_dtype_device(layer_collection, dtype, device)
    return PVector(layer_collection,
                   vector_repr=torch.randn(layer_collection.numel(), device=device, dtype=dtype))


def random_pvector_dict(layer_collection, device=None, dtype=None):
    """A dict-stored PVector with i.i.d. standard normal entries."""
    dtype, device = _lc_dtype_device(layer_collection, dtype, device)
    d = {}
    for lid, layer in layer_collection.layers.items():
        d[lid] = tuple(torch.randn(*spec.size, device=device, dtype=dtype)
                       for _, spec in layer.param_specs())
    return PVector(layer_collection, dict_repr=d)


def random_fvector(n_samples, n_output=1, device=None, dtype=None):
    """An FVector of shape ``(n_output, n_samples)`` with i.i.d. standard normal entries."""
    return FVector(torch.randn(n_output, n_samples, device=device or "cpu",
                               dtype=dtype or torch.get_default_dtype()))
