"""Vectors in parameter space (``PVector``) and in function space (``FVector``)."""
import torch

from ..layercollection import LayerCollection


def _check_same_layout(a, b, what="PVector"):
    if a.layer_collection != b.layer_collection:
        raise ValueError(
            f"{what} layouts differ: the two operands were built on different LayerCollections "
            f"({a.layer_collection.numel()} vs {b.layer_collection.numel()} parameters); build both "
            "from the same LayerCollection")


class PVector:
    """A vector of the parameter space of a ``LayerCollection``.

    Stored either flat (``vector_repr``, shape ``(P,)`` in the collection's layout) or as a dict
    ``{layer_id: (weight,) or (weight, bias)}`` of tensors shaped like the module's parameters
    (``dict_repr``). Conversions are done lazily and cached.
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
        if self.vector_repr is None:
            parts = []
            for layer_id in self.layer_collection.layers:
                parts.extend(t.reshape(-1) for t in self.dict_repr[layer_id])
            self.vector_repr = torch.cat(parts)
        return self.vector_repr

    to_torch = get_flat_representation

    def get_dict_representation(self):
        if self.dict_repr is None:
            d = {}
            v = self.vector_repr
            for layer_id, layer in self.layer_collection.layers.items():
                start = self.layer_collection.p_pos[layer_id]
                ts = []
                for _, spec in layer.param_specs():
                    ts.append(v[start:start + spec.numel()].view(*spec.size))
                    start += spec.numel()
                d[layer_id] = tuple(ts)
            self.dict_repr = d
        return self.dict_repr

    def size(self):
        return (self.layer_collection.numel(),)

    def __len__(self):
        return self.layer_collection.numel()

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

    def __pow__(self, x):
        return self._unary(lambda t: t ** x)

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
        sub-collections that together cover it (the inverse of :meth:`restrict`)."""
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
    """A vector in function space: one value per (output, example), shape ``(n_output, n)``."""

    def __init__(self, vector_repr):
        self.vector_repr = vector_repr

    def get_flat_representation(self):
        return self.vector_repr

    to_torch = get_flat_representation

    def size(self):
        return tuple(self.vector_repr.shape)

    def __add__(self, other):
        return FVector(self.vector_repr + other.vector_repr)

    def __sub__(self, other):
        return FVector(self.vector_repr - other.vector_repr)

    def __mul__(self, x):
        return FVector(self.vector_repr * x)

    __rmul__ = __mul__

    def norm(self, p=2):
        return torch.linalg.vector_norm(self.vector_repr, ord=p)


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


def random_fvector(n_samples, n_output, device=None, dtype=None):
    """An FVector of shape ``(n_output, n_samples)`` with i.i.d. standard normal entries."""
    return FVector(torch.randn(n_output, n_samples, device=device or "cpu",
                               dtype=dtype or torch.get_default_dtype()))
