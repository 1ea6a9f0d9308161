"""The natural-gradient preconditioner against dense float64 references."""
import math

import pytest
import torch
import torch.nn.functional as tF
from torch import nn

from nngeometry import FIM
from nngeometry.object import PMatBlockDiag, PMatDense, PMatDiag, PMatEKFAC, PMatKFAC
from nngeometry.optim import NaturalGradient

DT = torch.float64


def _setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    x, y = torch.randn(16, 4, dtype=DT), torch.randint(0, 3, (16,))
    return model, x, y


def _grads(model, x, y):
    model.zero_grad()
    tF.cross_entropy(model(x), y).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone()


def _flat_grads(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("rep", [PMatDense, PMatBlockDiag, PMatDiag, PMatKFAC, PMatEKFAC],
                         ids=lambda r: r.__name__)
def test_one_step_is_the_exactly_damped_solve(rep):
    """With the closed-form Fisher and no averaging, the new gradient is (F + λI)⁻¹ g for the
    representation's own F (exact damping, also for KFAC; EKFAC with its refitted diagonal)."""
    model, x, y = _setup()
    lam = 0.05
    g = _grads(model, x, y)
    pre = NaturalGradient(model, rep, curvature="fisher", damping=lam, ema_decay=0.0)
    pre.step((x, y))
    F = FIM(model, (x, y), rep)
    if rep is PMatEKFAC:  # the preconditioner refits the diagonal in KFAC's eigenbasis
        F.update_diag((x, y))
    F = F.to_torch()
    ref = torch.linalg.solve(F + lam * torch.eye(F.shape[0], dtype=DT), g)
    assert torch.allclose(_flat_grads(model), ref, rtol=1e-9, atol=1e-12)


def test_running_average_and_refresh_schedule():
    """F̄ ← β F̄ + (1−β) F_t every update_freq steps; the solves use F̄ as of the last inv_freq
    refresh."""
    model, x, y = _setup()
    b, lam = 0.6, 0.1
    pre = NaturalGradient(model, PMatDense, curvature="fisher", damping=lam, ema_decay=b,
                          update_freq=1, inv_freq=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    Fs = []
    for t in range(3):
        g = _grads(model, x, y)
        Fs.append(FIM(model, (x, y), PMatDense).to_torch())
        pre.step((x, y))
        run = Fs[0]
        for F in Fs[1:]:
            run = b * run + (1 - b) * F
        assert torch.allclose(pre.running.to_torch(), run, rtol=1e-10)
        if t == 1:  # no refresh at step 1: the solve still uses F̄ of step 0
            used = Fs[0]
        else:
            used = run
        ref = torch.linalg.solve(used + lam * torch.eye(run.shape[0], dtype=DT), g)
        assert torch.allclose(_flat_grads(model), ref, rtol=1e-9, atol=1e-12)
        opt.step()


def test_kfac_running_average_is_over_the_factors():
    model, x, y = _setup()
    b = 0.5
    pre = NaturalGradient(model, PMatKFAC, curvature="fisher", ema_decay=b, update_freq=1)
    _grads(model, x, y)
    pre.step((x, y))
    F1 = FIM(model, (x, y), PMatKFAC)
    x2 = 2 * x
    _grads(model, x2, y)
    pre.step((x2, y))
    F2 = FIM(model, (x2, y), PMatKFAC)
    for lid in F1.data:
        for f, f1, f2 in zip(pre.running.data[lid], F1.data[lid], F2.data[lid]):
            assert torch.allclose(f, b * f1 + (1 - b) * f2, rtol=1e-12)


def test_kl_clipping_scales_the_direction():
    model, x, y = _setup()
    lr, kappa, lam = 0.5, 1e-4, 0.05
    g = _grads(model, x, y)
    pre = NaturalGradient(model, PMatDense, curvature="fisher", damping=lam, ema_decay=0.0,
                          kl_clip=kappa, lr=lr)
    pre.step((x, y))
    F = FIM(model, (x, y), PMatDense).to_torch()
    p = torch.linalg.solve(F + lam * torch.eye(F.shape[0], dtype=DT), g)
    nu = min(1.0, math.sqrt(kappa / (lr ** 2 * abs(float(p @ g)))))
    assert nu < 1.0  # the test exercises the clipping
    assert torch.allclose(_flat_grads(model), nu * p, rtol=1e-9)


def test_pi_damping_matches_kfac_solve_and_damping_schedule():
    model, x, y = _setup()
    g = _grads(model, x, y)
    pre = NaturalGradient(model, PMatKFAC, curvature="fisher", damping=lambda step: 0.1 / (1 + step),
                          damping_mode="pi", ema_decay=0.0)
    pre.step((x, y))
    F = FIM(model, (x, y), PMatKFAC)
    from nngeometry.object import PVector
    ref = F.solve(PVector(F.layer_collection, vector_repr=g), regul=0.1).get_flat_representation()
    assert torch.allclose(_flat_grads(model), ref, rtol=1e-9)
    assert pre.current_damping() == pytest.approx(0.05)


def test_bad_arguments_are_refused():
    model, x, y = _setup()
    with pytest.raises(ValueError, match="'pi'.*PMatKFAC only"):
        NaturalGradient(model, PMatDiag, damping_mode="pi")
    with pytest.raises(ValueError, match="kl_clip needs the learning rate"):
        NaturalGradient(model, PMatDiag, kl_clip=1e-3)
    with pytest.raises(ValueError, match="ema_decay"):
        NaturalGradient(model, PMatDiag, ema_decay=1.0)
    with pytest.raises(ValueError, match="curvature"):
        NaturalGradient(model, PMatDiag, curvature="hessian")


def test_state_dict_round_trip(tmp_path):
    model, x, y = _setup()
    pre = NaturalGradient(model, PMatKFAC, update_freq=1)
    _grads(model, x, y)
    pre.step((x, y))
    torch.save(pre.state_dict(), tmp_path / "ng.pt")
    other = NaturalGradient(model, PMatKFAC, update_freq=5)
    other.load_state_dict(torch.load(tmp_path / "ng.pt", weights_only=False))
    g = _grads(model, x, y)
    other.step((x, y))  # step 1: no curvature update, the restored matrix is used
    from nngeometry.object import PVector
    lc = pre.for_solves.layer_collection
    ref = pre.for_solves.solve(PVector(lc, vector_repr=g), regul=1e-3, damping="exact")
    assert torch.allclose(_flat_grads(model), ref.get_flat_representation(), rtol=1e-9)
