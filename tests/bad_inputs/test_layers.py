"""Bad inputs around layers: parameters used outside their module's forward, tied
weights, arguments of the generic (torch.func) layer type, modules whose batching rules fail
under nested vmap, torch.compile'd models. Each case is checked against a brute-force float64
reference or against its error message."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev

from brute import fim_dense, multinomial_cov, param_names

from nngeometry import FIM, GramMatrix, Jacobian
from nngeometry.backend.passes import ParameterUseError
from nngeometry.layercollection import LayerCollection
from nngeometry.object import (PMatBlockDiag, PMatDense, PMatDiag, PMatImplicit,
                               PMatKFAC, PMatLowRank, PMatQuasiDiag, PVector)

DT = torch.float64


def rel(a, b):
    return float((a - b).norm() / b.norm())


def dense_of_implicit(M):
    """The matrix of a PMatImplicit, column by column through its (exact) products."""
    lc = M.layer_collection
    eye = torch.eye(lc.numel(), dtype=DT)
    return torch.stack([M.mv(PVector(lc, vector_repr=eye[j])).to_torch() for j in range(len(eye))], 1)


def fim_loop(model, x, layer_collection=None):
    """The closed-form Fisher of ``classif_logits`` from per-example Jacobians taken one example
    at a time (no vmap: the reference for modules whose batching rules fail)."""
    lc = layer_collection or LayerCollection.from_model(model)
    names = param_names(model, lc)
    all_params = dict(model.named_parameters())
    params = {k: all_params[k].detach() for k in names}
    rows = []
    for i in range(x.shape[0]):
        J = jacrev(lambda p: functional_call(model, {**all_params, **p}, (x[i:i + 1],))
                   .reshape(-1))(params)
        rows.append(torch.cat([J[k].reshape(J[k].shape[0], -1) for k in names], 1))
    J = torch.stack(rows)
    with torch.no_grad():
        S = multinomial_cov(model(x).reshape(x.shape[0], -1))
    return torch.einsum("nkp,nkl,nlq->pq", J, S, J) / x.shape[0]


# ---------------------------------------------------------------- 1. parameter used outside its module
class FunctionalHead(nn.Module):
    """A language model whose head reuses the embedding's weight through F.linear."""

    def __init__(self, V=7, d=5):
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.mid = nn.Linear(d, d)

    def forward(self, x):
        return F.linear(torch.tanh(self.mid(self.emb(x))), self.emb.weight)


def _lm():
    torch.manual_seed(0)
    return FunctionalHead().to(DT), torch.randint(0, 7, (6,))


@pytest.mark.parametrize("build", [
    lambda m, x: FIM(m, (x,), PMatDense), lambda m, x: FIM(m, (x,), PMatDiag),
    lambda m, x: FIM(m, (x,), PMatBlockDiag), lambda m, x: FIM(m, (x,), PMatQuasiDiag),
    lambda m, x: FIM(m, (x,), PMatLowRank), lambda m, x: FIM(m, (x,), PMatKFAC),
    lambda m, x: Jacobian(m, (x,)), lambda m, x: GramMatrix(m, (x,))],
    ids=["dense", "diag", "blockdiag", "quasidiag", "lowrank", "kfac", "jacobian", "gram"])
def test_parameter_used_outside_its_module_is_refused(build):
    model, x = _lm()
    flags = [p.requires_grad for p in model.parameters()]
    rng = torch.get_rng_state()
    with pytest.raises(ParameterUseError, match=r"'emb'.*outside its module's forward.*PMatImplicit"):
        build(model, x)
    # nothing left behind by the failed call
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert torch.equal(torch.get_rng_state(), rng)


def test_parameter_used_outside_its_module_implicit_is_exact():
    """The fix the error gives: PMatImplicit's products are exact."""
    model, x = _lm()
    M = FIM(model, (x,), PMatImplicit)
    assert rel(dense_of_implicit(M), fim_dense(model, x)) < 1e-10


def test_parameter_use_check_leaves_exact_models_alone():
    """An ordinary model passes the check and gives the brute-force matrix (the check must not
    fire on rounding: float32)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.randn(16, 6)
    F_ = FIM(model, (x,), PMatDense).to_torch().to(DT)
    assert rel(F_, fim_dense(model.to(DT), x.to(DT))) < 1e-5


def test_parameter_use_check_runs_once_per_model_function_and_collection(monkeypatch):
    """Entry points build a new generator per call: the check is remembered per model, function
    and collection (it costs a backward pass), and runs again for a new function or parameter."""
    import nngeometry.backend.passes as passes
    runs = []
    real = passes.check_parameter_uses
    monkeypatch.setattr(passes, "check_parameter_uses", lambda *a: runs.append(1) or real(*a))
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).to(DT)
    x = torch.randn(16, 6, dtype=DT)
    FIM(model, (x,), PMatDiag)
    FIM(model, (x,), PMatDense)
    assert len(runs) == 1
    FIM(model, (x,), PMatDiag, function=lambda inp: model(inp) * 2)
    assert len(runs) == 2
    model[0].weight = nn.Parameter(model[0].weight.detach().clone())
    FIM(model, (x,), PMatDiag)
    assert len(runs) == 3
    # a model whose check failed is checked again (and refused again)
    lm, tokens = _lm()
    for _ in range(2):
        with pytest.raises(ParameterUseError):
            FIM(lm, (tokens,), PMatDiag)
    assert len(runs) == 5


# ---------------------------------------------------------------- 2. tied weights
class Tied(nn.Module):
    def __init__(self, V=7, d=5):
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.mid = nn.Linear(d, d)
        self.head = nn.Linear(d, V)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(torch.tanh(self.mid(self.emb(x))))


def test_tied_weights_error_gives_advice_that_is_exact():
    torch.manual_seed(0)
    model, x = Tied().to(DT), torch.randint(0, 7, (6,))
    with pytest.raises(ValueError, match=r"tied weights.*PMatImplicit.*add_layer_from_model"):
        LayerCollection.from_model(model, tied_weights="refuse")
    # following the message: the collection without the head, and PMatImplicit
    lc = LayerCollection()
    lc.add_layer_from_model(model, model.emb)
    lc.add_layer_from_model(model, model.mid)
    M = FIM(model, (x,), PMatImplicit, layer_collection=lc)
    assert rel(dense_of_implicit(M), fim_dense(model, x, layer_collection=lc)) < 1e-10
    # a hooks-based representation on that collection would miss the head's use: refused
    with pytest.raises(ParameterUseError, match="'emb'"):
        FIM(model, (x,), PMatDense, layer_collection=lc)


# ---------------------------------------------------------------- 6. generic layer's arguments
class TableBlock(nn.Module):
    """A user layer (generic type) taking an unbatched table of T rows as a positional argument."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d))

    def forward(self, x, table):
        return torch.tanh(x * self.w) @ table.t()


class TableModel(nn.Module):
    def __init__(self, T, d, C=3):
        super().__init__()
        self.blk = TableBlock(d)
        self.register_buffer("table", torch.randn(T, d))
        self.head = nn.Linear(T, C)

    def forward(self, x):
        return self.head(self.blk(x, self.table))


@pytest.mark.parametrize("n", [6, 4])
def test_generic_unbatched_table_with_batch_size_rows(n):
    """T == n (the table looks batched by its shape) and T != n give the brute-force Fisher."""
    torch.manual_seed(0)
    model, x = TableModel(6, 4).to(DT), torch.randn(n, 4, dtype=DT)
    assert rel(FIM(model, (x,), PMatDense).to_torch(), fim_dense(model, x)) < 1e-10


class Coupled(nn.Module):
    """Couples the examples of its input (not per-example): no split of its arguments works."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d))

    def forward(self, x, t):
        return (x - x.mean(0)) * self.w + t


class CoupledModel(nn.Module):
    def __init__(self, d=4):
        super().__init__()
        self.blk = Coupled(d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        return self.head(self.blk(x, torch.ones_like(x)))


def test_generic_ambiguous_arguments_refused():
    torch.manual_seed(0)
    model, x = CoupledModel().to(DT), torch.randn(5, 4, dtype=DT)
    with pytest.raises(ValueError, match=r"cannot tell which arguments of Coupled.*buffer"):
        FIM(model, (x,), PMatDense)


# ---------------------------------------------------------------- PReLU, LSTMCell on the generic path
class CellModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.cell = nn.LSTMCell(4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h0 = torch.full((x.shape[0], 5), 0.1, dtype=x.dtype)
        h, c = self.cell(x, (h0, -2 * h0))
        return self.head(h)


@pytest.mark.parametrize("make", [
    lambda: nn.Sequential(nn.Linear(4, 5), nn.PReLU(5), nn.Linear(5, 3)),
    lambda: nn.Sequential(nn.Linear(4, 5), nn.PReLU(), nn.Linear(5, 3)),
    CellModel], ids=["prelu_channels", "prelu_shared", "lstmcell"])
def test_generic_modules_without_nested_vmap_rules_exact(make):
    torch.manual_seed(0)
    model, x = make().to(DT), torch.randn(6, 4, dtype=DT)
    ref = fim_loop(model, x)
    assert rel(FIM(model, (x,), PMatDense).to_torch(), ref) < 1e-10
    assert rel(FIM(model, (x,), PMatDiag).get_diag(), torch.diagonal(ref)) < 1e-10


# ---------------------------------------------------------------- torch.compile'd models
def test_compiled_model_unwrapped():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    x = torch.randn(8, 4, dtype=DT)
    try:
        compiled = torch.compile(model, backend="eager")
        compiled(x)  # compiled code that ran before the hooks existed skipped them
    except Exception as e:  # noqa: BLE001 (compile unavailable on this platform)
        pytest.skip(f"torch.compile unavailable: {e}")
    forward = vars(compiled)["forward"]
    lc = LayerCollection.from_model(compiled)
    assert lc.layer_ids() == ["0", "2"] and lc == LayerCollection.from_model(model)
    assert rel(FIM(compiled, (x,), PMatDense).to_torch(), fim_dense(model, x)) < 1e-10
    assert rel(dense_of_implicit(FIM(compiled, (x,), PMatImplicit)), fim_dense(model, x)) < 1e-10
    # the compiled model is as it was
    assert vars(compiled)["forward"] is forward
    assert all(not m._forward_hooks for m in compiled.modules())


def test_generic_layer_spec_pickles_after_use():
    """The generic layer's cached decisions (module classes, maybe local) are not pickled."""
    import pickle

    class LocalBlock(TableBlock):  # a class pickle cannot find
        pass

    torch.manual_seed(0)
    model, x = TableModel(6, 4).to(DT), torch.randn(6, 4, dtype=DT)
    model.blk = LocalBlock(4).to(DT)
    F_ = FIM(model, (x,), PMatDense)
    F2 = pickle.loads(pickle.dumps(F_))
    assert torch.equal(F2.to_torch(), F_.to_torch())
