"""Matrices in function space: the Gram matrix (empirical NTK) on a set of examples."""
import torch

from .vector import FVector


class FMatDense:
    """``G[k, i, l, j] = <J_k(x_i), J_l(x_j)>``, shape ``(n_output, n, n_output, n)``, not
    normalized (the empirical neural tangent kernel of the function on the examples)."""

    def __init__(self, layer_collection, generator, data=None, examples=None):
        self.layer_collection = layer_collection
        self.generator = generator
        if data is None:
            if examples is None:
                raise ValueError("give either data or examples")
            data = generator.get_gram_matrix(examples, layer_collection)
        self.data = data

    def to_torch(self):
        return self.data

    get_dense_tensor = to_torch

    def size(self, dim=None):
        s = tuple(self.data.shape)
        return s if dim is None else s[dim]

    def _flat(self):
        K, n = self.data.shape[:2]
        return self.data.reshape(K * n, K * n)

    def mv(self, v):
        K, n = self.data.shape[:2]
        return FVector((self._flat() @ v.get_flat_representation().reshape(-1)).reshape(K, n))

    def vTMv(self, v):
        f = v.get_flat_representation().reshape(-1)
        return f @ self._flat() @ f

    def frobenius_norm(self):
        return torch.linalg.norm(self.data.reshape(-1))

    def trace(self):
        return torch.diagonal(self._flat()).sum()

    def compute_eigendecomposition(self, impl="eigh"):
        if impl != "eigh":
            raise NotImplementedError(f"unknown eigendecomposition implementation '{impl}'; use 'eigh'")
        self.evals, self.evecs = torch.linalg.eigh(self._flat())

    def project_to_diag(self, v):
        """Coordinates of the FVector ``v`` in the eigenbasis (needs compute_eigendecomposition)."""
        return self.evecs.t() @ v.get_flat_representation().reshape(-1)

    def project_from_diag(self, v):
        K, n = self.data.shape[:2]
        return FVector((self.evecs @ v).reshape(K, n))

    def __add__(self, other):
        return FMatDense(self.layer_collection, None, data=self.data + other.data)

    def __sub__(self, other):
        return FMatDense(self.layer_collection, None, data=self.data - other.data)

    def __mul__(self, x):
        return FMatDense(self.layer_collection, None, data=self.data * x)

    __rmul__ = __mul__

    def __getstate__(self):
        state = self.__dict__.copy()
        state["generator"] = None
        return state
