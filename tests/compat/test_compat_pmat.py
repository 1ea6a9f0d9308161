"""Upstream-compatible API of the parameter-space matrices (all but KFAC/EKFAC), each against a
brute-force float64 computation: constructors in the 0.4 keyword style, get_device, pickling
through __setstate__, pinv, spectral norms, BlockDiag.get_block_torch / solve_block,
PMatDense.project_to_diag / project_from_diag, the eigendecomposition implementations,
preconditioned CG in PMatImplicit, PMatMixed.from_mapping, upstream's parameter names, and the
shapes of mapTMmap."""
import pickle

import pytest
import torch

from _reps_fixtures import DT, Setup, close
from nngeometry.backend import TorchHooksJacobianBackend
from nngeometry.backend.model_and_data import default_function
from nngeometry.layercollection import Conv2dLayer, LayerCollection, LinearLayer
from nngeometry.object import (PMatBlockDiag, PMatDense, PMatDiag, PMatEye, PMatImplicit,
                               PMatLowRank, PMatMixed, PMatQuasiDiag, PVector)
from nngeometry.object.map import PFMapDense
from nngeometry.curvature import closed_form_function

BUILT = [PMatDense, PMatDiag, PMatBlockDiag, PMatLowRank, PMatQuasiDiag]


@pytest.fixture(scope="module", params=["mlp", "cnn"])
def s(request):
    return Setup(request.param, "classif_logits")


def _generator(s, with_lc=True):
    function = closed_form_function(default_function(s.model), s.variant)
    if with_lc:
        return TorchHooksJacobianBackend(s.model, function, layer_collection=s.lc)
    return TorchHooksJacobianBackend(s.model, function)


def _expected_dense(rep, s):
    """The dense matrix each representation stores, from the brute-force FIM."""
    D = s.dense
    if rep is PMatDiag:
        return torch.diag(torch.diagonal(D))
    if rep is PMatBlockDiag:
        out = torch.zeros_like(D)
        for lid in s.lc.layer_ids():
            sl = s.lc.slice(lid)
            out[sl, sl] = D[sl, sl]
        return out
    if rep is PMatQuasiDiag:
        return PMatQuasiDiag(s.lc, s.generator(), examples=s.loader).to_torch()
    return D


def _psd_with_spectrum(P, evals, seed=0):
    torch.manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(P, P, dtype=DT))
    return (Q * evals) @ Q.t()


# ---------------------------------------------------------------------- 1. constructors
@pytest.mark.parametrize("rep", BUILT + [PMatImplicit])
def test_keyword_style_takes_the_generators_collection(s, rep):
    explicit = rep(s.lc, s.generator(), examples=s.loader)
    for g in (_generator(s, with_lc=True), _generator(s, with_lc=False)):
        M = rep(generator=g, examples=s.loader)  # nngeometry 0.4's call
        assert M.layer_collection == s.lc
        if rep is PMatImplicit:
            v = s.vec()
            close(M.mv(v).get_flat_representation(), explicit.mv(v).get_flat_representation())
        else:
            close(M.to_torch(), explicit.to_torch(), rtol=1e-12)


def test_generators_collection_is_used_as_given(s):
    sub = s.lc.sub(s.lc.layer_ids()[:1])
    g = TorchHooksJacobianBackend(s.model, closed_form_function(default_function(s.model), s.variant),
                                  layer_collection=sub)
    M = PMatDense(generator=g, examples=s.loader)
    assert M.layer_collection == sub
    sl = s.lc.slice(sub.layer_ids()[0])
    close(M.to_torch(), s.dense[sl, sl])
    # an explicit collection wins over the generator's
    assert PMatDiag(s.lc, g, examples=s.loader).layer_collection == s.lc
    assert PMatEye(generator=g).layer_collection == sub


def test_constructor_errors(s):
    with pytest.raises(ValueError, match="needs a LayerCollection"):
        PMatDense(data=torch.eye(3, dtype=DT))
    with pytest.raises(ValueError, match="needs a LayerCollection"):
        PMatEye(scaling=2.0)
    with pytest.raises(TypeError, match=r"first argument must be a LayerCollection.*generator="):
        PMatDense(s.generator(), examples=s.loader)  # 0.4's positional order
    with pytest.raises(TypeError, match="first argument must be a LayerCollection"):
        PMatImplicit(s.generator(), s.generator(), examples=s.loader)


# ---------------------------------------------------------------------- 2. members
@pytest.mark.parametrize("rep", BUILT + [PMatImplicit, PMatEye])
def test_get_device(s, rep):
    M = rep(s.lc, scaling=torch.tensor(2.0, dtype=DT)) if rep is PMatEye else \
        rep(s.lc, s.generator(), examples=s.loader)
    assert M.get_device() == torch.device("cpu")
    assert isinstance(M.get_device(), torch.device)


def test_get_device_of_mixed_and_of_data():
    lc = LayerCollection({"a": LinearLayer(2, 2, bias=False)})
    meta = PMatDiag(lc, data=torch.ones(4, device="meta"))
    assert meta.get_device() == torch.device("meta")
    M = PMatMixed(lc, None, sub_pmats={"g": meta})
    assert M.get_device() == torch.device("meta")


@pytest.mark.parametrize("rep", BUILT)
def test_setstate_restores_a_pickled_matrix(s, rep):
    M = rep(s.lc, s.generator(), examples=s.loader)
    state = M.__getstate__()
    assert state["generator"] is None and M.generator is not None
    fresh = rep.__new__(rep)
    fresh.__setstate__(state)
    assert fresh.generator is None and fresh.layer_collection == s.lc
    close(fresh.to_torch(), M.to_torch(), rtol=0)
    loaded = pickle.loads(pickle.dumps(M))
    close(loaded.to_torch(), M.to_torch(), rtol=0)
    assert loaded.get_device() == M.get_device()


def test_pinv_dense_diag_blockdiag_eye_lowrank(s):
    P = s.lc.numel()
    # eigenvalues on both sides of atol, and exact zeros
    ev = torch.linspace(0.5, 3.0, P, dtype=DT)
    ev[:5] = 0.0
    ev[5] = 1e-9
    A = _psd_with_spectrum(P, ev)
    for atol in (1e-8, 1e-10):
        keep = ev > atol
        expected = _psd_with_spectrum(P, torch.where(keep, 1 / torch.where(keep, ev, 1.0), 0.0))
        close(PMatDense(s.lc, data=A).pinv(atol=atol).to_torch(), expected, rtol=1e-6)
    close(PMatDense(s.lc, data=A).pinv().to_torch(),
          torch.linalg.pinv(A, atol=1e-8, hermitian=True), rtol=1e-6)
    # diagonal, with a negative entry (pseudo-inverse of a symmetric matrix inverts it too)
    d = torch.tensor([2.0, 1e-9, 0.0, -4.0] * (P // 4) + [1.0] * (P % 4), dtype=DT)
    close(PMatDiag(s.lc, data=d).pinv().to_torch(),
          torch.linalg.pinv(torch.diag(d), atol=1e-8, hermitian=True))
    close(PMatDiag(s.lc, data=d).pinv(atol=1e-10).get_diag()[1], torch.tensor(1e9, dtype=DT))
    # block-diagonal: each block's pseudo-inverse
    blocks = {}
    for i, lid in enumerate(s.lc.layer_ids()):
        n = s.lc[lid].numel()
        evb = torch.linspace(1.0, 2.0, n, dtype=DT)
        evb[: n // 3] = 0.0
        blocks[lid] = _psd_with_spectrum(n, evb, seed=i)
    B = PMatBlockDiag(s.lc, data=blocks)
    close(B.pinv().to_torch(), torch.linalg.pinv(B.to_torch(), atol=1e-8, hermitian=True),
          rtol=1e-8)
    # eye
    close(PMatEye(s.lc, scaling=torch.tensor(4.0, dtype=DT)).pinv().to_torch(),
          torch.eye(P, dtype=DT) / 4)
    close(PMatEye(s.lc, scaling=torch.tensor(1e-9, dtype=DT)).pinv().to_torch(),
          torch.zeros(P, P, dtype=DT))
    # the result has the matrix's dtype, float32 for a float32 identity, whichever branch
    E32 = PMatEye(s.lc, scaling=torch.tensor(-1.234, dtype=torch.float32))
    for atol, want in ((10.0, torch.zeros(P, P)), (1.0, torch.eye(P) / -1.234)):
        got = E32.pinverse(atol=atol).to_torch()
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want)
    # low rank (rank ≤ K·n < P): the pseudo-inverse on the range
    L = PMatLowRank(s.lc, s.generator(), examples=s.loader)
    Lp = L.pinv()
    assert isinstance(Lp, PMatLowRank)
    D = L.to_torch()
    close(Lp.to_torch(), torch.linalg.pinv(D, rtol=1e-10, hermitian=True), rtol=1e-6)
    close(D @ Lp.to_torch() @ D, D, rtol=1e-8)  # Moore-Penrose: M M⁺ M = M


def test_pinv_mixed_and_unsupported(s):
    first, last = s.lc.layer_ids()[0], s.lc.layer_ids()[-1]
    rest = [lid for lid in s.lc.layer_ids() if lid != first]
    each = {"dense": s.lc.sub([first]), "diag": s.lc.sub(rest)}
    M = PMatMixed(s.lc, s.generator(), layer_collection_each=each,
                  sub_pmats={"dense": PMatDense, "diag": PMatDiag}, examples=s.loader)
    D = M.to_torch()
    close(M.pinv().to_torch(), torch.linalg.pinv(D, atol=1e-8, hermitian=True), rtol=1e-6)
    with pytest.raises(NotImplementedError, match="pinv"):
        PMatQuasiDiag(s.lc, s.generator(), examples=s.loader).pinv()
    assert last in M.layer_map


def test_spectral_norms(s):
    P = s.lc.numel()
    reps = [PMatDense(s.lc, s.generator(), examples=s.loader),
            PMatDiag(s.lc, s.generator(), examples=s.loader),
            PMatBlockDiag(s.lc, s.generator(), examples=s.loader),
            PMatEye(s.lc, scaling=torch.tensor(-3.0, dtype=DT)),
            PMatLowRank(s.lc, s.generator(), examples=s.loader)]
    for M in reps:
        D = M.to_torch()
        close(M.norm(2), torch.linalg.matrix_norm(D, ord=2), rtol=1e-8)
        close(M.norm(-2), torch.linalg.matrix_norm(D, ord=-2), scale=float(M.norm(2)), rtol=1e-8)
        close(M.norm(), torch.linalg.norm(D), rtol=1e-10)
    # a nonsingular diagonal, so that ord=-2 is not 0
    d = torch.linspace(-2.0, 5.0, P, dtype=DT)
    d[d.abs() < 0.1] = 0.7
    close(PMatDiag(s.lc, data=d).norm(-2), d.abs().min())
    # low rank with r ≥ P: the smallest singular value is not 0
    torch.manual_seed(0)
    U = torch.randn(P + 3, P, dtype=DT)
    L = PMatLowRank(s.lc, data=U)
    close(L.norm(-2), torch.linalg.matrix_norm(U.t() @ U, ord=-2), rtol=1e-8)
    assert float(L.norm(-2)) > 0
    # mixed: the union of the groups' spectra
    first = s.lc.layer_ids()[0]
    rest = s.lc.layer_ids()[1:]
    M = PMatMixed(s.lc, s.generator(), layer_collection_each={"a": s.lc.sub([first]),
                                                              "b": s.lc.sub(rest)},
                  sub_pmats={"a": PMatDense, "b": PMatDiag}, examples=s.loader)
    D = M.to_torch()
    close(M.norm(2), torch.linalg.matrix_norm(D, ord=2), rtol=1e-8)
    close(M.norm(-2), torch.linalg.matrix_norm(D, ord=-2), scale=float(M.norm(2)), rtol=1e-8)
    # quasi-diagonal: the arrowheads' eigenvalues, unit by unit (a container of blocks)
    Q = PMatQuasiDiag(s.lc, s.generator(), examples=s.loader)
    close(Q.norm(2), torch.linalg.matrix_norm(Q.to_torch(), ord=2), rtol=1e-8)
    with pytest.raises(NotImplementedError, match="ord='fro', 2 or -2"):
        reps[1].norm(1)


def _kron_order_index(layer):
    """Brute force: flat index -> index in the row-major augmented ``[W | b]``."""
    out = layer.weight.size[0]
    n_in = layer.weight.numel() // out
    has_b = layer.bias is not None
    width = n_in + int(has_b)
    idx = [o * width + i for o in range(out) for i in range(n_in)]
    if has_b:
        idx += [o * width + n_in for o in range(out)]
    return torch.tensor(idx)


def test_get_block_torch(s):
    B = PMatBlockDiag(s.lc, s.generator(), examples=s.loader)
    for lid in s.lc.layer_ids():
        sl = s.lc.slice(lid)
        blk = s.dense[sl, sl]
        close(B.get_block_torch(lid, s.lc[lid]), blk)
        close(B.get_block_torch(lid), blk)
        kron = B.get_block_torch(lid, s.lc[lid], split_weight_bias=False)
        idx = _kron_order_index(s.lc[lid])
        expected = torch.zeros_like(blk)
        expected[idx.unsqueeze(1), idx.unsqueeze(0)] = blk
        close(kron, expected)
    with pytest.raises(KeyError, match="no block"):
        B.get_block_torch("nope", None)
    lid0, lid1 = s.lc.layer_ids()[:2]
    with pytest.raises(ValueError, match="not the collection's layer"):
        B.get_block_torch(lid0, s.lc[lid1])


def test_solve_block(s):
    B = PMatBlockDiag(s.lc, s.generator(), examples=s.loader)
    regul = 0.3
    torch.manual_seed(0)
    for lid in s.lc.layer_ids():
        sl = s.lc.slice(lid)
        A = s.dense[sl, sl] + regul * torch.eye(sl.stop - sl.start, dtype=DT)
        d = torch.randn(sl.stop - sl.start, dtype=DT)
        for solve in ("default", "cholesky", "eigh"):
            close(B.solve_block(d, lid, regul, solve), torch.linalg.solve(A, d), rtol=1e-8)
        rows = torch.randn(2, 3, sl.stop - sl.start, dtype=DT)
        out = B.solve_block(rows, lid, regul=regul)
        assert out.shape == rows.shape
        close(out, torch.linalg.solve(A, rows.reshape(6, -1).t()).t().reshape(rows.shape), rtol=1e-8)
    with pytest.raises(ValueError, match="shape"):
        B.solve_block(torch.zeros(1, dtype=DT), s.lc.layer_ids()[0], regul)


def test_project_to_and_from_diag(s):
    # distinct eigenvalues, so that the eigenbasis is unique up to signs: A = Q diag(ev) Qᵀ
    P = s.lc.numel()
    ev = torch.linspace(0.1, 3.0, P, dtype=DT)
    torch.manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(P, P, dtype=DT))
    A = (Q * ev) @ Q.t()
    F = PMatDense(s.lc, data=A)
    v = s.vec()
    f = v.get_flat_representation()
    c = F.project_to_diag(v)
    assert c.shape == (P,)
    close(c.abs(), (Q.t() @ f).abs(), rtol=1e-8)  # coordinates along each eigenvector
    evals, _ = F.get_eigendecomposition()
    close(evals, ev, rtol=1e-10)
    back = F.project_from_diag(c)
    assert isinstance(back, PVector)
    close(back.get_flat_representation(), f, rtol=1e-10)
    # M v = V diag(λ) Vᵀ v, and the solve through the eigendecomposition
    close(F.project_from_diag(evals * c).get_flat_representation(), A @ f, rtol=1e-8)
    # on the (rank-deficient) Fisher too
    G = PMatDense(s.lc, s.generator(), examples=s.loader)
    cg = G.project_to_diag(v)
    close(G.project_from_diag(G.get_eigendecomposition()[0] * cg).get_flat_representation(),
          s.dense @ f, rtol=1e-8)
    with pytest.raises(ValueError, match="coordinates in the"):
        F.project_from_diag(v)


def test_dense_eigendecomposition_impls(s):
    # PSD: the Fisher; indefinite: a symmetric matrix with negative eigenvalues
    P = s.lc.numel()
    indefinite = _psd_with_spectrum(P, torch.linspace(-3.0, 2.0, P, dtype=DT))
    for D in (s.dense, indefinite):
        for impl in ("eigh", "svd"):
            F = PMatDense(s.lc, data=D.clone())
            F.compute_eigendecomposition(impl=impl)
            evals, evecs = F.get_eigendecomposition()
            assert (evals[1:] >= evals[:-1]).all()
            close(evals, torch.linalg.eigvalsh(D), scale=float(D.abs().max()), rtol=1e-8)
            close(evecs @ torch.diag(evals) @ evecs.t(), D, rtol=1e-8)
    F = PMatDense(s.lc, data=indefinite.clone())
    v = s.vec()
    close(F.solve(v, regul=5.0, solve="eigendecomposition").get_flat_representation(),
          torch.linalg.solve(indefinite + 5.0 * torch.eye(P, dtype=DT), v.get_flat_representation()),
          rtol=1e-8)


def test_lowrank_eigendecomposition_impls(s):
    L = PMatLowRank(s.lc, s.generator(), examples=s.loader)
    D = L.to_torch()
    ref = torch.linalg.eigvalsh(D)
    for impl in ("svd", "eigh"):
        L.compute_eigendecomposition(impl=impl)
        evals, evecs = L.get_eigendecomposition()
        k = evals.numel()
        assert 0 < k <= L._rank() and (evals[1:] >= evals[:-1]).all()
        close(evals, ref[-k:], scale=float(ref.max()), rtol=1e-8)
        close(evecs.t() @ evecs, torch.eye(k, dtype=DT), rtol=1e-8)
        close(evecs @ torch.diag(evals) @ evecs.t(), D, rtol=1e-8)
    L.compute_eigendecomposition("svd", rtol=0.5)  # rtol stays a keyword after impl
    assert (L.evals > 0.5 * ref.max()).all()
    assert L.evals.numel() == int((ref > 0.5 * ref.max()).sum())
    with pytest.raises(NotImplementedError, match="'svd' or 'eigh'"):
        L.compute_eigendecomposition(impl="stupid")


def test_implicit_preconditioned_cg(s):
    M = PMatImplicit(s.lc, s.generator(), examples=s.loader)
    P = s.lc.numel()
    regul = 0.05
    Dr = s.dense + regul * torch.eye(P, dtype=DT)
    v = s.vec()
    f = v.get_flat_representation()
    expected = torch.linalg.solve(Dr, f)
    close(M.solve(v, regul=regul).get_flat_representation(), expected, rtol=1e-8)
    plain = M.last_cg_info["iterations"]
    # Jacobi preconditioner as a PMat
    jac = PMatDiag(s.lc, data=torch.diagonal(s.dense)).inverse(regul)
    close(M.solve(v, regul=regul, M=jac).get_flat_representation(), expected, rtol=1e-8)
    # the exact inverse as preconditioner: one iteration
    exact = PMatDense(s.lc, data=torch.linalg.inv(Dr))
    close(M.solve(v, regul=regul, M=exact).get_flat_representation(), expected, rtol=1e-8)
    assert M.last_cg_info["iterations"] == 1 < plain
    # a callable PVector -> PVector, and a PFMap right-hand side
    calls = []

    def precond(r):
        calls.append(1)
        return PVector(s.lc, vector_repr=torch.linalg.solve(Dr, r.get_flat_representation()))
    Jm = s.pfmap()
    J = Jm.to_torch()
    K, n, _ = J.shape
    out = M.solve(Jm, regul=regul, M=precond)
    close(out.to_torch(), torch.linalg.solve(Dr, J.reshape(K * n, P).t()).t().reshape(K, n, P),
          rtol=1e-8)
    assert M.last_cg_info["iterations"] == 1 and len(calls) >= K * n
    with pytest.raises(TypeError, match="preconditioner"):
        M.solve(v, regul=regul, M="jacobi")
    with pytest.raises(ValueError, match="another LayerCollection"):
        M.solve(v, regul=regul, M=PMatEye(s.lc.last_layer(), scaling=torch.tensor(1.0, dtype=DT)))


def test_mixed_from_mapping(s):
    first = s.lc.layer_ids()[0]
    linear = [lid for lid in s.lc.layer_ids() if isinstance(s.lc[lid], LinearLayer)]
    conv = [lid for lid in s.lc.layer_ids() if isinstance(s.lc[lid], Conv2dLayer)]
    # default Diag; one layer by id to Dense (wins over its type); Linear layers to BlockDiag
    M = PMatMixed.from_mapping(s.lc, s.generator(), PMatDiag,
                               {first: PMatDense, LinearLayer: PMatBlockDiag},
                               examples=s.loader)
    groups = {lid: ("PMatDense" if lid == first else
                    "PMatBlockDiag" if lid in linear else "PMatDiag") for lid in s.lc.layer_ids()}
    assert M.layer_map == groups
    # brute force: per group, Dense keeps everything inside the group, BlockDiag the layer
    # blocks, Diag the diagonal
    expected = torch.zeros_like(s.dense)
    for lid in s.lc.layer_ids():
        sl = s.lc.slice(lid)
        if groups[lid] == "PMatDiag":
            expected[sl, sl] = torch.diag(torch.diagonal(s.dense[sl, sl]))
        else:
            expected[sl, sl] = s.dense[sl, sl]
    close(M.to_torch(), expected)
    # a type given by its name; two layers sent to Dense share a group (cross terms kept)
    if len(conv) == 2:
        M2 = PMatMixed.from_mapping(None, _generator(s), PMatDiag, {"Conv2dLayer": PMatDense},
                                    examples=s.loader)
        idx = torch.cat([torch.arange(s.lc.slice(l).start, s.lc.slice(l).stop) for l in conv])
        close(M2.to_torch()[idx][:, idx], s.dense[idx][:, idx])
        assert set(M2.layer_map.values()) == {"PMatDense", "PMatDiag"}
    # from built matrices
    built = {g: m for g, m in M.data.items()}
    M3 = PMatMixed.from_mapping(s.lc, None, PMatDiag, {first: PMatDense, LinearLayer: PMatBlockDiag},
                                data=built)
    close(M3.to_torch(), M.to_torch(), rtol=0)
    with pytest.raises(ValueError, match="neither layer ids"):
        PMatMixed.from_mapping(s.lc, s.generator(), PMatDiag, {"nope": PMatDense},
                               examples=s.loader)
    with pytest.raises(ValueError, match="one built PMat per group"):
        PMatMixed.from_mapping(s.lc, None, PMatDiag, {first: PMatDense}, data={"x": M})


def test_upstream_parameter_names(s):
    v = s.vec()
    f = v.get_flat_representation()
    B = PMatBlockDiag(s.lc, s.generator(), examples=s.loader)
    DB = B.to_torch()
    close(B.mv(vs=v).get_flat_representation(), DB @ f)
    close(B.vTMv(vector=v), f @ DB @ f)
    Q = PMatQuasiDiag(s.lc, s.generator(), examples=s.loader)
    DQ = Q.to_torch()
    close(Q.mv(vs=v).get_flat_representation(), DQ @ f)
    close(Q.vTMv(vs=v), f @ DQ @ f)
    E = PMatEye(s.lc, scaling=torch.tensor(2.0, dtype=DT))
    close(E.solvePVec(v=v, regul=0.5).get_flat_representation(), f / 2.5)
    # nngeometry 0.4 names the solve method impl=
    D = PMatDense(s.lc, s.generator(), examples=s.loader)
    ref = torch.linalg.solve(s.dense + 0.1 * torch.eye(len(f), dtype=DT), f)
    for how in ("eigh", "cholesky"):
        close(D.solve(v, 0.1, impl=how).get_flat_representation(), ref)
    with pytest.raises(ValueError):
        D.solve(v, 0.1, impl="no such method")


def test_solve_keywords_of_both_versions(s):
    # nngeometry 0.4: solve(b, regul, impl), solvePVec(v | vs | b, ...), solvePFMap(J | b, ...);
    # upstream main: x and solve=. Each spelling gives the same matrix solve.
    v = s.vec()
    f = v.get_flat_representation()
    J = PFMapDense(s.lc, data=torch.randn(2, 3, len(f), dtype=DT))
    D = PMatDense(s.lc, s.generator(), examples=s.loader)
    A = s.dense + 0.1 * torch.eye(len(f), dtype=DT)
    close(D.solve(b=v, regul=0.1).get_flat_representation(), torch.linalg.solve(A, f))
    close(D.solvePFMap(J=J, regul=0.1, impl="eigh").to_torch(),
          torch.linalg.solve(A, J.to_torch().reshape(-1, len(f)).T).T.reshape(2, 3, -1))
    E = PMatEye(s.lc, scaling=torch.tensor(2.0, dtype=DT))
    for M in (D, PMatDiag(s.lc, s.generator(), examples=s.loader), E):
        ref = M.solvePVec(v, 0.1).get_flat_representation()
        for name in ("x", "v", "vs", "b"):
            close(M.solvePVec(**{name: v}, regul=0.1).get_flat_representation(), ref)
        refJ = M.solvePFMap(J, 0.1).to_torch()
        for name in ("x", "J", "b"):
            close(M.solvePFMap(**{name: J}, regul=0.1).to_torch(), refJ)
        close(M.solve(b=v, regul=0.1, impl="default" if M is not D else "solve")
              .get_flat_representation(), ref)
        with pytest.raises(TypeError, match=r"right-hand side positionally and as b="):
            M.solve(v, b=v)
        with pytest.raises(TypeError, match=r"right-hand side as .* and as vs="):
            M.solvePVec(x=v, vs=v) if M is not E else M.solvePVec(v=v, vs=v)
    with pytest.raises(TypeError, match="impl is nngeometry 0.4's name of solve"):
        D.solve(v, 0.1, solve="cholesky", impl="eigh")
    with pytest.raises(TypeError, match="impl is nngeometry 0.4's name of solve"):
        D.solvePFMap(J, 0.1, "cholesky", impl="eigh")


# ---------------------------------------------------------------------- 3. mapTMmap shapes
@pytest.mark.parametrize("rep", BUILT)
def test_mapTMmap_shapes_and_values(s, rep):
    M = rep(s.lc, s.generator(), examples=s.loader)
    D = _expected_dense(rep, s)
    torch.manual_seed(7)
    K, n = 3, 5
    J = torch.randn(K, n, s.lc.numel(), dtype=DT)
    Jm = PFMapDense(s.lc, data=J)
    diag = M.mapTMmap(Jm, reduction="diag")
    total = M.mapTMmap(Jm, reduction="sum")
    assert diag.shape == (K, n) and total.shape == (n,)
    for k in range(K):
        for i in range(n):
            close(diag[k, i], J[k, i] @ D @ J[k, i], scale=float(diag.abs().max()))
    close(total, diag.sum(dim=0))
    with pytest.raises(ValueError, match="'sum'.*'diag'"):
        M.mapTMmap(Jm, reduction="mean")
