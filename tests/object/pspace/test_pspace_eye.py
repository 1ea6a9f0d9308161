"""PMatEye: s·I, every operation against its dense form, and its sums with the other
structured representations."""
import pickle

import pytest
import torch

from _reps_fixtures import (DT, check_inverse, check_layout_errors, check_products, check_solves,
                            close, setup)  # noqa: F401
from nngeometry.metrics import FIM
from nngeometry.object import (PMatBlockDiag, PMatDense, PMatDiag, PMatEye, PMatKFAC, PMatLowRank,
                               PMatQuasiDiag)


@pytest.fixture(scope="module")
def mats(setup):
    M = PMatEye(setup.lc, scaling=torch.tensor(0.8, dtype=DT))
    return setup, M, M.to_torch()


def test_dense_form(mats):
    s, M, D = mats
    P = s.lc.numel()
    close(D, 0.8 * torch.eye(P, dtype=DT), rtol=0)
    assert D.dtype == DT and M.dtype == DT
    assert M.scaling == 0.8
    # default scaling 1; built through FIM too (the generator is not used)
    close(PMatEye(s.lc).get_diag(), torch.ones(P), rtol=0)
    E = FIM(s.model, s.loader, PMatEye, variant=s.variant, scaling=torch.tensor(2.0, dtype=DT))
    close(E.to_torch(), 2.0 * torch.eye(P, dtype=DT), rtol=0)
    with pytest.raises(ValueError, match="PMatDiag"):
        PMatEye(s.lc, scaling=torch.ones(3))


def test_products(mats):
    s, M, D = mats
    check_products(M, D, s)


def test_solves_inverse_pow_logdet(mats):
    s, M, D = mats
    check_solves(M, D, s, regul=0.3)
    check_solves(M, D, s, regul=0.0)
    check_inverse(M, D, regul=0.3)
    close(M.inv(0.0).to_torch(), torch.linalg.inv(D))
    close(M.pow(0.5, regul=0.2).to_torch(), torch.eye(D.shape[0], dtype=DT))
    close((M ** 2).to_torch(), D @ D)
    close(M.logdet(regul=0.2), torch.logdet(D + 0.2 * torch.eye(D.shape[0], dtype=DT)))


def test_arithmetic_and_mm(mats):
    s, M, D = mats
    M2 = PMatEye(s.lc, scaling=torch.tensor(-0.3, dtype=DT))
    D2 = M2.to_torch()
    close((M * 2.5).to_torch(), 2.5 * D)
    close((M / 4).to_torch(), D / 4)
    close((M + M2).to_torch(), D + D2)
    close((M - M2).to_torch(), D - D2)
    close((-M).to_torch(), -D)
    close(M.mm(M2).to_torch(), D @ D2)
    close((M @ M2).to_torch(), D @ D2)
    Dn = PMatDense(s.lc, None, data=s.dense)
    close(M.mm(Dn).to_torch(), D @ s.dense)


@pytest.mark.parametrize("rep", [PMatDiag, PMatBlockDiag, PMatQuasiDiag, PMatLowRank, PMatDense])
def test_sums_with_structured(mats, rep):
    """``A + s·I`` (the damped / prior-added matrix) keeps A's structure where it can."""
    s, M, D = mats
    A = FIM(s.model, s.loader, rep, variant=s.variant)
    DA = A.to_torch()
    close((A + M).to_torch(), DA + D)
    close((M + A).to_torch(), DA + D)
    close((M - A).to_torch(), D - DA)
    close((A - M).to_torch(), DA - D)


def test_sum_with_kfac_is_an_exact_eigen_kronecker_matrix(mats):
    """``A ⊗ G + s·I`` is not Kronecker, but it is exact in the factors' eigenbasis: a
    PMatEKFAC ``U (λ_G ⊗ λ_A + s) Uᵀ``, in either order, and for differences."""
    from nngeometry.object import PMatEKFAC

    s, M, D = mats
    K = FIM(s.model, s.loader, PMatKFAC, variant=s.variant)
    DK = K.to_torch()
    for R, ref in ((K + M, DK + D), (M + K, DK + D), (K - M, DK - D), (M - K, D - DK)):
        assert isinstance(R, PMatEKFAC)
        close(R.to_torch(), ref)


def test_pickle_and_layout(mats):
    s, M, D = mats
    M2 = pickle.loads(pickle.dumps(M))
    close(M2.to_torch(), D, rtol=0)
    check_layout_errors(M, s)
    with pytest.raises(ValueError, match="LayerCollections"):
        M + PMatEye(s.lc.last_layer())
