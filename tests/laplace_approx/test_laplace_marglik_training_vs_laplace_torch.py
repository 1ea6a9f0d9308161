"""marglik_training against laplace-torch's (0.3) on the same schedule, float64, where
laplace-torch is installed (skips otherwise)."""
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

laplace = pytest.importorskip("laplace")

from nngeometry.laplace import marglik_training  # noqa: E402

DT = torch.float64


def _problem(likelihood):
    torch.manual_seed(0)
    K = 3 if likelihood == "classification" else 1
    model = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, K)).to(DT)
    x = torch.randn(30, 2, dtype=DT)
    y = torch.randint(0, K, (30,)) if likelihood == "classification" else torch.randn(30, K, dtype=DT)
    return model, DataLoader(TensorDataset(x, y), batch_size=10)


@pytest.mark.parametrize("structure", ["full", "diag"])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_marglik_training_after_a_fixed_schedule(likelihood, structure):
    kw = dict(likelihood=likelihood, hessian_structure=structure, n_epochs=4, lr_hyp=0.1,
              prior_structure="layerwise", n_hypersteps=3, marglik_frequency=2,
              optimizer_kwargs={"lr": 1e-2}, sigma_noise_init=0.8)
    model, loader = _problem(likelihood)
    t_la, t_model, t_ml, t_loss = laplace.marglik_training(model, loader, **kw)
    model, loader = _problem(likelihood)
    o_la, o_model, o_ml, o_loss = marglik_training(model, loader, **kw)
    assert torch.allclose(torch.tensor(o_loss), torch.tensor(t_loss), rtol=1e-8)
    assert torch.allclose(torch.tensor(o_ml), torch.tensor(t_ml), rtol=1e-8)
    assert torch.allclose(o_la.prior_precision, t_la.prior_precision.to(DT), rtol=1e-8)
    if likelihood == "regression":
        assert abs(float(o_la.sigma_noise) - float(t_la.sigma_noise)) < 1e-8 * float(o_la.sigma_noise)
