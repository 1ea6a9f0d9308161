"""Subnetworks (subnetwork_indices=), last layer, per-example gradients and Jacobians, the
activation Hessian and scale factors, against brute force (float64)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nngeometry import (FIM, GGN, ActivationHessian, EmpiricalFisher, FIM_MonteCarlo,
                        per_example_gradients, per_example_jacobians)
from nngeometry.layercollection import LayerCollection
from nngeometry.object import PMatDense, PMatDiag, PMatKFAC, PVector
from test_curvatures_entry import (brute_grads, brute_jac, ce_sum, make, reference)

TOL = dict(atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("entry", ["ef", "ggn", "fim"])
def test_subnetwork_is_the_restriction(entry):
    model, x, y = make("cnn")
    dl = [(x[:4], y[:4]), (x[4:], y[4:])]
    ref = reference(entry, model, x, y)
    P = ref.shape[0]
    idx = torch.tensor([P - 1, 0, 5, 17, P // 2])
    build = {"ef": lambda **k: EmpiricalFisher(model, dl, PMatDense, loss_function=ce_sum, **k),
             "ggn": lambda **k: GGN(model, dl, PMatDense, loss_function=ce_sum, **k),
             "fim": lambda **k: FIM(model, dl, PMatDense, **k)}[entry]
    sub = build(subnetwork_indices=idx)
    torch.testing.assert_close(sub.to_torch(), ref[idx][:, idx], **TOL)
    # dense operations and vectors on the subnetwork
    v = torch.randn(5, dtype=torch.float64)
    pv = PVector(sub.layer_collection, vector_repr=v)
    torch.testing.assert_close(sub.mv(pv).to_torch(), ref[idx][:, idx] @ v, **TOL)
    torch.testing.assert_close(
        sub.solve(pv, regul=0.1).to_torch(),
        torch.linalg.solve(ref[idx][:, idx] + 0.1 * torch.eye(5, dtype=torch.float64), v), **TOL)
    mask = torch.zeros(P, dtype=torch.bool)
    mask[idx] = True
    torch.testing.assert_close(build(subnetwork_indices=mask).to_torch(),
                               ref[mask][:, mask], **TOL)


def test_subnetwork_errors():
    model, x, y = make("mlp")
    P = LayerCollection.from_model(model).numel()
    with pytest.raises(ValueError, match="pass PMatDense"):
        FIM(model, (x,), PMatDiag, subnetwork_indices=[0, 1])
    with pytest.raises(ValueError, match=r"must lie in \[0, "):
        FIM(model, (x,), PMatDense, subnetwork_indices=[0, P])
    with pytest.raises(ValueError, match="repeated"):
        FIM(model, (x,), PMatDense, subnetwork_indices=[1, 1])
    with pytest.raises(ValueError, match="integer"):
        FIM(model, (x,), PMatDense, subnetwork_indices=torch.tensor([0.0, 1.0]))
    # Monte-Carlo too
    d = FIM_MonteCarlo(model, (x,), PMatDense, seed=0, subnetwork_indices=[0, 3]).to_torch()
    full = FIM_MonteCarlo(model, (x,), PMatDense, seed=0).to_torch()
    torch.testing.assert_close(d, full[[0, 3]][:, [0, 3]], **TOL)


@pytest.mark.parametrize("kind", ["mlp", "cnn", "seq"])
def test_per_example_gradients_and_jacobians(kind):
    model, x, y = make(kind)
    dl = [(x[:4], y[:4]), (x[4:], y[4:])]
    torch.testing.assert_close(per_example_gradients(model, dl, loss_function=ce_sum),
                               brute_grads(model, x, y, ce_sum), **TOL)
    torch.testing.assert_close(per_example_jacobians(model, dl), brute_jac(model, x), **TOL)
    last = LayerCollection.from_model(model).last_layer()
    P = LayerCollection.from_model(model).numel()
    torch.testing.assert_close(per_example_jacobians(model, dl, last_layer=True),
                               brute_jac(model, x)[:, :, P - last.numel():], **TOL)
    torch.testing.assert_close(per_example_gradients(model, dl, last_layer=True, class_dim=-1),
                               brute_grads(model, x, y, ce_sum)[:, P - last.numel():], **TOL)


class _Counting(nn.Module):
    """Counts the backward passes through it."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def forward(self, x):
        if x.requires_grad:
            x.register_hook(self._hit)
        return x

    def _hit(self, g):
        self.count += 1


def test_last_layer_runs_no_backward_below_it():
    torch.manual_seed(0)
    probe = _Counting()
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), probe, nn.Linear(6, 3)).double().eval()
    x = torch.randn(5, 4, dtype=torch.float64)
    last = LayerCollection.from_model(model).last_layer()
    for rep in (PMatDense, PMatDiag, PMatKFAC):
        FIM(model, (x,), rep, layer_collection=last)
    assert probe.count == 0
    FIM(model, (x,), PMatDiag)
    assert probe.count > 0
    # the model's parameters are as they were
    assert all(p.requires_grad for p in model.parameters())
    # and the last-layer matrix is the full one's last block
    full = FIM(model, (x,), PMatDense).to_torch()
    k = last.numel()
    torch.testing.assert_close(FIM(model, (x,), PMatDense, layer_collection=last).to_torch(),
                               full[-k:, -k:], **TOL)


def test_activation_hessian():
    """∇²_z Σ_i ℓ_i for z the hidden features of an MLP, against torch.func.hessian."""
    model, x, y = make("mlp")
    h = torch.tanh(model[0](x)).detach()

    def L(z):
        return ce_sum(model[2](z), y).sum()
    ref = torch.func.hessian(L)(h).reshape(h.numel(), h.numel())
    ah = ActivationHessian(model, (x, y), "1")  # output of the Tanh
    torch.testing.assert_close(ah.to_torch(), ref, **TOL)
    v = torch.randn_like(h)
    torch.testing.assert_close(ah.mv(v), (ref @ v.reshape(-1)).reshape(h.shape), **TOL)
    # the input of the last layer is the same feature
    torch.testing.assert_close(ActivationHessian(model, (x, y), "2", io="input").to_torch(),
                               ref, **TOL)
    with pytest.raises(ValueError, match="no module named 'nope'"):
        ActivationHessian(model, (x, y), "nope")


def test_scale_factors_are_scalar_multiplication():
    """Sum over examples instead of the mean: n · M; laplax's num_total_samples /
    num_curv_samples: the same scalar on the subset's matrix."""
    model, x, y = make("mlp")
    M = FIM(model, (x,), PMatDense)
    n = x.shape[0]
    J = brute_jac(model, x)
    with torch.no_grad():
        p = torch.softmax(model(x), 1)
    S = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    total = torch.einsum("ndp,nde,neq->pq", J, S, J)  # Σ_i, not the mean
    torch.testing.assert_close((n * M).to_torch(), total, **TOL)
    sub = FIM(model, (x[:2],), PMatDiag)
    torch.testing.assert_close(((100 / 2) * sub).get_diag(), 100 * sub.get_diag() / 2)
    assert F is not None
