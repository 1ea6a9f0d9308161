"""The convolution layer types' `grad_sum` (the parameter-use check's formula, used instead of
re-running the module) against autograd, and the check still refusing a convolution whose
weight is also used outside its module."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nngeometry import FIM
from nngeometry.backend.passes import ParameterUseError
from nngeometry.layer_types.base import layer_type_for
from nngeometry.object import PMatDiag

DT = torch.float64

CASES = [
    (nn.Conv2d(3, 4, 3), (5, 3, 7, 6)),
    (nn.Conv2d(4, 6, (2, 3), stride=2, padding=1, dilation=(1, 2), groups=2), (3, 4, 9, 8)),
    (nn.Conv2d(3, 2, 1, bias=False), (4, 3, 5, 5)),
    (nn.Conv1d(2, 3, 3, stride=2, padding=2), (4, 2, 11)),
    (nn.Conv3d(2, 2, 2, padding=(1, 0, 1)), (2, 2, 4, 5, 3)),
]


@pytest.mark.parametrize("module,shape", CASES)
def test_conv_grad_sum_is_autograds(module, shape):
    torch.manual_seed(0)
    module = module.to(DT)
    x = torch.randn(shape, dtype=DT)
    y = module(x)
    gy = torch.randn_like(y)
    ref = torch.autograd.grad(y, [p for p in (module.weight, module.bias) if p is not None], gy)
    got = layer_type_for(module).from_module(module).grad_sum(module, x, gy)
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert g.shape == r.shape
        assert torch.allclose(g, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("module", [nn.Conv2d(2, 3, 3, padding="same"),
                                    nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"),
                                    nn.ConvTranspose2d(2, 3, 3, stride=2)])
def test_conv_grad_sum_declines_what_it_cannot_read_back(module):
    """The check then re-runs the module on its recorded arguments."""
    x = torch.randn(2, 2, 6, 6)
    gy = torch.randn_like(module(x))
    assert layer_type_for(module).from_module(module).grad_sum(module, x, gy) is None


class _SharedKernel(nn.Module):
    """A convolution whose weight the parent also applies with ``F.conv2d``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.head = nn.Linear(2, 3)

    def forward(self, x):
        h = self.conv(x) + F.conv2d(x, self.conv.weight, padding=1)
        return self.head(h.mean(dim=(2, 3)))


def test_conv_weight_used_outside_its_module_is_refused():
    torch.manual_seed(0)
    model = _SharedKernel().to(DT)
    with pytest.raises(ParameterUseError, match="'conv"):
        FIM(model, (torch.randn(6, 2, 5, 5, dtype=DT),), PMatDiag)
