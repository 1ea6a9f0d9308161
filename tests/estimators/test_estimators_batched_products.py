"""The batched products behind the estimators (``implicit_mm`` / ``implicit_JV`` of the
generator, used by ``PMatImplicit.mmap`` / ``mapTMmap``) push the vectors through in chunks
sized by the model's activations: every chunk size gives the dense matrix's numbers."""
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import nngeometry.backend.strategy as strategy
from nngeometry import FIM
from nngeometry.object import PMatDense, PMatImplicit

DT = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3 * 4 * 4, 4)).to(DT)
    x = torch.randn(10, 2, 6, 6, dtype=DT)
    loader = DataLoader(TensorDataset(x, torch.zeros(10, dtype=torch.long)), batch_size=4)
    return model, loader


def test_vector_chunk_rule(monkeypatch):
    model, loader = _setup()
    imp = FIM(model, loader, PMatImplicit, variant="classif_logits")
    gen, lc = imp.generator, imp.layer_collection
    # first batch of 4: module outputs 4·(48 + 48 + 48 + 4) numbers (conv, relu, flatten, fc)
    per_vector = 4 * (3 * 16 * 3 + 4) + lc.numel()
    monkeypatch.setattr(strategy, "_VECTOR_CHUNK_NUMBERS", 3 * per_vector)
    assert strategy._vector_chunk(gen, 9, loader, lc) == 3
    assert strategy._vector_chunk(gen, 4, loader, lc) == 4  # a few vectors: no measuring
    monkeypatch.setattr(strategy, "_VECTOR_CHUNK_NUMBERS", 1)
    assert strategy._vector_chunk(gen, 9, loader, lc) == 1


@pytest.mark.parametrize("budget", [1, 2000, 10 ** 9])
def test_chunked_products_equal_dense(budget, monkeypatch):
    """chunks of 1 (the single-forward path), a few, and all the vectors at once."""
    model, loader = _setup()
    monkeypatch.setattr(strategy, "_VECTOR_CHUNK_NUMBERS", budget)
    D = FIM(model, loader, PMatDense, variant="classif_logits").to_torch()
    imp = FIM(model, loader, PMatImplicit, variant="classif_logits")
    gen, lc = imp.generator, imp.layer_collection
    V = torch.randn(9, lc.numel(), dtype=DT)
    torch.testing.assert_close(gen.implicit_mm(V, loader, lc), V @ D, rtol=1e-10, atol=1e-12)
    # J v per example: Σ_i ||J(x_i) v||² / n = vᵀ D v
    JV = gen.implicit_JV(V, loader, lc)  # (9, n_output, n)
    assert JV.shape[0] == 9 and JV.shape[2] == 10
    torch.testing.assert_close(JV.pow(2).sum(dim=(1, 2)) / 10, ((V @ D) * V).sum(1),
                               rtol=1e-10, atol=1e-12)
