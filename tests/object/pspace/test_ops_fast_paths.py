"""The fast paths of the per-call operations give the numbers of the general path:
the Kronecker layout moved by slices instead of an index gather, the cached damped reciprocal
of PMatDiag's solve, the fused Diag quadratic form."""
import pytest
import torch
from torch import nn

from nngeometry import FIM
from nngeometry.object import PMatDiag, PMatEKFAC, PMatKFAC, PVector
from nngeometry.object.pspace.blocks import kron

DT = torch.float64


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Conv2d(3, 2, 2, bias=False),
                         nn.Flatten(), nn.Linear(2 * 3 * 3, 4), nn.Tanh(),
                         nn.Linear(4, 3, bias=False)).to(DT)


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 2, 6, 6, generator=g, dtype=DT), torch.randint(0, 3, (6,), generator=g)


@pytest.fixture(scope="module")
def kfac():
    model = _model()
    return FIM(model, _data(), PMatKFAC)


def test_every_layer_takes_a_fast_path(kfac):
    """Linear and convolutions, with and without a bias: no index gather left."""
    lay = kfac._layout
    kinds = {lid: lay.fast[lid] for lid in lay.entries}
    assert set(kinds.values()) == {"same", "bias_last"}, kinds


@pytest.mark.parametrize("lead", [(), (3,), (2, 3)])
def test_split_and_join_equal_the_permutation(kfac, lead):
    lay = kfac._layout
    P = kfac.layer_collection.numel()
    flat = torch.randn(*lead, P, dtype=DT)
    parts = lay.split(flat)
    for lid, (s, e, perm, inv, units) in lay.entries.items():
        (key, _, dG, dA), = units
        ref = flat[..., s:e][..., inv].reshape(*lead, dG, dA)
        assert torch.equal(parts[key], ref)
    assert torch.equal(lay.join(parts), flat)
    # joined from new tensors (not views of the input): the same flat vector
    assert torch.equal(lay.join({k: v.clone() for k, v in parts.items()}), flat)


def test_split_views_are_never_written(kfac):
    """A product must leave its input vector as it was (split may return views of it)."""
    v = PVector(kfac.layer_collection,
                vector_repr=torch.randn(kfac.layer_collection.numel(), dtype=DT))
    before = v.get_flat_representation().clone()
    kfac.mv(v), kfac.vTMv(v), kfac.solve(v, regul=0.1), kfac.solve(v, regul=0.1, damping="exact")
    PMatEKFAC.from_kfac(kfac).mv(v)
    assert torch.equal(v.get_flat_representation(), before)


def test_kfac_products_and_diagonal_against_dense(kfac):
    M = kfac.to_torch()
    v = torch.randn(M.shape[0], dtype=DT)
    pv = PVector(kfac.layer_collection, vector_repr=v)
    assert torch.allclose(kfac.mv(pv).get_flat_representation(), M @ v, rtol=1e-12, atol=1e-14)
    assert torch.allclose(kfac.get_diag(), torch.diagonal(M), rtol=1e-12, atol=1e-15)
    lam = 0.3
    ref = torch.linalg.solve(M + lam * torch.eye(M.shape[0], dtype=DT), v)
    got = kfac.solve(pv, regul=lam, damping="exact").get_flat_representation()
    assert torch.allclose(got, ref, rtol=1e-10, atol=1e-12)


def test_diag_solve_reuses_and_refreshes_its_reciprocal():
    model = _model()
    D = FIM(model, _data(), PMatDiag)
    d = D.get_diag().clone()
    v = PVector(D.layer_collection, vector_repr=torch.randn(d.numel(), dtype=DT))
    f = v.get_flat_representation()
    for lam in (0.1, 0.1, 0.5):
        assert torch.allclose(D.solve(v, regul=lam).get_flat_representation(), f / (d + lam),
                              rtol=1e-14, atol=0)
    D.data.mul_(2.0)  # an in-place change of the matrix: the cache must not be reused
    assert torch.allclose(D.solve(v, regul=0.5).get_flat_representation(),
                          f / (2 * d + 0.5), rtol=1e-14, atol=0)
    assert torch.allclose(D.vTMv(v), (2 * d * f * f).sum(), rtol=1e-13)


def test_diag_solve_still_refuses_singular_and_differentiates():
    model = _model()
    D = FIM(model, _data(), PMatDiag)
    D.data[0] = 0.0
    v = PVector(D.layer_collection, vector_repr=torch.ones(D.data.numel(), dtype=DT))
    with pytest.raises(ValueError, match="diagonal entries"):
        D.solve(v, regul=0)
    lam = torch.tensor(0.2, dtype=DT, requires_grad=True)
    y = D.solve(v, regul=lam).get_flat_representation().sum()
    (g,) = torch.autograd.grad(y, lam)
    assert torch.allclose(g, -(1 / (D.data + 0.2) ** 2).sum(), rtol=1e-12)


def test_pickled_layouts_without_fast_paths_still_work(kfac):
    lay = kfac._layout
    old = kron.Layout.__new__(kron.Layout)
    old.__dict__.update({k: v for k, v in lay.__dict__.items() if k != "fast"})
    flat = torch.randn(kfac.layer_collection.numel(), dtype=DT)
    assert torch.equal(old.join(old.split(flat)), flat)


def test_pi_solve_first_by_cholesky_then_by_inverses(kfac, monkeypatch):
    """π-damped solves with wide factors (the threshold lowered to this model's): the first
    (triangular solves), the second (inverses made from the same Cholesky factors) and later
    ones all equal the dense π-damped solve; a new regul, or a change of the factors, starts
    again."""
    monkeypatch.setattr(kron, "LAZY_INVERSE_WIDTH", 0)
    kfac._blocks_cache = None
    lam = 0.05
    v = PVector(kfac.layer_collection,
                vector_repr=torch.randn(kfac.layer_collection.numel(), dtype=DT))

    def reference(M, lam):
        blocks = []
        for lid in M.layer_collection.layer_ids():
            A, G = M.data[lid]
            pi = kron.pi_damping(A, G, True)
            s = lam ** 0.5
            Ad, Gd = A + pi * s * torch.eye(A.shape[0], dtype=DT), G + s / pi * torch.eye(
                G.shape[0], dtype=DT)
            blocks.append(torch.kron(Gd, Ad))
        dense = torch.block_diag(*blocks)
        parts = M._layout.split(v.get_flat_representation())
        keys = [kron.Unit(lid) for lid in M.layer_collection.layer_ids()]
        flat = torch.cat([parts[k].reshape(-1) for k in keys])
        sol = torch.linalg.solve(dense, flat)
        out, o = {}, 0
        for k in keys:
            n = parts[k].numel()
            out[k] = sol[o:o + n].reshape(parts[k].shape)
            o += n
        return M._layout.join(out)

    ref = reference(kfac, lam)
    for i in range(3):
        got = kfac.solve(v, regul=lam).get_flat_representation()
        assert torch.allclose(got, ref, rtol=1e-10, atol=1e-12), i
        assert all((b._pi[1] == "chol") == (i == 0) for b in kfac._blocks()), i
    ref2 = reference(kfac, 2 * lam)
    assert torch.allclose(kfac.solve(v, regul=2 * lam).get_flat_representation(), ref2,
                          rtol=1e-10, atol=1e-12)
    for A, G in kfac.data.values():
        A.mul_(1.5)
    assert torch.allclose(kfac.solve(v, regul=2 * lam).get_flat_representation(),
                          reference(kfac, 2 * lam), rtol=1e-10, atol=1e-12)
    for A, G in kfac.data.values():
        A.div_(1.5)


def test_kfac_diagonal_of_factors_that_record_a_graph(kfac):
    """get_diag writes in place only for plain factors: with factors requiring grad it stays
    differentiable (d/dA of Σ diag = tr(G) per diagonal entry of A)."""
    data = {lid: (A.clone().requires_grad_(True), G.clone()) for lid, (A, G) in
            kfac.data.items()}
    M = PMatKFAC(kfac.layer_collection, data=data)
    d = M.get_diag()
    assert torch.allclose(d, kfac.get_diag(), rtol=1e-14)
    lid = next(iter(data))
    (gA,) = torch.autograd.grad(d.sum(), data[lid][0])
    assert torch.allclose(torch.diagonal(gA), torch.trace(data[lid][1]).expand(gA.shape[0]))


@pytest.mark.parametrize("split_from", [0, 2 ** 30])
def test_kfac_mv_reads_the_vector_in_place_against_dense(kfac, split_from, monkeypatch):
    """``mv`` writes each layer's ``G V Aᵀ`` into the result without laying the vector out
    (``[W | b]`` layers kept apart as weight and bias, or assembled when small): the same
    numbers as the dense matrix for a flat vector and for a dict vector, and the split / join
    path where an autograd graph must be recorded."""
    from nngeometry.object.pspace.abstract import PMatAbstract
    monkeypatch.setattr(kron, "SPLIT_BIAS_MIN_ENTRIES", split_from)
    M = kfac.to_torch()
    lc = kfac.layer_collection
    v = torch.randn(M.shape[0], dtype=DT)
    flat = PVector(lc, vector_repr=v)
    as_dict = PVector(lc, dict_repr={k: tuple(t.clone() for t in ts)
                                     for k, ts in flat.get_dict_representation().items()})
    assert kfac._layout.kron_mv([(b.right_factor(), b.G) for b in kfac._blocks()],
                                flat) is not None
    for pv in (flat, as_dict):
        got = kfac.mv(pv).get_flat_representation()
        assert torch.allclose(got, M @ v, rtol=1e-12, atol=1e-14)
        assert torch.allclose(got, PMatAbstract.mv(kfac, pv).get_flat_representation(),
                              rtol=1e-13, atol=1e-15)
    w = v.clone().requires_grad_(True)
    out = kfac.mv(PVector(lc, vector_repr=w)).get_flat_representation()
    (g,) = torch.autograd.grad(out @ v, w)
    assert torch.allclose(g, M.T @ v, rtol=1e-12, atol=1e-14)


def test_kfac_mv_with_gathered_and_multi_block_layers_against_dense():
    """Embedding (a general permutation) and attention (several Kronecker blocks in one
    layer) next to Linear layers: ``mv`` gathers those layers, and matches the dense matrix."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 4)
            self.att = nn.MultiheadAttention(4, 2, batch_first=True)
            self.fc = nn.Linear(4, 3)

        def forward(self, i):
            h = self.emb(i)
            return self.fc(self.att(h, h, h, need_weights=False)[0].mean(dim=1))

    torch.manual_seed(0)
    model = Net().to(DT)
    g = torch.Generator().manual_seed(2)
    idx, y = torch.randint(0, 7, (4, 5), generator=g), torch.randint(0, 3, (4,), generator=g)
    F = FIM(model, (idx, y), PMatKFAC)
    assert any(k is None for k in F._layout.fast.values())
    M = F.to_torch()
    v = torch.randn(M.shape[0], dtype=DT)
    pv = PVector(F.layer_collection, vector_repr=v)
    assert torch.allclose(F.mv(pv).get_flat_representation(), M @ v, rtol=1e-12, atol=1e-14)
    d = PVector(F.layer_collection, dict_repr={k: tuple(t.clone() for t in ts)
                                               for k, ts in pv.get_dict_representation().items()})
    assert torch.allclose(F.mv(d).get_flat_representation(), M @ v, rtol=1e-12, atol=1e-14)


def test_kfac_mv_of_factors_that_are_not_symmetric(kfac):
    """Factors that are not symmetric (a product of two KFACs) are applied as ``G V Aᵀ``:
    the dense matrix of the product; exactly symmetric ones are read as they are."""
    for b in kfac._blocks():
        assert (b.right_factor() is b.A) == torch.equal(b.A, b.A.mT)
    P = kfac.mm(kfac)
    assert any(b.right_factor() is not b.A for b in P._blocks())
    M = kfac.to_torch()
    v = torch.randn(M.shape[0], dtype=DT)
    got = P.mv(PVector(kfac.layer_collection, vector_repr=v)).get_flat_representation()
    assert torch.allclose(got, M @ (M @ v), rtol=1e-10, atol=1e-13)
