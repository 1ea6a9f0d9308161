"""Eigenvalue spectra of any representation, and the effective dimension.

[`eigenvalues`][nngeometry.object.pspace.abstract.PMatAbstract.eigenvalues] returns the spectrum the cheapest exact way the structure allows, never
forming a ``P × P`` matrix when the structure gives the eigenvalues directly:

* ``PMatDiag``: the diagonal; ``PMatEye``: ``P`` copies of its scaling;
* ``PMatKFAC``: per layer, the products ``λ_G[p] λ_A[q]`` of its factors' eigenvalues;
* ``PMatEKFAC`` / ``PMatEKFACBlockDiag``: its diagonal in the eigenbasis (EKFAC's eigenvalues);
* ``PMatMixed``: the union of its parts' spectra;
* any other representation with ``P ≤ max_dense``: ``eigvalsh`` of ``to_torch()``;
* otherwise (``PMatImplicit`` of a large model, ...): the ``k`` extreme eigenvalues by block
  Lanczos ([`nngeometry.estimators.top_eigenpairs`][nngeometry.estimators.top_eigenpairs]); pass ``k``.

[`effective_dimension`][nngeometry.spectrum.effective_dimension] is ``Σ_i λ_i / (λ_i + α)`` (MacKay 1992; Maddox et al. 2020): the
number of parameter directions the data determine, at the scale ``α`` of a prior precision.
"""
import torch

from .estimators import top_eigenpairs
from .object.pspace import (PMatDiag, PMatEKFAC, PMatEKFACBlockDiag, PMatEye, PMatKFAC,
                            PMatMixed)


def eigenvalues(M, k=None, which="largest", max_dense=4096, **lanczos_kwargs):
    """The eigenvalues of ``M``, in decreasing order (see the module docstring for how).

    Args:
        M: a parameter-space matrix.
        k: if given, only the ``k`` largest (``which='largest'``) or smallest (``'smallest'``);
            required when ``M`` has no structured spectrum and ``P > max_dense``.
        which: ``'largest'`` or ``'smallest'`` (with ``k``).
        max_dense: the largest ``P`` for which a matrix without a structured spectrum is made
            dense (``P²`` numbers) rather than handed to Lanczos.
        **lanczos_kwargs: passed to ``top_eigenpairs`` (``tol``, ``max_iter``, ``generator``).

    Returns a 1-D tensor: all ``P`` eigenvalues, or ``k`` of them.
    """
    if which not in ("largest", "smallest"):
        raise ValueError(f"which={which!r}: use 'largest' or 'smallest'")
    ev = _structured(M)
    P = M.layer_collection.numel()
    if ev is None and P <= max_dense:
        ev = torch.linalg.eigvalsh(M.to_torch())
    if ev is None:
        if k is None:
            raise ValueError(
                f"{type(M).__name__} of {P} parameters has no structured spectrum and is too "
                f"large to make dense (max_dense={max_dense}): pass k= for its k extreme "
                "eigenvalues by Lanczos, or raise max_dense")
        return top_eigenpairs(M, k, which=which, **lanczos_kwargs).eigenvalues
    ev = ev.sort(descending=True).values
    if k is None:
        return ev
    return ev[:k] if which == "largest" else ev.flip(0)[:k]


def _structured(M):
    """All eigenvalues of a structured representation, or None."""
    if isinstance(M, PMatDiag):
        return M.get_diag().detach()
    if isinstance(M, PMatEye):
        s = torch.as_tensor(M.scaling) if hasattr(M, "scaling") else M.data
        return s.detach().reshape(()).expand(M.layer_collection.numel()).clone()
    if isinstance(M, PMatKFAC):
        evals, _ = M.get_eigendecomposition()
        return torch.cat([torch.outer(lG, lA).reshape(-1) for lA, lG in _pairs(evals)])
    if isinstance(M, (PMatEKFAC, PMatEKFACBlockDiag)):
        return torch.cat([d.detach().reshape(-1) for d in _tensors(M.data[1])])
    if isinstance(M, PMatMixed):
        parts = [_structured(part) for part in _mixed_parts(M)]
        if all(p is not None for p in parts):
            return torch.cat(parts)
    return None


def _pairs(evals):
    """``(λ_A, λ_G)`` pairs of every layer and Kronecker term of a KFAC eigendecomposition."""
    for e in evals.values():
        if isinstance(e, tuple) and len(e) == 2 and torch.is_tensor(e[0]):
            yield e
        else:
            yield from _pairs(dict(enumerate(e)))


def _tensors(data):
    if torch.is_tensor(data):
        yield data
    elif isinstance(data, dict):
        for v in data.values():
            yield from _tensors(v)
    elif isinstance(data, (tuple, list)):
        for v in data:
            yield from _tensors(v)


def _mixed_parts(M):
    data = M.data
    return list(data.values()) if isinstance(data, dict) else list(data)


def effective_dimension(M_or_eigenvalues, alpha):
    """``Σ_i λ_i / (λ_i + α)`` over the eigenvalues of ``M`` (a representation, or a tensor of its
    eigenvalues); ``alpha > 0``. Negative eigenvalues (round-off of a PSD matrix) count as 0."""
    if float(alpha) <= 0:
        raise ValueError(f"alpha={alpha}: the scale of the effective dimension must be positive")
    ev = M_or_eigenvalues if torch.is_tensor(M_or_eigenvalues) else eigenvalues(M_or_eigenvalues)
    ev = ev.clamp_min(0)
    return (ev / (ev + alpha)).sum()


__all__ = ["eigenvalues", "effective_dimension"]
