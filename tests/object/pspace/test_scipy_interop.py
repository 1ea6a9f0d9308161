"""M.to_scipy() and M.submatrix(rows, cols) for every representation, against the
representation's own dense matrix (float64): matvec / matmat, scipy's eigsh and lsmr on the
operator, and sub-matrices."""
import sys

import numpy as np
import pytest
import torch

from _table_models import built

scipy_linalg = pytest.importorskip("scipy.sparse.linalg")

DT = torch.float64
REPS = ["PMatDense", "PMatDiag", "PMatBlockDiag", "PMatQuasiDiag", "PMatLowRank", "PMatImplicit",
        "PMatKFAC", "PMatEKFAC", "PMatEKFACBlockDiag", "PMatMixed", "PMatEye",
        "PMatQuasiDiagInverse", "PMatEyePlusLowRank"]


def rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


@pytest.mark.parametrize("rep", REPS)
def test_to_scipy_every_representation(rep):
    b = built(rep)
    M, D = b.M, b.D.numpy()
    P = D.shape[0]
    op = M.to_scipy()
    assert op.shape == (P, P) and op.dtype == np.float64
    rng = np.random.default_rng(0)
    x = rng.standard_normal(P)
    X = rng.standard_normal((P, 4))
    y = op.matvec(x)
    assert y.shape == (P,) and y.dtype == np.float64
    assert rel(y, D @ x) < 1e-10
    assert rel(op.matmat(X), D @ X) < 1e-10
    assert rel(op @ X, D @ X) < 1e-10
    assert rel(op.rmatvec(x), D @ x) < 1e-10
    # eigsh on the operator: the 3 largest eigenvalues of the dense matrix
    k = 3
    vals = np.sort(scipy_linalg.eigsh(op, k=k, which="LA", tol=1e-12)[0])
    ref = np.linalg.eigvalsh(D)[-k:]
    assert np.abs(vals - ref).max() <= 1e-8 * np.abs(np.linalg.eigvalsh(D)).max(), (vals, ref)


@pytest.mark.parametrize("rep", REPS)
def test_submatrix_every_representation(rep):
    b = built(rep)
    M, D = b.M, b.D
    P = D.shape[0]
    rows, cols = [0, 3, P - 1, 7], [5, 0, 2]
    S = M.submatrix(rows, cols)
    assert S.shape == (4, 3) and S.dtype == DT
    torch.testing.assert_close(S, D[rows][:, cols], rtol=1e-10, atol=1e-12 * float(D.abs().max()))
    torch.testing.assert_close(M.submatrix(range(2, 9)), D[2:9, 2:9], rtol=1e-10,
                               atol=1e-12 * float(D.abs().max()))


def test_lsmr_and_cg_on_operator():
    b = built("PMatImplicit")
    D = b.D.numpy()
    P = D.shape[0]
    op = b.M.to_scipy()
    rhs = np.random.default_rng(1).standard_normal(P)
    regul = 0.5
    damped = op + scipy_linalg.aslinearoperator(regul * np.eye(P))  # keeps rmatvec
    x, info = scipy_linalg.cg(damped, rhs, rtol=1e-12, maxiter=10 * P)
    assert info == 0
    ref = np.linalg.solve(D + regul * np.eye(P), rhs)
    assert rel(x, ref) < 1e-8
    x = scipy_linalg.lsmr(damped, rhs, atol=1e-14, btol=1e-14)[0]
    assert rel(x, ref) < 1e-7


def test_submatrix_indices():
    b = built("PMatDense")
    M, D = b.M, b.D
    P = D.shape[0]
    torch.testing.assert_close(M.submatrix(slice(0, 5), [-1]), D[0:5, [P - 1]])
    torch.testing.assert_close(M.submatrix(torch.tensor([1, 2]), np.array([3])), D[[1, 2]][:, [3]])
    assert M.submatrix([], [1, 2]).shape == (0, 2)
    # the layer offsets of the collection address a layer's block
    lid = b.lc.layer_ids()[1]
    start = b.lc.p_pos[lid]
    n = b.lc.layers[lid].numel()
    torch.testing.assert_close(M.submatrix(range(start, start + n)), D[start:start + n,
                                                                        start:start + n])
    with pytest.raises(IndexError, match="out of range"):
        M.submatrix([P])
    with pytest.raises(TypeError, match="boolean"):
        M.submatrix(torch.ones(P, dtype=torch.bool))
    with pytest.raises(TypeError, match="integer"):
        M.submatrix([0.5, 1.0])


def test_float32_model_gives_float64_operator():
    b = built("PMatDense")
    from nngeometry.object import PMatDense
    M32 = PMatDense(b.lc, data=b.D.float())
    op = M32.to_scipy()
    y = op.matvec(np.ones(b.P))
    assert y.dtype == np.float64
    assert rel(y, b.D.numpy() @ np.ones(b.P)) < 1e-5
    assert M32.to_scipy(dtype=np.float32).matvec(np.ones(b.P)).dtype == np.float32
    with pytest.raises(TypeError, match="floating"):
        M32.to_scipy(dtype=np.int64)


def test_clear_error_without_scipy(monkeypatch):
    b = built("PMatDiag")
    monkeypatch.setitem(sys.modules, "scipy.sparse.linalg", None)
    with pytest.raises(ImportError, match="pip install scipy"):
        b.M.to_scipy()
