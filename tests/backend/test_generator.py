"""The Jacobian generator (TorchHooksJacobianBackend) against brute-force per-example Jacobians."""
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from brute import per_example_jacobian
from nngeometry import Jacobian
from nngeometry.backend import TorchHooksJacobianBackend
from nngeometry.generator.jacobian import Jacobian as OldGeneratorName
from nngeometry.layercollection import LayerCollection
from nngeometry.object import PMatDense


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.ReLU(),
                         nn.Linear(5, 3)).double()


def cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(),
                         nn.Conv2d(3, 2, 2, stride=2, bias=False), nn.Tanh(), nn.Flatten(),
                         nn.Linear(2 * 3 * 3, 3)).double()


def data(kind, n=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (n, 4) if kind == "mlp" else (n, 2, 6, 6)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


MODELS = {"mlp": mlp, "cnn": cnn}
TOL = dict(atol=1e-11, rtol=1e-9)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_get_jacobian_vs_brute(kind):
    model, x = MODELS[kind](), data(kind)
    lc = LayerCollection.from_model(model)
    gen = TorchHooksJacobianBackend(model)
    J = gen.get_jacobian((x,), lc)
    Jb = per_example_jacobian(model, x, lc).permute(1, 0, 2)  # (K, n, P)
    assert J.shape == (3, 7, lc.numel()) and J.dtype == torch.float64
    assert torch.allclose(J, Jb, **TOL)
    # a sub-collection gives the matching columns
    sub = lc.sub([lc.layer_ids()[0], lc.layer_ids()[-1]])
    Js = gen.get_jacobian((x,), sub)
    cols = torch.cat([torch.arange(lc.p_pos[l], lc.p_pos[l] + lc[l].numel()) for l in sub.layer_ids()])
    assert torch.allclose(Js, Jb[:, :, cols], **TOL)


def test_old_generator_name_is_an_alias():
    assert OldGeneratorName is TorchHooksJacobianBackend


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_top_level_jacobian_and_pfmap(kind):
    model, x = MODELS[kind](), data(kind)
    lc = LayerCollection.from_model(model)
    Jmap = Jacobian(model, (x, None))
    Jb = per_example_jacobian(model, x, lc).permute(1, 0, 2)
    assert Jmap.size() == (3, 7, lc.numel())
    assert torch.allclose(Jmap.to_torch(), Jb, **TOL)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_chunked_output_directions_give_same_results(kind):
    """A tiny memory budget forces one output direction per backward pass."""
    model, x = MODELS[kind](), data(kind)
    lc = LayerCollection.from_model(model)
    big = TorchHooksJacobianBackend(model)
    tiny = TorchHooksJacobianBackend(model, max_chunk_bytes=1)
    calls = []
    orig = tiny._batched_backward

    def spy(out, targets, k0, k1, retain):
        calls.append((k0, k1))
        return orig(out, targets, k0, k1, retain)

    tiny._batched_backward = spy
    assert torch.allclose(tiny.get_jacobian((x,), lc), big.get_jacobian((x,), lc), **TOL)
    assert calls == [(0, 1), (1, 2), (2, 3)]
    assert torch.allclose(tiny.get_covariance_matrix((x,), lc), big.get_covariance_matrix((x,), lc), **TOL)
    assert torch.allclose(tiny.get_covariance_diag((x,), lc), big.get_covariance_diag((x,), lc), **TOL)
    bt, bb = tiny.get_covariance_layer_blocks((x,), lc), big.get_covariance_layer_blocks((x,), lc)
    for lid in lc.layer_ids():
        assert torch.allclose(bt[lid], bb[lid], **TOL)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_covariance_statistics_vs_brute(kind):
    model, x = MODELS[kind](), data(kind)
    lc = LayerCollection.from_model(model)
    gen = TorchHooksJacobianBackend(model)
    Jb = per_example_jacobian(model, x, lc).reshape(-1, lc.numel())
    M = Jb.t() @ Jb / x.shape[0]
    assert torch.allclose(gen.get_covariance_matrix((x,), lc), M, **TOL)
    assert torch.allclose(gen.get_covariance_diag((x,), lc), torch.diagonal(M), **TOL)
    blocks = gen.get_covariance_layer_blocks((x,), lc)
    for lid in lc.layer_ids():
        s = lc.slice(lid)
        assert torch.allclose(blocks[lid], M[s, s], **TOL)


@pytest.mark.parametrize("drop_last", [False, True])
def test_dataloader_batches_and_drop_last(drop_last):
    """Several batches accumulate; n counts the examples actually seen (not len(dataset))."""
    model, x = mlp(), data("mlp", n=10)
    lc = LayerCollection.from_model(model)
    loader = DataLoader(TensorDataset(x, torch.zeros(10)), batch_size=4, drop_last=drop_last)
    seen = x[:8] if drop_last else x
    Jb = per_example_jacobian(model, seen, lc).permute(1, 0, 2)
    gen = TorchHooksJacobianBackend(model)
    J = gen.get_jacobian(loader, lc)
    assert J.shape == (3, seen.shape[0], lc.numel())
    assert torch.allclose(J, Jb, **TOL)
    Jf = Jb.reshape(-1, lc.numel())
    M = Jf.t() @ Jf / seen.shape[0]
    assert torch.allclose(gen.get_covariance_matrix(loader, lc), M, **TOL)
    pm = PMatDense(lc, gen, examples=loader)
    assert torch.allclose(pm.to_torch(), M, **TOL)


def test_model_state_unchanged_by_a_build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5, affine=False), nn.ReLU(), nn.Linear(5, 3)).double()
    # eval mode: training-mode BatchNorm is refused (per-example Jacobians are not defined);
    # its running statistics are set to non-default values that must stay as they are
    model.eval()
    model[1].running_mean.normal_()
    x = data("mlp", n=8)
    model[0].weight.requires_grad_(False)
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    lc = LayerCollection.from_model(model)
    gen = TorchHooksJacobianBackend(model)
    M = gen.get_covariance_matrix((x,), lc)
    # the frozen weight was still differentiated (it is in the collection)
    s = lc.slice("0")
    assert torch.count_nonzero(M[s, s]) > 0
    gen.implicit_mv(torch.ones(lc.numel(), dtype=torch.float64), (x,), lc)
    for k, b in model.named_buffers():
        assert torch.equal(b, buffers[k]), k
    for k, p in model.named_parameters():
        assert p.requires_grad == flags[k], k
        assert torch.equal(p.detach(), params[k]), k
        assert p.grad is None, k
    assert not model.training


def test_model_state_restored_after_an_error():
    model, x = mlp(), data("mlp")
    model[0].weight.requires_grad_(False)
    lc = LayerCollection.from_model(model)
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        TorchHooksJacobianBackend(model).get_jacobian((bad,), lc)
    assert not model[0].weight.requires_grad
    assert all(not m._forward_hooks for m in model.modules())


def test_implicit_products_vs_dense():
    model, x = cnn(), data("cnn")
    lc = LayerCollection.from_model(model)
    gen = TorchHooksJacobianBackend(model)
    J = per_example_jacobian(model, x, lc).permute(1, 0, 2)  # (K, n, P)
    Jf = J.reshape(-1, lc.numel())
    M = Jf.t() @ Jf / x.shape[0]
    g = torch.Generator().manual_seed(2)
    v = torch.randn(lc.numel(), generator=g, dtype=torch.float64)
    w = torch.randn(3, x.shape[0], generator=g, dtype=torch.float64)
    assert torch.allclose(gen.implicit_mv(v, (x,), lc), M @ v, **TOL)
    assert torch.allclose(gen.implicit_vTMv(v, (x,), lc), v @ M @ v, **TOL)
    assert torch.allclose(gen.implicit_Jv(v, (x,), lc), J @ v, **TOL)
    assert torch.allclose(gen.implicit_JTv(w, (x,), lc), torch.einsum("kip,ki->p", J, w), **TOL)


def test_centering():
    model, x = mlp(), data("mlp")
    lc = LayerCollection.from_model(model)
    J = per_example_jacobian(model, x, lc)  # (n, K, P)
    Jc = (J - J.mean(0, keepdim=True)).reshape(-1, lc.numel())
    gen = TorchHooksJacobianBackend(model, centering=True)
    assert torch.allclose(gen.get_covariance_matrix((x,), lc), Jc.t() @ Jc / x.shape[0], **TOL)


def test_custom_function_and_shared_layer():
    """A user function and a layer called twice: the per-example gradient sums both calls."""
    torch.manual_seed(0)
    lin = nn.Linear(3, 3).double()
    model = nn.Sequential(lin)
    x = torch.randn(5, 3, dtype=torch.float64)

    def f(inputs, targets=None):
        return lin(torch.tanh(lin(inputs)))

    lc = LayerCollection.from_model(model)
    J = TorchHooksJacobianBackend(model, function=f).get_jacobian((x,), lc)
    Jb = per_example_jacobian(model, x, lc,
                              function=None).permute(1, 0, 2)  # single call (sanity: differs)
    from torch.func import functional_call, jacrev, vmap
    params = {k: p.detach() for k, p in model.named_parameters()}

    def g(p, xi):
        return functional_call(model, p, (torch.tanh(functional_call(model, p, (xi,))),))

    Jd = vmap(jacrev(g), (None, 0))(params, x)
    Jd = torch.cat([Jd["0.weight"].reshape(5, 3, -1), Jd["0.bias"].reshape(5, 3, -1)], 2)
    assert torch.allclose(J, Jd.permute(1, 0, 2), **TOL)
    assert not torch.allclose(J, Jb, **TOL)


@pytest.mark.parametrize("backward", ["batched", "looped", "auto"])
def test_backward_strategies_agree(backward):
    """The vmapped backward and the one-per-direction backward give the same statistics, and
    'auto' (which times both once) does too, on a CNN with max-pooling."""
    from nngeometry.backend import strategy
    from nngeometry.curvature import closed_form_function

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(3 * 4 * 4, 5)).double()
    x = torch.randn(6, 2, 8, 8, dtype=torch.float64)
    lc = LayerCollection.from_model(model)
    strategy._BACKWARD_CHOICE.clear()
    strategy._BACKWARD_SAMPLES.clear()
    f = closed_form_function(lambda *d: model(d[0]), "classif_logits")
    ref = TorchHooksJacobianBackend(model, f, backward="batched").get_covariance_matrix((x,), lc)
    gen = TorchHooksJacobianBackend(model, f, backward=backward)
    for _ in range(2):  # the second build of 'auto' uses the recorded choice
        got = gen.get_covariance_matrix((x,), lc)
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
    if backward == "auto":
        assert set(strategy._BACKWARD_CHOICE.values()) <= {"batched", "looped"}
        assert len(strategy._BACKWARD_CHOICE) == 1
    with pytest.raises(ValueError, match="unknown backward"):
        TorchHooksJacobianBackend(model, backward="vmap")
