"""The Laplace predictives (GLM with probit / bridge / MC links, joint, sampled networks), the
posterior's density and covariance, against dense float64 brute force."""
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from nngeometry.laplace import Laplace
from nngeometry.layercollection import LayerCollection
from nngeometry.object import PMatDense, PMatDiag, PMatKFAC, PMatLowRank

from brute import fim_dense, per_example_jacobian

DT = torch.float64


def _problem(likelihood, seed=0, K=3):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, K)).to(DT)
    x = torch.randn(16, 3, dtype=DT)
    y = torch.randint(0, K, (16,)) if likelihood == "classification" else torch.randn(16, K, dtype=DT)
    return model, x, y


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _H(la, n, prior_diag, sigma=1.0):
    return n / sigma ** 2 * la.ggn.to_torch() + torch.diag(prior_diag)


def _bridge_brute(mu, S):
    """Dirichlet mean of the Laplace bridge after conditioning on 1ᵀf = 0, written with the
    explicit projector of the conditional Gaussian."""
    C = mu.shape[-1]
    one = torch.ones(C, dtype=mu.dtype)
    out = []
    for m, V in zip(mu, S):
        g = V @ one / (one @ V @ one)  # gain of the condition 1ᵀf = 0
        A = torch.eye(C, dtype=mu.dtype) - torch.outer(g, one)
        m2, V2 = A @ m, A @ V @ A.T
        a = torch.tensor([(1 - 2 / C + math.exp(m2[k]) * torch.exp(-m2).sum() / C ** 2) / V2[k, k]
                          for k in range(C)], dtype=mu.dtype)
        out.append(a / a.sum())
    return torch.stack(out)


@pytest.mark.parametrize("rep", [PMatDense, PMatKFAC], ids=lambda r: r.__name__)
def test_laplace_bridge(rep):
    model, x, y = _problem("classification", 1)
    la = Laplace(model, "classification", rep, prior_precision=0.5).fit((x, y))
    xs = torch.randn(4, 3, dtype=DT)
    var = la.functional_variance(xs)
    f = model(xs).detach()
    ref = _bridge_brute(f, var)
    got = la.predictive(xs, link_approx="bridge")
    assert torch.allclose(got, ref, rtol=1e-10, atol=0)
    # laplace-torch's positional order and its __call__ read the same
    assert torch.allclose(la.predictive(xs, "glm", "bridge", 10), got, rtol=0, atol=0)
    assert torch.allclose(la(xs, link_approx="bridge"), got, rtol=0, atol=0)
    # bridge_norm: μ / √c, diag Σ / c with mean(diag Σ) / c = √(C/2), on the conditioned Gaussian
    C = f.shape[1]
    one = torch.ones(C, dtype=DT)
    rows = []
    for m, V in zip(f, var):
        g = V @ one / (one @ V @ one)
        A = torch.eye(C, dtype=DT) - torch.outer(g, one)
        m2, d2 = A @ m, torch.diagonal(A @ V @ A.T)
        c = d2.mean() / math.sqrt(C / 2)
        m2, d2 = m2 / c.sqrt(), d2 / c
        a = (1 - 2 / C + m2.exp() * torch.exp(-m2).sum() / C ** 2) / d2
        rows.append(a / a.sum())
    assert torch.allclose(la.predictive(xs, link_approx="bridge_norm"), torch.stack(rows),
                          rtol=1e-10, atol=0)


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_joint_glm_predictive(likelihood):
    model, x, y = _problem(likelihood, 2, K=2 if likelihood == "regression" else 3)
    sigma = 0.6 if likelihood == "regression" else 1.0
    lam = 0.8
    la = Laplace(model, likelihood, PMatDense, prior_precision=lam, sigma_noise=sigma).fit((x, y))
    xs = torch.randn(3, 3, dtype=DT)
    P = la.layer_collection.numel()
    H = _H(la, len(x), torch.full((P,), lam, dtype=DT), sigma)
    J = per_example_jacobian(model, xs)  # (n*, K, P)
    n, K = J.shape[:2]
    Jf = J.reshape(n * K, P)
    cov = Jf @ torch.linalg.solve(H, Jf.T)
    if likelihood == "regression":
        cov = cov + sigma ** 2 * torch.eye(n * K, dtype=DT)
    mean, got = la.predictive(xs, joint=True)
    assert torch.allclose(mean, model(xs).detach().reshape(-1), rtol=1e-12)
    assert torch.allclose(got, cov, rtol=1e-9, atol=1e-13)
    # its diagonal blocks are the marginal predictive's
    if likelihood == "regression":
        _, var = la.predictive(xs)
        blocks = torch.stack([got[i * K:(i + 1) * K, i * K:(i + 1) * K] for i in range(n)])
        assert torch.allclose(blocks, var, rtol=1e-12)
        _, dvar = la.predictive(xs, diagonal_output=True)
        assert torch.allclose(dvar, torch.diagonal(var, dim1=1, dim2=2), rtol=0, atol=0)


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_nn_predictive_runs_the_sampled_networks(likelihood):
    model, x, y = _problem(likelihood, 3, K=2 if likelihood == "regression" else 3)
    sigma = 0.5 if likelihood == "regression" else 1.0
    lc = LayerCollection.from_model(model).last_layer()
    la = Laplace(model, likelihood, PMatKFAC, prior_precision=2.0, sigma_noise=sigma,
                 layer_collection=lc).fit((x, y))
    xs = torch.randn(5, 3, dtype=DT)
    before = _flat(model).clone()
    got = la.predictive(xs, pred_type="nn", link_approx="mc", n_samples=7,
                        generator=torch.Generator().manual_seed(4))
    assert torch.equal(_flat(model), before)  # θ* restored
    thetas = la.sample(7, generator=torch.Generator().manual_seed(4))
    params = dict(model.named_parameters())
    fs = []
    for t in thetas:
        p = dict(params)
        p["2.weight"], p["2.bias"] = t[:-lc["2"].out_features].reshape(-1, 4), t[-lc["2"].out_features:]
        fs.append(functional_call(model, p, (xs,)).detach())
    fs = torch.stack(fs)
    if likelihood == "classification":
        assert torch.allclose(got, torch.softmax(fs, -1).mean(0), rtol=1e-12)
    else:
        mean, cov = got
        assert torch.allclose(mean, fs.mean(0), rtol=1e-12)
        ref = torch.stack([torch.cov(fs[:, i].T) for i in range(5)]) + sigma ** 2 * torch.eye(2, dtype=DT)
        assert torch.allclose(cov, ref, rtol=1e-10)


def test_nn_predictive_of_a_subnetwork_writes_only_its_parameters():
    model, x, y = _problem("classification", 4)
    idx = torch.tensor([1, 5, 17, 30])
    la = Laplace(model, "classification", PMatDense, subnetwork_indices=idx).fit((x, y))
    xs = torch.randn(3, 3, dtype=DT)
    got = la.predictive(xs, "nn", "mc", 5)
    thetas = la.sample(5, generator=None)  # shape only; the draw above is random too
    assert thetas.shape == (5, 4) and got.shape == (3, 3)
    torch.manual_seed(0)
    got = la.predictive(xs, pred_type="nn", n_samples=5)
    torch.manual_seed(0)
    draws = la.sample(5)
    flat0 = _flat(model)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    probs = []
    for t in draws:
        flat = flat0.clone()
        flat[idx] = t
        parts = torch.split(flat, [math.prod(s) for s in shapes])
        p = {n: v.reshape(s) for n, v, s in zip(names, parts, shapes)}
        probs.append(torch.softmax(functional_call(model, p, (xs,)), -1))
    assert torch.allclose(got, torch.stack(probs).mean(0), rtol=1e-12)
    assert torch.equal(_flat(model), flat0)


@pytest.mark.parametrize("rep", [PMatDense, PMatDiag, PMatKFAC, PMatLowRank], ids=lambda r: r.__name__)
def test_log_prob_and_posterior_covariance(rep):
    model, x, y = _problem("regression", 5, K=2)
    sigma, lam = 0.7, 1.3
    la = Laplace(model, "regression", rep, prior_precision=lam, sigma_noise=sigma).fit((x, y))
    P = la.layer_collection.numel()
    H = _H(la, len(x), torch.full((P,), lam, dtype=DT), sigma)
    assert torch.allclose(la.posterior_precision, H, rtol=1e-12)
    cov = torch.linalg.inv(H)
    assert torch.allclose(la.posterior_covariance, cov, rtol=1e-8, atol=1e-12)
    assert torch.allclose(la.posterior_variance, cov.diagonal(), rtol=1e-8)
    v = _flat(model) + 0.1 * torch.randn(2, P, generator=torch.Generator().manual_seed(0), dtype=DT)
    ref = torch.distributions.MultivariateNormal(_flat(model), precision_matrix=H).log_prob(v)
    assert torch.allclose(la.log_prob(v), ref, rtol=1e-10)
    assert torch.allclose(la.log_prob(v[0]), ref[0], rtol=1e-10)
    d = v[0] - _flat(model)
    assert torch.allclose(la.log_prob(v[0], normalized=False), -0.5 * d @ H @ d, rtol=1e-10)


def test_predictive_bad_arguments():
    model, x, y = _problem("classification", 6)
    la = Laplace(model, "classification", PMatDiag).fit((x, y))
    with pytest.raises(ValueError, match="pred_type"):
        la.predictive(x, pred_type="linear")
    with pytest.raises(ValueError, match="link_approx"):
        la.predictive(x, link_approx="logit")
    with pytest.raises(ValueError, match="joint"):
        la.predictive(x, pred_type="nn", joint=True)
    with pytest.raises(ValueError, match="value has shape"):
        la.log_prob(torch.zeros(3, dtype=DT))


def test_reward_modeling_fits_as_classification_and_predicts_the_rewards():
    """Pairs (n, 2, d) -> two rewards (n, 2), the target the preferred one: the evidence is the
    classification's; the predictive is the rewards' Gaussian (no noise term)."""

    class Reward(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))

        def forward(self, x):
            return self.net(x).squeeze(-1)

    torch.manual_seed(9)
    model = Reward().to(DT)
    x, y = torch.randn(16, 2, 3, dtype=DT), torch.randint(0, 2, (16,))
    rm = Laplace(model, "reward_modeling", PMatDense, prior_precision=0.9).fit((x, y))
    cl = Laplace(model, "classification", PMatDense, prior_precision=0.9).fit((x, y))
    assert torch.equal(rm.log_marginal_likelihood(), cl.log_marginal_likelihood())
    xs = torch.randn(3, 2, 3, dtype=DT)
    mean, var = rm.predictive(xs)
    P = rm.layer_collection.numel()
    H = 16 * fim_dense(model, x) + 0.9 * torch.eye(P, dtype=DT)
    J = per_example_jacobian(model, xs)
    assert torch.allclose(mean, model(xs).detach(), rtol=1e-12)
    assert torch.allclose(var, torch.einsum("ikp,pq,ilq->ikl", J, torch.linalg.inv(H), J),
                          rtol=1e-9, atol=1e-14)
    with pytest.raises(ValueError, match="sigma_noise"):
        Laplace(model, "reward_modeling", sigma_noise=0.5)

