"""The Laplace approximation against dense float64 brute force (torch.func Jacobians)."""
import math

import pytest
import torch
import torch.nn.functional as tF
from torch import nn

from nngeometry.laplace import Laplace
from nngeometry.layercollection import LayerCollection
from nngeometry.object import (PMatBlockDiag, PMatDense, PMatDiag, PMatEKFAC, PMatKFAC,
                               PMatLowRank, PVector)

from brute import fim_dense, per_example_jacobian

DT = torch.float64
REPS = [PMatDense, PMatBlockDiag, PMatDiag, PMatKFAC, PMatEKFAC, PMatLowRank]


def _classif(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    x, y = torch.randn(20, 3, dtype=DT), torch.randint(0, 3, (20,))
    return model, x, y


def _regress(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    x = torch.randn(20, 3, dtype=DT)
    y = torch.randn(20, 2, dtype=DT)
    return model, x, y


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _lml_brute(model, x, y, H, prior_diag, likelihood, sigma=1.0):
    theta = _flat(model)
    out = model(x).detach()
    if likelihood == "classification":
        loglik = -tF.cross_entropy(out, y, reduction="sum")
    else:
        n, K = out.shape
        loglik = (-0.5 * ((out - y) ** 2).sum() / sigma ** 2
                  - 0.5 * n * K * math.log(2 * math.pi * sigma ** 2))
    return (loglik - 0.5 * (prior_diag * theta ** 2).sum()
            - 0.5 * (torch.logdet(H) - torch.log(prior_diag).sum()))


@pytest.mark.parametrize("rep", REPS, ids=lambda r: r.__name__)
def test_log_marginal_likelihood_classification(rep):
    model, x, y = _classif()
    lam = 0.7
    la = Laplace(model, "classification", rep, prior_precision=lam).fit((x, y))
    n, P = len(y), la.layer_collection.numel()
    H = n * la.ggn.to_torch() + lam * torch.eye(P, dtype=DT)
    ref = _lml_brute(model, x, y, H, torch.full((P,), lam, dtype=DT), "classification")
    assert torch.allclose(la.log_marginal_likelihood(), ref, rtol=1e-10)
    if rep is PMatDense:  # the GGN itself is brute force's
        H_true = n * fim_dense(model, x) + lam * torch.eye(P, dtype=DT)
        assert torch.allclose(H, H_true, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rep", [PMatDense, PMatDiag, PMatKFAC], ids=lambda r: r.__name__)
def test_log_marginal_likelihood_regression_with_noise_and_temperature(rep):
    model, x, y = _regress()
    lam, sigma, T = 2.0, 0.5, 1.0
    la = Laplace(model, "regression", rep, prior_precision=lam, sigma_noise=sigma,
                 temperature=T).fit((x, y))
    n, P = len(y), la.layer_collection.numel()
    H = n / sigma ** 2 * la.ggn.to_torch() + lam * torch.eye(P, dtype=DT)
    ref = _lml_brute(model, x, y, H, torch.full((P,), lam, dtype=DT), "regression", sigma)
    assert torch.allclose(la.log_marginal_likelihood(), ref, rtol=1e-10)
    if rep is PMatDense:
        H_true = n / sigma ** 2 * fim_dense(model, x, variant="regression") + lam * torch.eye(P, dtype=DT)
        assert torch.allclose(H, H_true, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rep", [PMatDense, PMatDiag, PMatKFAC], ids=lambda r: r.__name__)
def test_marglik_gradient_wrt_prior_precision_is_the_trace_formula(rep):
    """d logZ / dλ = −½ ||θ*||² − ½ tr(H⁻¹) + P / (2λ)."""
    model, x, y = _classif(1)
    la = Laplace(model, "classification", rep).fit((x, y))
    lam = torch.tensor(0.9, dtype=DT, requires_grad=True)
    g, = torch.autograd.grad(la.log_marginal_likelihood(lam), lam)
    n, P = len(y), la.layer_collection.numel()
    H = n * la.ggn.to_torch() + 0.9 * torch.eye(P, dtype=DT)
    ref = -0.5 * (_flat(model) ** 2).sum() - 0.5 * torch.linalg.inv(H).trace() + P / (2 * 0.9)
    assert torch.allclose(g, ref, rtol=1e-8)


def test_optimize_prior_precision_reaches_the_stationary_point():
    model, x, y = _classif(2)
    la = Laplace(model, "classification", PMatDense).fit((x, y))
    lam = la.optimize_prior_precision(n_steps=300, lr=0.05)
    t = torch.tensor(lam, dtype=DT, requires_grad=True)
    g, = torch.autograd.grad(la.log_marginal_likelihood(t), t)
    assert abs(float(g)) * lam < 1e-3  # d logZ / d log λ ≈ 0
    best = float(la.log_marginal_likelihood())
    for other in (lam * 0.7, lam * 1.4):
        assert float(la.log_marginal_likelihood(other)) < best


@pytest.mark.parametrize("rep", [PMatDense, PMatDiag, PMatKFAC, PMatLowRank], ids=lambda r: r.__name__)
def test_glm_predictive_probit_and_variance(rep):
    model, x, y = _classif(3)
    lam = 1.5
    la = Laplace(model, "classification", rep, prior_precision=lam).fit((x, y))
    xs = torch.randn(5, 3, dtype=DT)
    n, P = len(y), la.layer_collection.numel()
    H = n * la.ggn.to_torch() + lam * torch.eye(P, dtype=DT)
    J = per_example_jacobian(model, xs)  # (n*, K, P)
    var = torch.einsum("ikp,pq,ilq->ikl", J, torch.linalg.inv(H), J)
    assert torch.allclose(la.functional_variance(xs), var, rtol=1e-8, atol=1e-12)
    f = model(xs).detach()
    probs = torch.softmax(f / torch.sqrt(1 + math.pi / 8 * var.diagonal(dim1=1, dim2=2)), -1)
    assert torch.allclose(la.predictive(xs), probs, rtol=1e-8)
    mc = la.predictive(xs, "mc", n_samples=20000, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(mc.sum(-1), torch.ones(5, dtype=DT))
    # MC and probit agree to the accuracy of the probit approximation (a few %)
    assert (mc - probs).abs().max() < 0.05


def test_posterior_samples_have_the_posterior_covariance():
    model, x, y = _classif(4)
    lam = 2.0
    la = Laplace(model, "classification", PMatDense, prior_precision=lam).fit((x, y))
    n, P = len(y), la.layer_collection.numel()
    H = n * la.ggn.to_torch() + lam * torch.eye(P, dtype=DT)
    S = la.sample(40000, generator=torch.Generator().manual_seed(0))
    assert S.shape == (40000, P)
    emp = torch.cov(S.T)
    cov = torch.linalg.inv(H)
    # entrywise standard error of a sample covariance: sqrt((Σ_ii Σ_jj + Σ_ij²) / N)
    se = torch.sqrt((cov.diagonal()[:, None] * cov.diagonal()[None] + cov ** 2) / 40000)
    assert ((emp - cov).abs() / se).max() < 5
    assert torch.allclose(S.mean(0), _flat(model), atol=float(5 * cov.diagonal().sqrt().max() / 200))


def test_kfac_samples_use_the_exactly_damped_root():
    model, x, y = _classif(5)
    la = Laplace(model, "classification", PMatKFAC, prior_precision=1.0).fit((x, y))
    n, P = len(y), la.layer_collection.numel()
    H = n * la.ggn.to_torch() + torch.eye(P, dtype=DT)
    z = torch.randn(3, P, generator=torch.Generator().manual_seed(1), dtype=DT)
    S = la.sample(3, generator=torch.Generator().manual_seed(1)) - _flat(model)
    ev, U = torch.linalg.eigh(H)
    assert torch.allclose(S, z @ (U @ torch.diag(ev ** -0.5) @ U.T), rtol=1e-8, atol=1e-12)


def test_last_layer_laplace():
    model, x, y = _classif(6)
    lc = LayerCollection.from_model(model).last_layer()
    la = Laplace(model, "classification", PMatDense, prior_precision=1.0,
                 layer_collection=lc).fit((x, y))
    P = lc.numel()
    assert la.ggn.size(0) == P == 15
    F = fim_dense(model, x, layer_collection=lc)
    H = len(y) * F + torch.eye(P, dtype=DT)
    theta = torch.cat([model[2].weight.detach().reshape(-1), model[2].bias.detach()])
    loglik = -tF.cross_entropy(model(x).detach(), y, reduction="sum")
    ref = loglik - 0.5 * (theta ** 2).sum() - 0.5 * torch.logdet(H)
    assert torch.allclose(la.log_marginal_likelihood(), ref, rtol=1e-10)


def test_bad_arguments():
    model, x, y = _classif()
    with pytest.raises(ValueError, match="likelihood"):
        Laplace(model, "poisson")
    with pytest.raises(ValueError, match="sigma_noise"):
        Laplace(model, "classification", sigma_noise=2.0)
    with pytest.raises(RuntimeError, match="fit"):
        Laplace(model).log_marginal_likelihood()


def _prior_kinds(lc):
    ids = list(lc.layer_ids())
    per_layer = {ids[0]: 0.4, ids[1]: 1.7}
    diag = torch.cat([torch.full((lc[lid].numel(),), per_layer[lid], dtype=DT) for lid in ids])
    g = torch.Generator().manual_seed(3)
    vec = 0.3 + torch.rand(lc.numel(), generator=g, dtype=DT)
    return {"per_layer": (per_layer, diag), "pvector": (PVector(lc, vector_repr=vec), vec)}


@pytest.mark.parametrize("kind", ["per_layer", "pvector"])
@pytest.mark.parametrize("rep", [PMatDense, PMatBlockDiag, PMatDiag, PMatKFAC, PMatEKFAC,
                                 PMatLowRank], ids=lambda r: r.__name__)
def test_log_marginal_likelihood_with_structured_priors(rep, kind):
    model, x, y = _classif(7)
    la = Laplace(model, "classification", rep).fit((x, y))
    prior, diag = _prior_kinds(la.layer_collection)[kind]
    if kind == "pvector" and rep in (PMatKFAC, PMatEKFAC):
        with pytest.raises(NotImplementedError):
            la.log_marginal_likelihood(prior)
        return
    H = len(y) * la.ggn.to_torch() + torch.diag(diag)
    ref = _lml_brute(model, x, y, H, diag, "classification")
    assert torch.allclose(la.log_marginal_likelihood(prior), ref, rtol=1e-10)


def test_per_layer_prior_optimisation_reaches_a_stationary_point():
    model, x, y = _classif(8)
    la = Laplace(model, "classification", PMatKFAC).fit((x, y))
    prior = la.optimize_prior_precision(per_layer=True, n_steps=300, lr=0.05)
    ids = list(la.layer_collection.layer_ids())
    t = {lid: torch.tensor(prior[lid], dtype=DT, requires_grad=True) for lid in ids}
    grads = torch.autograd.grad(la.log_marginal_likelihood(t), [t[lid] for lid in ids])
    assert max(abs(float(g)) * prior[lid] for g, lid in zip(grads, ids)) < 1e-3


def test_subnetwork_laplace():
    """subnetwork_indices=idx: the k × k posterior precision n·F[idx][:, idx] + λI over θ[idx],
    its marginal likelihood and GLM predictive against brute force."""
    model, x, y = _classif(9)
    P = sum(p.numel() for p in model.parameters())
    idx = torch.tensor([0, 3, 7, 20, 21, P - 1])
    lam = 0.6
    la = Laplace(model, "classification", PMatDense, prior_precision=lam,
                 subnetwork_indices=idx).fit((x, y))
    k = len(idx)
    assert la.ggn.size(0) == k
    F = fim_dense(model, x)[idx][:, idx]
    H = len(y) * F + lam * torch.eye(k, dtype=DT)
    theta = _flat(model)[idx]
    loglik = -tF.cross_entropy(model(x).detach(), y, reduction="sum")
    ref = loglik - 0.5 * lam * (theta ** 2).sum() - 0.5 * (torch.logdet(H) - k * math.log(lam))
    assert torch.allclose(la.log_marginal_likelihood(), ref, rtol=1e-10)
    xs = torch.randn(4, 3, dtype=DT)
    J = per_example_jacobian(model, xs)[..., idx]
    var = torch.einsum("ikp,pq,ilq->ikl", J, torch.linalg.inv(H), J)
    assert torch.allclose(la.functional_variance(xs), var, rtol=1e-8, atol=1e-12)
    assert la.sample(3).shape == (3, k)
    with pytest.raises(ValueError, match="PMatDense"):
        Laplace(model, "classification", PMatKFAC, subnetwork_indices=idx).fit((x, y))
