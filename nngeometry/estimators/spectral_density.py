"""Spectral densities by stochastic Lanczos quadrature (Golub & Meurant; Ghorbani, Krishnan & Xiao
2019; Papyan 2020), and a plotting helper.

The spectral density of a symmetric ``P × P`` matrix ``M`` with eigenpairs ``(λ_i, u_i)``,
smoothed by a Gaussian kernel ``g_σ``, is ``φ(t) = (1/P) Σ_i g_σ(t - λ_i)``. For a random unit
vector ``v`` (uniform on the sphere), ``E[vᵀ g_σ(t - M) v] = φ(t)``, and ``n`` Lanczos steps from
``v`` give the Gauss quadrature ``vᵀ f(M) v ≈ Σ_j τ_j f(θ_j)`` (``θ_j`` the eigenvalues of the
tridiagonal ``T``, ``τ_j`` the squared first components of its eigenvectors; exact for
polynomials of degree ``< 2n``, and for every ``f`` once ``n`` reaches the number of distinct
eigenvalues). The estimate averages ``n_repeats`` independent start vectors:
``φ̂(t) = (1/R) Σ_r Σ_j τ_{rj} g_σ(t - θ_{rj})``, a density of total mass 1 (each run's weights
sum to 1). The ``R`` runs advance together: each Lanczos step is one batched product of ``R``
vectors.

Grid and kernel: ``n_points`` equispaced points on ``[θ_min - m, θ_max + m]`` with
``m = margin · (θ_max - θ_min)`` over all nodes; the kernel's standard deviation is
``σ = kappa × grid spacing`` (``kappa`` sets the resolution in grid points).

The log variant (Papyan 2020) shows spectra spanning many orders of magnitude: the density of
``log(|λ| + ε)``, smoothed in that variable: nodes ``log(|θ_{rj}| + ε)``, same weights.
"""
import math
from dataclasses import dataclass

import torch

from ._operator import Operator, check_count, random_probes
from .lanczos import lanczos_tridiagonal, tridiagonal_nodes_weights
from .trace import _generator


@dataclass
class SpectralDensity:
    """A smoothed spectral density.

    Attributes:
        grid: ``(n_points,)`` the points ``t`` (eigenvalues, or ``log(|λ| + ε)`` for the log
            variant).
        density: ``(n_points,)`` ``φ̂(t)``; integrates to 1 over the real line.
        nodes, weights: lists (one per repeat) of the quadrature nodes (same variable as ``grid``)
            and weights.
        sigma: the kernel's standard deviation.
        n_matvecs: products with ``M`` used.
        log: whether this is the density of ``log(|λ| + ε)``; ``epsilon`` the ``ε`` used.
    """

    grid: torch.Tensor
    density: torch.Tensor
    nodes: list
    weights: list
    sigma: float
    n_matvecs: int
    log: bool = False
    epsilon: float = None


def _run(M, n_lanczos, n_repeats, generator, batch_size, verbose=False):
    op = Operator(M, batch_size=batch_size, verbose=verbose, total=n_lanczos * n_repeats,
                  desc="Lanczos")
    check_count("n_lanczos", n_lanczos, 1, "it is the number of Lanczos steps")
    check_count("n_repeats", n_repeats, 1, "it is the number of random start vectors")
    gen = _generator(generator, op.device)
    starts = random_probes(n_repeats, op.P, "normal", op.dtype, op.device, gen)
    A, B, lengths = lanczos_tridiagonal(op, n_lanczos, starts)
    nodes, weights = tridiagonal_nodes_weights(A, B, lengths)
    op.close()
    return op, nodes, weights


def _smooth(nodes, weights, n_points, kappa, margin):
    check_count("n_points", n_points, 2, "the grid needs two points")
    if not kappa > 0:
        raise ValueError(f"kappa must be > 0 (the kernel width in grid steps), got {kappa}")
    allnodes = torch.cat(nodes)
    lo, hi = float(allnodes.min()), float(allnodes.max())
    width = hi - lo if hi > lo else max(abs(hi), 1.0)
    lo, hi = lo - margin * width, hi + margin * width
    grid = torch.linspace(lo, hi, n_points, dtype=allnodes.dtype, device=allnodes.device)
    sigma = kappa * (hi - lo) / (n_points - 1)
    density = torch.zeros_like(grid)
    for th, tau in zip(nodes, weights):
        z = (grid.unsqueeze(1) - th.unsqueeze(0)) / sigma
        density += (torch.exp(-0.5 * z * z) * tau).sum(1)
    density /= len(nodes) * sigma * math.sqrt(2 * math.pi)
    return grid, density, sigma


def spectral_density(M, n_lanczos=64, n_repeats=4, n_points=1024, kappa=3.0, margin=0.05,
                     generator=None, batch_size=None, verbose=False):
    """The smoothed spectral density of ``M`` by stochastic Lanczos quadrature (module
    docstring).

    Args:
        M: any parameter-space matrix (or object with ``mv`` and ``layer_collection``);
            symmetric, possibly indefinite.
        n_lanczos: Lanczos steps per start vector (at most ``P``), each one product.
        n_repeats: independent start vectors ``R`` (averaged; all advanced together, one batched
            product of ``R`` vectors per step).
        n_points: grid size.
        kappa: kernel standard deviation in grid steps.
        margin: the grid extends beyond the extreme nodes by this fraction of their range.
        generator: ``torch.Generator`` or int seed of the start vectors.
        batch_size: at most this many vectors per product call.
        verbose: show a progress bar over the products.

    Returns a `SpectralDensity` (``grid``, ``density``, the nodes and weights).
    """
    op, nodes, weights = _run(M, n_lanczos, n_repeats, generator, batch_size, verbose)
    grid, density, sigma = _smooth(nodes, weights, n_points, kappa, margin)
    return SpectralDensity(grid=grid, density=density, nodes=nodes, weights=weights, sigma=sigma,
                           n_matvecs=op.n_matvecs)


def log_spectral_density(M, n_lanczos=64, n_repeats=4, n_points=1024, kappa=3.0, margin=0.05,
                         epsilon=None, generator=None, batch_size=None, verbose=False):
    """The smoothed density of ``log(|λ| + ε)`` over the eigenvalues ``λ`` of ``M``, by the
    same quadrature (module docstring): for spectra spanning orders of magnitude.

    Args: as [`spectral_density`][nngeometry.estimators.spectral_density]; ``epsilon``: the ``ε`` (default ``1e-5 · max|θ|``: the
    eigenvalues below it pile up at ``log ε``).
    """
    op, nodes, weights = _run(M, n_lanczos, n_repeats, generator, batch_size, verbose)
    if epsilon is None:
        epsilon = 1e-5 * max(float(torch.cat(nodes).abs().max()), torch.finfo(nodes[0].dtype).tiny)
    elif not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    log_nodes = [torch.log(th.abs() + epsilon) for th in nodes]
    grid, density, sigma = _smooth(log_nodes, weights, n_points, kappa, margin)
    return SpectralDensity(grid=grid, density=density, nodes=log_nodes, weights=weights,
                           sigma=sigma, n_matvecs=op.n_matvecs, log=True, epsilon=epsilon)


def plot_spectrum(density, ax=None, log_scale_y=True, **plot_kwargs):
    """Plot a `SpectralDensity` with matplotlib (optional dependency) on ``ax`` (default
    the current axes); the y axis in log scale by default (densities span orders of magnitude).
    Returns the axes."""
    try:
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("plot_spectrum needs matplotlib, an optional dependency: install it "
                          "with `pip install matplotlib`") from e
    if not isinstance(density, SpectralDensity):
        raise TypeError(f"plot_spectrum takes a SpectralDensity (from spectral_density or "
                        f"log_spectral_density), got {type(density).__name__}")
    if ax is None:
        ax = plt.gca()
    ax.plot(density.grid.detach().cpu().numpy(), density.density.detach().cpu().numpy(),
            **plot_kwargs)
    if log_scale_y:
        ax.set_yscale("log")
    ax.set_xlabel("log(|λ| + ε)" if density.log else "eigenvalue λ")
    ax.set_ylabel("density")
    return ax
