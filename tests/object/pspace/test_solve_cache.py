"""Solves of PMatDense / PMatBlockDiag / PMatLowRank / PMatEyePlusLowRank cache their
factorization per regul: a second solve with the same regul must not factorize again (the
factorization routines are made to raise), must give bit-identical results, and every result
must equal the brute-force dense solve. A new regul refactorizes; pickles carry no cache."""
import pickle

import pytest
import torch
from torch import nn

from nngeometry.metrics import FIM
from nngeometry.object import (PMatBlockDiag, PMatDense, PMatEyePlusLowRank, PMatLowRank,
                               random_pfmap, random_pvector)

DT = torch.float64
FACTORIZATIONS = ("lu_factor", "lu_factor_ex", "solve", "solve_ex", "cholesky", "cholesky_ex",
                  "eigh", "inv", "lstsq")


@pytest.fixture(scope="module")
def model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    x = torch.randn(7, 4, generator=torch.Generator().manual_seed(1), dtype=DT)
    return model, (x,)


@pytest.fixture
def no_factorization(monkeypatch):
    """Calling it makes every torch.linalg factorization raise."""
    def forbid():
        for name in FACTORIZATIONS:
            def boom(*args, _name=name, **kwargs):
                raise AssertionError(f"torch.linalg.{_name} called: the cached factorization "
                                     "was not reused")
            monkeypatch.setattr(torch.linalg, name, boom)
    return forbid


def dense_solve(D, regul, b):
    return torch.linalg.solve(D + regul * torch.eye(D.shape[0], dtype=DT), b)


def check_close(a, b):
    scale = b.abs().max()
    assert (a - b).abs().max() <= 1e-9 * scale, float((a - b).abs().max() / scale)


CASES = [(PMatDense, "default"), (PMatDense, "solve"), (PMatDense, "cholesky"),
         (PMatDense, "eigh"), (PMatBlockDiag, "default"), (PMatBlockDiag, "cholesky"),
         (PMatBlockDiag, "eigh"), (PMatLowRank, "default")]


@pytest.mark.parametrize("cls,solve", CASES)
def test_second_solve_reuses_factorization(model_and_data, no_factorization, cls, solve):
    model, batch = model_and_data
    M = FIM(model, batch, cls, variant="classif_logits")
    D = M.to_torch()
    lc = M.layer_collection
    torch.manual_seed(2)
    v = random_pvector(lc, dtype=DT)
    m = random_pfmap(lc, 2, 3, dtype=DT)
    regul = 0.05
    K, n, P = m.to_torch().shape
    want_map = dense_solve(D, regul, m.to_torch().reshape(K * n, P).t()).t().reshape(K, n, P)
    first = M.solve(v, regul=regul, solve=solve).get_flat_representation()
    check_close(first, dense_solve(D, regul, v.get_flat_representation()))
    no_factorization()
    second = M.solve(v, regul=regul, solve=solve).get_flat_representation()
    assert torch.equal(first, second)
    check_close(M.solve(m, regul=regul, solve=solve).to_torch(), want_map)  # same cached factors


@pytest.mark.parametrize("cls,solve", [(PMatDense, "default"), (PMatBlockDiag, "default"),
                                       (PMatBlockDiag, "cholesky"), (PMatLowRank, "default")])
def test_new_regul_refactorizes_and_pickle_drops_cache(model_and_data, cls, solve):
    model, batch = model_and_data
    M = FIM(model, batch, cls, variant="classif_logits")
    D = M.to_torch()
    torch.manual_seed(3)
    v = random_pvector(M.layer_collection, dtype=DT)
    f = v.get_flat_representation()
    for regul in (0.05, 0.2, 0.05):  # the last regul only is kept: 0.05 is computed again
        y = M.solve(v, regul=regul, solve=solve).get_flat_representation()
        check_close(y, dense_solve(D, regul, f))
    state = M.__getstate__()
    assert "_solve_cache" not in state and "_regul_cache" not in state
    assert "_gram_cache" not in state
    M2 = pickle.loads(pickle.dumps(M))
    assert torch.equal(M2.solve(v, regul=0.05, solve=solve).get_flat_representation(), y)


def test_lowrank_gram_is_computed_once(model_and_data, no_factorization):
    model, batch = model_and_data
    M = FIM(model, batch, PMatLowRank, variant="classif_logits")
    assert M._gram() is M._gram()
    D = M.to_torch()
    torch.manual_seed(4)
    v = random_pvector(M.layer_collection, dtype=DT)
    # PMatEyePlusLowRank (the inverse's type): Woodbury matrix cached per regul
    Inv = M.inv(regul=0.1)
    assert isinstance(Inv, PMatEyePlusLowRank)
    want = dense_solve(torch.linalg.inv(D + 0.1 * torch.eye(D.shape[0], dtype=DT)), 0.3,
                       v.get_flat_representation())
    first = Inv.solve(v, regul=0.3).get_flat_representation()
    check_close(first, want)
    assert Inv._blocks()[0] is Inv._blocks()[0]  # the block, with its Woodbury factors, is kept
    no_factorization()
    assert torch.equal(Inv.solve(v, regul=0.3).get_flat_representation(), first)
