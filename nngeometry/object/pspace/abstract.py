"""The contract shared by every parameter-space matrix representation."""
import torch

from ..map import PFMap, resolve_layer_collection
from ..vector import PVector


class PMatAbstract:
    """A ``P × P`` matrix in the parameter space of a ``LayerCollection``.

    Built either from ``examples`` (a DataLoader or a single mini-batch) through ``generator``,
    which then computes ``M = (1/n) Σ_x J(x)ᵀ J(x)`` (or the representation's approximation of
    it), or directly from ``data`` (the representation's own storage).

    Constructor: ``(layer_collection=None, generator=None, data=None, examples=None, **kwargs)``.
    Positional calls follow that order; the keyword style of nngeometry 0.4,
    ``PMatDense(generator=g, examples=loader)``, leaves out the collection, which is then the
    generator's ``layer_collection`` (or, when it has none, every layer of ``generator.model``).

    Subclasses implement ``_build(examples, **kwargs)`` (returning ``data``) and the operations
    their structure allows; an operation that has no sensible meaning for a structure raises
    ``NotImplementedError`` naming what to use instead.
    """

    def __init__(self, layer_collection=None, generator=None, data=None, examples=None, **kwargs):
        self.layer_collection = resolve_layer_collection(layer_collection, generator, type(self).__name__)
        self.generator = generator
        if data is not None and examples is not None:
            raise ValueError("give either data or examples, not both")
        if data is None:
            if examples is None:
                raise ValueError("give either data or examples")
            if generator is None:
                raise ValueError("building from examples needs a generator")
            data = self._build(examples, **kwargs)
        self.data = data

    def _build(self, examples, **kwargs):
        raise NotImplementedError(
            f"{type(self).__name__} cannot be built from examples (it is the result of an "
            "operation on another representation, or takes its data directly); build one of the "
            "representations listed in docs/representations.md instead")

    def _unsupported(self, what):
        """Default for an operation a representation does not implement."""
        raise NotImplementedError(
            f"{type(self).__name__}.{what} is not implemented for this representation; see "
            "docs/representations.md for which representations have it, or use to_torch() and "
            "dense torch operations on small models")

    # ------------------------------------------------------------------ checks
    def _check_pvector(self, v):
        if not isinstance(v, PVector):
            raise TypeError(f"expected a PVector, got {type(v).__name__}")
        if v.layer_collection != self.layer_collection:
            raise ValueError(
                f"the PVector's layout does not match the matrix: it has "
                f"{v.layer_collection.numel()} parameters over layers {v.layer_collection.layer_ids()}, "
                f"the matrix {self.layer_collection.numel()} over {self.layer_collection.layer_ids()}; "
                "build the vector on the matrix's LayerCollection")

    def _check_pfmap(self, m):
        if not isinstance(m, PFMap):
            raise TypeError(f"expected a PFMap, got {type(m).__name__}")
        if m.layer_collection != self.layer_collection:
            raise ValueError(
                "the PFMap's layout does not match the matrix's LayerCollection; build both from "
                "the same LayerCollection")

    def _check_same_kind(self, other):
        if type(other) is not type(self):
            raise NotImplementedError(
                f"operation between {type(self).__name__} and {type(other).__name__} is not "
                "implemented; convert both to dense with to_torch() or use matching representations")
        if other.layer_collection != self.layer_collection:
            raise ValueError("the two matrices are built on different LayerCollections")

    # ------------------------------------------------------------------ shapes
    def size(self, dim=None):
        """``(P, P)``, whatever the storage."""
        p = self.layer_collection.numel()
        return (p, p) if dim is None else (p, p)[dim]

    @property
    def dtype(self):
        return self.get_diag().dtype

    # ------------------------------------------------------------------ products
    def mv(self, v):
        self._unsupported("mv")

    def vTMv(self, v):
        self._unsupported("vTMv")

    def mmap(self, pfmap):
        self._unsupported("mmap")

    def mapTMmap(self, pfmap, reduction="sum"):
        """Quadratic forms of the rows of a PFMap ``J`` (shape ``(K, n, P)``):
        ``q[k, i] = J[k, i] M J[k, i]ᵀ``.

        ``reduction='diag'``: the ``(K, n)`` tensor ``q``; ``reduction='sum'``: its sum over the
        outputs ``k``, shape ``(n,)``. (Cross terms between examples are never formed.)
        """
        self._check_pfmap(pfmap)
        check_reduction(reduction)
        J = pfmap.to_torch()
        MJ = self.mmap(pfmap).to_torch()
        return reduce_forms((J * MJ).sum(dim=-1), reduction)

    def __matmul__(self, other):
        if isinstance(other, PVector):
            return self.mv(other)
        if isinstance(other, PFMap):
            return self.mmap(other)
        if isinstance(other, PMatAbstract):
            return self.mm(other)
        return NotImplemented

    def mm(self, other):
        self._unsupported("mm")

    # ------------------------------------------------------------------ solves and functions
    def solve(self, x, regul=1e-8, solve="default", impl=None, **kwargs):
        """Solve ``(M + regul·I) y = x`` for a PVector or PFMap ``x`` (``regul`` is a damping
        whose exact meaning is the representation's: see its ``solvePVec``). ``impl`` is
        nngeometry 0.4's name of ``solve`` (the method), accepted for its callers."""
        if impl is not None:
            solve = impl
        if isinstance(x, PVector):
            return self.solvePVec(x, regul=regul, solve=solve, **kwargs)
        if isinstance(x, PFMap):
            return self.solvePFMap(x, regul=regul, solve=solve, **kwargs)
        raise TypeError(f"solve takes a PVector or a PFMap, got {type(x).__name__}")

    def solvePVec(self, x, regul=1e-8, solve="default", **kwargs):
        self._unsupported("solvePVec")

    def solvePFMap(self, x, regul=1e-8, solve="default", **kwargs):
        self._unsupported("solvePFMap")

    def inverse(self, regul=1e-8):
        self._unsupported("inverse")

    def inv(self, regul=1e-8, **kwargs):
        return self.inverse(regul=regul, **kwargs)

    def pow(self, x, regul=0.0):
        self._unsupported("pow")

    def __pow__(self, x):
        return self.pow(x)

    def logdet(self, regul=0.0):
        """``log det(M + regul·I)``."""
        self._unsupported("logdet")

    def sqrt(self, regul=0.0, **kwargs):
        """``(M + Λ)^{1/2}``: :meth:`pow` with ``x = 1/2`` (same ``regul`` kinds, same damping
        rule and keywords; a matrix that is not positive semi-definite after damping raises the
        shared ``NotPositiveSemiDefiniteError``)."""
        return self.pow(0.5, regul=regul, **kwargs)

    # ------------------------------------------------------------------ reductions
    def get_diag(self):
        self._unsupported("get_diag")

    def trace(self):
        return self.get_diag().sum()

    def frobenius_norm(self):
        self._unsupported("frobenius_norm")

    def norm(self, ord=None):
        """A matrix norm of ``M``:

        * ``ord=None`` or ``'fro'``: the Frobenius norm ``sqrt(Σ_pq M_pq²)``;
        * ``ord=2``: the spectral norm, the largest singular value (``max |λ|``: ``M`` is
          symmetric);
        * ``ord=-2``: the smallest singular value (``min |λ|``; 0 for a singular matrix).
        """
        if ord in (None, "fro"):
            return self.frobenius_norm()
        if ord in (2, -2):
            sv = self._singular_values()
            return sv.max() if ord == 2 else sv.min()
        raise NotImplementedError(
            f"norm(ord={ord!r}) is not implemented for {type(self).__name__}; use ord='fro', 2 "
            "or -2, or torch.linalg.matrix_norm(M.to_torch(), ord) on small matrices")

    def _singular_values(self):
        """All ``P`` singular values (``|λ|``), in any order; what ``norm(ord=±2)`` needs."""
        self._unsupported("norm(ord=2 or -2)")

    def pinv(self, atol=1e-8):
        """Moore-Penrose pseudo-inverse ``M⁺``: the eigenvalues with ``|λ| ≤ atol`` are treated
        as zero (their eigenvectors are sent to 0), the others inverted."""
        self._unsupported("pinv")

    def get_device(self):
        """The device of the matrix's storage (for a matrix that stores nothing, such as
        PMatImplicit, the device of the model's parameters)."""
        t = _first_tensor(self.data)
        if t is not None:
            return t.device
        model = getattr(self.generator, "model", None)
        if model is not None:
            for p in model.parameters():
                return p.device
        device = getattr(self.layer_collection, "device", None)
        return torch.device(device if device is not None else "cpu")

    def to_torch(self):
        self._unsupported("to_torch")

    def get_dense_tensor(self):
        return self.to_torch()

    # ------------------------------------------------------------------ arithmetic
    def _scaled(self, x):
        self._unsupported("_scaled")

    def __mul__(self, x):
        if isinstance(x, (int, float)) or (torch.is_tensor(x) and x.dim() == 0):
            return self._scaled(x)
        return NotImplemented

    __rmul__ = __mul__

    def __truediv__(self, x):
        return self * (1.0 / x)

    def __neg__(self):
        return self._scaled(-1.0)

    def __add__(self, other):
        self._unsupported("__add__")

    def __sub__(self, other):
        return self + (-other)

    # ------------------------------------------------------------------ pickling
    def __getstate__(self):
        # the generator holds the model and a user function (often a lambda): not picklable,
        # and not needed once the matrix is built
        state = self.__dict__.copy()
        state["generator"] = None
        return state

    def __setstate__(self, state_dict):
        """Restore a pickled matrix: everything but the generator, which is None after
        loading (set ``M.generator`` again for the operations that run the model)."""
        self.__dict__.update(state_dict)
        self.__dict__.setdefault("generator", None)

    # ------------------------------------------------------------------ interop (see _scipy.py)
    def to_scipy(self, dtype=None):
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 numpy in and out, batched
        ``matmat``) for ``eigsh``, ``cg``, ``lsmr``...; needs scipy (optional)."""
        from ._scipy import to_scipy
        return to_scipy(self, dtype=dtype)

    def submatrix(self, rows, cols=None):
        """The dense tensor ``M[rows][:, cols]`` (``cols`` default ``rows``), from products."""
        from ._scipy import submatrix
        return submatrix(self, rows, cols)


def check_reduction(reduction):
    if reduction not in ("sum", "diag"):
        raise ValueError(f"unknown reduction '{reduction}': use 'sum' (shape (n,)) or 'diag' "
                         "(shape (K, n))")


def reduce_forms(q, reduction):
    """``q`` of shape ``(K, n)`` (the quadratic forms ``J[k, i] M J[k, i]ᵀ``) reduced as
    ``mapTMmap`` documents: ``'diag'`` keeps it, ``'sum'`` sums over ``k``."""
    check_reduction(reduction)
    return q if reduction == "diag" else q.sum(dim=0)


def _first_tensor(data):
    """The first tensor found in ``data`` (a tensor, or dicts / tuples / lists of them)."""
    if torch.is_tensor(data):
        return data
    if isinstance(data, dict):
        data = list(data.values())
    if isinstance(data, (tuple, list)):
        for item in data:
            t = _first_tensor(item)
            if t is not None:
                return t
    elif isinstance(data, PMatAbstract):  # PMatMixed: {group: PMat}
        return _first_tensor(data.data)
    return None


def bdot(A, B):
    """Batched dot product: ``bdot(A, B)[i] = <A[i], B[i]>``."""
    return torch.matmul(A.unsqueeze(1), B.unsqueeze(2)).squeeze(2).squeeze(1)
