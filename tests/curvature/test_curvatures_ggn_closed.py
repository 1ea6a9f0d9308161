"""GGN of the losses with a closed-form output Hessian (named losses and torch.nn loss modules):
equal to the brute-force GGN (torch.func per-example Jacobians and output Hessians, float64) and
to the generic path (the same loss as an opaque callable), and never through the output
Hessians' double backward and eigendecomposition."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import hessian, jacrev, vmap
from torch.utils.data import DataLoader, TensorDataset

from nngeometry.curvature import ggn as ggn_transform
from nngeometry import GGN, EmpiricalFisher
from nngeometry.object import (PFMapDense, PMatDense, PMatDiag, PMatImplicit, PMatKFAC,
                               PVector)
from test_curvatures_entry import C, brute_jac, make

TOL = dict(atol=1e-10, rtol=1e-8)
pytestmark = pytest.mark.usefixtures("one_thread")


def brute_ggn(model, batch, loss, post=None, positions="sum"):
    """(1/n) Σ_i J_iᵀ H_i J_i, J_i the Jacobian of post(model(x_i)) (post: a map of the outputs,
    identity by default) and H_i = ∇²_z of loss(z[None], *targets_i[None]) at z = post(f_i),
    summed (or averaged, positions='mean') over its entries."""
    x, targets = batch[0], batch[1:]
    post = post or (lambda o: o)
    J = brute_jac(model, x)  # (n, D, P)
    n = x.shape[0]
    with torch.no_grad():
        out = model(x)
    Jpost = vmap(jacrev(lambda oi: post(oi.unsqueeze(0))[0]))(out)
    z = post(out)
    J = torch.einsum("nep,nde->ndp", J, Jpost.reshape(n, -1, J.shape[1]))

    def li(zi, *ti):
        losses = loss(zi.unsqueeze(0), *[t.unsqueeze(0) for t in ti])
        return losses.sum() if positions == "sum" else losses.mean()
    D = J.shape[1]
    H = vmap(hessian(li))(z, *targets).reshape(n, D, D)
    return torch.einsum("ndp,nde,neq->pq", J, H, J) / n


def _loader(*tensors, bs=4):
    return DataLoader(TensorDataset(*tensors), batch_size=bs)


def _no_output_hessians(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the closed form must not compute output Hessians")
    monkeypatch.setattr(ggn_transform, "output_hessians", boom)


def _ce_last(o, t):
    """Cross-entropy with classes on the last dimension, one per position, -100 ignored."""
    return F.cross_entropy(o.reshape(-1, o.shape[-1]), t.reshape(-1),
                           reduction="none").reshape(t.shape)


#: the named losses written out with torch.nn.functional (the brute-force reference)
BY_NAME = {"cross_entropy": _ce_last,
           "mse": lambda o, t: (o - t) ** 2,
           "bce_with_logits": lambda o, t: F.binary_cross_entropy_with_logits(
               o, t, reduction="none")}


def _check(model, batch, loss, monkeypatch, post=None, positions="sum", closed=True,
           explicit=None, class_dim=None):
    """GGN(loss) == brute force == GGN(opaque callable of the same loss), Dense and Implicit;
    the model's outputs seen through ``post`` (function=post(model(x)))."""
    explicit = explicit or (BY_NAME[loss] if isinstance(loss, str) else loss)
    ref = brute_ggn(model, batch, explicit, post, positions)
    kw = dict(positions=positions)
    if class_dim is not None:
        kw["class_dim"] = class_dim
    if post is not None:
        kw["function"] = lambda inp, *_: post(model(inp))
    generic = GGN(model, _loader(*batch), PMatDense,
                  loss_function=lambda o, *t: explicit(o, *t), **kw).to_torch()
    torch.testing.assert_close(generic, ref, **TOL)
    with monkeypatch.context() as m:
        if closed:
            _no_output_hessians(m)
        M = GGN(model, _loader(*batch), PMatDense, loss_function=loss, **kw)
        torch.testing.assert_close(M.to_torch(), ref, **TOL)
        imp = GGN(model, _loader(*batch), PMatImplicit, loss_function=loss, **kw)
        v = torch.randn(ref.shape[0], dtype=torch.float64)
        torch.testing.assert_close(imp.mv(PVector(M.generator.layer_collection,
                                                  vector_repr=v)).to_torch(), ref @ v, **TOL)
        # the vmapped products (mmap: the transform runs inside torch.func.vmap)
        V = torch.randn(3, ref.shape[0], dtype=torch.float64)
        MV = imp.mmap(PFMapDense(imp.layer_collection, data=V.unsqueeze(0))).to_torch()[0]
        torch.testing.assert_close(MV, V @ ref, **TOL)


@pytest.mark.parametrize("kind", ["mlp", "cnn", "seq"])
def test_cross_entropy_name(kind, monkeypatch):
    """'cross_entropy': the library's class convention ((n, T, C): classes last); targets -100
    contribute nothing."""
    model, x, y = make(kind)
    y = y.clone()
    y.view(-1)[1] = -100
    _check(model, (x, y), "cross_entropy", monkeypatch, class_dim=-1)
    _check(model, (x, y), "cross_entropy", monkeypatch, positions="mean", class_dim=-1)
    # the name's loss is the library's default cross-entropy (per position, -100 ignored)
    torch.testing.assert_close(
        EmpiricalFisher(model, _loader(x, y), PMatDense, loss_function="cross_entropy",
                        class_dim=-1).to_torch(),
        EmpiricalFisher(model, _loader(x, y), PMatDense, class_dim=-1).to_torch(), **TOL)


def test_cross_entropy_module(monkeypatch):
    model, x, y = make("mlp")
    _check(model, (x, y), nn.CrossEntropyLoss(reduction="none"), monkeypatch)
    # label smoothing leaves the Hessian in the logits unchanged: still the closed form
    _check(model, (x, y), nn.CrossEntropyLoss(reduction="none", label_smoothing=0.2),
           monkeypatch)
    y2 = y.clone()
    y2[0] = 2
    _check(model, (x, y2), nn.CrossEntropyLoss(reduction="none", ignore_index=2), monkeypatch)
    # class weights scale H by the target's weight: the generic path, still exact
    w = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    _check(model, (x, y), nn.CrossEntropyLoss(weight=w, reduction="none"), monkeypatch,
           closed=False)
    # probability targets: the generic path
    q = torch.softmax(torch.randn(x.shape[0], C, dtype=torch.float64), 1)
    _check(model, (x, q), nn.CrossEntropyLoss(reduction="none"), monkeypatch, closed=False)


def test_cross_entropy_module_sequence(monkeypatch):
    """nn.CrossEntropyLoss reads classes along dimension 1: a (n, T, C) model is given as
    (n, C, T); per-position losses summed or averaged."""
    model, x, y = make("seq")

    for positions in ("sum", "mean"):
        _check(model, (x, y), nn.CrossEntropyLoss(reduction="none"), monkeypatch,
               post=lambda o: o.transpose(1, 2), positions=positions)


@pytest.mark.parametrize("loss", ["mse", nn.MSELoss(reduction="none")], ids=["name", "module"])
@pytest.mark.parametrize("kind", ["mlp", "cnn", "seq"])
def test_mse(kind, loss, monkeypatch):
    model, x, _ = make(kind)
    with torch.no_grad():
        y = model(x) + torch.randn_like(model(x))
    _check(model, (x, y), loss, monkeypatch)
    _check(model, (x, y), loss, monkeypatch, positions="mean")


@pytest.mark.parametrize("loss", ["bce_with_logits", nn.BCEWithLogitsLoss(reduction="none")],
                         ids=["name", "module"])
def test_bce_with_logits(loss, monkeypatch):
    model, x, _ = make("mlp")
    y = torch.rand(x.shape[0], C, dtype=torch.float64)
    _check(model, (x, y), loss, monkeypatch)
    # pos_weight makes H depend on the targets: generic path
    _check(model, (x, y), nn.BCEWithLogitsLoss(reduction="none",
                                               pos_weight=torch.full((C,), 3.0,
                                                                     dtype=torch.float64)),
           monkeypatch, closed=False)


def test_gaussian_and_poisson_modules(monkeypatch):
    model, x, _ = make("mlp")
    with torch.no_grad():
        out = model(x)
    y = out + 0.3 * torch.randn_like(out)
    var = 0.1 + torch.rand_like(out)
    def gauss(o, t, v):  # (torch's gaussian_nll_loss checks var >= 0: not vmap-able)
        return 0.5 * (torch.log(v) + (o - t) ** 2 / v)
    _check(model, (x, y, var), nn.GaussianNLLLoss(reduction="none"), monkeypatch,
           explicit=gauss)
    # one variance per example (torch broadcasts var of shape (n, 1))
    _check(model, (x, y, var[:, :1].contiguous()), nn.GaussianNLLLoss(reduction="none"),
           monkeypatch, explicit=gauss)
    yc = torch.poisson(torch.ones_like(out))
    _check(model, (x, yc), nn.PoissonNLLLoss(reduction="none"), monkeypatch)
    # rate outputs (log_input=False): H = y / f² depends on the targets: generic path
    _check(model, (x, yc), nn.PoissonNLLLoss(reduction="none", log_input=False), monkeypatch,
           post=lambda o: F.softplus(o) + 0.1, closed=False)


def test_closed_form_kfac_equals_generic():
    """KFAC's G factor from the closed-form directions equals the generic path's (the
    directions differ by an orthogonal rotation per example, G does not)."""
    model, x, y = make("cnn")
    a = GGN(model, _loader(x, y), PMatKFAC, loss_function=nn.CrossEntropyLoss(reduction="none"))
    b = GGN(model, _loader(x, y), PMatKFAC,
            loss_function=lambda o, t: F.cross_entropy(o, t, reduction="none"))
    torch.testing.assert_close(a.to_torch(), b.to_torch(), **TOL)


def test_refusals():
    model, x, y = make("mlp")
    dl = _loader(x, y)
    for red in ("mean", "sum"):
        with pytest.raises(ValueError, match=r"reduction='none'.*|1/n"):
            GGN(model, dl, PMatDiag, loss_function=nn.CrossEntropyLoss(reduction=red))
        with pytest.raises(ValueError, match=r"MSELoss\(reduction='none'\)"):
            EmpiricalFisher(model, dl, PMatDiag, loss_function=nn.MSELoss(reduction=red))
    with pytest.raises(ValueError, match="unknown loss_function 'xent'.*'cross_entropy'"):
        GGN(model, dl, PMatDiag, loss_function="xent")
    with pytest.raises(ValueError, match="unknown loss_function"):
        EmpiricalFisher(model, dl, PMatDiag, loss_function="xent")
    # (n,) targets against (n, 1) outputs would broadcast to (n, n): refused, not summed
    model1 = nn.Sequential(nn.Linear(4, 1)).double()
    with pytest.raises(ValueError, match=r"broadcast .* larger shape"):
        GGN(model1, _loader(x, torch.randn(x.shape[0], dtype=torch.float64)), PMatDiag,
            loss_function="mse")
    with pytest.raises(ValueError, match=r"12 positions of 3 classes.*\(4,\)"):
        m, xs, ys = make("seq")
        GGN(m, _loader(xs, ys[:, 0]), PMatDiag, loss_function="cross_entropy", class_dim=-1)
