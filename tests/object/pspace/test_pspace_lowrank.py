"""PMatLowRank: equal to the exact FIM (it stores J/√n), exact damped solves including the part
of x orthogonal to the low-rank space, and operations against its own dense form; and
PMatEyePlusLowRank, what its inverse / differences return."""
import pytest
import torch

from _reps_fixtures import (DT, check_arithmetic, check_inverse, check_layout_errors,
                            check_pickle, check_products, check_solves, close, dense_pow, setup)  # noqa: F401
from nngeometry.metrics import FIM
from nngeometry.object import PMatDiag, PMatEye, PMatEyePlusLowRank, PMatLowRank, PVector


@pytest.fixture(scope="module")
def mats(setup):
    M = FIM(setup.model, setup.loader, PMatLowRank, variant=setup.variant)
    return setup, M, M.to_torch()


def test_equals_dense(mats):
    s, M, D = mats
    close(D, s.dense, rtol=1e-10)
    assert D.dtype == DT
    K = 2 if s.variant == "classif_logits" else 3
    assert M.data.shape == (K, s.x.shape[0], s.lc.numel())
    assert M._rank() < s.lc.numel()  # really low rank: the damping matters off the range
    M2 = PMatLowRank(s.lc, s.generator(), examples=s.loader)
    close(M2.to_torch(), s.dense, rtol=1e-10)


def test_products(mats):
    s, M, D = mats
    check_products(M, D, s)


@pytest.mark.parametrize("solve", ["default", "eigh"])
def test_solves_are_exact(mats, solve):
    s, M, D = mats
    check_solves(M, D, s, regul=0.3, solve=solve)
    check_solves(M, D, s, regul=1e-2, solve=solve)
    # a vector orthogonal to the range of M is scaled by 1/λ, not dropped
    evals, V = M.get_eigendecomposition()
    f = s.vec().get_flat_representation()
    f_perp = f - V @ (V.t() @ f)
    assert f_perp.norm() > 0.1 * f.norm()
    y = M.solve(PVector(s.lc, vector_repr=f_perp), regul=0.5, solve=solve)
    close(y.get_flat_representation(), f_perp / 0.5, rtol=1e-8)
    with pytest.raises(ValueError, match="regul > 0"):
        M.solve(s.vec(), regul=0.0)


def test_eigendecomposition(mats):
    s, M, D = mats
    evals, V = M.get_eigendecomposition()
    ref = torch.linalg.eigvalsh(s.dense)
    k = evals.shape[0]
    close(evals, ref[-k:], scale=float(ref.max()), rtol=1e-9)
    close(V.t() @ V, torch.eye(k, dtype=DT), rtol=1e-9)
    close((V * evals) @ V.t(), D, rtol=1e-9)


def test_inverse_pow_logdet(mats):
    s, M, D = mats
    I = torch.eye(D.shape[0], dtype=DT)
    check_inverse(M, D, regul=0.3)
    assert isinstance(M.inv(0.3), PMatEyePlusLowRank)
    close(M.pow(0.5).to_torch(), dense_pow(D, 0.5), scale=float(D.abs().max()) ** 0.5, rtol=1e-7)
    assert isinstance(M.pow(2), PMatLowRank)
    close((M ** 2).to_torch(), D @ D)
    close(M.pow(-1, regul=0.1).to_torch(), torch.linalg.inv(D + 0.1 * I), rtol=1e-8)
    close(M.pow(0.5, regul=0.1).to_torch(), dense_pow(D, 0.5, regul=0.1), rtol=1e-8)
    close(M.pow(-1, on_range=True).to_torch(), torch.linalg.pinv(D, hermitian=True, rtol=1e-10),
          rtol=1e-6)
    with pytest.raises(ValueError, match="regul > 0"):
        M.pow(-1)
    close(M.logdet(regul=0.2), torch.logdet(D + 0.2 * I), rtol=1e-10)
    with pytest.raises(NotImplementedError, match="mv/mmap"):
        M.mm(M)


def test_arithmetic(mats):
    s, M, D = mats
    M2 = M * 0.5
    assert isinstance(M2, PMatLowRank)
    check_arithmetic(M, M2, D, 0.5 * D)
    assert isinstance(M + M2, PMatLowRank)
    close((-M).to_torch(), -D)
    E = PMatEye(s.lc, scaling=torch.tensor(0.7, dtype=DT))
    close((M + E).to_torch(), D + E.to_torch())
    close((E + M).to_torch(), D + E.to_torch())
    close((E - M).to_torch(), E.to_torch() - D)
    with pytest.raises(NotImplementedError, match="PMatDiag"):
        M + PMatDiag(s.lc, None, data=M.get_diag())
    # what leaves the low-rank PSD form is a PMatEyePlusLowRank
    for R, ref in ((M * torch.tensor(-0.5, dtype=DT), -0.5 * D), (M - M2, 0.5 * D),
                   (M + (M2 + E), 1.5 * D + E.to_torch())):
        assert isinstance(R, PMatEyePlusLowRank)
        close(R.to_torch(), ref)
    close(M.norm(2), torch.linalg.matrix_norm(D, 2), rtol=1e-10)
    assert float(M.norm(-2)) == 0.0  # rank < P


def test_eye_plus_lowrank(mats):
    """The damped / signed family: its operations against its dense form, its own solves and
    inverse (Woodbury again), logdet."""
    s, M, D = mats
    I = torch.eye(D.shape[0], dtype=DT)
    A = M - M * 0.25 + PMatEye(s.lc, scaling=torch.tensor(0.2, dtype=DT))  # 0.75 D + 0.2 I
    DA = A.to_torch()
    close(DA, 0.75 * D + 0.2 * I)
    check_products(A, DA, s)
    check_solves(A, DA, s, regul=0.1)
    check_inverse(A, DA, regul=0.1)
    check_solves(A.inv(0.1), torch.linalg.inv(DA + 0.1 * I), s, regul=0.5)
    close(A.logdet(regul=0.1), torch.logdet(DA + 0.1 * I), rtol=1e-10)
    close((A * 2).to_torch(), 2 * DA)
    close((A + A).to_torch(), 2 * DA)
    close((A - M).to_torch(), DA - D)
    close(A.pow(1, regul=0.1).to_torch(), DA + 0.1 * I)


def test_pickle_and_layout(mats):
    s, M, D = mats
    check_pickle(M, D, s)
    check_layout_errors(M, s)


def test_eye_plus_lowrank_diagonal_alpha_and_indefinite():
    """A diagonal ``α`` (Woodbury and the determinant lemma with a diagonal) and an indefinite
    ``C``, against the dense matrix: solves, inverse, logdet, diag_of_inverse; a matrix with two
    negative eigenvalues (positive determinant) has no real log-determinant of a positive
    definite matrix and is refused."""
    from nngeometry.object.pspace._checks import NotPositiveSemiDefiniteError, SingularMatrixError
    from nngeometry.layercollection import LayerCollection
    lc = LayerCollection.from_model(torch.nn.Linear(3, 2).to(DT))  # P = 8
    g = torch.Generator().manual_seed(3)
    P = lc.numel()
    U = torch.randn(3, P, dtype=DT, generator=g)
    C = torch.randn(3, 3, dtype=DT, generator=g)
    alpha = torch.linspace(0.5, 1.5, P, dtype=DT)
    A = PMatEyePlusLowRank(lc, alpha=alpha, U=U, C=C @ C.t())
    DA, I = A.to_torch(), torch.eye(P, dtype=DT)
    f = torch.randn(P, dtype=DT, generator=g)
    for regul in (0.0, 0.3):
        close(A.solve(PVector(lc, vector_repr=f), regul=regul).get_flat_representation(),
              torch.linalg.solve(DA + regul * I, f), rtol=1e-10)
        close(A.inv(regul).to_torch(), torch.linalg.inv(DA + regul * I), rtol=1e-10)
        close(A.logdet(regul), torch.logdet(DA + regul * I), rtol=1e-10)
        close(A.diag_of_inverse(regul), torch.diagonal(torch.linalg.inv(DA + regul * I)),
              rtol=1e-10)
    # 0.1 I - 5 (two unit directions): eigenvalues -4.9 twice, det > 0
    E = torch.eye(P, dtype=DT)[:2]
    B = PMatEyePlusLowRank(lc, alpha=torch.tensor(0.1, dtype=DT), U=E,
                           C=-5 * torch.eye(2, dtype=DT))
    assert float(torch.det(B.to_torch())) > 0
    with pytest.raises(NotPositiveSemiDefiniteError, match="logdet"):
        B.logdet()
    close(B.solve(PVector(lc, vector_repr=f)).get_flat_representation(),
          torch.linalg.solve(B.to_torch(), f), rtol=1e-10)
    with pytest.raises(SingularMatrixError, match="α \\+ regul = 0"):
        B.solve(PVector(lc, vector_repr=f), regul=-0.1)
