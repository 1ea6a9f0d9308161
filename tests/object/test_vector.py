"""PVector and FVector: representations, model interplay, algebra."""
import pytest
import torch
from torch import nn

from nngeometry.layercollection import LayerCollection
from nngeometry.object import (FVector, PVector, random_fvector, random_pvector,
                               random_pvector_dict)


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 3 * 3, 4),
                         nn.Tanh(), nn.Linear(4, 3, bias=False)).double()


def flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_flat_and_dict_round_trips():
    model = make_model()
    lc = LayerCollection.from_model(model)
    v = PVector.from_model(model)
    assert v.layer_collection == lc
    flat = v.get_flat_representation()
    assert flat.dtype == torch.float64
    assert torch.equal(flat, flat_params(model))
    assert torch.equal(v.to_torch(), flat)
    assert v.size() == (lc.numel(),) and len(v) == lc.numel()

    # flat -> dict: tensors shaped like the parameters, equal to them
    w = PVector(lc, vector_repr=flat.clone())
    d = w.get_dict_representation()
    assert list(d) == lc.layer_ids()
    params = dict(model.named_parameters())
    for lid in lc.layer_ids():
        names = ["weight"] + (["bias"] if lc[lid].bias is not None else [])
        assert len(d[lid]) == len(names)
        for t, name in zip(d[lid], names):
            assert torch.equal(t, params[f"{lid}.{name}"])
    # dict -> flat
    u = PVector(lc, dict_repr={k: tuple(t.clone() for t in ts) for k, ts in d.items()})
    assert torch.equal(u.get_flat_representation(), flat)


def test_from_model_is_a_view_and_detach_clone():
    model = make_model()
    v = PVector.from_model(model)
    c = v.clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    # from_model is not a copy; clone is
    assert torch.equal(v.get_flat_representation(), flat_params(model))
    assert not torch.equal(c.get_flat_representation(), flat_params(model))
    dv = v.detach()
    assert not dv.get_flat_representation().requires_grad
    assert v.get_flat_representation().requires_grad


def test_from_model_grad_matches_backward():
    model = make_model()
    torch.manual_seed(1)
    x = torch.randn(5, 1, 5, 5, dtype=torch.float64)
    model.zero_grad()
    model(x).pow(2).sum().backward()
    g = PVector.from_model_grad(model)
    expected = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert torch.equal(g.get_flat_representation(), expected)
    # parameters without .grad count as zeros
    model.zero_grad(set_to_none=True)
    assert torch.count_nonzero(PVector.from_model_grad(model).get_flat_representation()) == 0


def test_copy_and_add_to_model():
    model = make_model()
    lc = LayerCollection.from_model(model)
    torch.manual_seed(3)
    v = random_pvector(lc, dtype=torch.float64)
    v.copy_to_model(model)
    assert torch.equal(flat_params(model), v.get_flat_representation())
    w = random_pvector_dict(lc, dtype=torch.float64)
    w.add_to_model(model)
    assert torch.allclose(flat_params(model), v.get_flat_representation() + w.get_flat_representation(),
                          atol=1e-14, rtol=0)


@pytest.mark.parametrize("kind_a", ["flat", "dict"])
@pytest.mark.parametrize("kind_b", ["flat", "dict"])
def test_algebra(kind_a, kind_b):
    lc = LayerCollection.from_model(make_model())
    torch.manual_seed(4)
    make = {"flat": random_pvector, "dict": random_pvector_dict}
    a = make[kind_a](lc, dtype=torch.float64)
    b = make[kind_b](lc, dtype=torch.float64)
    fa, fb = a.get_flat_representation().clone(), b.get_flat_representation().clone()
    a, b = PVector(lc, **({"vector_repr": fa} if kind_a == "flat" else
                          {"dict_repr": a.get_dict_representation()})), \
        PVector(lc, **({"vector_repr": fb} if kind_b == "flat" else
                       {"dict_repr": b.get_dict_representation()}))
    tol = dict(atol=1e-12, rtol=0)
    assert torch.allclose((a + b).get_flat_representation(), fa + fb, **tol)
    assert torch.allclose((a - b).get_flat_representation(), fa - fb, **tol)
    assert torch.allclose((a * 2.5).get_flat_representation(), fa * 2.5, **tol)
    assert torch.allclose((2.5 * a).get_flat_representation(), fa * 2.5, **tol)
    assert torch.allclose((a * b).get_flat_representation(), fa * fb, **tol)
    assert torch.allclose((a / 4.0).get_flat_representation(), fa / 4.0, **tol)
    assert torch.allclose((-a).get_flat_representation(), -fa, **tol)
    assert torch.allclose((a ** 2).get_flat_representation(), fa ** 2, **tol)
    assert torch.allclose(a.dot(b), fa @ fb, **tol)
    assert torch.allclose(a.norm(), torch.linalg.norm(fa), **tol)
    assert torch.allclose(a.norm(1), fa.abs().sum(), **tol)
    assert torch.allclose(a.norm(float("inf")), fa.abs().max(), **tol)
    assert (a + b).layer_collection == lc


def test_layout_mismatch_is_refused():
    lc = LayerCollection.from_model(make_model())
    other = lc.sub(lc.layer_ids()[:2])
    a = random_pvector(lc)
    b = random_pvector(other)
    with pytest.raises(ValueError, match="layouts differ"):
        a + b
    with pytest.raises(ValueError, match="layouts differ"):
        a.dot(b)
    with pytest.raises(ValueError, match=f"has {lc.numel()} parameters"):
        PVector(lc, vector_repr=torch.zeros(other.numel()))
    with pytest.raises(ValueError, match="misses layer"):
        PVector(lc, dict_repr=b.get_dict_representation())
    with pytest.raises(ValueError, match="exactly one"):
        PVector(lc)


def test_random_vectors_dtype_and_shapes():
    lc = LayerCollection.from_model(make_model())
    v = random_pvector(lc, dtype=torch.float64)
    assert v.dtype == torch.float64 and v.get_flat_representation().shape == (lc.numel(),)
    d = random_pvector_dict(lc, dtype=torch.float64)
    assert d.vector_repr is None and d.dtype == torch.float64
    for lid, ts in d.get_dict_representation().items():
        assert ts[0].shape == lc[lid].weight.size
    f = random_fvector(7, 3, dtype=torch.float64)
    assert f.size() == (3, 7) and f.to_torch().dtype == torch.float64


def test_fvector_algebra():
    torch.manual_seed(5)
    a, b = random_fvector(4, 2, dtype=torch.float64), random_fvector(4, 2, dtype=torch.float64)
    ta, tb = a.to_torch(), b.to_torch()
    assert torch.equal((a + b).to_torch(), ta + tb)
    assert torch.equal((a - b).to_torch(), ta - tb)
    assert torch.equal((3 * a).to_torch(), 3 * ta)
    assert torch.allclose(a.norm(), torch.linalg.norm(ta))
    assert isinstance(a + b, FVector)


def test_random_objects_follow_the_model_dtype():
    from nngeometry.object import random_pfmap, random_pvector, random_pvector_dict

    model = nn.Sequential(nn.Linear(3, 2)).double()
    lc = LayerCollection.from_model(model)
    assert random_pvector(lc).get_flat_representation().dtype == torch.float64
    assert random_pvector_dict(lc).get_flat_representation().dtype == torch.float64
    assert random_pfmap(lc, (2, 3)).to_torch().dtype == torch.float64
    assert lc.sub(lc.layer_ids()).dtype == torch.float64
    # an explicit dtype wins
    assert random_pvector(lc, dtype=torch.float32).get_flat_representation().dtype == torch.float32
