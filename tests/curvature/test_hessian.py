"""Hessian(...): the exact Hessian of the loss summed over batches, checked in float64 against
torch.func.hessian of the total loss (written here, independently of the backend), in every
representation that supports it; the Gauss-Newton-only representations are refused."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import nngeometry
from nngeometry.backend import HessianBackend
from nngeometry.layercollection import LayerCollection
from nngeometry.metrics import FIM, Hessian
from nngeometry.object import (PMatBlockDiag, PMatDense, PMatDiag, PMatEKFAC,
                               PMatEKFACBlockDiag, PMatImplicit, PMatKFAC, PMatLowRank, PMatMixed,
                               PMatQuasiDiag)
from nngeometry.object.map import PFMapDense
from nngeometry.object.vector import PVector

DT = torch.float64


def close(a, b, rtol=1e-10):
    scale = max(float(b.abs().max()), 1e-30)
    assert float((a - b).abs().max()) <= rtol * scale, float((a - b).abs().max()) / scale


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 2)
        self.fc = nn.Linear(2 * 2 * 2, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def cnn():
    torch.manual_seed(1)
    return CNN().to(DT)


def data(model, n=6, seed=2):
    g = torch.Generator().manual_seed(seed)
    shape = (n, 4) if isinstance(model, nn.Sequential) else (n, 2, 3, 3)
    x = torch.randn(*shape, generator=g, dtype=DT)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def loader(x, y, batch_size):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def brute_hessian(model, x, y, lc=None, loss=None):
    """The Hessian of Σ_i CE(model(x_i), y_i) w.r.t. the flat parameters of the collection
    (layout: layers in order, weight.flatten() then bias), by classic autograd double backward
    (torch.autograd.functional.hessian, one backward per parameter), independent of the
    torch.func forward-over-reverse path of the backend. (torch.func.hessian is not used: on
    training-mode BatchNorm it disagrees with finite differences, the backend does not.)"""
    lc = lc or LayerCollection.from_model(model)
    names = [f"{lid}.{p}" for lid, layer in lc.layers.items() for p in layer.param_names()]
    allp = {k: v.detach() for k, v in model.named_parameters()}
    shapes = [allp[k].shape for k in names]
    flat = torch.cat([allp[k].reshape(-1) for k in names])
    loss = loss or (lambda out, y: F.cross_entropy(out, y, reduction="sum"))

    def total(theta):
        p, i = dict(allp), 0
        for k, s in zip(names, shapes):
            p[k] = theta[i:i + s.numel()].reshape(s)
            i += s.numel()
        bufs = {k: b.clone() for k, b in model.named_buffers()}  # BatchNorm updates them
        return loss(torch.func.functional_call(model, (p, bufs), (x,)), y)

    return torch.autograd.functional.hessian(total, flat)


@pytest.fixture(scope="module", params=["mlp", "cnn"])
def case(request):
    model = mlp() if request.param == "mlp" else cnn()
    x, y = data(model)
    lc = LayerCollection.from_model(model)
    return model, x, y, lc, brute_hessian(model, x, y, lc)


def vec(lc, seed=3):
    g = torch.Generator().manual_seed(seed)
    return PVector(lc, vector_repr=torch.randn(lc.numel(), generator=g, dtype=DT))


def test_dense_equals_brute_force(case):
    model, x, y, lc, H = case
    M = Hessian(model, loader(x, y, 4), PMatDense)  # batches of 4 and 2
    assert M.to_torch().dtype == DT
    close(M.to_torch(), H)
    # the Hessian is indefinite here (tanh), and differs from the Gauss-Newton matrix
    assert float(torch.linalg.eigvalsh(H)[0]) < -1e-6 * float(H.abs().max())
    ggn = x.shape[0] * FIM(model, (x, y), PMatDense).to_torch()
    assert float((H - ggn).abs().max()) > 1e-3 * float(H.abs().max())
    # ... except on the last layer, in whose parameters the logits are linear: there H = GGN
    s = lc.slice(lc.layer_ids()[-1])
    close(H[s, s], ggn[s, s])


def test_blocks_diag_equal_parts_of_brute_force(case):
    model, x, y, lc, H = case
    B = Hessian(model, loader(x, y, 4), PMatBlockDiag)
    for lid in lc.layer_ids():
        s = lc.slice(lid)
        close(B.data[lid], H[s, s])
    close(B.to_torch(), torch.block_diag(*[H[lc.slice(l), lc.slice(l)] for l in lc.layer_ids()]))
    D = Hessian(model, loader(x, y, 4), PMatDiag)
    close(D.get_diag(), torch.diagonal(H))
    if isinstance(model, nn.Sequential):
        # chunks of HVPs smaller than a layer give the same numbers
        gen = HessianBackend(model, rows_per_pass=7)
        close(gen.get_covariance_diag(loader(x, y, 4), lc), torch.diagonal(H))
        close(gen.get_covariance_matrix(loader(x, y, 4), lc), H)
        close(gen.get_covariance_layer_blocks(loader(x, y, 4), lc)["2"], H[lc.slice("2"), lc.slice("2")])


def test_implicit_products_equal_brute_force(case):
    model, x, y, lc, H = case
    M = Hessian(model, loader(x, y, 4), PMatImplicit)
    v = vec(lc)
    f = v.get_flat_representation()
    close(M.mv(v).get_flat_representation(), H @ f)
    close(M.vTMv(v), f @ H @ f)
    J = torch.randn(2, 3, lc.numel(), dtype=DT, generator=torch.Generator().manual_seed(4))
    close(M.mmap(PFMapDense(lc, data=J)).to_torch(), J @ H)
    close(M.get_diag(), torch.diagonal(H))
    close(M.to_torch(allow_dense=True), H)
    # CG on H + λI, with λ large enough for it to be positive definite (and well conditioned,
    # for few CG passes)
    lam = float(torch.linalg.eigvalsh(H).abs().max()) * 2
    y_ = M.solve(v, regul=lam, tol=1e-13)
    close(y_.get_flat_representation(),
          torch.linalg.solve(H + lam * torch.eye(H.shape[0], dtype=DT), f), rtol=1e-8)
    with pytest.raises(NotImplementedError, match="Hessian"):
        M.mapTMmap(PFMapDense(lc, data=J))


def test_sum_over_batches_not_mean():
    model = mlp()
    x, y = data(model)
    lc = LayerCollection.from_model(model)
    one = Hessian(model, (x, y), PMatDense).to_torch()
    two = Hessian(model, loader(x, y, 3), PMatDense).to_torch()
    six = Hessian(model, loader(x, y, 1), PMatDense).to_torch()
    close(two, one)
    close(six, one)
    # the data set twice: twice the Hessian (a mean would not change)
    twice = Hessian(model, loader(torch.cat([x, x]), torch.cat([y, y]), 4), PMatDiag).get_diag()
    close(twice, 2 * torch.diagonal(one))
    v = vec(lc)
    close(Hessian(model, loader(x, y, 3), PMatImplicit).mv(v).get_flat_representation(),
          one @ v.get_flat_representation())


def test_custom_loss_function_and_sub_collection():
    model = mlp()
    x, _ = data(model)
    t = torch.randn(x.shape[0], 3, dtype=DT, generator=torch.Generator().manual_seed(5))
    lc = LayerCollection.from_model(model)

    def mse(out, x_, t_):
        return 0.5 * ((out - t_) ** 2).sum()

    H = brute_hessian(model, x, t, lc, loss=lambda out, t_: 0.5 * ((out - t_) ** 2).sum())
    close(Hessian(model, loader(x, t, 4), PMatDense, loss_function=mse).to_torch(), H)
    # only the first layer: the corresponding block, the other layer held constant
    sub = lc.sub(["0"])
    M = Hessian(model, loader(x, t, 4), PMatDense, loss_function=mse, layer_collection=sub)
    s = lc.slice("0")
    close(M.to_torch(), H[s, s])


@pytest.mark.parametrize("rep", [PMatKFAC, PMatEKFAC, PMatEKFACBlockDiag, PMatLowRank,
                                 PMatQuasiDiag])
def test_gauss_newton_representations_refused(rep):
    model = mlp()
    x, y = data(model)
    with pytest.raises(NotImplementedError, match="Hessian"):
        Hessian(model, (x, y), rep)


def test_mixed_groups_of_supported_representations():
    model = mlp()
    x, y = data(model)
    lc = LayerCollection.from_model(model)
    H = brute_hessian(model, x, y, lc)
    M = Hessian(model, (x, y), PMatMixed, layer_map={"0": "a", "2": "b"},
                sub_pmats={"a": PMatDense, "b": PMatDiag})
    s0, s2 = lc.slice("0"), lc.slice("2")
    expected = torch.zeros_like(H)
    expected[s0, s0] = H[s0, s0]
    expected[s2, s2] = torch.diag(torch.diagonal(H[s2, s2]))
    v = vec(lc)
    close(M.mv(v).get_flat_representation(), expected @ v.get_flat_representation())


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 5)
        self.bn = nn.BatchNorm1d(5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.bn(self.fc1(x))))


def test_model_state_kept():
    torch.manual_seed(6)
    model = BNNet().to(DT).train()
    model.fc2.bias.requires_grad_(False)
    model.bn.running_mean.normal_()
    x, y = data(mlp())
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    bufs = {k: b.clone() for k, b in model.named_buffers()}
    lc = LayerCollection.from_model(model)
    # training-mode BatchNorm: each batch's loss uses its own statistics, so the Hessian is
    # the sum over the two batches of each batch's brute-force Hessian
    H = brute_hessian(model, x[:3], y[:3], lc) + brute_hessian(model, x[3:], y[3:], lc)
    for k, b in model.named_buffers():
        b.copy_(bufs[k])
    dl = loader(x, y, 3)
    close(Hessian(model, dl, PMatDense).to_torch(), H)
    close(Hessian(model, dl, PMatBlockDiag).to_torch(),
          torch.block_diag(*[H[lc.slice(l), lc.slice(l)] for l in lc.layer_ids()]))
    v = vec(lc)
    close(Hessian(model, dl, PMatImplicit).mv(v).get_flat_representation(),
          H @ v.get_flat_representation())
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    for k, b in model.named_buffers():
        assert torch.equal(b, bufs[k]), k
    assert model.training


def test_errors():
    model = mlp()
    x, y = data(model)
    with pytest.raises(ValueError, match="scalar"):
        Hessian(model, (x, y), PMatDiag, loss_function=lambda out, x_, y_: out.sum(1))
    with pytest.raises(ValueError, match="targets"):
        Hessian(model, x, PMatDiag)
    with pytest.raises(ValueError, match="empty"):
        Hessian(model, loader(x[:0], y[:0], 2), PMatDense)
    with pytest.raises(TypeError, match="callable"):
        HessianBackend(model, loss_function=3)
    assert nngeometry.Hessian is Hessian


def test_indefinite_hessian_fractional_power_and_logdet_refused():
    from nngeometry.object import PMatBlockDiag, PMatDense

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 3, (8,))
    for rep in (PMatDense, PMatBlockDiag):
        H = Hessian(model, (x, y), rep)
        evals = torch.linalg.eigvalsh(H.to_torch())
        assert evals.min() < -1e-6  # the test needs a genuinely indefinite matrix
        with pytest.raises(ValueError, match="not positive semi-definite"):
            H.pow(0.5)
        with pytest.raises(ValueError, match="must be positive definite"):
            H.logdet()
        # integer powers and enough damping are fine
        torch.testing.assert_close(H.pow(2).to_torch(), H.to_torch() @ H.to_torch())
        shift = float(-evals.min()) + 1.0
        torch.testing.assert_close(H.logdet(regul=shift),
                                   torch.logdet(H.to_torch() + shift * torch.eye(H.size(0), dtype=torch.float64)))
