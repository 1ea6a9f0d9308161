"""Copies and files: a deep copy of a matrix works as the original does (implicit products,
EKFAC's diagonal refit), and every state dict (each representation, PVector, LayerCollection,
EWC, NaturalGradient) is plain data that ``torch.load(f)`` reads with its defaults
(``weights_only=True``) and that rebuilds the same object."""
import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as tF
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nngeometry import FIM, GramMatrix
from nngeometry.layercollection import LayerCollection
from nngeometry.object import (FMatDense, PFMapDense, PMatBlockDiag, PMatDense, PMatDiag,
                               PMatEKFAC, PMatEye, PMatImplicit, PMatKFAC, PMatLowRank,
                               PMatMixed, PMatQuasiDiag, PVector, random_pvector)
from nngeometry.object.pspace import PMatAbstract, PMatEKFACBlockDiag
from nngeometry.optim import NaturalGradient
from nngeometry.regularization import EWC
from nngeometry.serialization import from_state, to_state

from brute import fim_dense

DT = torch.float64


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    x, y = torch.randn(7, 3, dtype=DT), torch.randint(0, 3, (7,))
    return model, x, y


def _saved_and_loaded(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf)  # the defaults: weights_only=True


def _plain(state):
    """Only tensors, numbers, strings, None and containers: what weights_only accepts."""
    if isinstance(state, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in state.items())
    if isinstance(state, (list, tuple)):
        return all(_plain(v) for v in state)
    return state is None or isinstance(state, (torch.Tensor, bool, int, float, str))


# ---------------------------------------------------------------------- copies
@pytest.mark.parametrize("how", [copy.copy, copy.deepcopy], ids=["copy", "deepcopy"])
def test_copied_implicit_matrix_runs_its_products(how):
    model, x, y = _setup()
    F = FIM(model, (x, y), PMatImplicit)
    G = how(F)
    v = random_pvector(F.layer_collection, dtype=DT)
    ref = fim_dense(model, x) @ v.to_torch()
    assert torch.allclose(G.mv(v).to_torch(), ref, rtol=1e-10, atol=1e-13)
    assert G.generator is F.generator  # the model is shared, not copied


def test_deep_copied_ekfac_refits_its_diagonal_without_touching_the_original():
    model, x, y = _setup()
    E = FIM(model, (x, y), PMatEKFAC)
    before = E.get_diag().clone()
    G = copy.deepcopy(E)
    G.update_diag((x[:4], y[:4]))
    assert torch.equal(E.get_diag(), before)  # the copy's data are its own
    E2 = copy.deepcopy(E)
    E2.update_diag((x, y))
    ref = FIM(model, (x, y), PMatEKFAC)
    ref.update_diag((x, y))
    assert torch.allclose(E2.get_diag(), ref.get_diag(), rtol=1e-12)
    # a refit diagonal in an orthonormal eigenbasis keeps each layer's trace: that of the Fisher
    Fb = fim_dense(model, (x[:4]))
    lc = E.layer_collection
    for lid in lc.layer_ids():
        sl = lc.slice(lid)
        assert torch.allclose(G.to_torch()[sl, sl].trace(), Fb[sl, sl].trace(), rtol=1e-10)


# ---------------------------------------------------------------------- state dicts
def _representations(model, x, y):
    lc = LayerCollection.from_model(model)
    ids = lc.layer_ids()
    yield "PMatEye", PMatEye(lc, scaling=torch.tensor(2.5, dtype=DT))
    for rep in (PMatDense, PMatDiag, PMatBlockDiag, PMatKFAC, PMatEKFAC, PMatQuasiDiag,
                PMatEKFACBlockDiag, PMatLowRank):
        yield rep.__name__, FIM(model, (x, y), rep)
    yield "PMatMixed", FIM(model, (x, y), PMatMixed, layer_map={ids[0]: "kfac", ids[1]: "diag"},
                           sub_pmats={"kfac": PMatKFAC, "diag": PMatDiag})
    yield "PMatQuasiDiagInverse", FIM(model, (x, y), PMatQuasiDiag).inv(0.1)
    yield "PMatImplicit (tensor examples)", FIM(model, (x, y), PMatImplicit)
    yield "PMatEyePlusLowRank", FIM(model, (x, y), PMatLowRank) + 0.5 * PMatEye(lc)
    yield "PMatKFAC, solved (caches)", _solved(FIM(model, (x, y), PMatKFAC), lc)


def _solved(F, lc):
    F.solve(random_pvector(lc, dtype=DT), regul=0.1)
    return F


def test_every_representation_round_trips_through_a_plain_state_dict():
    model, x, y = _setup()
    lc = LayerCollection.from_model(model)
    v = random_pvector(lc, dtype=DT)
    names = []
    for name, F in _representations(model, x, y):
        state = F.state_dict()
        assert _plain(state), name
        G = type(F).from_state_dict(_saved_and_loaded(state))
        assert type(G) is type(F) and G.layer_collection == F.layer_collection, name
        if isinstance(F, PMatImplicit):
            G.generator = F.generator  # the model is never saved: attached again
        assert torch.equal(G.mv(v).to_torch(), F.mv(v).to_torch()), name
        # any representation loads through the base class too
        assert type(PMatAbstract.from_state_dict(state)) is type(F), name
        names.append(name)
    assert len(names) == 14
    # the saved Fisher is the brute-force one
    G = PMatDense.from_state_dict(_saved_and_loaded(FIM(model, (x, y), PMatDense).state_dict()))
    assert torch.allclose(G.to_torch(), fim_dense(model, x), rtol=1e-10, atol=1e-14)


def test_vectors_maps_and_collections_round_trip():
    model, x, y = _setup()
    lc = LayerCollection.from_model(model)
    v = PVector.from_model(model)  # parameters: saved detached
    w = PVector.from_state_dict(_saved_and_loaded(v.state_dict()))
    assert torch.equal(w.to_torch(), v.to_torch()) and not w.to_torch().requires_grad
    m = PFMapDense(lc, data=torch.randn(2, 3, lc.numel(), dtype=DT))
    m2 = PFMapDense.from_state_dict(_saved_and_loaded(m.state_dict()))
    assert torch.equal(m2.to_torch(), m.to_torch())
    K = GramMatrix(model, (x,))
    K2 = FMatDense.from_state_dict(_saved_and_loaded(K.state_dict()))
    assert torch.equal(K2.to_torch(), K.to_torch())
    lc2 = LayerCollection.from_state_dict(_saved_and_loaded(lc.state_dict()))
    assert lc2 == lc and lc2.numel() == lc.numel() and lc2.dtype == DT
    assert list(lc2.get_layerid_module_map(model)) == lc.layer_ids()


def test_ewc_state_dict_loads_with_the_defaults():
    model, x, y = _setup()
    ewc = EWC(model, lam=3.0)
    ewc.register_task(FIM(model, (x, y), PMatKFAC))
    ewc.register_task(FIM(model, (x[:3], y[:3]), PMatKFAC))
    with torch.no_grad():
        model[0].weight.add_(0.1)
    state = ewc.state_dict()
    assert _plain(state)
    other = EWC(model)
    other.load_state_dict(_saved_and_loaded(state))
    assert other.n_tasks == 2 and other.lam == 3.0
    assert torch.equal(other.penalty(), ewc.penalty()) and ewc.penalty() > 0
    # a state dict of an earlier release (the objects themselves) still loads
    legacy = {"lam": 3.0, "gamma": None, "layer_collection": ewc.layer_collection,
              "tasks": [(a, list(t)) for a, t in ewc.tasks]}
    third = EWC(model)
    third.load_state_dict(pickle.loads(pickle.dumps(legacy)))
    assert torch.equal(third.penalty(), ewc.penalty())


@pytest.mark.parametrize("rep, capture", [(PMatKFAC, True), (PMatEKFAC, True),
                                          (PMatEKFAC, False), (PMatDiag, False)],
                         ids=["KFAC", "EKFAC", "EKFAC-extra-pass", "Diag-extra-pass"])
def test_natural_gradient_resumes_from_a_plain_state_dict(rep, capture):
    """Saved mid-training and loaded into a new preconditioner (plain ``torch.load``): the
    following steps give the directions of the uninterrupted run."""
    runs = []
    for resume in (False, True):
        model, x, y = _setup()
        pre = NaturalGradient(model, rep, curvature="fisher", damping=0.1, update_freq=2,
                              inv_freq=3, ema_decay=0.5, capture=capture)
        dirs = []
        for t in range(6):
            if resume and t == 3:
                state = pre.state_dict()
                assert _plain(state)
                pre.close()
                pre = NaturalGradient(model, rep, curvature="fisher", damping=0.1,
                                      update_freq=2, inv_freq=3, ema_decay=0.5,
                                      capture=capture)
                pre.load_state_dict(_saved_and_loaded(state))
            xt = x * (1 + 0.1 * t)
            model.zero_grad()
            tF.cross_entropy(model(xt), y).backward()
            dirs.append(pre.step((xt, y)).get_flat_representation())
            with torch.no_grad():
                for p in model.parameters():
                    p.sub_(0.05 * p.grad)
        runs.append(torch.stack(dirs))
    assert torch.allclose(runs[0], runs[1], rtol=1e-10, atol=1e-13)


# ---------------------------------------------------------------------- refusals
def test_what_a_state_dict_cannot_hold_is_named():
    model, x, y = _setup()
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    F = FIM(model, loader, PMatImplicit)
    with pytest.raises(TypeError, match=r"DataLoader.*rebuilt from the data"):
        F.state_dict()
    with pytest.raises(TypeError, match="holds a PMatDiag, not a PMatKFAC"):
        PMatKFAC.from_state_dict(FIM(model, (x, y), PMatDiag).state_dict())
    forged = {"__nng_object__": "os:system", "__nng_state__": None}
    with pytest.raises(ValueError, match="not a class of nngeometry"):
        from_state(forged)
    # saving the object itself (not its state dict): torch's own refusal at load time
    buf = io.BytesIO()
    torch.save(FIM(model, (x, y), PMatDiag), buf)
    buf.seek(0)
    with pytest.raises(pickle.UnpicklingError, match="Unsupported global"):
        torch.load(buf)
    assert from_state(to_state({"a": (1, 2.0), "b": [None, "s"]})) == {"a": (1, 2.0),
                                                                       "b": [None, "s"]}
