"""The predictives, posterior density / covariance, per-tensor priors, prior mean and the prior
search against laplace-torch (0.3), float64, where it is installed (skips otherwise). Our
regression variances include σ² (laplace-torch's are of f only): σ² is added to theirs.

laplace-torch's GGN (its curvlinops backend) is accurate to about 1e-8 relative only (negative
eigenvalues of −5e-8 where ours, checked against brute force in test_laplace.py, has 1e-15):
so that the formulas built on it are compared to 1e-8, laplace-torch is given our GGN."""
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

laplace = pytest.importorskip("laplace")

from nngeometry.laplace import Laplace  # noqa: E402
from nngeometry.object import PMatDense, PMatDiag  # noqa: E402

DT = torch.float64
STRUCTURES = {"full": PMatDense, "diag": PMatDiag}
RTOL = 1e-8


def _problem(likelihood, seed=0):
    torch.manual_seed(seed)
    K = 3 if likelihood == "classification" else 2
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, K)).to(DT)
    x = torch.randn(40, 4, dtype=DT)
    y = torch.randint(0, K, (40,)) if likelihood == "classification" else torch.randn(40, K, dtype=DT)
    return model, DataLoader(TensorDataset(x, y), batch_size=10)


def _pair(likelihood, structure, prior=0.8, sigma=1.0, **kw):
    model, loader = _problem(likelihood)
    theirs = laplace.Laplace(model, likelihood, subset_of_weights="all",
                             hessian_structure=structure, prior_precision=prior,
                             sigma_noise=sigma, **kw)
    theirs.fit(loader)
    ours = Laplace(model, likelihood, STRUCTURES[structure], prior_precision=prior,
                   sigma_noise=sigma, **kw).fit(loader)
    H = ours.n * ours.ggn.to_torch()
    theirs.H = H if structure == "full" else torch.diagonal(H).clone()
    theirs._posterior_scale = None
    return model, loader, theirs, ours


def _close(a, b):
    return torch.allclose(a, b.to(a.dtype), rtol=RTOL, atol=1e-14)


@pytest.mark.parametrize("structure", list(STRUCTURES))
def test_classification_predictives(structure):
    model, loader, theirs, ours = _pair("classification", structure)
    xs = torch.randn(5, 4, dtype=DT)
    for link in ("probit", "bridge", "bridge_norm"):
        assert _close(ours.predictive(xs, link_approx=link),
                      theirs(xs, pred_type="glm", link_approx=link)), link
    P = ours.layer_collection.numel()
    assert _close(ours.posterior_covariance, theirs.posterior_covariance if structure == "full"
                  else torch.diag(theirs.posterior_variance))
    v = ours.theta_map.get_flat_representation() + 0.05 * torch.randn(P, dtype=DT)
    assert _close(ours.log_prob(v), theirs.log_prob(v))
    assert _close(ours.log_prob(v, normalized=False), theirs.log_prob(v, normalized=False))


@pytest.mark.parametrize("structure", list(STRUCTURES))
def test_regression_predictive_marginal_and_joint(structure):
    sigma = 0.7
    model, loader, theirs, ours = _pair("regression", structure, sigma=sigma)
    xs = torch.randn(4, 4, dtype=DT)
    mean, var = ours.predictive(xs)
    tm, tv = theirs(xs, pred_type="glm")
    assert _close(mean, tm) and _close(var, tv + sigma ** 2 * torch.eye(2, dtype=DT))
    mean, cov = ours.predictive(xs, joint=True)
    tm, tc = theirs(xs, pred_type="glm", joint=True)
    assert _close(mean, tm) and _close(cov, tc + sigma ** 2 * torch.eye(8, dtype=DT))


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_per_tensor_prior_evidence_and_its_gradients(likelihood):
    """laplace-torch's 'layerwise' prior (one precision per parameter tensor), a prior mean,
    and the gradients of the evidence w.r.t. the four precisions and σ."""
    sigma = 0.7 if likelihood == "regression" else 1.0
    model, loader, theirs, ours = _pair(likelihood, "full", sigma=sigma)
    lam = torch.tensor([0.5, 1.5, 2.0, 0.3], dtype=DT)
    t_lam = lam.clone().requires_grad_(True)
    o_lam = lam.clone().requires_grad_(True)
    if likelihood == "regression":
        t_sig = torch.tensor(sigma, dtype=DT, requires_grad=True)
        o_sig = torch.tensor(sigma, dtype=DT, requires_grad=True)
        t = theirs.log_marginal_likelihood(t_lam, t_sig)
        o = ours.log_marginal_likelihood(o_lam, o_sig)
        tg = torch.autograd.grad(t, [t_lam, t_sig])
        og = torch.autograd.grad(o, [o_lam, o_sig])
    else:
        t = theirs.log_marginal_likelihood(t_lam)
        o = ours.log_marginal_likelihood(o_lam)
        tg = torch.autograd.grad(t, [t_lam])
        og = torch.autograd.grad(o, [o_lam])
    assert _close(o.detach(), t.detach())
    for a, b in zip(og, tg):
        assert _close(a, b)
    P = ours.layer_collection.numel()
    m = 0.1 * torch.randn(P, dtype=DT)
    theirs.prior_mean, ours.prior_mean = m, m
    theirs.prior_precision = lam
    assert _close(ours.log_marginal_likelihood(lam).detach(),
                  theirs.log_marginal_likelihood().detach())


def test_layerwise_marglik_optimisation_after_a_fixed_schedule():
    model, loader, theirs, ours = _pair("regression", "full", sigma=0.7)
    theirs.optimize_prior_precision(method="marglik", prior_structure="layerwise", n_steps=20,
                                    lr=0.1, init_prior_prec=1.0)
    got = ours.optimize_prior_precision(method="marglik", prior_structure="layerwise",
                                        n_steps=20, lr=0.1, init_prior_prec=1.0)
    assert _close(got, theirs.prior_precision)


def test_gridsearch_on_a_validation_loader():
    model, loader, theirs, ours = _pair("classification", "diag")
    torch.manual_seed(1)
    xv = torch.randn(30, 4, dtype=DT)
    yv = torch.randint(0, 3, (30,))
    val = DataLoader(TensorDataset(xv, yv), batch_size=10)
    theirs.optimize_prior_precision(method="gridsearch", val_loader=val, grid_size=20,
                                    pred_type="glm", link_approx="probit")
    got = ours.optimize_prior_precision(method="gridsearch", val_loader=val, grid_size=20,
                                        pred_type="glm", link_approx="probit")
    assert abs(got - float(theirs.prior_precision)) <= RTOL * got


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_kron_per_tensor_prior_evidence_and_gradients(likelihood):
    """KronLaplace (weight and bias in separate Kronecker blocks: separate_weight_and_bias) with
    laplace-torch's layerwise prior: the evidence and its gradients, our KFAC with one
    precision per tensor being exact."""
    from nngeometry.object import PMatKFAC
    model, loader = _problem(likelihood)
    sigma = 0.7 if likelihood == "regression" else 1.0
    theirs = laplace.Laplace(model, likelihood, subset_of_weights="all", hessian_structure="kron",
                             prior_precision=0.8, sigma_noise=sigma)
    theirs.fit(loader)
    ours = Laplace(model, likelihood, PMatKFAC, sigma_noise=sigma,
                   separate_weight_and_bias=True).fit(loader)
    lam = torch.tensor([0.5, 1.5, 2.0, 0.3], dtype=DT)
    t_lam, o_lam = lam.clone().requires_grad_(True), lam.clone().requires_grad_(True)
    t = theirs.log_marginal_likelihood(t_lam)
    o = ours.log_marginal_likelihood(o_lam)
    assert torch.allclose(o.detach(), t.detach().to(DT), rtol=1e-8)
    assert torch.allclose(torch.autograd.grad(o, o_lam)[0],
                          torch.autograd.grad(t, t_lam)[0].to(DT), rtol=1e-8)
