"""The deliberate differences from upstream nngeometry listed in docs/index.md, each against a
brute-force reference (the other differences have their tests where the docs say)."""
import copy

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from brute import fim_dense, per_example_jacobian
from nngeometry import FIM
from nngeometry.backend import TorchHooksJacobianBackend
from nngeometry.layercollection import LayerCollection
from nngeometry.object import PMatDense, PMatImplicit, PVector

DT = torch.float64


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)


def test_drop_last_divides_by_the_examples_seen():
    model = _mlp()
    x, y = torch.randn(10, 4, dtype=DT), torch.randint(0, 3, (10,))
    loader = DataLoader(TensorDataset(x, y), batch_size=4, drop_last=True)  # sees 8 of 10
    F = FIM(model, loader, PMatDense, variant="classif_logits").to_torch()
    torch.testing.assert_close(F, fim_dense(model, x[:8]), rtol=1e-10, atol=1e-12)
    # upstream's normalization (by the 10 examples of the sampler) would be 0.8 times this
    assert not torch.allclose(F, 0.8 * fim_dense(model, x[:8]))


def test_pre_batched_loader_divides_by_the_examples_not_the_batches():
    model = _mlp(1)
    x = torch.randn(3, 5, 4, dtype=DT)  # 3 pre-made batches of 5 examples
    loader = DataLoader(TensorDataset(x, torch.zeros(3, 5, dtype=torch.long)), batch_size=None)
    F = FIM(model, loader, PMatDense, variant="regression").to_torch()
    torch.testing.assert_close(F, fim_dense(model, x.reshape(15, 4), variant="regression"),
                               rtol=1e-10, atol=1e-12)


class _BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 5)
        self.bn = nn.BatchNorm1d(5)
        self.out = nn.Linear(5, 2)

    def forward(self, x):
        return self.out(torch.relu(self.bn(self.fc(x))))


def test_implicit_products_with_batchnorm_in_eval_mode():
    """Upstream's PMatImplicit refuses mv/vTMv with BatchNorm layers; in eval mode the
    per-example Jacobians are defined and the products are exact."""
    torch.manual_seed(2)
    model = _BNNet().to(DT)
    with torch.no_grad():  # non-trivial running statistics
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    model.eval()
    x = torch.randn(12, 4, dtype=DT)
    lc = LayerCollection.from_model(model)
    J = per_example_jacobian(model, x, lc)  # (n, K, P)
    ref = torch.einsum("nkp,nkq->pq", J, J) / x.shape[0]
    g = TorchHooksJacobianBackend(model, lambda x: model(x), layer_collection=lc)
    M = PMatImplicit(generator=g, examples=DataLoader(TensorDataset(x), batch_size=5))
    v = PVector(lc, vector_repr=torch.randn(lc.numel(), dtype=DT))
    torch.testing.assert_close(M.mv(v).to_torch(), ref @ v.to_torch(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(M.vTMv(v), v.to_torch() @ ref @ v.to_torch(), rtol=1e-10,
                               atol=1e-12)
    torch.testing.assert_close(PMatDense(generator=g, examples=(x,)).to_torch(), ref,
                               rtol=1e-10, atol=1e-12)


class _ReachedTwice(nn.Module):
    """One Linear registered under two names (``fc`` and ``seq.0``), as upstream's LayerNorm
    test model does."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.seq = nn.Sequential(self.fc, nn.Tanh())

    def forward(self, x):
        return self.seq(x)


def test_implicit_products_leave_a_module_reached_twice_intact():
    """torch.func.functional_call (torch 2.13) left plain tensors in place of the Parameters of
    a module reachable under two names: every later use of the model broke."""
    torch.manual_seed(3)
    model = _ReachedTwice().to(DT)
    x = torch.randn(7, 4, dtype=DT)
    lc = LayerCollection.from_model(model)
    # on a copy: the brute force uses functional_call, which has the bug
    J = per_example_jacobian(copy.deepcopy(model), x, lc)
    ref = torch.einsum("nkp,nkq->pq", J, J) / x.shape[0]
    M = PMatImplicit(lc, TorchHooksJacobianBackend(model), examples=(x,))
    v = PVector(lc, vector_repr=torch.randn(lc.numel(), dtype=DT))
    for _ in range(2):
        torch.testing.assert_close(M.mv(v).to_torch(), ref @ v.to_torch(), rtol=1e-10,
                                   atol=1e-12)
        torch.testing.assert_close(M.vTMv(v), v.to_torch() @ ref @ v.to_torch(), rtol=1e-10,
                                   atol=1e-12)
    assert all(type(p) is nn.Parameter for p in model.parameters())
    assert model.seq[0].weight is model.fc.weight
    # the Hessian's products take the same path
    from nngeometry import Hessian
    y = torch.randint(0, 3, (7,))
    H = Hessian(model, (x, y), PMatImplicit, layer_collection=lc)
    H.mv(v)
    H.mv(v)
    assert all(type(p) is nn.Parameter for p in model.parameters())
