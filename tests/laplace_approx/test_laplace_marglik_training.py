"""marglik_training against a hand-written loop with the dense float64 evidence."""
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nngeometry.laplace import marglik_training
from nngeometry.object import PMatEKFAC

from brute import fim_dense

DT = torch.float64


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    x, y = torch.randn(24, 2, dtype=DT), torch.randn(24, 2, dtype=DT)
    return model, x, y


def _brute_lml(model, x, y, F, lam_flat, sigma):
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    f = model(x).detach()
    n, K = f.shape
    H = n / sigma ** 2 * F + torch.diag(lam_flat)
    loglik = -0.5 * ((f - y) ** 2).sum() / sigma ** 2 - 0.5 * n * K * torch.log(2 * math.pi * sigma ** 2)
    return loglik - 0.5 * (lam_flat * theta ** 2).sum() - 0.5 * (torch.logdet(H) - torch.log(lam_flat).sum())


def test_marglik_training_equals_the_hand_written_schedule():
    model, x, y = _problem()
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    la, _, ml, losses = marglik_training(model, loader, "regression", "full", n_epochs=2,
                                         n_hypersteps=2, prior_structure="layerwise",
                                         optimizer_kwargs={"lr": 0.01}, sigma_noise_init=0.7)
    ref, x, y = _problem()
    counts = torch.tensor([p.numel() for p in ref.parameters()])
    log_lam = torch.zeros(4, dtype=DT, requires_grad=True)
    log_sig = torch.tensor(math.log(0.7), dtype=DT, requires_grad=True)
    opt = torch.optim.Adam(ref.parameters(), lr=0.01)
    hopt = torch.optim.Adam([log_lam, log_sig], lr=0.1)
    ref_ml, ref_loss, best = [], [], (math.inf, None)
    for _ in range(2):
        total = 0.0
        for i in range(0, 24, 8):
            xb, yb = x[i:i + 8], y[i:i + 8]
            opt.zero_grad()
            lam = torch.repeat_interleave(log_lam.detach().exp(), counts)
            theta = torch.cat([p.reshape(-1) for p in ref.parameters()])
            sig2 = float(log_sig.exp()) ** 2
            # 2σ² × (Gaussian NLL per example + prior / N)
            loss = ((ref(xb) - yb) ** 2).sum() / 8 + 2 * sig2 * 0.5 * (lam * theta ** 2).sum() / 24
            loss.backward()
            opt.step()
            total += float(loss) * 8
        ref_loss.append(total / 24)
        F = fim_dense(ref, x, variant="regression")
        for _ in range(2):
            hopt.zero_grad()
            at = (log_lam.detach().clone(), log_sig.detach().clone())
            neg = -_brute_lml(ref, x, y, F, torch.repeat_interleave(log_lam.exp(), counts), log_sig.exp())
            neg.backward()
            hopt.step()
            ref_ml.append(float(neg))
        if ref_ml[-1] < best[0]:
            best = (ref_ml[-1], at)
    assert torch.allclose(torch.tensor(losses), torch.tensor(ref_loss), rtol=1e-10)
    assert torch.allclose(torch.tensor(ml), torch.tensor(ref_ml), rtol=1e-10)
    assert torch.allclose(la.prior_precision, best[1][0].exp(), rtol=1e-10)
    assert math.isclose(la.sigma_noise, float(best[1][1].exp()), rel_tol=1e-10)


def test_marglik_training_bad_arguments():
    model, x, y = _problem()
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    with pytest.raises(NotImplementedError, match="layerwise"):
        marglik_training(model, loader, "regression", representation=PMatEKFAC, n_epochs=1)
    with pytest.raises(ValueError, match="weight_decay"):
        marglik_training(model, loader, "regression", "full", optimizer_kwargs={"weight_decay": 1e-3})
    with pytest.raises(ValueError, match="backend"):
        marglik_training(model, loader, "regression", "full", backend=object())
