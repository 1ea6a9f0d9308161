"""Eigenvalue spectra of any representation, and the effective dimension.

[`eigenvalues`][nngeometry.spectrum.eigenvalues] returns the spectrum the cheapest exact way the structure allows, never
forming a ``P × P`` matrix when the structure gives the eigenvalues directly: the
representation's own
[`eigenvalues`][nngeometry.object.pspace.abstract.PMatAbstract.eigenvalues], block by block
(``PMatDiag``: the diagonal; ``PMatEye``: ``P`` copies of its scaling; ``PMatKFAC``: per layer,
the products ``λ_G[p] λ_A[q]`` of its factors' eigenvalues; ``PMatEKFAC``: its diagonal in the
eigenbasis; ``PMatLowRank``: its thin eigendecomposition; ``PMatDense``, ``PMatBlockDiag``:
each block's; ``PMatMixed``: the union of its parts' spectra); otherwise

* a representation with ``P ≤ max_dense``: ``eigvalsh`` of ``to_torch()``;
* otherwise (``PMatImplicit`` of a large model, ...): the ``k`` extreme eigenvalues by block
  Lanczos ([`nngeometry.estimators.top_eigenpairs`][nngeometry.estimators.top_eigenpairs]); pass ``k``.

[`effective_dimension`][nngeometry.spectrum.effective_dimension] is ``Σ_i λ_i / (λ_i + α)`` (MacKay 1992; Maddox et al. 2020): the
number of parameter directions the data determine, at the scale ``α`` of a prior precision.
"""
import torch

from .estimators import top_eigenpairs


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
    """All eigenvalues of a representation whose structure gives them (its blocks'), or None."""
    fn = getattr(M, "eigenvalues", None)
    if not callable(fn):
        return None
    try:
        with torch.no_grad():
            return fn().detach()
    except NotImplementedError:  # no blocks (PMatImplicit), or a block without a spectrum
        return None


def effective_dimension(M_or_eigenvalues, alpha):
    """``Σ_i λ_i / (λ_i + α)`` over the eigenvalues of ``M`` (a representation, or a tensor of its
    eigenvalues); ``alpha > 0``. Negative eigenvalues (round-off of a PSD matrix) count as 0."""
    if float(alpha) <= 0:
        raise ValueError(f"alpha={alpha}: the scale of the effective dimension must be positive")
    ev = M_or_eigenvalues if torch.is_tensor(M_or_eigenvalues) else eigenvalues(M_or_eigenvalues)
    ev = ev.clamp_min(0)
    return (ev / (ev + alpha)).sum()


__all__ = ["eigenvalues", "effective_dimension"]
