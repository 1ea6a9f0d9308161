"""Dict batches with the user's own keys ({'x': ..., 'y': ...}) for a model that takes one
tensor: the error says how nngeometry reads a dict and how to map the keys; following it gives
the matrix (and the Laplace fit) of the same data as tuple batches, checked against brute force.
Hugging Face style dicts keep working (tests/test_dict_batches.py)."""
import pytest
import torch
from torch import nn

from brute import fim_dense

from nngeometry import FIM
from nngeometry.laplace import Laplace
from nngeometry.object import PMatDense

DT = torch.float64


def data(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    x = torch.randn(6, 3, dtype=DT)
    y = torch.randint(0, 3, (6,))
    return model, x, y


def test_fim_dict_with_own_keys_names_function_and_target_key():
    model, x, y = data()
    batches = [{"x": x[:3], "y": y[:3]}, {"x": x[3:], "y": y[3:]}]
    with pytest.raises(TypeError, match=r"keys \['x', 'y'\].*function=lambda b: model\(b\['x'\]\)"
                                        r" and target_key='y'"):
        FIM(model, batches, PMatDense)
    # the fix the message names: the FIM of the same examples
    F = FIM(model, batches, PMatDense, function=lambda b: model(b["x"]), target_key="y")
    torch.testing.assert_close(F.to_torch(), fim_dense(model, x), rtol=1e-10, atol=1e-12)


def test_laplace_dict_with_own_keys():
    model, x, y = data()
    batches = [{"x": x, "y": y}]
    with pytest.raises(ValueError, match="no key 'labels'.*target_key=.*function="):
        Laplace(model, representation=PMatDense).fit(batches)
    mapped = Laplace(model, representation=PMatDense, function=lambda b: model(b["x"]),
                     target_key="y").fit(batches)
    plain = Laplace(model, representation=PMatDense).fit([(x, y)])
    torch.testing.assert_close(mapped.ggn.to_torch(), fim_dense(model, x), rtol=1e-10, atol=1e-12)
    ce = torch.nn.functional.cross_entropy(model(x), y, reduction="sum")
    torch.testing.assert_close(mapped.loss, ce.detach())
    torch.testing.assert_close(mapped.log_marginal_likelihood(), plain.log_marginal_likelihood())


def test_typeerror_inside_forward_is_not_rewritten():
    """A TypeError raised by the model's own code is the user's bug: it surfaces unchanged."""
    class Takes(nn.Module):
        def forward(self, x, **unused):
            raise TypeError("my own bug")
    with pytest.raises(TypeError, match="^my own bug$"):
        FIM(Takes().to(DT), [{"x": torch.zeros(2, 3, dtype=DT)}], PMatDense)
