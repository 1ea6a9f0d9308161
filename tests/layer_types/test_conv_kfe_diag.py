"""The convolution's own EKFAC diagonal (projected patches and output gradients) against the
generic path (flat per-example gradients re-indexed to the Kronecker layout and projected)."""
import pytest
import torch
from torch import nn

from nngeometry.layer_types.base import AbstractLayer
from nngeometry.layercollection import LayerCollection


def _orth(d, g):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q


MODULES = [
    lambda: nn.Conv2d(3, 5, 3, padding=1),
    lambda: nn.Conv2d(4, 6, (2, 3), stride=2, bias=False),
    lambda: nn.Conv1d(2, 4, 3, dilation=2, padding=2),
    lambda: nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1),
]


@pytest.mark.parametrize("make", MODULES)
@pytest.mark.parametrize("identity", [False, True])
@pytest.mark.parametrize("chunk", [None, 1])
def test_conv_kfe_diag_matches_generic(make, identity, chunk, monkeypatch):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    m = make().double()
    layer = LayerCollection.from_model(nn.Sequential(m)).layers["0"]
    spatial = (7, 6) if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) else (9,)
    x = torch.randn(5, m.in_channels, *spatial, dtype=torch.float64, generator=g)
    y = m(x)
    K = 3
    gy = torch.randn(K, *y.shape, dtype=torch.float64, generator=g)
    dA = layer._kronecker_width()
    dG = layer.out_channels
    UA, UG = (dA, dG) if identity else (_orth(dA, g), _orth(dG, g))
    if chunk is not None:
        import nngeometry.layer_types.conv as conv
        monkeypatch.setattr(conv, "PATCH_CHUNK_BYTES", chunk)
    got = layer.kfe_diag(m, x, gy, UA, UG)
    ref = AbstractLayer.kfe_diag(layer, m, x, gy, UA, UG)
    assert got.shape == ref.shape == (dG, dA)
    assert (got - ref).abs().max() <= 1e-10 * ref.abs().max()
