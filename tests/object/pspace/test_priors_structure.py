"""Structure kept by priors: ``M + PMatEye`` / ``γ·M1 + M2`` of KFAC / EKFAC,
KFAC / EKFAC ``separate_weight_and_bias=True``, and powers applied to PFMaps in one call
(``M.pow(-1, regul=Λ).mapTMmap(J, reduction='diag')``, the GLM predictive variance), all against
dense float64 computations."""
import functools

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nngeometry import FIM
from nngeometry.layercollection import LayerCollection
from nngeometry.object import (PMatDiag, PMatEKFAC, PMatEye, PMatEyePlusLowRank, PMatKFAC,
                               PMatLowRank, PVector, random_pfmap)

from brute import fim_dense

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.lru_cache(maxsize=None)
def setup(conv=False):
    torch.manual_seed(0)
    if conv:
        model = nn.Sequential(nn.Conv2d(2, 3, 2), nn.Tanh(), nn.Flatten(),
                              nn.Linear(12, 3)).to(DT)
        x = torch.randn(5, 2, 3, 3, dtype=DT)
    else:
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
        x = torch.randn(5, 3, dtype=DT)
    loader = DataLoader(TensorDataset(x, torch.zeros(5, dtype=torch.long)), batch_size=5)
    return model, x, loader, LayerCollection.from_model(model)


def close(a, b, rtol=1e-9, what=""):
    a, b = torch.as_tensor(a).detach(), torch.as_tensor(b).detach()
    assert a.shape == b.shape, f"{what}: shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    scale = max(float(b.abs().max()), 1e-300)
    err = float((a - b).abs().max())
    assert err <= rtol * scale, f"{what}: max abs error {err:.3e} > {rtol:.0e} × {scale:.3e}"


# ---------------------------------------------------------------------- M + s·I, γ·M1 + M2
@pytest.mark.parametrize("rep", [PMatKFAC, PMatEKFAC])
def test_kfac_plus_scaled_identity_is_exact_and_structured(rep):
    model, x, loader, lc = setup()
    M = FIM(model, loader, rep)
    s = torch.tensor(0.3, dtype=DT)
    R = M + 0.3 * PMatEye(lc, scaling=torch.tensor(1.0, dtype=DT))
    assert isinstance(R, PMatEKFAC)  # eigen-Kronecker: KFAC's eigenbasis, D + s
    close(R.to_torch(), M.to_torch() + s * torch.eye(lc.numel(), dtype=DT))
    # its functions are the exact ones of M + sI
    close(R.logdet(), torch.logdet(M.to_torch() + s * torch.eye(lc.numel(), dtype=DT)))


def test_gamma_kfac_plus_kfac_refused_naming_the_alternatives():
    model, x, loader, lc = setup()
    M1 = FIM(model, loader, PMatKFAC)
    model2 = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    M2 = FIM(model2, loader, PMatKFAC)
    with pytest.raises(NotImplementedError, match="average the factors.*factor_average.*PMatEKFAC"):
        M1 * 0.9 + M2
    # proportional factors stay exact (e.g. γ·M + M)
    close((M1 * 0.9 + M1).to_torch(), 1.9 * M1.to_torch())


def test_gamma_ekfac_plus_ekfac_on_a_shared_eigenbasis_is_exact():
    """Online EWC on EKFAC: the second matrix estimated in the first's eigenbasis; the sum is
    exact (``D ← γ D₁ + D₂``)."""
    model, x, loader, lc = setup()
    E1 = FIM(model, loader, PMatEKFAC)
    E2 = PMatEKFAC(lc, E1.generator, examples=loader, eigendecomposition=E1)
    R = E1 * 0.9 + E2
    close(R.to_torch(), 0.9 * E1.to_torch() + E2.to_torch())


# ---------------------------------------------------------------------- separate weight / bias
@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv"])
def test_kfac_separate_weight_and_bias_drops_exactly_the_cross_terms(conv):
    model, x, loader, lc = setup(conv)
    joint = FIM(model, loader, PMatKFAC)
    sep = FIM(model, loader, PMatKFAC, separate_weight_and_bias=True)
    Dj, Ds = joint.to_torch(), sep.to_torch()
    mask = torch.zeros_like(Dj, dtype=torch.bool)  # weight-bias cross terms of each layer
    for lid, layer in lc.layers.items():
        s = lc.slice(lid)
        nw = layer.weight.numel()
        w = torch.arange(s.start, s.start + nw)
        b = torch.arange(s.start + nw, s.stop)
        mask[w.unsqueeze(1), b.unsqueeze(0)] = True
        mask[b.unsqueeze(1), w.unsqueeze(0)] = True
    assert float(Dj[mask].abs().max()) > 1e-6  # the joint matrix has cross terms to drop
    assert float(Ds[mask].abs().max()) == 0.0
    close(Ds[~mask], Dj[~mask])
    # and the default stays joint
    close(FIM(model, loader, PMatKFAC, separate_weight_and_bias=False).to_torch(), Dj)


def test_ekfac_separate_weight_and_bias_matches_separated_kfac_and_update_diag():
    model, x, loader, lc = setup()
    K = FIM(model, loader, PMatKFAC, separate_weight_and_bias=True)
    E = FIM(model, loader, PMatEKFAC, separate_weight_and_bias=True)
    close(E.to_torch(), K.to_torch(), rtol=1e-8)
    # update_diag: the best diagonal in the separated eigenbasis, diag(Uᵀ F U) per layer
    E.update_diag(loader)
    F = fim_dense(model, x, "classif_logits", lc)
    for lid in lc.layer_ids():
        U = E.get_KFE(lid)
        s = lc.slice(lid)
        close(E._layer_diag(lid), torch.diagonal(U.t() @ F[s, s] @ U), rtol=1e-8,
              what=f"update_diag {lid}")


# ---------------------------------------------------------------------- powers on PFMaps
def _glm_reference(D, lam, J):
    inv = torch.linalg.inv(D + torch.diag(lam))
    return torch.einsum("kip,pq,kiq->ki", J, inv, J)


@pytest.mark.parametrize("rep,kind", [(PMatKFAC, "scalar"), (PMatKFAC, "layer"),
                                      (PMatEKFAC, "layer"), (PMatDiag, "param"),
                                      (PMatLowRank, "scalar"), (PMatLowRank, "param")])
def test_glm_predictive_variance_in_one_call(rep, kind):
    """``M.pow(-1, regul=Λ).mapTMmap(J, 'diag')`` = ``J (M + Λ)⁻¹ Jᵀ`` per output and
    example, with the power kept structured (no P × P)."""
    model, x, loader, lc = setup()
    M = FIM(model, loader, rep)
    ids = lc.layer_ids()
    P = lc.numel()
    if kind == "scalar":
        regul, lam = 0.4, torch.full((P,), 0.4, dtype=DT)
    elif kind == "layer":
        regul = {ids[0]: 0.3, ids[1]: 0.6}
        lam = torch.cat([torch.full((lc[l].numel(),), regul[l], dtype=DT) for l in ids])
    else:
        lam = 0.2 + torch.rand(P, generator=torch.Generator().manual_seed(1), dtype=DT)
        regul = PVector(lc, vector_repr=lam)
    kw = {"damping": "exact"} if rep is PMatKFAC else {}
    torch.manual_seed(2)
    J = random_pfmap(lc, 3, 4, dtype=DT)
    Minv = M.pow(-1, regul=regul, **kw)
    expected_type = {PMatKFAC: PMatEKFAC, PMatEKFAC: PMatEKFAC, PMatDiag: PMatDiag,
                     PMatLowRank: PMatEyePlusLowRank}[rep]
    assert isinstance(Minv, expected_type)  # structured, not a dense P × P
    q = Minv.mapTMmap(J, reduction="diag")
    ref = _glm_reference(M.to_torch(), lam, J.to_torch())
    close(q, ref, rtol=1e-8)
    close(Minv.mapTMmap(J, reduction="sum"), ref.sum(0), rtol=1e-8)


def test_ekfac_blockdiag_separate_weight_and_bias():
    from nngeometry.object import PMatEKFACBlockDiag

    model, x, loader, lc = setup()
    K = FIM(model, loader, PMatKFAC, separate_weight_and_bias=True)
    E = FIM(model, loader, PMatEKFACBlockDiag, separate_weight_and_bias=True)
    close(E.to_torch(), K.to_torch(), rtol=1e-8)
