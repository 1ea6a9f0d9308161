"""``from_statistics``: each representation built from the engine's statistic, computed apart,
is the matrix that the generator constructor builds (which goes through it), and a statistic of
another layer collection or shape is refused."""
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from _kfac_helpers import Setup
from brute import fim_dense
from nngeometry.backend import TorchHooksJacobianBackend
from nngeometry.backend.model_and_data import default_function
from nngeometry.curvature import closed_form_function
from nngeometry.layercollection import LayerCollection
from nngeometry.object import (PMatBlockDiag, PMatDense, PMatDiag, PMatEKFAC, PMatEKFACBlockDiag,
                               PMatEye, PMatKFAC, PMatLowRank, PMatQuasiDiag)

DT = torch.float64


@pytest.fixture(scope="module")
def s():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.LayerNorm(4), nn.Linear(4, 3),
                          nn.Tanh(), nn.Linear(3, 2, bias=False)).to(DT)
    x = torch.randn(7, 3, dtype=DT)
    loader = DataLoader(TensorDataset(x, torch.zeros(7, dtype=torch.long)), batch_size=3)
    lc = LayerCollection.from_model(model)
    gen = TorchHooksJacobianBackend(model, closed_form_function(default_function(model),
                                                                "classif_logits"))

    class S:
        pass

    out = S()
    out.model, out.x, out.loader, out.lc, out.gen = model, x, loader, lc, gen
    return out


def _same(a, b):
    torch.testing.assert_close(a.to_torch(), b.to_torch(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cls, get, options", [
    (PMatDense, "get_covariance_matrix", {}),
    (PMatBlockDiag, "get_covariance_layer_blocks", {}),
    (PMatDiag, "get_covariance_diag", {}),
    (PMatLowRank, "get_jacobian", {}),
    (PMatQuasiDiag, "get_covariance_quasidiag", {}),
    (PMatKFAC, "get_kfac_blocks", {"sqrt_k_split": True}),
    (PMatEKFAC, "get_kfac_blocks", {}),
], ids=lambda v: v.__name__ if isinstance(v, type) else None)
def test_from_statistics_equals_the_generator_build(s, cls, get, options):
    lc = s.lc
    assert cls.statistic == get
    stats = getattr(s.gen, get)(s.loader, lc, **options)
    built = cls(lc, s.gen, examples=s.loader)
    from_stats = cls.from_statistics(lc, stats)
    assert type(from_stats) is cls and from_stats.generator is None
    _same(from_stats, built)
    if cls is PMatDense:  # and the statistic is the Fisher (anchors the comparison)
        torch.testing.assert_close(from_stats.to_torch(),
                                   fim_dense(s.model, s.x, "classif_logits", lc), rtol=1e-10,
                                   atol=1e-12)


def test_kronecker_options(s):
    lc = s.lc
    factors = s.gen.get_kfac_blocks(s.loader, lc, sqrt_k_split=True)
    _same(PMatKFAC.from_statistics(lc, factors, separate_weight_and_bias=True),
          PMatKFAC(lc, s.gen, examples=s.loader, separate_weight_and_bias=True))
    _same(PMatEKFAC.from_statistics(lc, factors, separate_weight_and_bias=True),
          PMatEKFAC(lc, s.gen, examples=s.loader, separate_weight_and_bias=True))
    # EKFAC in given bases: the statistic is the diagonal in them
    kfac = PMatKFAC(lc, s.gen, examples=s.loader)
    diags = s.gen.get_kfe_diag(kfac.kronecker_eigenbases(), s.loader, lc)
    _same(PMatEKFAC.from_statistics(lc, diags, eigendecomposition=kfac),
          PMatEKFAC(lc, s.gen, examples=s.loader, eigendecomposition=kfac))


def test_ekfac_blockdiag_dense_layers():
    odd = Setup("odd")  # a grouped convolution and a layer type without KFAC: dense blocks
    gen = odd.generator()
    stats = gen.get_kfac_or_layer_blocks(odd.loader, odd.lc)
    M = PMatEKFACBlockDiag.from_statistics(odd.lc, stats)
    _same(M, PMatEKFACBlockDiag(odd.lc, gen, examples=odd.loader))
    assert M.dense_layers and set(M.dense_layers) == set(stats[1])


def test_statistic_of_another_layer_collection_is_refused(s):
    sub = s.lc.sub(s.lc.layer_ids()[:1])
    with pytest.raises(ValueError, match=r"shape \(\d+, \d+\).*same LayerCollection"):
        PMatDense.from_statistics(s.lc, s.gen.get_covariance_matrix(s.loader, sub))
    with pytest.raises(ValueError, match="same LayerCollection"):
        PMatDiag.from_statistics(s.lc, s.gen.get_covariance_diag(s.loader, sub))
    with pytest.raises(ValueError, match="has layers .* the layer collection"):
        PMatBlockDiag.from_statistics(s.lc, s.gen.get_covariance_layer_blocks(s.loader, sub))
    blocks = s.gen.get_covariance_layer_blocks(s.loader, s.lc)
    lid = s.lc.layer_ids()[0]
    blocks[lid] = blocks[lid][:-1, :-1]
    with pytest.raises(ValueError, match=f"block of layer '{lid}'"):
        PMatBlockDiag.from_statistics(s.lc, blocks)
    factors = s.gen.get_kfac_blocks(s.loader, s.lc, sqrt_k_split=True)
    factors.pop(lid)
    with pytest.raises(ValueError, match="Kronecker factors has layers"):
        PMatKFAC.from_statistics(s.lc, factors)
    with pytest.raises(TypeError, match=r"the pair \(factors, blocks\)"):
        PMatEKFACBlockDiag.from_statistics(s.lc, factors)
    with pytest.raises(TypeError, match="expected the covariance matrix as a tensor"):
        PMatDense.from_statistics(s.lc, {"a": 1})
    with pytest.raises(NotImplementedError, match="not built from a statistic"):
        PMatEye.from_statistics(s.lc, torch.ones(1))
