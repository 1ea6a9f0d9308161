"""Fitting the Laplace approximation: online accumulation over loaders, saving and loading,
dict (Hugging Face style) batches, the empirical and Monte-Carlo Fisher as curvature, against
dense float64 brute force."""
import io
import math

import pytest
import torch
import torch.nn.functional as tF
from torch import nn

from nngeometry.laplace import Laplace
from nngeometry.object import (PMatBlockDiag, PMatDense, PMatDiag, PMatEKFAC, PMatKFAC,
                               PMatLowRank)

from brute import fim_dense, per_example_jacobian

DT = torch.float64


def _problem(likelihood="classification", seed=0, K=3):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, K)).to(DT)
    x = torch.randn(20, 3, dtype=DT)
    y = torch.randint(0, K, (20,)) if likelihood == "classification" else torch.randn(20, K, dtype=DT)
    return model, x, y


@pytest.mark.parametrize("rep", [PMatDense, PMatBlockDiag, PMatDiag, PMatLowRank],
                         ids=lambda r: r.__name__)
def test_online_fit_equals_one_fit_on_all_the_data(rep):
    model, x, y = _problem()
    once = Laplace(model, "classification", rep, prior_precision=0.7).fit([(x, y)])
    online = Laplace(model, "classification", rep, prior_precision=0.7).fit([(x[:8], y[:8])])
    online.fit([(x[8:], y[8:])], override=False)
    assert online.n == 20
    assert torch.allclose(online.ggn.to_torch(), once.ggn.to_torch(), rtol=1e-12, atol=1e-15)
    assert torch.allclose(online.log_marginal_likelihood(), once.log_marginal_likelihood(), rtol=1e-12)
    # override=True (the default) starts again
    again = Laplace(model, "classification", rep).fit([(x[:8], y[:8])]).fit([(x[8:], y[8:])])
    assert again.n == 12


def test_online_fit_kfac_averages_the_factors_and_ekfac_is_refused():
    model, x, y = _problem(seed=1)
    a = Laplace(model, "classification", PMatKFAC).fit([(x[:8], y[:8])])
    b = Laplace(model, "classification", PMatKFAC).fit([(x[8:], y[8:])])
    a_ref = a.ggn.factor_average(b.ggn, 8 / 20, 12 / 20).to_torch()
    a.fit([(x[8:], y[8:])], override=False)
    assert torch.allclose(a.ggn.to_torch(), a_ref, rtol=1e-12)
    ek = Laplace(model, "classification", PMatEKFAC).fit([(x[:8], y[:8])])
    with pytest.raises(NotImplementedError, match="override=False"):
        ek.fit([(x[8:], y[8:])], override=False)


@pytest.mark.parametrize("rep", [PMatDense, PMatKFAC, PMatDiag], ids=lambda r: r.__name__)
def test_state_dict_round_trip_through_torch_load_defaults(rep):
    model, x, y = _problem("regression", 2, K=2)
    la = Laplace(model, "regression", rep, prior_precision=torch.tensor([0.5, 0.5, 2.0, 2.0], dtype=DT),
                 sigma_noise=0.6, prior_mean=0.1).fit((x, y))
    buf = io.BytesIO()
    torch.save(la.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf)  # weights_only=True: plain tensors, numbers and strings only
    new = Laplace(model, "regression", rep).load_state_dict(state)
    assert torch.equal(new.log_marginal_likelihood(), la.log_marginal_likelihood())
    xs = torch.randn(3, 3, dtype=DT)
    assert torch.allclose(new.predictive(xs)[1], la.predictive(xs)[1], rtol=1e-13)
    assert torch.equal(new.log_marginal_likelihood(0.9), la.log_marginal_likelihood(0.9))
    with pytest.raises(ValueError, match="representation"):
        Laplace(model, "regression", PMatBlockDiag).load_state_dict(state)


def test_dict_batches():
    """{'x': ..., 'labels': ...} batches: model(**inputs) without the labels, .logits read."""

    class Out:
        def __init__(self, logits):
            self.logits = logits

    class DictModel(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return Out(self.net(x))

    net, x, y = _problem(seed=3)
    model = DictModel(net)
    la = Laplace(model, "classification", PMatDense, prior_precision=0.5).fit(
        [{"x": x[:10], "labels": y[:10]}, {"x": x[10:], "labels": y[10:]}])
    ref = Laplace(net, "classification", PMatDense, prior_precision=0.5).fit([(x, y)])
    assert torch.allclose(la.log_marginal_likelihood(), ref.log_marginal_likelihood(), rtol=1e-12)
    xs = torch.randn(4, 3, dtype=DT)
    assert torch.allclose(la.predictive({"x": xs}), ref.predictive(xs), rtol=1e-12)
    with pytest.raises(ValueError, match="labels"):
        Laplace(model, "classification", PMatDiag).fit([{"x": x}])


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_empirical_fisher_curvature(likelihood):
    K = 3 if likelihood == "classification" else 2
    model, x, y = _problem(likelihood, 4, K)
    sigma = 0.5 if likelihood == "regression" else 1.0
    la = Laplace(model, likelihood, PMatDense, curvature="ef", prior_precision=0.8,
                 sigma_noise=sigma).fit((x, y))
    # per-example gradients of the negative log-likelihood, by brute force
    J = per_example_jacobian(model, x)  # (n, K, P)
    f = model(x).detach()
    r = torch.softmax(f, -1) - tF.one_hot(y, K).to(DT) if likelihood == "classification" \
        else (f - y) / sigma ** 2
    g = torch.einsum("nkp,nk->np", J, r)
    P = g.shape[1]
    H = g.T @ g + 0.8 * torch.eye(P, dtype=DT)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    loglik = -tF.cross_entropy(f, y, reduction="sum") if likelihood == "classification" else \
        -0.5 * ((f - y) ** 2).sum() / sigma ** 2 - 0.5 * 20 * K * math.log(2 * math.pi * sigma ** 2)
    ref = loglik - 0.4 * (theta ** 2).sum() - 0.5 * (torch.logdet(H) - P * math.log(0.8))
    assert torch.allclose(la.log_marginal_likelihood(), ref, rtol=1e-10)


def test_monte_carlo_fisher_curvature_converges_to_the_ggn():
    model, x, y = _problem(seed=5)
    la = Laplace(model, "classification", PMatDense, curvature="mc", mc_samples=400).fit((x, y))
    F = fim_dense(model, x)
    err = (la.ggn.to_torch() - F).abs().max() / F.abs().max()
    assert 1e-4 < err < 0.15  # sampled (not exact), and near the GGN
    with pytest.raises(ValueError, match="curvature"):
        Laplace(model, curvature="hessian")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rep", [PMatDense, PMatDiag, PMatKFAC], ids=lambda r: r.__name__)
def test_last_layer_ggn_without_backward_pass(rep, bias):
    """A linear last layer of a classifier: Σ_i (x̃ x̃ᵀ) ⊗ Λ_i from one forward pass (no backward
    through the layer), equal to the dense brute force (Dense) and to FIM's build (Diag, KFAC)."""
    from nngeometry import FIM
    from nngeometry.layercollection import LayerCollection
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 5, bias=bias)).to(DT)
    x, y = torch.randn(20, 3, dtype=DT), torch.randint(0, 5, (20,))
    lc = LayerCollection.from_model(model).last_layer()
    calls = []
    h = model[2].register_full_backward_hook(lambda *a: calls.append(1))
    la = Laplace(model, "classification", rep, layer_collection=lc).fit([(x[:8], y[:8]), (x[8:], y[8:])])
    h.remove()
    assert la._last_layer_fast() and not calls
    ref = fim_dense(model, x, layer_collection=lc) if rep is PMatDense else \
        FIM(model, [(x, y)], rep, layer_collection=lc).to_torch()
    assert torch.allclose(la.ggn.to_torch(), ref, rtol=1e-11, atol=1e-14)


def test_subnetwork_with_a_diagonal():
    model, x, y = _problem(seed=8)
    P = sum(p.numel() for p in model.parameters())
    idx = torch.tensor([0, 4, 9, 20, P - 2])
    la = Laplace(model, "classification", PMatDiag, prior_precision=0.6,
                 subnetwork_indices=idx).fit((x, y))
    F = fim_dense(model, x)
    H = torch.diag(len(y) * F.diagonal()[idx] + 0.6)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])[idx]
    loglik = -tF.cross_entropy(model(x).detach(), y, reduction="sum")
    ref = loglik - 0.3 * (theta ** 2).sum() - 0.5 * (torch.logdet(H) - 5 * math.log(0.6))
    assert torch.allclose(la.log_marginal_likelihood(), ref, rtol=1e-11)
    xs = torch.randn(3, 3, dtype=DT)
    J = per_example_jacobian(model, xs)[..., idx]
    var = torch.einsum("ikp,pq,ilq->ikl", J, torch.linalg.inv(H), J)
    assert torch.allclose(la.functional_variance(xs), var, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("rep", [PMatDense, PMatDiag], ids=lambda r: r.__name__)
def test_state_dict_round_trip_of_a_subnetwork(rep):
    """A subnetwork Laplace saved and loaded into a Laplace built without the indices (they come
    from the state): the same evidence, predictive, and samples written into the same entries."""
    model, x, y = _problem(seed=5)
    P = sum(p.numel() for p in model.parameters())
    idx = torch.tensor([1, 5, 11, 17, P - 1])
    la = Laplace(model, "classification", rep, prior_precision=0.8,
                 subnetwork_indices=idx).fit((x, y))
    buf = io.BytesIO()
    torch.save(la.state_dict(), buf)
    buf.seek(0)
    new = Laplace(model, "classification", rep).load_state_dict(torch.load(buf))
    assert torch.equal(new.subnetwork_indices, idx)
    assert new.ggn.size(0) == 5 and torch.equal(new.ggn.to_torch(), la.ggn.to_torch())
    assert torch.equal(new.log_marginal_likelihood(0.3), la.log_marginal_likelihood(0.3))
    xs = torch.randn(3, 3, dtype=DT)
    assert torch.equal(new.functional_variance(xs), la.functional_variance(xs))
    g = torch.Generator().manual_seed(0)
    probs = new.predictive(xs, pred_type="nn", n_samples=4, generator=g)
    g = torch.Generator().manual_seed(0)
    assert torch.allclose(probs, la.predictive(xs, pred_type="nn", n_samples=4, generator=g),
                          rtol=1e-13)
    # built with the same indices: accepted; with others: refused
    Laplace(model, "classification", rep, subnetwork_indices=idx).load_state_dict(la.state_dict())
    with pytest.raises(ValueError, match="other subnetwork_indices"):
        Laplace(model, "classification", rep,
                subnetwork_indices=idx[:3]).load_state_dict(la.state_dict())
