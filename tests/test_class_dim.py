"""Outputs with more than 2 dimensions: the class axis is given (``class_dim=``), never guessed.
``(n, C, L)`` and ``(n, C, H, W)`` with ``class_dim=1`` against brute force; refused without."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from brute import per_example_jacobian
from nngeometry import FIM, GGN, EmpiricalFisher, FIM_MonteCarlo
from nngeometry.layercollection import LayerCollection
from nngeometry.object import PMatDense, PMatDiag, PMatImplicit, PVector

C = 3
TOL = dict(rtol=1e-8, atol=1e-12)


def conv_model(dim):
    torch.manual_seed(0)
    conv = nn.Conv1d if dim == 1 else nn.Conv2d
    return nn.Sequential(conv(2, 4, 1), nn.Tanh(), conv(4, C, 1)).double()


def data(dim, n=3):
    g = torch.Generator().manual_seed(1)
    spatial = (4,) if dim == 1 else (2, 2)
    x = torch.randn(n, 2, *spatial, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (n, *spatial), generator=g)
    return x, y


def brute_fim(model, x):
    """``(1/n) Σ_i J_iᵀ Σ_i J_i`` with one softmax over dimension 1 per position."""
    J = per_example_jacobian(model, x)  # (n, C·S, P), C-major
    with torch.no_grad():
        out = model(x)
    n = x.shape[0]
    p = torch.softmax(out, 1).reshape(n, C, -1)  # (n, C, S)
    S = p.shape[2]
    eye = torch.eye(S, dtype=torch.float64)
    # Σ[c s, d t] = δ_st (δ_cd p_cs − p_cs p_ds)
    Sig = (torch.einsum("ncs,cd,st->ncsdt", p, torch.eye(C, dtype=torch.float64), eye)
           - torch.einsum("ncs,nds,st->ncsdt", p, p, eye)).reshape(n, C * S, C * S)
    return torch.einsum("ndp,nde,neq->pq", J, Sig, J) / n


def brute_ef(model, x, y):
    params = list(model.parameters())
    G = []
    for i in range(x.shape[0]):
        loss = F.cross_entropy(model(x[i:i + 1]), y[i:i + 1], reduction="sum")
        G.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    G = torch.stack(G)
    return G.t() @ G / x.shape[0]


@pytest.mark.parametrize("dim", [1, 2])
def test_class_axis_one_is_exact(dim):
    model = conv_model(dim)
    x, y = data(dim)
    dl = [(x, y)]
    ref = brute_fim(model, x)
    torch.testing.assert_close(FIM(model, dl, PMatDense, class_dim=1).to_torch(), ref, **TOL)
    torch.testing.assert_close(GGN(model, dl, PMatDense, "cross_entropy", class_dim=1)
                               .to_torch(), ref, **TOL)
    # PyTorch's own module reads dimension 1: no class_dim needed
    torch.testing.assert_close(GGN(model, dl, PMatDense, nn.CrossEntropyLoss(reduction="none"))
                               .to_torch(), ref, **TOL)
    torch.testing.assert_close(EmpiricalFisher(model, dl, PMatDense, class_dim=1).to_torch(),
                               brute_ef(model, x, y), **TOL)
    lc = LayerCollection.from_model(model)
    v = torch.randn(lc.numel(), dtype=torch.float64)
    torch.testing.assert_close(FIM(model, dl, PMatImplicit, class_dim=1)
                               .mv(PVector(lc, vector_repr=v)).to_torch(), ref @ v, **TOL)
    # the wrong axis is another matrix (what a silent guess of the last axis gave)
    if dim == 1:
        wrong = FIM(model, dl, PMatDense, class_dim=-1).to_torch()
        assert (wrong - ref).abs().max() > 0.1 * ref.abs().max()
    if dim == 1:
        mc = FIM_MonteCarlo(model, dl, PMatDiag, trials=1500, seed=0, class_dim=1).get_diag()
        assert abs(float(mc.sum() / torch.diag(ref).sum()) - 1) < 0.05
    # upstream's segmentation variant has its class axis at 1
    if dim == 2:
        seg = FIM_MonteCarlo(model, dl, PMatDiag, variant="segmentation_logits", trials=1500,
                             seed=0).get_diag()
        assert abs(float(seg.sum() / torch.diag(ref).sum()) - 1) < 0.05


@pytest.mark.parametrize("dim", [1, 2])
def test_no_class_axis_refused(dim):
    model = conv_model(dim)
    x, y = data(dim)
    dl = [(x, y)]
    msg = r"class_dim=-1.*\(n, T, C\).*class_dim=1.*\(n, C, L\)"
    for build in (lambda: FIM(model, dl, PMatDiag),
                  lambda: FIM_MonteCarlo(model, dl, PMatDiag),
                  lambda: EmpiricalFisher(model, dl, PMatDiag),
                  lambda: GGN(model, dl, PMatDiag, "cross_entropy")):
        with pytest.raises(ValueError, match=msg):
            build()
    with pytest.raises(TypeError, match="class_dim must be an int"):
        FIM(model, dl, PMatDiag, class_dim="1")
    with pytest.raises(ValueError, match="batch axis"):
        FIM(model, dl, PMatDiag, class_dim=0)
