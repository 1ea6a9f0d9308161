"""The functional (GP) Laplace against dense float64 brute force: with all the training points
and more outputs than parameters it is the weight-space GGN Laplace (Woodbury, Sylvester); on
a subset of an over-parametrised network, the GP formulas written densely here."""
import math

import pytest
import torch
from torch import nn

from nngeometry.laplace import FunctionalLaplace, Laplace
from nngeometry.object import PMatDense

from brute import per_example_jacobian

DT = torch.float64


def _problem(likelihood, hidden=2, K=3, n=20, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, hidden), nn.Tanh(), nn.Linear(hidden, K)).to(DT)
    x = torch.randn(n, 3, dtype=DT)
    y = torch.randint(0, K, (n,)) if likelihood == "classification" else torch.randn(n, K,
                                                                                   dtype=DT)
    return model, x, y


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_all_points_equal_the_weight_space_laplace(likelihood):
    """M = n, nC = 60 > P = 17 (J of full column rank): evidence, its gradients, the
    predictive (marginal, joint, probit, bridge) equal the Dense GGN Laplace's."""
    model, x, y = _problem(likelihood)
    sigma = 0.7 if likelihood == "regression" else 1.0
    prior = torch.tensor([0.5, 1.5, 2.0, 0.8], dtype=DT)  # one per parameter tensor
    kw = dict(prior_precision=prior, sigma_noise=sigma, temperature=0.8, prior_mean=0.05)
    gp = FunctionalLaplace(model, likelihood, **kw).fit([(x[:8], y[:8]), (x[8:], y[8:])])
    ws = Laplace(model, likelihood, PMatDense, **kw).fit([(x[:8], y[:8]), (x[8:], y[8:])])
    torch.testing.assert_close(gp.log_marginal_likelihood(), ws.log_marginal_likelihood(),
                               rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(gp.posterior_precision_logdet(), ws.posterior_precision_logdet(),
                               rtol=1e-10, atol=1e-9)
    lam = prior.clone().requires_grad_(True)
    s = torch.tensor(sigma, dtype=DT, requires_grad=True)
    args = (lam, s) if likelihood == "regression" else (lam,)
    g_gp = torch.autograd.grad(gp.log_marginal_likelihood(*args), args)
    g_ws = torch.autograd.grad(ws.log_marginal_likelihood(*args), args)
    for a, b in zip(g_gp, g_ws):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    xs = torch.randn(4, 3, dtype=DT)
    torch.testing.assert_close(gp.functional_variance(xs), ws.functional_variance(xs),
                               rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(gp.functional_covariance(xs), ws.functional_covariance(xs),
                               rtol=1e-8, atol=1e-12)
    if likelihood == "classification":
        for link in ("probit", "bridge"):
            torch.testing.assert_close(gp.predictive(xs, link_approx=link),
                                       ws.predictive(xs, link_approx=link), rtol=1e-9, atol=1e-12)
        # laplace-torch's positional predictive(x, 'gp', link_approx)
        torch.testing.assert_close(gp.predictive(xs, "gp", "bridge"),
                                   ws.predictive(xs, link_approx="bridge"), rtol=1e-9, atol=1e-12)
    else:
        for a, b in zip(gp.predictive(xs), ws.predictive(xs)):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


def test_subset_of_an_overparametrised_network_against_dense_gp_formulas():
    """M = 5 of 20 points, P = 47 > MC = 10: the kernel is invertible and the GP formulas are
    the textbook ones: ``Σ* = K** − K*M (K + σ²T I)⁻¹ K_M*``, scatter ``dᵀK⁻¹d``,
    ``log det(I + K/(σ²T))``."""
    model, x, y = _problem("regression", hidden=7, K=2)
    sigma, T, lam, m = 0.6, 0.9, 1.7, 0.1
    gp = FunctionalLaplace(model, "regression", n_subset=5, prior_precision=lam,
                           sigma_noise=sigma, temperature=T, prior_mean=m, seed=3).fit((x, y))
    idx = gp.subset
    assert len(idx) == 5 and len(torch.unique(idx)) == 5
    J = per_example_jacobian(model, x[idx]).reshape(10, -1)  # (M C, P), index i C + c
    P = J.shape[1]
    K = J @ J.T / lam
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    d = J @ (theta - m)
    with torch.no_grad():
        loglik = (-0.5 * ((model(x) - y) ** 2).sum() / sigma ** 2
                  - 0.5 * len(y) * 2 * math.log(2 * math.pi * sigma ** 2)) / T
    ref = (loglik - 0.5 * d @ torch.linalg.solve(K, d)
           - 0.5 * torch.logdet(torch.eye(10, dtype=DT) + K / (sigma ** 2 * T)))
    assert P > 10
    torch.testing.assert_close(gp.log_marginal_likelihood(), ref, rtol=1e-10, atol=1e-9)
    xs = torch.randn(3, 3, dtype=DT)
    Js = per_example_jacobian(model, xs).reshape(6, -1)
    S = Js @ Js.T / lam - Js @ J.T / lam @ torch.linalg.solve(
        K + sigma ** 2 * T * torch.eye(10, dtype=DT), J @ Js.T / lam)
    torch.testing.assert_close(gp.functional_covariance(xs), S, rtol=1e-9, atol=1e-12)
    mean, var = gp.predictive(xs)
    blocks = torch.stack([S[2 * i:2 * i + 2, 2 * i:2 * i + 2] for i in range(3)])
    torch.testing.assert_close(var, blocks + sigma ** 2 * torch.eye(2, dtype=DT), rtol=1e-9,
                               atol=1e-12)
    # the evidence-optimal scalar prior is a stationary point of the GP's own evidence
    opt = gp.optimize_prior_precision(n_steps=150, lr=0.1)
    t = torch.tensor(opt, dtype=DT, requires_grad=True)
    g, = torch.autograd.grad(gp.log_marginal_likelihood(t), t)
    assert abs(float(g)) * opt < 1e-3
    with pytest.raises(NotImplementedError, match="no weight-space posterior"):
        gp.sample(2)
    with pytest.raises(ValueError, match="pred_type='nn'"):
        gp.predictive(xs, pred_type="nn")
    with pytest.raises(ValueError, match="n_subset=30"):
        FunctionalLaplace(model, "regression", n_subset=30).fit((x, y))
