"""PMatBlockDiag: the per-layer blocks of the exact FIM, and its operations against its own
dense form."""
import pytest
import torch

from _reps_fixtures import (DT, check_arithmetic, check_inverse, check_layout_errors,
                            check_pickle, check_products, check_solves, close, dense_pow, setup)  # noqa: F401
from nngeometry.metrics import FIM
from nngeometry.object import PMatBlockDiag, PMatDiag, PMatEye


@pytest.fixture(scope="module")
def mats(setup):
    M = FIM(setup.model, setup.loader, PMatBlockDiag, variant=setup.variant)
    return setup, M, M.to_torch()


def block_part(s):
    """The brute-force dense FIM with the cross-layer blocks zeroed."""
    mask = torch.zeros_like(s.dense, dtype=torch.bool)
    for lid in s.lc.layer_ids():
        sl = s.lc.slice(lid)
        mask[sl, sl] = True
    return torch.where(mask, s.dense, torch.zeros_like(s.dense))


def test_equals_blocks_of_dense(mats):
    s, M, D = mats
    close(D, block_part(s), rtol=1e-10)
    assert D.dtype == DT
    for lid in s.lc.layer_ids():
        sl = s.lc.slice(lid)
        close(M.data[lid], s.dense[sl, sl], rtol=1e-10)
    M2 = PMatBlockDiag(s.lc, s.generator(), examples=s.loader)
    close(M2.to_torch(), D, rtol=1e-12)


def test_products(mats):
    s, M, D = mats
    check_products(M, D, s)


@pytest.mark.parametrize("solve", ["default", "cholesky", "eigh"])
def test_solves(mats, solve):
    s, M, D = mats
    check_solves(M, D, s, regul=0.3, solve=solve)
    check_solves(M, D, s, regul=1e-3, solve=solve)


def test_inverse_pow_logdet_eig(mats):
    s, M, D = mats
    check_inverse(M, D, regul=0.3)
    close(M.pow(0.5, regul=0.1).to_torch(), dense_pow(D, 0.5, regul=0.1))
    close(M.pow(-1, regul=0.1).to_torch(), dense_pow(D, -1, regul=0.1), rtol=1e-8)
    close((M ** 2).to_torch(), D @ D)
    close(M.logdet(regul=0.2), torch.logdet(D + 0.2 * torch.eye(D.shape[0], dtype=DT)))
    for lid, (evals, evecs) in M.get_eigendecomposition().items():
        close((evecs * evals) @ evecs.t(), M.data[lid])
    with pytest.raises(ValueError, match="solve"):
        M.solve(s.vec(), regul=1.0, solve="nope")


def test_arithmetic_and_mm(mats):
    s, M, D = mats
    M2 = M.pow(2) * 0.5
    D2 = M2.to_torch()
    check_arithmetic(M, M2, D, D2)
    close(M.mm(M2).to_torch(), D @ D2)
    close((M @ M2).to_torch(), D @ D2)
    E = PMatEye(s.lc, scaling=torch.tensor(0.7, dtype=DT))
    close((M + E).to_torch(), D + E.to_torch())
    close((E + M).to_torch(), D + E.to_torch())
    close((M - E).to_torch(), D - E.to_torch())
    with pytest.raises(NotImplementedError, match="PMatDiag"):
        M + PMatDiag(s.lc, None, data=M.get_diag())


def test_pickle_and_layout(mats):
    s, M, D = mats
    check_pickle(M, D, s)
    check_layout_errors(M, s)
