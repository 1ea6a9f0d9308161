"""The contract every layer type follows.

A *layer type* couples two things that always travel together:

* the **spec**: the shapes of the layer's parameters (what `LayerCollection` stores and what fixes
  the flat parameter layout: ``weight.flatten()`` then ``bias.flatten()``);
* the **maths**: how the per-example statistics of that layer are obtained from what a forward
  hook sees (the module's input ``x``) and what the batched backward pass gives (the gradient of
  the outputs w.r.t. the module's output, ``gy`` of shape ``(K, n, *out_shape)``, with ``K`` the
  number of output directions per example).

Adding a layer type means writing one subclass of :class:`AbstractLayer` in one file and
registering it with :func:`register_layer_type`.
"""
from __future__ import annotations

import math

import torch


class Parameter:
    """Shape of one parameter tensor of a layer (not the tensor itself)."""

    def __init__(self, *size):
        self.size = tuple(int(s) for s in size)

    def numel(self):
        return math.prod(self.size)

    def __eq__(self, other):
        return isinstance(other, Parameter) and self.size == other.size

    def __repr__(self):
        return f"Parameter{self.size}"


class AbstractLayer:
    """Base class of layer specs.

    Subclasses set ``self.weight`` (a :class:`Parameter`) and ``self.bias`` (a :class:`Parameter`
    or ``None``), and list in ``module_types`` the ``torch.nn`` classes they describe.
    """

    #: torch.nn module classes that this layer type handles
    module_types: tuple = ()
    #: whether the KFAC maths (``kfac_factors``) is available for this layer type
    supports_kfac = False

    weight: Parameter
    bias: Parameter | None = None

    # ------------------------------------------------------------------ spec
    @classmethod
    def from_module(cls, module):
        raise NotImplementedError

    def numel(self):
        return self.weight.numel() + (self.bias.numel() if self.bias is not None else 0)

    def has_bias(self):
        return self.bias is not None

    def parameters_of(self, module):
        """The module's parameter tensors in layout order (weight, then bias if any)."""
        if self.bias is None:
            return (module.weight,)
        return (module.weight, module.bias)

    def _key(self):
        return (type(self).__name__, self.weight.size, None if self.bias is None else self.bias.size)

    def __eq__(self, other):
        return isinstance(other, AbstractLayer) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def __repr__(self):
        return f"{type(self).__name__}(weight={self.weight.size}, bias={None if self.bias is None else self.bias.size})"

    # ------------------------------------------------------------------ maths
    def per_example_grad(self, module, x, gy):
        """Per-example gradients, flat in the layer's layout.

        Args:
            module: the ``torch.nn.Module`` instance.
            x: the module's input as seen by the forward hook, shape ``(n, *in_shape)``.
            gy: gradients w.r.t. the module's output, shape ``(K, n, *out_shape)``.

        Returns:
            tensor of shape ``(K, n, numel())``: row ``[k, i]`` is ``J_k(x_i)`` restricted to
            this layer's parameters.
        """
        raise NotImplementedError

    def diag(self, module, x, gy):
        """``sum_{k,i} per_example_grad[k, i] ** 2``, shape ``(numel(),)`` (not normalized).

        Subclasses override this where a cheaper formula exists that avoids the per-example
        gradients.
        """
        g = self.per_example_grad(module, x, gy)
        return (g * g).sum(dim=(0, 1))

    def kfac_factors(self, module, x, gy, approx="expand"):
        """Unnormalized Kronecker factors ``(A, G)`` summed over the batch.

        ``A`` is built from the inputs (with a trailing 1 when the layer has a bias) and ``G``
        from the output gradients summed over the ``K`` output directions, such that
        ``kron(G / n, A / n)``, re-indexed by :meth:`kfac_permutation`, approximates the layer's
        block of ``(1/n) sum_i J_iᵀ J_i``. Either factor may be returned as a 1-D tensor, which
        stands for a diagonal matrix (e.g. the input factor of an Embedding).

        ``approx`` selects how weight-sharing positions (sequences) are handled: ``'expand'`` or
        ``'reduce'`` (Eschenhagen et al. 2023); layers without weight sharing ignore it.
        """
        raise NotImplementedError(
            f"KFAC is not available for layers of type {type(self).__name__}; use a "
            "representation that needs only per-example gradients (PMatDense, PMatBlockDiag, "
            "PMatDiag, PMatLowRank, PMatImplicit) for this layer"
        )


    def kfac_permutation(self):
        """``perm`` (LongTensor, length ``numel()``) such that the layer's block in the flat
        layout is ``kron(G, A)[perm][:, perm]``: flat coordinate ``i`` is Kronecker coordinate
        ``perm[i]``.

        Default: weight of shape ``(out, ...)`` and optional bias ``(out,)``, Kronecker order the
        row-major ``[W | b]`` of shape ``(out, in + 1)``.
        """
        out = self.weight.size[0]
        n_in = self.weight.numel() // out
        width = n_in + (1 if self.bias is not None else 0)
        rows = torch.arange(out).unsqueeze(1) * width
        perm = (rows + torch.arange(n_in)).reshape(-1)
        if self.bias is not None:
            perm = torch.cat([perm, rows.reshape(-1) + n_in])
        return perm


_REGISTRY: list = []


def register_layer_type(cls):
    """Class decorator: make ``LayerCollection.from_model`` recognise ``cls.module_types``."""
    _REGISTRY.append(cls)
    return cls


def layer_type_for(module):
    """The registered layer type handling ``module``, or ``None``.

    The most specific match wins (a subclass of ``nn.Linear`` registered on its own takes
    precedence over ``LinearLayer``).
    """
    best, best_distance = None, None
    for cls in _REGISTRY:
        for mt in cls.module_types:
            if isinstance(module, mt):
                # how many inheritance steps separate the module's class from the match
                distance = len(type(module).__mro__) - len(mt.__mro__)
                if best is None or distance < best_distance:
                    best, best_distance = cls, distance
    return best
