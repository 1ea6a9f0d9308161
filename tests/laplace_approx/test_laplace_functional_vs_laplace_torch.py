"""The functional (GP) Laplace against laplace-torch's FunctionalLaplace (0.3), float64, where it
is installed (skips otherwise). laplace-torch keeps only the diagonal of each output Hessian
(exact for regression, an approximation for classification) and scales the prior variance by
M/n: with regression on all the points the predictive covariances are the same GP's. Its
evidence is a different formula (the scatter of the residuals through (K + σ²I)⁻¹), so only the
predictive is compared."""
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

laplace = pytest.importorskip("laplace")

from nngeometry.laplace import FunctionalLaplace  # noqa: E402

DT = torch.float64


def test_regression_predictive_equals_laplace_torch_functional_laplace():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(DT)
    x, y = torch.randn(12, 3, dtype=DT), torch.randn(12, 2, dtype=DT)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    theirs = laplace.Laplace(model, "regression", subset_of_weights="all",
                             hessian_structure="gp", n_subset=12, prior_precision=0.7,
                             sigma_noise=0.6)
    theirs.fit(loader)
    ours = FunctionalLaplace(model, "regression", prior_precision=0.7,
                             sigma_noise=0.6).fit(loader)
    xs = torch.randn(4, 3, dtype=DT)
    mean_t, var_t = theirs(xs, pred_type="gp")
    mean_o, var_o = ours.predictive(xs)
    assert torch.allclose(mean_o, mean_t.to(DT), rtol=1e-12)
    # ours is of y (σ² I added), laplace-torch's of f
    assert torch.allclose(var_o, var_t.to(DT) + 0.36 * torch.eye(2, dtype=DT), rtol=1e-8,
                          atol=1e-12)
