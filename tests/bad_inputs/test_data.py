"""Bad data / batches / outputs / entry-point arguments / Monte-Carlo memory / random
models: each case against a brute-force float64 reference or against its error message.

To add a case: a test function per input; compare with ``brute.fim_dense`` /
``brute.per_example_jacobian`` or ``pytest.raises(..., match=<the fix the message names>)``."""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset

from brute import fim_dense, per_example_jacobian

import nngeometry.backend.strategy as strategy
from nngeometry import FIM, FIM_MonteCarlo, GramMatrix, Hessian, Jacobian
from nngeometry.backend import TorchHooksJacobianBackend
from nngeometry.layercollection import LayerCollection
from nngeometry.object import (PMatDense, PMatDiag, PMatEye, PMatImplicit,
                               PMatKFAC)

DT = torch.float64


def mlp(seed=0, dropout=None):
    torch.manual_seed(seed)
    layers = [nn.Linear(4, 5), nn.Tanh()]
    if dropout is not None:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(5, 3))
    return nn.Sequential(*layers).to(DT)


def data(n=9, seed=1, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def rel(a, b):
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------ 7. lists of batches
@pytest.mark.parametrize("kind", ["tuples", "lists", "input_tuples"])
def test_list_of_batches_is_iterated_like_a_loader(kind):
    model = mlp()
    x, y = data(9)
    parts = [(x[:4], y[:4]), (x[4:8], y[4:8]), (x[8:], y[8:])]  # uneven last batch
    if kind == "lists":
        parts = [list(p) for p in parts]
    elif kind == "input_tuples":
        parts = [(p[0],) for p in parts]
    F = FIM(model, parts, PMatDense)
    assert rel(F.to_torch(), fim_dense(model, x)) < 1e-10  # upstream used only parts[0]: 0.52


def test_list_of_tensors_that_may_be_several_batches_is_refused():
    model = mlp()
    x, _ = data(8)
    for examples in ([x[:4], x[4:]], [x[:4], x[4:7]], [x, x]):
        with pytest.raises(ValueError, match=r"cannot tell.*tuple \(inputs, targets\).*list of "
                                             r"tuples"):
            FIM(model, examples, PMatDense)


def test_list_inputs_targets_is_one_minibatch():
    # what `next(iter(loader))` gives: [inputs, targets] of different dtypes
    model = mlp()
    x, y = data(8)
    F = FIM(model, [x, y], PMatDense)
    assert rel(F.to_torch(), fim_dense(model, x)) < 1e-10
    # a single-element list is the same under both readings
    assert rel(FIM(model, [x], PMatDense).to_torch(), fim_dense(model, x)) < 1e-10


@pytest.mark.parametrize("examples", [(), [], [()], DataLoader([()], batch_size=None)],
                         ids=["tuple", "list", "list_of_empty", "loader_of_empty"])
def test_empty_examples_are_refused(examples):
    with pytest.raises(ValueError, match="empty"):
        FIM(mlp(), examples, PMatDense)


# ------------------------------------------------------------------ 7. PMatEye, keywords, cov.
def test_pmateye_is_not_built_from_data():
    model = mlp()
    x, y = data()
    for call in (lambda: FIM(model, (x, y), PMatEye),
                 lambda: FIM_MonteCarlo(model, (x, y), PMatEye),
                 lambda: Hessian(model, (x, y), PMatEye)):
        with pytest.raises(ValueError, match=r"PMatEye is the fixed matrix scaling·I.*"
                                             r"PMatEye\(layer_collection, scaling=s\)"):
            call()
    # with an explicit scaling the caller asks for that fixed matrix: accepted
    E = FIM(model, (x, y), PMatEye, scaling=torch.tensor(2.0, dtype=DT))
    assert torch.equal(E.get_diag(), torch.full((E.size(0),), 2.0, dtype=DT))


def test_unknown_build_keywords_are_refused():
    model = mlp()
    x, y = data()
    with pytest.raises(TypeError, match=r"PMatDense does not use: regul \(regul is an argument "
                                        r"of solve.*accepts at build time: none"):
        FIM(model, (x, y), PMatDense, regul=1e-3)
    with pytest.raises(TypeError, match=r"PMatKFAC does not use: foo.*kfac_approx"):
        FIM_MonteCarlo(model, (x, y), PMatKFAC, foo=1)
    with pytest.raises(TypeError, match="PMatDiag does not use: regul"):
        Hessian(model, (x, y), PMatDiag, regul=1.0)
    # accepted keywords still pass, and n_output (older code) is still dropped
    FIM(model, (x, y), PMatKFAC, kfac_approx="reduce", n_output=3)
    FIM(model, (x, y), PMatImplicit, rows_per_pass=2)


@pytest.mark.parametrize("covariance", [-1, 0, 0.0, float("inf"), float("nan")])
def test_covariance_must_be_positive_and_finite(covariance):
    x, y = data()
    with pytest.raises(ValueError, match="covariance must be a finite positive number"):
        FIM_MonteCarlo(mlp(), (x, y), PMatDense, variant="regression", covariance=covariance)


# ------------------------------------------------------------------ 9. Monte-Carlo memory
class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op creates (bytes) while active."""

    def __init__(self):
        super().__init__()
        self.nbytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(o, torch.Tensor):
                self.nbytes = max(self.nbytes, o.numel() * o.element_size())
        return out


@pytest.mark.parametrize("variant", ["classif_logits", "regression"])
def test_monte_carlo_memory_is_linear_in_trials(variant):
    # 53 parameters, float32; one backward of all 3000 trials at once held (3000, 16, 3000)
    # one-hot cotangents: 576 MB per tensor (2.2 GiB in all for 2000 trials and 64 examples)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x = torch.randn(16, 4)
    trials = 3000
    with LargestTensor() as tracker:
        F = FIM_MonteCarlo(model, (x,), PMatDiag, variant=variant, trials=trials)
    assert torch.isfinite(F.get_diag()).all()
    quadratic = trials * 16 * trials * 4
    # chunks of K trials: (K, n, K) cotangents within the direction budget, (K, n, K, C) for
    # the Gaussian's C outputs; nothing grows as trials²
    assert tracker.nbytes <= 2 * strategy.DIRECTION_CHUNK_BYTES < quadratic / 15


@pytest.mark.parametrize("variant", ["classif_logits", "classif_logsoftmax", "regression",
                                     "segmentation_logits"])
def test_monte_carlo_chunks_of_trials_give_the_same_matrix(variant, monkeypatch):
    # the same draws (same seed) through one backward of all trials, or one trial per chunk
    torch.manual_seed(0)
    if variant == "segmentation_logits":
        model = nn.Sequential(nn.Conv2d(2, 3, 1)).to(DT)
        x = torch.randn(3, 2, 2, 2, dtype=DT)
    else:
        model = mlp()
        if variant == "classif_logsoftmax":
            model.append(nn.LogSoftmax(dim=1))
        x = data(5)[0]
    torch.manual_seed(5)
    ref = FIM_MonteCarlo(model, (x,), PMatDense, variant=variant, trials=7).to_torch()
    monkeypatch.setattr(strategy, "DIRECTION_CHUNK_BYTES", 1)
    gen_budget = 1  # every chunk is one direction

    orig = TorchHooksJacobianBackend.__init__

    def small(self, *a, **k):
        orig(self, *a, **k)
        self.max_chunk_bytes = gen_budget
    monkeypatch.setattr(TorchHooksJacobianBackend, "__init__", small)
    torch.manual_seed(5)
    chunked = FIM_MonteCarlo(model, (x,), PMatDense, variant=variant, trials=7).to_torch()
    assert rel(chunked, ref) < 1e-12


@pytest.mark.parametrize("variant,covariance", [("classif_logits", 1.0), ("regression", 0.25)])
def test_monte_carlo_equals_the_closed_form_in_expectation(variant, covariance):
    model = mlp()
    x, _ = data(4)
    torch.manual_seed(0)
    F = FIM_MonteCarlo(model, (x,), PMatDense, variant=variant, trials=20000,
                       covariance=covariance).to_torch()
    ref = fim_dense(model, x, variant=variant) / covariance
    assert rel(F, ref) < 0.05  # about 1/sqrt(trials) relative noise


# ------------------------------------------------------------------ 10. random models
def test_dropout_in_training_mode_is_refused_by_every_entry_point():
    model = mlp(dropout=0.3)
    x, y = data()
    lc = LayerCollection.from_model(model)
    v = torch.ones(lc.numel(), dtype=DT)
    calls = [lambda **k: FIM(model, (x, y), PMatDense, **k),
             lambda **k: FIM_MonteCarlo(model, (x, y), PMatDiag, **k),
             lambda **k: Jacobian(model, (x, y), **k),
             lambda **k: GramMatrix(model, (x, y), **k),
             lambda **k: TorchHooksJacobianBackend(model, **k).implicit_mv(v, (x, y), lc),
             lambda **k: Hessian(model, (x, y), PMatDiag, **k)]
    for i, call in enumerate(calls):
        with pytest.raises(RuntimeError, match=r"module '2' \(Dropout, p=0.3\) is in training "
                                               r"mode.*model\.eval\(\).*check_deterministic=False"):
            call()
        if i < len(calls) - 1:
            call(check_deterministic=False)  # the opt-out
    # (the Hessian's vmapped HVPs refuse random ops themselves, opt-out or not)
    assert model.training
    model.eval()
    assert rel(FIM(model, (x, y), PMatDense).to_torch(), fim_dense(model, x)) < 1e-10


class Noisy(nn.Module):
    """Random without a dropout module: Gaussian noise on the activations in training mode."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        if self.training:
            h = h + 0.5 * torch.randn_like(h)
        return self.fc2(h)


def test_determinism_probe_catches_other_random_models():
    torch.manual_seed(0)
    model = Noisy().to(DT)
    x, y = data()
    # without the check two identical calls differ (by far more than round-off)
    a = FIM(model, (x, y), PMatDense, check_deterministic=False).to_torch()
    b = FIM(model, (x, y), PMatDense, check_deterministic=False).to_torch()
    assert rel(a, b) > 1e-3
    for call in (lambda: FIM(model, (x, y), PMatDense),
                 lambda: FIM_MonteCarlo(model, (x, y), PMatDense, trials=3),
                 lambda: Jacobian(model, (x, y))):
        with pytest.raises(RuntimeError, match=r"not deterministic.*model\.eval\(\).*"
                                               r"check_deterministic=False"):
            call()
    model.eval()
    assert rel(FIM(model, (x, y), PMatDense).to_torch(), fim_dense(model, x)) < 1e-10


def test_determinism_probe_leaves_the_rng_alone():
    # closed form: no RNG use at all; Monte-Carlo: the same draws as without the probe
    model = mlp()
    x, y = data()
    state = torch.get_rng_state()
    FIM(model, (x, y), PMatDense)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(3)
    a = FIM_MonteCarlo(model, (x, y), PMatDense, trials=2).to_torch()
    after_a = torch.get_rng_state()
    torch.manual_seed(3)
    b = FIM_MonteCarlo(model, (x, y), PMatDense, trials=2, check_deterministic=False).to_torch()
    assert torch.equal(a, b) and torch.equal(torch.get_rng_state(), after_a)


# ------------------------------------------------------------------ obscure errors made clear
class TupleOut(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.body = mlp()

    def forward(self, x):
        out = self.body(x)
        return (out, x.sum(1)) if self.kind == "tuple" else {"scores": out, "aux": x.sum(1)}


@pytest.mark.parametrize("kind,pattern", [
    ("tuple", r"returns a tuple \(Tensor\(9, 3\), Tensor\(9,\)\), not a tensor.*function=lambda "
              r"x, \*rest: model\(x\)\[0\]"),
    ("dict", r"returns a dict \{'scores': Tensor\(9, 3\).*function=lambda x, \*rest: "
             r"model\(x\)\['scores'\]")])
def test_tuple_or_dict_outputs_name_function(kind, pattern):
    model = TupleOut(kind)
    x, y = data()
    for call in (lambda **k: FIM(model, (x, y), PMatDense, **k),
                 lambda **k: FIM_MonteCarlo(model, (x, y), PMatDense, **k),
                 lambda **k: Jacobian(model, (x, y), **k),
                 lambda **k: Hessian(model, (x, y), PMatDense, **k)):
        with pytest.raises(TypeError, match=pattern):
            call()
    pick = (lambda x, *rest: model(x)[0]) if kind == "tuple" else \
        (lambda x, *rest: model(x)["scores"])
    F = FIM(model, (x, y), PMatDense, function=pick)
    assert rel(F.to_torch(), fim_dense(model.body, x)) < 1e-10


def test_inference_mode_around_a_build_gives_the_same_numbers():
    model = mlp()
    x, y = data()
    ref = fim_dense(model, x)
    J_ref = per_example_jacobian(model, x)  # (n, K, P)
    with torch.inference_mode():
        x_inf = x.clone()  # an inference tensor
        F = FIM(model, (x_inf, y), PMatDense)
        J = Jacobian(model, (x_inf, y))
        assert torch.is_inference_mode_enabled()
    assert rel(F.to_torch(), ref) < 1e-10
    assert rel(J.to_torch(), J_ref.permute(1, 0, 2)) < 1e-10
    assert rel(FIM(model, (x_inf, y), PMatDense).to_torch(), ref) < 1e-10


@pytest.mark.parametrize("entry", ["FIM", "Jacobian"])
def test_batch_without_its_batch_dimension(entry):
    model = mlp()
    x, _ = data()
    call = (lambda: FIM(model, (x[0],), PMatDense)) if entry == "FIM" else \
        (lambda: Jacobian(model, (x[0],)))
    with pytest.raises(ValueError, match=r"outputs have shape \(3,\) for inputs of shape \(4,\).*"
                                         r"x\.unsqueeze\(0\)"):
        call()
    F = FIM(model, (x[0].unsqueeze(0),), PMatDense)
    assert rel(F.to_torch(), fim_dense(model, x[:1])) < 1e-10


def test_float_inputs_are_cast_to_the_model_dtype_integer_inputs_never():
    model = mlp()
    x, y = data()
    ref = fim_dense(model, x)
    F = FIM(model, DataLoader(TensorDataset(x.float(), y), batch_size=4), PMatDense)
    assert F.to_torch().dtype == DT
    assert rel(F.to_torch(), ref) < 1e-6  # x rounded to float32, computed in float64
    assert rel(F.to_torch(), fim_dense(model, x.float().to(DT))) < 1e-10
    # token ids stay integers
    torch.manual_seed(0)
    emb = nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 3)).to(DT)
    ids = torch.randint(0, 7, (6,))
    J = Jacobian(emb, (ids,))
    assert J.to_torch().dtype == DT
    # and the float32 model gets float32 from float64 data
    m32 = mlp().float()
    assert FIM(m32, (x, y), PMatDense).to_torch().dtype == torch.float32
