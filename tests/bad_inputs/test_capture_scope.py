"""A natural-gradient preconditioner records its training step and nothing else: the armed
model can be deep-copied and saved, its copies and other uses (per-example gradients with
torch.func, a matrix built mid-training, a validation loss, a gradient penalty) are neither
recorded nor charged a curvature pass, and the step's estimate is the brute-force Fisher of
the training batch."""
import copy
import gc
import io

import pytest
import torch
import torch.nn.functional as tF
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

from nngeometry import FIM
from nngeometry.object import PMatDense, PMatDiag
from nngeometry.optim import NaturalGradient

from brute import fim_dense

DT = torch.float64


def _setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    x, y = torch.randn(6, 3, dtype=DT), torch.randint(0, 3, (6,))
    xv, yv = torch.randn(4, 3, dtype=DT), torch.randint(0, 3, (4,))
    return model, x, y, xv, yv


def _counting(pre):
    """Count the curvature passes the capture runs (one per recorded step)."""
    cap, count = pre._capture, [0]
    inner = cap._differentiate

    def counted(*args):
        count[0] += 1
        return inner(*args)

    cap._differentiate = counted
    return count


def _hooked(model):
    return [m for m in model.modules()
            if m._forward_hooks or m._forward_pre_hooks or "forward" in vars(m)]


def _brute_direction(model, x, lam):
    """``(F + λI)⁻¹ g`` with the brute-force closed-form Fisher of ``x`` and the current grads."""
    F = fim_dense(model, x)
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    return torch.linalg.solve(F + lam * torch.eye(F.shape[0], dtype=DT), g)


def test_armed_model_deep_copies_and_saves_and_copies_are_not_recorded():
    model, x, y, xv, yv = _setup()
    pre = NaturalGradient(model, PMatDense, curvature="fisher", damping=0.1, ema_decay=0.0,
                          update_freq=1)
    count = _counting(pre)
    assert pre._capture.armed and not _hooked(model)
    twin = copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for other in (twin, loaded):
        assert not _hooked(other)
        tF.cross_entropy(other(xv), yv).backward()  # a copy's training step: not recorded
        assert torch.equal(other(x), model(x))
    assert count[0] == 0 and not pre._capture.ready
    # between the forward and the backward of the step the model carries no hook either
    out = model(x)
    assert not _hooked(model)
    copy.deepcopy(model)
    tF.cross_entropy(out, y).backward()
    assert count[0] == 1 and pre._capture.ready
    ref = _brute_direction(model, x, 0.1)
    # the step's direction is the brute-force one on the training batch (not the copies')
    assert torch.allclose(pre.step().get_flat_representation(), ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("transform", ["grad", "jacrev"])
def test_per_example_gradients_of_the_armed_model(transform):
    """torch.func per-example gradients of the model being trained: the brute-force loop's
    numbers, no capture, and the training step after them is still recorded."""
    model, x, y, xv, yv = _setup()
    refs = [torch.autograd.grad(tF.cross_entropy(model(x[i:i + 1]), y[i:i + 1]),
                                list(model.parameters())) for i in range(x.shape[0])]
    pre = NaturalGradient(model, PMatDiag, curvature="fisher", update_freq=1)
    count = _counting(pre)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        return tF.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    f = grad(loss) if transform == "grad" else jacrev(loss)
    got = vmap(f, (None, 0, 0))(params, x, y)
    for i, ref in enumerate(refs):
        for (name, _), r in zip(model.named_parameters(), ref):
            assert torch.allclose(got[name][i], r, rtol=1e-12, atol=1e-14)
    assert count[0] == 0 and not pre._capture.ready and pre._capture.armed
    model.zero_grad()
    tF.cross_entropy(model(x), y).backward()
    pre.step()
    assert count[0] == 1
    assert torch.allclose(pre._latest.get_diag(), torch.diag(fim_dense(model, x)), rtol=1e-10)


def test_extra_backward_passes_pay_no_capture_and_the_record_is_the_training_batch():
    """A validation forward with gradients, a gradient penalty through the step's output, the
    penalised backward and a validation backward: one curvature pass, on the training batch."""
    model, x, y, xv, yv = _setup()
    pre = NaturalGradient(model, PMatDense, curvature="fisher", update_freq=1)
    count = _counting(pre)
    loss = tF.cross_entropy(model(x), y)
    val = tF.cross_entropy(model(xv), yv)  # evaluated with gradients enabled, not trained on
    g = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
    penalty = sum((t ** 2).sum() for t in g)
    (loss + 0.1 * penalty).backward()
    val.backward()
    assert count[0] == 1
    pre.step()
    assert torch.allclose(pre._latest.to_torch(), fim_dense(model, x), rtol=1e-10, atol=1e-14)
    # the next steps: a later validation backward does not pay either
    for _ in range(2):
        model.zero_grad()
        tF.cross_entropy(model(x), y).backward()
        tF.cross_entropy(model(xv), yv).backward()
        pre.step()
    assert count[0] == 3


def test_library_passes_and_failed_forwards_mid_training_are_not_recorded():
    model, x, y, xv, yv = _setup()
    pre = NaturalGradient(model, PMatDiag, curvature="fisher", update_freq=1)
    count = _counting(pre)
    F = FIM(model, (xv, yv), PMatDiag)  # a matrix built between two training steps
    assert count[0] == 0 and not pre._capture.ready and pre._capture.armed
    assert torch.allclose(F.get_diag(), torch.diag(fim_dense(model, xv)), rtol=1e-10)
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 4, dtype=DT))  # wrong width: the forward raises
    assert not _hooked(model) and pre._capture._open is None
    tF.cross_entropy(model(x), y).backward()
    pre.step()
    assert count[0] == 1
    assert torch.allclose(pre._latest.get_diag(), torch.diag(fim_dense(model, x)), rtol=1e-10)


def test_dropped_or_copied_preconditioner_leaves_no_hook_behind():
    """A preconditioner dropped while armed takes its process-wide hook with it; a deep copy of
    (model, preconditioner) records its own model's steps, not the original's."""
    hooks = torch.nn.modules.module._global_forward_pre_hooks
    # preconditioners of earlier tests that are unreachable but not yet collected still hold
    # their hooks: collect them first, so that the count only sees this test's
    gc.collect()
    n = len(hooks)
    model, x, y, xv, yv = _setup()
    pre = NaturalGradient(model, PMatDiag, curvature="fisher", update_freq=1)
    assert len(hooks) == n + 1
    twin, twin_pre = copy.deepcopy((model, pre))
    assert len(hooks) == n + 2 and twin_pre._capture.model is twin
    tF.cross_entropy(twin(xv), yv).backward()
    assert twin_pre._capture.ready and not pre._capture.ready
    twin_pre.step()
    assert torch.allclose(twin_pre._latest.get_diag(), torch.diag(fim_dense(twin, xv)),
                          rtol=1e-10)
    del pre, twin_pre
    gc.collect()
    assert len(hooks) == n
