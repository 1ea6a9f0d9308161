"""A model with dropout in training mode under NaturalGradient: one behaviour with or without
capture (refused, naming the module and a keyword that exists), and with
``check_deterministic=False`` the curvature of the documented random network: the training
step's own dropout masks (capture) or a fresh draw of them (extra pass)."""
import pytest
import torch
import torch.nn.functional as tF
from torch import nn

from nngeometry.object import PMatDense, PMatKFAC
from nngeometry.optim import NaturalGradient

from brute import fim_dense

DT = torch.float64


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 3)).to(DT)
    x, y = torch.randn(8, 3, dtype=DT), torch.randint(0, 3, (8,))
    return model, x, y


@pytest.mark.parametrize("capture", [True, False])
def test_dropout_is_refused_with_a_keyword_that_exists(capture):
    model, x, y = _setup()
    pre = NaturalGradient(model, PMatKFAC, capture=capture)
    tF.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"module '2' \(Dropout, p=0.5\) is in training mode.*"
                                           r"NaturalGradient\(\.\.\., check_deterministic=False\)"):
        pre.step((x, y))
    assert pre.steps == 0 and pre.running is None  # refused before any change
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    # the keyword the message recommends is accepted, and the step then runs
    pre = NaturalGradient(model, PMatKFAC, capture=capture, check_deterministic=False)
    model.zero_grad()
    tF.cross_entropy(model(x), y).backward()
    assert torch.isfinite(pre.step((x, y)).get_flat_representation()).all()
    model.eval()  # a model in eval mode is deterministic: accepted by default
    pre = NaturalGradient(model, PMatKFAC, capture=capture)
    model.zero_grad()
    tF.cross_entropy(model(x), y).backward()
    pre.step((x, y))


def test_captured_curvature_is_that_of_the_steps_own_masks():
    """check_deterministic=False with capture: the estimate is the Fisher of the network
    thinned by the training forward's dropout masks (the masks of its gradient)."""
    model, x, y = _setup()
    pre = NaturalGradient(model, PMatDense, curvature="fisher", update_freq=1,
                          check_deterministic=False)
    masks = []
    h = model[2].register_forward_hook(lambda m, a, out: masks.append(
        torch.where(a[0] != 0, out / a[0], torch.zeros_like(out))))
    tF.cross_entropy(model(x), y).backward()
    h.remove()
    pre.step()
    (mask,) = masks
    assert set(mask.unique().tolist()) <= {0.0, 2.0} and (mask == 0).any()
    # each example through the network thinned by its own mask (rescaled by 1 / (1 - p))
    ref = fim_dense(_Thinned(model), torch.cat([x, mask], dim=1))
    assert torch.allclose(pre._latest.to_torch(), ref, rtol=1e-10, atol=1e-14)
    model.eval()
    assert not torch.allclose(pre._latest.to_torch(), fim_dense(model, x), rtol=1e-3)


class _Thinned(nn.Module):
    """The model's two linear layers with a given dropout mask, read from the input's last
    columns: ``[x | mask] -> lin1(tanh(lin0(x)) * mask)``."""

    def __init__(self, model):
        super().__init__()
        self.lin0, self.lin1 = model[0], model[3]

    def forward(self, z):
        d = self.lin0.in_features
        return self.lin1(torch.tanh(self.lin0(z[:, :d])) * z[:, d:])
