"""``(M + Λ)`` for every representation and every kind of prior ``Λ``.

Every representation × every kind of ``Λ`` (Python scalar, 0-d tensor, PMatEye, per-layer dict,
per-parameter PVector, PMatDiag) × {solve (PVector, PFMap), inverse, vTMv after inverse,
pow(1/2, -1/2, -1), logdet} is compared with ``torch.linalg`` on the dense
``M.to_torch() + diag(Λ)`` in float64; gradients with respect to ``Λ`` are compared with the
analytic formulas ``d logdet(M + Λ)/dΛ_pp = [(M + Λ)⁻¹]_pp`` and
``d vᵀ(M + Λ)⁻¹v / dΛ_pp = -y_p²`` with ``y = (M + Λ)⁻¹ v``.
"""
import functools

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nngeometry import FIM
from nngeometry.layercollection import LayerCollection
from nngeometry.object import (PMatBlockDiag, PMatDense, PMatDiag, PMatEKFAC, PMatEKFACBlockDiag,
                               PMatEye, PMatImplicit, PMatKFAC, PMatLowRank, PMatMixed,
                               PMatQuasiDiag, PVector, random_pfmap, random_pvector)
from nngeometry.object.pspace._checks import NotPositiveSemiDefiniteError
from nngeometry.object.pspace._prior import as_prior

DT = torch.float64
REPS = ["PMatDense", "PMatBlockDiag", "PMatDiag", "PMatQuasiDiag", "PMatLowRank", "PMatEye",
        "PMatImplicit", "PMatKFAC", "PMatEKFAC", "PMatEKFACBlockDiag", "PMatMixed",
        "PMatMixed-diag"]
KINDS = ["float", "tensor0d", "eye", "layer", "pvector", "pmatdiag"]
# per-parameter Λ does not keep a Kronecker eigenbasis: refused there (see test below)
# (PMatMixed: a BlockDiag group and an EKFAC group; PMatMixed-diag: BlockDiag and Diag groups)
KRON = {"PMatKFAC", "PMatEKFAC", "PMatEKFACBlockDiag", "PMatMixed"}
PER_PARAM = {"pvector", "pmatdiag"}


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.lru_cache(maxsize=None)
def setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3, bias=False)).to(DT)
    x = torch.randn(6, 3, dtype=DT)
    loader = DataLoader(TensorDataset(x, torch.zeros(6, dtype=torch.long)), batch_size=3)
    return model, loader, LayerCollection.from_model(model)


@functools.lru_cache(maxsize=None)
def built(rep):
    model, loader, lc = setup()
    if rep == "PMatEye":
        return PMatEye(lc, scaling=torch.tensor(0.7, dtype=DT))
    if rep.startswith("PMatMixed"):
        ids = lc.layer_ids()
        second = PMatEKFAC if rep == "PMatMixed" else PMatDiag
        return FIM(model, loader, PMatMixed, layer_map={ids[0]: "dense", ids[1]: "other"},
                   sub_pmats={"dense": PMatBlockDiag, "other": second})
    cls = {c.__name__: c for c in (PMatDense, PMatBlockDiag, PMatDiag, PMatQuasiDiag, PMatLowRank,
                                   PMatImplicit, PMatKFAC, PMatEKFAC, PMatEKFACBlockDiag)}[rep]
    return FIM(model, loader, cls)


def dense(M):
    return M.to_torch(allow_dense=True) if isinstance(M, PMatImplicit) else M.to_torch()


def make_prior(kind, lc, requires_grad=False):
    """``(regul as passed, its (P,) diagonal as a tensor)``; the leaves that require grad are
    returned third (a list)."""
    P = lc.numel()
    ids = lc.layer_ids()
    g = torch.Generator().manual_seed(7)
    if kind == "float":
        return 0.3, torch.full((P,), 0.3, dtype=DT), []
    if kind in ("tensor0d", "eye"):
        lam = torch.tensor(0.3, dtype=DT, requires_grad=requires_grad)
        regul = lam if kind == "tensor0d" else PMatEye(lc, scaling=lam)
        return regul, lam.expand(P), [lam]
    if kind == "layer":
        lams = {lid: torch.tensor(0.2 + 0.3 * i, dtype=DT, requires_grad=requires_grad)
                for i, lid in enumerate(ids)}
        flat = torch.cat([lams[lid].expand(lc[lid].numel()) for lid in ids])
        return lams, flat, [lams[lid] for lid in ids]
    d = (0.1 + torch.rand(P, generator=g, dtype=DT)).requires_grad_(requires_grad)
    regul = PVector(lc, vector_repr=d) if kind == "pvector" else PMatDiag(lc, None, data=d)
    return regul, d, [d]


def damping_kw(rep):
    return {"damping": "exact"} if rep == "PMatKFAC" else {}


def close(a, b, rtol=1e-8, what=""):
    a, b = torch.as_tensor(a).detach(), torch.as_tensor(b).detach()
    assert a.shape == b.shape, f"{what}: shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    scale = max(float(b.abs().max()), 1e-300)
    err = float((a - b).abs().max())
    assert err <= rtol * scale, f"{what}: max abs error {err:.3e} > {rtol:.0e} × {scale:.3e}"


def dense_pow(D, x):
    evals, evecs = torch.linalg.eigh(D)
    return (evecs * evals ** x) @ evecs.t()


def refused(rep, kind):
    return rep in KRON and kind in PER_PARAM


CASES = [(rep, kind) for rep in REPS for kind in KINDS]


@pytest.mark.parametrize("rep,kind", CASES, ids=[f"{r}-{k}" for r, k in CASES])
def test_damped_operations_against_dense(rep, kind):
    M = built(rep)
    lc = M.layer_collection
    regul, lam, _ = make_prior(kind, lc)
    D = dense(M) + torch.diag(lam)
    kw = damping_kw(rep)
    if refused(rep, kind):
        with pytest.raises(NotImplementedError, match="PMatDense.*PMatLowRank"):
            M.solve(random_pvector(lc, dtype=DT), regul=regul, **kw)
        with pytest.raises(NotImplementedError, match="per-layer"):
            M.logdet(regul=regul)
        return
    torch.manual_seed(3)
    v = random_pvector(lc, dtype=DT)
    J = random_pfmap(lc, 2, 3, dtype=DT)
    Dinv = torch.linalg.inv(D)
    close(M.solve(v, regul=regul, **kw).to_torch(), Dinv @ v.to_torch(), what="solve PVector")
    close(M.solve(J, regul=regul, **kw).to_torch(), J.to_torch() @ Dinv, what="solve PFMap")
    if rep == "PMatImplicit":  # stores no entries: solves only (CG)
        return
    inv = M.inv(regul=regul, **kw)
    close(dense(inv), Dinv, what="inverse")
    close(inv.vTMv(v), v.to_torch() @ Dinv @ v.to_torch(), what="vTMv after inverse")
    close(M.logdet(regul=regul), torch.logdet(D), what="logdet")
    close(dense(M.pow(-1, regul=regul, **kw)), Dinv, what="pow(-1)")
    for x in (0.5, -0.5):
        if rep == "PMatLowRank" and not as_prior(regul, lc).is_scalar:
            with pytest.raises(NotImplementedError):
                M.pow(x, regul=regul, **kw)
            continue
        close(dense(M.pow(x, regul=regul, **kw)), dense_pow(D, x), rtol=1e-7, what=f"pow({x})")


GRAD_CASES = [(rep, kind) for rep in REPS for kind in KINDS
              if kind != "float" and not refused(rep, kind)]


@pytest.mark.parametrize("rep,kind", GRAD_CASES, ids=[f"{r}-{k}" for r, k in GRAD_CASES])
def test_gradients_with_respect_to_the_prior(rep, kind):
    M = built(rep)
    lc = M.layer_collection
    kw = damping_kw(rep)
    torch.manual_seed(3)
    v = random_pvector(lc, dtype=DT)
    D0 = dense(M).detach()
    _, lam0, _ = make_prior(kind, lc)
    Dinv = torch.linalg.inv(D0 + torch.diag(lam0.detach()))
    y = Dinv @ v.to_torch()

    def expected(per_param):
        """The gradient w.r.t. each leaf: the per-parameter one summed over what it covers."""
        regul, _, leaves = make_prior(kind, lc, requires_grad=True)
        out = []
        for leaf in leaves:
            if leaf.dim() == 1:
                out.append(per_param)
            elif kind == "layer":
                lid = [l for l in lc.layer_ids()][len(out)]
                out.append(per_param[lc.slice(lid)].sum())
            else:
                out.append(per_param.sum())
        return regul, leaves, out

    # d logdet(M + Λ) / dΛ_pp = [(M + Λ)⁻¹]_pp
    if rep != "PMatImplicit":
        regul, leaves, want = expected(torch.diagonal(Dinv))
        got = torch.autograd.grad(M.logdet(regul=regul), leaves)
        for g, w in zip(got, want):
            close(g, w, rtol=1e-7, what="d logdet")
        # d vᵀ(M + Λ)⁻¹v / dΛ_pp = -y_p²
        regul, leaves, want = expected(-y * y)
        got = torch.autograd.grad(M.inv(regul=regul, **kw).vTMv(v), leaves)
        for g, w in zip(got, want):
            close(g, w, rtol=1e-7, what="d vTMv(inverse)")
    # the same through solve: d <v, (M + Λ)⁻¹ v> / dΛ
    regul, leaves, want = expected(-y * y)
    out = M.solve(v, regul=regul, **kw)
    got = torch.autograd.grad(torch.dot(out.to_torch(), v.to_torch()), leaves)
    tol = 1e-5 if rep == "PMatImplicit" else 1e-7
    for g, w in zip(got, want):
        close(g, w, rtol=tol, what="d solve")
    # a second call with a new tensor of the same value builds a new graph (no stale cache)
    regul, leaves, _ = expected(-y * y)
    out = M.solve(v, regul=regul, **kw)
    torch.autograd.grad(torch.dot(out.to_torch(), v.to_torch()), leaves)


def test_layers_left_out_of_a_dict_get_zero():
    _, _, lc = setup()
    ids = lc.layer_ids()
    prior = as_prior({ids[1]: 0.5}, lc)
    flat = prior.flat(torch.zeros((), dtype=DT))
    assert float(flat[lc.slice(ids[0])].abs().max()) == 0.0
    assert bool((flat[lc.slice(ids[1])] == 0.5).all())
    M = built("PMatDiag")
    close(M.logdet(regul={ids[1]: 0.5, ids[0]: 0.0}), M.logdet(regul={ids[1]: 0.5}))


def test_bad_priors_are_refused_with_the_fix():
    M = built("PMatDense")
    with pytest.raises(ValueError, match="not in the matrix's LayerCollection"):
        M.logdet(regul={"nope": 1.0})
    with pytest.raises(ValueError, match="PVector"):
        M.logdet(regul={M.layer_collection.layer_ids()[0]: torch.ones(3)})
    with pytest.raises(TypeError, match="dict"):
        M.logdet(regul=[1.0, 2.0])
    other = LayerCollection.from_model(nn.Linear(2, 2).to(DT))
    with pytest.raises(ValueError, match="LayerCollection"):
        M.logdet(regul=PMatEye(other, scaling=torch.tensor(1.0, dtype=DT)))


def test_dense_logdet_and_inverse_with_a_pvector_are_the_true_ones():
    """Dense ``log det(M + diag v)`` and ``(M + diag v)⁻¹`` with a PVector prior are the true ones
    (not ``M + v`` read as a scalar or a per-layer value)."""
    M = built("PMatDense")
    lc = M.layer_collection
    regul, lam, _ = make_prior("pvector", lc)
    D = M.to_torch() + torch.diag(lam)
    wrong = torch.log(torch.linalg.eigvalsh(M.to_torch()) + lam).sum()
    assert abs(float(wrong - torch.logdet(D))) > 1e-3  # the test can tell them apart
    close(M.logdet(regul=regul), torch.logdet(D))
    close(M.pow(-1, regul=regul).to_torch(), torch.linalg.inv(D))


@pytest.mark.parametrize("rep", ["PMatDense", "PMatBlockDiag", "PMatDiag", "PMatEye", "PMatKFAC",
                                 "PMatEKFAC"])
def test_non_psd_after_damping_same_error(rep):
    M = built(rep)
    low = float(torch.linalg.eigvalsh(dense(M)).min())
    regul = -low - 0.5  # M + regul·I has the eigenvalue -0.5
    kw = damping_kw(rep)
    with pytest.raises(NotPositiveSemiDefiniteError, match="not positive semi-definite"):
        M.pow(0.5, regul=regul, **kw)
    with pytest.raises(NotPositiveSemiDefiniteError, match="not positive semi-definite"):
        M.logdet(regul=regul)


@pytest.mark.parametrize("rep", ["PMatDense", "PMatBlockDiag", "PMatDiag", "PMatKFAC",
                                 "PMatEKFAC", "PMatLowRank"])
def test_rank_deficient_positive_powers_are_fine(rep):
    M = built(rep)  # 6 examples, 2 outputs each: rank ≤ 12 < P = 28 (not for the diagonal)
    D = dense(M)
    if rep != "PMatDiag":
        assert int(torch.linalg.matrix_rank(D)) < D.shape[0]
    close(dense(M.pow(0.5)) @ dense(M.pow(0.5)), D, rtol=1e-6, what="sqrt²")


def test_kfac_per_layer_prior_pi_damping():
    """π-damping with a per-layer λ_l: each layer's factors damped with its own λ_l."""
    M = built("PMatKFAC")
    ids = M.layer_collection.layer_ids()
    lams = {ids[0]: 0.2, ids[1]: 0.7}
    inv = M.inv(regul=lams)
    for lid in ids:
        one = M.inv(regul=lams[lid])
        torch.testing.assert_close(inv.data[lid][0], one.data[lid][0])
        torch.testing.assert_close(inv.data[lid][1], one.data[lid][1])


def test_sqrt_is_the_damped_half_power():
    for rep in ("PMatDense", "PMatDiag", "PMatEKFAC"):
        M = built(rep)
        regul, lam, _ = make_prior("layer", M.layer_collection)
        close(dense(M.sqrt(regul=regul)), dense_pow(dense(M) + torch.diag(lam), 0.5), rtol=1e-7,
              what=f"{rep}.sqrt")


@pytest.mark.parametrize("rep,kinds", [("PMatDense", ["float", "tensor0d", "eye"]),
                                       ("PMatBlockDiag", ["float", "layer", "eye"]),
                                       ("PMatKFAC", ["float", "layer", "tensor0d"])])
def test_cached_eigendecompositions_are_reused_for_a_new_prior(rep, kinds, monkeypatch):
    """A new scalar (or, per layer, per-layer) Λ shifts the cached eigenvalues: no new
    eigendecomposition."""
    from nngeometry.object.pspace import _spectral

    M = built(rep)
    kw = damping_kw(rep)
    M.logdet(regul=0.05)  # fill the caches
    calls = []
    real = _spectral.eigh
    monkeypatch.setattr(_spectral, "eigh", lambda A: calls.append(A.shape) or real(A))
    v = random_pvector(M.layer_collection, dtype=DT)
    for i, kind in enumerate(kinds):
        regul, lam, _ = make_prior(kind, M.layer_collection)
        D = dense(M) + torch.diag(lam)
        close(M.logdet(regul=regul), torch.logdet(D), what=f"logdet {kind}")
        close(dense(M.pow(-0.5, regul=regul, **kw)), dense_pow(D, -0.5), rtol=1e-7,
              what=f"pow(-1/2) {kind}")
        solve = {"solve": "eigh"} if rep != "PMatKFAC" else {}
        close(M.solve(v, regul=regul, **solve, **kw).to_torch(),
              torch.linalg.solve(D, v.to_torch()), what=f"solve {kind}")
    assert calls == [], f"{rep}: {len(calls)} new eigendecompositions"


def test_dense_solve_cache_builds_a_new_graph_for_a_new_lambda_tensor():
    """The Dense solve cache must not hand back a factorization with an old autograd graph
    (marginal-likelihood loops: a new λ tensor of the same value at every step)."""
    M = built("PMatDense")
    v = random_pvector(M.layer_collection, dtype=DT)
    for _ in range(3):
        lam = torch.tensor(0.3, dtype=DT, requires_grad=True)
        y = M.solve(v, regul=lam)
        (g,) = torch.autograd.grad(torch.dot(y.to_torch(), v.to_torch()), [lam])
        D = M.to_torch() + 0.3 * torch.eye(M.size(0), dtype=DT)
        yy = torch.linalg.solve(D, v.to_torch())
        close(g, -(yy * yy).sum())


def test_one_element_tensor_is_a_scalar_and_a_vector_tensor_names_pvector():
    M = built("PMatDense")
    close(M.logdet(regul=torch.tensor([0.3], dtype=DT)), M.logdet(regul=0.3))
    with pytest.raises(TypeError, match="PVector"):
        M.logdet(regul=torch.ones(M.size(0), dtype=DT))
