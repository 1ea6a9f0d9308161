"""Maps from function space to parameter space: stacks of ``PVector`` such as per-example
Jacobians, indexed by ``(output k, example i)``."""

import torch

from ..layercollection import LayerCollection, resolve_layer_collection  # noqa: F401
from .vector import FVector, PVector, _lc_dtype_device
from ..serialization import SharedGeneratorCopy, StateDictMixin


class PFMap(StateDictMixin, SharedGeneratorCopy):
    """Base class. ``to_torch()`` has shape ``(n_output, n_examples, P)``."""

    layer_collection = None

    def _check_pvector(self, v):
        if not isinstance(v, PVector):
            raise TypeError(f"expected a PVector, got {type(v).__name__}")
        if v.layer_collection != self.layer_collection:
            raise ValueError("the PVector's LayerCollection differs from the PFMap's: build both "
                             "from the same LayerCollection")


class PFMapDense(PFMap):
    """Dense storage of per-example Jacobians ``J[k, i, :] = ∂f_k(x_i)/∂θ`` (not normalized),
    shape ``(n_output K, n_examples n, P)`` in the collection's parameter layout.

    Args:
        layer_collection: the parameter layout; None takes ``generator.layer_collection``.
        generator: a Jacobian generator (used when ``data`` is None).
        data: tensor ``(n_output, n_examples, P)``.
        examples: a DataLoader or a single mini-batch, used with ``generator``.
    """

    def __init__(self, layer_collection=None, generator=None, data=None, examples=None):
        layer_collection = resolve_layer_collection(layer_collection, generator, "PFMapDense")
        self.generator = generator
        self.layer_collection = layer_collection
        if data is None:
            if examples is None:
                raise ValueError("PFMapDense needs either data or examples (with a generator)")
            if generator is None:
                raise ValueError("PFMapDense needs a generator to compute the Jacobian of examples")
            data = generator.get_jacobian(examples, layer_collection)
        if data.dim() != 3 or data.shape[2] != layer_collection.numel():
            raise ValueError(
                f"PFMapDense data must have shape (n_output, n_examples, {layer_collection.numel()}), "
                f"got {tuple(data.shape)}")
        self.data = data

    def to_torch(self):
        return self.data

    get_dense_tensor = to_torch

    def size(self, dim=None):
        """``torch.Size((n_output, n_examples, P))``, or its entry ``dim``."""
        return self.data.size() if dim is None else self.data.size(dim)

    def to_torch_layer(self, layer_id):
        """The Jacobian of one layer: ``(weight (K, n, *w_shape),)`` or with a bias
        ``(weight, bias (K, n, *b_shape))`` (views of ``data``)."""
        if layer_id not in self.layer_collection.layers:
            raise KeyError(f"'{layer_id}' is not a layer of this PFMap's LayerCollection "
                           f"(its layers: {list(self.layer_collection.layers)})")
        K, n = self.data.shape[:2]
        start = self.layer_collection.p_pos[layer_id]
        ts = []
        for _, spec in self.layer_collection[layer_id].param_specs():
            ts.append(self.data[:, :, start:start + spec.numel()].reshape(K, n, *spec.size))
            start += spec.numel()
        return tuple(ts)

    def get_dict_representation(self):
        """``{layer_id: to_torch_layer(layer_id)}`` in the collection's order."""
        return {lid: self.to_torch_layer(lid) for lid in self.layer_collection.layers}

    def iter_by_layer(self):
        """Yields ``(layer_id, layer, to_torch_layer(layer_id))`` in the collection's order."""
        for lid, layer in self.layer_collection.layers.items():
            yield lid, layer, self.to_torch_layer(lid)

    def iter_by_module(self):
        """Yields ``(layer_id, to_torch_layer(layer_id))`` (upstream 0.4's name)."""
        for lid in self.layer_collection.layers:
            yield lid, self.to_torch_layer(lid)

    @staticmethod
    def from_dict(layer_collection=None, generator=None, data_dict=None):
        """The PFMapDense whose per-layer blocks are ``data_dict[layer_id] = (weight, [bias])``,
        each of shape ``(K, n, *param_shape)`` (the inverse of `to_torch_layer`)."""
        layer_collection = resolve_layer_collection(layer_collection, generator, "PFMapDense.from_dict")
        if data_dict is None:
            raise ValueError("PFMapDense.from_dict needs data_dict={layer_id: (weight, [bias])}")
        extra = set(data_dict) - set(layer_collection.layers)
        if extra:
            raise ValueError(f"data_dict has layers that are not in the LayerCollection: {sorted(extra)}")
        parts = []
        for lid, layer in layer_collection.layers.items():
            if lid not in data_dict:
                raise ValueError(f"data_dict misses layer '{lid}' of the LayerCollection")
            blocks = tuple(data_dict[lid])
            specs = [spec for _, spec in layer.param_specs()]
            if len(blocks) != len(specs):
                raise ValueError(f"data_dict['{lid}'] has {len(blocks)} tensors, the layer has "
                                 f"{len(specs)} parameters")
            for t, spec in zip(blocks, specs):
                if t.dim() < 2 or tuple(t.shape[2:]) != tuple(spec.size):
                    raise ValueError(f"data_dict['{lid}'] holds a tensor of shape {tuple(t.shape)}, "
                                     f"expected (n_output, n_examples, *{tuple(spec.size)})")
                parts.append(t.reshape(t.shape[0], t.shape[1], -1))
        return PFMapDense(layer_collection, generator, data=torch.cat(parts, dim=2))

    def to(self, *args, **kwargs):
        """A PFMapDense with ``data.to(*args, **kwargs)`` (device and/or dtype)."""
        return PFMapDense(self.layer_collection, self.generator, data=self.data.to(*args, **kwargs))

    def jvp(self, v):
        """``J v`` for a PVector ``v``: an FVector of shape ``(n_output, n_examples)``."""
        self._check_pvector(v)
        return FVector(torch.matmul(self.data, v.get_flat_representation()))

    def vjp(self, v):
        """``Jᵀ v = Σ_{k,i} v[k, i] J[k, i, :]`` for an FVector ``v`` of shape
        ``(n_output, n_examples)``: a PVector."""
        if not isinstance(v, FVector):
            raise TypeError(f"vjp expects an FVector of shape (n_output, n_examples), got "
                            f"{type(v).__name__}")
        w = v.get_flat_representation()
        if tuple(w.shape) != tuple(self.data.shape[:2]):
            raise ValueError(f"vjp expects an FVector of shape {tuple(self.data.shape[:2])} "
                             f"(n_output, n_examples), got {tuple(w.shape)}")
        return PVector(self.layer_collection, vector_repr=torch.einsum("kip,ki->p", self.data, w))

    def _same(self, other):
        if not isinstance(other, PFMapDense):
            raise TypeError(f"expected a PFMapDense, got {type(other).__name__}")
        if other.layer_collection != self.layer_collection:
            raise ValueError("PFMaps must share their LayerCollection")
        return other

    def _with(self, data):
        return PFMapDense(self.layer_collection, self.generator, data=data)

    def __add__(self, other):
        return self._with(self.data + self._same(other).data)

    def __sub__(self, other):
        return self._with(self.data - self._same(other).data)

    def __neg__(self):
        return self._with(-self.data)

    def __mul__(self, x):
        if isinstance(x, (PFMap, PVector, FVector)):
            return NotImplemented
        return self._with(self.data * x)

    def __rmul__(self, x):
        return self.__mul__(x)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["generator"] = None
        return state


class PFMapImplicit(PFMap):
    """Per-example Jacobians that are never stored: ``jvp`` and ``vjp`` run the model on
    ``examples``.

    Args:
        layer_collection: the parameter layout; None takes ``generator.layer_collection``.
        generator: a Jacobian generator.
        data: must be None (accepted for upstream's signature: an implicit map stores nothing).
        examples: a DataLoader or a single mini-batch.
    """


    def __init__(self, layer_collection=None, generator=None, data=None, examples=None):
        layer_collection = resolve_layer_collection(layer_collection, generator, "PFMapImplicit")
        if data is not None:
            raise ValueError("PFMapImplicit stores no data; for a stored Jacobian use "
                             "PFMapDense(layer_collection, data=...)")
        if generator is None or examples is None:
            raise ValueError("PFMapImplicit needs a generator and examples")
        self.generator = generator
        self.examples = examples
        self.layer_collection = layer_collection

    def jvp(self, v):
        """``J v``: an FVector of shape ``(n_output, n_examples)``."""
        self._check_pvector(v)
        return FVector(self.generator.implicit_Jv(v, self.examples, self.layer_collection))

    def vjp(self, v):
        """``Jᵀ v`` for an FVector ``v`` of shape ``(n_output, n_examples)``: a PVector."""
        return PVector(self.layer_collection, vector_repr=self.generator.implicit_JTv(
            v.get_flat_representation(), self.examples, self.layer_collection))

    def to_torch(self):
        return self.generator.get_jacobian(self.examples, self.layer_collection)


def random_pfmap(layer_collection, output_size, device=None, dtype=None):
    """A PFMapDense with i.i.d. standard normal entries, shape ``(*output_size, P)``, where
    ``output_size = (n_output, n_examples)``.

    ``dtype`` and ``device`` default to the collection's (the model's), like random_pvector
    (upstream defaults dtype to float64).

    The seeds' older form ``random_pfmap(lc, n_output, n_examples, dtype=...)`` is still read
    (two ints); prefer the pair.
    """
    if isinstance(output_size, int):
        if not isinstance(device, int) or isinstance(device, bool):
            raise TypeError("random_pfmap's output_size is the pair (n_output, n_examples), "
                            f"got {output_size!r}")
        # older form (lc, n_output, n_examples): an int output_size is not valid otherwise
        output_size, device = (output_size, device), None
    output_size = tuple(output_size)
    if len(output_size) != 2:
        raise ValueError(f"random_pfmap's output_size is (n_output, n_examples), got {output_size}")
    dtype, device = _lc_dtype_device(layer_collection, dtype, device)
    data = torch.randn(*output_size, layer_collection.numel(), device=device, dtype=dtype)
    return PFMapDense(layer_collection, data=data)

# Upstream import paths: re-exports only (upstream's module exposed these through its imports)
from abc import ABC, abstractmethod  # noqa: E402,F401
