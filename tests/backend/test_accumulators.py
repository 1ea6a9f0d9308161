"""The accumulator protocol of the statistics (nngeometry.backend.consumers): the statistic of
two halves merged equals the statistic of the whole data in one pass (float64, 1e-12), for
every accumulator; running averages (ema); sealing; errors."""
import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_flatten
from torch.utils.data import DataLoader, TensorDataset

from nngeometry.backend import TorchHooksJacobianBackend
from nngeometry.backend import consumers as C
from nngeometry.backend.jacobian import _MeanJacobian
from nngeometry.layercollection import LayerCollection


TOL = dict(atol=1e-12, rtol=1e-12)


def mlp():
    torch.manual_seed(0)
    # P = 8·16 + 16 + 16·5 + 5 = 229 ≥ 192: the Gram sums take the block-triangle path
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 5)).double()


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(),
                         nn.Linear(3 * 4 * 4, 3)).double()


def loader(model_kind, lo, hi, bs=16):
    g = torch.Generator().manual_seed(1)
    shape = (50, 8) if model_kind == "mlp" else (50, 2, 4, 4)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)[lo:hi]
    return DataLoader(TensorDataset(x), batch_size=bs)


def _kfe(gen, lc, examples):
    factors = gen.get_kfac_blocks(examples, lc)
    return {lid: (torch.linalg.eigh(A)[1], torch.linalg.eigh(G)[1]) for lid, (A, G) in
            factors.items()}


CONSUMERS = {
    "dense": lambda lc, kfe: C.DenseCovariance(lc),
    "subnetwork": lambda lc, kfe: C.SubnetworkCovariance(lc, torch.tensor([0, 3, 17, 40, 41])),
    "diag": lambda lc, kfe: C.DiagCovariance(lc),
    "blocks": lambda lc, kfe: C.LayerBlocks(lc),
    "kfac": lambda lc, kfe: C.KFACFactors(lc, sqrt_k_split=True),
    "kfe_diag": lambda lc, kfe: C.KFEDiag(lc, kfe),
    "quasidiag": lambda lc, kfe: C.QuasiDiagCovariance(lc),
    "jacobian": lambda lc, kfe: C.PerExampleJacobians(lc),
    "mean_jacobian": lambda lc, kfe: _MeanJacobian(lc),
    # a consumer of another module, with the default (generic) state: every attribute
    "kfac_or_blocks": lambda lc, kfe: C.KFACOrLayerBlocks(lc, "expand"),
}


def _values(consumer):
    if isinstance(consumer, C.KFACOrLayerBlocks):
        consumer.finalize(consumer.count)
        return {"factors": consumer.factors, "blocks": consumer.blocks}
    return consumer.result


def _assert_trees_close(a, b):
    la, sa = tree_flatten(a)
    lb, sb = tree_flatten(b)
    assert sa == sb
    assert len(la) == len(lb) and len(la) > 0
    n_tensors = 0
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor):
            n_tensors += 1
            assert x.shape == y.shape
            torch.testing.assert_close(x, y, **TOL)
        else:
            assert x == y
    assert n_tensors > 0


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("name", sorted(CONSUMERS))
def test_merge_of_halves_equals_one_pass(kind, name):
    model = mlp() if kind == "mlp" else cnn()
    lc = LayerCollection.from_model(model)
    gen = TorchHooksJacobianBackend(model)
    whole = loader(kind, 0, 50)
    kfe = _kfe(gen, lc, whole) if name == "kfe_diag" else None
    make = CONSUMERS[name]
    ref = gen.accumulate(whole, lc, make(lc, kfe), finalize=False)
    assert ref.count == 50
    ref_values = _values(ref) if isinstance(ref, C.KFACOrLayerBlocks) else ref.compute()
    a = gen.accumulate(loader(kind, 0, 23), lc, make(lc, kfe), finalize=False)
    b = gen.accumulate(loader(kind, 23, 50, bs=7), lc, make(lc, kfe), finalize=False)
    assert (a.count, b.count) == (23, 27)
    merged = a.merge(b)
    assert merged is a and a.count == 50
    values = _values(a) if isinstance(a, C.KFACOrLayerBlocks) else a.compute()
    _assert_trees_close(values, ref_values)


@pytest.mark.parametrize("make", [C.DiagCovariance, C.DenseCovariance, C.KFACFactors])
def test_two_passes_into_one_statistic(make):
    model = mlp()
    lc = LayerCollection.from_model(model)
    gen = TorchHooksJacobianBackend(model)
    ref = gen.accumulate(loader("mlp", 0, 50), lc, make(lc)).result
    c = gen.accumulate(loader("mlp", 0, 30), lc, make(lc), finalize=False)
    c = gen.accumulate(loader("mlp", 30, 50), lc, c)
    assert c.count == 50
    _assert_trees_close(c.result, ref)


def test_merge_into_empty_and_of_empty():
    model = mlp()
    lc = LayerCollection.from_model(model)
    gen = TorchHooksJacobianBackend(model)
    ref = gen.accumulate(loader("mlp", 0, 50), lc, C.KFACFactors(lc), finalize=False)
    empty = C.KFACFactors(lc)
    empty.merge(ref)
    empty.merge(C.KFACFactors(lc))  # adding nothing changes nothing
    assert empty.count == 50
    _assert_trees_close(empty.compute(), ref.compute())


def test_ema_is_the_average_of_the_means():
    model = mlp()
    lc = LayerCollection.from_model(model)
    gen = TorchHooksJacobianBackend(model)
    for make in (C.DenseCovariance, C.DiagCovariance, C.KFACFactors, C.LayerBlocks):
        ma = gen.accumulate(loader("mlp", 0, 20), lc, make(lc)).result
        mb = gen.accumulate(loader("mlp", 20, 50), lc, make(lc)).result
        a = gen.accumulate(loader("mlp", 0, 20), lc, make(lc), finalize=False)
        b = gen.accumulate(loader("mlp", 20, 50), lc, make(lc), finalize=False)
        avg = a.ema(b, 0.9).compute()
        la, _ = tree_flatten(ma)
        lb, _ = tree_flatten(mb)
        lr, _ = tree_flatten(avg)
        for x, y, r in zip(la, lb, lr):
            if isinstance(x, torch.Tensor):
                torch.testing.assert_close(r, 0.9 * x + 0.1 * y, **TOL)
    # the first estimate is taken as is
    b = gen.accumulate(loader("mlp", 20, 50), lc, C.DiagCovariance(lc), finalize=False)
    first = C.DiagCovariance(lc).ema(b, 0.9).compute()
    torch.testing.assert_close(first, gen.get_covariance_diag(loader("mlp", 20, 50), lc), **TOL)


def test_errors_name_the_problem():
    model = mlp()
    lc = LayerCollection.from_model(model)
    gen = TorchHooksJacobianBackend(model)
    a = gen.accumulate(loader("mlp", 0, 20), lc, C.DenseCovariance(lc), finalize=False)
    with pytest.raises(TypeError, match="merge a DiagCovariance into a DenseCovariance"):
        a.merge(C.DiagCovariance(lc))
    a.state()  # sealed: another pass into it is refused, not silently wrong
    with pytest.raises(RuntimeError, match="sealed"):
        gen.accumulate(loader("mlp", 20, 30), lc, a, finalize=False)
    jac = gen.accumulate(loader("mlp", 0, 20), lc, C.PerExampleJacobians(lc), finalize=False)
    with pytest.raises(TypeError, match="running average"):
        jac.ema(jac, 0.5)
    with pytest.raises(ValueError, match="decay"):
        C.DiagCovariance(lc).ema(gen.accumulate(loader("mlp", 0, 20), lc, C.DiagCovariance(lc),
                                                finalize=False), 1.5)
    with pytest.raises(ValueError, match="no example"):
        C.DiagCovariance(lc).compute()
    # statistics of other layers can't be merged
    other = nn.Sequential(nn.Linear(8, 4)).double()
    lc2 = LayerCollection.from_model(other)
    b = TorchHooksJacobianBackend(other).accumulate(loader("mlp", 0, 20), lc2,
                                                    C.DiagCovariance(lc2), finalize=False)
    c = gen.accumulate(loader("mlp", 0, 20), lc, C.DiagCovariance(lc), finalize=False)
    with pytest.raises(ValueError, match="shape"):
        c.merge(b)


def test_distributed_keyword_checked():
    model = mlp()
    with pytest.raises(ValueError, match="distributed="):
        TorchHooksJacobianBackend(model, distributed="yes")
    # no process group in this process: required data parallelism is refused clearly
    with pytest.raises(RuntimeError, match="init_process_group"):
        TorchHooksJacobianBackend(model, distributed=True)
    # off and auto work without a group
    for d in (None, False):
        g = TorchHooksJacobianBackend(model, distributed=d)
        assert g._group() is None
