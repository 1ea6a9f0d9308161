"""One damping keyword on every representation: ``solve``, ``inverse``, ``pow`` and ``logdet``
accept ``damping='exact'`` everywhere (same result as without it, except KFAC, whose default is
π-damping for solve / inverse / pow); ``damping='pi'`` only where it means something (KFAC, and a
PMatMixed with a KFAC group), a clear ValueError elsewhere; so callers never need to catch a
TypeError."""
import pytest
import torch

from nngeometry.object import (PMatBlockDiag, PMatDense, PMatDiag, PMatEKFAC, PMatEKFACBlockDiag,
                               PMatEye, PMatImplicit, PMatKFAC, PMatLowRank, PMatMixed,
                               PMatQuasiDiag, random_pvector)

from nngeometry import FIM
from test_priors_exact import built, dense, setup

DT = torch.float64
REPS = [PMatDense, PMatDiag, PMatBlockDiag, PMatQuasiDiag, PMatLowRank, PMatEye, PMatKFAC,
        PMatEKFAC, PMatEKFACBlockDiag, PMatImplicit, PMatMixed]
NAMES = [c.__name__ for c in REPS] + ["PMatMixed-kfac"]


def _make(name):
    if name == "PMatMixed-kfac":  # a KFAC group and a Diag group
        model, loader, lc = setup()
        ids = lc.layer_ids()
        return FIM(model, loader, PMatMixed, layer_map={ids[0]: "k", ids[1]: "d"},
                   sub_pmats={"k": PMatKFAC, "d": PMatDiag})
    return built(name)


def _calls(M, damping):
    torch.manual_seed(0)
    v = random_pvector(M.layer_collection, dtype=DT)
    out = {"solve": lambda: M.solve(v, regul=0.5, damping=damping)}
    if not isinstance(M, PMatImplicit):
        out["inverse"] = lambda: M.inv(regul=0.5, damping=damping)
        out["pow"] = lambda: M.pow(-1, regul=0.5, damping=damping)
        out["logdet"] = lambda: M.logdet(regul=0.5, damping=damping)
    return v, out


@pytest.mark.parametrize("name", NAMES)
def test_exact_accepted_everywhere_and_exact(name):
    M = _make(name)
    v, calls = _calls(M, "exact")
    if name == "PMatMixed-kfac":
        calls.pop("solve")  # exact damping of a KFAC group: (A ⊗ G + λI)⁻¹, checked below

    D = dense(M).detach()
    A = D + 0.5 * torch.eye(D.shape[0], dtype=DT)
    x = v.to_torch()
    tol = 1e-5 if name == "PMatImplicit" else 1e-8
    if "solve" in calls:
        y = calls["solve"]().to_torch()
        assert float((y - torch.linalg.solve(A, x)).abs().max()) <= tol * float(y.abs().max())
    if "logdet" in calls:
        assert abs(float(calls["logdet"]()) - float(torch.logdet(A))) <= 1e-8 * abs(float(torch.logdet(A)))
        inv = torch.linalg.inv(A)
        for what in ("inverse", "pow"):
            got = calls[what]().to_torch()
            assert float((got - inv).abs().max()) <= 1e-8 * float(inv.abs().max()), what


@pytest.mark.parametrize("name", NAMES)
def test_pi_only_where_it_means_something(name):
    M = _make(name)
    _, calls = _calls(M, "pi")
    for what, call in calls.items():
        if name in ("PMatKFAC", "PMatMixed-kfac"):
            call()  # π-damped (for the KFAC group of the mixed matrix): runs
        else:
            with pytest.raises(ValueError, match=r"damping='pi' is not available.*'exact'"):
                call()


@pytest.mark.parametrize("name", ["PMatDiag", "PMatKFAC"])
def test_unknown_damping_named(name):
    M = _make(name)
    with pytest.raises(ValueError, match="damping.*'tikhonov'.*'exact'"):
        M.logdet(regul=0.5, damping="tikhonov")
