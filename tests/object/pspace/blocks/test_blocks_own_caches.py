"""The blocks own their damping and their factorization caches: a container keeps its blocks
while its data is unchanged, a second π-damped KFAC solve (or dense solve with a per-parameter
damping) factorizes nothing, every result equals the dense brute force, and a layer's
Kronecker terms are read through one typed structure."""
import torch
from torch import nn

from nngeometry.layercollection import LayerCollection
from nngeometry.object import PMatBlockDiag, PMatDense, PMatKFAC, PVector, random_pvector
from nngeometry.object.pspace.blocks import KronBlock, kron
from nngeometry.object.pspace.blocks.kron import PiDamping

DT = torch.float64


def _spd(n, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, n + 2, generator=g, dtype=DT)
    return X @ X.t() / n


def _kfac():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    lc = LayerCollection.from_model(model)
    data = {lid: (_spd(l.kfac_permutation().numel() // (l.weight.size[0]), i),
                  _spd(l.weight.size[0], 10 + i))
            for i, (lid, l) in enumerate(lc.layers.items())}
    return PMatKFAC(lc, data=data)


def _forbid(monkeypatch, names):
    for name in names:
        def boom(*a, _n=name, **k):
            raise AssertionError(f"torch.linalg.{_n} called again")
        monkeypatch.setattr(torch.linalg, name, boom)


def test_kron_layer_reads_both_layouts_and_repacks():
    A, G = _spd(3, 0), _spd(2, 1)
    single, multi = kron.KronLayer.of((A, G)), kron.KronLayer.of(((A, G), (G, A)))
    assert (single.multi, len(single.terms)) == (False, 1)
    assert (multi.multi, len(multi.terms)) == (True, 2)
    assert single.units("fc") == [kron.Unit("fc", 0)] and multi.units("a")[1] == kron.Unit("a", 1)
    data = {"fc": (A, G), "a": ((A, G), (G, A))}
    back = kron.repack(data, {k: t for k, t in kron.iter_units(data)})
    assert back["fc"][0] is A and back["a"][1][0] is G and len(back["a"]) == 2
    assert kron.get_unit(data, kron.Unit("a", 1))[1] is A and kron.get_unit(data, "fc")[1] is G


def test_kfac_pi_solve_is_the_blocks_and_cached(monkeypatch):
    M = _kfac()
    lam = 0.07
    v = random_pvector(M.layer_collection, dtype=DT)
    dense = []
    for key, (A, G) in kron.iter_units(M.data):
        pi = kron.pi_damping(A, G)
        s = lam ** 0.5
        dense.append(torch.kron(G + s / pi * torch.eye(G.shape[0], dtype=DT),
                                A + pi * s * torch.eye(A.shape[0], dtype=DT)))
    parts = M._layout.split(v.get_flat_representation())
    want = M._layout.join({k: torch.linalg.solve(D, V.reshape(-1)).reshape(V.shape)
                           for (k, V), D in zip(parts.items(), dense)})
    first = M.solve(v, regul=lam).get_flat_representation()
    torch.testing.assert_close(first, want, rtol=1e-10, atol=1e-12)
    blocks = M._blocks()
    assert all(isinstance(b, KronBlock) and b._pi[0] == (lam, True) for b in blocks)
    _forbid(monkeypatch, ["cholesky", "cholesky_ex", "eigh", "inv", "solve"])
    assert M._blocks() is blocks  # kept: the data is unchanged
    assert torch.equal(M.solve(v, regul=lam).get_flat_representation(), first)
    # the block's matrix power under the same damping is the inverse it solved with
    inv = blocks[0].matpower(-1.0, PiDamping(lam))
    V = parts[kron.Unit(M.layer_collection.layer_ids()[0])]
    torch.testing.assert_close(inv.apply(V), blocks[0].solve(V, PiDamping(lam)))


def test_in_place_update_rebuilds_the_blocks():
    M = _kfac()
    v = random_pvector(M.layer_collection, dtype=DT)
    M.solve(v, regul=0.1)
    blocks = M._blocks()
    A, G = next(iter(M.data.values()))
    A.mul_(2.0)
    assert M._blocks() is not blocks
    fresh = PMatKFAC(M.layer_collection, data={k: tuple(t.clone() for t in e)
                                               for k, e in M.data.items()})
    torch.testing.assert_close(M.solve(v, regul=0.1).get_flat_representation(),
                               fresh.solve(v, regul=0.1).get_flat_representation())


def test_dense_solve_with_a_per_parameter_damping_is_cached(monkeypatch):
    model = nn.Linear(3, 2).to(DT)
    lc = LayerCollection.from_model(model)
    P = lc.numel()
    D = _spd(P, 3)
    lam = torch.linspace(0.1, 0.5, P, dtype=DT)
    prior = PVector(lc, vector_repr=lam)
    v = random_pvector(lc, dtype=DT)
    want = torch.linalg.solve(D + torch.diag(lam), v.get_flat_representation())
    for cls, data in ((PMatDense, D), (PMatBlockDiag, {lc.layer_ids()[0]: D})):
        M = cls(lc, data=data)
        first = M.solve(v, regul=prior).get_flat_representation()
        torch.testing.assert_close(first, want, rtol=1e-10, atol=1e-12)
        with monkeypatch.context() as m:
            _forbid(m, ["lu_factor", "lu_factor_ex", "solve", "eigh"])
            assert torch.equal(M.solve(v, regul=prior).get_flat_representation(), first)
        other = PVector(lc, vector_repr=lam.flip(0))
        torch.testing.assert_close(
            M.solve(v, regul=other).get_flat_representation(),
            torch.linalg.solve(D + torch.diag(lam.flip(0)), v.get_flat_representation()),
            rtol=1e-10, atol=1e-12)
