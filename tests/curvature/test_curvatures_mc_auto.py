"""``backward='auto'`` with many Monte-Carlo trials: the two backward strategies are timed on
a few directions only (never on all the trials), once per model and direction count (not again
for a smaller last batch), and the matrix is the one of either strategy."""
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import nngeometry.backend.jacobian as jac
from nngeometry.backend import TorchHooksJacobianBackend
from nngeometry.layercollection import LayerCollection
from nngeometry.variants import monte_carlo_function

pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(n=10):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(3 * 2 * 2, 5)).double()
    x = torch.randn(n, 2, 6, 6, dtype=torch.float64)
    return model, DataLoader(TensorDataset(x, torch.zeros(n, dtype=torch.long)), batch_size=4)


def test_auto_times_a_few_directions_only(monkeypatch):
    model, loader = _setup()
    trials = 60
    lc = LayerCollection.from_model(model)

    def diag(backward):
        g = monte_carlo_function(lambda x, *_: model(x), "classif_logits", trials, seed=3)
        return TorchHooksJacobianBackend(model, g, backward=backward).get_covariance_diag(
            loader, lc)
    ref = diag("batched")
    calls = []
    batched, looped = jac._backward_batched, jac._backward_looped

    def rec_batched(out, targets, cot, retain):
        calls.append(("batched", cot.shape[0]))
        return batched(out, targets, cot, retain)

    def rec_looped(out, targets, cot, retain):
        calls.append(("looped", cot.shape[0]))
        return looped(out, targets, cot, retain)
    monkeypatch.setattr(jac, "_backward_batched", rec_batched)
    monkeypatch.setattr(jac, "_backward_looped", rec_looped)
    jac._BACKWARD_CHOICE.clear()
    got = diag("auto")
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
    timing = [k for _, k in calls if k <= jac.LOOPED_TIMING_DIRECTIONS]
    full = [k for _, k in calls if k > jac.LOOPED_TIMING_DIRECTIONS]
    # 1 batching-rule check + 2 × 2 timing runs, then every (chunk of) directions of the three
    # batches (4 + 4 + 2 examples) once with the chosen strategy: no second timing for the
    # last, smaller batch
    assert len(timing) == 5, calls
    assert set(timing) == {jac.LOOPED_TIMING_DIRECTIONS}
    assert full == [trials] * 3, calls
    assert len(jac._BACKWARD_CHOICE) == 1, jac._BACKWARD_CHOICE
    assert set(jac._BACKWARD_CHOICE.values()) <= {"batched", "looped"}
