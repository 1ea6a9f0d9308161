"""Our log marginal likelihood equals laplace-torch's (0.3) on the same model and data, float64,
after their conventions (sum over the data, prior precision, temperature 1, σ for regression).
Runs where laplace-torch is installed (a separate environment: it needs torchvision), skips
otherwise."""
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

laplace = pytest.importorskip("laplace")

from nngeometry.laplace import Laplace  # noqa: E402
from nngeometry.object import PMatDense, PMatDiag  # noqa: E402

DT = torch.float64
STRUCTURES = {"full": PMatDense, "diag": PMatDiag}


def _problem(likelihood):
    torch.manual_seed(0)
    K = 3 if likelihood == "classification" else 2
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, K)).to(DT)
    x = torch.randn(40, 4, dtype=DT)
    y = torch.randint(0, K, (40,)) if likelihood == "classification" else torch.randn(40, K, dtype=DT)
    return model, DataLoader(TensorDataset(x, y), batch_size=10)


@pytest.mark.parametrize("structure", list(STRUCTURES))
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_log_marginal_likelihood_equals_laplace_torch(likelihood, structure):
    model, loader = _problem(likelihood)
    prior, sigma = 0.8, (0.7 if likelihood == "regression" else 1.0)
    theirs = laplace.Laplace(model, likelihood, subset_of_weights="all",
                             hessian_structure=structure, prior_precision=prior,
                             sigma_noise=sigma)
    theirs.fit(loader)
    ours = Laplace(model, likelihood, STRUCTURES[structure], prior_precision=prior,
                   sigma_noise=sigma).fit(loader)
    ref = theirs.log_marginal_likelihood().detach()
    got = ours.log_marginal_likelihood().detach()
    assert torch.allclose(got, ref.to(got.dtype), rtol=1e-6, atol=0), (float(got), float(ref))


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_kron_log_marginal_likelihood_equals_laplace_torch_per_layer_prior(likelihood):
    """KronLaplace factors weight and bias separately: separate_weight_and_bias=True; a prior
    precision per parameter group (their layout: weight, bias of each layer) is our per-layer
    dict when weight and bias share it."""
    from nngeometry.object import PMatKFAC
    model, loader = _problem(likelihood)
    sigma = 0.7 if likelihood == "regression" else 1.0
    theirs = laplace.Laplace(model, likelihood, subset_of_weights="all",
                             hessian_structure="kron", prior_precision=0.8, sigma_noise=sigma)
    theirs.fit(loader)
    ours = Laplace(model, likelihood, PMatKFAC, prior_precision=0.8, sigma_noise=sigma,
                   separate_weight_and_bias=True).fit(loader)
    assert torch.allclose(ours.log_marginal_likelihood().detach(),
                          theirs.log_marginal_likelihood().detach().to(DT), rtol=1e-6, atol=0)
    theirs.prior_precision = torch.tensor([0.5, 0.5, 2.0, 2.0])
    prior = {"0": 0.5, "2": 2.0}
    assert torch.allclose(ours.log_marginal_likelihood(prior).detach(),
                          theirs.log_marginal_likelihood().detach().to(DT), rtol=1e-6, atol=0)
