"""Eigenpairs of a symmetric parameter-space matrix from products only: block Lanczos with full
reorthogonalisation and Rayleigh-Ritz.

Starting from a random orthonormal block ``X₀`` of ``b`` vectors, the Krylov space
``K_j = span(X₀, M X₀, ..., M^{j-1} X₀)`` is built one block at a time: each new block is
``M`` applied to the previous one (one batched ``mmap`` of ``b`` vectors: one pass over the
data for ``PMatImplicit``), orthogonalised twice against the whole basis (full
reorthogonalisation: no spurious copies of converged eigenvalues) and orthonormalised, dropping
directions already in the space. With ``V`` the orthonormal basis (rows) and ``W = M V``, the Ritz
pairs are the eigenpairs ``(θ, s)`` of ``H = V Wᵀ`` (``= V M Vᵀ``), the Ritz vectors ``u = Vᵀ s``,
and each pair's residual ``‖M u - θ u‖ = ‖Wᵀ s - θ u‖`` bounds the distance from ``θ`` to the
spectrum. The iteration stops when the wanted pairs' residuals are all below
``tol · max|θ|``, or when the Krylov space is invariant (then the pairs are exact).
"""
import math
import warnings
from dataclasses import dataclass

import torch

from ..object.map import PFMapDense
from ..object.vector import PVector
from ._operator import Operator, check_count, random_probes
from .trace import _generator


@dataclass
class Eigenpairs:
    """Eigenpairs from [`top_eigenpairs`][nngeometry.estimators.top_eigenpairs].

    Attributes:
        eigenvalues: ``(k,)`` tensor (``'largest'``: decreasing; ``'smallest'``: increasing;
            ``'both'``: ``2k`` values, increasing: the ``k`` smallest then the ``k`` largest).
        eigenvectors: a ``PFMapDense`` of shape ``(1, k, P)``: row ``i`` is the unit eigenvector
            of ``eigenvalues[i]`` (``pvectors()`` gives them as PVectors).
        residual_norms: ``(k,)``: ``‖M u_i - λ_i u_i‖``; ``|λ_i - λ| ≤`` that for some true
            eigenvalue ``λ``.
        n_matvecs: products with ``M`` used.
        iterations: blocks built.
        converged: whether every residual met the tolerance (or the space became invariant).
    """

    eigenvalues: torch.Tensor
    eigenvectors: PFMapDense
    residual_norms: torch.Tensor
    n_matvecs: int
    iterations: int
    converged: bool

    def pvectors(self):
        lc = self.eigenvectors.layer_collection
        return [PVector(lc, vector_repr=row) for row in self.eigenvectors.to_torch()[0]]


def _orthonormal_new(X, V, rel_tol):
    """Rows of ``X`` made orthogonal to the rows of ``V`` (twice: classical Gram-Schmidt loses
    orthogonality once) and orthonormal among themselves; directions whose norm falls below
    ``rel_tol`` times the block's largest norm are dropped (already in the space)."""
    scale = float(torch.linalg.vector_norm(X, dim=1).max()) if X.numel() else 0.0
    for _ in range(2):
        if V.shape[0]:
            X = X - (X @ V.T) @ V
    if scale == 0.0 or X.shape[0] == 0:
        return X[:0]
    U, sv, _ = torch.linalg.svd(X.T, full_matrices=False)
    keep = sv > rel_tol * scale
    out = U[:, keep].T
    if V.shape[0] and out.shape[0]:
        out = out - (out @ V.T) @ V  # the SVD's rounding, once more
        out = out / torch.linalg.vector_norm(out, dim=1, keepdim=True)
    return out


def _select(theta, k, which):
    n = theta.numel()
    if which == "largest":
        return torch.arange(n - 1, n - 1 - min(k, n), -1)
    if which == "smallest":
        return torch.arange(min(k, n))
    idx = sorted(set(range(min(k, n))) | set(range(max(n - k, 0), n)))
    return torch.tensor(idx, dtype=torch.long)


def top_eigenpairs(M, k, which="largest", tol=None, max_iter=None, block_size=None,
                   generator=None, batch_size=None, verbose=False):
    """The ``k`` extreme eigenvalues and eigenvectors of a symmetric matrix ``M`` by block
    Lanczos (module docstring).

    Args:
        M: any parameter-space matrix (``PMat*``, e.g. ``PMatImplicit`` of a Fisher or a
            Hessian), or any object with ``mv`` and a ``layer_collection``; symmetric, possibly
            indefinite.
        k: how many eigenpairs (per end for ``'both'``).
        which: ``'largest'`` (algebraically), ``'smallest'``, or ``'both'`` (the ``k`` smallest
            and the ``k`` largest: e.g. the most negative and most positive curvatures of a
            Hessian).
        tol: stop when every wanted residual ``‖M u - θ u‖ ≤ tol · max|θ|`` (default
            ``√eps``: 1.5e-8 in float64; the eigenvalue error is then below that and usually
            about its square over the gap).
        max_iter: most blocks (default: enough to span the whole space, ``⌈P / b⌉``, capped
            at 100). A ``RuntimeWarning`` tells when it stops before ``tol``.
        block_size: vectors per block ``b`` (default the number wanted plus 2, at most ``P``):
            each block is one batched product.
        generator: ``torch.Generator`` or int seed of the random start block.
        batch_size: at most this many vectors per product call.
        verbose: show a progress bar over the products.

    Returns an `Eigenpairs`. Cost: ``b`` products per iteration, memory ``2 × (basis
    size) × P``.
    """
    op = Operator(M, batch_size=batch_size, verbose=verbose, desc="block Lanczos")
    P = op.P
    if which not in ("largest", "smallest", "both"):
        raise ValueError(f"unknown which='{which}': use 'largest', 'smallest' or 'both'")
    check_count("k", k, 1, "it is the number of eigenpairs")
    n_want = k if which != "both" else 2 * k
    if n_want > P:
        raise ValueError(f"k={k} asks for {n_want} eigenpairs of a {P} × {P} matrix: at most "
                         f"{P}; use M.to_torch() and torch.linalg.eigh for the whole spectrum")
    b = block_size if block_size is not None else min(P, n_want + 2)
    check_count("block_size", b, 1, "it is the number of vectors per block")
    if max_iter is None:
        max_iter = min(math.ceil(P / b), 100)
    check_count("max_iter", max_iter, 1, "it is the number of blocks")
    eps = torch.finfo(op.dtype).eps
    if tol is None:
        tol = eps ** 0.5
    gen = _generator(generator, op.device)
    V = torch.zeros(0, P, dtype=op.dtype, device=op.device)
    W = torch.zeros_like(V)
    X = _orthonormal_new(random_probes(b, P, "normal", op.dtype, op.device, gen), V, eps ** 0.75)
    iterations, converged = 0, False
    while True:
        Y = op.matmat(X)
        V, W = torch.cat([V, X]), torch.cat([W, Y])
        iterations += 1
        H = V @ W.T
        theta, S = torch.linalg.eigh((H + H.T) / 2)
        sel = _select(theta, n_want if which != "both" else k, which)
        Ssel = S[:, sel]
        U = Ssel.T @ V
        res = torch.linalg.vector_norm(Ssel.T @ W - theta[sel].unsqueeze(1) * U, dim=1)
        scale = float(theta.abs().max()) or 1.0
        if bool((res <= tol * scale).all()):
            converged = True
            break
        X = _orthonormal_new(Y, V, eps ** 0.75)
        if X.shape[0] == 0:  # invariant subspace: the Ritz pairs are exact
            converged = True
            break
        if iterations >= max_iter:
            break
    if not converged:
        warnings.warn(
            f"top_eigenpairs: stopped after {iterations} blocks ({op.n_matvecs} products) with "
            f"residuals up to {float(res.max() / scale):.1e} × max|θ| > tol={tol:.1e}; raise "
            "max_iter or block_size, or loosen tol", RuntimeWarning)
    lam = theta[sel]
    op.close()
    return Eigenpairs(eigenvalues=lam, eigenvectors=PFMapDense(op.layer_collection,
                                                               data=U.unsqueeze(0)),
                      residual_norms=res, n_matvecs=op.n_matvecs, iterations=iterations,
                      converged=converged)


def lanczos_tridiagonal(op, n_steps, starts):
    """Lanczos with full reorthogonalisation from each row of ``starts`` ``(R, P)`` (normalised
    here), all ``R`` recurrences advanced together: one batched product of ``R`` vectors per
    step. Returns ``(alphas (R, n), betas (R, n - 1), lengths (R,))``: the tridiagonal matrices
    ``T_r = tridiag(β, α, β)`` of the Krylov spaces, truncated to ``lengths[r]`` when the
    space of repeat ``r`` became invariant (then ``T_r``'s eigenvalues are exact eigenvalues)."""
    R, P = starts.shape
    n_steps = min(n_steps, P)
    q = starts / torch.linalg.vector_norm(starts, dim=1, keepdim=True)
    Q = [q]
    alphas, betas = [], []
    lengths = torch.full((R,), n_steps, dtype=torch.long)
    alive = torch.ones(R, dtype=torch.bool, device=starts.device)
    eps = torch.finfo(starts.dtype).eps
    norm_scale = torch.zeros(R, dtype=starts.dtype, device=starts.device)
    for j in range(n_steps):
        w = op.matmat(Q[j])
        a = (Q[j] * w).sum(1)
        alphas.append(a)
        if j == n_steps - 1:
            break
        Qs = torch.stack(Q)  # (j+1, R, P)
        for _ in range(2):  # full reorthogonalisation (also removes α q_j and β q_{j-1})
            w = w - torch.einsum("jr,jrp->rp", torch.einsum("jrp,rp->jr", Qs, w), Qs)
        beta = torch.linalg.vector_norm(w, dim=1)
        norm_scale = torch.maximum(norm_scale, a.abs() + beta)
        ended = alive & (beta <= eps ** 0.75 * norm_scale.clamp(min=torch.finfo(starts.dtype).tiny))
        lengths[ended.cpu()] = j + 1
        alive = alive & ~ended
        betas.append(torch.where(alive, beta, torch.zeros_like(beta)))
        safe = torch.where(alive, beta, torch.ones_like(beta))
        Q.append(torch.where(alive.unsqueeze(1), w / safe.unsqueeze(1), torch.zeros_like(w)))
    A = torch.stack(alphas, dim=1)
    B = torch.stack(betas, dim=1) if betas else A[:, :0]
    return A, B, lengths


def tridiagonal_nodes_weights(alphas, betas, lengths):
    """Gauss quadrature nodes and weights of each Lanczos run: the eigenvalues ``θ`` of ``T_r``
    and the squared first components ``τ`` of its eigenvectors (``Σ τ = 1``), so that
    ``vᵀ f(M) v ≈ Σ_j τ_j f(θ_j)`` for the unit start vector ``v`` (exact for polynomials of
    degree < 2 × length)."""
    nodes, weights = [], []
    for a, bt, n in zip(alphas, betas, lengths.tolist()):
        T = torch.diag(a[:n])
        if n > 1:
            T = T + torch.diag(bt[:n - 1], 1) + torch.diag(bt[:n - 1], -1)
        th, S = torch.linalg.eigh(T)
        nodes.append(th)
        weights.append(S[0] ** 2)
    return nodes, weights
