"""PMatBlockDiag (and the dense per-unit powers of PMatQuasiDiag) refuse blocks that can't be
allocated with the library's MemoryError naming the alternatives, before the pass over the
data, instead of the allocator's failure."""
import pytest
import torch
from torch import nn

from nngeometry import FIM
from nngeometry.backend import TorchHooksJacobianBackend
from nngeometry.layercollection import LayerCollection
from nngeometry.object import PMatBlockDiag
from nngeometry.object.pspace import blockdiag

DT = torch.float64


def test_million_parameter_layer_refused_before_the_pass():
    """A Linear(1000, 1000): one block of (10⁶)² floats, 3.6 TiB."""
    model = nn.Linear(1000, 1000)
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(MemoryError, match=r"PMatBlockDiag.*1001000 × 1001000.*TiB.*PMatKFAC"):
        FIM(model, (torch.randn(2, 1000),), PMatBlockDiag, variant="regression")
    assert not calls  # refused before running the model


def test_limit_is_the_sum_of_the_blocks():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    lc = LayerCollection.from_model(model)
    need = (16 ** 2 + 10 ** 2) * 8
    gen = TorchHooksJacobianBackend(model)
    blockdiag._check_blocks_fit(lc, gen, limit_bytes=need)  # fits exactly
    with pytest.raises(MemoryError, match="layer '0', is 16 × 16"):
        blockdiag._check_blocks_fit(lc, gen, limit_bytes=need - 1)
