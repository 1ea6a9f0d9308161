"""End to end on tiny real-world-shaped models (tests/models.py), float64: every representation
that applies is checked against the brute-force Fisher; the others must refuse clearly."""
import warnings

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import nngeometry.object.pspace as pspace
from brute import fim_dense
from models import MODELS
from nngeometry import FIM
from nngeometry.layercollection import LayerCollection, ScaleShiftLayer
from nngeometry.object.vector import random_pvector

warnings.filterwarnings("ignore", message=".*performance drop.*")

VARIANT = {"unet": "regression"}  # per-pixel outputs (n, 2, H, W) flattened: Gaussian
_CACHE = {}


def setup(name):
    """(model, loader of 2 batches, layer collection, brute-force Fisher), cached per model."""
    if name not in _CACHE:
        model, x = MODELS[name]()
        y = torch.zeros(x.shape[0], dtype=torch.long)
        loader = DataLoader(TensorDataset(x, y), batch_size=(x.shape[0] + 1) // 2)
        lc = LayerCollection.from_model(model)
        F = fim_dense(model, x, VARIANT.get(name, "classif_logits"), lc).detach()
        _CACHE[name] = (model, loader, lc, F)
    return _CACHE[name]


def fim(name, rep, lc=None, **kw):
    model, loader, lc_all, _ = setup(name)
    return FIM(model, loader, rep, variant=VARIANT.get(name, "classif_logits"),
               layer_collection=lc_all if lc is None else lc, **kw)


def _close(a, b, F):
    torch.testing.assert_close(a, b, atol=1e-11 * F.abs().max().item(), rtol=0)


def _block_mask(lc):
    P = lc.numel()
    mask = torch.zeros(P, P, dtype=torch.bool)
    for lid in lc.layer_ids():
        s = lc.slice(lid)
        mask[s, s] = True
    return mask


def _sub_index(lc, sub):
    """Coordinates of the sub-collection ``sub`` in the layout of ``lc``."""
    return torch.cat([torch.arange(lc.p_pos[lid], lc.p_pos[lid] + lc[lid].numel())
                      for lid in sub.layer_ids()])


def _kfac_ok(lc):
    return all(getattr(layer, "supports_kfac", False) for _, layer in lc)


@pytest.mark.parametrize("name", list(MODELS))
def test_exact_representations(name):
    model, loader, lc, F = setup(name)
    assert F.abs().max() > 0
    _close(fim(name, pspace.PMatDense).to_torch(), F, F)
    _close(fim(name, pspace.PMatDiag).get_diag(), torch.diagonal(F), F)
    mask = _block_mask(lc)
    _close(fim(name, pspace.PMatBlockDiag).to_torch(), F * mask, F)
    if hasattr(pspace, "PMatLowRank"):
        _close(fim(name, pspace.PMatLowRank).to_torch(), F, F)
    if hasattr(pspace, "PMatImplicit"):
        v = random_pvector(lc, dtype=torch.float64)
        _close(fim(name, pspace.PMatImplicit).mv(v).to_torch(), F @ v.to_torch(), F)
    if hasattr(pspace, "PMatQuasiDiag"):
        _close(fim(name, pspace.PMatQuasiDiag).get_diag(), torch.diagonal(F), F)


@pytest.mark.parametrize("name", list(MODELS))
def test_kronecker_representations(name):
    model, loader, lc, F = setup(name)
    if not hasattr(pspace, "PMatKFAC"):
        pytest.skip("PMatKFAC not available yet")
    kfac_layers = [lid for lid, layer in lc if getattr(layer, "supports_kfac", False)]
    others = [lid for lid in lc.layer_ids() if lid not in kfac_layers]
    # norm layers sit in KFAC as exact dense blocks (A = [[1]] after normalization)
    exact_in_kfac = [lid for lid in kfac_layers if isinstance(lc[lid], ScaleShiftLayer)]
    if not _kfac_ok(lc):
        assert others, "a model that refuses KFAC has a layer without KFAC"
        with pytest.raises(NotImplementedError, match=f"layer '{others[0]}'"):
            fim(name, pspace.PMatKFAC)
        if hasattr(pspace, "PMatEKFAC"):
            with pytest.raises(NotImplementedError, match="layer '"):
                fim(name, pspace.PMatEKFAC)
    # KFAC / EKFAC on the layers that have it (all of them for most models; the transformer's
    # attention included, its learned position table, a generic layer, left out)
    sub = lc if _kfac_ok(lc) else lc.sub(kfac_layers)
    idx = _sub_index(lc, sub)
    Fs = F[idx][:, idx]
    K = fim(name, pspace.PMatKFAC, lc=sub)
    M = K.to_torch()
    assert M.shape == Fs.shape and M.dtype == torch.float64
    for lid in exact_in_kfac:
        s = sub.slice(lid)
        _close(M[s, s], Fs[s, s], F)
    assert torch.linalg.eigvalsh(M).min() > -1e-10 * F.abs().max()
    if hasattr(pspace, "PMatEKFAC"):
        E = fim(name, pspace.PMatEKFAC, lc=sub)
        _close(E.to_torch(), M, F)  # before update_diag: EKFAC == KFAC
        E.update_diag(loader)  # then diag(Uᵀ F U) in each layer's eigenbasis
        for lid in sub.layer_ids():
            U, s = E.get_KFE(lid), sub.slice(lid)
            _close(torch.diagonal(U.t() @ E.to_torch()[s, s] @ U),
                   torch.diagonal(U.t() @ Fs[s, s] @ U), F)
    if hasattr(pspace, "PMatEKFACBlockDiag"):
        # EKFAC where KFAC exists, exact dense blocks elsewhere
        M = fim(name, pspace.PMatEKFACBlockDiag).to_torch()
        for lid in others + exact_in_kfac:
            s = lc.slice(lid)
            _close(M[s, s], F[s, s], F)


def test_models_layer_types():
    """The collections hold the expected layer types (coverage of the real models)."""
    kinds = {name: {type(layer).__name__ for _, layer in setup(name)[2]} for name in MODELS}
    assert {"Conv2dLayer", "BatchNorm2dLayer", "LinearLayer"} <= kinds["resnet"]
    assert {"Conv1dLayer", "InstanceNorm1dLayer", "BatchNorm1dLayer"} <= kinds["conv1d"]
    assert {"ConvTranspose2dLayer", "GroupNormLayer"} <= kinds["unet"]
    assert {"EmbeddingLayer", "MultiheadAttentionLayer", "LayerNormLayer",
            "GenericLayer"} <= kinds["transformer"]
    assert {"GenericLayer", "RMSNormLayer", "WeightNorm1dLayer", "Affine1dLayer",
            "Cosine1dLayer"} <= kinds["custom"]
    lc = setup("transformer")[2]
    assert "enc.self_attn.out_proj" not in lc and "" in lc  # root holds the position parameter
