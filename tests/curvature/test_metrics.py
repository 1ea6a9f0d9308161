"""FIM (closed form) and FIM_MonteCarlo against brute-force Fisher matrices."""
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from brute import fim_dense, per_example_jacobian
from nngeometry import FIM, FIM_MonteCarlo
from nngeometry.layercollection import LayerCollection
from nngeometry.object import PMatDense
from nngeometry.curvature import multinomial_covariance_sqrt

TOL = dict(atol=1e-11, rtol=1e-9)


def mlp(n_out, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, n_out)).double()


def cnn(n_out, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(),
                         nn.Linear(2 * 3 * 3, n_out)).double()


def inputs(kind, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (n, 4) if kind == "mlp" else (n, 1, 5, 5)
    return 2 * torch.randn(*shape, generator=g, dtype=torch.float64)


def rel_fro(a, b):
    return (torch.linalg.norm(a - b) / torch.linalg.norm(b)).item()


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("variant,n_out", [("classif_logits", 4), ("classif_binary_logits", 1),
                                           ("regression", 3)])
def test_fim_closed_form_vs_brute(kind, variant, n_out):
    model = (mlp if kind == "mlp" else cnn)(n_out)
    x = inputs(kind, 9)
    y = torch.zeros(9, dtype=torch.long)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)  # 3 batches, the last one partial
    F = FIM(model, loader, PMatDense, variant=variant)
    Fb = fim_dense(model, x, variant)
    assert F.to_torch().dtype == torch.float64
    assert torch.allclose(F.to_torch(), Fb, **TOL)
    assert torch.linalg.norm(Fb) > 1e-3  # not trivially zero
    # a single mini-batch gives the same matrix
    F1 = FIM(model, (x, y), PMatDense, variant=variant)
    assert torch.allclose(F1.to_torch(), Fb, **TOL)


def test_fim_sub_collection():
    model = mlp(3)
    x = inputs("mlp", 6)
    lc = LayerCollection.from_model(model)
    sub = lc.last_layer()
    F = FIM(model, (x,), PMatDense, layer_collection=sub)
    Fb = fim_dense(model, x)
    s = lc.slice("2")
    assert F.size() == (sub.numel(), sub.numel())
    assert torch.allclose(F.to_torch(), Fb[s, s], **TOL)


def test_fim_targets_unused_and_custom_function():
    model = mlp(3)
    x = inputs("mlp", 6)
    F1 = FIM(model, (x, torch.zeros(6, dtype=torch.long)), PMatDense)
    F2 = FIM(model, (x, torch.full((6,), 2)), PMatDense)
    assert torch.equal(F1.to_torch(), F2.to_torch())
    # function= sees the whole batch; here it doubles the logits
    F3 = FIM(model, (x, None), PMatDense, function=lambda inp, tgt: 2 * model(inp))
    model2 = mlp(3)
    with torch.no_grad():
        model2[2].weight.mul_(2)
        model2[2].bias.mul_(2)
    # d(2 f)/dθ for the first layers = 2 × ...; compare with brute force on the scaled model
    Jb = per_example_jacobian(model, x, function=lambda o: 2 * o)
    with torch.no_grad():
        logits = 2 * model(x)
    p = torch.softmax(logits, 1)
    S = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    assert torch.allclose(F3.to_torch(), torch.einsum("nkp,nkl,nlq->pq", Jb, S, Jb) / 6, **TOL)


def test_fim_verbose_progress_bar(capsys):
    model = mlp(3)
    x = inputs("mlp", 8)
    loader = DataLoader(TensorDataset(x), batch_size=4)
    F = FIM(model, loader, PMatDense, verbose=True)
    assert torch.allclose(F.to_torch(), fim_dense(model, x), **TOL)
    err = capsys.readouterr().err
    assert "2/2" in err  # tqdm bar over the 2 batches


def test_multinomial_covariance_sqrt():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(3 * torch.randn(50, 6, generator=g, dtype=torch.float64), dim=1)
    # rows with zeros: first, middle, last, and all-but-one positions
    z = torch.tensor([[0.0, 0.2, 0.3, 0.1, 0.4, 0.0],
                      [0.5, 0.0, 0.0, 0.25, 0.25, 0.0],
                      [0.0, 0.0, 0.0, 0.0, 0.0, 1.0],
                      [1.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                      [0.0, 0.0, 1.0, 0.0, 0.0, 0.0],
                      [0.2, 0.2, 0.2, 0.2, 0.2, 0.0]], dtype=torch.float64)
    for P in (p, z):
        L = multinomial_covariance_sqrt(P)
        assert L.shape == (P.shape[0], 6, 5)
        assert torch.isfinite(L).all()
        S = torch.diag_embed(P) - P.unsqueeze(2) * P.unsqueeze(1)
        assert torch.allclose(L @ L.transpose(1, 2), S, atol=1e-14, rtol=0)
    # two classes: a single column
    p2 = torch.tensor([[0.3, 0.7]], dtype=torch.float64)
    L2 = multinomial_covariance_sqrt(p2)
    assert torch.allclose(L2 @ L2.transpose(1, 2), torch.tensor([[[0.21, -0.21], [-0.21, 0.21]]],
                                                                dtype=torch.float64), atol=1e-15)


# ---------------------------------------------------------------- Monte-Carlo
# With T trials on n examples, the estimate is a mean of n·T independent rank-one terms (here
# n·T = 24000, or 8000 examples × 9 pixels for segmentation); for these tiny models the relative
# Frobenius error is about c/sqrt(n·T) with c of order a few (measured 0.015–0.04 over seeds).
# 0.1 leaves room for the seed while any systematic error of 10 % or more (a factor, a missing
# term) fails: 2·F is at relative error 1.
MC_TOL = 0.1


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_fim_monte_carlo_classif_logits_vs_closed_form(kind):
    torch.manual_seed(0)
    model = (mlp if kind == "mlp" else cnn)(3)
    x = inputs(kind, 300)
    Fb = fim_dense(model, x)
    torch.manual_seed(1)
    Fmc = FIM_MonteCarlo(model, (x,), PMatDense, variant="classif_logits", trials=80).to_torch()
    assert rel_fro(Fmc, Fb) < MC_TOL
    assert rel_fro(2 * Fmc, Fb) > MC_TOL  # the tolerance rejects a wrong matrix
    assert rel_fro(Fmc, 2 * Fb) > MC_TOL


def test_fim_monte_carlo_logsoftmax():
    torch.manual_seed(0)
    model = nn.Sequential(mlp(3), nn.LogSoftmax(dim=1))
    x = inputs("mlp", 300)
    # log_softmax is idempotent on logits: the closed form of the logits of a log-softmax model
    # is its Fisher
    Fb = fim_dense(model, x, "classif_logits")
    torch.manual_seed(2)
    Fmc = FIM_MonteCarlo(model, (x,), PMatDense, variant="classif_logsoftmax", trials=80).to_torch()
    assert rel_fro(Fmc, Fb) < MC_TOL
    assert rel_fro(0.5 * Fmc, Fb) > MC_TOL


def test_fim_monte_carlo_regression_covariance():
    model = mlp(2)
    x = inputs("mlp", 300)
    lc = LayerCollection.from_model(model)
    J = per_example_jacobian(model, x, lc)
    JtJ = torch.einsum("nkp,nkq->pq", J, J) / 300
    sigma2 = 4.0
    torch.manual_seed(3)
    Fmc = FIM_MonteCarlo(model, (x,), PMatDense, variant="regression", trials=80,
                         covariance=sigma2).to_torch()
    assert rel_fro(Fmc, JtJ / sigma2) < MC_TOL
    assert rel_fro(Fmc, sigma2 * JtJ) > MC_TOL  # upstream's convention is not ours
    torch.manual_seed(4)
    F1 = FIM_MonteCarlo(model, (x,), PMatDense, variant="regression", trials=80).to_torch()
    assert rel_fro(F1, JtJ) < MC_TOL


class SegNet(nn.Module):
    def __init__(self, C=3):
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, padding=1)
        self.c2 = nn.Conv2d(3, C, 1)

    def forward(self, x):
        return self.c2(torch.tanh(self.c1(x)))  # (n, C, H, W)


def test_fim_monte_carlo_segmentation():
    torch.manual_seed(0)
    model = SegNet().double()
    n, C = 100, 3
    x = torch.randn(n, 2, 3, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    lc = LayerCollection.from_model(model)
    J = per_example_jacobian(model, x, lc)  # (n, C*H*W, P), outputs in (C, H, W) order
    J = J.reshape(n, C, 9, -1)
    with torch.no_grad():
        p = torch.softmax(model(x), dim=1).reshape(n, C, 9)
    S = torch.diag_embed(p.transpose(1, 2)) - p.transpose(1, 2).unsqueeze(3) * p.transpose(1, 2).unsqueeze(2)
    # pixels are independent given x: the Fisher sums the per-pixel Fishers
    Fb = torch.einsum("nkxp,nxkl,nlxq->pq", J, S, J) / n
    torch.manual_seed(6)
    Fmc = FIM_MonteCarlo(model, (x,), PMatDense, variant="segmentation_logits", trials=80).to_torch()
    assert rel_fro(Fmc, Fb) < MC_TOL
    assert rel_fro(Fmc / 9, Fb) > MC_TOL  # a mean over pixels instead of a sum would fail


def test_fim_monte_carlo_single_trial_is_a_sample():
    """trials=1: each example contributes one rank-one term g gᵀ with g = ∇log p(y|x)."""
    model = mlp(3)
    x = inputs("mlp", 1)
    torch.manual_seed(7)
    F = FIM_MonteCarlo(model, (x,), PMatDense, trials=1).to_torch()
    evals = torch.linalg.eigvalsh(F)
    assert evals[-1] > 1e-6 and (evals[:-1].abs() < 1e-12 * evals[-1]).all()


def test_one_trial_sampler_draws_from_the_softmax():
    """trials=1 samples labels with an exponential race (argmax p/E): the empirical label
    frequencies must match softmax(f), and a class of probability 0 is never drawn."""
    from nngeometry.curvature import monte_carlo_function

    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0, -200.0]], dtype=torch.float64)
    n = 200_000
    f = monte_carlo_function(lambda x: x, "classif_logits", trials=1)
    lp = f(logits.expand(n, -1)).detach()[:, 0]
    logp = torch.log_softmax(logits[0], 0)
    labels = (lp.unsqueeze(1) - logp.unsqueeze(0)).abs().argmin(1)
    freq = torch.bincount(labels, minlength=5).double() / n
    p = logp.exp()
    sigma = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() <= 5 * sigma + 1e-12).all(), (freq, p)
    assert freq[4] == 0
