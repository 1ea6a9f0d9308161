"""Matrices in function space: the Gram matrix (empirical NTK) on a set of examples."""
from abc import ABCMeta, abstractmethod

import torch

from .map import resolve_layer_collection
from . import _moving
from .vector import FVector
from ..serialization import SharedGeneratorCopy, StateDictMixin


class FMatAbstract(StateDictMixin, SharedGeneratorCopy, metaclass=ABCMeta):
    """Base class of the function-space matrices: a matrix indexed by pairs
    ``((k, i), (l, j))`` of (output, example), built from a generator."""


    @abstractmethod
    def __init__(self, generator):
        raise NotImplementedError


class FMatDense(FMatAbstract):
    """``G[k, i, l, j] = <J_k(x_i), J_l(x_j)>``, shape ``(n_output, n, n_output, n)``, not
    normalized (the empirical neural tangent kernel of the function on the examples).

    As a matrix it is the ``(K n, K n)`` matrix ``J Jᵀ`` with ``J`` the Jacobian reshaped to
    ``(K n, P)`` (row ``k n + i``); FVectors of shape ``(K, n)`` are flattened the same way.

    Args:
        layer_collection: the parameter layout; None takes ``generator.layer_collection``.
        generator: a Jacobian generator (used when ``data`` is None).
        data: tensor ``(K, n, K, n)``.
        examples: a DataLoader or a single mini-batch, used with ``generator``.
    """

    def __init__(self, layer_collection=None, generator=None, data=None, examples=None):
        self.layer_collection = resolve_layer_collection(layer_collection, generator, "FMatDense")
        self.generator = generator
        if data is None:
            if examples is None:
                raise ValueError("FMatDense needs either data or examples (with a generator)")
            if generator is None:
                raise ValueError("FMatDense needs a generator to compute the Gram matrix of examples")
            data = generator.get_gram_matrix(examples, self.layer_collection)
        if data.dim() != 4 or data.shape[:2] != data.shape[2:]:
            raise ValueError(f"FMatDense data must have shape (n_output, n, n_output, n), got "
                             f"{tuple(data.shape)}")
        self.data = data

    def to_torch(self):
        return self.data

    get_dense_tensor = to_torch

    def size(self, *args):
        """``torch.Size((K, n, K, n))``, or its entry ``size(dim)``."""
        return self.data.size(*args)

    def _flat(self):
        K, n = self.data.shape[:2]
        return self.data.reshape(K * n, K * n)

    def _fvector_flat(self, v):
        f = v.get_flat_representation()
        if tuple(f.shape) != tuple(self.data.shape[:2]):
            raise ValueError(f"expected an FVector of shape {tuple(self.data.shape[:2])} "
                             f"(n_output, n_examples), got {tuple(f.shape)}")
        return f.reshape(-1)

    def mv(self, v):
        """``G v`` for an FVector ``v`` of shape ``(K, n)``: an FVector of the same shape."""
        K, n = self.data.shape[:2]
        return FVector((self._flat() @ self._fvector_flat(v)).reshape(K, n))

    def vTMv(self, v):
        """``vᵀ G v`` (a 0-dim tensor)."""
        f = self._fvector_flat(v)
        return f @ self._flat() @ f

    def frobenius_norm(self):
        """``sqrt(Σ G[k, i, l, j]²)``."""
        return torch.linalg.vector_norm(self.data)

    def norm(self, ord=None):
        """A norm of the ``(K n, K n)`` matrix: ``None`` or ``'fro'``: Frobenius; ``2`` / ``-2``:
        largest / smallest singular value (= eigenvalue, G being positive semi-definite);
        ``'nuc'``, ``1``, ``-1``, ``inf``, ``-inf``: as ``torch.linalg.matrix_norm``."""
        if ord is None:
            return self.frobenius_norm()
        return torch.linalg.matrix_norm(self._flat(), ord=ord)

    def trace(self):
        """``Σ_{k,i} G[k, i, k, i]``."""
        return torch.diagonal(self._flat()).sum()

    def compute_eigendecomposition(self, impl="eigh"):
        """Stores ``evals`` (ascending for ``'eigh'``, descending for ``'svd'``) and ``evecs``,
        columns of shape ``(K n,)`` with ``G = evecs diag(evals) evecsᵀ`` (the Gram matrix is
        symmetric positive semi-definite, so its singular values are its eigenvalues)."""
        if impl == "eigh":
            self.evals, self.evecs = torch.linalg.eigh(self._flat())
        elif impl == "svd":
            U, S, _ = torch.linalg.svd(self._flat())
            self.evals, self.evecs = S, U
        else:
            raise NotImplementedError(f"unknown eigendecomposition implementation '{impl}'; "
                                      "use 'eigh' or 'svd'")

    def get_eigendecomposition(self):
        """``(evals, evecs)`` from `compute_eigendecomposition` (computed with 'eigh' if
        it was not called yet)."""
        if getattr(self, "evecs", None) is None:
            self.compute_eigendecomposition()
        return self.evals, self.evecs

    def project_to_diag(self, v):
        """Coordinates ``evecsᵀ v`` of the FVector ``v`` in the eigenbasis, shape ``(K n,)``."""
        _, evecs = self.get_eigendecomposition()
        return evecs.t() @ self._fvector_flat(v)

    def project_from_diag(self, v):
        """The FVector ``evecs v`` of shape ``(K, n)`` whose eigenbasis coordinates are the
        tensor ``v`` of shape ``(K n,)`` (inverse of `project_to_diag`)."""
        _, evecs = self.get_eigendecomposition()
        K, n = self.data.shape[:2]
        return FVector((evecs @ v).reshape(K, n))

    def _same(self, other):
        if not isinstance(other, FMatDense):
            raise TypeError(f"expected an FMatDense, got {type(other).__name__}")
        if other.data.shape != self.data.shape:
            raise ValueError(f"FMatDense shapes differ: {tuple(self.data.shape)} vs "
                             f"{tuple(other.data.shape)}")
        return other

    def _with(self, data):
        return FMatDense(self.layer_collection, self.generator, data=data)

    def to(self, *args, **kwargs):
        """An FMatDense with ``data`` moved (device and / or dtype, as ``torch.Tensor.to``)."""
        device, dtype, non_blocking = _moving.parse_to(args, kwargs, "FMatDense")
        return self._with(_moving.move_tensor(self.data, device, dtype, non_blocking))

    def __add__(self, other):
        return self._with(self.data + self._same(other).data)

    def __sub__(self, other):
        return self._with(self.data - self._same(other).data)

    def __mul__(self, x):
        if isinstance(x, (FMatDense, FVector)):
            return NotImplemented
        return self._with(self.data * x)

    def __rmul__(self, x):
        return self.__mul__(x)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["generator"] = None
        return state

# Upstream import paths: re-exports only (upstream's module exposed these through its imports)
from abc import ABC  # noqa: E402,F401
from .vector import PVector  # noqa: E402,F401
