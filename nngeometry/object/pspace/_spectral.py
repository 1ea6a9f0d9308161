"""Checks shared by the representations that take matrix functions through eigenvalues."""
import torch


def eigh(M):
    """``torch.linalg.eigh`` of a symmetric matrix, robust to what curvature factors look like.

    Accumulated factors are symmetric only up to round-off, and are often very rank-deficient
    (a Linear layer with more inputs than examples seen): float32 LAPACK can then fail to
    converge. The matrix is symmetrized, and a failed float32 decomposition is redone in float64
    and cast back.
    """
    M = (M + M.transpose(-1, -2)) / 2
    try:
        return torch.linalg.eigh(M)
    except torch.linalg.LinAlgError:
        if M.dtype == torch.float64:
            raise
        evals, evecs = torch.linalg.eigh(M.double())
        return evals.to(M.dtype), evecs.to(M.dtype)


def eigvalsh(M):
    """Eigenvalues of a symmetric matrix, with the same safeguards as :func:`eigh`."""
    return eigh(M)[0]


def _round_off(ev):
    """Size below which a negative eigenvalue of a PSD matrix is round-off."""
    eps = torch.finfo(ev.dtype).eps
    return 100 * ev.numel() * eps * ev.abs().max().clamp(min=torch.finfo(ev.dtype).tiny)


def eigvals_for_power(ev, x):
    """The eigenvalues of ``M + regul·I`` made ready for the power ``x``.

    Integer powers take them as they are. Fractional powers need ``M + regul·I`` PSD: negative
    round-off is clipped to 0, a genuinely negative eigenvalue (an indefinite matrix such as a
    Hessian) is refused rather than silently clipped.
    """
    if float(x).is_integer():
        return ev
    low = ev.min()
    if low < -_round_off(ev):
        raise ValueError(
            f"fractional power {x} of a matrix with a negative eigenvalue ({low.item():.3g}): "
            "M + regul·I is not positive semi-definite (e.g. an indefinite Hessian); use a regul "
            f"above {-low.item():.3g} or an integer power")
    return ev.clamp(min=0)


def logdet_from_eigvals(ev):
    """``Σ log λ``, refusing a non-positive eigenvalue (log det undefined) with the fix."""
    low = ev.min()
    if low <= 0:
        raise ValueError(
            f"log-determinant of a matrix with a non-positive eigenvalue ({low.item():.3g}): "
            f"M + regul·I must be positive definite; use a regul above {max(-low.item(), 0):.3g}")
    return torch.log(ev).sum()
