"""The natural-gradient preconditioner takes its curvature from the training step itself
(nngeometry.backend.capture): same matrices as an extra pass, no extra forward pass."""
import pytest
import torch
import torch.nn.functional as tF
from torch import nn

from nngeometry import FIM, FIM_MonteCarlo
from nngeometry.backend import TorchHooksJacobianBackend
from nngeometry.backend.capture import CaptureError, ReplayBackend, StepCapture
from nngeometry.layercollection import LayerCollection
from nngeometry.object import (PMatBlockDiag, PMatDense, PMatDiag, PMatEKFAC, PMatKFAC,
                               PMatQuasiDiag)
from nngeometry.optim import NaturalGradient
from nngeometry.curvature import closed_form_function, monte_carlo_function

DT = torch.float64
REPS = [PMatDense, PMatBlockDiag, PMatDiag, PMatKFAC, PMatEKFAC]


def _cnn(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3 * 4 * 4, 4)).to(DT)
    x, y = torch.randn(9, 1, 6, 6, dtype=DT), torch.randint(0, 4, (9,))
    return model, x, y


def _count_forwards(model):
    count = [0]
    model.register_forward_pre_hook(lambda m, a: count.__setitem__(0, count[0] + 1))
    return count


def _train_step(model, x, y):
    model.zero_grad()
    tF.cross_entropy(model(x), y).backward()


@pytest.mark.parametrize("rep", [PMatDense, PMatDiag, PMatKFAC, PMatQuasiDiag],
                         ids=lambda r: r.__name__)
@pytest.mark.parametrize("kind", ["fisher", "mc"])
def test_recorded_step_equals_the_entry_point(rep, kind):
    """The representation replayed from a recorded training step is the entry point's matrix
    on the same batch (the same sampled labels for Monte-Carlo: same RNG state)."""
    model, x, y = _cnn()
    lc = LayerCollection.from_model(model)
    f = lambda inputs: model(inputs)  # noqa: E731
    transform = closed_form_function(f, "classif_logits") if kind == "fisher" else \
        monte_carlo_function(f, "classif_logits", 2)
    cap = StepCapture(TorchHooksJacobianBackend(model, transform, layer_collection=lc), lc)
    torch.manual_seed(5)
    with cap:
        _train_step(model, x, y)
    record = cap.take()
    got = rep(layer_collection=lc, generator=ReplayBackend(cap, record), examples=record)
    torch.manual_seed(5)
    ref = FIM(model, (x, y), rep) if kind == "fisher" else \
        FIM_MonteCarlo(model, (x, y), rep, trials=2)
    assert torch.allclose(got.to_torch(), ref.to_torch(), rtol=1e-12, atol=1e-14)
    assert got.to_torch().abs().max() > 1e-3  # a matrix, not zeros


def test_the_users_gradients_are_unchanged():
    model, x, y = _cnn()
    ref = torch.autograd.grad(tF.cross_entropy(model(x), y), list(model.parameters()))
    pre = NaturalGradient(model, PMatKFAC, curvature="mc")
    _train_step(model, x, y)
    assert pre._capture.ready
    for p, g in zip(model.parameters(), ref):
        assert torch.equal(p.grad, g)


@pytest.mark.parametrize("rep", REPS, ids=lambda r: r.__name__)
def test_preconditioned_step_equals_the_extra_pass(rep):
    """Recording the step or running an extra pass on its batch: the same directions, step
    after step (closed-form Fisher, running average, EKFAC refits)."""
    dirs = []
    for capture in (True, False):
        model, x, y = _cnn()
        pre = NaturalGradient(model, rep, curvature="fisher", damping=0.05, ema_decay=0.5,
                              update_freq=2, inv_freq=2, capture=capture)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        out = []
        for t in range(4):
            xt = x * (1 + 0.1 * t)
            _train_step(model, xt, y)
            out.append(pre.step((xt, y)).get_flat_representation().clone())
            opt.step()
        dirs.append(torch.stack(out))
    assert torch.allclose(dirs[0], dirs[1], rtol=1e-10, atol=1e-13)


def test_monte_carlo_needs_no_extra_forward_pass():
    """Four training steps, curvature updates at steps 0 and 2: with capture the model runs
    the four training forward passes only; the extra pass runs at least one more per update."""
    counts = {}
    for capture in (True, False):
        model, x, y = _cnn()
        forwards = _count_forwards(model)
        pre = NaturalGradient(model, PMatKFAC, curvature="mc", update_freq=2, capture=capture)
        for _ in range(4):
            _train_step(model, x, y)
            pre.step((x, y))
        counts[capture] = forwards[0]
    assert counts[True] == 4
    assert counts[False] >= 4 + 2


def test_step_without_batch_and_evaluation_passes():
    model, x, y = _cnn()
    pre = NaturalGradient(model, PMatDiag, curvature="fisher", update_freq=2)
    for t in range(3):
        model.zero_grad()
        loss = tF.cross_entropy(model(x), y)
        with torch.no_grad():  # an evaluation pass between forward and step: not recorded
            model(2 * x)
        loss.backward()
        pre.step()  # no batch: the recorded step is used (steps 0 and 2), none needed at 1
    F = FIM(model, (x, y), PMatDiag)
    # the last estimate (step 2) is of the current parameters' batch (x): compare the latest
    assert torch.allclose(pre._latest.to_torch(), F.to_torch(), rtol=1e-10)


def test_unrecorded_update_step_needs_the_batch():
    model, x, y = _cnn()
    pre = NaturalGradient(model, PMatDiag, curvature="fisher")
    with torch.no_grad():
        model(x)
    with pytest.raises(ValueError, match="pass the batch"):
        pre.step()
    cap = pre._capture
    with pytest.raises(CaptureError, match="no training step was recorded"):
        cap.take()


def _module_hooks(model):
    return [h for m in model.modules()
            for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())] + \
        [m for m in model.modules() if "forward" in vars(m)]


def test_close_removes_the_hooks():
    """The model carries no hook of the preconditioner, armed or not: the layers are hooked
    for the time of the recorded forward call only; close() disarms."""
    model, x, y = _cnn()
    pre = NaturalGradient(model, PMatKFAC, update_freq=1)
    assert pre._capture.armed and not _module_hooks(model)
    out = model(x)
    assert not _module_hooks(model)
    tF.cross_entropy(out, y).backward()
    assert pre._capture.ready and not pre._capture.armed  # one record per arming
    pre.step()
    assert pre._capture.armed
    pre.close()
    assert pre._capture is None and not _module_hooks(model)
    # between update steps the capture is not armed
    model, x, y = _cnn()
    pre = NaturalGradient(model, PMatKFAC, update_freq=3)
    _train_step(model, x, y)
    pre.step()
    assert not pre._capture.armed


def test_capture_refuses_batch_reading_curvatures():
    model, x, y = _cnn()
    lc = LayerCollection.from_model(model)
    seeded = monte_carlo_function(lambda inputs: model(inputs), "classif_logits", 1, seed=0)
    with pytest.raises(TypeError, match="reads the batch"):
        StepCapture(TorchHooksJacobianBackend(model, seeded, layer_collection=lc), lc)


def test_recorded_step_with_a_table_as_long_as_the_batch():
    """A ``(T, d)`` table with ``T == n``, found shared from its gradients: the replayed step
    equals the entry point's matrix, itself checked against brute force in the broadcast
    tests."""
    torch.manual_seed(0)
    t = 3

    class Tab(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Embedding(t, 2)
            self.lin = nn.Linear(2, 3)

        def forward(self, x):
            return self.lin(torch.tanh(x + self.pos(torch.arange(t)))).mean(1)

    model = Tab().to(DT)
    x, y = torch.randn(t, t, 2, dtype=DT), torch.randint(0, 3, (t,))
    lc = LayerCollection.from_model(model)
    transform = closed_form_function(lambda inputs: model(inputs), "classif_logits")
    cap = StepCapture(TorchHooksJacobianBackend(model, transform, layer_collection=lc), lc)
    with cap:
        _train_step(model, x, y)
    record = cap.take()
    got = PMatDense(layer_collection=lc, generator=ReplayBackend(cap, record), examples=record)
    torch.testing.assert_close(got.to_torch(), FIM(model, (x, y), PMatDense).to_torch(),
                               rtol=1e-10, atol=1e-12)
