"""A convolution's KFAC input factor added into the statistic's running sum (no factor-sized
tensor per batch): the matrix does not depend on how the examples are split into batches, on
a module called twice, with and without bias, and after a reload of the statistic's state."""
import torch
from torch import nn

from nngeometry import FIM
from nngeometry.backend import TorchHooksJacobianBackend
from nngeometry.backend.consumers import KFACFactors
from nngeometry.layer_types.base import layer_type_for
from nngeometry.layercollection import LayerCollection
from nngeometry.object import PMatKFAC

DT = torch.float64


class _TwiceConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, padding=1)
        self.c2 = nn.Conv2d(3, 3, 3, padding=1, bias=False)  # called twice
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        h = torch.tanh(self.c2(torch.tanh(self.c2(torch.tanh(self.c1(x))))))
        return self.fc(h.mean(dim=(2, 3)))


def _data():
    torch.manual_seed(0)
    return torch.randn(12, 2, 5, 5, dtype=DT)


def test_kfac_factors_into_adds_in_place():
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 3, 2).to(DT)
    layer = layer_type_for(conv).from_module(conv)
    x1, x2 = torch.randn(4, 2, 5, 5, dtype=DT), torch.randn(3, 2, 5, 5, dtype=DT)
    gy1, gy2 = torch.randn(2, 4, 3, 4, 4, dtype=DT), torch.randn(2, 3, 3, 4, 4, dtype=DT)
    A1, _ = layer.kfac_factors(conv, x1, gy1)
    A2, _ = layer.kfac_factors(conv, x2, gy2)
    total = A1.clone()
    out, _ = layer.kfac_factors(conv, x2, gy2, into=total)
    assert out is total
    assert torch.allclose(total, A1 + A2, rtol=1e-13, atol=1e-13)


def test_batches_split_alike():
    model = _TwiceConv().to(DT)
    x = _data()
    one = FIM(model, [(x,)], PMatKFAC, variant="regression")
    split = FIM(model, [(x[:3],), (x[3:7],), (x[7:],)], PMatKFAC, variant="regression")
    for lid, (A, G) in one.data.items():
        A2, G2 = split.data[lid]
        assert torch.allclose(A2, A, rtol=1e-12, atol=1e-14), lid
        assert torch.allclose(G2, G, rtol=1e-12, atol=1e-14), lid


def test_reloaded_state_goes_on_accumulating():
    """A statistic whose sums were reloaded (not its own buffers) is added to, never modified
    in place, and gives the factors of all the batches."""
    model = _TwiceConv().to(DT)
    x = _data()
    lc = LayerCollection.from_model(model)
    gen = TorchHooksJacobianBackend(model, function=lambda b: model(b))
    first = gen.accumulate([(x[:5],)], lc, KFACFactors(lc), finalize=False)
    state = first.state()
    loaded = {lid: state["_acc"][lid][0][0][0] for lid in ("c1", "c2")}
    kept = {lid: t.clone() for lid, t in loaded.items()}
    again = KFACFactors(lc).load_state(state, first.count)
    gen.accumulate([(x[5:],)], lc, again)
    whole = gen.accumulate([(x,)], lc, KFACFactors(lc))
    for lid in ("c1", "c2"):
        # the loaded sums untouched, and still what the state (and the first statistic) hold
        assert state["_acc"][lid][0][0][0] is loaded[lid]
        assert first._acc[lid][0][0][0] is loaded[lid]
        assert torch.equal(loaded[lid], kept[lid])
        for a, b in zip(again.result[lid], whole.result[lid]):
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)
