"""No global state is changed by any call, normal or failed, once per entry point.

Checked after each call: the functions of ``torch.nn.functional`` and ``torch`` are the
originals, no hook is left (the model's modules' and the global ``nn.modules.module`` ones),
grad mode, inference mode and the attention fast-path flag are unchanged, the parameters are the
same ``nn.Parameter`` objects with the same values, ``requires_grad`` and ``.grad``, the buffers
are unchanged, and the RNG state is unchanged for the closed-form statistics. ``FIM_MonteCarlo``
consumes the global RNG for its targets (documented); only that is allowed to differ."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as module_mod


from nngeometry import FIM, FIM_MonteCarlo, GramMatrix, Hessian, Jacobian
from nngeometry.object import PMatDense, PMatEKFAC, PMatImplicit, random_pvector

DT = torch.float64
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks", "_global_module_registration_hooks",
                 "_global_parameter_registration_hooks", "_global_buffer_registration_hooks")
_MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                 "_backward_pre_hooks", "_forward_hooks_with_kwargs",
                 "_forward_pre_hooks_with_kwargs", "_state_dict_hooks",
                 "_load_state_dict_pre_hooks")


def model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    model.eval()
    with torch.no_grad():  # non-trivial running statistics
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    model[0].bias.requires_grad_(False)  # a frozen parameter stays frozen
    x = torch.randn(8, 4, dtype=DT)
    y = torch.randint(0, 3, (8,))
    good = [(x[:5], y[:5]), (x[5:], y[5:])]
    bad = [(x[:5], y[:5]), (torch.full_like(x[5:], float("nan")), y[5:])]  # fails mid-pass
    return model, good, bad


def snapshot(model):
    return {
        "F": {k: getattr(F, k) for k in dir(F) if callable(getattr(F, k))},
        "torch": {k: getattr(torch, k) for k in ("matmul", "einsum", "bmm", "addmm", "conv2d",
                                                 "layer_norm", "softmax", "log_softmax")},
        "global_hooks": {k: dict(getattr(module_mod, k)) for k in _GLOBAL_HOOKS
                         if hasattr(module_mod, k)},
        "grad": torch.is_grad_enabled(),
        "inference": torch.is_inference_mode_enabled(),
        "fastpath": torch.backends.mha.get_fastpath_enabled(),
        "params": [(name, p, type(p), p.requires_grad, p.detach().clone(), p.grad)
                   for name, p in model.named_parameters()],
        "buffers": [(name, b, b.detach().clone()) for name, b in model.named_buffers()],
        "rng": torch.get_rng_state(),
        "training": [m.training for m in model.modules()],
    }


def check_unchanged(model, before, rng=True):
    after = snapshot(model)
    for key in ("F", "torch"):
        changed = [k for k, f in before[key].items() if after[key][k] is not f]
        assert not changed, f"{key} functions replaced: {changed}"
    assert after["global_hooks"] == before["global_hooks"]
    for m in model.modules():
        for h in _MODULE_HOOKS:
            assert not getattr(m, h, {}), f"hook left on {type(m).__name__}: {h}"
    for k in ("grad", "inference", "fastpath", "training"):
        assert after[k] == before[k], k
    assert [n for n, *_ in after["params"]] == [n for n, *_ in before["params"]]
    for (name, p, cls, rg, val, grad), (_, p2, cls2, rg2, _, grad2) in zip(before["params"],
                                                                          after["params"]):
        assert p2 is p and cls2 is cls and isinstance(p2, nn.Parameter), name
        assert rg2 == rg and grad2 is grad, name
        assert torch.equal(p2.detach(), val), name
    for (name, b, val), (_, b2, _) in zip(before["buffers"], after["buffers"]):
        assert b2 is b and torch.equal(b2, val), name
    if rng:
        assert torch.equal(after["rng"], before["rng"]), "RNG state changed"


def _generator(model):
    from nngeometry.backend import TorchHooksJacobianBackend
    return TorchHooksJacobianBackend(model)


def _ekfac_update(model, examples, good):
    E = FIM(model, good, PMatEKFAC)
    E.update_diag(examples)
    return E


ENTRY_POINTS = {
    "FIM": lambda model, ex, good: FIM(model, ex, PMatDense),
    "FIM_MonteCarlo": lambda model, ex, good: FIM_MonteCarlo(model, ex, PMatDense, trials=3),
    "Jacobian": lambda model, ex, good: Jacobian(model, ex),
    "GramMatrix": lambda model, ex, good: GramMatrix(model, ex),
    "Hessian": lambda model, ex, good: Hessian(model, ex, PMatDense),
    "PMatImplicit.mv": None,  # see the test
    "PMatEKFAC.update_diag": _ekfac_update,
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("outcome", ["normal", "failed"])
@pytest.mark.parametrize("mode", ["grad", "no_grad"])
def test_no_global_state_changed(entry, outcome, mode):
    model, good, bad = model_and_data()
    call = ENTRY_POINTS[entry]
    rng = entry != "FIM_MonteCarlo"  # documented: draws its targets from the global RNG
    ctx = torch.no_grad() if mode == "no_grad" else torch.enable_grad()
    with ctx:
        if entry == "PMatImplicit.mv":
            # the matrix is built lazily: the product is the call that runs the model (the
            # random vector is drawn before the snapshot)
            M = PMatImplicit(generator=_generator(model),
                             examples=good if outcome == "normal" else bad)
            v = random_pvector(M.layer_collection, dtype=DT, device="cpu")
            before = snapshot(model)
            if outcome == "normal":
                M.mv(v)
            else:
                with pytest.raises(ValueError, match="NaN"):
                    M.mv(v)
        elif outcome == "normal":
            before = snapshot(model)
            call(model, good, good)
        else:
            before = snapshot(model)
            with pytest.raises(ValueError, match="NaN"):
                call(model, bad, good)
        check_unchanged(model, before, rng=rng)


def test_monte_carlo_consumes_only_the_global_rng():
    # the documented exception: the same seed gives the same matrix and the same final state
    model, good, _ = model_and_data()
    torch.manual_seed(7)
    a = FIM_MonteCarlo(model, good, PMatDense, trials=3).to_torch()
    state_a = torch.get_rng_state()
    torch.manual_seed(7)
    b = FIM_MonteCarlo(model, good, PMatDense, trials=3).to_torch()
    assert torch.equal(a, b) and torch.equal(torch.get_rng_state(), state_a)
