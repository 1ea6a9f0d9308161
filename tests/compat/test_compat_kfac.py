"""Compatibility of PMatKFAC / PMatEKFAC / PMatEKFACBlockDiag with upstream nngeometry's public
contract: the split of the scale between KFAC's factors, EKFAC's ``(evecs, diags)`` data, the
members and parameter names, and ``mapTMmap``'s shapes. Every number against brute force in
float64 (inputs, autograd gradients, dense matrices)."""
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _kfac_helpers import DT, Setup, close, damped_inv
from nngeometry.layercollection import LinearLayer
from nngeometry.metrics import FIM, FIM_MonteCarlo
from nngeometry.object import (PMatBlockDiag, PMatDiag, PMatEKFAC, PMatEKFACBlockDiag, PMatKFAC,
                               PMatMixed, PVector)
from nngeometry.curvature import closed_form_function


# ---------------------------------------------------------------------- brute-force factors
def first_layer_inputs(s):
    """``a`` of the first layer, one row per (example, location), trailing 1 for the bias:
    ``(n * L, dA)`` (L = 1 for a Linear layer, the output locations for a convolution)."""
    x = s.x
    if s.kind.startswith("mlp"):
        a = x
    else:
        a = F.unfold(x, kernel_size=3).transpose(1, 2).reshape(-1, 2 * 9)
    if s.model[0].bias is not None:
        a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=DT)], dim=1)
    return a


def first_layer_output_grads(s, variant):
    """``(K, n, L, dG)``: gradients of the K closed-form outputs w.r.t. the first layer's output
    (examples are independent: the gradient of the sum over examples is per example)."""
    h = s.model[0](s.x).detach().requires_grad_(True)
    g = closed_form_function(lambda *b: s.model[1:](b[0]), variant)
    out = g(h)
    grads = torch.stack([torch.autograd.grad(out[:, k].sum(), h, retain_graph=True)[0]
                         for k in range(out.shape[1])])
    if h.dim() == 2:
        return grads.unsqueeze(2)
    return grads.flatten(3).transpose(2, 3)  # (K, n, locations, channels)


VARIANTS = {"classif_logits": lambda C: C - 1, "regression": lambda C: C}


@pytest.mark.parametrize("kind", ["mlp", "mlp_nobias", "cnn"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_factor_split_is_upstreams(kind, variant):
    """A = √K · mean(a aᵀ), G = (1/√K) · Σ_k mean(g_k g_kᵀ) (sum over locations divided by their
    count for a convolution), K the number of backward directions: C - 1 for the closed-form
    classif_logits (3 logits here), C for regression. The old split (A = mean(a aᵀ)) fails the
    first assertion, and A ⊗ G is unchanged."""
    s = Setup(kind, variant)
    K = VARIANTS[variant](3)
    M = PMatKFAC(s.lc, s.generator(), examples=s.loader)
    A, G = M.data["0"]
    n = s.x.shape[0]
    a = first_layer_inputs(s)
    A_mean = a.t() @ a / n
    close(A, K ** 0.5 * A_mean, rtol=1e-12)
    close(torch.trace(A), K ** 0.5 * torch.trace(A_mean), rtol=1e-12)
    gy = first_layer_output_grads(s, variant)
    L = gy.shape[2]
    gf = gy.reshape(-1, gy.shape[-1])
    close(G, gf.t() @ gf / (n * L) / K ** 0.5, rtol=1e-12)
    # the product is the same as with the unsplit factors (the generator's own means)
    A0, G0 = s.generator().get_kfac_blocks(s.loader, s.lc)["0"]
    close(torch.kron(G, A), torch.kron(G0, A0), rtol=1e-12)


def test_factor_split_binary_and_monte_carlo():
    """classif_binary_logits: K = 1 (no rescaling); FIM_MonteCarlo: K = trials."""
    s = Setup("mlp")
    one = nn.Sequential(s.model, nn.Linear(3, 1).to(DT))
    M = FIM(one, s.loader, PMatKFAC, variant="classif_binary_logits")
    a = first_layer_inputs(s)
    A_mean = a.t() @ a / a.shape[0]
    close(M.data["0.0"][0], A_mean, rtol=1e-12)
    for trials in (1, 3):
        torch.manual_seed(0)
        M = FIM_MonteCarlo(s.model, s.loader, PMatKFAC, trials=trials)
        close(M.data["0"][0], trials ** 0.5 * A_mean, rtol=1e-12)


def test_use_pi_false_solves_with_upstreams_factors():
    """``use_pi=False`` damps each factor by √λ: ((A + √λ I) ⊗ (G + √λ I))⁻¹ with the split
    factors, which depends on the split (π-damping does not)."""
    s = Setup("mlp")
    M = PMatKFAC(s.lc, s.generator(), examples=s.loader)
    v = s.vec()
    regul = 0.3
    blocks = []
    for lid in s.lc.layer_ids():
        A, G = M.data[lid]
        IA, IG = torch.eye(A.shape[0], dtype=DT), torch.eye(G.shape[0], dtype=DT)
        B = torch.kron(G + regul ** 0.5 * IG, A + regul ** 0.5 * IA)
        perm = s.lc[lid].kfac_permutation()
        blocks.append(B[perm][:, perm])
    ref = torch.block_diag(*blocks)
    out = M.solve(v, regul=regul, use_pi=False).get_flat_representation()
    close(out, torch.linalg.solve(ref, v.get_flat_representation()), rtol=1e-9)
    close(M.inv(regul, False).to_torch(), torch.linalg.inv(ref), rtol=1e-9)


# ---------------------------------------------------------------------- EKFAC data
@pytest.fixture(scope="module")
def ekfac():
    s = Setup("cnn")
    return s, PMatEKFAC(s.lc, s.generator(), examples=s.loader)


def test_ekfac_data_is_evecs_diags(ekfac):
    """``data = (evecs, diags)``: ``evecs[lid] = (U_A, U_G)``, ``diags[lid]`` 1-D with entry
    ``p·dA + q`` the quadratic form of the block on ``U_G[:, p] ⊗ U_A[:, q]``; before
    update_diag it is ``λ_G[p] λ_A[q]``."""
    s, E = ekfac
    evecs, diags = E.data
    assert set(evecs) == set(diags) == set(s.lc.layer_ids())
    B = E.to_torch(split_weight_bias=False)
    for lid in s.lc.layer_ids():
        UA, UG = evecs[lid]
        dA, dG = UA.shape[0], UG.shape[0]
        assert diags[lid].shape == (dG * dA,)
        sl = s.lc.slice(lid)
        Q = torch.kron(UG, UA)  # column p·dA + q is U_G[:, p] ⊗ U_A[:, q]
        close(diags[lid], torch.diagonal(Q.t() @ B[sl, sl] @ Q), rtol=1e-10)
        A, G = PMatKFAC(s.lc, s.generator(), examples=s.loader).data[lid]
        lam_A = torch.diagonal(UA.t() @ A @ UA)
        lam_G = torch.diagonal(UG.t() @ G @ UG)
        close(diags[lid], torch.outer(lam_G, lam_A).reshape(-1), rtol=1e-10)


def test_ekfac_from_evecs_diags(ekfac):
    """Built from ``(evecs, diags)`` (also with upstream's ``(dG·dA, 1)`` diagonals), the matrix
    is the same; a wrong diagonal size or an unknown format is refused."""
    s, E = ekfac
    evecs, diags = E.data
    D = E.to_torch()
    close(PMatEKFAC(s.lc, None, data=(evecs, diags)).to_torch(), D, rtol=0)
    column = {lid: d.reshape(-1, 1) for lid, d in diags.items()}
    close(PMatEKFAC(layer_collection=s.lc, generator=None, data=(evecs, column)).to_torch(), D,
          rtol=0)
    with pytest.raises(TypeError, match="evecs, diags"):
        PMatEKFAC(s.lc, None, data=[1, 2, 3])
    with pytest.raises(ValueError, match="different layers"):
        PMatEKFAC(s.lc, None, data=(evecs, {}))


def test_ekfac_eigendecomposition_argument_formats(ekfac):
    """``eigendecomposition=``: KFAC's ``(evals, evecs)``, an EKFAC's ``(evecs, diags)`` or the
    evecs dict: the same basis, hence the same updated diagonal."""
    s, E = ekfac
    Eu = PMatEKFAC(s.lc, s.generator(), data=E.data)
    Eu.update_diag(s.loader)
    D = Eu.to_torch()
    Kf = PMatKFAC(s.lc, s.generator(), examples=s.loader)
    for eig in (E.data, E.data[0]):
        close(PMatEKFAC(s.lc, s.generator(), examples=s.loader,
                        eigendecomposition=eig).to_torch(), D, rtol=1e-10)
    # KFAC's eigenvectors are those of the split factors: the same basis up to signs
    close(PMatEKFAC(s.lc, s.generator(), examples=s.loader,
                    eigendecomposition=Kf.get_eigendecomposition()).to_torch(), D, rtol=1e-8)


def test_update_diag_after_unpickling(ekfac):
    s, E = ekfac
    E2 = pickle.loads(pickle.dumps(E))
    close(E2.to_torch(), E.to_torch(), rtol=0)
    with pytest.raises(AttributeError, match="not pickled.*TorchHooksJacobianBackend"):
        E2.update_diag(s.loader)
    E2.generator = s.generator()
    E2.update_diag(s.loader)
    E3 = PMatEKFAC(s.lc, s.generator(), data=E.data)
    E3.update_diag(s.loader)
    close(E2.to_torch(), E3.to_torch(), rtol=0)


# ---------------------------------------------------------------------- members
def test_kfac_eigendecomposition_members():
    """``compute_eigendecomposition(impl)`` then ``get_eigendecomposition() -> (evals, evecs)``
    with ``evals[lid] = (λ_A, λ_G)``, ``evecs[lid] = (U_A, U_G)``: eigenpairs of the factors,
    and ``U_G[:, p] ⊗ U_A[:, q]`` an eigenvector of the block for ``λ_G[p] λ_A[q]``."""
    s = Setup("mlp")
    M = PMatKFAC(s.lc, s.generator(), examples=s.loader)
    Dk = M.to_torch(split_weight_bias=False)
    for impl in ("eigh", "svd"):
        M.compute_eigendecomposition(impl=impl)
        evals, evecs = M.get_eigendecomposition()
        for lid in s.lc.layer_ids():
            A, G = M.data[lid]
            (lA, lG), (UA, UG) = evals[lid], evecs[lid]
            close((UA * lA) @ UA.t(), A, rtol=1e-12)
            close((UG * lG) @ UG.t(), G, rtol=1e-12)
            sl = s.lc.slice(lid)
            u = torch.kron(UG[:, -1], UA[:, 0])
            close(Dk[sl, sl] @ u, lG[-1] * lA[0] * u, rtol=1e-10, scale=float(Dk.abs().max()))
        # solves use the decomposition: still exact
        regul = 0.2
        close(M.solve(s.vec(), regul=regul, damping="exact").get_flat_representation(),
              damped_inv(M.to_torch(), regul) @ s.vec().get_flat_representation(), rtol=1e-9)
    with pytest.raises(ValueError, match="impl"):
        M.compute_eigendecomposition(impl="qr")


@pytest.mark.parametrize("rep", [PMatKFAC, PMatEKFAC])
def test_get_block_torch(rep):
    s = Setup("cnn")
    M = rep(s.lc, s.generator(), examples=s.loader)
    for split in (True, False):
        D = M.to_torch(split_weight_bias=split)
        for lid, layer in s.lc.layers.items():
            sl = s.lc.slice(lid)
            close(M.get_block_torch(lid, layer, split_weight_bias=split), D[sl, sl], rtol=0)
    with pytest.raises(KeyError, match="no layer"):
        M.get_block_torch("nope", None)


def test_renamed_parameters():
    """Upstream's parameter names, as keywords, give the same numbers."""
    s = Setup("mlp")
    M = PMatKFAC(s.lc, s.generator(), examples=s.loader)
    E = PMatEKFAC(s.lc, s.generator(), examples=s.loader)
    v = s.vec()
    f = v.get_flat_representation()
    for X in (M, E):
        D = X.to_torch()
        close(X.mv(vs=v).get_flat_representation(), D @ f)
        close(X.vTMv(vector=v), f @ D @ f)
        close(X.pow(pow=2).to_torch(), D @ D, rtol=1e-10)
    D = E.to_torch()
    close(E.pow(pow=-1, regul=0.1, impl="default").to_torch(), damped_inv(D, 0.1), rtol=1e-8)
    with pytest.raises(ValueError, match="impl"):
        E.pow(2, impl="svd")
    close(E.get_diag(v=None), torch.diagonal(D))
    with pytest.raises(TypeError, match="split_weight_bias"):
        E.get_diag(v)
    # PMatKFAC.inv(regul, use_pi) positional = inverse(regul=, use_pi=)
    close(M.inv(0.3, False).to_torch(), M.inverse(regul=0.3, use_pi=False).to_torch(), rtol=0)
    B = PMatEKFACBlockDiag(s.lc, s.generator(), examples=s.loader)
    close(B.mv(v=v).get_flat_representation(), B.to_torch() @ f)
    close(B.vTMv(v=v), f @ B.to_torch() @ f)


def _with_zeros(E):
    """``E`` with every other diagonal value set to 0 and the others to at least 0.1."""
    evecs, diags = E.data
    new = {}
    for lid, d in diags.items():
        d = d.clone().abs() + 0.1
        d[::2] = 0
        new[lid] = d
    return type(E)(E.layer_collection, None, data=(evecs, new))


@pytest.mark.parametrize("rep,kind", [(PMatEKFAC, "cnn"), (PMatEKFACBlockDiag, "odd")])
def test_pinv(rep, kind):
    s = Setup(kind)
    E = _with_zeros(rep(s.lc, s.generator(), examples=s.loader))
    D = E.to_torch()
    P = E.pinv()
    assert type(P) is rep
    close(P.to_torch(), torch.linalg.pinv(D, hermitian=True, atol=1e-8), rtol=1e-9)
    # atol: eigenvalues up to it are dropped
    P = E.pinv(atol=10.0)
    evals, U = torch.linalg.eigh(D)
    keep = evals > 10.0
    close(P.to_torch(), (U[:, keep] / evals[keep]) @ U[:, keep].t(), rtol=1e-9, scale=1e-3)


def test_ekfac_blockdiag_data_pair():
    """Dense layers appear as ``evecs[lid] = U`` (flat layout) and ``diags[lid] = d``."""
    s = Setup("odd")
    M = PMatEKFACBlockDiag(s.lc, s.generator(), examples=s.loader)
    evecs, diags = M.data
    D = M.to_torch()
    for lid in M.dense_layers:
        sl = s.lc.slice(lid)
        U, d = evecs[lid], diags[lid]
        assert torch.is_tensor(U) and U.shape == (d.numel(), d.numel())
        close((U * d) @ U.t(), D[sl, sl], rtol=1e-12)
    close(PMatEKFACBlockDiag(s.lc, None, data=(evecs, diags)).to_torch(), D, rtol=0)
    lid = M.dense_layers[0]
    with pytest.raises(ValueError, match=f"dense layer '{lid}'"):
        PMatEKFACBlockDiag(s.lc, None, data=(evecs, dict(diags, **{lid: diags[lid][:-1]})))


def test_from_mapping():
    """One representation per layer: by layer type, by layer id, default for the rest."""
    s = Setup("cnn")
    gen = s.generator()
    M = PMatEKFACBlockDiag.from_mapping(s.lc, gen, PMatKFAC, {LinearLayer: PMatBlockDiag},
                                        examples=s.loader)
    assert isinstance(M, PMatMixed)
    D = M.to_torch()
    exact = s.dense
    Kd = PMatKFAC(s.lc, gen, examples=s.loader).to_torch()
    for lid in s.lc.layer_ids():
        sl = s.lc.slice(lid)
        want = exact if isinstance(s.lc[lid], LinearLayer) else Kd
        close(D[sl, sl], want[sl, sl], rtol=1e-10)
    M = PMatEKFACBlockDiag.from_mapping(s.lc, gen, None, {"0": PMatDiag}, examples=s.loader)
    sl = s.lc.slice("0")
    close(M.to_torch()[sl, sl], torch.diag(torch.diagonal(exact[sl, sl])), rtol=1e-10)
    sl = s.lc.slice("3")  # default: this class (EKFAC for a Linear layer, = KFAC)
    close(M.to_torch()[sl, sl], Kd[sl, sl], rtol=1e-10)
    with pytest.raises(TypeError, match="not a PMat class"):
        PMatEKFACBlockDiag.from_mapping(s.lc, gen, None, {"0": "diag"}, examples=s.loader)


# ---------------------------------------------------------------------- mapTMmap
@pytest.mark.parametrize("rep", [PMatKFAC, PMatEKFAC, PMatEKFACBlockDiag])
def test_mapTMmap_shapes(rep):
    """For J of shape (K, n, P): 'diag' -> (K, n) forms J[k,i] M J[k,i]ᵀ, 'sum' -> (n,)."""
    s = Setup("odd" if rep is PMatEKFACBlockDiag else "mlp")
    M = rep(s.lc, s.generator(), examples=s.loader)
    Jm = s.pfmap(K=3, n=4)
    J = Jm.to_torch()
    D = M.to_torch()
    diag = M.mapTMmap(Jm, reduction="diag")
    assert diag.shape == (3, 4)
    close(diag, torch.einsum("kip,pq,kiq->ki", J, D, J))
    total = M.mapTMmap(Jm, reduction="sum")
    assert total.shape == (4,)
    close(total, torch.einsum("kip,pq,kiq->i", J, D, J))
    close(M.mapTMmap(Jm), total, rtol=0)


def test_kfac_setstate_keeps_caches_working():
    s = Setup("mlp")
    M = PMatKFAC(s.lc, s.generator(), examples=s.loader)
    M.solve(s.vec(), regul=0.1)  # fills the caches
    M2 = pickle.loads(pickle.dumps(M))
    assert M2.generator is None
    v = s.vec()
    close(M2.solve(v, regul=0.1).get_flat_representation(),
          M.solve(v, regul=0.1).get_flat_representation(), rtol=0)
    close(M2.solve(v, regul=0.5, use_pi=False).get_flat_representation(),
          M.solve(v, regul=0.5, use_pi=False).get_flat_representation(), rtol=0)
    assert isinstance(M2.mv(v), PVector)
