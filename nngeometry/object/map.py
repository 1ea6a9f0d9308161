"""Maps from function space to parameter space: stacks of ``PVector`` such as per-example
Jacobians, indexed by ``(output k, example i)``."""
import torch

from .vector import FVector, PVector


class PFMap:
    """Base class. ``to_torch()`` has shape ``(n_output, n_examples, P)``."""

    layer_collection = None

    def _check_pvector(self, v):
        if not isinstance(v, PVector):
            raise TypeError(f"expected a PVector, got {type(v).__name__}")
        if v.layer_collection != self.layer_collection:
            raise ValueError("the PVector's LayerCollection differs from the PFMap's: build both "
                             "from the same LayerCollection")


class PFMapDense(PFMap):
    """Dense storage of per-example Jacobians ``J[k, i, :] = ∂f_k(x_i)/∂θ`` (not normalized).

    Args:
        generator: a Jacobian generator (used when ``data`` is None).
        data: tensor ``(n_output, n_examples, P)``.
        examples: a DataLoader or a single mini-batch, used with ``generator``.
        layer_collection: the parameter layout.
    """

    def __init__(self, generator, data=None, examples=None, layer_collection=None):
        if layer_collection is None:
            raise ValueError("PFMapDense needs a layer_collection")
        self.generator = generator
        self.layer_collection = layer_collection
        if data is None:
            if examples is None:
                raise ValueError("give either data or examples")
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
        s = tuple(self.data.shape)
        return s if dim is None else s[dim]

    def get_dict_representation(self):
        """``{layer_id: (weight (K, n, *w_shape), bias (K, n, *b_shape))}``."""
        K, n = self.data.shape[:2]
        out = {}
        for lid, layer in self.layer_collection.layers.items():
            start = self.layer_collection.p_pos[lid]
            ts = []
            for _, spec in layer.param_specs():
                ts.append(self.data[:, :, start:start + spec.numel()].reshape(K, n, *spec.size))
                start += spec.numel()
            out[lid] = tuple(ts)
        return out

    def jvp(self, v):
        """``J v``: an FVector of shape ``(n_output, n_examples)``."""
        self._check_pvector(v)
        return FVector(torch.matmul(self.data, v.get_flat_representation()))

    def vjp(self, w):
        """``Jᵀ w`` for an FVector ``w`` of shape ``(n_output, n_examples)``: a PVector."""
        return PVector(self.layer_collection,
                       vector_repr=torch.einsum("kip,ki->p", self.data, w.get_flat_representation()))

    def _same(self, other):
        if not isinstance(other, PFMapDense) or other.layer_collection != self.layer_collection:
            raise ValueError("PFMaps must share their LayerCollection")
        return other

    def __add__(self, other):
        return PFMapDense(self.generator, data=self.data + self._same(other).data,
                          layer_collection=self.layer_collection)

    def __sub__(self, other):
        return PFMapDense(self.generator, data=self.data - self._same(other).data,
                          layer_collection=self.layer_collection)

    def __mul__(self, x):
        return PFMapDense(self.generator, data=self.data * x, layer_collection=self.layer_collection)

    __rmul__ = __mul__

    def __getstate__(self):
        state = self.__dict__.copy()
        state["generator"] = None
        return state


class PFMapImplicit(PFMap):
    """Per-example Jacobians that are never stored: ``jvp`` and ``vjp`` run the model."""

    def __init__(self, generator, examples, layer_collection=None):
        if layer_collection is None:
            raise ValueError("PFMapImplicit needs a layer_collection")
        self.generator = generator
        self.examples = examples
        self.layer_collection = layer_collection

    def jvp(self, v):
        """``J v``: an FVector of shape ``(n_output, n_examples)``."""
        self._check_pvector(v)
        return FVector(self.generator.implicit_Jv(v, self.examples, self.layer_collection))

    def vjp(self, w):
        """``Jᵀ w`` for ``w`` of shape ``(n_output, n_examples)``: a PVector."""
        return PVector(self.layer_collection, vector_repr=self.generator.implicit_JTv(
            w.get_flat_representation(), self.examples, self.layer_collection))

    def to_torch(self):
        return self.generator.get_jacobian(self.examples, self.layer_collection)


def random_pfmap(layer_collection, n_output, n_examples, device=None, dtype=None):
    """A PFMapDense with i.i.d. standard normal entries, shape ``(n_output, n_examples, P)``."""
    from .vector import _lc_dtype_device

    dtype, device = _lc_dtype_device(layer_collection, dtype, device)
    data = torch.randn(n_output, n_examples, layer_collection.numel(), device=device, dtype=dtype)
    return PFMapDense(None, data=data, layer_collection=layer_collection)
