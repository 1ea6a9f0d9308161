"""EWC and online EWC against their formulas on dense float64 matrices."""
import pytest
import torch
from torch import nn

from nngeometry import FIM
from nngeometry.object import (PMatBlockDiag, PMatDense, PMatDiag, PMatEKFAC, PMatImplicit,
                               PMatKFAC, PMatLowRank, PMatQuasiDiag)
from nngeometry.regularization import EWC

DT = torch.float64
REPS = [PMatDense, PMatBlockDiag, PMatDiag, PMatQuasiDiag, PMatLowRank, PMatKFAC, PMatEKFAC]


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    xs = [torch.randn(12, 4, dtype=DT) * s for s in (1.0, 2.0, 0.5)]
    return model, xs


def _dense(F):
    return F.to_torch()


def _flat(model):
    return torch.cat([p.reshape(-1) for p in model.parameters()])


def _move(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=DT))


@pytest.mark.parametrize("rep", REPS, ids=lambda r: r.__name__)
def test_ewc_penalty_and_gradient_equal_the_formula(rep):
    model, xs = _setup()
    ewc = EWC(model, lam=3.0)
    anchors, dense = [], []
    for t, x in enumerate(xs[:2]):
        F = FIM(model, (x,), rep, variant="classif_logits")
        ewc.register_task(F)
        anchors.append(_flat(model).detach().clone())
        dense.append(_dense(F))
        _move(model, t)
    theta = _flat(model)
    ref = 0.5 * 3.0 * sum((theta - a) @ D @ (theta - a) for a, D in zip(anchors, dense))
    got = ewc.penalty()
    assert torch.allclose(got, ref, rtol=1e-10, atol=0)
    grad = torch.autograd.grad(got, list(model.parameters()))
    ref_grad = 3.0 * sum(D @ (theta.detach() - a) for a, D in zip(anchors, dense))
    assert torch.allclose(torch.cat([g.reshape(-1) for g in grad]), ref_grad, rtol=1e-9, atol=1e-12)
    assert ewc.n_tasks == 2


@pytest.mark.parametrize("rep", [PMatDense, PMatBlockDiag, PMatDiag, PMatQuasiDiag, PMatLowRank,
                                 PMatEKFAC], ids=lambda r: r.__name__)
def test_online_ewc_is_the_decayed_sum_with_one_anchor(rep):
    """F ← γ F + F_t, θ* ← θ_t: exact for every representation but KFAC (merged where the
    representation's sum is exact, kept as weighted terms otherwise)."""
    model, xs = _setup()
    gamma = 0.7
    ewc = EWC(model, lam=2.0, gamma=gamma)
    F_run = None
    for t, x in enumerate(xs):
        F = FIM(model, (x,), rep, variant="classif_logits")
        D = _dense(F)
        F_run = D if F_run is None else gamma * F_run + D
        ewc.register_task(F)
        anchor = _flat(model).detach().clone()
        _move(model, 10 + t)
    theta = _flat(model)
    ref = 0.5 * 2.0 * (theta - anchor) @ F_run @ (theta - anchor)
    assert torch.allclose(ewc.penalty(), ref, rtol=1e-10, atol=0)
    assert ewc.n_tasks == 1
    if rep in (PMatDense, PMatDiag, PMatLowRank):  # one merged matrix, constant memory
        assert len(ewc.tasks[0][1]) == 1


def test_online_ewc_kfac_averages_the_factors():
    """KFAC: γ A₁⊗G₁ + A₂⊗G₂ ≈ (γA₁ + A₂)/(γ+1) ⊗ (γG₁ + G₂), exact when the input factors
    agree (here: same inputs, different output factors through a different model state)."""
    model, xs = _setup()
    gamma = 0.5
    ewc = EWC(model, lam=1.0, gamma=gamma)
    F1 = FIM(model, (xs[0],), PMatKFAC, variant="classif_logits")
    ewc.register_task(F1)
    with torch.no_grad():  # last layer moved: its input factor A stays, its G changes
        model[2].weight.mul_(1.5)
    F2 = FIM(model, (xs[0],), PMatKFAC, variant="classif_logits")
    ewc.register_task(F2)
    (anchor, terms), = ewc.tasks
    (w, F), = terms
    assert w == 1.0 and isinstance(F, PMatKFAC)
    # the last layer's block is exact (shared A)
    lid = list(F.layer_collection.layer_ids())[1]
    sl = slice(F.layer_collection.p_pos[lid], None)
    exact = gamma * F1.to_torch() + F2.to_torch()
    assert torch.allclose(F.to_torch()[sl, sl], exact[sl, sl], rtol=1e-10, atol=1e-14)
    # and the whole matrix is the documented factor average
    for lid in F.layer_collection.layer_ids():
        (A1, G1), (A2, G2), (A, G) = F1.data[lid], F2.data[lid], F.data[lid]
        assert torch.allclose(A, (gamma * A1 + A2) / (1 + gamma))
        assert torch.allclose(G, gamma * G1 + G2)


def test_ewc_refuses_bad_arguments_and_other_collections():
    model, xs = _setup()
    with pytest.raises(ValueError, match="gamma"):
        EWC(model, gamma=1.5)
    with pytest.raises(ValueError, match="lam"):
        EWC(model, lam=-1)
    from nngeometry.layercollection import LayerCollection
    lc = LayerCollection()
    lc.add_layer_from_model(model, model[2])
    ewc = EWC(model).register_task(FIM(model, (xs[0],), PMatDiag, variant="classif_logits"))
    with pytest.raises(ValueError, match="LayerCollection"):
        ewc.register_task(FIM(model, (xs[0],), PMatDiag, layer_collection=lc,
                              variant="classif_logits"))
    assert float(EWC(model).penalty()) == 0.0
    # a matrix that follows the model would silently change the penalty: refused
    with pytest.raises(TypeError, match="PMatImplicit.*current parameters"):
        EWC(model).register_task(FIM(model, (xs[0],), PMatImplicit, variant="classif_logits"))


def test_ewc_state_dict_round_trip(tmp_path):
    model, xs = _setup()
    ewc = EWC(model, lam=5.0, gamma=0.9)
    ewc.register_task(FIM(model, (xs[0],), PMatDiag, variant="classif_logits"))
    _move(model, 3)
    torch.save(ewc.state_dict(), tmp_path / "ewc.pt")
    other = EWC(model)
    other.load_state_dict(torch.load(tmp_path / "ewc.pt", weights_only=False))
    assert torch.equal(other.penalty(), ewc.penalty()) and other.penalty() > 0
