"""Spectra of every representation against eigvalsh of its dense matrix, and the effective
dimension against its formula."""
import pytest
import torch
from torch import nn

from nngeometry import FIM
from nngeometry.layercollection import LayerCollection
from nngeometry.object import (PMatBlockDiag, PMatDense, PMatDiag, PMatEKFAC, PMatEKFACBlockDiag,
                               PMatEye, PMatImplicit, PMatKFAC, PMatLowRank, PMatQuasiDiag)
from nngeometry.spectrum import effective_dimension, eigenvalues

DT = torch.float64


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    return model, torch.randn(30, 4, dtype=DT)


@pytest.mark.parametrize("rep", [PMatDense, PMatBlockDiag, PMatDiag, PMatQuasiDiag, PMatLowRank,
                                 PMatKFAC, PMatEKFAC, PMatEKFACBlockDiag],
                         ids=lambda r: r.__name__)
def test_all_eigenvalues_equal_eigvalsh_of_the_dense_matrix(rep):
    model, x = _setup()
    M = FIM(model, (x,), rep, variant="classif_logits")
    ref = torch.linalg.eigvalsh(M.to_torch()).flip(0)
    ev = eigenvalues(M)
    assert ev.shape == ref.shape
    assert torch.allclose(ev, ref, rtol=1e-8, atol=1e-12 * float(ref.abs().max()))
    assert torch.allclose(eigenvalues(M, k=3), ref[:3], rtol=1e-8, atol=1e-14)
    assert torch.allclose(eigenvalues(M, k=2, which="smallest"), ref.flip(0)[:2], atol=1e-10)


def test_eye_and_large_implicit():
    model, x = _setup()
    lc = LayerCollection.from_model(model)
    ev = eigenvalues(PMatEye(lc, scaling=2.5))
    assert ev.shape == (lc.numel(),) and torch.all(ev == 2.5)
    M = FIM(model, (x,), PMatImplicit, variant="classif_logits")
    ref = torch.linalg.eigvalsh(FIM(model, (x,), PMatDense, variant="classif_logits").to_torch())
    with pytest.raises(ValueError, match="pass k="):
        eigenvalues(M, max_dense=10)
    top = eigenvalues(M, k=4, max_dense=10, generator=0)
    assert torch.allclose(top, ref.flip(0)[:4], rtol=1e-7)


def test_effective_dimension_is_the_formula():
    model, x = _setup()
    M = FIM(model, (x,), PMatKFAC, variant="classif_logits")
    ev = torch.linalg.eigvalsh(M.to_torch()).clamp_min(0)
    for alpha in (1e-3, 0.1, 10.0):
        assert torch.allclose(effective_dimension(M, alpha), (ev / (ev + alpha)).sum(), rtol=1e-8)
    with pytest.raises(ValueError, match="alpha"):
        effective_dimension(M, 0.0)
