"""nngeometry.layers with upstream's ``eps``: the forward maps, and per-example gradients of
the layer types (which read ``module.eps``) against torch.func on the same forward, in float64."""
import pytest
import torch
from torch import nn

from brute import per_example_jacobian
from nngeometry.backend import TorchHooksJacobianBackend
from nngeometry.layercollection import LayerCollection
from nngeometry.layers import Affine1d, Cosine1d, WeightNorm1d, WeightNorm2d

DT = torch.float64


def rows(w, eps):
    f = w.reshape(w.shape[0], -1)
    return (f / torch.sqrt((f * f).sum(1, keepdim=True) + eps)).reshape(w.shape)


@pytest.mark.parametrize("eps", [1e-5, 0.3, 0.0])
def test_forward_maps(eps):
    torch.manual_seed(0)
    x = torch.randn(5, 4, dtype=DT)
    kw = {} if eps == 1e-5 else {"eps": eps}  # 1e-5 is the default
    wn = WeightNorm1d(4, 3, dtype=DT, **kw)
    assert wn.eps == eps and wn.bias is None
    torch.testing.assert_close(wn(x), x @ rows(wn.weight, eps).t())
    cos = Cosine1d(4, 3, dtype=DT, **kw)
    xh = x / torch.sqrt((x * x).sum(1, keepdim=True) + eps)
    torch.testing.assert_close(cos(x), xh @ rows(cos.weight, eps).t())
    wn2 = WeightNorm2d(2, 3, 2, padding=1, dtype=DT, **kw)  # Conv2d's positional arguments
    xi = torch.randn(2, 2, 4, 4, dtype=DT)
    torch.testing.assert_close(
        wn2(xi), nn.functional.conv2d(xi, rows(wn2.weight, eps), padding=1))


def test_cosine_of_parallel_and_orthogonal_inputs():
    layer = Cosine1d(2, 3, eps=0.0)
    w = layer.weight.detach()
    orth = w[2] - (w[2] @ w[1]) / (w[1] @ w[1]) * w[1]
    out = layer(torch.stack([3 * w[0], 1.5 * orth]))
    assert abs(out[0, 0].item() - 1) < 1e-6 and abs(out[1, 1].item()) < 1e-6


def test_weightnorm2d_refuses_bias_and_affine_reset():
    with pytest.raises(ValueError, match="no bias"):
        WeightNorm2d(2, 3, 3, bias=True)
    a = Affine1d(3)
    with torch.no_grad():
        a.weight.mul_(5)
        a.bias.add_(2)
    a.reset_parameters()
    assert torch.equal(a.weight.detach(), torch.ones(3)) and torch.equal(a.bias.detach(),
                                                                        torch.zeros(3))
    assert Affine1d(3, bias=False).bias is None


@pytest.mark.parametrize("eps", [0.0, 0.3])
def test_per_example_gradients_follow_eps(eps):
    torch.manual_seed(1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = WeightNorm2d(2, 3, 3, padding=1, eps=eps)
            self.wn = WeightNorm1d(3 * 4 * 4, 5, eps=eps)
            self.cos = Cosine1d(5, 3, eps=eps)

        def forward(self, x):
            return self.cos(torch.tanh(self.wn(torch.tanh(self.conv(x)).flatten(1))))

    model = Net().to(DT)
    x = torch.randn(6, 2, 4, 4, dtype=DT)
    lc = LayerCollection.from_model(model)
    J = TorchHooksJacobianBackend(model).get_jacobian((x,), lc)
    ref = per_example_jacobian(model, x, lc).permute(1, 0, 2)
    torch.testing.assert_close(J, ref, atol=1e-10, rtol=1e-8)
