"""Memory-bounded paths of the convolution layer types and of the generator (float64):

* the convolution maths by chunks of examples (``conv.PATCH_CHUNK_BYTES``) and of folded
  directions (``FOLD_CHUNK_BYTES``) equal the one-chunk results, and per-example gradients equal
  brute force;
* KFAC without the input factor (``input_factor=False``, asked for past the first chunk of
  output directions) gives the same ``G``;
* the generator's chunks of output directions (``_chunk_size``) give the same KFAC / diagonal as
  all directions at once, and ``A`` is formed once per batch;
* the layers' output gradients are w.r.t. the module's output even when an in-place op
  (``ReLU(inplace=True)``) follows it.
"""
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from brute import fim_dense, per_example_jacobian
from nngeometry import FIM
from nngeometry.backend import strategy
from nngeometry.backend import TorchHooksJacobianBackend
from nngeometry.layer_types import conv
from nngeometry.layercollection import LayerCollection
from nngeometry.object import PMatDiag, PMatKFAC

DT = torch.float64


def _case(name):
    torch.manual_seed(0)
    n, K = 5, 3
    if name == "conv2d":
        mod = nn.Conv2d(3, 4, 3, padding=1, stride=(1, 2))
        x = torch.randn(n, 3, 6, 7, dtype=DT)
    elif name == "conv2d_wide_nobias":  # D = 72 >= FOLD_MIN_PATCH: the folded-directions path
        mod = nn.Conv2d(8, 4, 3, padding="same", bias=False)
        x = torch.randn(n, 8, 5, 5, dtype=DT)
    elif name == "conv1d_dilated":
        mod = nn.Conv1d(2, 3, 3, dilation=2, padding=1, padding_mode="reflect")
        x = torch.randn(n, 2, 9, dtype=DT)
    else:  # transposed, strided
        mod = nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=1)
        x = torch.randn(n, 3, 4, 3, dtype=DT)
    mod = mod.to(DT)
    gy = torch.randn((K,) + tuple(mod(x).shape), dtype=DT)
    layer = LayerCollection.from_model(nn.Sequential(mod)).layers["0"]
    return layer, mod, x, gy


def _brute_per_example(mod, x, gy):
    """``(K, n, numel)`` from autograd, one example and direction at a time."""
    rows = []
    for k in range(gy.shape[0]):
        per = []
        for i in range(x.shape[0]):
            params = [mod.weight] + ([mod.bias] if mod.bias is not None else [])
            out = mod(x[i:i + 1])
            g = torch.autograd.grad(out, params, gy[k, i:i + 1])
            per.append(torch.cat([t.reshape(-1) for t in g]))
        rows.append(torch.stack(per))
    return torch.stack(rows)


CASES = ["conv2d", "conv2d_wide_nobias", "conv1d_dilated", "conv_transpose2d"]


@pytest.mark.parametrize("name", CASES)
def test_example_chunks_equal_one_chunk(name, monkeypatch):
    layer, mod, x, gy = _case(name)
    ref_g = _brute_per_example(mod, x, gy)
    full = {"g": layer.per_example_grad(mod, x, gy), "d": layer.diag(mod, x, gy)}
    if layer.supports_kfac:
        for approx in ("expand", "reduce"):
            A, G = layer.kfac_factors(mod, x, gy, approx=approx)
            full[approx] = [f.dense() if isinstance(f, conv.GramRows) else f for f in (A, G)]
    # one example per chunk of patches, one direction per folded chunk
    monkeypatch.setattr(conv, "PATCH_CHUNK_BYTES", 1)
    monkeypatch.setattr(type(layer), "FOLD_CHUNK_BYTES", 1)
    calls = []
    orig = type(layer)._patches

    def spy(self, module, xs, gys, examples_inner=False):
        calls.append(xs.shape[0])
        return orig(self, module, xs, gys, examples_inner)

    monkeypatch.setattr(type(layer), "_patches", spy)
    g = layer.per_example_grad(mod, x, gy)
    assert calls == [1] * x.shape[0]  # the chunked path ran
    scale = ref_g.abs().max().item()
    torch.testing.assert_close(g, ref_g, atol=1e-12 * scale, rtol=0)
    torch.testing.assert_close(full["g"], ref_g, atol=1e-12 * scale, rtol=0)
    d = layer.diag(mod, x, gy)
    torch.testing.assert_close(d, (ref_g ** 2).sum(dim=(0, 1)), atol=1e-12 * scale ** 2, rtol=0)
    torch.testing.assert_close(full["d"], d, atol=1e-12 * scale ** 2, rtol=0)
    # diag_into accumulates into the slice it is given
    out = torch.ones(layer.numel() + 2, dtype=DT)
    layer.diag_into(mod, x, gy, out[1:-1])
    assert out[0] == 1 and out[-1] == 1
    torch.testing.assert_close(out[1:-1], d + 1, atol=1e-12 * scale ** 2, rtol=0)
    if not layer.supports_kfac:
        return
    for approx in ("expand", "reduce"):
        A, G = layer.kfac_factors(mod, x, gy, approx=approx)
        A, G = [f.dense() if isinstance(f, conv.GramRows) else f for f in (A, G)]
        sa = full[approx][0].abs().max().item()
        sg = full[approx][1].abs().max().item()
        torch.testing.assert_close(A, full[approx][0], atol=1e-12 * sa, rtol=0)
        torch.testing.assert_close(G, full[approx][1], atol=1e-12 * sg, rtol=0)
        none, G2 = layer.kfac_factors(mod, x, gy, approx=approx, input_factor=False)
        assert none is None
        G2 = G2.dense() if isinstance(G2, conv.GramRows) else G2
        torch.testing.assert_close(G2, G, atol=1e-12 * sg, rtol=0)


def test_kfac_expand_against_unfold():
    """``A = Σ [u; 1][u; 1]ᵀ`` over examples and locations, ``G = Σ g gᵀ / L``, from F.unfold."""
    layer, mod, x, gy = _case("conv2d")
    A, G = layer.kfac_factors(mod, x, gy)
    u = nn.functional.unfold(x, 3, padding=1, stride=(1, 2))  # (n, D, L)
    u = torch.cat([u, torch.ones_like(u[:, :1])], dim=1)
    A_ref = torch.einsum("ndl,nel->de", u, u)
    g = gy.reshape(gy.shape[0], gy.shape[1], gy.shape[2], -1)
    G_ref = torch.einsum("kncl,kndl->cd", g, g) / g.shape[-1]
    torch.testing.assert_close(A, A_ref, atol=1e-12 * A_ref.abs().max().item(), rtol=0)
    torch.testing.assert_close(G, G_ref, atol=1e-12 * G_ref.abs().max().item(), rtol=0)


def _wide_cnn(inplace=False):
    """Activations much larger than the parameters: several direction chunks per batch."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(inplace=inplace),
                         nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(16, 5)).to(DT)


def test_direction_chunks_rule():
    """The output gradients of a chunk fit in max(DIRECTION_CHUNK_BYTES, n P itemsize) and
    max_chunk_bytes, the chunks are about equal, and all directions go at once when they fit."""
    gen = TorchHooksJacobianBackend(nn.Linear(1, 1), max_chunk_bytes=2 ** 40)

    class C:
        out_dtype = DT

        def __init__(self, nbytes):
            self.out_nbytes = nbytes

    mib = 2 ** 20
    dcb = strategy.DIRECTION_CHUNK_BYTES
    # 6 MiB per direction, 9 directions, Jacobian of one direction 1 MiB: 16 MiB -> 2 a chunk,
    # 5 chunks -> 2 each
    k = gen._chunk_size([C(4 * mib), C(2 * mib)], 64, 9, mib // (64 * 8), None)
    assert k * 6 * mib <= max(dcb, mib) and -(-9 // k) == -(-9 // (max(dcb, mib) // (6 * mib)))
    # a Jacobian larger than all the directions' gradients: one chunk
    assert gen._chunk_size([C(mib)], 64, 9, 10 ** 6, None) == 9
    # max_chunk_bytes still bounds it, and so does an explicit budget
    assert TorchHooksJacobianBackend(nn.Linear(1, 1), max_chunk_bytes=3 * mib)._chunk_size(
        [C(mib)], 64, 9, 10 ** 6, None) == 3
    assert gen._chunk_size([C(mib)], 64, 9, 1, 4 * mib) == 3  # 4 -> 3 chunks of 3
    assert gen._chunk_size([C(mib)], 64, 10, 1, 4 * mib) == 4  # 4 + 4 + 2 (3 chunks)


@pytest.mark.parametrize("inplace", [False, True])
def test_direction_chunks_in_builds(inplace, monkeypatch):
    """Closed-form FIM (5 outputs) with a budget of one direction per backward pass and one
    example per chunk of patches: Diag equals brute force and KFAC the one-chunk build; KFAC's
    input factor of the convolutions is formed on the first chunk only."""
    model = _wide_cnn(inplace)
    x = torch.randn(6, 2, 5, 5, dtype=DT, generator=torch.Generator().manual_seed(1))
    loader = DataLoader(TensorDataset(x), batch_size=4)
    lc = LayerCollection.from_model(model)
    ref_kfac = FIM(model=model, loader=loader, representation=PMatKFAC)
    M = fim_dense(model, x, layer_collection=lc)
    monkeypatch.setattr(strategy, "DIRECTION_CHUNK_BYTES", 1)
    monkeypatch.setattr(conv, "PATCH_CHUNK_BYTES", 1)
    sizes = []
    orig_chunk = TorchHooksJacobianBackend._chunk_size

    def chunk_spy(self, *a, **k):
        sizes.append(orig_chunk(self, *a, **k))
        return sizes[-1]

    monkeypatch.setattr(TorchHooksJacobianBackend, "_chunk_size", chunk_spy)
    input_factor = []
    orig_kfac = conv.Conv2dLayer.kfac_factors

    def kfac_spy(self, module, xs, gy, approx="expand", input_factor_=True, **kw):
        flag = kw.get("input_factor", input_factor_)
        input_factor.append(flag)
        return orig_kfac(self, module, xs, gy, approx=approx, input_factor=flag)

    monkeypatch.setattr(conv.Conv2dLayer, "kfac_factors", kfac_spy)
    d = FIM(model=model, loader=loader, representation=PMatDiag).get_diag()
    scale = M.diagonal().abs().max().item()
    torch.testing.assert_close(d, M.diagonal(), atol=1e-11 * scale, rtol=0)
    kfac = FIM(model=model, loader=loader, representation=PMatKFAC)
    assert sizes and max(sizes) < 4  # chunks of directions did happen (the function has 4 rows)
    # 2 batches x 2 conv layers x chunks: input factor on the first chunk of each batch only
    n_chunks = -(-4 // sizes[-1])
    assert input_factor.count(True) == 2 * 2 and input_factor.count(False) == 2 * 2 * (n_chunks - 1)
    K1, K2 = kfac.to_torch(), ref_kfac.to_torch()
    torch.testing.assert_close(K1, K2, atol=1e-11 * K2.abs().max().item(), rtol=0)


def test_inplace_activation_after_conv():
    """``gy`` is the gradient w.r.t. the convolution's output, not w.r.t. the ReLU applied to it
    in place (the generator differentiates to the output's gradient edge)."""
    model = _wide_cnn(inplace=True)
    x = torch.randn(4, 2, 5, 5, dtype=DT, generator=torch.Generator().manual_seed(2))
    lc = LayerCollection.from_model(model)
    J = per_example_jacobian(model, x, lc)
    ref = (J ** 2).sum(dim=(0, 1)) / x.shape[0]
    d = TorchHooksJacobianBackend(model).get_covariance_diag((x,), lc)
    torch.testing.assert_close(d, ref, atol=1e-12 * ref.abs().max().item(), rtol=0)
