"""Fractional powers (pow(±1/2), sqrt) of PMatLowRank, PMatEyePlusLowRank and PMatQuasiDiag:
exact through their eigendecompositions, checked against torch.linalg.eigh of to_torch() in
float64; an indefinite matrix gets the shared NotPositiveSemiDefiniteError."""
import pytest
import torch
from torch import nn

from nngeometry import FIM
from nngeometry.layercollection import LayerCollection
from nngeometry.object import PMatBlockDiag, PMatLowRank, PMatQuasiDiag
from nngeometry.object.pspace import PMatEyePlusLowRank
from nngeometry.object.pspace._checks import NotPositiveSemiDefiniteError

DT = torch.float64


def dense_pow(D, x):
    """``D^x`` from ``eigh``; for a rank-deficient PSD ``D`` its round-off eigenvalues are the
    zeros they stand for (their square roots, ~1e-8, would dominate the error)."""
    e, V = torch.linalg.eigh(D)
    if x > 0:
        e = torch.where(e.abs() <= 100 * D.shape[0] * torch.finfo(DT).eps * e.abs().max(), 0, e)
    return (V * e.clamp(min=0) ** x) @ V.t()


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def collection():
    return LayerCollection.from_model(nn.Linear(3, 2).to(DT))  # P = 8


def eplr(sign=1.0, alpha=0.7, r=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    lc = collection()
    U = torch.randn(r, lc.numel(), dtype=DT, generator=g)
    C = torch.randn(r, r, dtype=DT, generator=g)
    return PMatEyePlusLowRank(lc, alpha=alpha, U=U, C=sign * (C @ C.t() + 0.1 * torch.eye(r, dtype=DT)))


@pytest.mark.parametrize("alpha, r", [(0.7, 3), (0.0, 12)])  # r > P: no complement
def test_eye_plus_lowrank_powers(alpha, r):
    M = eplr(alpha=alpha, r=r)
    D = M.to_torch()
    I = torch.eye(D.shape[0], dtype=DT)
    for x in (0.5, -0.5, 2.0):
        R = M.pow(x)
        assert type(R) is PMatEyePlusLowRank
        assert rel(R.to_torch(), dense_pow(D, x)) < 1e-10
        assert rel(M.pow(x, regul=0.3).to_torch(), dense_pow(D + 0.3 * I, x)) < 1e-10
    assert rel(M.sqrt().to_torch(), dense_pow(D, 0.5)) < 1e-10
    # the root squares back to the matrix, through products only
    v = torch.randn(D.shape[0], dtype=DT)
    from nngeometry.object import PVector
    S = M.pow(0.5)
    Sv = S.mv(S.mv(PVector(M.layer_collection, vector_repr=v)))
    assert rel(Sv.get_flat_representation(), D @ v) < 1e-10


def test_eye_plus_lowrank_indefinite_and_diagonal_alpha():
    M = eplr(sign=-1.0, alpha=0.1)  # 0.1 I - UᵀCU: negative eigenvalues
    assert float(torch.linalg.eigvalsh(M.to_torch()).min()) < 0
    for x in (0.5, -0.5):
        with pytest.raises(NotPositiveSemiDefiniteError, match="pow.*not positive semi-definite"):
            M.pow(x)
    # integer powers of an indefinite matrix are fine
    assert rel(M.pow(2).to_torch(), M.to_torch() @ M.to_torch()) < 1e-10
    lc = collection()
    Md = PMatEyePlusLowRank(lc, alpha=torch.linspace(1, 2, lc.numel(), dtype=DT),
                            U=torch.randn(2, lc.numel(), dtype=DT), C=torch.eye(2, dtype=DT))
    with pytest.raises(NotImplementedError, match="diagonal.*use a scalar regul"):
        Md.pow(0.5)


def test_lowrank_powers():
    lc = collection()
    U = torch.randn(3, lc.numel(), dtype=DT, generator=torch.Generator().manual_seed(1))
    M = PMatLowRank(lc, data=U)
    D = M.to_torch()
    I = torch.eye(D.shape[0], dtype=DT)
    assert rel(M.pow(0.5).to_torch(), dense_pow(D, 0.5)) < 1e-10
    assert rel(M.sqrt().to_torch(), dense_pow(D, 0.5)) < 1e-10
    assert rel(M.pow(-0.5, regul=0.2).to_torch(), dense_pow(D + 0.2 * I, -0.5)) < 1e-10
    # M - 0.1 I is indefinite (rank 3 < P = 8: eigenvalue -0.1 on the complement)
    with pytest.raises(NotPositiveSemiDefiniteError, match="negative eigenvalue \\(-0.1\\)"):
        M.pow(0.5, regul=-0.1)


def quasidiag_fixture():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3, bias=False)).to(DT)
    x = torch.randn(20, 3, dtype=DT)
    return FIM(model, (x,), PMatQuasiDiag)  # a coupled layer and a diagonal one


def test_quasidiag_powers():
    Q = quasidiag_fixture()
    D = Q.to_torch()
    I = torch.eye(D.shape[0], dtype=DT)
    for x, regul in ((0.5, 0.0), (-0.5, 0.1), (2.0, 0.0), (0.5, 0.1)):
        R = Q.pow(x, regul=regul)
        assert type(R) is PMatBlockDiag
        assert rel(R.to_torch(), dense_pow(D + regul * I, x)) < 1e-10, (x, regul)
    assert rel(Q.sqrt().to_torch(), dense_pow(D, 0.5)) < 1e-10


def test_quasidiag_indefinite_refused():
    lc = LayerCollection.from_model(nn.Linear(2, 1).to(DT))
    lid = lc.layer_ids()[0]
    # one unit, arrowhead [[1, 0, .9], [0, 2, 1], [.9, 1, .2]]: s < Σ c²/a, indefinite
    Q = PMatQuasiDiag(lc, data={lid: (torch.tensor([1.0, 2.0, 0.2], dtype=DT),
                                      torch.tensor([[0.9, 1.0]], dtype=DT))})
    low = float(torch.linalg.eigvalsh(Q.to_torch()).min())
    assert low < 0
    with pytest.raises(NotPositiveSemiDefiniteError, match="PMatQuasiDiag.pow\\(0.5\\)"):
        Q.pow(0.5)
    assert rel(Q.pow(0.5, regul=-low + 0.1).to_torch(),
               dense_pow(Q.to_torch() + (-low + 0.1) * torch.eye(3, dtype=DT), 0.5)) < 1e-10
