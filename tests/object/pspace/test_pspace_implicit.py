"""PMatImplicit: every product equals the exact dense FIM (nothing stored), CG solves reach
(M + λI)⁻¹ x, and the operations that need the matrix say what to use instead."""
import pickle

import pytest
import torch

from _reps_fixtures import DT, check_layout_errors, close, setup  # noqa: F401
from nngeometry.metrics import FIM
from nngeometry.object import PMatDense, PMatImplicit


@pytest.fixture(scope="module")
def mats(setup):
    M = FIM(setup.model, setup.loader, PMatImplicit, variant=setup.variant)
    return setup, M, setup.dense


def test_products_equal_dense(mats):
    s, M, D = mats
    assert M.data is None
    v = s.vec()
    f = v.get_flat_representation()
    close(M.mv(v).get_flat_representation(), D @ f, rtol=1e-10)
    close((M @ v).get_flat_representation(), D @ f, rtol=1e-10)
    close(M.vTMv(v), f @ D @ f, rtol=1e-10)
    Jm = s.pfmap()
    J = Jm.to_torch()
    close(M.mmap(Jm).to_torch(), J @ D, rtol=1e-10)
    forms = torch.einsum("kip,pq,kiq->ki", J, D, J)  # (K, n): J[k, i] D J[k, i]ᵀ
    close(M.mapTMmap(Jm, reduction="sum"), forms.sum(dim=0), rtol=1e-10)
    close(M.mapTMmap(Jm, reduction="diag"), forms, rtol=1e-10)
    close(M.get_diag(), torch.diagonal(D), rtol=1e-10)
    close(M.trace(), torch.trace(D), rtol=1e-10)
    assert M.get_diag().dtype == DT and M.dtype == DT
    assert M.size() == D.shape


def test_chunked_rows_and_direct_build(mats):
    s, M, D = mats
    M2 = PMatImplicit(s.lc, s.generator(), examples=(s.x, s.y), rows_per_pass=4)
    Jm = s.pfmap(n=3)  # 6 rows in passes of 4 and 2
    J = Jm.to_torch()
    close(M2.mmap(Jm).to_torch(), J @ D, rtol=1e-10)
    close(M2.mapTMmap(Jm, reduction="diag"), torch.einsum("kip,pq,kiq->ki", J, D, J), rtol=1e-10)


def test_to_torch_only_when_asked(mats):
    s, M, D = mats
    with pytest.raises(NotImplementedError, match="allow_dense=True"):
        M.to_torch()
    close(M.to_torch(allow_dense=True), D, rtol=1e-10)


def test_cg_solves(mats):
    s, M, D = mats
    I = torch.eye(D.shape[0], dtype=DT)
    v = s.vec()
    f = v.get_flat_representation()
    y = M.solve(v, regul=0.3, tol=1e-13)
    close(y.get_flat_representation(), torch.linalg.solve(D + 0.3 * I, f), rtol=1e-9)
    assert M.last_cg_info["relative_residual"] <= 1e-13
    # CG ends within rank(M) + 1 iterations (plus a few for round-off)
    assert M.last_cg_info["iterations"] <= 2 * 3 * s.x.shape[0] + 5
    Jm = s.pfmap(n=2)
    J = Jm.to_torch()
    K, n, P = J.shape
    ref = torch.linalg.solve(D + 0.3 * I, J.reshape(K * n, P).t()).t().reshape(K, n, P)
    close(M.solve(Jm, regul=0.3, tol=1e-13).to_torch(), ref, rtol=1e-9)
    with pytest.raises(RuntimeError, match="did not converge.*max_iter.*return_info=True"):
        M.solve(v, regul=1e-3, max_iter=2)
    with pytest.raises(ValueError, match="cg"):
        M.solve(v, regul=1.0, solve="cholesky")


def test_scaling(mats):
    s, M, D = mats
    M3 = 3.0 * M
    v = s.vec()
    f = v.get_flat_representation()
    close(M3.mv(v).get_flat_representation(), 3.0 * D @ f, rtol=1e-10)
    close((M / 2).vTMv(v), f @ D @ f / 2, rtol=1e-10)
    close((-M).get_diag(), -torch.diagonal(D), rtol=1e-10)
    if s.kind == "cnn":
        return  # the CG path is covered by test_cg_solves; keep the suite fast
    close(M3.solve(v, regul=0.3, tol=1e-13).get_flat_representation(),
          torch.linalg.solve(3.0 * D + 0.3 * torch.eye(D.shape[0], dtype=DT), f), rtol=1e-9)


def test_plus_eye_or_diag_stays_implicit(mats):
    """``M + s·I``, ``M + diag(d)``, their differences and scalings: every product, the
    diagonal, the solves and the pickled form add the diagonal exactly."""
    from nngeometry.object import PMatDiag, PMatEye

    s, M, D = mats
    P = D.shape[0]
    d = torch.linspace(0.1, 0.9, P, dtype=DT)
    eye = PMatEye(s.lc, scaling=torch.tensor(0.4, dtype=DT))
    diag = PMatDiag(s.lc, None, data=d)
    cases = [(M + eye, D + 0.4 * torch.eye(P, dtype=DT)), (eye + M, D + 0.4 * torch.eye(P, dtype=DT)),
             (M + diag, D + torch.diag(d)), (M - eye, D - 0.4 * torch.eye(P, dtype=DT)),
             (M - diag, D - torch.diag(d)),
             (2.0 * (M + diag), 2.0 * (D + torch.diag(d)))]
    v = s.vec()
    f = v.get_flat_representation()
    Jm = s.pfmap()
    J = Jm.to_torch()
    for R, ref in cases:
        assert isinstance(R, PMatImplicit)
        close(R.mv(v).get_flat_representation(), ref @ f, rtol=1e-10)
        close(R.vTMv(v), f @ ref @ f, rtol=1e-10)
        close(R.mmap(Jm).to_torch(), J @ ref, rtol=1e-10)
        close(R.mapTMmap(Jm, reduction="diag"), torch.einsum("kip,pq,kiq->ki", J, ref, J),
              rtol=1e-10)
        close(R.get_diag(), torch.diagonal(ref), rtol=1e-10)
        close(R.to_torch(allow_dense=True), ref, rtol=1e-10)
    R, ref = cases[2]
    close(R.solve(v, regul=0.2, tol=1e-13).get_flat_representation(),
          torch.linalg.solve(ref + 0.2 * torch.eye(P, dtype=DT), f), rtol=1e-9)
    M2 = pickle.loads(pickle.dumps(R))
    M2.generator = M.generator
    close(M2.mv(v).get_flat_representation(), ref @ f, rtol=1e-10)
    close(M.mv(v).get_flat_representation(), D @ f, rtol=1e-10)  # M itself unchanged


def test_unsupported_name_alternatives(mats):
    s, M, D = mats
    with pytest.raises(NotImplementedError, match="solve"), pytest.warns(DeprecationWarning):
        M.inverse(0.1)
    with pytest.raises(NotImplementedError, match="solve"):
        M.inv(0.1)
    with pytest.raises(NotImplementedError, match="PMatLowRank"):
        M.pow(0.5)
    with pytest.raises(NotImplementedError, match="PMatLowRank"):
        M.norm()
    with pytest.raises(NotImplementedError, match="PMatLowRank"), pytest.warns(DeprecationWarning):
        M.frobenius_norm()
    with pytest.raises(NotImplementedError, match="mv"):
        M.mm(M)
    with pytest.raises(NotImplementedError, match="mv"):
        M + M
    with pytest.raises(NotImplementedError, match="mv"):
        M - PMatDense(s.lc, None, data=D)
    with pytest.raises(NotImplementedError, match="PMatDense"):
        M.logdet(0.1)
    with pytest.raises(NotImplementedError, match="spectrum"):
        M.eigenvalues()
    with pytest.raises(NotImplementedError, match="solve"):
        M.diag_of_inverse(0.1)


def test_pickle_and_layout(mats):
    s, M, D = mats
    M2 = pickle.loads(pickle.dumps(M))
    assert M2.generator is None
    with pytest.raises(RuntimeError, match="generator"):
        M2.mv(s.vec())
    M2.generator = s.generator()
    close(M2.mv(s.vec()).get_flat_representation(), D @ s.vec().get_flat_representation(),
          rtol=1e-10)
    check_layout_errors(M, s)
