"""``backward='auto'``: the two backward strategies are timed on the real work (no direction's
gradient is computed twice), the loop on a few directions only (never on all the trials), the
choice is made once per model structure and direction count (not again for a smaller last batch,
nor for a new model of the same structure, but again for another structure), and the matrix is
the one of either strategy."""
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import nngeometry.backend.strategy as strategy
from nngeometry.backend import TorchHooksJacobianBackend
from nngeometry.layercollection import LayerCollection
from nngeometry.curvature import monte_carlo_function

pytestmark = pytest.mark.usefixtures("one_thread")


GRAPH_CHOICE_TESTS = {"test_graph_of_known_ops_decides_without_timing",
                      "test_unknown_node_leaves_the_choice_to_timing"}


@pytest.fixture(autouse=True)
def timed(monkeypatch, request):
    """The timing is what these tests check: the cost model read from the graph's node types
    (which decides a max-pooling CNN at once) is off, except where a test asks for it."""
    if request.function.__name__ not in GRAPH_CHOICE_TESTS:
        monkeypatch.setattr(strategy, "_graph_choice", lambda out: None)


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
    batched, looped = strategy._backward_batched, strategy._backward_looped

    def rec_batched(out, targets, cot, retain):
        calls.append(("batched", cot.shape[0]))
        return batched(out, targets, cot, retain)

    def rec_looped(out, targets, cot, retain):
        calls.append(("looped", cot.shape[0]))
        return looped(out, targets, cot, retain)
    monkeypatch.setattr(strategy, "_backward_batched", rec_batched)
    monkeypatch.setattr(strategy, "_backward_looped", rec_looped)
    # (no early decision: every round is taken, whatever the timings)
    monkeypatch.setattr(strategy, "BACKWARD_DECISIVE_RATIO", float("inf"))
    strategy._BACKWARD_CHOICE.clear()
    strategy._BACKWARD_SAMPLES.clear()
    got = diag("auto")
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
    # the first BACKWARD_TIMING_ROUNDS batches are split between the two strategies, the loop
    # taking LOOPED_TIMING_DIRECTIONS directions; the other batches go through the chosen one
    rounds = strategy.BACKWARD_TIMING_ROUNDS
    assert rounds == 2
    k_loop = strategy.LOOPED_TIMING_DIRECTIONS
    split = sorted(calls[:2 * rounds])
    assert split == sorted([("batched", trials - k_loop), ("looped", k_loop)] * rounds), calls
    assert [k for _, k in calls[2 * rounds:]] == [trials], calls
    # every direction of every batch computed once
    assert sum(k for _, k in calls) == 3 * trials
    assert len(strategy._BACKWARD_CHOICE) == 1, strategy._BACKWARD_CHOICE
    assert set(strategy._BACKWARD_CHOICE.values()) <= {"batched", "looped"}
    assert not strategy._BACKWARD_SAMPLES


def test_choice_kept_per_structure_not_per_object(monkeypatch):
    """A new model of the same structure reuses the choice (no split batch); a model of
    another structure makes its own; the key holds no object id."""
    def build(model, loader):
        lc = LayerCollection.from_model(model)
        g = monte_carlo_function(lambda x, *_: model(x), "classif_logits", 6, seed=3)
        return TorchHooksJacobianBackend(model, g, backward="auto").get_covariance_diag(
            loader, lc)
    calls = _record(monkeypatch)
    model, loader = _setup()
    build(model, loader)
    assert len(strategy._BACKWARD_CHOICE) == 1
    (key,), choice = list(strategy._BACKWARD_CHOICE), strategy._BACKWARD_CHOICE.copy()

    def leaves(k):
        return [x for e in k for x in leaves(e)] if isinstance(k, tuple) else [k]
    assert id(model) not in leaves(key)
    del model
    calls.clear()
    model2, loader = _setup()  # same structure, new object
    build(model2, loader)
    assert strategy._BACKWARD_CHOICE == choice
    assert calls == [choice[key]] * 3, calls  # one call per batch, no split
    torch.manual_seed(1)
    other = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(4 * 2 * 2, 5)).double()  # 4 channels instead of 3
    calls.clear()
    build(other, loader)
    assert len(strategy._BACKWARD_CHOICE) == 2
    assert sorted(calls[:2]) == ["batched", "looped"], calls  # its first batch is split


def test_no_batching_rule_decides_for_the_loop(monkeypatch):
    """A vmapped backward that fails (an op without a batching rule) makes the loop the choice
    at once, with the same matrix."""
    model, loader = _setup()
    lc = LayerCollection.from_model(model)

    def diag(backward):
        g = monte_carlo_function(lambda x, *_: model(x), "classif_logits", 6, seed=3)
        return TorchHooksJacobianBackend(model, g, backward=backward).get_covariance_diag(
            loader, lc)
    ref = diag("looped")
    monkeypatch.setattr(strategy, "_backward_batched", lambda *a: None)
    strategy._BACKWARD_CHOICE.clear()
    strategy._BACKWARD_SAMPLES.clear()
    torch.testing.assert_close(diag("auto"), ref, rtol=1e-12, atol=1e-14)
    assert list(strategy._BACKWARD_CHOICE.values()) == ["looped"]
    assert not strategy._BACKWARD_SAMPLES


def test_a_decisive_first_round_decides_at_once(monkeypatch):
    """A strategy many times slower per direction in the first split batch is not sampled
    again: the next batches all take the faster one."""
    import time
    model, loader = _setup(n=12)
    lc = LayerCollection.from_model(model)
    calls = []
    batched, looped = strategy._backward_batched, strategy._backward_looped

    def slow_batched(*a):
        calls.append("batched")
        t0 = time.process_time()  # (CPU seconds: what the timing on the CPU reads)
        while time.process_time() - t0 < 0.05:
            pass
        return batched(*a)
    monkeypatch.setattr(strategy, "_backward_batched", slow_batched)
    monkeypatch.setattr(strategy, "_backward_looped", lambda *a: calls.append("looped") or looped(*a))
    strategy._BACKWARD_CHOICE.clear()
    strategy._BACKWARD_SAMPLES.clear()
    g = monte_carlo_function(lambda x, *_: model(x), "classif_logits", 8, seed=3)
    TorchHooksJacobianBackend(model, g, backward="auto").get_covariance_diag(loader, lc)
    # three batches: the first split between the two, the two others looped only
    assert calls == ["batched", "looped", "looped", "looped"], calls
    assert set(strategy._BACKWARD_CHOICE.values()) == {"looped"}


def _record(monkeypatch):
    calls = []
    batched, looped = strategy._backward_batched, strategy._backward_looped
    monkeypatch.setattr(strategy, "_backward_batched",
                        lambda *a: calls.append("batched") or batched(*a))
    monkeypatch.setattr(strategy, "_backward_looped", lambda *a: calls.append("looped") or looped(*a))
    strategy._BACKWARD_CHOICE.clear()
    strategy._BACKWARD_SAMPLES.clear()
    return calls


@pytest.mark.parametrize("pool, expect", [(True, "looped"), (False, "batched")])
def test_graph_of_known_ops_decides_without_timing(monkeypatch, pool, expect):
    """A backward graph with max-pooling takes the loop, one made of matrix products,
    convolutions and elementwise maps only the vmapped backward, from the first batch (no
    split batch, no timing), with the matrix of either strategy."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(2, 3, 3), nn.ReLU()] + ([nn.MaxPool2d(2)] if pool else []) + \
        [nn.Flatten(), nn.Linear(3 * (2 * 2 if pool else 4 * 4), 5)]
    model = nn.Sequential(*layers).double()
    x = torch.randn(10, 2, 6, 6, dtype=torch.float64)
    loader = DataLoader(TensorDataset(x, torch.zeros(10, dtype=torch.long)), batch_size=4)
    lc = LayerCollection.from_model(model)

    def diag(backward):
        g = monte_carlo_function(lambda x, *_: model(x), "classif_logits", 6, seed=3)
        return TorchHooksJacobianBackend(model, g, backward=backward).get_covariance_diag(
            loader, lc)
    ref = diag("looped" if expect == "batched" else "batched")
    calls = _record(monkeypatch)
    torch.testing.assert_close(diag("auto"), ref, rtol=1e-12, atol=1e-14)
    assert calls == [expect] * 3, calls
    assert list(strategy._BACKWARD_CHOICE.values()) == [expect]
    assert not strategy._BACKWARD_SAMPLES


def test_unknown_node_leaves_the_choice_to_timing(monkeypatch):
    """A graph with a node the cost model does not know (here a sort) is timed: its first
    batch is split between the two strategies."""
    torch.manual_seed(0)

    class SortNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 5)

        def forward(self, x):
            return self.fc(x).sort(dim=1).values
    model = SortNet().double()
    x = torch.randn(8, 4, dtype=torch.float64)
    loader = DataLoader(TensorDataset(x, torch.zeros(8, dtype=torch.long)), batch_size=4)
    lc = LayerCollection.from_model(model)
    calls = _record(monkeypatch)
    g = monte_carlo_function(lambda x, *_: model(x), "classif_logits", 6, seed=3)
    TorchHooksJacobianBackend(model, g, backward="auto").get_covariance_diag(loader, lc)
    assert sorted(calls[:2]) == ["batched", "looped"], calls
