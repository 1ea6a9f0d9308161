"""Names and behaviours of upstream nngeometry that user programs rely on: the names its modules
expose by importing them, the keywords of its implicit solve, ``pinverse``, ``sub_pmats``, the
deprecated ``inverse()`` / ``frobenius_norm()``, the ``torch_func_jacobian`` module and the union
semantics of ``LayerCollection.merge`` (tested in test_layercollection.py)."""
import importlib
import warnings

import pytest
import torch
from torch import nn

from brute import fim_dense, per_example_jacobian
from nngeometry.backend import TorchHooksJacobianBackend
from nngeometry.layercollection import LayerCollection, LinearLayer
from nngeometry.object.fspace import FMatDense
from nngeometry.object.map import PFMapDense
from nngeometry.object import PMatDense, PMatDiag, PMatEye, PMatImplicit, PMatMixed, PVector

DT = torch.float64

# every name that a module of upstream exposes through its own imports, with where it comes from
REEXPORTED = {
    "nngeometry.object.pspace": {
        "PVector": "nngeometry.object.vector", "PFMap": "nngeometry.object.map",
        "PFMapDense": "nngeometry.object.map", "DummyGenerator": "nngeometry.backend.dummy",
        "kronecker": "nngeometry.maths", "ABC": "abc", "abstractmethod": "abc",
        "OrderedDict": "collections"},
    "nngeometry.object.fspace": {"PVector": "nngeometry.object.vector", "FVector":
                                 "nngeometry.object.vector", "ABC": "abc"},
    "nngeometry.object.map": {"PVector": "nngeometry.object.vector",
                              "FVector": "nngeometry.object.vector", "ABC": "abc",
                              "abstractmethod": "abc"},
    "nngeometry.object.vector": {"LayerCollection": "nngeometry.layercollection"},
    "nngeometry.utils": {"PVector": "nngeometry.object.vector"},
    "nngeometry.gram": {"FMatDense": "nngeometry.object.fspace",
                        "TorchHooksJacobianBackend": "nngeometry.backend"},
    "nngeometry.hessian": {"TorchFuncHessianBackend": "nngeometry.backend"},
    "nngeometry.jacobian": {"PFMapDense": "nngeometry.object.map",
                            "TorchHooksJacobianBackend": "nngeometry.backend"},
    "nngeometry.metrics": {"LayerCollection": "nngeometry.layercollection",
                           "TorchHooksJacobianBackend": "nngeometry.backend",
                           "partial": "functools"},
    "nngeometry.backend.torch_func_hessian": {"LayerCollection": "nngeometry.layercollection"},
    "nngeometry.backend.torch_hooks.torch_hooks": {
        "LayerCollection": "nngeometry.layercollection", "PVector": "nngeometry.object.vector",
        "FVector": "nngeometry.object.vector"},
    "nngeometry.layercollection": {"ABC": "abc", "OrderedDict": "collections",
                                   "reduce": "functools"},
    "nngeometry.layers": {"Conv2d": "torch.nn", "Linear": "torch.nn", "Module": "torch.nn",
                          "Parameter": "torch.nn", "Tensor": "torch"},
}


@pytest.mark.parametrize("module", sorted(REEXPORTED))
def test_reexported_names_import_from_upstreams_module(module):
    mod = importlib.import_module(module)
    for name, origin in REEXPORTED[module].items():
        assert getattr(mod, name) is getattr(importlib.import_module(origin), name), name
    exec(f"from {module} import {', '.join(REEXPORTED[module])}", {})


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)


def _setup():
    model = _mlp()
    x = torch.randn(6, 3, dtype=DT)
    lc = LayerCollection.from_model(model)
    dense = fim_dense(model, x, variant="regression")  # (1/n) Σ JᵀJ of model(x)
    return model, x, lc, dense


def test_implicit_solve_x0_rtol_atol():
    model, x, lc, dense = _setup()
    gen = TorchHooksJacobianBackend(model)
    M = PMatImplicit(lc, gen, examples=(x,))
    P, lam = lc.numel(), 1e-2
    b = torch.randn(P, dtype=DT)
    exact = torch.linalg.solve(dense + lam * torch.eye(P, dtype=DT), b)
    v = PVector(lc, vector_repr=b)
    # rtol (cg's name for tol) is honoured: a loose one stops early, a tight one is exact
    loose = M.solve(v, lam, rtol=1e-2).get_flat_representation()
    it_loose = M.last_cg_info["iterations"]
    res = torch.linalg.vector_norm(b - (dense + lam * torch.eye(P, dtype=DT)) @ loose)
    assert res <= 1e-2 * torch.linalg.vector_norm(b) * (1 + 1e-6)
    tight = M.solve(v, lam, rtol=1e-12).get_flat_representation()
    assert M.last_cg_info["iterations"] > it_loose
    torch.testing.assert_close(tight, exact, rtol=1e-8, atol=1e-10)
    # x0: starting at the solution needs no iteration; atol: an absolute stopping rule
    again = M.solve(v, lam, x0=PVector(lc, vector_repr=exact), rtol=1e-9)
    assert M.last_cg_info["iterations"] == 0
    torch.testing.assert_close(again.get_flat_representation(), exact)
    M.solve(v, lam, atol=1e30)
    assert M.last_cg_info["iterations"] == 0
    with pytest.raises(ValueError, match="name the same relative tolerance"):
        M.solve(v, lam, tol=1e-3, rtol=1e-4)
    # PFMap: x0 rows of the same shape
    J = torch.randn(2, 3, P, dtype=DT)
    Y = M.solve(PFMapDense(lc, data=J), lam, rtol=1e-12, x0=PFMapDense(lc, data=torch.zeros_like(J)))
    ref = torch.linalg.solve(dense + lam * torch.eye(P, dtype=DT), J.reshape(6, P).t()).t()
    torch.testing.assert_close(Y.to_torch().reshape(6, P), ref, rtol=1e-8, atol=1e-10)
    with pytest.raises(ValueError, match="x0 has shape"):
        M.solve(PFMapDense(lc, data=J), lam, x0=PFMapDense(lc, data=J[:, :2]))


def test_pinverse_and_sub_pmats():
    lc = LayerCollection([("a", LinearLayer(2, 2))])
    E = PMatEye(lc, scaling=torch.tensor(4.0, dtype=DT))
    assert float(E.pinverse().scaling) == 0.25
    assert float(PMatEye(lc, scaling=torch.tensor(0.0, dtype=DT)).pinverse().scaling) == 0.0
    A = torch.randn(6, 3, dtype=DT)
    D = PMatDense(lc, data=A @ A.t())  # rank 3
    torch.testing.assert_close(D.pinverse().to_torch(), torch.linalg.pinv(A @ A.t()),
                               rtol=1e-8, atol=1e-10)
    lc2 = LayerCollection([("a", LinearLayer(2, 2)), ("b", LinearLayer(1, 1))])
    parts = {"g1": PMatDense(lc2.sub(["a"]), data=A @ A.t()),
             "g2": PMatDiag(lc2.sub(["b"]), data=torch.tensor([1.0, 2.0], dtype=DT))}
    Mx = PMatMixed(lc2, None, layer_map={"a": "g1", "b": "g2"}, sub_pmats=parts)
    assert set(Mx.sub_pmats) == {"g1", "g2"}
    assert Mx.sub_pmats["g1"] is parts["g1"] and Mx.sub_pmats["g2"] is parts["g2"]


def test_inverse_and_frobenius_norm_are_deprecated_for_inv_and_norm():
    lc = LayerCollection([("a", LinearLayer(2, 2))])
    A = torch.randn(6, 6, dtype=DT)
    S = A @ A.t() + torch.eye(6, dtype=DT)
    reps = [PMatDense(lc, data=S), PMatDiag(lc, data=torch.diagonal(S).clone()),
            PMatEye(lc, scaling=torch.tensor(3.0, dtype=DT))]
    for M in reps:
        dense = M.to_torch()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the replacements do not warn
            inv, nrm = M.inv(0.5), M.norm()
        torch.testing.assert_close(inv.to_torch(), torch.linalg.inv(dense + 0.5 * torch.eye(6, dtype=DT)))
        torch.testing.assert_close(nrm, torch.linalg.matrix_norm(dense))
        with pytest.warns(DeprecationWarning, match=r"inverse\(\) is deprecated: use inv\(\)"):
            old = M.inverse(0.5)
        torch.testing.assert_close(old.to_torch(), inv.to_torch())
        with pytest.warns(DeprecationWarning, match=r"frobenius_norm\(\) is deprecated: use norm\(\)"):
            assert torch.equal(M.frobenius_norm(), nrm)
    # the Gram matrix too (its norm is that of the (K n, K n) matrix)
    G = FMatDense(lc, data=torch.randn(2, 3, 2, 3, dtype=DT))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nrm = G.norm()
    torch.testing.assert_close(nrm, torch.linalg.matrix_norm(G.data.reshape(6, 6)))
    with pytest.warns(DeprecationWarning, match=r"FMatDense.frobenius_norm\(\) is deprecated: use norm\(\)"):
        assert torch.equal(G.frobenius_norm(), nrm)


def test_torch_func_jacobian_backend():
    from nngeometry.backend import TorchFuncJacobianBackend as B1
    from nngeometry.backend.torch_func_jacobian import TorchFuncJacobianBackend
    assert B1 is TorchFuncJacobianBackend
    model, x, lc, dense = _setup()
    M = PMatDense(lc, TorchFuncJacobianBackend(model), examples=(x,))
    torch.testing.assert_close(M.to_torch(), dense, rtol=1e-10, atol=1e-12)
    # upstream's function maps the predictions (and the targets), not the batch: here the
    # log-probability of each example's label, against per-example Jacobians by brute force
    y = torch.tensor([0, 1, 1, 0, 1, 0])
    g = TorchFuncJacobianBackend(model, lambda out, t: out.log_softmax(-1).gather(1, t[:, None]))
    Jy = torch.stack([per_example_jacobian(model, x[i:i + 1],
                                           function=lambda o: o.log_softmax(-1)[:, y[i]])[0]
                      for i in range(len(y))])
    torch.testing.assert_close(PMatDense(lc, g, examples=(x, y)).to_torch(),
                               torch.einsum("nkp,nkq->pq", Jy, Jy) / len(y), rtol=1e-10, atol=1e-12)
    same = TorchFuncJacobianBackend(model, lambda out, _: out)
    torch.testing.assert_close(PMatDense(lc, same, examples=(x, y)).to_torch(), dense,
                               rtol=1e-10, atol=1e-12)


def test_hessian_backend_holds_a_collection_as_in_0_4():
    from nngeometry.backend import TorchFuncHessianBackend

    model = _mlp(3)
    x, y = torch.randn(5, 3, dtype=DT), torch.tensor([0, 1, 1, 0, 1])
    lc = LayerCollection.from_model(model).last_layer()

    def loss(out, tgt):
        return torch.nn.functional.cross_entropy(out, tgt, reduction="sum")

    g = TorchFuncHessianBackend(model=model, function=loss, layer_collection=lc)
    H = g.get_covariance_matrix((x, y))  # the generator's collection: the last layer
    assert H.shape == (lc.numel(), lc.numel())
    torch.testing.assert_close(H, g.get_covariance_matrix((x, y), lc))
    assert g.get_dtype() == DT and g.get_device() == torch.device("cpu")
    # against brute force: the Hessian of the summed loss w.r.t. the last layer
    w, b = model[2].weight.detach(), model[2].bias.detach()
    h = torch.tanh(model[0](x)).detach()

    def f(flat):
        W, B = flat[:w.numel()].reshape(w.shape), flat[w.numel():]
        return loss(h @ W.t() + B, y)

    ref = torch.autograd.functional.hessian(f, torch.cat([w.reshape(-1), b]))
    torch.testing.assert_close(H, ref, rtol=1e-10, atol=1e-12)
    M = PMatDense(generator=g, examples=[(x, y)])
    torch.testing.assert_close(M.to_torch(), ref, rtol=1e-10, atol=1e-12)


def test_dummy_generator_keywords_of_0_4():
    from nngeometry.backend import DummyGenerator

    lc = LayerCollection([("a", LinearLayer(2, 2))])
    g = DummyGenerator(layer_collection=lc, device="cpu")
    assert g.layer_collection is lc and g.get_device() == torch.device("cpu")
    assert DummyGenerator("cpu").layer_collection is None
