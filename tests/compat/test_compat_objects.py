"""Upstream-compatible API of PVector / FVector, PFMapDense / PFMapImplicit and FMatDense:
every member checked against brute-force float64 torch computations."""
import inspect
import pickle

import pytest
import torch
from torch import nn

from brute import per_example_jacobian
from nngeometry.backend import TorchHooksJacobianBackend
from nngeometry.layercollection import LayerCollection
from nngeometry.object import (FMatDense, FVector, PFMapDense, PFMapImplicit, PMatDense, PVector,
                               random_fvector, random_pfmap, random_pvector, random_pvector_dict)
from nngeometry.object.fspace import FMatAbstract

TOL = dict(atol=1e-11, rtol=1e-9)
K, N = 2, 5  # outputs, examples


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 3 * 3, 3),
                         nn.Tanh(), nn.Linear(3, K, bias=False)).double()


def flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.fixture
def setup():
    model = make_model()
    x = torch.randn(N, 1, 5, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    lc = LayerCollection.from_model(model)
    J = per_example_jacobian(model, x, lc).permute(1, 0, 2).contiguous()  # (K, n, P)
    return model, x, lc, J


def vectors(lc, kind, seed):
    torch.manual_seed(seed)
    make = random_pvector if kind == "flat" else random_pvector_dict
    return make(lc, dtype=torch.float64)


# ---------------------------------------------------------------------------------- PVector
def test_to_dict_and_to_torch_layer_follow_the_parameters():
    model = make_model()
    lc = LayerCollection.from_model(model)
    params = dict(model.named_parameters())
    v = PVector(lc, vector_repr=flat_params(model).clone())
    d = v.to_dict()
    assert list(d) == lc.layer_ids()
    for lid in lc.layer_ids():
        names = ["weight"] + (["bias"] if lc[lid].bias is not None else [])
        layer = v.to_torch_layer(lid)
        assert len(d[lid]) == len(layer) == len(names)
        for t, u, name in zip(d[lid], layer, names):
            assert torch.equal(t, params[f"{lid}.{name}"]) and torch.equal(u, t)
    # views of the flat vector: writing through them writes into the vector
    v.to_torch_layer("0")[0].zero_()
    assert torch.count_nonzero(v.to_torch()[lc.slice("0")][:params["0.weight"].numel()]) == 0
    # a dict-stored vector hands back its own tensors
    w = PVector.from_model(model)
    assert w.to_torch_layer("3")[0] is params["3.weight"]
    assert w.to_dict()["5"][0] is params["5.weight"]
    with pytest.raises(KeyError, match="not a layer"):
        v.to_torch_layer("nope")


def test_flat_form_of_a_model_view_is_never_stale():
    model = make_model()
    v = PVector.from_model(model)
    before = v.to_torch().detach().clone()
    with torch.no_grad():
        model[3].bias.add_(1.0)
    assert torch.equal(v.to_torch().detach(), flat_params(model))
    assert not torch.equal(v.to_torch().detach(), before)


@pytest.mark.parametrize("kind_a", ["flat", "dict"])
@pytest.mark.parametrize("kind_b", ["flat", "dict"])
def test_inplace_operators(kind_a, kind_b):
    lc = LayerCollection.from_model(make_model())
    a, b = vectors(lc, kind_a, 1), vectors(lc, kind_b, 2)
    ta, tb = a.to_torch().clone(), b.to_torch().clone()
    view = a.to_torch_layer("3")[1]  # shares a's storage
    a_id = id(a)
    a.to_torch()  # any cached flat form must not survive the update
    a += b
    assert id(a) == a_id and torch.allclose(a.to_torch(), ta + tb, **TOL)
    assert torch.allclose(view, (ta + tb)[lc.slice("3")][-view.numel():], **TOL)
    a -= 3 * b
    assert torch.allclose(a.to_torch(), ta - 2 * tb, **TOL)
    a *= -0.5
    assert id(a) == a_id and torch.allclose(a.to_torch(), -0.5 * (ta - 2 * tb), **TOL)
    a *= b  # elementwise
    assert torch.allclose(a.to_torch(), -0.5 * (ta - 2 * tb) * tb, **TOL)
    assert torch.equal(b.to_torch(), tb)  # the right operand is untouched
    with pytest.raises(TypeError, match="PVector"):
        a += 1.0


def test_inplace_on_model_parameters():
    model = make_model()
    lc = LayerCollection.from_model(model)
    d = vectors(lc, "flat", 3)
    p0 = flat_params(model)
    v = PVector.from_model(model)
    for op in ("+=", "-=", "*="):
        with pytest.raises(RuntimeError, match="from_model.*v.detach\\(\\).clone\\(\\)"):
            exec(f"v {op} (d if '{op}' != '*=' else 2.0)")
    assert torch.equal(flat_params(model), p0)
    # a copy is independent of the model
    c = v.detach().clone()
    c += d
    assert torch.equal(flat_params(model), p0)
    assert torch.allclose(c.to_torch(), p0 + d.to_torch(), **TOL)
    # a detached view shares the model's storage, as torch's detach() does: += writes into it
    dv = v.detach()
    dv += d
    assert torch.allclose(flat_params(model), p0 + d.to_torch(), **TOL)


def test_matmul_is_the_dot_product(setup):
    model, x, lc, J = setup
    a, b = vectors(lc, "flat", 4), vectors(lc, "dict", 5)
    ref = torch.dot(a.to_torch(), b.to_torch())
    assert torch.allclose(a @ b, ref, **TOL) and torch.allclose(b @ a, ref, **TOL)
    with pytest.raises(TypeError):
        a @ 2.0
    # matrices keep their meaning of @
    M = PMatDense(lc, None, data=J.reshape(-1, lc.numel()).t() @ J.reshape(-1, lc.numel()))
    assert torch.allclose((M @ a).to_torch(), M.to_torch() @ a.to_torch(), **TOL)


def test_fvector_defaults():
    assert FVector().vector_repr is None
    with pytest.raises(ValueError, match="empty"):
        FVector().to_torch()
    torch.manual_seed(0)
    f = random_fvector(7)
    assert f.size() == (1, 7)
    assert random_fvector(7, 3, dtype=torch.float64).to_torch().shape == (3, 7)


# ---------------------------------------------------------------------------------- PFMapDense
def test_pfmap_constructor_orders(setup):
    model, x, lc, J = setup
    gen = TorchHooksJacobianBackend(model)
    upstream = PFMapDense(lc, gen, None, (x,))
    assert torch.allclose(upstream.to_torch(), J, **TOL)
    assert torch.allclose(PFMapDense(lc, data=J).to_torch(), J, **TOL)
    assert PFMapDense(lc, data=J).generator is None
    # 0.4 keyword style: the collection is the generator's
    gen04 = TorchHooksJacobianBackend(model, layer_collection=lc)
    m04 = PFMapDense(generator=gen04, examples=(x,))
    assert m04.layer_collection is lc and torch.allclose(m04.to_torch(), J, **TOL)
    assert torch.equal(PFMapDense(generator=gen04, data=J).to_torch(), J)
    # a generator built without a collection stands for all the layers of its model
    whole = PFMapDense(generator=gen, examples=(x,))
    assert whole.layer_collection == lc and torch.allclose(whole.to_torch(), J, **TOL)
    with pytest.raises(ValueError, match="needs a LayerCollection"):
        PFMapDense(data=J)
    with pytest.raises(TypeError, match="first argument must be a LayerCollection"):
        PFMapDense(gen, data=J)
    assert list(inspect.signature(PFMapDense).parameters)[:4] == [
        "layer_collection", "generator", "data", "examples"]


def test_pfmap_members(setup):
    model, x, lc, J = setup
    m = PFMapDense(lc, data=J)
    assert m.size() == torch.Size((K, N, lc.numel())) and m.size(1) == N
    # per-layer blocks: the parameters' shapes, equal to the flat slices
    seen = []
    for lid, layer, blocks in m.iter_by_layer():
        seen.append(lid)
        assert layer is lc[lid]
        assert blocks[0].shape == (K, N) + tuple(layer.weight.size)
        assert torch.equal(torch.cat([t.reshape(K, N, -1) for t in blocks], dim=2),
                           J[:, :, lc.slice(lid)])
        assert all(torch.equal(a, b) for a, b in zip(blocks, m.to_torch_layer(lid)))
    assert seen == lc.layer_ids()
    assert [lid for lid, _ in m.iter_by_module()] == seen
    # from_dict inverts to_torch_layer
    back = PFMapDense.from_dict(lc, None, {lid: m.to_torch_layer(lid) for lid in reversed(seen)})
    assert torch.equal(back.to_torch(), J)
    # 0.4 keyword style: the collection is the generator's
    gen04 = TorchHooksJacobianBackend(model, layer_collection=lc)
    back04 = PFMapDense.from_dict(generator=gen04, data_dict=m.get_dict_representation())
    assert back04.layer_collection is lc and torch.equal(back04.to_torch(), J)
    with pytest.raises(ValueError, match="misses layer"):
        PFMapDense.from_dict(lc, None, {seen[0]: m.to_torch_layer(seen[0])})
    # to
    m32 = m.to(dtype=torch.float32)
    assert m32.to_torch().dtype == torch.float32 and m32.layer_collection is lc
    assert torch.allclose(m32.to_torch().double(), J, atol=1e-6)
    # jvp / vjp(v=...) against J v and Jᵀ w
    torch.manual_seed(6)
    v = random_pvector(lc, dtype=torch.float64)
    w = random_fvector(N, K, dtype=torch.float64)
    assert torch.allclose(m.jvp(v).to_torch(), torch.einsum("kip,p->ki", J, v.to_torch()), **TOL)
    Jf = J.reshape(K * N, -1)
    assert torch.allclose(m.vjp(v=w).to_torch(), Jf.t() @ w.to_torch().reshape(-1), **TOL)
    with pytest.raises(ValueError, match="shape"):
        m.vjp(random_fvector(N + 1, K, dtype=torch.float64))
    # algebra
    r = random_pfmap(lc, (K, N))
    assert torch.allclose((m + r).to_torch(), J + r.to_torch(), **TOL)
    assert torch.allclose((m - r).to_torch(), J - r.to_torch(), **TOL)
    assert torch.allclose((3 * m).to_torch(), 3 * J, **TOL)
    assert torch.allclose((m * 3).to_torch(), 3 * J, **TOL)
    assert torch.allclose((-m).to_torch(), -J, **TOL)


def test_pfmap_implicit_orders(setup):
    model, x, lc, J = setup
    gen = TorchHooksJacobianBackend(model)
    torch.manual_seed(7)
    v = random_pvector(lc, dtype=torch.float64)
    ref = torch.einsum("kip,p->ki", J, v.to_torch())
    for imp in (PFMapImplicit(lc, gen, None, (x,)), PFMapImplicit(lc, gen, examples=(x,)),
                PFMapImplicit(generator=TorchHooksJacobianBackend(model, layer_collection=lc),
                              examples=(x,))):
        assert imp.layer_collection is lc
        assert torch.allclose(imp.jvp(v).to_torch(), ref, **TOL)
    with pytest.raises(ValueError, match="stores no data"):
        PFMapImplicit(lc, gen, data=J, examples=(x,))


def test_random_pfmap():
    lc = LayerCollection.from_model(make_model())
    torch.manual_seed(8)
    a = random_pfmap(lc, (3, 4))
    assert a.size() == (3, 4, lc.numel()) and a.to_torch().dtype == torch.float64
    assert random_pfmap(lc, output_size=(1, 2), dtype=torch.float32).to_torch().dtype == torch.float32
    torch.manual_seed(8)
    # the seeds' older form (lc, n_output, n_examples) draws the same map
    assert torch.equal(random_pfmap(lc, 3, 4).to_torch(), a.to_torch())
    with pytest.raises(TypeError, match="pair"):
        random_pfmap(lc, 3)
    with pytest.raises(ValueError, match="n_output, n_examples"):
        random_pfmap(lc, (1, 2, 3))


# ---------------------------------------------------------------------------------- FMatDense
def test_fmat_constructor_orders(setup):
    model, x, lc, J = setup
    Gb = torch.einsum("kip,ljp->kilj", J, J)
    gen = TorchHooksJacobianBackend(model)
    assert torch.allclose(FMatDense(lc, gen, None, (x,)).to_torch(), Gb, **TOL)
    assert torch.allclose(FMatDense(lc, gen, examples=(x,)).to_torch(), Gb, **TOL)
    g04 = FMatDense(generator=TorchHooksJacobianBackend(model, layer_collection=lc), examples=(x,))
    assert g04.layer_collection is lc and torch.allclose(g04.to_torch(), Gb, **TOL)
    whole = FMatDense(generator=gen, examples=(x,))
    assert whole.layer_collection == lc and torch.allclose(whole.to_torch(), Gb, **TOL)
    with pytest.raises(ValueError, match="needs a LayerCollection"):
        FMatDense(examples=(x,))
    assert issubclass(FMatDense, FMatAbstract)
    with pytest.raises(TypeError):
        FMatAbstract(gen)


def test_fmat_members(setup):
    model, x, lc, J = setup
    Gb = torch.einsum("kip,ljp->kilj", J, J)
    Gf = Gb.reshape(K * N, K * N)
    G = FMatDense(lc, data=Gb)
    assert G.size() == torch.Size((K, N, K, N)) and G.size(1) == N and G.size(2) == K
    assert torch.allclose(G.norm(), torch.sqrt((Gb ** 2).sum()), **TOL)
    with pytest.warns(DeprecationWarning, match=r"FMatDense.frobenius_norm\(\) is deprecated"):
        assert torch.allclose(G.norm("fro"), G.frobenius_norm(), **TOL)
    eig = torch.linalg.eigvalsh(Gf)
    assert torch.allclose(G.norm(2), eig.max(), **TOL)
    assert torch.allclose(G.norm(-2), eig.abs().min(), atol=1e-9)
    assert torch.allclose(G.trace(), (J ** 2).sum(), **TOL)
    for impl in ("eigh", "svd"):
        G.compute_eigendecomposition(impl=impl)
        evals, evecs = G.get_eigendecomposition()
        assert torch.allclose(evecs @ torch.diag(evals) @ evecs.t(), Gf, atol=1e-9)
        assert torch.allclose(evals.sort().values, eig, atol=1e-9)
    with pytest.raises(NotImplementedError):
        G.compute_eigendecomposition(impl="stupid")
    # projections onto the eigenbasis and back
    torch.manual_seed(9)
    f = random_fvector(N, K, dtype=torch.float64)
    coords = G.project_to_diag(f)
    assert torch.allclose(coords, G.evecs.t() @ f.to_torch().reshape(-1), **TOL)
    assert torch.allclose(G.project_from_diag(coords).to_torch(), f.to_torch(), **TOL)
    # an eigendecomposition is made on demand
    assert torch.allclose(FMatDense(lc, data=Gb).get_eigendecomposition()[0], eig, atol=1e-9)
    # algebra keeps the collection
    assert torch.allclose((G + G).to_torch(), 2 * Gb, **TOL)
    assert torch.allclose((G - 0.5 * G).to_torch(), 0.5 * Gb, **TOL)
    assert (G + G).layer_collection is lc
    G2 = pickle.loads(pickle.dumps(G))
    assert G2.generator is None and torch.equal(G2.to_torch(), Gb)
