"""Every public entry point and application leaves the model and the process as it found them,
after a normal call, after a failed call, and when the model is in a mode the entry point
refuses (BatchNorm in training mode: refused *before* the model runs, so its running
statistics are not updated).

Checked (see ``test_global_state.check_unchanged``): the functions of ``torch`` and
``torch.nn.functional``, the global and per-module hooks, grad / inference mode, the parameters
(objects, values, ``requires_grad``, ``.grad``), the buffers, the modules' training flags, and
the global RNG state. Calls that draw random numbers are given their own generator.
``NaturalGradient.step`` writes the preconditioned direction into the existing ``.grad``
tensors (what it is for): their values change, not which tensors they are.
"""
import pytest
import torch
import torch.nn.functional as F

from test_global_state import check_unchanged, model_and_data, snapshot
from nngeometry import (EmpiricalFisher, FIM, FIM_MonteCarlo, GGN, GramMatrix, Hessian,
                        Jacobian)
from nngeometry.estimators import (diag_estimate, spectral_density, top_eigenpairs,
                                   trace_estimate)
from nngeometry.laplace import Laplace
from nngeometry.object import PMatDiag, PMatImplicit, PMatKFAC
from nngeometry.optim import NaturalGradient
from nngeometry.regularization import EWC


def _seeded():
    return torch.Generator().manual_seed(0)


def _laplace(model, good):
    return Laplace(model, "classification", PMatKFAC, prior_precision=1.0).fit(good)


def _ewc(model, good):
    e = EWC(model, lam=1.0)
    e.register_task(FIM(model, good, PMatDiag))
    e.other = _Other()  # built before the snapshot: its initialisation draws from the RNG
    return e


def _implicit(model, examples):
    return FIM(model, examples, PMatImplicit)


def _ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


# each entry: (prepare(model, good) -> context built before the snapshot,
#              call(context, model, examples, good, failed))
ENTRIES = {
    "FIM": (None, lambda c, m, ex, good, failed: FIM(m, ex, PMatKFAC)),
    "FIM_MonteCarlo": (None, lambda c, m, ex, good, failed: FIM_MonteCarlo(m, ex, PMatDiag)),
    "Jacobian": (None, lambda c, m, ex, good, failed: Jacobian(m, ex)),
    "GramMatrix": (None, lambda c, m, ex, good, failed: GramMatrix(m, ex)),
    "PMatImplicit.mv": (None, lambda c, m, ex, good, failed: _implicit(m, ex).mv(
        _ones(c, m, good))),
    "EmpiricalFisher": (None, lambda c, m, ex, good, failed: EmpiricalFisher(m, ex, PMatKFAC)),
    "GGN": (None, lambda c, m, ex, good, failed: GGN(m, ex, PMatDiag, _ce)),
    "Hessian/implicit": (None, lambda c, m, ex, good, failed: Hessian(
        m, ex, PMatImplicit).mv(_ones(c, m, good))),
    "NaturalGradient.step": (
        lambda m, good: NaturalGradient(m, PMatKFAC, curvature="fisher", capture=False),
        lambda c, m, ex, good, failed: c.step(ex[-1])),
    "EWC.penalty": (
        _ewc,
        lambda c, m, ex, good, failed: c.penalty() if not failed else c.penalty(model=c.other)),
    "Laplace.fit": (None, lambda c, m, ex, good, failed: _laplace(m, ex)),
    "Laplace.predictive": (
        _laplace,
        lambda c, m, ex, good, failed: c.predictive(ex[-1][0], link_approx="mc", n_samples=4,
                                                    generator=_seeded())),
    "Laplace.sample": (
        _laplace,
        lambda c, m, ex, good, failed: c.sample(n_samples=-1 if failed else 3,
                                                generator=_seeded())),
    "trace_estimate": (None, lambda c, m, ex, good, failed: trace_estimate(
        _implicit(m, ex), 4, generator=_seeded())),
    "diag_estimate": (None, lambda c, m, ex, good, failed: diag_estimate(
        _implicit(m, ex), 4, generator=_seeded())),
    "top_eigenpairs": (None, lambda c, m, ex, good, failed: top_eigenpairs(
        _implicit(m, ex), 2, max_iter=2, generator=_seeded())),
    "spectral_density": (None, lambda c, m, ex, good, failed: spectral_density(
        _implicit(m, ex), n_lanczos=4, n_repeats=1, n_points=16, generator=_seeded())),
}


class _Other(torch.nn.Module):
    """A model that is not the one the EWC penalty was built for."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)


def _ones(context, model, good):
    from nngeometry.layercollection import LayerCollection
    from nngeometry.object import PVector

    lc = LayerCollection.from_model(model)
    p = next(model.parameters())
    return PVector(lc, vector_repr=torch.ones(lc.numel(), dtype=p.dtype))


def _bad_predictive_inputs(examples):
    x, y = examples[-1]
    return [(torch.full_like(x, float("nan")), y)]


@pytest.mark.parametrize("entry", list(ENTRIES))
@pytest.mark.parametrize("outcome", ["normal", "failed", "batchnorm_training",
                                     "normal_no_grad"])
def test_application_leaves_state_unchanged(entry, outcome):
    if outcome == "normal_no_grad":
        # called inside torch.no_grad(): the entry points compute with autograd locally and
        # leave grad mode off
        with torch.no_grad():
            _check_application(entry, "normal")
    else:
        _check_application(entry, outcome)


def _check_application(entry, outcome):
    model, good, bad = model_and_data()
    prepare, call = ENTRIES[entry]
    context = prepare(model, good) if prepare is not None else None
    examples = good
    if outcome == "failed":
        examples = _bad_predictive_inputs(good) if entry == "Laplace.predictive" else bad
    if outcome == "batchnorm_training":
        model[1].train()  # batch statistics: per-example quantities are not defined
    if entry == "NaturalGradient.step":
        # step() reads the gradients of the training step
        with torch.enable_grad():
            model(good[0][0]).logsumexp(1).sum().backward()
    before = snapshot(model)
    if outcome == "normal":
        call(context, model, examples, good, False)
    elif outcome == "failed":
        with pytest.raises((ValueError, RuntimeError, TypeError, KeyError)):
            call(context, model, examples, good, True)
    else:
        try:
            call(context, model, examples, good, False)
        except RuntimeError as e:
            assert "BatchNorm" in str(e) and "eval()" in str(e)
        else:
            # an entry point that does not run the model has nothing to refuse; the Hessian of
            # a batch's loss is defined with batch statistics (buffers restored)
            assert entry in ("EWC.penalty", "Laplace.sample", "Hessian/implicit"), \
                "batch statistics accepted"
    # FIM_MonteCarlo draws its targets from the global RNG (documented)
    check_unchanged(model, before, rng=entry != "FIM_MonteCarlo")
