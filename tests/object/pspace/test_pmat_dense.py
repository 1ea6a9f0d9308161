"""PMatDense: every operation against plain torch dense algebra (float64)."""
import pickle

import pytest
import torch
from torch import nn

from brute import fim_dense
from nngeometry import FIM
from nngeometry.layercollection import LayerCollection
from nngeometry.object import PFMapDense, PMatDense, PVector, random_pfmap, random_pvector

TOL = dict(atol=1e-10, rtol=1e-8)


def close(a, b, scale=1.0):
    return torch.allclose(a, b, atol=1e-10 * scale, rtol=1e-8)


@pytest.fixture(scope="module")
def fim():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 3 * 3, 4),
                          nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(40, 1, 5, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    F = FIM(model, (x, None), PMatDense)
    Fb = fim_dense(model, x)
    assert torch.allclose(F.to_torch(), Fb, **TOL)
    return F, Fb, LayerCollection.from_model(model)


def vec(lc, seed):
    torch.manual_seed(seed)
    return random_pvector(lc, dtype=torch.float64)


def pfmap(lc, seed, K=3, n=5):
    torch.manual_seed(seed)
    return random_pfmap(lc, K, n, dtype=torch.float64)


def test_products(fim):
    F, M, lc = fim
    v = vec(lc, 1)
    fv = v.to_torch()
    assert F.size() == (lc.numel(), lc.numel()) and F.size(0) == lc.numel()
    mv = F.mv(v)
    assert isinstance(mv, PVector) and mv.layer_collection == lc
    assert close(mv.to_torch(), M @ fv)
    assert close((F @ v).to_torch(), M @ fv)
    assert close(F.vTMv(v), fv @ M @ fv)
    J = pfmap(lc, 2)
    Jt = J.to_torch()
    assert close(F.mmap(J).to_torch(), Jt @ M)
    assert close((F @ J).to_torch(), Jt @ M)
    # mapTMmap: 'diag' the (K, n) quadratic forms J[k, i] M J[k, i]ᵀ, 'sum' their sum over k
    forms = torch.stack([torch.diagonal(Jt[k] @ M @ Jt[k].t()) for k in range(Jt.shape[0])])
    assert F.mapTMmap(J, reduction="diag").shape == forms.shape
    assert close(F.mapTMmap(J, reduction="diag"), forms, 10)
    assert close(F.mapTMmap(J, reduction="sum"), forms.sum(dim=0), 10)
    with pytest.raises(ValueError, match="unknown reduction"):
        F.mapTMmap(J, reduction="mean")


def test_reductions(fim):
    F, M, lc = fim
    assert torch.equal(F.to_torch(), F.data) and torch.equal(F.get_dense_tensor(), F.data)
    assert close(F.get_diag(), torch.diagonal(M))
    assert close(F.trace(), torch.trace(M))
    assert close(F.norm(), torch.linalg.norm(M))
    assert close(F.norm(), torch.linalg.norm(M))
    assert close(F.norm("fro"), torch.linalg.norm(M))
    assert close(F.norm(2), torch.linalg.matrix_norm(M, ord=2))
    assert F.get_diag().dtype == torch.float64


def test_arithmetic(fim):
    F, M, lc = fim
    G = PMatDense(lc, None, data=M @ M.t() + torch.eye(lc.numel(), dtype=torch.float64))
    G_t = G.to_torch()
    assert close((F + G).to_torch(), M + G_t)
    assert close((F - G).to_torch(), M - G_t)
    assert close((2.5 * F).to_torch(), 2.5 * M)
    assert close((F * 2.5).to_torch(), 2.5 * M)
    assert close((F / 2).to_torch(), M / 2)
    assert close((-F).to_torch(), -M)
    assert close(F.mm(G).to_torch(), M @ G_t)
    assert close((F @ G).to_torch(), M @ G_t)
    assert isinstance(F + G, PMatDense) and (F + G).layer_collection == lc


@pytest.mark.parametrize("solve", ["default", "solve", "cholesky", "lstsq", "eigh"])
@pytest.mark.parametrize("regul", [1e-3, 1.0])
def test_solves(fim, solve, regul):
    F, M, lc = fim
    A = M + regul * torch.eye(lc.numel(), dtype=torch.float64)
    v = vec(lc, 3)
    x = F.solvePVec(v, regul=regul, solve=solve)
    assert isinstance(x, PVector) and x.layer_collection == lc
    # check the residual, the condition number of A is up to ~1e5
    assert torch.allclose(A @ x.to_torch(), v.to_torch(), atol=1e-9, rtol=0)
    assert torch.allclose(x.to_torch(), torch.linalg.solve(A, v.to_torch()), atol=1e-7 / regul, rtol=1e-7)
    x2 = F.solve(v, regul=regul, solve=solve)
    assert torch.allclose(x2.to_torch(), x.to_torch(), atol=1e-12, rtol=1e-9)
    J = pfmap(lc, 4)
    Y = F.solvePFMap(J, regul=regul, solve=solve)
    assert isinstance(Y, PFMapDense) and Y.size() == J.size()
    assert torch.allclose(Y.to_torch() @ A, J.to_torch(), atol=1e-9, rtol=0)
    Y2 = F.solve(J, regul=regul, solve=solve)
    assert torch.allclose(Y2.to_torch(), Y.to_torch(), atol=1e-12, rtol=1e-9)


def test_solve_errors(fim):
    F, M, lc = fim
    with pytest.raises(ValueError, match="unknown solve 'qr'"):
        F.solvePVec(vec(lc, 0), solve="qr")
    with pytest.raises(TypeError, match="PVector or a PFMap"):
        F.solve(torch.zeros(lc.numel()))


def test_inverse_and_pow(fim):
    F, M, lc = fim
    I = torch.eye(lc.numel(), dtype=torch.float64)
    regul = 1e-2
    inv = F.inv(regul=regul)
    assert isinstance(inv, PMatDense)
    assert torch.allclose(inv.to_torch() @ (M + regul * I), I, atol=1e-9, rtol=0)
    assert torch.allclose(F.inv(regul).to_torch(), inv.to_torch(), atol=1e-10, rtol=0)
    assert close(F.pow(2).to_torch(), M @ M)
    assert close((F ** 2).to_torch(), M @ M)
    sq = F.pow(0.5, regul=regul).to_torch()
    assert torch.allclose(sq @ sq, M + regul * I, atol=1e-10, rtol=0)
    m1 = F.pow(-1, regul=regul).to_torch()
    assert torch.allclose(m1, inv.to_torch(), atol=1e-8, rtol=1e-8)


def test_eigendecomposition_and_logdet(fim):
    F, M, lc = fim
    F2 = PMatDense(lc, None, data=M.clone())
    F2.compute_eigendecomposition()
    evals, evecs = F2.evals, F2.evecs
    assert (evals[1:] >= evals[:-1]).all()  # ascending
    assert close(evecs @ torch.diag(evals) @ evecs.t(), M)
    assert close(evals, torch.linalg.eigvalsh(M))
    e2, _ = F2.get_eigendecomposition()
    assert torch.equal(e2, evals)
    regul = 0.1
    sign, ld = torch.linalg.slogdet(M + regul * torch.eye(lc.numel(), dtype=torch.float64))
    assert sign > 0
    assert torch.allclose(F2.logdet(regul=regul), ld, atol=1e-9, rtol=0)
    with pytest.raises(NotImplementedError, match="use 'eigh' or 'svd'"):
        F2.compute_eigendecomposition(impl="stupid")


def test_pickle_round_trip(fim):
    F, M, lc = fim
    assert F.generator is not None
    G = pickle.loads(pickle.dumps(F))
    assert G.generator is None
    assert torch.equal(G.to_torch(), F.to_torch())
    assert G.layer_collection == lc
    v = vec(lc, 5)
    assert close(G.vTMv(v), F.vTMv(v))
    assert F.generator is not None  # the original keeps its generator


def test_layout_mismatch(fim):
    F, M, lc = fim
    other = lc.sub(lc.layer_ids()[1:])
    with pytest.raises(ValueError, match="layout does not match"):
        F.mv(random_pvector(other, dtype=torch.float64))
    with pytest.raises(ValueError, match="layout does not match"):
        F.mmap(random_pfmap(other, 2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="different LayerCollections"):
        F + PMatDense(other, None, data=torch.eye(other.numel(), dtype=torch.float64))


def test_data_or_examples_required(fim):
    F, M, lc = fim
    with pytest.raises(ValueError, match="either data or examples"):
        PMatDense(lc, None)
    with pytest.raises(ValueError, match="not both"):
        PMatDense(lc, F.generator, data=M, examples=(torch.zeros(1, 1, 5, 5),))
