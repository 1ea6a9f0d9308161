"""Iterative solvers with parameter-space matrices: conjugate gradients (``cg``, upstream's
signature), MINRES for symmetric indefinite matrices (Hessians), and a truncated Neumann series.

Each solves ``(A + regul·I) x = b`` for a PVector ``b`` using only products ``A.mv``; ``A`` is any
``PMat*`` (e.g. ``PMatImplicit`` of a Fisher, GGN or Hessian: one pass over the data per
product) or any object with ``mv``. The optional preconditioner ``M`` approximates
``(A + regul·I)⁻¹`` and must be symmetric positive definite: a representation ``M`` is applied as
``M.solve(r, regul=regul)`` (so ``M`` is an approximation of ``A`` itself, e.g. a ``PMatKFAC``,
``PMatEKFAC`` or ``PMatDiag`` of the same curvature), exactly damped: ``(M + regul·I)⁻¹ r``
(KFAC with ``damping='exact'``, not its default π-damping, a worse preconditioner); a callable as
``M(r)`` (PVector to PVector), e.g. ``lambda r: K.solve(r, regul=λ)`` for π-damped KFAC. With
``return_info=True`` each returns ``(x, info)``, ``info`` a [`SolveInfo`][nngeometry.solve.SolveInfo] (iterations,
products, residual).

``cg`` and ``minres`` raise ``SolverNotConvergedError`` when ``max_iter`` is reached before the
tolerance (their iterate is then not the solution: on a singular system without damping it can
grow without bound); with ``return_info=True`` they return the last iterate and its
``SolveInfo`` (``converged=False``) instead. ``neumann`` is a truncated series by design
(always ``n_terms`` terms) and never raises for it.
"""
from dataclasses import dataclass
import inspect

import torch

from .object.pspace import PMatMixed
from .object.pspace._cg import conjugate_gradients
from .object.pspace._checks import SolverNotConvergedError, not_converged_error  # noqa: F401
from .object.vector import PVector


@dataclass
class SolveInfo:
    """What an iterative solve did.

    Attributes:
        iterations: iterations made.
        n_matvecs: products with ``A`` (including the residual checks and, for ``neumann`` with
            ``scale=None``, the power iterations that chose the scale).
        residual_norm: ``||b - (A + regul·I) x||`` of the returned ``x`` (2-norm).
        relative_residual: ``residual_norm / ||b||``.
        converged: whether the stopping rule was met (``neumann``: whether the residual is below
            ``max(rtol·||b||, atol)``).
    """

    iterations: int
    n_matvecs: int
    residual_norm: float
    relative_residual: float
    converged: bool


def zero_like_pvector(pvector):
    """A PVector of zeros with the layer collection, dtype and device of ``pvector``."""
    flat = pvector.get_flat_representation()
    return PVector(pvector.layer_collection, vector_repr=torch.zeros_like(flat))


def _exact_damping_kwargs(M):
    """``{'damping': 'exact'}`` when the representation ``M`` has a damping option (KFAC, and
    PMatMixed passing it to its KFAC groups), else ``{}``: a preconditioner is applied as
    ``(M + λI)⁻¹``, damped exactly with the system's ``λ``. KFAC's default π-damping inverts
    ``(A + π√λ I) ⊗ (G + √λ/π I) = A⊗G + λI + √λ (A⊗I/π + π I⊗G)`` instead: the extra term
    over-damps the directions where the factors are large, and makes it a worse preconditioner
    (iteration counts in docs/estimators.md)."""
    solve_pvec = getattr(M, "solvePVec", None)
    if solve_pvec is None:
        return {}
    if isinstance(M, PMatMixed):
        return {"damping": "exact"}
    try:
        params = inspect.signature(solve_pvec).parameters
    except (TypeError, ValueError):
        return {}
    return {"damping": "exact"} if "damping" in params else {}


class _System:
    """``(A + regul·I)`` and the preconditioner as functions of flat tensors, counting products."""

    def __init__(self, A, b, regul, M):
        if not isinstance(b, PVector):
            raise TypeError(f"the right-hand side b must be a PVector, got {type(b).__name__}")
        if not callable(getattr(A, "mv", None)):
            raise TypeError(f"A must be a parameter-space matrix with mv (a PMat*), got "
                            f"{type(A).__name__}")
        self.A, self.lc, self.regul, self.M = A, b.layer_collection, regul, M
        self.n_matvecs = 0
        if M is not None and not (callable(getattr(M, "solve", None)) or callable(M)):
            raise TypeError(f"the preconditioner M must be a PMat (applied as M.solve(r, regul)) "
                            f"or a callable PVector -> PVector, got {type(M).__name__}")
        self.solve_kwargs = _exact_damping_kwargs(M)

    def apply(self, pf):
        self.n_matvecs += 1
        Ap = self.A.mv(PVector(self.lc, vector_repr=pf)).get_flat_representation()
        return Ap + self.regul * pf if self.regul else Ap

    def precondition(self, rf):
        if self.M is None:
            return rf
        r = PVector(self.lc, vector_repr=rf)
        z = self.M.solve(r, regul=self.regul, **self.solve_kwargs) \
            if callable(getattr(self.M, "solve", None)) else self.M(r)
        return z.get_flat_representation() if isinstance(z, PVector) else z

    def info(self, x, bf, iterations, converged, residual=None):
        if residual is None:
            residual = bf - self.apply(x)
        rn = float(torch.linalg.vector_norm(residual))
        bn = float(torch.linalg.vector_norm(bf))
        return SolveInfo(iterations=iterations, n_matvecs=self.n_matvecs, residual_norm=rn,
                         relative_residual=rn / bn if bn > 0 else rn, converged=converged)


def cg(A, b, regul=1e-8, x0=None, rtol=1e-5, atol=0, max_iter=None, M=None, return_info=False):
    """Solve ``(A + regul·I) x = b`` by (preconditioned) conjugate gradients.

    Args:
        A: a symmetric positive semi-definite parameter-space matrix (anything with
            ``mv(PVector) -> PVector``, e.g. ``PMatImplicit``, ``PMatDense``); with ``regul > 0``
            the system is positive definite.
        b: the right-hand side, a PVector.
        regul: the damping ``λ`` added to the diagonal.
        x0: the starting point (default 0).
        rtol: stop when ``||r|| ≤ max(rtol·||b||, atol)``, ``r = b - (A + λI) x``.
        atol: see ``rtol``.
        max_iter: at most this many iterations (default ``10 P``).
        M: a preconditioner: ``M.solve(r, regul=regul)`` approximates ``(A + λI)⁻¹ r`` (e.g. a
            ``PMatKFAC``, ``PMatEKFAC`` or ``PMatDiag`` of the same matrix; KFAC damped
            exactly, ``(K + λI)⁻¹``), or a callable ``r -> z``.
        return_info: also return a [`SolveInfo`][nngeometry.solve.SolveInfo], and return the last iterate instead of
            raising when ``max_iter`` is reached before the tolerance.

    Returns the PVector ``x``, or ``(x, info)``. Raises ``SolverNotConvergedError`` when
    ``max_iter`` is reached first (unless ``return_info=True``). The residual ``r`` is the recursively updated one (what the stopping rule
    uses); ``info.residual_norm`` is recomputed from ``x`` (one more product).
    """
    sysm = _System(A, b, regul, M)
    lc = b.layer_collection
    bf = b.get_flat_representation()
    if max_iter is None:
        max_iter = 10 * lc.numel()
    tol = max(rtol * float(torch.linalg.vector_norm(bf)), atol)
    # the package's one CG (the rows of a batch; here one row)
    X, R, iterations, converged, _ = conjugate_gradients(
        lambda P: sysm.apply(P[0]).unsqueeze(0), bf.unsqueeze(0),
        precondition=None if M is None else lambda R: sysm.precondition(R[0]).unsqueeze(0),
        rtol=0.0, atol=tol, max_iter=max_iter,
        X0=None if x0 is None else x0.get_flat_representation().unsqueeze(0))
    x = X[0]
    return _finish("cg", sysm, lc, x, bf, iterations, converged, tol, return_info)


def _finish(solver, sysm, lc, x, bf, iterations, converged, tol, return_info, exhausted=False):
    """``x`` (or ``(x, info)``), or the shared error of a solve that did not converge."""
    out = PVector(lc, vector_repr=x)
    if return_info:
        return out, sysm.info(x, bf, iterations, bool(converged))
    if not converged and not exhausted:
        info = sysm.info(x, bf, iterations, False)
        bn = float(torch.linalg.vector_norm(bf))
        raise not_converged_error(solver, iterations, info.relative_residual,
                                  tol / bn if bn > 0 else tol)
    return out


def minres(A, b, regul=0.0, x0=None, rtol=1e-5, atol=0, max_iter=None, M=None, return_info=False):
    """Solve ``(A + regul·I) x = b`` for a symmetric, possibly indefinite ``A`` (a Hessian) by
    MINRES (Paige & Saunders 1975): the iterate minimising the residual norm over the Krylov
    space, through the Lanczos recurrence and Givens rotations; one product per iteration.

    Args: as [`cg`][nngeometry.solve.cg]; ``M``, if given, must be symmetric positive definite (e.g. a KFAC or
    diagonal Gauss-Newton approximation preconditioning a Hessian), and then the minimised norm
    is the ``M``-norm of the residual ``sqrt(rᵀ M r)``.

    Stops when that (recursively updated) residual norm is ``≤ max(rtol·‖b‖_M, atol)``
    (``‖b‖_M = sqrt(bᵀ M b)``; the 2-norm without a preconditioner). ``(A + regul·I)`` must be
    nonsingular on the Krylov space for the solution to be unique; on a singular consistent system
    MINRES converges to a least-squares solution.
    """
    sysm = _System(A, b, regul, M)
    lc = b.layer_collection
    bf = b.get_flat_representation()
    if max_iter is None:
        max_iter = 10 * lc.numel()
    tiny = torch.finfo(bf.dtype).tiny
    x = torch.zeros_like(bf) if x0 is None else x0.get_flat_representation().clone()
    r1 = bf.clone() if x0 is None else bf - sysm.apply(x)
    y = sysm.precondition(r1)
    beta1_sq = float(torch.dot(r1, y))
    if beta1_sq < 0:
        raise ValueError("the preconditioner M is not positive definite (rᵀ M r < 0): MINRES "
                         "needs a symmetric positive definite M")
    beta1 = beta1_sq ** 0.5
    bnorm_m = float(torch.dot(bf, sysm.precondition(bf))) ** 0.5 if M is not None \
        else float(torch.linalg.vector_norm(bf))
    tol = max(rtol * bnorm_m, atol)
    iterations = 0
    converged = beta1 <= tol
    # the Lanczos vectors v_k = y / beta (y = M r), and the rotated tridiagonal's recurrences
    old_beta, beta = 0.0, beta1
    r2 = r1
    cs, sn = -1.0, 0.0
    dbar, epsln, phibar = 0.0, 0.0, beta1
    w = torch.zeros_like(bf)
    w2 = torch.zeros_like(bf)
    while not converged and iterations < max_iter:
        v = y / beta
        y = sysm.apply(v)
        if iterations > 0:
            y = y - (beta / old_beta) * r1
        alpha = float(torch.dot(v, y))
        y = y - (alpha / beta) * r2
        r1, r2 = r2, y
        y = sysm.precondition(r2)
        old_beta = beta
        beta_sq = float(torch.dot(r2, y))
        if beta_sq < 0:
            raise ValueError("the preconditioner M is not positive definite (rᵀ M r < 0): "
                             "MINRES needs a symmetric positive definite M")
        beta = beta_sq ** 0.5
        # apply the previous rotation to the new column of the tridiagonal, then a new rotation
        # that annihilates its subdiagonal entry beta
        old_eps = epsln
        delta = cs * dbar + sn * alpha
        gbar = sn * dbar - cs * alpha
        epsln = sn * beta
        dbar = -cs * beta
        gamma = max((gbar ** 2 + beta ** 2) ** 0.5, tiny)
        cs, sn = gbar / gamma, beta / gamma
        phi = cs * phibar
        phibar = sn * phibar
        # search directions: w_k = (v_k - ε_k w_{k-2} - δ_k w_{k-1}) / γ_k
        w1, w2 = w2, w
        w = (v - old_eps * w1 - delta * w2) / gamma
        x = x + phi * w
        iterations += 1
        converged = phibar <= tol
        if beta <= tiny:  # the Krylov space is invariant: x is the solution in it
            break
    # an invariant Krylov space (beta ≈ 0): x is the least-squares solution in it, the best
    # MINRES can give (a singular inconsistent system): reported in info, not refused
    return _finish("minres", sysm, lc, x, bf, iterations, converged, tol, return_info,
                   exhausted=beta <= tiny)


def neumann(A, b, regul=0.0, scale=None, n_terms=100, M=None, rtol=1e-5, atol=0,
            return_info=False):
    """``(A + regul·I)⁻¹ b`` by the truncated Neumann series
    ``x = α Σ_{j=0}^{K-1} (I - α C (A + regul·I))^j C b`` with ``K = n_terms``, ``α = scale``
    and ``C`` the preconditioner (identity if None): exact as ``K → ∞`` when the spectral radius
    of ``I - α C (A + regul·I)`` is below 1, i.e. for positive definite ``C(A + regul·I)`` when
    ``0 < α < 2 / λ_max``. The error after ``K`` terms is ``(I - α C (A + regul·I))^K x*``:
    eigen-directions with small ``α λ`` converge slowly, so a truncated series is also a damped
    inverse (a regulariser in its own right). ``K - 1`` products.

    Args:
        scale: ``α``. None: ``1 / (1.05 λ̂)`` with ``λ̂`` the largest eigenvalue of
            ``C (A + regul·I)`` estimated by 30 power iterations (30 more products, counted in
            ``info.n_matvecs``).
        n_terms: ``K ≥ 1``.
        rtol: only for ``info.converged`` (the series always runs ``K`` terms).
        atol: likewise.

    Returns ``x`` (a PVector), or ``(x, info)`` with ``return_info=True``.
    """
    if isinstance(n_terms, bool) or not isinstance(n_terms, int) or n_terms < 1:
        raise ValueError(f"n_terms must be an int ≥ 1, got {n_terms!r}")
    sysm = _System(A, b, regul, M)
    lc = b.layer_collection
    bf = b.get_flat_representation()
    if scale is None:
        g = torch.Generator(device=bf.device).manual_seed(0)
        v = torch.randn(bf.shape, generator=g, device=bf.device, dtype=bf.dtype)
        lam = 0.0
        for _ in range(30):
            v = v / torch.linalg.vector_norm(v)
            u = sysm.precondition(sysm.apply(v))
            lam = float(torch.linalg.vector_norm(u))
            v = u
        if lam <= 0:
            raise ValueError("neumann: the estimated largest eigenvalue of C(A + regul·I) is "
                             "not positive; the series needs a positive definite system")
        scale = 1.0 / (1.05 * lam)
    elif not scale > 0:
        raise ValueError(f"scale must be > 0 (and < 2/λ_max for the series to converge), "
                         f"got {scale}")
    term = scale * sysm.precondition(bf)
    x = term.clone()
    for _ in range(n_terms - 1):
        term = term - scale * sysm.precondition(sysm.apply(term))
        x = x + term
    out = PVector(lc, vector_repr=x)
    if not return_info:
        return out
    info = sysm.info(x, bf, n_terms, False)
    tol = max(rtol * float(torch.linalg.vector_norm(bf)), atol)
    info.converged = info.residual_norm <= tol
    return out, info


__all__ = ["SolveInfo", "cg", "minres", "neumann", "zero_like_pvector"]
