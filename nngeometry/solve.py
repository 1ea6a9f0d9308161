"""Iterative solvers with parameter-space matrices."""
import torch

from .object.vector import PVector


def zero_like_pvector(pvector):
    """A PVector of zeros with the layer collection, dtype and device of ``pvector``."""
    flat = pvector.get_flat_representation()
    return PVector(pvector.layer_collection, vector_repr=torch.zeros_like(flat))


def cg(A, b, regul=1e-8, x0=None, rtol=1e-5, atol=0, max_iter=None, M=None):
    """Solve ``(A + regul·I) x = b`` by (preconditioned) conjugate gradients.

    Args:
        A: a symmetric positive semi-definite parameter-space matrix (anything with
            ``mv(PVector) -> PVector``, e.g. ``PMatImplicit``, ``PMatDense``); with ``regul > 0``
            the system is positive definite.
        b: the right-hand side, a PVector.
        regul: the damping ``λ`` added to the diagonal.
        x0: the starting point (default 0).
        rtol, atol: stop when ``||r|| ≤ max(rtol·||b||, atol)``, ``r = b - (A + λI) x``.
        max_iter: at most this many iterations (default ``10 P``).
        M: a preconditioner: ``M.solve(r, regul=regul)`` approximates ``(A + λI)⁻¹ r`` (e.g. a
            ``PMatKFAC`` or ``PMatDiag`` of the same matrix).

    Returns the PVector ``x`` (the last iterate if ``max_iter`` is reached first).
    """
    lc = b.layer_collection
    bf = b.get_flat_representation()

    def apply(pf):
        Ap = A.mv(PVector(lc, vector_repr=pf)).get_flat_representation()
        return Ap + regul * pf if regul else Ap

    def precondition(rf):
        if M is None:
            return rf
        return M.solve(PVector(lc, vector_repr=rf), regul=regul).get_flat_representation()

    if max_iter is None:
        max_iter = 10 * lc.numel()
    tol = max(rtol * float(torch.linalg.vector_norm(bf)), atol)
    if x0 is None:
        x = torch.zeros_like(bf)
        r = bf.clone()
    else:
        x = x0.get_flat_representation().clone()
        r = bf - apply(x)
    z = precondition(r)
    p = z.clone()
    rz = torch.dot(r, z)
    for _ in range(max_iter):
        if float(torch.linalg.vector_norm(r)) <= tol:
            break
        Ap = apply(p)
        alpha = rz / torch.dot(p, Ap)
        x = x + alpha * p
        r = r - alpha * Ap
        z = precondition(r)
        rz_next = torch.dot(r, z)
        p = z + (rz_next / rz) * p
        rz = rz_next
    return PVector(lc, vector_repr=x)


__all__ = ["cg", "zero_like_pvector"]
