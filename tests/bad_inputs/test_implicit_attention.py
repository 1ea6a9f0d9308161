"""Issue 11, items 5, 8, 11 (generator side) and the same model in two threads: PMatImplicit
behaves like the other representations (inference mode, gradients w.r.t. v, unpickling,
BatchNorm), attention statistics are recorded without touching global state (two threads, two
models), one model is not built on by two threads at once, and n·P-sized results are refused
before they are allocated. References: brute-force float64 Jacobians (tests/brute.py)."""
import os
import pickle
import sys
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

# tests/ helpers (brute.py) by plain name, also when this file is run alone (the prepend import
# mode puts only this folder on sys.path)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from brute import fim_dense, per_example_jacobian
from nngeometry.backend import TorchHooksJacobianBackend
from nngeometry.backend.batches import default_function
from nngeometry.layercollection import LayerCollection
from nngeometry.metrics import FIM
from nngeometry.object import PMatDense, PMatImplicit, PVector
from nngeometry.variants import closed_form_function

DT = torch.float64


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)


@pytest.fixture(scope="module")
def implicit():
    model = _mlp()
    torch.manual_seed(1)
    x = torch.randn(9, 4, dtype=DT)
    lc = LayerCollection.from_model(model)
    M = FIM(model, (x, None), PMatImplicit, variant="classif_logits")
    D = fim_dense(model, x, "classif_logits", lc)
    return model, x, lc, M, D


def _vec(lc, seed=5, requires_grad=False):
    torch.manual_seed(seed)
    f = torch.randn(lc.numel(), dtype=DT, requires_grad=requires_grad)
    return f, PVector(lc, vector_repr=f)


# ---------------------------------------------------------------------- item 5: PMatImplicit
def test_inference_mode_gives_the_exact_products(implicit):
    model, x, lc, M, D = implicit
    f, v = _vec(lc)
    with torch.inference_mode():
        mv = M.mv(v).get_flat_representation()
        q = M.vTMv(v)
        y = M.solve(v, regul=0.5, tol=1e-12).get_flat_representation()
        # data made inside inference mode (inference tensors) too
        M_inf = FIM(model, (x.clone(), None), PMatImplicit, variant="classif_logits")
        mv_inf = M_inf.mv(PVector(lc, vector_repr=f.clone())).get_flat_representation()
    torch.testing.assert_close(mv, D @ f, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(q, f @ D @ f, rtol=1e-10, atol=1e-12)
    I = torch.eye(len(f), dtype=DT)
    torch.testing.assert_close(y, torch.linalg.solve(D + 0.5 * I, f), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(mv_inf, D @ f, rtol=1e-10, atol=1e-12)
    assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()


def test_inference_mode_parameters_refused():
    with torch.inference_mode():
        model = _mlp()
        x = torch.randn(3, 4, dtype=DT)
    M = FIM(model, (x, None), PMatImplicit, variant="classif_logits")
    _, v = _vec(M.layer_collection)
    with pytest.raises(RuntimeError, match="inference tensor .*outside inference mode"):
        M.mv(v)


def test_mv_and_vTMv_differentiable_wrt_v(implicit):
    model, x, lc, M, D = implicit
    f, v = _vec(lc, requires_grad=True)
    # the EWC-style penalty v·(M v): gradient (M + Mᵀ) v = 2 M v (half of it before)
    pen = (f * M.mv(v).get_flat_representation()).sum()
    (g,) = torch.autograd.grad(pen, f)
    torch.testing.assert_close(g, 2 * D @ f.detach(), rtol=1e-10, atol=1e-12)
    (g2,) = torch.autograd.grad(M.vTMv(v), f)
    torch.testing.assert_close(g2, 2 * D @ f.detach(), rtol=1e-10, atol=1e-12)
    # scaled matrices and second order: the Hessian-vector product of vᵀ(3M)v is 6 M u
    (g3,) = torch.autograd.grad((3 * M).vTMv(v), f, create_graph=True)
    u = torch.randn_like(f)
    (h,) = torch.autograd.grad(g3 @ u, f)
    torch.testing.assert_close(h, 6 * D @ u, rtol=1e-10, atol=1e-12)
    # a vector of a dict of layers gets its gradients too
    w = {lid: tuple(t.detach().clone().requires_grad_(True) for t in parts)
         for lid, parts in PVector(lc, vector_repr=f.detach()).get_dict_representation().items()}
    q = M.vTMv(PVector(lc, dict_repr=w))
    leaves = [t for parts in w.values() for t in parts]
    grads = torch.autograd.grad(q, leaves)
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in grads]), 2 * D @ f.detach(),
                               rtol=1e-10, atol=1e-12)


def test_unpickled_message_names_the_function(implicit):
    model, x, lc, M, D = implicit
    M2 = pickle.loads(pickle.dumps(M))
    _, v = _vec(lc)
    with pytest.raises(RuntimeError, match=r"built with the function nngeometry\.variants\."
                                           r"closed_form_function.*SAME function"):
        M2.mv(v)
    with pytest.raises(RuntimeError, match="nngeometry.variants.closed_form_function"):
        M2.vTMv(v)
    # following the message gives the matrix back exactly
    M2.generator = TorchHooksJacobianBackend(
        model, closed_form_function(lambda *b: model(b[0]), "classif_logits"))
    f = v.get_flat_representation()
    torch.testing.assert_close(M2.mv(v).get_flat_representation(), D @ f, rtol=1e-10, atol=1e-12)


def test_batchnorm_in_training_mode_refused_by_the_implicit_path():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).to(DT).train()
    x = torch.randn(6, 4, dtype=DT)
    M = FIM(model, (x, None), PMatImplicit, variant="classif_logits")
    _, v = _vec(M.layer_collection)
    state = {k: t.clone() for k, t in model.state_dict().items()}
    for call in (lambda: M.mv(v), lambda: M.vTMv(v), lambda: M.solve(v, regul=1.0)):
        with pytest.raises(RuntimeError, match=r"BatchNorm layer '1'.*training mode.*model\.eval"):
            call()
    assert all(torch.equal(t, model.state_dict()[k]) for k, t in state.items())
    model.eval()
    D = fim_dense(model, x, "classif_logits", M.layer_collection)
    f = v.get_flat_representation()
    torch.testing.assert_close(M.mv(v).get_flat_representation(), D @ f, rtol=1e-10, atol=1e-12)
