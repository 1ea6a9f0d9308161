"""nngeometry.solve: cg (upstream's behaviour, plus return_info), MINRES on indefinite matrices
(random symmetric, the exact Hessian of an MLP), the truncated Neumann series against its closed
form, preconditioners (Diag, KFAC, callables), all against torch.linalg.solve in float64."""
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import nngeometry
from nngeometry import FIM
from nngeometry.object import PMatDense, PMatDiag, PMatImplicit, PMatKFAC, PVector
from nngeometry.solve import SolveInfo, cg, minres, neumann
from _linalg_fixtures import hessian_problem, sym
from _linalg_fixtures import layout as _layout

DT = torch.float64
# small matrices: one BLAS thread (several degrade badly on a busy machine)
pytestmark = pytest.mark.usefixtures("one_thread")


def layout(n_in=4, n_out=3):
    return _layout(n_in, n_out)






def spd(P, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(P, P, generator=g, dtype=DT)
    return A @ A.T / P + 0.1 * torch.eye(P, dtype=DT)


def rhs(lc, seed=1):
    g = torch.Generator().manual_seed(seed)
    return PVector(lc, vector_repr=torch.randn(lc.numel(), generator=g, dtype=DT))


def flat(v):
    return v.get_flat_representation()


def rel_err(x, ref):
    return float(torch.linalg.vector_norm(x - ref) / torch.linalg.vector_norm(ref))


def test_cg_info():
    lc = layout()
    A = spd(lc.numel())
    b = rhs(lc)
    x, info = cg(PMatDense(lc, data=A), b, regul=0.1, rtol=1e-10, return_info=True)
    ref = torch.linalg.solve(A + 0.1 * torch.eye(lc.numel(), dtype=DT), flat(b))
    assert rel_err(flat(x), ref) < 1e-8
    assert isinstance(info, SolveInfo) and info.converged
    assert 1 <= info.iterations <= lc.numel() + 2
    assert info.n_matvecs == info.iterations + 1  # + the residual check
    assert info.relative_residual < 1e-9
    # without return_info: the PVector alone (upstream's return type), same numbers
    x2 = cg(PMatDense(lc, data=A), b, regul=0.1, rtol=1e-10)
    assert isinstance(x2, PVector) and torch.equal(flat(x2), flat(x))
    _, info = cg(PMatDense(lc, data=A), b, regul=0.1, rtol=1e-14, max_iter=2, return_info=True)
    assert info.iterations == 2 and not info.converged and info.relative_residual > 1e-6


@pytest.mark.parametrize("precondition", [False, True])
def test_minres_indefinite(precondition):
    lc = layout()
    P = lc.numel()
    A = sym(P, seed=3)
    assert float(torch.linalg.eigvalsh(A).min()) < 0 < float(torch.linalg.eigvalsh(A).max())
    b = rhs(lc)
    M = PMatDiag(lc, data=A.diagonal().abs() + 1.0) if precondition else None
    for regul in (0.0, 0.3):
        x, info = minres(PMatDense(lc, data=A), b, regul=regul, rtol=1e-12, M=M,
                         return_info=True)
        ref = torch.linalg.solve(A + regul * torch.eye(P, dtype=DT), flat(b))
        assert rel_err(flat(x), ref) < 1e-8, (regul, info)
        assert info.converged and info.iterations <= P + 2
    ref = torch.linalg.solve(A, flat(b))
    # from a starting point, and stopped early
    x0 = PVector(lc, vector_repr=torch.ones(P, dtype=DT))
    x = minres(PMatDense(lc, data=A), b, x0=x0, rtol=1e-12)
    assert rel_err(flat(x), ref) < 1e-8
    _, info = minres(PMatDense(lc, data=A), b, max_iter=2, rtol=1e-14, return_info=True)
    assert info.iterations == 2 and not info.converged


def test_minres_residual_decreases_monotonically():
    lc = layout()
    A = sym(lc.numel(), seed=4)
    b = rhs(lc)
    res = [minres(PMatDense(lc, data=A), b, max_iter=k, rtol=0, return_info=True)[1].residual_norm
           for k in range(1, 10)]
    assert all(r2 <= r1 * (1 + 1e-12) for r1, r2 in zip(res, res[1:])), res


def test_minres_on_hessian_implicit():
    model, loader = hessian_problem()
    D = nngeometry.Hessian(model, loader, PMatDense).to_torch()
    assert float(torch.linalg.eigvalsh(D).min()) < 0
    H = nngeometry.Hessian(model, loader, PMatImplicit)
    b = rhs(H.layer_collection)
    regul = 0.05
    x, info = minres(H, b, regul=regul, rtol=1e-10, return_info=True)
    ref = torch.linalg.solve(D + regul * torch.eye(D.shape[0], dtype=DT), flat(b))
    assert rel_err(flat(x), ref) < 1e-7, info
    assert info.converged


def test_minres_rejects_indefinite_preconditioner():
    lc = layout()
    A = sym(lc.numel(), seed=3)
    bad = PMatDiag(lc, data=-torch.ones(lc.numel(), dtype=DT))
    with pytest.raises(ValueError, match="positive definite"):
        minres(PMatDense(lc, data=A), rhs(lc), M=bad)


@pytest.mark.parametrize("n_terms", [1, 5, 40])
def test_neumann_matches_closed_form(n_terms):
    lc = layout()
    P = lc.numel()
    A = spd(P, seed=5)
    b = rhs(lc)
    alpha = 0.8 / float(torch.linalg.eigvalsh(A).max())
    x = neumann(PMatDense(lc, data=A), b, scale=alpha, n_terms=n_terms)
    # x_K = α Σ_{j<K} (I - αA)^j b = (I - (I - αA)^K) A⁻¹ b
    T = torch.eye(P, dtype=DT) - alpha * A
    ref = (torch.eye(P, dtype=DT) - torch.linalg.matrix_power(T, n_terms)) @ torch.linalg.solve(
        A, flat(b))
    assert rel_err(flat(x), ref) < 1e-10


def test_neumann_converges_with_estimated_scale_and_preconditioner():
    lc = layout()
    P = lc.numel()
    A = spd(P, seed=6)
    b = rhs(lc)
    regul = 0.5
    ref = torch.linalg.solve(A + regul * torch.eye(P, dtype=DT), flat(b))
    x, info = neumann(PMatDense(lc, data=A), b, regul=regul, n_terms=400, rtol=1e-8,
                      return_info=True)
    assert rel_err(flat(x), ref) < 1e-7 and info.converged
    assert info.n_matvecs == 30 + 399 + 1
    # an exact preconditioner: the first term is already the solution
    C = PMatDense(lc, data=A)  # applied as C.solve(r, regul) = (A + regul I)⁻¹ r
    x, info = neumann(PMatDense(lc, data=A), b, regul=regul, scale=1.0, n_terms=3, M=C,
                      rtol=1e-10, return_info=True)
    assert rel_err(flat(x), ref) < 1e-10 and info.converged
    # too large a scale diverges: reported, not hidden
    lam = float(torch.linalg.eigvalsh(A).max()) + regul
    _, info = neumann(PMatDense(lc, data=A), b, regul=regul, scale=3.0 / lam, n_terms=50,
                      return_info=True)
    assert not info.converged and info.relative_residual > 1.0
    with pytest.raises(ValueError, match="scale"):
        neumann(PMatDense(lc, data=A), b, scale=-1.0)
    with pytest.raises(ValueError, match="n_terms"):
        neumann(PMatDense(lc, data=A), b, n_terms=0)


def test_preconditioned_cg_on_cnn_exact_fisher():
    """CG on a CNN's exact Fisher (PMatImplicit), plain, Jacobi (PMatDiag) and KFAC
    preconditioned: all reach the solution. At this damping (1e-2 λmax) the unpreconditioned CG
    needs the fewest iterations (the Fisher's fast-decaying spectrum: few eigenvalues above λ);
    the regime where KFAC wins is tested below (see docs/estimators.md)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Conv2d(3, 2, 2), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8, 3)).to(DT)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 2, 5, 5, generator=g, dtype=DT)
    loader = DataLoader(TensorDataset(x, torch.zeros(60, dtype=torch.long)), batch_size=30)
    F = FIM(model, loader, PMatImplicit, variant="classif_logits")
    D = F.to_torch(allow_dense=True)
    K = FIM(model, loader, PMatKFAC, variant="classif_logits")
    J = FIM(model, loader, PMatDiag, variant="classif_logits")
    b = rhs(F.layer_collection)
    regul = 1e-2 * float(torch.linalg.eigvalsh(D).max())
    ref = torch.linalg.solve(D + regul * torch.eye(D.shape[0], dtype=DT), flat(b))
    counts = {}
    for name, pre in (("none", None), ("diag", J), ("kfac", K)):
        x, info = cg(F, b, regul=regul, rtol=1e-8, M=pre, return_info=True)
        assert rel_err(flat(x), ref) < 1e-6 and info.converged, name
        counts[name] = info.iterations
    assert all(1 < c < D.shape[0] for c in counts.values()), counts


def _relu_cnn_fisher(n=600):
    """A ReLU CNN (110 parameters) on inputs of mean 2 (as unnormalised images): its exact
    Fisher (Dense), KFAC and EKFAC with the diagonal refitted to the same data."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Conv2d(3, 2, 2), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8, 3)).to(DT)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, 5, 5, generator=g, dtype=DT) + 2.0
    loader = DataLoader(TensorDataset(x, torch.zeros(n, dtype=torch.long)), batch_size=300)
    F = FIM(model, loader, PMatDense, variant="classif_logits")
    K = FIM(model, loader, PMatKFAC, variant="classif_logits")
    E = FIM(model, loader, nngeometry.object.PMatEKFAC, variant="classif_logits")
    E.update_diag(loader)
    return F, K, E


def test_kfac_preconditioned_cg_wins_at_small_damping():
    """KFAC preconditioning cuts CG's iterations on a CNN's exact Fisher at small dampings
    (≤ 1e-4 λmax), and the representation is applied exactly damped, (K + λI)⁻¹, which needs
    fewer iterations than its π-damping. Measured (rtol 1e-8): none / KFAC exact / KFAC π /
    EKFAC refit = 166 / 98 / 115 / 96 at 1e-4 λmax, 202 / 124 / 149 / 121 at 1e-5 λmax."""
    F, K, E = _relu_cnn_fisher()
    D = F.to_torch()
    lmax = float(torch.linalg.eigvalsh(D).max())
    b = rhs(F.layer_collection)
    for rel in (1e-4, 1e-5):
        regul = rel * lmax
        ref = torch.linalg.solve(D + regul * torch.eye(D.shape[0], dtype=DT), flat(b))
        counts = {}
        for name, pre in (("none", None), ("kfac", K), ("ekfac", E),
                          ("kfac_pi", lambda r, regul=regul: K.solve(r, regul=regul))):
            x, info = cg(F, b, regul=regul, rtol=1e-8, M=pre, return_info=True)
            assert rel_err(flat(x), ref) < 1e-5 and info.converged, (rel, name)
            counts[name] = info.iterations
        assert counts["kfac"] < 0.8 * counts["none"], (rel, counts)
        assert counts["ekfac"] < 0.8 * counts["none"], (rel, counts)
        assert counts["kfac"] < counts["kfac_pi"], (rel, counts)


def test_kfac_preconditioner_is_exactly_damped():
    """cg applies a PMatKFAC preconditioner as (K + λI)⁻¹: with A = K itself, one iteration."""
    F, K, _ = _relu_cnn_fisher(n=60)
    KD = PMatDense(K.layer_collection, data=K.to_torch())
    b = rhs(F.layer_collection)
    _, info = cg(KD, b, regul=1e-3, rtol=1e-9, M=K, return_info=True)
    assert info.iterations == 1 and info.converged
    _, info = cg(KD, b, regul=1e-3, rtol=1e-9, M=lambda r: K.solve(r, regul=1e-3),
                 return_info=True)
    assert info.iterations > 1  # π-damping is another matrix


def test_callable_preconditioner_and_errors():
    lc = layout()
    A = spd(lc.numel(), seed=7)
    b = rhs(lc)
    inv = torch.linalg.inv(A + 0.2 * torch.eye(lc.numel(), dtype=DT))
    x, info = cg(PMatDense(lc, data=A), b, regul=0.2, rtol=1e-12,
                 M=lambda r: PVector(lc, vector_repr=inv @ flat(r)), return_info=True)
    assert info.iterations == 1
    with pytest.raises(TypeError, match="preconditioner"):
        cg(PMatDense(lc, data=A), b, M=3.0)
    with pytest.raises(TypeError, match="PVector"):
        minres(PMatDense(lc, data=A), flat(b))
