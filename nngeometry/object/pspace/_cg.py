"""Conjugate gradients on the rows of a matrix: the one implementation behind
``PMatImplicit.solve`` and `nngeometry.solve.cg` (each keeps its own documented defaults)."""
import torch


def conjugate_gradients(apply, B, regul=0.0, precondition=None, rtol=1e-5, atol=0.0,
                        max_iter=None, X0=None):
    """Solve ``(A + regul·I) X = B`` for the rows of ``B`` ``(m, P)`` by (preconditioned)
    conjugate gradients, all rows at once.

    ``apply(X)`` is ``A`` applied to the rows of ``X``; ``regul`` a number, a 0-d tensor or a
    ``(P,)`` tensor (a diagonal damping); ``precondition(R)`` (symmetric positive definite,
    approximating ``(A + regul·I)⁻¹``) is applied to the rows of the residual, None for none.
    Starts from ``X0`` (default 0) and stops when every row has ``||r|| ≤ max(rtol·||b||,
    atol)`` (``r`` the recursively updated residual), or after ``max_iter`` iterations
    (default ``P``). A direction with ``pᵀ(A + regul·I)p = 0`` (or ``rᵀz = 0``) takes no step,
    instead of dividing by zero.

    Returns ``(X, R, iterations, converged, relative_residual)``, the last being the largest
    ``||r|| / ||b||`` over the rows.
    """
    if max_iter is None:
        max_iter = B.shape[-1]
    if X0 is None:
        X = torch.zeros_like(B)
        R = B.clone()
    else:
        X = X0.to(B.dtype).clone()
        R = B - (apply(X) + regul * X)
    Z = R if precondition is None else precondition(R)
    Pd = Z.clone()
    rz = (R * Z).sum(-1)
    rs = (R * R).sum(-1)
    bnorm = (B * B).sum(-1).sqrt()
    target = torch.clamp(rtol * bnorm, min=atol)
    it = 0
    while it < max_iter and bool((rs.sqrt() > target).any()):
        AP = apply(Pd) + regul * Pd
        pAp = (Pd * AP).sum(-1)
        alpha = torch.where(pAp != 0, rz / torch.where(pAp != 0, pAp, torch.ones_like(pAp)),
                            torch.zeros_like(pAp))
        X = X + alpha.unsqueeze(-1) * Pd
        R = R - alpha.unsqueeze(-1) * AP
        Z = R if precondition is None else precondition(R)
        rz_new = (R * Z).sum(-1)
        beta = torch.where(rz != 0, rz_new / torch.where(rz != 0, rz, torch.ones_like(rz)),
                           torch.zeros_like(rz))
        Pd = Z + beta.unsqueeze(-1) * Pd
        rz = rz_new
        rs = (R * R).sum(-1)
        it += 1
    rel = float((rs.sqrt() / bnorm.clamp(min=torch.finfo(B.dtype).tiny)).max())
    converged = not bool((rs.sqrt() > target).any())
    return X, R, it, converged, rel
