"""PFMapDense / PFMapImplicit (per-example Jacobians) and FMatDense (Gram matrix)."""
import pickle

import pytest
import torch
from torch import nn

from brute import per_example_jacobian
from nngeometry import GramMatrix, Jacobian
from nngeometry.backend import TorchHooksJacobianBackend
from nngeometry.layercollection import LayerCollection
from nngeometry.object import (FMatDense, FVector, PFMapDense, PFMapImplicit, PVector,
                               random_fvector, random_pfmap, random_pvector)

TOL = dict(atol=1e-11, rtol=1e-9)


def cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3),
                         nn.Tanh(), nn.Linear(3, 2)).double()


@pytest.fixture
def setup():
    model = cnn()
    x = torch.randn(6, 1, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    lc = LayerCollection.from_model(model)
    J = per_example_jacobian(model, x, lc).permute(1, 0, 2).contiguous()  # (K, n, P)
    return model, x, lc, J


def test_pfmap_dense(setup):
    model, x, lc, J = setup
    gen = TorchHooksJacobianBackend(model)
    m = PFMapDense(lc, gen, examples=(x,))
    assert m.size() == (2, 6, lc.numel()) and m.size(2) == lc.numel()
    assert torch.allclose(m.to_torch(), J, **TOL)
    # dict representation: per layer, shaped like the parameters, equal to the flat slices
    d = m.get_dict_representation()
    assert list(d) == lc.layer_ids()
    for lid, layer in lc:
        s = lc.slice(lid)
        flat = torch.cat([t.reshape(2, 6, -1) for t in d[lid]], dim=2)
        assert torch.equal(flat, m.to_torch()[:, :, s])
        assert d[lid][0].shape == (2, 6) + layer.weight.size
    torch.manual_seed(3)
    v = random_pvector(lc, dtype=torch.float64)
    w = random_fvector(6, 2, dtype=torch.float64)
    jv = m.jvp(v)
    assert isinstance(jv, FVector) and jv.size() == (2, 6)
    assert torch.allclose(jv.to_torch(), J @ v.to_torch(), **TOL)
    jtw = m.vjp(w)
    assert isinstance(jtw, PVector) and jtw.layer_collection == lc
    assert torch.allclose(jtw.to_torch(), torch.einsum("kip,ki->p", J, w.to_torch()), **TOL)
    # arithmetic
    r = random_pfmap(lc, (2, 6), dtype=torch.float64)
    assert torch.allclose((m + r).to_torch(), J + r.to_torch(), **TOL)
    assert torch.allclose((m - r).to_torch(), J - r.to_torch(), **TOL)
    assert torch.allclose((2 * m).to_torch(), 2 * J, **TOL)
    # pickling drops the generator
    m2 = pickle.loads(pickle.dumps(m))
    assert m2.generator is None and torch.equal(m2.to_torch(), m.to_torch())


def test_pfmap_implicit_vs_dense(setup):
    model, x, lc, J = setup
    gen = TorchHooksJacobianBackend(model)
    imp = PFMapImplicit(lc, gen, examples=(x,))
    torch.manual_seed(4)
    v = random_pvector(lc, dtype=torch.float64)
    w = random_fvector(6, 2, dtype=torch.float64)
    assert torch.allclose(imp.jvp(v).to_torch(), J @ v.to_torch(), **TOL)
    assert torch.allclose(imp.vjp(w).to_torch(), torch.einsum("kip,ki->p", J, w.to_torch()), **TOL)
    assert torch.allclose(imp.to_torch(), J, **TOL)


def test_pfmap_layout_checks(setup):
    model, x, lc, J = setup
    m = PFMapDense(lc, data=J)
    other = lc.sub(lc.layer_ids()[:1])
    with pytest.raises(ValueError, match="same LayerCollection"):
        m.jvp(random_pvector(other))
    with pytest.raises(ValueError, match=rf"\(n_output, n_examples, {lc.numel()}\)"):
        PFMapDense(lc, data=J[:, :, :-1])
    with pytest.raises(ValueError, match="share their LayerCollection"):
        m + random_pfmap(other, (2, 6), dtype=torch.float64)


def test_gram_matrix_vs_brute(setup):
    model, x, lc, J = setup
    G = GramMatrix(model, (x, None))
    assert isinstance(G, FMatDense)
    K, n, P = J.shape
    Gb = torch.einsum("kip,ljp->kilj", J, J)
    assert G.size() == (K, n, K, n)
    assert torch.allclose(G.to_torch(), Gb, **TOL)
    Gf = Gb.reshape(K * n, K * n)
    torch.manual_seed(5)
    f = random_fvector(n, K, dtype=torch.float64)
    assert torch.allclose(G.mv(f).to_torch(), (Gf @ f.to_torch().reshape(-1)).reshape(K, n), **TOL)
    assert torch.allclose(G.vTMv(f), f.to_torch().reshape(-1) @ Gf @ f.to_torch().reshape(-1), **TOL)
    assert torch.allclose(G.trace(), torch.trace(Gf), **TOL)
    assert torch.allclose(G.norm(), torch.linalg.norm(Gf), **TOL)
    G.compute_eigendecomposition()
    coords = G.project_to_diag(f)
    back = G.project_from_diag(coords)
    assert torch.allclose(back.to_torch(), f.to_torch(), **TOL)
    assert torch.allclose(G.evecs @ torch.diag(G.evals) @ G.evecs.t(), Gf, **TOL)
    assert torch.allclose((G + G).to_torch(), 2 * Gb, **TOL)
    assert torch.allclose((G - 0.5 * G).to_torch(), 0.5 * Gb, **TOL)
    # Gram = J Jᵀ: its trace equals n times the trace of the (mean-normalized) covariance
    Jmap = Jacobian(model, (x, None))
    assert torch.allclose(G.trace(), (Jmap.to_torch() ** 2).sum(), **TOL)
    G2 = pickle.loads(pickle.dumps(G))
    assert G2.generator is None and torch.equal(G2.to_torch(), G.to_torch())
