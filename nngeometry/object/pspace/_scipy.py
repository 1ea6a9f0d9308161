"""Conversions of parameter-space matrices for other tools: a ``scipy.sparse.linalg``
``LinearOperator`` (``M.to_scipy()``) and dense sub-matrices ``M[rows][:, cols]``
(``M.submatrix(rows, cols)``), both from the representation's products only (``mv`` /
``mmap``), so they work for every representation, ``PMatImplicit`` included.

scipy is optional: it is imported when ``to_scipy`` is called.
"""
import numpy as np
import torch

from ..map import PFMapDense
from ..vector import PVector


def _apply_rows(M, V):
    """``M`` applied to the rows of ``V`` ``(s, P)``: one ``mmap`` (batched: for PMatImplicit
    one pass over the data for all rows), or ``s`` calls to ``mv`` where ``mmap`` is missing."""
    lc = M.layer_collection
    try:
        return M.mmap(PFMapDense(lc, data=V.unsqueeze(0))).to_torch().reshape(V.shape)
    except NotImplementedError:
        return torch.stack([M.mv(PVector(lc, vector_repr=v)).get_flat_representation()
                            for v in V])


def _dtype_device(M):
    dtype = M.dtype
    try:
        device = M.get_device()
    except Exception:  # a matrix without storage nor model: CPU
        device = torch.device("cpu")
    return dtype, device


def to_scipy(M, dtype=None):
    """``M`` as a ``scipy.sparse.linalg.LinearOperator`` of shape ``(P, P)``.

    ``matvec`` / ``matmat`` take numpy arrays in the collection's parameter order (``(P,)``,
    ``(P, k)``), run ``M.mv`` / one batched ``M.mmap`` in ``M``'s own dtype and device, and
    return numpy arrays of the operator's ``dtype`` (default ``float64``, whatever ``M``'s
    dtype: scipy's solvers expect it). ``M`` is symmetric, so ``rmatvec = matvec``.
    Works with ``eigsh``, ``cg``, ``minres``, ``lsmr``, ``svds``...
    """
    try:
        from scipy.sparse.linalg import LinearOperator
    except ImportError as e:  # optional dependency
        raise ImportError(
            "M.to_scipy() needs scipy, an optional dependency of nngeometry: install it with "
            "`pip install scipy` (or `pip install nngeometry[scipy]`)") from e
    np_dtype = np.dtype(np.float64 if dtype is None else dtype)
    if np_dtype.kind != "f":
        raise TypeError(f"to_scipy(dtype=...) must be a real floating dtype, got {np_dtype}")
    t_dtype, device = _dtype_device(M)
    P = M.layer_collection.numel()

    def matmat(X):
        X = np.asarray(X)
        if X.ndim == 1:
            X = X.reshape(-1, 1)
        if np.iscomplexobj(X):
            raise TypeError("the operator is real: give real vectors")
        V = torch.as_tensor(np.ascontiguousarray(X.T), dtype=t_dtype, device=device)
        return _apply_rows(M, V).detach().cpu().numpy().T.astype(np_dtype, copy=False)

    def matvec(x):
        return matmat(np.asarray(x).reshape(-1, 1)).reshape(-1)

    return LinearOperator((P, P), matvec=matvec, rmatvec=matvec, matmat=matmat,
                          rmatmat=matmat, dtype=np_dtype)


def _indices(idx, P, what):
    """A 1-dim LongTensor of indices in ``[0, P)`` from a list, range, slice, numpy array or
    tensor (negative indices count from the end, as in Python)."""
    if isinstance(idx, slice):
        return torch.arange(P)[idx]
    if torch.is_tensor(idx):
        t = idx
    else:
        try:
            t = torch.as_tensor(np.asarray(idx))
        except Exception as e:
            raise TypeError(f"{what} must be a sequence of ints, a slice or a 1-dim tensor") from e
    if t.dtype == torch.bool:
        raise TypeError(f"{what}: give integer indices, not a boolean mask (use "
                        "mask.nonzero().flatten())")
    if t.dim() != 1 or (t.numel() and t.is_floating_point()):
        raise TypeError(f"{what} must be a 1-dim sequence of integer indices, got shape "
                        f"{tuple(t.shape)} and dtype {t.dtype}")
    t = t.long().cpu()
    if t.numel() and (int(t.max()) >= P or int(t.min()) < -P):
        raise IndexError(f"{what} has an index out of range for a matrix with P = {P} "
                         f"parameters (indices must be in [-{P}, {P}))")
    return torch.where(t < 0, t + P, t)


def submatrix(M, rows, cols=None):
    """The dense sub-matrix ``M[rows][:, cols]``, a tensor of shape ``(len(rows), len(cols))``
    (``cols`` defaults to ``rows``: a principal sub-matrix) in ``M``'s dtype and device.

    Indices are positions in the flat parameter vector (``layer_collection.p_pos[layer_id]`` is
    a layer's offset). Computed as ``M`` applied to the unit vectors of ``cols`` (one batched
    ``mmap`` of ``len(cols)`` vectors; for ``PMatImplicit`` one pass over the data), then the
    ``rows`` entries picked: meant for small index sets (it holds a ``len(cols) × P`` block).
    """
    P = M.layer_collection.numel()
    r = _indices(rows, P, "rows")
    c = r if cols is None else _indices(cols, P, "cols")
    dtype, device = _dtype_device(M)
    if c.numel() == 0 or r.numel() == 0:
        return torch.zeros(r.numel(), c.numel(), dtype=dtype, device=device)
    E = torch.zeros(c.numel(), P, dtype=dtype, device=device)
    E[torch.arange(c.numel()), c.to(device)] = 1
    MC = _apply_rows(M, E)  # row j: M e_{c_j} = column c_j of M
    return MC[:, r.to(device)].T.contiguous()
