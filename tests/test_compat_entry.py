"""Upstream-compatible entry points, module paths and generator conventions: module paths and
positional orders, kronecker, utils.grad / display_correl, solve.cg, the torch_hooks and
torch_func_hessian modules, the generator's defaults, whole-data-set centering, the refusal of
training-mode BatchNorm and of mixed dtypes, LayerCollection's upstream methods. Checked in
float64 against brute force (torch.func / torch.autograd) or the documented behaviour."""
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import nngeometry
from brute import per_example_jacobian
from nngeometry.backend import (DummyGenerator, TorchFuncHessianBackend,
                                TorchHooksJacobianBackend, torch_hooks)
from nngeometry.backend.torch_func_hessian import batched_hvp, hvp
from nngeometry.layercollection import LayerCollection, LinearLayer
from nngeometry.maths import kronecker
from nngeometry.metrics import FIM, FIM_Types
from nngeometry.object import PMatDense, PMatDiag, PVector

DT = torch.float64
TOL = dict(atol=1e-10, rtol=1e-8)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)


def cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(),
                         nn.Linear(3 * 4 * 4, 3)).to(DT)


def data(n=8, shape=(4,), seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


def loader(x, y, bs=3):
    return DataLoader(TensorDataset(x, y), batch_size=bs)


# ---------------------------------------------------------------------- module paths, signatures
def test_module_paths_and_positional_orders():
    import nngeometry.gram
    import nngeometry.hessian
    import nngeometry.jacobian
    assert nngeometry.Jacobian is nngeometry.jacobian.Jacobian
    assert nngeometry.GramMatrix is nngeometry.gram.GramMatrix
    assert nngeometry.Hessian is nngeometry.hessian.Hessian
    names = lambda f: list(inspect.signature(f).parameters)  # noqa: E731
    assert names(nngeometry.Jacobian)[:5] == ["model", "loader", "function", "representation",
                                              "layer_collection"]
    assert names(nngeometry.GramMatrix)[:5] == ["model", "loader", "function", "representation",
                                                "layer_collection"]
    assert names(nngeometry.Hessian)[:6] == ["model", "loader", "representation", "function",
                                             "layer_collection", "verbose"]


def test_jacobian_and_gram_positional_calls_vs_brute_force():
    model, (x, y) = mlp(), data()
    lc = LayerCollection.from_model(model)
    J = per_example_jacobian(model, x, lc).permute(1, 0, 2)  # (K, n, P)
    f = lambda inputs, targets: model(inputs)  # noqa: E731
    Jm = nngeometry.Jacobian(model, loader(x, y), f)  # function third, as upstream
    torch.testing.assert_close(Jm.to_torch(), J, **TOL)
    G = nngeometry.GramMatrix(model, loader(x, y), f)
    Jf = J.reshape(-1, lc.numel())
    torch.testing.assert_close(G.to_torch(), (Jf @ Jf.t()).reshape(3, 8, 3, 8), **TOL)


def brute_hessian(model, x, y, lc):
    names = [f"{lid}.{p}" for lid, layer in lc.layers.items() for p in layer.param_names()]
    allp = {k: v.detach() for k, v in model.named_parameters()}
    shapes = [allp[k].shape for k in names]
    flat = torch.cat([allp[k].reshape(-1) for k in names])

    def total(theta):
        p, i = dict(allp), 0
        for k, s in zip(names, shapes):
            p[k] = theta[i:i + s.numel()].reshape(s)
            i += s.numel()
        return F.cross_entropy(torch.func.functional_call(model, p, (x,)), y, reduction="sum")

    return torch.autograd.functional.hessian(total, flat)


def test_hessian_upstream_function_is_the_loss_of_prediction_and_targets():
    model, (x, y) = mlp(), data()
    lc = LayerCollection.from_model(model)
    H = brute_hessian(model, x, y, lc)
    seen = []

    def f(prediction, targets):
        seen.append(targets.shape)
        return F.cross_entropy(prediction, targets, reduction="sum")

    M = nngeometry.Hessian(model, loader(x, y), PMatDense, f)  # positional, as upstream
    torch.testing.assert_close(M.to_torch(), H, **TOL)
    assert seen and all(s == (3,) or s == (2,) for s in seen)  # the targets, per batch
    # a different loss gives a different matrix: the function is really used
    M2 = nngeometry.Hessian(model, loader(x, y), PMatDense,
                            function=lambda p, t: 2 * F.cross_entropy(p, t, reduction="sum"))
    torch.testing.assert_close(M2.to_torch(), 2 * H, **TOL)
    with pytest.raises(ValueError, match="not both"):
        nngeometry.Hessian(model, (x, y), PMatDense, function=f,
                           loss_function=lambda out, *b: out.sum())


def test_torch_func_hessian_backend_and_hvps():
    model, (x, y) = mlp(), data()
    lc = LayerCollection.from_model(model)
    H = brute_hessian(model, x, y, lc)
    gen = TorchFuncHessianBackend(model, lambda p, t: F.cross_entropy(p, t, reduction="sum"))
    torch.testing.assert_close(gen.get_covariance_matrix(loader(x, y), lc), H, **TOL)
    assert gen.get_dtype(lc) == DT and gen.get_device(lc) == torch.device("cpu")
    V = torch.randn(2, 3, lc.numel(), dtype=DT, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(gen.implicit_mmap(V, loader(x, y), lc), V @ H, **TOL)
    # the standalone products, on a function of a dict of tensors
    A = torch.randn(3, 3, dtype=DT)
    A = A + A.t()

    def func(p):
        return 0.5 * p["a"] @ A @ p["a"] + (p["b"] ** 3).sum()

    primals = {"a": torch.randn(3, dtype=DT), "b": torch.randn(2, dtype=DT)}
    t = {"a": torch.randn(3, dtype=DT), "b": torch.randn(2, dtype=DT)}
    out = hvp(func, primals, t)
    torch.testing.assert_close(out["a"], A @ t["a"])
    torch.testing.assert_close(out["b"], 6 * primals["b"] * t["b"])
    tb = {"a": torch.randn(4, 3, dtype=DT), "b": torch.randn(4, 2, dtype=DT)}
    outb = batched_hvp(func, primals, tb)
    torch.testing.assert_close(outb["a"], tb["a"] @ A)
    torch.testing.assert_close(outb["b"], 6 * primals["b"] * tb["b"])


def test_fim_accepts_n_output_and_fim_types():
    model, (x, y) = mlp(), data()
    ref = FIM(model, loader(x, y), PMatDense, variant="regression").to_torch()
    F1 = FIM(model, loader(x, y), PMatDense, variant=FIM_Types.REGRESSION, n_output=3)
    torch.testing.assert_close(F1.to_torch(), ref, **TOL)
    assert FIM_Types.CLASSIF_LOGITS == "classif_logits"
    # the enum value is really used: another variant gives another matrix
    F2 = FIM(model, loader(x, y), PMatDense, variant=FIM_Types.CLASSIF_LOGITS)
    assert not torch.allclose(F2.to_torch(), ref)


# ---------------------------------------------------------------------- maths, utils, solve
def test_kronecker():
    A = torch.tensor([[1.0, 0.0]])
    B = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert torch.equal(kronecker(A, B), torch.tensor([[1.0, 2.0, 0.0, 0.0], [3.0, 4.0, 0.0, 0.0]]))
    A, B = torch.randn(2, 3, dtype=DT), torch.randn(4, 5, dtype=DT)
    assert torch.equal(kronecker(A, B), torch.kron(A, B))
    assert torch.equal(kronecker(A, B, transpose=True), torch.kron(A, B).t())
    with pytest.raises(ValueError, match="two matrices"):
        kronecker(torch.ones(3), B)


def test_utils_grad():
    from nngeometry.utils import grad
    model, (x, y) = cnn(), data(shape=(2, 4, 4))
    out = model(x).sum()
    g = grad(out, PVector.from_model(model), retain_graph=True)
    out.backward()
    torch.testing.assert_close(g.get_flat_representation(),
                               PVector.from_model_grad(model).get_flat_representation())
    lc = LayerCollection.from_model(model)
    flat = PVector(lc, vector_repr=torch.randn(lc.numel(), dtype=DT, requires_grad=True))
    with pytest.raises(RuntimeError, match="flat tensor"):
        grad(flat.norm(), flat)


def test_display_correl_draws_the_regularized_correlations():
    from nngeometry.utils import display_correl

    class Axis:
        def imshow(self, img):
            self.img = img

    M = torch.tensor([[4.0, 1.0], [1.0, 0.0]], dtype=DT)
    ax = Axis()
    c = display_correl(PMatDense(LayerCollection([("l", LinearLayer(1, 1))]), None, data=M), ax)
    d = torch.tensor([4.0, 0.0], dtype=DT) + 0.02  # diag + mean(diag)/100
    expected = M.abs() / torch.sqrt(d.unsqueeze(0) * d.unsqueeze(1))
    torch.testing.assert_close(c, expected)
    assert ax.img is c


def test_solve_cg_vs_direct_solve():
    from nngeometry.solve import cg, zero_like_pvector
    torch.manual_seed(0)
    lc = LayerCollection([("a", LinearLayer(3, 2))])
    P = lc.numel()
    R = torch.randn(P, P, dtype=DT)
    M = R @ R.t()
    A = PMatDense(lc, None, data=M)
    b = PVector(lc, vector_repr=torch.randn(P, dtype=DT))
    for regul, pre in [(1e-2, None), (0.5, PMatDiag(lc, None, data=torch.diagonal(M).clone()))]:
        x = cg(A, b, regul=regul, rtol=1e-12, M=pre)
        ref = torch.linalg.solve(M + regul * torch.eye(P, dtype=DT), b.get_flat_representation())
        torch.testing.assert_close(x.get_flat_representation(), ref, atol=1e-8, rtol=1e-8)
    # from a starting point, and stopped early by max_iter
    x0 = PVector(lc, vector_repr=torch.ones(P, dtype=DT))
    x = cg(A, b, regul=1e-2, x0=x0, rtol=1e-12)
    torch.testing.assert_close(x.get_flat_representation(), ref * 0 + torch.linalg.solve(
        M + 1e-2 * torch.eye(P, dtype=DT), b.get_flat_representation()), atol=1e-8, rtol=1e-8)
    one = cg(A, b, regul=1e-2, max_iter=1, return_info=True)[0].get_flat_representation()
    assert not torch.allclose(one, ref, atol=1e-6)
    z = zero_like_pvector(b)
    assert z.layer_collection == lc and torch.equal(z.get_flat_representation(),
                                                    torch.zeros(P, dtype=DT))


# ---------------------------------------------------------------------- backend modules
def test_conv_impl_switches_change_nothing():
    model, (x, y) = cnn(), data(shape=(2, 4, 4))
    lc = LayerCollection.from_model(model)
    gen = TorchHooksJacobianBackend(model, layer_collection=lc)
    ref = PMatDense(lc, gen, examples=loader(x, y)).to_torch()
    with torch_hooks.use_unfold_impl_for_convs():
        a = PMatDense(lc, gen, examples=loader(x, y)).to_torch()
    with torch_hooks.use_conv_impl_for_convs():
        b = PMatDense(lc, gen, examples=loader(x, y)).to_torch()
    assert torch.equal(a, ref) and torch.equal(b, ref)
    assert torch_hooks.torch_hooks.TorchHooksJacobianBackend is TorchHooksJacobianBackend


def test_instance_buffer_handles_removes_hooks():
    from nngeometry.backend.torch_hooks.torch_hooks import instance_buffer_handles
    lin = nn.Linear(2, 2)

    class Gen:
        def __init__(self):
            self.handles = []

        @instance_buffer_handles
        def method(self, fail):
            self.handles.append(lin.register_forward_hook(lambda *a: None))
            if fail:
                raise KeyError("boom")
            return 3

    g = Gen()
    assert g.method(False) == 3 and not lin._forward_hooks and g.handles == []
    with pytest.raises(KeyError):
        g.method(True)
    assert not lin._forward_hooks


def test_dummy_generator():
    g = DummyGenerator("cpu")
    assert g.get_device() == torch.device("cpu")
    assert g.get_device(LayerCollection()) == torch.device("cpu")
    with pytest.raises(AttributeError, match="not built from a model"):
        g.get_covariance_matrix


# ---------------------------------------------------------------------- generator defaults
def test_generator_methods_default_to_its_layer_collection():
    model, (x, y) = mlp(), data()
    lc = LayerCollection.from_model(model).sub(["2"])
    J = per_example_jacobian(model, x, lc).permute(1, 0, 2)
    Jf = J.reshape(-1, lc.numel())
    M = Jf.t() @ Jf / 8
    gen = TorchHooksJacobianBackend(model, layer_collection=lc)
    assert gen.layer_collection is lc
    torch.testing.assert_close(gen.get_covariance_matrix(loader(x, y)), M, **TOL)
    torch.testing.assert_close(gen.get_covariance_diag(examples=loader(x, y)),
                               torch.diagonal(M), **TOL)
    torch.testing.assert_close(gen.get_jacobian(loader(x, y)), J, **TOL)
    v = torch.randn(lc.numel(), dtype=DT)
    torch.testing.assert_close(gen.implicit_mv(v, loader(x, y)), M @ v, **TOL)
    torch.testing.assert_close(gen.implicit_trace(loader(x, y)), torch.trace(M), **TOL)
    assert gen.get_dtype() == DT and gen.get_device() == torch.device("cpu")
    # without a collection: the whole model (upstream's default)
    full = TorchHooksJacobianBackend(model)
    assert full.layer_collection == LayerCollection.from_model(model)
    with pytest.raises(ValueError, match="no examples"):
        gen.get_covariance_matrix()
    with pytest.raises(TypeError, match="needs the argument 'v'"):
        gen.implicit_mv(examples=loader(x, y))


def test_mixed_dtypes_refused():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(10, 5, dtype=torch.float32)
            self.fc2 = nn.Linear(5, 2, dtype=torch.float64)

        def forward(self, x):
            return self.fc2(self.fc1(x.float()).double())

    model = Mixed()
    dl = DataLoader(TensorDataset(torch.randn(20, 10, dtype=DT), torch.randint(0, 2, (20,))),
                    batch_size=10)
    for rep in (PMatDense, PMatDiag):
        with pytest.raises(ValueError, match="'fc1' has torch.float32.*'fc2' has torch.float64"):
            FIM(model, dl, rep, variant="classif_logits")
    with pytest.raises(ValueError, match="dtype"):
        TorchHooksJacobianBackend(model).get_dtype()
    # one layer alone is fine
    lc = LayerCollection.from_model(model).sub(["fc2"])
    assert FIM(model, dl, PMatDiag, layer_collection=lc).get_diag().dtype == DT


# ---------------------------------------------------------------------- BatchNorm
def test_batchnorm_using_batch_statistics_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    x, y = data()
    model.train()
    for call in (lambda: FIM(model, loader(x, y), PMatDense),
                 lambda: TorchHooksJacobianBackend(model).implicit_mv(
                     torch.ones(LayerCollection.from_model(model).numel(), dtype=DT), (x,))):
        with pytest.raises(RuntimeError, match=r"BatchNorm layer '1'.*model\.eval\(\)"):
            call()
    assert model.training
    model.eval()
    FIM(model, loader(x, y), PMatDiag)  # running statistics: accepted
    model[1].track_running_stats = False  # batch statistics even in eval mode
    with pytest.raises(RuntimeError, match="track_running_stats=False"):
        FIM(model, loader(x, y), PMatDiag)


# ---------------------------------------------------------------------- centering
@pytest.fixture(scope="module")
def centered_case():
    model, (x, y) = cnn(), data(n=8, shape=(2, 4, 4))
    lc = LayerCollection.from_model(model)
    J = per_example_jacobian(model, x, lc)  # (n, K, P)
    Jc = (J - J.mean(0, keepdim=True)).permute(1, 0, 2)  # (K, n, P), data-set mean
    return model, x, y, lc, Jc


def test_centering_uses_the_whole_data_set_mean(centered_case):
    model, x, y, lc, Jc = centered_case
    K, n, P = Jc.shape
    Jf = Jc.reshape(-1, P)
    M = Jf.t() @ Jf / n
    gen = TorchHooksJacobianBackend(model, centering=True)
    for bs in (3, 8):  # the result does not depend on the batching
        dl = loader(x, y, bs)
        torch.testing.assert_close(gen.get_covariance_matrix(dl, lc), M, **TOL)
        torch.testing.assert_close(gen.get_covariance_diag(dl, lc), torch.diagonal(M), **TOL)
        blocks = gen.get_covariance_layer_blocks(dl, lc)
        for lid in lc.layer_ids():
            s = lc.slice(lid)
            torch.testing.assert_close(blocks[lid], M[s, s], **TOL)
        torch.testing.assert_close(gen.get_jacobian(dl, lc), Jc, **TOL)
        torch.testing.assert_close(gen.get_gram_matrix(dl, lc),
                                   (Jf @ Jf.t()).reshape(K, n, K, n), **TOL)
    assert torch.allclose(Jc.sum(1), torch.zeros(K, P, dtype=DT), atol=1e-10)


def test_centering_in_implicit_products(centered_case):
    model, x, y, lc, Jc = centered_case
    K, n, P = Jc.shape
    Jf = Jc.reshape(-1, P)
    M = Jf.t() @ Jf / n
    g = torch.Generator().manual_seed(3)
    v = torch.randn(P, generator=g, dtype=DT)
    V = torch.randn(2, P, generator=g, dtype=DT)
    w = torch.randn(K, n, generator=g, dtype=DT)
    gen = TorchHooksJacobianBackend(model, centering=True, layer_collection=lc)
    dl = loader(x, y, 3)
    torch.testing.assert_close(gen.implicit_mv(v, dl), M @ v, **TOL)
    torch.testing.assert_close(gen.implicit_vTMv(v, dl), v @ M @ v, **TOL)
    torch.testing.assert_close(gen.implicit_Jv(v, dl), Jc @ v, **TOL)
    torch.testing.assert_close(gen.implicit_JTv(w, dl), torch.einsum("kip,ki->p", Jc, w), **TOL)
    torch.testing.assert_close(gen.implicit_JV(V, dl), torch.einsum("kip,mp->mki", Jc, V), **TOL)
    torch.testing.assert_close(gen.implicit_mm(V, dl), V @ M, **TOL)
    torch.testing.assert_close(gen.implicit_trace(dl), torch.trace(M), **TOL)
    with pytest.raises(NotImplementedError, match="centering"):
        gen.get_kfac_blocks(dl)


def test_gram_matrix_centering_entry_point(centered_case):
    model, x, y, lc, Jc = centered_case
    K, n, P = Jc.shape
    Jf = Jc.reshape(-1, P)
    G = nngeometry.GramMatrix(model, loader(x, y, 3), centering=True)
    torch.testing.assert_close(G.to_torch(), (Jf @ Jf.t()).reshape(K, n, K, n), **TOL)


# ---------------------------------------------------------------------- LayerCollection
def test_layercollection_upstream_methods():
    model = mlp()
    lc = LayerCollection.from_model(model)
    l2m, m2l = lc.get_layerid_module_maps(model)
    assert l2m == lc.get_layerid_module_map(model)
    assert list(l2m.values()) == [model[0], model[2]]
    assert m2l[model[2]] == "2"
    named = list(lc.named_parameters(l2m))
    ref = list(model.named_parameters())
    assert [k for k, _ in named] == [k for k, _ in ref]
    assert all(a is b for (_, a), (_, b) in zip(named, ref))
    other = LayerCollection()
    other.add_layer(name="2", layer=LinearLayer(5, 3))
    other.add_layer("0", LinearLayer(4, 6))  # same id, other spec: not common
    assert list(lc.get_common_layers(other)) == [("2", LinearLayer(5, 3))]
