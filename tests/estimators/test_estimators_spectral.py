"""nngeometry.estimators.top_eigenpairs (block Lanczos), spectral_density and
log_spectral_density (stochastic Lanczos quadrature), plot_spectrum: against torch.linalg.eigh of
dense matrices (random indefinite, the exact Hessian of an MLP, PMatImplicit Fishers of an MLP
and a CNN), float64."""
import math
import sys

import pytest
import torch

import nngeometry
from nngeometry.estimators import (Eigenpairs, log_spectral_density, plot_spectrum,
                                   spectral_density, top_eigenpairs)
from nngeometry.estimators._operator import random_probes
from nngeometry.object import PMatDense, PMatImplicit, PVector

from _reps_fixtures import Setup
from _linalg_fixtures import hessian_problem, sym
from _linalg_fixtures import layout as _layout

DT = torch.float64


def layout(n_in=9, n_out=6):
    return _layout(n_in, n_out)






def with_spectrum(P, values, seed=1):
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=DT)).Q
    return Q @ torch.diag(torch.as_tensor(values, dtype=DT)) @ Q.T


class CountingDense(PMatDense):
    mmap_calls = 0

    def mmap(self, pfmap):
        CountingDense.mmap_calls += 1
        return super().mmap(pfmap)


def check_pairs(r, D, expected, rtol=1e-8):
    scale = float(torch.linalg.eigvalsh(D).abs().max())
    assert isinstance(r, Eigenpairs) and r.converged
    assert float((r.eigenvalues - expected).abs().max()) <= rtol * scale, (r.eigenvalues, expected)
    U = r.eigenvectors.to_torch()[0]
    assert U.shape == (expected.numel(), D.shape[0])
    # unit, orthogonal, and eigenvectors: residuals as reported
    torch.testing.assert_close(U @ U.T, torch.eye(U.shape[0], dtype=DT), atol=1e-8, rtol=0)
    res = torch.linalg.vector_norm(U @ D - r.eigenvalues.unsqueeze(1) * U, dim=1)
    torch.testing.assert_close(res, r.residual_norms, atol=1e-9 * scale, rtol=1e-6)
    assert float(res.max()) <= 1e-6 * scale


# ---------------------------------------------------------------------- top eigenpairs
@pytest.mark.parametrize("which", ["largest", "smallest", "both"])
def test_top_eigenpairs_indefinite_dense(which):
    lc = layout()
    A = sym(lc.numel())
    ev = torch.linalg.eigvalsh(A)
    k = 3
    expected = {"largest": ev.flip(0)[:k], "smallest": ev[:k],
                "both": torch.cat([ev[:k], ev[-k:]])}[which]
    r = top_eigenpairs(PMatDense(lc, data=A), k, which=which, generator=0)
    check_pairs(r, A, expected)
    assert len(r.pvectors()) == expected.numel() and isinstance(r.pvectors()[0], PVector)


def test_top_eigenpairs_batched_and_early_on_gapped_spectrum():
    lc = layout()
    P = lc.numel()
    values = torch.cat([torch.tensor([100.0, 50.0, 30.0], dtype=DT),
                        torch.linspace(-1, 1, P - 3, dtype=DT)])
    A = with_spectrum(P, values)
    CountingDense.mmap_calls = 0
    r = top_eigenpairs(CountingDense(lc, data=A), 3, generator=1)
    check_pairs(r, A, torch.tensor([100.0, 50.0, 30.0], dtype=DT))
    assert CountingDense.mmap_calls == r.iterations  # one batched product per block
    assert r.n_matvecs == r.iterations * 5 and r.n_matvecs < P  # converged well before P


def test_top_eigenpairs_low_rank_invariant_space():
    lc = layout()
    P = lc.numel()
    g = torch.Generator().manual_seed(3)
    B = torch.randn(P, 4, generator=g, dtype=DT)
    A = B @ B.T
    r = top_eigenpairs(PMatDense(lc, data=A), 2, generator=0, block_size=4)
    check_pairs(r, A, torch.linalg.eigvalsh(A).flip(0)[:2], rtol=1e-10)


def test_hessian_both_ends():
    model, loader = hessian_problem()
    D = nngeometry.Hessian(model, loader, PMatDense).to_torch()
    ev = torch.linalg.eigvalsh(D)
    assert float(ev[0]) < 0
    H = nngeometry.Hessian(model, loader, PMatImplicit)
    r = top_eigenpairs(H, 2, which="both", generator=0)
    check_pairs(r, D, torch.cat([ev[:2], ev[-2:]]), rtol=1e-7)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_implicit_fisher(kind):
    s = Setup(kind, "classif_logits")
    M = PMatImplicit(s.lc, s.generator(), examples=s.loader)
    ev = torch.linalg.eigvalsh(s.dense)
    r = top_eigenpairs(M, 3, generator=0)
    check_pairs(r, s.dense, ev.flip(0)[:3], rtol=1e-7)


def test_top_eigenpairs_warns_and_errors():
    lc = layout()
    A = sym(lc.numel())
    with pytest.warns(RuntimeWarning, match="max_iter"):
        r = top_eigenpairs(PMatDense(lc, data=A), 2, max_iter=1, generator=0)
    assert not r.converged and r.iterations == 1
    with pytest.raises(ValueError, match="which"):
        top_eigenpairs(PMatDense(lc, data=A), 2, which="middle")
    with pytest.raises(ValueError, match="at most"):
        top_eigenpairs(PMatDense(lc, data=A), lc.numel(), which="both")
    with pytest.raises(ValueError, match="k=0"):
        top_eigenpairs(PMatDense(lc, data=A), 0)


# ---------------------------------------------------------------------- spectral density
def test_quadrature_moments_are_exact():
    """n Lanczos steps integrate polynomials of degree < 2n exactly: Σ τ θ^p = vᵀ M^p v."""
    lc = layout()
    A = sym(lc.numel(), seed=4)
    n, R = 3, 4
    sd = spectral_density(PMatDense(lc, data=A), n_lanczos=n, n_repeats=R, generator=7)
    V = random_probes(R, lc.numel(), "normal", DT, torch.device("cpu"),
                      torch.Generator().manual_seed(7))
    V = V / torch.linalg.vector_norm(V, dim=1, keepdim=True)
    for r in range(R):
        th, tau = sd.nodes[r], sd.weights[r]
        for p in range(2 * n):
            exact = V[r] @ torch.linalg.matrix_power(A, p) @ V[r]
            assert abs(float((tau * th ** p).sum() - exact)) <= 1e-9 * float(
                torch.linalg.matrix_norm(A, 2)) ** p
    assert sd.n_matvecs == n * R


def test_distinct_eigenvalues_found_exactly():
    lc = layout()
    P = lc.numel()
    values = torch.tensor([-2.0, 1.0, 3.0, 5.0], dtype=DT).repeat_interleave(
        torch.tensor([P - 30, 10, 10, 10]))
    A = with_spectrum(P, values)
    sd = spectral_density(PMatDense(lc, data=A), n_lanczos=20, n_repeats=50, generator=0)
    for th, tau in zip(sd.nodes, sd.weights):
        assert th.numel() == 4  # the Krylov space is invariant after 4 steps
        torch.testing.assert_close(th, torch.tensor([-2.0, 1.0, 3.0, 5.0], dtype=DT))
        assert abs(float(tau.sum()) - 1) < 1e-12
    # the weights of each eigenvalue average to its multiplicity / P (uniform start vectors);
    # each weight is a Beta(m/2, (P-m)/2) variable: 4 of its standard errors over 50 repeats
    W = torch.stack(sd.weights)
    for i, m in enumerate([P - 30, 10, 10, 10]):
        f = m / P
        se = math.sqrt(f * (1 - f) / (P / 2 + 1) / 50)
        assert abs(float(W[:, i].mean()) - f) <= 4 * se


def exact_density(ev, grid, sigma):
    z = (grid.unsqueeze(1) - ev.unsqueeze(0)) / sigma
    return torch.exp(-0.5 * z * z).sum(1) / (ev.numel() * sigma * math.sqrt(2 * math.pi))


def test_density_matches_exact_smoothed_spectrum():
    lc = layout()
    A = sym(lc.numel(), seed=5)
    ev = torch.linalg.eigvalsh(A)
    sd = spectral_density(PMatDense(lc, data=A), n_lanczos=lc.numel(), n_repeats=100,
                          n_points=200, kappa=8.0, margin=0.5, generator=0)
    dt = float(sd.grid[1] - sd.grid[0])
    assert abs(float(sd.density.sum()) * dt - 1) < 1e-6
    ref = exact_density(ev, sd.grid, sd.sigma)
    # sampling error of 100 repeats: about 6 % of the peak; a wrong scale or width fails
    assert float((sd.density - ref).abs().max()) <= 0.1 * float(ref.max())
    # the grid covers the spectrum with the margin
    assert float(sd.grid[0]) < float(ev[0]) and float(sd.grid[-1]) > float(ev[-1])


def test_log_density():
    lc = layout()
    P = lc.numel()
    values = torch.cat([torch.full((P // 2,), 1e-3, dtype=DT), torch.full((P - P // 2,), 10.0,
                                                                            dtype=DT)])
    values[0] = -10.0  # |λ| is used
    A = with_spectrum(P, values)
    sd = log_spectral_density(PMatDense(lc, data=A), n_lanczos=10, n_repeats=20,
                              n_points=400, epsilon=1e-6, generator=0)
    assert sd.log and sd.epsilon == 1e-6
    dt = float(sd.grid[1] - sd.grid[0])
    assert abs(float(sd.density.sum()) * dt - 1) < 1e-6
    # two peaks, at log(1e-3 + ε) and log(10 + ε), of masses about 1/2 each
    mid = 0.5 * (math.log(1e-3) + math.log(10.0))
    low = float(sd.density[sd.grid < mid].sum()) * dt
    assert abs(low - 0.5) < 0.15
    peak_lo = float(sd.grid[torch.argmax(torch.where(sd.grid < mid, sd.density, 0 * sd.density))])
    assert abs(peak_lo - math.log(1e-3 + 1e-6)) < 5 * sd.sigma
    peak_hi = float(sd.grid[torch.argmax(torch.where(sd.grid > mid, sd.density, 0 * sd.density))])
    assert abs(peak_hi - math.log(10.0 + 1e-6)) < 5 * sd.sigma


def test_implicit_fisher_density_mass_and_support():
    s = Setup("mlp", "classif_logits")
    M = PMatImplicit(s.lc, s.generator(), examples=s.loader)
    ev = torch.linalg.eigvalsh(s.dense)
    sd = spectral_density(M, n_lanczos=30, n_repeats=3, generator=0)
    assert sd.n_matvecs == 90
    allnodes = torch.cat(sd.nodes)
    # Ritz values lie inside the spectrum
    tol = 1e-8 * float(ev.abs().max())
    assert float(allnodes.min()) >= float(ev[0]) - tol
    assert float(allnodes.max()) <= float(ev[-1]) + tol
    assert abs(float(allnodes.max()) - float(ev[-1])) <= 1e-6 * float(ev[-1])  # top converges


def test_spectrum_errors_and_plot(monkeypatch):
    lc = layout()
    M = PMatDense(lc, data=sym(lc.numel()))
    with pytest.raises(ValueError, match="kappa"):
        spectral_density(M, n_lanczos=4, kappa=0.0)
    with pytest.raises(ValueError, match="n_repeats=0"):
        spectral_density(M, n_lanczos=4, n_repeats=0)
    with pytest.raises(ValueError, match="epsilon"):
        log_spectral_density(M, n_lanczos=4, epsilon=-1.0)
    with pytest.raises(TypeError, match="SpectralDensity"):
        plot_spectrum(torch.zeros(3))
    sd = spectral_density(M, n_lanczos=4, n_repeats=2, n_points=50, generator=0)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot_spectrum(sd)
    monkeypatch.undo()
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    out = plot_spectrum(sd, ax=ax)
    assert out is ax and len(ax.lines) == 1 and ax.get_yscale() == "log"
    plt.close(fig)


REPS = ["PMatDense", "PMatDiag", "PMatBlockDiag", "PMatQuasiDiag", "PMatLowRank", "PMatImplicit",
        "PMatKFAC", "PMatEKFAC", "PMatEKFACBlockDiag", "PMatMixed", "PMatEye",
        "PMatQuasiDiagInverse", "PMatEyePlusLowRank"]


@pytest.mark.parametrize("rep", REPS)
def test_every_representation(rep):
    """Every representation goes through the estimators: exact XTrace (more probes than P) and
    the top eigenpairs against its own dense matrix."""
    from nngeometry.estimators import diag_estimate, trace_estimate
    from _table_models import built
    b = built(rep)
    D = b.D
    P = D.shape[0]
    t = trace_estimate(b.M, 2 * P + 2, method="xtrace", generator=0)
    assert abs(float(t.value - torch.trace(D))) <= 1e-10 * float(D.abs().sum())
    d = diag_estimate(b.M, 2 * P + 2, method="xdiag", generator=0)
    assert float((d.value.get_flat_representation() - D.diagonal()).abs().max()) <= \
        1e-10 * float(D.abs().max())
    r = top_eigenpairs(b.M, 2, generator=0)
    check_pairs(r, D, torch.linalg.eigvalsh(D).flip(0)[:2])
