"""Priors of the Laplace approximation: laplace-torch's 1-D forms (one precision per parameter
tensor, per parameter), a prior mean, the per-tensor and diagonal evidence maximisation and the
grid search, against dense float64 brute force."""
import math

import pytest
import torch
import torch.nn.functional as tF
from torch import nn

from nngeometry.laplace import Laplace
from nngeometry.object import PMatDense, PMatDiag, PMatKFAC

from brute import fim_dense, per_example_jacobian

DT = torch.float64


def _problem(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    x, y = torch.randn(20, 3, dtype=DT), torch.randint(0, 3, (20,))
    return model, x, y


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _lml(model, x, y, prior_diag, mean=0.0):
    F = fim_dense(model, x)
    H = len(y) * F + torch.diag(prior_diag)
    d = _flat(model) - mean
    loglik = -tF.cross_entropy(model(x).detach(), y, reduction="sum")
    return loglik - 0.5 * (prior_diag * d ** 2).sum() - 0.5 * (torch.logdet(H) - torch.log(prior_diag).sum())


def _expand(model, per_tensor):
    return torch.cat([torch.full((p.numel(),), float(v), dtype=DT)
                      for p, v in zip(model.parameters(), per_tensor)])


@pytest.mark.parametrize("rep", [PMatDense, PMatDiag], ids=lambda r: r.__name__)
def test_per_tensor_and_per_parameter_priors_and_prior_mean(rep):
    model, x, y = _problem()
    la = Laplace(model, "classification", rep).fit((x, y))
    lam = torch.tensor([0.5, 1.5, 2.0, 0.3], dtype=DT)  # W1, b1, W2, b2
    diag = _expand(model, lam)
    ref = _lml(model, x, y, diag) if rep is PMatDense else None
    got = la.log_marginal_likelihood(lam)
    if rep is PMatDense:
        assert torch.allclose(got, ref, rtol=1e-10)
    # the same as a per-parameter tensor of length P
    assert torch.allclose(la.log_marginal_likelihood(diag), got, rtol=1e-12)
    assert torch.equal(la.prior_precision_diag(lam), diag)
    m = 0.2 * torch.randn(len(diag), generator=torch.Generator().manual_seed(1), dtype=DT)
    la.prior_mean = m
    shift = la.log_marginal_likelihood(lam) - got
    d0, d1 = _flat(model), _flat(model) - m
    assert torch.allclose(shift, -0.5 * ((diag * d1 ** 2).sum() - (diag * d0 ** 2).sum()), rtol=1e-10)
    with pytest.raises(ValueError, match="prior_mean"):
        la.prior_mean = torch.zeros(5, dtype=DT)
        la.log_marginal_likelihood()
    with pytest.raises(ValueError, match="one per parameter tensor"):
        la.log_marginal_likelihood(torch.ones(5, dtype=DT))


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_kfac_with_a_prior_per_tensor_is_exact(likelihood):
    """weight ≠ bias precisions on KFAC: H = n/σ² · KFAC + diag(Λ) exactly (log det, its
    gradients in the four precisions and σ, the GLM variance, H⁻¹), against dense algebra on
    the same KFAC matrix."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    x = torch.randn(20, 3, dtype=DT)
    y = torch.randint(0, 3, (20,)) if likelihood == "classification" else torch.randn(20, 3, dtype=DT)
    la = Laplace(model, likelihood, PMatKFAC).fit((x, y))
    lam = torch.tensor([0.5, 1.7, 2.0, 0.3], dtype=DT, requires_grad=True)
    sig = torch.tensor(0.8 if likelihood == "regression" else 1.0, dtype=DT, requires_grad=True)
    args = (lam, sig) if likelihood == "regression" else (lam,)
    got = la.log_marginal_likelihood(*args)
    g_got = torch.autograd.grad(got, args)
    M = la.ggn.to_torch()
    theta = _flat(model)
    f = model(x).detach()

    def brute(lam, sig):
        sig = torch.as_tensor(sig, dtype=DT)
        diag = torch.repeat_interleave(lam, torch.tensor([p.numel() for p in model.parameters()]))
        H = len(y) / sig ** 2 * M + torch.diag(diag)
        if likelihood == "classification":
            loglik = -tF.cross_entropy(f, y, reduction="sum")
        else:
            loglik = -0.5 * ((f - y) ** 2).sum() / sig ** 2 - 0.5 * f.numel() * torch.log(2 * math.pi * sig ** 2)
        return loglik - 0.5 * (diag * theta ** 2).sum() - 0.5 * (torch.logdet(H) - torch.log(diag).sum()), H

    ref, _ = brute(*args) if likelihood == "regression" else brute(lam, 1.0)
    g_ref = torch.autograd.grad(ref, args)
    assert torch.allclose(got, ref, rtol=1e-11)
    for a, b in zip(g_got, g_ref):
        assert torch.allclose(a, b, rtol=1e-9)
    la.prior_precision = lam.detach()
    if likelihood == "regression":
        la.sigma_noise = 0.8
    _, H = brute(lam.detach(), 0.8 if likelihood == "regression" else 1.0)
    assert torch.allclose(la.posterior_covariance, torch.linalg.inv(H), rtol=1e-9, atol=1e-13)
    xs = torch.randn(4, 3, dtype=DT)
    J = per_example_jacobian(model, xs)
    var = torch.einsum("ikp,pq,ilq->ikl", J, torch.linalg.inv(H), J)
    assert torch.allclose(la.functional_variance(xs), var, rtol=1e-9, atol=1e-13)
    with pytest.raises(NotImplementedError, match="weight and bias"):
        la.sample(2)
    # a prior differing inside a tensor has no exact form on KFAC
    with pytest.raises(NotImplementedError, match="KFAC takes one precision"):
        la.log_marginal_likelihood(0.5 + torch.rand(la.layer_collection.numel(), dtype=DT))


@pytest.mark.parametrize("structure,rep", [("layerwise", PMatDense), ("diag", PMatDiag)])
def test_prior_structures_reach_a_stationary_point(structure, rep):
    model, x, y = _problem(2)
    la = Laplace(model, "classification", rep).fit((x, y))
    lam = la.optimize_prior_precision(prior_structure=structure, n_steps=250, lr=0.1)
    assert lam.shape == ((4,) if structure == "layerwise" else (la.layer_collection.numel(),))
    t = lam.clone().requires_grad_(True)
    g, = torch.autograd.grad(la.log_marginal_likelihood(t), t)
    if structure == "layerwise":  # d logZ / d log λ ≈ 0 for every tensor
        assert (g * lam).abs().max() < 1e-3
    # and it beats every scalar prior's evidence around the scalar optimum
    best = float(la.log_marginal_likelihood(lam))
    scalar = Laplace(model, "classification", rep).fit((x, y))
    s = scalar.optimize_prior_precision(n_steps=150, lr=0.1)
    assert best > float(scalar.log_marginal_likelihood(s))


def test_gridsearch_minimises_the_validation_nll():
    model, x, y = _problem(3)
    la = Laplace(model, "classification", PMatDense).fit((x, y))
    xv, yv = torch.randn(12, 3, dtype=DT), torch.randint(0, 3, (12,))
    grid = [0.01, 0.1, 1.0, 10.0, 100.0]
    F = fim_dense(model, x)
    J = per_example_jacobian(model, xv)
    f = model(xv).detach()
    nll = []
    for g in grid:
        H = len(y) * F + g * torch.eye(F.shape[0], dtype=DT)
        var = torch.einsum("ikp,pq,ilq->ikl", J, torch.linalg.inv(H), J)
        p = torch.softmax(f / torch.sqrt(1 + math.pi / 8 * var.diagonal(dim1=1, dim2=2)), -1)
        nll.append(-torch.log(p[torch.arange(12), yv]).sum())
    got = la.optimize_prior_precision(method="gridsearch", val_loader=[(xv[:6], yv[:6]),
                                                                      (xv[6:], yv[6:])], grid=grid)
    assert got == grid[int(torch.stack(nll).argmin())]
    assert la.prior_precision == got
    with pytest.raises(ValueError, match="val_loader"):
        la.optimize_prior_precision(method="gridsearch")
    with pytest.raises(ValueError, match="prior_structure"):
        la.optimize_prior_precision(prior_structure="blockwise")


def test_progress_bars_change_no_number(capsys):
    model, x, y = _problem(4)
    xv, yv = torch.randn(6, 3, dtype=DT), torch.randint(0, 3, (6,))
    values = []
    for shown in (False, True):
        la = Laplace(model, "classification", PMatDiag).fit((x, y))
        values.append(la.optimize_prior_precision(n_steps=5, progress_bar=shown))
        values.append(la.optimize_prior_precision(method="gridsearch", val_loader=[(xv, yv)],
                                                  grid=[0.1, 1.0, 10.0], progress_bar=shown))
        err = capsys.readouterr().err
        assert ("prior precision" in err) == shown
    assert values[:2] == values[2:]


def test_a_per_parameter_prior_with_kronecker_factors_is_refused_with_the_alternatives():
    from nngeometry.laplace import marglik_training
    from nngeometry.object import PMatEKFAC

    model, x, y = _problem(4)
    la = Laplace(model, "classification", PMatKFAC).fit((x, y))
    P = sum(p.numel() for p in model.parameters())
    prior = torch.linspace(0.5, 2.0, P, dtype=DT)
    for call in (lambda: la.log_marginal_likelihood(prior),
                 lambda: la.optimize_prior_precision(prior_structure="diag", n_steps=2),
                 lambda: Laplace(model, "classification", PMatEKFAC).fit((x, y))
                 .optimize_prior_precision(prior_structure="diag", n_steps=2),
                 lambda: marglik_training(model, [(x, y)], prior_structure="diag", n_epochs=1)):
        with pytest.raises(NotImplementedError, match="no exact Kronecker form.*PMatDiag"):
            call()
