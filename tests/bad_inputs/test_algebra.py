"""Bad inputs on the linear-algebra side: singular matrices, stale caches, dense allocations
that can't fit (representations) and the obscure errors of solves (singular LU, negative
KFAC regul, half precision, PMatQuasiDiagInverse from examples).

Each case is checked against a float64 reference (the brute-force Fisher of brute.py, or the
representation's own dense matrix through torch.linalg) or against its error message. To add
a case: add a representation to ``REPS`` (with its ops) or a row to the parametrizations."""

import pytest
import torch
from torch import nn

from brute import fim_dense
from nngeometry.layercollection import LayerCollection
from nngeometry.metrics import FIM
from nngeometry.object import (
                               PMatBlockDiag, PMatDense, PMatDiag, PMatEKFAC, PMatEKFACBlockDiag,
                               PMatEye, PMatEyePlusLowRank, PMatKFAC, PMatLowRank, PMatQuasiDiag,
                               PMatQuasiDiagInverse, random_pvector)
from nngeometry.object.pspace._checks import SingularMatrixError

DT = torch.float64
SINGULAR = "singular at this damping"
REPS = [PMatDense, PMatBlockDiag, PMatDiag, PMatKFAC, PMatEKFAC, PMatEKFACBlockDiag,
        PMatQuasiDiag, PMatLowRank]


def rank_deficient_problem():
    """A model whose Fisher is singular in every representation: the first input feature is
    always 0, so the weights reading it have no gradient (a zero diagonal entry, a zero
    row/column of every block, a singular KFAC input factor), and there are fewer examples
    than parameters."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    x = torch.randn(6, 4, dtype=DT)
    x[:, 0] = 0
    return model, x


@pytest.fixture(scope="module")
def problem():
    return rank_deficient_problem()


def build(cls, model, x):
    return FIM(model, (x,), cls, variant="classif_logits")


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


# ---------------------------------------------------------------------- 3. singular matrices
SINGULAR_OPS = {
    "pow(-1)": lambda M, v: M.pow(-1),
    "pow(-0.5)": lambda M, v: M.pow(-0.5),
    "**-1": lambda M, v: M ** -1,
    "solve(regul=0)": lambda M, v: M.solve(v, regul=0),
    "inverse(regul=0)": lambda M, v: M.inv(regul=0),
    "logdet()": lambda M, v: M.logdet(),
}


@pytest.mark.parametrize("op", list(SINGULAR_OPS))
@pytest.mark.parametrize("cls", REPS, ids=lambda c: c.__name__)
def test_singular_matrix_is_refused_with_the_fix(problem, cls, op):
    model, x = problem
    M = build(cls, model, x)
    v = random_pvector(M.layer_collection, dtype=DT)
    try:
        out = SINGULAR_OPS[op](M, v)
    except NotImplementedError:
        # the representation has no such operation (QuasiDiag.pow(-0.5)): an error, not a number
        assert cls is PMatQuasiDiag and op == "pow(-0.5)"
        return
    except SingularMatrixError as e:
        msg = str(e)
        assert SINGULAR in msg and "regul > 0" in msg and "pinv" in msg, msg
        assert cls.__name__ in msg, msg
        return
    pytest.fail(f"{cls.__name__}.{op} returned {type(out).__name__} for a singular matrix")


def _damped_dense(M, regul):
    D = M.to_torch()
    return D + regul * torch.eye(D.shape[0], dtype=D.dtype)


@pytest.mark.parametrize("cls", REPS, ids=lambda c: c.__name__)
def test_rank_deficient_with_damping_keeps_working(problem, cls):
    """regul > 0 on the same singular matrices: exact ``(M + λI)⁻¹`` (KFAC: exact damping)
    against torch.linalg on the representation's own dense matrix (for Dense: the brute-force
    float64 Fisher)."""
    model, x = problem
    M = build(cls, model, x)
    regul = 0.1
    kw = {"damping": "exact"} if cls is PMatKFAC else {}
    D = fim_dense(model, x) if cls is PMatDense else M.to_torch()
    assert torch.linalg.matrix_rank(D) < D.shape[0]  # the case needs a singular matrix
    Dd = D + regul * torch.eye(D.shape[0], dtype=DT)
    v = random_pvector(M.layer_collection, dtype=DT)
    want = torch.linalg.solve(Dd, v.get_flat_representation())
    assert rel(M.solve(v, regul=regul, **kw).get_flat_representation(), want) < 1e-8
    assert rel(M.inv(regul=regul, **kw).to_torch(), torch.linalg.inv(Dd)) < 1e-8
    assert abs(float(M.logdet(regul=regul)) - float(torch.logdet(Dd))) < 1e-8 * abs(float(torch.logdet(Dd)))


def test_quasidiag_logdet_indefinite_with_positive_determinant():
    """Each unit's arrowhead block [[a, c], [c, s]] with s < c²/a has one negative eigenvalue:
    two such units give det > 0 (log det = log|det|, checked against torch.logdet), one gives
    det < 0 (refused)."""
    lc = LayerCollection.from_model(nn.Linear(3, 2).to(DT))
    lid = lc.layer_ids()[0]
    a = torch.tensor([[1.0, 2.0, 0.5], [0.7, 1.5, 2.0]], dtype=DT)
    c = torch.tensor([[0.9, 1.0, 0.6], [0.8, 1.1, 1.0]], dtype=DT)
    s = torch.tensor([0.2, 0.3], dtype=DT)  # σ = s - Σ c²/a < 0 for both units
    Q = PMatQuasiDiag(lc, data={lid: (torch.cat([a.reshape(-1), s]), c)})
    want = torch.logdet(_damped_dense(Q, 1e-2))
    assert torch.isfinite(want)
    assert abs(float(Q.logdet(1e-2)) - float(want)) < 1e-10 * abs(float(want)) + 1e-12
    Q1 = PMatQuasiDiag(lc, data={lid: (torch.cat([a.reshape(-1), torch.tensor([0.2, 5.0], dtype=DT)]), c)})
    assert torch.det(_damped_dense(Q1, 1e-2)) < 0
    with pytest.raises(ValueError, match="det < 0"):
        Q1.logdet(1e-2)


def test_dense_solve_regul0_on_exactly_singular_matrix_says_use_regul():
    lc = LayerCollection.from_model(nn.Linear(2, 2).to(DT))
    D = torch.zeros(6, 6, dtype=DT)
    D[:3, :3] = torch.eye(3, dtype=DT)  # exactly singular: LU has an exact zero pivot
    M = PMatDense(lc, data=D)
    v = random_pvector(lc, dtype=DT)
    for call in (lambda: M.solve(v, regul=0), lambda: M.inv(regul=0),
                 lambda: M.solve(v, regul=0, solve="cholesky")):
        with pytest.raises(SingularMatrixError, match="regul > 0") as e:
            call()
        assert "lu_factor_ex" not in str(e.value) and "linalg.lu" not in str(e.value)


def test_dense_cholesky_of_indefinite_says_what_to_do():
    lc = LayerCollection.from_model(nn.Linear(1, 1).to(DT))
    M = PMatDense(lc, data=torch.tensor([[1.0, 0.0], [0.0, -2.0]], dtype=DT))
    v = random_pvector(lc, dtype=DT)
    with pytest.raises(ValueError, match="not positive definite.*solve='solve'"):
        M.solve(v, regul=0.5, solve="cholesky")
    # LU handles the indefinite, invertible matrix
    want = torch.linalg.solve(_damped_dense(M, 0.5), v.get_flat_representation())
    assert rel(M.solve(v, regul=0.5).get_flat_representation(), want) < 1e-12


def test_kfac_negative_regul_is_a_clear_error(problem):
    model, x = problem
    M = build(PMatKFAC, model, x)
    v = random_pvector(M.layer_collection, dtype=DT)
    for call in (lambda: M.solve(v, regul=-0.1), lambda: M.inv(regul=-0.1),
                 lambda: M.pow(-0.5, regul=-0.1), lambda: M.logdet(-0.1, damping="pi")):
        with pytest.raises(ValueError, match="regul=-0.1 is negative.*damping='exact'"):
            call()


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("cls", [PMatDense, PMatBlockDiag, PMatKFAC, PMatLowRank, PMatEKFAC],
                         ids=lambda c: c.__name__)
def test_half_precision_linear_algebra(cls, half):
    """bf16/fp16 matrices: the factorizations run in float32 (no half LAPACK kernels) and the
    results come back in the matrix's dtype, close to the float64 result."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    x = torch.randn(30, 4, dtype=DT)
    M = build(cls, model, x)
    regul = 0.1
    kw = {"damping": "exact"} if cls is PMatKFAC else {}
    Mh = type(M)(M.layer_collection, data=_cast(M.data, half))
    v = random_pvector(M.layer_collection, dtype=DT)
    vh = type(v)(v.layer_collection, vector_repr=v.get_flat_representation().to(half))
    y = Mh.solve(vh, regul=regul, **kw).get_flat_representation()
    assert y.dtype == half
    want = M.solve(v, regul=regul, **kw).get_flat_representation()
    assert rel(y.to(DT), want) < 0.05
    inv = Mh.inv(regul=regul, **kw).to_torch()
    assert rel(inv.to(DT), M.inv(regul=regul, **kw).to_torch()) < 0.05
    assert abs(float(Mh.logdet(regul)) - float(M.logdet(regul))) < 0.05 * abs(float(M.logdet(regul)))


def _cast(data, dtype):
    if torch.is_tensor(data):
        return data.to(dtype) if data.is_floating_point() else data
    if isinstance(data, dict):
        return {k: _cast(v, dtype) for k, v in data.items()}
    if isinstance(data, (tuple, list)):
        return type(data)(_cast(v, dtype) for v in data)
    return data


def test_fim_with_quasidiag_inverse_says_how_to_get_it(problem):
    model, x = problem
    with pytest.raises(NotImplementedError, match=r"PMatQuasiDiag.inverse\(regul\)"):
        FIM(model, (x,), PMatQuasiDiagInverse, variant="classif_logits")


# ---------------------------------------------------------------------- 4. stale caches
def _update_in_place(M, new):
    """The running-average pattern on every tensor of ``M.data``: ``t.mul_(0.9).add_(0.1 *
    t_new)``."""
    def walk(a, b):
        if torch.is_tensor(a):
            a.mul_(0.9).add_(0.1 * b)
        elif isinstance(a, dict):
            for k in a:
                walk(a[k], b[k])
        elif isinstance(a, (tuple, list)):
            for p, q in zip(a, b):
                walk(p, q)
    walk(M.data, new.data)


STALE = [(PMatDense, {}), (PMatDense, {"solve": "cholesky"}), (PMatDense, {"solve": "eigh"}),
         (PMatBlockDiag, {}), (PMatBlockDiag, {"solve": "cholesky"}), (PMatBlockDiag, {"solve": "eigh"}),
         (PMatKFAC, {}), (PMatKFAC, {"damping": "exact"}), (PMatLowRank, {}),
         (PMatLowRank, {"solve": "eigh"})]


@pytest.mark.parametrize("cls,kw", STALE, ids=lambda p: getattr(p, "__name__", str(p)))
def test_solve_after_in_place_update_of_data_is_exact(cls, kw):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    x1, x2 = torch.randn(20, 4, dtype=DT), torch.randn(20, 4, dtype=DT)
    M, new = build(cls, model, x1), build(cls, model, x2)
    v = random_pvector(M.layer_collection, dtype=DT)
    regul = 0.05
    M.solve(v, regul=regul, **kw)  # fills the caches
    if cls is PMatKFAC:
        M.pow(-1, regul=regul, **{k: w for k, w in kw.items() if k == "damping"})
    _update_in_place(M, new)
    if cls is PMatKFAC and kw.get("damping") != "exact":
        # π-damping: (A + π√λ I)⁻¹ ⊗ (G + √λ/π I)⁻¹ of the updated factors, from scratch
        want = PMatKFAC(M.layer_collection, data={k: tuple(t.clone() for t in e)
                                                  for k, e in M.data.items()}).solve(v, regul=regul)
        want = want.get_flat_representation()
    else:
        want = torch.linalg.solve(_damped_dense(M, regul), v.get_flat_representation())
    got = M.solve(v, regul=regul, **kw).get_flat_representation()
    assert rel(got, want) < 1e-9


@pytest.mark.parametrize("cls", [PMatDense, PMatBlockDiag, PMatLowRank, PMatKFAC],
                         ids=lambda c: c.__name__)
def test_pow_and_logdet_after_in_place_update(cls):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    M = build(cls, model, torch.randn(20, 4, dtype=DT))
    new = build(cls, model, torch.randn(20, 4, dtype=DT))
    kw = {"damping": "exact"} if cls is PMatKFAC else {}
    M.logdet(0.1), M.pow(-1, regul=0.1, **kw)
    _update_in_place(M, new)
    Dd = _damped_dense(M, 0.1)
    assert abs(float(M.logdet(0.1)) - float(torch.logdet(Dd))) < 1e-9 * abs(float(torch.logdet(Dd)))
    assert rel(M.pow(-1, regul=0.1, **kw).to_torch(), torch.linalg.inv(Dd)) < 1e-9


def test_eye_plus_lowrank_solve_after_in_place_update():
    torch.manual_seed(4)
    lc = LayerCollection.from_model(nn.Linear(3, 2).to(DT))
    U, C = torch.randn(3, 8, dtype=DT), torch.eye(3, dtype=DT)
    M = PMatEyePlusLowRank(lc, alpha=torch.tensor(0.5, dtype=DT), U=U, C=C)
    v = random_pvector(lc, dtype=DT)
    M.solve(v, regul=0.1)
    U.mul_(0.9).add_(0.1 * torch.randn(3, 8, dtype=DT))
    want = torch.linalg.solve(_damped_dense(M, 0.1), v.get_flat_representation())
    assert rel(M.solve(v, regul=0.1).get_flat_representation(), want) < 1e-10


@pytest.mark.parametrize("cls", [PMatDense, PMatBlockDiag, PMatLowRank, PMatKFAC, PMatDiag,
                                 PMatEKFAC], ids=lambda c: c.__name__)
def test_grad_through_regul_tensor_twice(cls):
    """Two solves with two λ tensors of the same value, each differentiated: the second must
    not reuse the first one's (freed) graph, and the gradient is ``-1ᵀ (M + λI)⁻² v``."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    M = build(cls, model, torch.randn(20, 4, dtype=DT))
    v = random_pvector(M.layer_collection, dtype=DT)
    kw = {"damping": "exact"} if cls is PMatKFAC else {}
    Dd = _damped_dense(M, 0.1)
    f = v.get_flat_representation()
    want = -(torch.linalg.solve(Dd, torch.linalg.solve(Dd, f))).sum()
    for _ in range(2):
        lam = torch.tensor(0.1, dtype=DT, requires_grad=True)
        y = M.solve(v, regul=lam, **kw).get_flat_representation()
        (g,) = torch.autograd.grad(y.sum(), lam)
        assert abs(float(g) - float(want)) < 1e-8 * abs(float(want))
    # the π-damped KFAC solve is differentiable in λ too (no error on the second call)
    if cls is PMatKFAC:
        for _ in range(2):
            lam = torch.tensor(0.1, dtype=DT, requires_grad=True)
            torch.autograd.grad(M.solve(v, regul=lam).get_flat_representation().sum(), lam)


# ---------------------------------------------------------------------- 11. dense allocations
@pytest.fixture(scope="module")
def million():
    """A 10⁶-parameter collection (Linear(1000, 1000): P = 1 001 000) and small data for each
    representation: a dense P × P float32 matrix would need 3.6 TiB."""
    lc = LayerCollection.from_model(nn.Linear(1000, 1000))
    return lc, lc.layer_ids()[0], lc.numel()


def _million_reps(lc, lid, P):
    d = torch.ones(P)
    yield PMatDiag(lc, data=d)
    yield PMatEye(lc, scaling=torch.tensor(2.0))
    yield PMatKFAC(lc, data={lid: (torch.eye(1001), torch.eye(1000))})
    yield PMatEKFAC(lc, data={lid: (1001, 1000, torch.ones(1000, 1001))})
    yield PMatLowRank(lc, data=torch.ones(2, P))
    yield PMatEyePlusLowRank(lc, alpha=torch.tensor(1.0), U=torch.ones(2, P), C=torch.eye(2))
    yield PMatQuasiDiag(lc, data={lid: (d, torch.zeros(1000, 1000))})


def test_to_torch_of_a_million_parameters_is_refused_before_allocating(million):
    lc, lid, P = million
    assert P == 1_001_000
    for M in _million_reps(lc, lid, P):
        with pytest.raises(MemoryError, match=r"1001000 × 1001000 matrix needs [0-9.]+ GiB"):
            M.to_torch()
    # the per-layer dense blocks of KFAC / EKFAC are P × P here too
    with pytest.raises(MemoryError, match="KFAC block of layer"):
        PMatKFAC(lc, data={lid: (torch.eye(1001), torch.eye(1000))}).get_block_torch(lid)
    with pytest.raises(MemoryError, match="eigenbasis of layer"):
        PMatEKFAC(lc, data={lid: (1001, 1000, torch.ones(1000, 1001))}).get_KFE(lid)
