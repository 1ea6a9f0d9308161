"""Checks shared by the representations that take matrix functions through eigenvalues."""
import torch


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
