"""PMatDiag: the diagonal of the exact FIM, and its operations against its own dense form."""
import pytest
import torch

from _reps_fixtures import (DT, check_arithmetic, check_inverse, check_layout_errors,
                            check_pickle, check_products, check_solves, close, dense_pow, setup)  # noqa: F401
from nngeometry.metrics import FIM
from nngeometry.object import PMatDense, PMatDiag, PMatEye


@pytest.fixture(scope="module")
def mats(setup):
    M = FIM(setup.model, setup.loader, PMatDiag, variant=setup.variant)
    return setup, M, M.to_torch()


def test_equals_diagonal_of_dense(mats):
    s, M, D = mats
    close(M.get_diag(), torch.diagonal(s.dense), rtol=1e-10)
    assert M.get_diag().dtype == DT
    close(D, torch.diag(torch.diagonal(s.dense)), rtol=1e-10)
    # built directly, and through a single mini-batch instead of a loader: the same matrix
    M2 = PMatDiag(s.lc, s.generator(), examples=s.loader)
    close(M2.get_diag(), M.get_diag(), rtol=1e-12)
    M3 = PMatDiag(s.lc, s.generator(), examples=(s.x, s.y))
    close(M3.get_diag(), M.get_diag(), rtol=1e-12)


def test_products(mats):
    s, M, D = mats
    check_products(M, D, s)


def test_solves_inverse_pow_logdet(mats):
    s, M, D = mats
    check_solves(M, D, s, regul=0.3)
    check_solves(M, D, s, regul=1e-3)
    check_inverse(M, D, regul=0.3)
    close(M.pow(0.5, regul=0.1).to_torch(), dense_pow(D, 0.5, regul=0.1))
    close((M ** 2).to_torch(), D @ D)
    close(M.logdet(regul=0.2), torch.logdet(D + 0.2 * torch.eye(D.shape[0], dtype=DT)))
    with pytest.raises(ValueError, match="solve"):
        M.solve(s.vec(), regul=1.0, solve="cholesky")


def test_arithmetic_and_mm(mats):
    s, M, D = mats
    M2 = PMatDiag(s.lc, None, data=torch.linspace(0.5, 2.0, s.lc.numel(), dtype=DT))
    D2 = M2.to_torch()
    check_arithmetic(M, M2, D, D2)
    close(M.mm(M2).to_torch(), D @ D2)
    close((M @ M2).to_torch(), D @ D2)
    E = PMatEye(s.lc, scaling=torch.tensor(0.7, dtype=DT))
    close((M + E).to_torch(), D + E.to_torch())
    close((E + M).to_torch(), D + E.to_torch())
    close((M - E).to_torch(), D - E.to_torch())
    with pytest.raises(NotImplementedError, match="to_torch"):
        M + PMatDense(s.lc, None, data=D)


def test_pickle_and_layout(mats):
    s, M, D = mats
    check_pickle(M, D, s)
    check_layout_errors(M, s)
