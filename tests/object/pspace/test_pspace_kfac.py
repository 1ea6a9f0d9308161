"""PMatKFAC: exactness where KFAC is exact, conventions (layout, conv scaling), and every
operation against its own dense form."""
import pytest
import torch
from torch import nn

from _kfac_helpers import (DT, Setup, check_layout_errors, check_pickle, check_products,
                           check_solve_against, close, damped_inv, dense_pow)
from brute import fim_dense
from nngeometry.layercollection import LayerCollection
from nngeometry.metrics import FIM
from nngeometry.object import PMatEKFAC, PMatKFAC


@pytest.fixture(scope="module", params=["mlp", "mlp_nobias", "cnn", "cnn_nobias"])
def mats(request):
    s = Setup(request.param)
    M = PMatKFAC(s.lc, s.generator(), examples=s.loader)
    return s, M, M.to_torch()


def _kron_dense(M, lid, split=True):
    A, G = M.data[lid]
    A = torch.diag(A) if A.dim() == 1 else A
    G = torch.diag(G) if G.dim() == 1 else G
    B = torch.kron(G, A)
    if split:
        perm = M.layer_collection[lid].kfac_permutation()
        B = B[perm][:, perm]
    return B


def _blockdiag(blocks, lc):
    P = lc.numel()
    out = torch.zeros(P, P, dtype=DT)
    for lid, B in blocks.items():
        s = lc.slice(lid)
        out[s, s] = B
    return out


def _pi_damped_dense(M, regul, use_pi=True, power=-1.0):
    """Block-diagonal ``kron((G + √λ/π)^p, (A + π√λ)^p)`` built densely from the factors."""
    blocks = {}
    for lid, (A, G) in M.data.items():
        A = torch.diag(A) if A.dim() == 1 else A
        G = torch.diag(G) if G.dim() == 1 else G
        pi = ((torch.trace(A) / A.shape[0]) / (torch.trace(G) / G.shape[0])) ** 0.5 if use_pi else 1.0
        sq = regul ** 0.5
        Ad = dense_pow(A + pi * sq * torch.eye(A.shape[0], dtype=DT), power)
        Gd = dense_pow(G + sq / pi * torch.eye(G.shape[0], dtype=DT), power)
        perm = M.layer_collection[lid].kfac_permutation()
        blocks[lid] = torch.kron(Gd, Ad)[perm][:, perm]
    return _blockdiag(blocks, M.layer_collection)


# ---------------------------------------------------------------------- exactness
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("variant", ["classif_logits", "regression"])
def test_linear_exact_on_single_example(bias, variant):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5, bias=bias), nn.Tanh(), nn.Linear(5, 3, bias=bias)).to(DT)
    x = torch.randn(1, 4, dtype=DT)
    lc = LayerCollection.from_model(model)
    exact = fim_dense(model, x, variant, lc)
    M = FIM(model, (x, None), PMatKFAC, variant=variant)
    D = M.to_torch()
    for lid in lc.layer_ids():
        s = lc.slice(lid)
        close(D[s, s], exact[s, s], rtol=1e-12)
    # cross-layer blocks are zero in KFAC (and not in the exact matrix)
    s0, s1 = lc.slice("0"), lc.slice("2")
    assert D[s0, s1].abs().max() == 0 and exact[s0, s1].abs().max() > 1e-6
    # on several examples KFAC is an approximation: not equal to the exact block
    x2 = torch.randn(6, 4, dtype=DT)
    M2 = FIM(model, (x2, None), PMatKFAC, variant=variant)
    s = lc.slice("0")
    assert (M2.to_torch()[s, s] - fim_dense(model, x2, variant, lc)[s, s]).abs().max() > 1e-8


def test_conv_spatially_constant_input_is_S_times_kfac():
    """KFC convention: with spatially constant inputs (and hence gradients), exact = S × KFAC."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(3, 2)).to(DT)
    x = torch.randn(1, 2, 1, 1, dtype=DT).expand(1, 2, 5, 5).contiguous()
    S = 3 * 3  # output locations
    lc = LayerCollection.from_model(model)
    exact = fim_dense(model, x, "classif_logits", lc)
    D = FIM(model, (x, None), PMatKFAC).to_torch()
    s = lc.slice("0")
    assert exact[s, s].abs().max() > 1e-6
    close(exact[s, s], S * D[s, s], rtol=1e-11)
    s = lc.slice("4")
    close(D[s, s], exact[s, s], rtol=1e-11)


def test_kfac_factors_normalized_by_n(mats):
    """``kron(G, A)`` is the mean over examples of the per-example KFAC products for a single
    example only; here: the factors are the means of the per-example factors (the generator's
    unsplit means), with the √K of upstream's split moved from G to A (K: output directions)."""
    s, M, D = mats
    gen = s.generator()
    K = gen.function(s.x).reshape(s.x.shape[0], -1).shape[1]
    parts = [gen.get_kfac_blocks((s.x[i:i + 1],), s.lc) for i in range(s.x.shape[0])]
    for lid, (A, G) in M.data.items():
        close(A, K ** 0.5 * sum(p[lid][0] for p in parts) / len(parts), rtol=1e-12)
        close(G, sum(p[lid][1] for p in parts) / len(parts) / K ** 0.5, rtol=1e-12)
    assert A.dtype == DT and D.dtype == DT


# ---------------------------------------------------------------------- layout
def test_split_weight_bias(mats):
    s, M, D = mats
    Dk = M.to_torch(split_weight_bias=False)
    for lid in s.lc.layer_ids():
        sl = s.lc.slice(lid)
        close(D[sl, sl], _kron_dense(M, lid), rtol=1e-14)
        close(Dk[sl, sl], _kron_dense(M, lid, split=False), rtol=1e-14)
        perm = s.lc[lid].kfac_permutation()
        close(Dk[sl, sl][perm][:, perm], D[sl, sl], rtol=0)
    close(M.get_diag(split_weight_bias=False), torch.diagonal(Dk))
    close(M.get_diag(split_weight_bias=True), torch.diagonal(D))


def test_flat_layout_is_weight_then_bias():
    """For a Linear layer with bias, the flat order is weight.flatten() then bias, so the bias
    block of to_torch() is G · A[-1, -1] (the trailing-1 entry of mean(a aᵀ) is 1, times √K in
    upstream's split, K the number of output directions)."""
    s = Setup("mlp")
    gen = s.generator()
    M = PMatKFAC(s.lc, gen, examples=s.loader)
    K = gen.function(s.x).reshape(s.x.shape[0], -1).shape[1]
    D = M.to_torch()
    A, G = M.data["2"]
    start = s.lc.p_pos["2"] + 5 * 3
    close(D[start:start + 3, start:start + 3], G * A[-1, -1], rtol=1e-14)
    close(A[-1, -1], torch.tensor(K ** 0.5, dtype=DT), rtol=1e-14)


# ---------------------------------------------------------------------- operations
def test_products(mats):
    s, M, D = mats
    check_products(M, D, s)
    # the dense form is the block-diagonal of the Kronecker products of the factors
    close(D, _blockdiag({lid: _kron_dense(M, lid) for lid in s.lc.layer_ids()}, s.lc), rtol=1e-14)


@pytest.mark.parametrize("use_pi", [True, False])
def test_solve_pi_damping(mats, use_pi):
    s, M, D = mats
    regul = 0.3
    ref = _pi_damped_dense(M, regul, use_pi)
    close(torch.linalg.inv(ref), _pi_damped_dense(M, regul, use_pi, power=1.0), rtol=1e-8)
    check_solve_against(M, ref, s, regul=regul, use_pi=use_pi)
    close(M.inv(regul, use_pi=use_pi).to_torch(), ref, rtol=1e-8)
    close(M.inv(regul, use_pi=use_pi).to_torch(), ref, rtol=1e-8)
    # π-damping is not M + λI (except by accident)
    assert (ref - damped_inv(D, regul)).abs().max() > 1e-6


def test_solve_exact_damping(mats):
    s, M, D = mats
    regul = 0.3
    ref = damped_inv(D, regul)
    check_solve_against(M, ref, s, regul=regul, damping="exact")
    check_solve_against(M, ref, s, regul=regul, solve="eigh")
    Mi = M.inv(regul, damping="exact")
    assert isinstance(Mi, PMatEKFAC)
    close(Mi.to_torch(), ref, rtol=1e-8)
    with pytest.raises(ValueError, match="damping"):
        M.solve(s.vec(), regul=regul, damping="tikhonov")
    with pytest.raises(ValueError, match="solve"):
        M.solve(s.vec(), regul=regul, solve="cg")


def test_pow_and_logdet(mats):
    s, M, D = mats
    close(M.pow(2).to_torch(), D @ D, rtol=1e-10)
    close(M.pow(0.5).to_torch(), dense_pow(D, 0.5), rtol=1e-7)
    close(M.pow(-1, regul=0.2, damping="exact").to_torch(), damped_inv(D, 0.2), rtol=1e-8)
    close(M.pow(0.5, regul=0.2, damping="exact").to_torch(), dense_pow(D, 0.5, 0.2), rtol=1e-8)
    close(M.pow(-0.5, regul=0.2).to_torch(), _pi_damped_dense(M, 0.2, power=-0.5), rtol=1e-8)
    regul = 0.1
    P = D.shape[0]
    close(M.logdet(regul), torch.logdet(D + regul * torch.eye(P, dtype=DT)), rtol=1e-10)
    close(M.logdet(regul, damping="pi"), torch.logdet(_pi_damped_dense(M, regul, power=1.0)),
          rtol=1e-10)


def test_solve_is_cached(mats, monkeypatch):
    """After the first solve with a given (regul, use_pi), no decomposition or inverse is
    computed again."""
    s, M, D = mats
    v = s.vec()
    M.solve(v, regul=0.7)
    M.solve(v, regul=0.7, damping="exact")
    y1 = M.solve(v, regul=0.7).get_flat_representation()

    def forbidden(*a, **k):
        raise AssertionError("a decomposition was recomputed")

    for name in ("eigh", "inv", "solve", "lstsq", "cholesky"):
        monkeypatch.setattr(torch.linalg, name, forbidden)
    # nor are the damped inverse factors rebuilt from the eigendecomposition (every layer's entry
    # must be cached, not only the last one's)
    from nngeometry.object.pspace.blocks import kron
    monkeypatch.setattr(kron, "from_eig", forbidden)
    y2 = M.solve(v, regul=0.7).get_flat_representation()
    M.solve(v, regul=0.7, damping="exact")
    M.solve(s.pfmap(), regul=0.7)
    M.logdet(0.7)
    close(y2, y1, rtol=0)


def test_mm_and_arithmetic(mats):
    s, M, D = mats
    close(M.mm(M).to_torch(), D @ D, rtol=1e-10)
    Mi = M.inv(0.4)
    close(M.mm(Mi).to_torch(), D @ Mi.to_torch(), rtol=1e-10)
    close((M * 2.5).to_torch(), 2.5 * D)
    close((2.5 * M).to_torch(), 2.5 * D)
    close((M / 4).to_torch(), D / 4)
    close((-M).to_torch(), -D)
    close((M + 2 * M).to_torch(), 3 * D)
    close((M - M).to_torch(), 0 * D, scale=float(D.abs().max()))
    close((M + M * torch.tensor(0.5, dtype=DT)).to_torch(), 1.5 * D)
    with pytest.raises(NotImplementedError, match="to_torch"):
        M + Mi
    with pytest.raises(NotImplementedError):
        M + PMatEKFAC.from_kfac(M)


def test_pickle_and_errors(mats):
    s, M, D = mats
    check_pickle(M, D, s)
    check_layout_errors(M, s)
    assert M.dtype == DT


def test_diagonal_factor_supported_everywhere(mats):
    """A 1-D factor (diagonal, as an Embedding's input factor) behaves like the dense diagonal
    matrix in every operation, and stays 1-D."""
    s, M, _ = mats
    lid = s.lc.layer_ids()[0]
    data = dict(M.data)
    A, G = data[lid]
    data[lid] = (torch.diagonal(A).clone(), G)
    Md = PMatKFAC(s.lc, None, data=data)
    dense_data = dict(data)
    dense_data[lid] = (torch.diag(data[lid][0]), G)
    ref = PMatKFAC(s.lc, None, data=dense_data)
    D = ref.to_torch()
    close(Md.to_torch(), D, rtol=0)
    check_products(Md, D, s)
    check_solve_against(Md, damped_inv(D, 0.3), s, regul=0.3, damping="exact")
    check_solve_against(Md, torch.linalg.inv(_pi_damped_dense(Md, 0.3, power=1.0)), s, regul=0.3)
    assert Md.inv(0.3).data[lid][0].dim() == 1
    assert Md.pow(0.5).data[lid][0].dim() == 1
    assert Md.mm(Md).data[lid][0].dim() == 1
    close(Md.logdet(0.3), torch.logdet(D + 0.3 * torch.eye(D.shape[0], dtype=DT)), rtol=1e-10)
    close((Md + Md).to_torch(), 2 * D)
    E = Md.inv(0.3, damping="exact")
    assert isinstance(E.data[0][lid][0], int)
    close(E.to_torch(), damped_inv(D, 0.3), rtol=1e-8)
    close(Md.get_diag(False), torch.diagonal(Md.to_torch(False)))


# ---------------------------------------------------------------------- refusals
def test_unsupported_layers_refused():
    s = Setup("odd")
    # the grouped convolution has no Kronecker structure: refused before any computation
    with pytest.raises(NotImplementedError, match=r"'0'.*Conv2dLayer.*PMatEKFACBlockDiag"):
        PMatKFAC(s.lc, s.generator(), examples=s.loader)
    with pytest.raises(NotImplementedError, match=r"'4'.*ScaleLayer.*PMatEKFACBlockDiag"):
        PMatKFAC(s.lc.sub(["3", "4"]), s.generator(), examples=s.loader)
    with pytest.raises(ValueError, match="kfac_approx"):
        PMatKFAC(s.lc.sub(["3"]), s.generator(), examples=s.loader, kfac_approx="mean")


def test_kfac_factors_refusal_names_the_layer():
    """A layer type that claims KFAC but whose kfac_factors refuses the configuration: the
    error raised while computing names the layer and what to use instead."""
    s = Setup("odd")
    lc = s.lc.sub(["0", "3"])
    lc["0"].supports_kfac = True  # this instance only; its kfac_factors still refuses groups
    with pytest.raises(NotImplementedError, match=r"layer '0' \(layer type Conv2dLayer\).*PMatEKFACBlockDiag"):
        PMatKFAC(lc, s.generator(), examples=s.loader)


def test_bad_data_refused():
    s = Setup("mlp")
    M = PMatKFAC(s.lc, s.generator(), examples=(s.x,))
    data = dict(M.data)
    A, G = data["0"]
    data["0"] = (A[:-1, :-1], G)
    with pytest.raises(ValueError, match="layer '0'"):
        PMatKFAC(s.lc, None, data=data).mv(s.vec())
    with pytest.raises(ValueError, match="one \\(A, G\\) per layer"):
        PMatKFAC(s.lc, None, data={"0": M.data["0"]})


def test_float32_rank_deficient_factor_decomposes():
    """A Linear layer with more inputs than examples has a very rank-deficient A; float32 LAPACK
    may fail on it: the decomposition falls back to float64 instead of failing."""
    from nngeometry.object.pspace._spectral import eigh

    torch.manual_seed(0)
    X = torch.randn(20, 600)
    A = X.t() @ X / 20  # rank 20, float32
    evals, U = eigh(A)
    assert evals.dtype == torch.float32 and U.dtype == torch.float32
    close((U * evals) @ U.t(), A, rtol=1e-4)


def test_eigh_shift_is_exact_and_fallback_works(monkeypatch):
    """``eigh`` decomposes ``M + s·I`` and removes ``s`` from the eigenvalues: in float64 the
    eigenvalues (exact zeros included) and the reconstruction match ``torch.linalg.eigh``; when
    float32 LAPACK fails, the float64 retry gives the same decomposition."""
    from nngeometry.object.pspace import _spectral

    torch.manual_seed(0)
    X = torch.randn(7, 30, dtype=torch.float64)
    A = X.t() @ X  # rank 7: 23 zero eigenvalues
    evals, U = _spectral.eigh(A)
    ref = torch.linalg.eigvalsh(A)
    assert (evals - ref).abs().max() < 1e-12 * ref.max()
    assert evals[:23].abs().max() < 1e-12 * ref.max()
    close((U * evals) @ U.t(), A, rtol=1e-12)
    close(U.t() @ U, torch.eye(30, dtype=torch.float64), rtol=1e-12)
    # a batch of matrices gets one shift each
    B = torch.stack([A, 1e3 * torch.eye(30, dtype=torch.float64)])
    eb, _ = _spectral.eigh(B)
    assert (eb[0] - ref).abs().max() < 1e-12 * ref.max()
    assert (eb[1] - 1e3).abs().max() < 1e-9

    real = torch.linalg.eigh
    calls = []

    def flaky(M):
        calls.append(M.dtype)
        if M.dtype == torch.float32:
            raise torch.linalg.LinAlgError("simulated ssyevd failure")
        return real(M)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    e32, U32 = _spectral.eigh(A.float())
    assert calls == [torch.float32, torch.float64]
    assert e32.dtype == torch.float32 and U32.dtype == torch.float32
    close((U32.double() * e32.double()) @ U32.double().t(), A, rtol=1e-5)


def test_factor_average_is_exact_with_a_shared_factor_and_averages_otherwise():
    torch.manual_seed(11)
    lc = LayerCollection()
    lin = torch.nn.Linear(3, 2).double()
    lc.add_layer_from_model(torch.nn.Sequential(lin), lin)
    lid = lc.layer_ids()[0]

    def spd(d):
        X = torch.randn(d, d + 2, dtype=torch.float64)
        return X @ X.T / d

    A, G1, G2, A2 = spd(4), spd(2), spd(2), spd(4)
    F1 = PMatKFAC(lc, data={lid: (A, G1)})
    F2 = PMatKFAC(lc, data={lid: (A, G2)})
    S = F1.factor_average(F2, 0.3, 1.0)
    torch.testing.assert_close(S.to_torch(), 0.3 * F1.to_torch() + F2.to_torch())
    F3 = PMatKFAC(lc, data={lid: (A2, G2)})
    S = F1.factor_average(F3, 0.9, 0.1)  # an exponential moving average of both factors
    torch.testing.assert_close(S.data[lid][0], 0.9 * A + 0.1 * A2)
    torch.testing.assert_close(S.data[lid][1], 0.9 * G1 + 0.1 * G2)
    with pytest.raises(ValueError, match="positive sum"):
        F1.factor_average(F3, 0.0, 0.0)
