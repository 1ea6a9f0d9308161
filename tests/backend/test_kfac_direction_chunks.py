"""Kronecker-factor statistics: output directions chunked by the layers' output gradients (not
by the whole model's per-example Jacobian), and the factor sums divided in place only where
they are the statistic's own buffers."""
from types import SimpleNamespace

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import nngeometry.backend.strategy as S
from nngeometry import FIM
from nngeometry.backend.consumers import KFACFactors
from nngeometry.backend.jacobian import TorchHooksJacobianBackend
from nngeometry.layercollection import LayerCollection
from nngeometry.object import PMatKFAC


def test_chunk_size_per_layer_budget():
    strat = SimpleNamespace(max_chunk_bytes=2 ** 30)
    # a ResNet-18-like batch: 160 MB of layer outputs per direction, 11.2 M parameters
    calls = [SimpleNamespace(out_nbytes=80 * 2 ** 20, shared=None, out_dtype=torch.float32)] * 2
    whole = S.BackwardStrategy._chunk_size(strat, calls, 32, 10, 11_200_000)
    per_layer = S.BackwardStrategy._chunk_size(strat, calls, 32, 10, 11_200_000, per_layer=True)
    assert whole == 5 and per_layer == 1
    # small layer outputs: several directions per chunk either way
    small = [SimpleNamespace(out_nbytes=2 ** 20, shared=None, out_dtype=torch.float32)]
    assert S.BackwardStrategy._chunk_size(strat, small, 32, 10, 1000, per_layer=True) == 10


def _cnn_loader():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4)).double()
    x = torch.randn(9, 2, 4, 4, dtype=torch.float64)
    loader = DataLoader(TensorDataset(x, torch.randint(0, 4, (9,))), batch_size=3)
    return model, x, loader


def test_kfac_one_direction_per_chunk_matches_all_at_once(monkeypatch):
    model, x, loader = _cnn_loader()
    ref = FIM(model, loader, PMatKFAC, variant="classif_logits")
    chunks = []
    orig = TorchHooksJacobianBackend._batched_backward

    def spy(self, out, targets, k0, k1, retain):
        chunks.append(k1 - k0)
        return orig(self, out, targets, k0, k1, retain)

    monkeypatch.setattr(S, "DIRECTION_CHUNK_BYTES", 1)
    monkeypatch.setattr(TorchHooksJacobianBackend, "_batched_backward", spy)
    got = FIM(model, loader, PMatKFAC, variant="classif_logits")
    assert chunks and set(chunks) == {1}  # one output direction per backward
    torch.testing.assert_close(got.get_dense_tensor(), ref.get_dense_tensor(),
                               rtol=1e-12, atol=1e-14)


def test_factor_sums_divided_in_place_only_when_own():
    model, x, loader = _cnn_loader()
    lc = LayerCollection.from_model(model)
    gen = TorchHooksJacobianBackend(model)

    def consumer():
        return gen.accumulate(loader, lc, KFACFactors(lc), finalize=False)

    c = consumer()
    state = {lid: [[[t.clone() if t is not None else None for t in s] for s in blk]
                   for blk in blocks] for lid, blocks in c.state()["_acc"].items()}
    shown = c.state()["_acc"]
    c.finalize(c.count)
    # the sums that state() showed are not divided by finalize
    for lid, blocks in state.items():
        for blk, blk_shown in zip(blocks, shown[lid]):
            for s, s_shown in zip(blk, blk_shown):
                assert torch.equal(s[0], s_shown[0])
    # a statistic never sealed divides its own sums in place: same factors
    d = consumer()
    d.finalize(d.count)
    for lid in c.result:
        for a, b in zip(c.result[lid], d.result[lid]):
            torch.testing.assert_close(a, b, rtol=1e-14, atol=0)
