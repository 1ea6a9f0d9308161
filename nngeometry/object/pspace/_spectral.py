"""Checks shared by the representations that take matrix functions through eigenvalues."""
import torch

from ._checks import check_invertible, logdet_of, psd_values


def eigh(M):
    """``torch.linalg.eigh`` of a symmetric matrix, robust to what curvature factors look like.

    Accumulated factors are symmetric only up to round-off, and are often very rank-deficient
    (a Linear layer with more inputs than examples seen, e.g. a 2049-wide KFAC input factor of
    rank 513): float32 LAPACK (``ssyevd``) can then fail to converge, after spending as long as
    a successful decomposition. Two safeguards:

    * the matrix is symmetrized, and decomposed as ``M + s·I`` with ``s = 1e-6 · mean(diag M)``;
      the shift is subtracted from the eigenvalues afterwards. This is exact (same eigenvectors,
      eigenvalues moved by ``s``) and costs nothing in accuracy (the round-off of ``eigh`` is
      ``eps · ||M||`` either way), but it moves the cluster of zero eigenvalues off zero, which
      is what made ``ssyevd`` fail: on that 2049-wide factor every shift from ``1e-7`` to
      ``1e-4`` of the mean diagonal converges, in the time of a well-conditioned matrix;
    * a decomposition that still fails is redone in float64 and cast back.
    """
    if M.dtype in (torch.float16, torch.bfloat16):
        # no half-precision eigensolver: decompose in float32, hand back the model's dtype
        evals, evecs = eigh(M.float())
        return evals.to(M.dtype), evecs.to(M.dtype)
    if M.shape[-1] == 0:
        return torch.linalg.eigh(M)
    # one new matrix, symmetrized and shifted in place (a factor can be 2049² floats)
    shifted = M + M.transpose(-1, -2)
    shifted.mul_(0.5)
    # detached: the shift is added then subtracted, so it is a constant for autograd (and the
    # in-place add below must not modify a tensor saved for its backward)
    shift = 1e-6 * shifted.detach().diagonal(dim1=-2, dim2=-1).abs().mean(dim=-1)  # (...,)
    shifted.diagonal(dim1=-2, dim2=-1).add_(shift.unsqueeze(-1))
    try:
        evals, evecs = torch.linalg.eigh(shifted)
    except torch.linalg.LinAlgError:
        if M.dtype == torch.float64:
            raise
        evals, evecs = torch.linalg.eigh(shifted.double())
        evals, evecs = evals.to(M.dtype), evecs.to(M.dtype)
    return evals - shift.unsqueeze(-1), evecs


def eigvalsh(M):
    """Eigenvalues of a symmetric matrix, with the same safeguards as `eigh`."""
    return eigh(M)[0]


def eigvals_for_power(ev, x, rep="PMat", regul=0.0):
    """The eigenvalues of ``M + regul·I`` made ready for the power ``x``.

    Negative powers need ``M + regul·I`` invertible: a zero (or, undamped, round-off)
    eigenvalue is refused with the shared singular-matrix error. Integer powers take them as
    they are. Fractional powers need ``M + regul·I`` PSD: negative round-off is clipped to 0, a
    genuinely negative eigenvalue (an indefinite matrix such as a Hessian) is refused rather
    than silently clipped.
    """
    if float(x) < 0:
        check_invertible(ev, rep, f"pow({x})", regul)
    if float(x).is_integer():
        return ev
    return psd_values(ev, rep, f"pow({x})", regul)


def logdet_from_eigvals(ev, rep="PMat", regul=0.0):
    """``Σ log λ`` of the eigenvalues of ``M + regul·I``, refusing a negative eigenvalue (the
    matrix must be positive definite) and a singular matrix (shared error) with the fix."""
    return logdet_of(ev, rep, regul, require_pd=True)
