"""Every layer type against brute force (float64): per-example gradients, the diagonal and the
per-layer blocks of (1/n) Σ JᵀJ, KFAC factors where defined, refusals where not."""
import warnings

import pytest
import torch
from torch import nn

from brute import per_example_jacobian
from nngeometry.backend import TorchHooksJacobianBackend
from nngeometry.layercollection import (LayerCollection, UnsupportedLayerError, GenericLayer,
                                        EmbeddingLayer, MultiheadAttentionLayer, Conv1dLayer,
                                        ConvTranspose2dLayer, LinearLayer)
from nngeometry.layers import Affine1d, Cosine1d, WeightNorm1d, WeightNorm2d

warnings.filterwarnings("ignore", message=".*performance drop.*")
DT = torch.float64


class Wrap(nn.Module):
    """``head(flatten(tanh(layer(pre(x)))))``: the layer under test inside a small model, so that
    its output gradients are non-trivial; ``layer`` is the layer id."""

    def __init__(self, layer, n_out=3, pre=None, post=None):
        super().__init__()
        self.pre = pre
        self.layer = layer
        self.post = post
        self.head = nn.LazyLinear(n_out)

    def forward(self, x):
        if self.pre is not None:
            x = self.pre(x)
        h = self.layer(x)
        if self.post is not None:
            h = self.post(h)
        return self.head(torch.tanh(h).flatten(1))


class MaskedAttention(nn.Module):
    """MultiheadAttention with masks computed from each example's own input."""

    def __init__(self, mha, kpm=False, mask3d=False, kdim=None, vdim=None):
        super().__init__()
        self.mha, self.kpm, self.mask3d = mha, kpm, mask3d
        self.kproj = None if kdim is None else nn.Linear(mha.embed_dim, kdim, bias=False)
        self.vproj = None if vdim is None else nn.Linear(mha.embed_dim, vdim, bias=False)

    def forward(self, x):  # x: (n, T, E), batch first
        k = x if self.kproj is None else self.kproj(x)
        v = x if self.vproj is None else self.vproj(x)
        kw = {}
        if self.kpm:
            m = x[..., 0] > 0.8
            m[..., 0] = False  # never mask every key
            kw["key_padding_mask"] = m
        if self.mask3d:
            T = x.shape[1]
            scores = (x[..., 1:2] * x[..., 1:2].transpose(1, 2)) > 0.5  # (n, T, T)
            scores = scores & ~torch.eye(T, dtype=torch.bool)
            kw["attn_mask"] = scores.repeat_interleave(self.mha.num_heads, dim=0)
        if not self.mha.batch_first:
            x, k, v = x.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        out = self.mha(x, k, v, **kw)[0]
        return out if self.mha.batch_first else out.transpose(0, 1)


class Quad(nn.Module):
    """A user's own layer with parameters of several shapes and a keyword argument."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, d) * 0.3)
        self.s = nn.Parameter(torch.randn(d))

    def forward(self, x, power=2):
        return x @ self.w.t() + self.s * x ** power


def _x(*shape):
    return torch.randn(*shape, dtype=DT)


def _idx(n, T, V):
    i = torch.randint(0, V, (n, T))
    i[0, 0] = 1  # padding index present
    i[1, :2] = 2  # repeated index within an example
    return i


# name -> (model factory, input factory, layer id under test)
CASES = {
    "linear_seq": (lambda: Wrap(nn.Linear(3, 4)), lambda: _x(4, 5, 3)),
    "linear_nobias": (lambda: Wrap(nn.Linear(3, 4, bias=False)), lambda: _x(4, 3)),
    "conv1d": (lambda: Wrap(nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2)),
               lambda: _x(3, 4, 11)),
    "conv1d_same_even": (lambda: Wrap(nn.Conv1d(4, 6, 4, padding="same")), lambda: _x(3, 4, 9)),
    "conv1d_reflect": (lambda: Wrap(nn.Conv1d(4, 6, 3, padding=2, padding_mode="reflect",
                                              bias=False)), lambda: _x(3, 4, 9)),
    "conv2d": (lambda: Wrap(nn.Conv2d(4, 6, (2, 3), stride=(2, 1), padding=(1, 0),
                                      dilation=(1, 2), groups=2)), lambda: _x(3, 4, 7, 8)),
    "conv2d_circular": (lambda: Wrap(nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular")),
                        lambda: _x(3, 2, 5, 4)),
    "conv3d": (lambda: Wrap(nn.Conv3d(2, 3, (2, 2, 3), stride=(1, 2, 1), padding=1,
                                      dilation=(2, 1, 1))), lambda: _x(2, 2, 5, 6, 5)),
    "convT1d": (lambda: Wrap(nn.ConvTranspose1d(4, 6, 3, stride=2, padding=1, output_padding=1,
                                                dilation=2, groups=2)), lambda: _x(3, 4, 5)),
    "convT2d": (lambda: Wrap(nn.ConvTranspose2d(4, 6, (2, 3), stride=(2, 3), padding=(1, 2),
                                                output_padding=(1, 0))), lambda: _x(3, 4, 4, 5)),
    "convT2d_crop": (lambda: Wrap(nn.ConvTranspose2d(2, 3, 3, padding=4, bias=False)),
                     lambda: _x(2, 2, 9, 9)),
    "convT3d": (lambda: Wrap(nn.ConvTranspose3d(2, 4, 2, stride=2, groups=2)),
                lambda: _x(2, 2, 3, 2, 3)),
    "bn1d": (lambda: Wrap(nn.BatchNorm1d(4)), lambda: _x(5, 4)),
    "bn1d_seq": (lambda: Wrap(nn.BatchNorm1d(4)), lambda: _x(5, 4, 3)),
    "bn2d": (lambda: Wrap(nn.BatchNorm2d(3)), lambda: _x(4, 3, 3, 2)),
    "bn3d": (lambda: Wrap(nn.BatchNorm3d(2)), lambda: _x(3, 2, 2, 3, 2)),
    "groupnorm": (lambda: Wrap(nn.GroupNorm(2, 4)), lambda: _x(3, 4, 3, 2)),
    "layernorm": (lambda: Wrap(nn.LayerNorm((3, 4))), lambda: _x(3, 2, 3, 4)),
    "layernorm_nobias": (lambda: Wrap(nn.LayerNorm(4, bias=False)), lambda: _x(3, 5, 4)),
    "rmsnorm": (lambda: Wrap(nn.RMSNorm(4)), lambda: _x(3, 5, 4)),
    "instancenorm1d": (lambda: Wrap(nn.InstanceNorm1d(3, affine=True)), lambda: _x(3, 3, 6)),
    "instancenorm2d_running": (lambda: Wrap(nn.InstanceNorm2d(3, affine=True,
                                                              track_running_stats=True)),
                               lambda: _x(3, 3, 3, 4)),
    "instancenorm3d": (lambda: Wrap(nn.InstanceNorm3d(2, affine=True)), lambda: _x(2, 2, 2, 3, 2)),
    "embedding": (lambda: Wrap(nn.Embedding(6, 3, padding_idx=1)), lambda: _idx(4, 5, 6)),
    "embedding_freq": (lambda: Wrap(nn.Embedding(6, 3, scale_grad_by_freq=True)),
                       lambda: _idx(4, 5, 6)),
    "mha": (lambda: Wrap(MaskedAttention(nn.MultiheadAttention(4, 2, batch_first=True))),
            lambda: _x(3, 5, 4)),
    "mha_time_major_masks": (lambda: Wrap(MaskedAttention(
        nn.MultiheadAttention(4, 2), kpm=True, mask3d=True)), lambda: _x(3, 5, 4)),
    "mha_kvdim_biaskv": (lambda: Wrap(MaskedAttention(
        nn.MultiheadAttention(4, 2, batch_first=True, kdim=3, vdim=5, add_bias_kv=True),
        kdim=3, vdim=5, kpm=True)), lambda: _x(3, 5, 4)),
    # separate q/k/v projection weights (kdim/vdim) and a Kronecker layout: per-example
    # gradients and diagonal from the recomputed projections (not the torch.func path)
    "mha_kvdim": (lambda: Wrap(MaskedAttention(
        nn.MultiheadAttention(4, 2, batch_first=True, kdim=3, vdim=5), kdim=3, vdim=5,
        kpm=True)), lambda: _x(3, 5, 4)),
    "mha_nobias_zero_attn": (lambda: Wrap(MaskedAttention(
        nn.MultiheadAttention(4, 2, bias=False, add_zero_attn=True), mask3d=True)),
        lambda: _x(3, 5, 4)),
    "weightnorm1d": (lambda: Wrap(WeightNorm1d(4, 3)), lambda: _x(4, 4)),
    "weightnorm2d": (lambda: Wrap(WeightNorm2d(2, 3, 2, stride=1, padding=1)),
                     lambda: _x(3, 2, 4, 4)),
    "cosine1d": (lambda: Wrap(Cosine1d(4, 3)), lambda: _x(4, 4)),
    "affine1d": (lambda: Wrap(Affine1d(4)), lambda: _x(4, 4)),
    "affine1d_nobias_seq": (lambda: Wrap(Affine1d(4, bias=False)), lambda: _x(4, 3, 4)),
    "generic": (lambda: Wrap(Quad(4)), lambda: _x(4, 4)),
}
LAYER_ID = {"mha": "layer.mha", "mha_time_major_masks": "layer.mha",
            "mha_kvdim_biaskv": "layer.mha", "mha_kvdim": "layer.mha",
            "mha_nobias_zero_attn": "layer.mha"}


def build(name, seed=0):
    torch.manual_seed(seed)
    make_model, make_x = CASES[name]
    model = make_model().double()
    x = make_x()
    model(x)  # materialize the lazy head
    model = model.double().eval()
    with torch.no_grad():  # non-trivial affine parameters and running statistics
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 1.5)
            if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm,
                              nn.RMSNorm, Affine1d)):
                m.weight.normal_(1, 0.3)
                if getattr(m, "bias", None) is not None:
                    m.bias.normal_(0, 0.3)
    lid = LAYER_ID.get(name, "layer")
    lc_all = LayerCollection.from_model(model)
    return model, x, lc_all, lc_all.sub([lid]), lid


@pytest.mark.parametrize("name", list(CASES))
def test_per_example_diag_blocks(name):
    model, x, lc_all, lc, lid = build(name)
    gen = TorchHooksJacobianBackend(model)
    J_ref = per_example_jacobian(model, x, lc_all).transpose(0, 1)  # (K, n, P)
    J = gen.get_jacobian(x, lc_all)
    scale = J_ref.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(J, J_ref, atol=1e-11 * scale, rtol=0)
    # the layer alone: diagonal and block of (1/n) Σ JᵀJ
    n = x.shape[0]
    Jl = J_ref[:, :, lc_all.slice(lid)]
    assert Jl.abs().max() > 0, "the layer under test must have non-zero gradients"
    diag = gen.get_covariance_diag(x, lc)
    torch.testing.assert_close(diag, (Jl ** 2).sum(dim=(0, 1)) / n,
                               atol=1e-11 * scale ** 2, rtol=0)
    block = gen.get_covariance_layer_blocks(x, lc)[lid]
    Jf = Jl.reshape(-1, Jl.shape[-1])
    torch.testing.assert_close(block, Jf.t() @ Jf / n, atol=1e-11 * scale ** 2, rtol=0)
    assert diag.dtype == DT and block.dtype == DT


def _kfac_dense(lc, lid, A, G):
    """The layer's KFAC block in the flat layout: kron(G, A) re-indexed by kfac_permutation."""
    A = torch.diag(A) if A.dim() == 1 else A
    perm = lc[lid].kfac_permutation()
    return torch.kron(G, A)[perm][:, perm]


def _exact_block(model, x, lc, lid):
    J = per_example_jacobian(model, x, lc)  # (n, K, P)
    J = J.reshape(-1, J.shape[-1])
    return J.t() @ J / x.shape[0]


@pytest.mark.parametrize("name", ["bn2d", "bn1d_seq", "groupnorm", "layernorm",
                                  "layernorm_nobias", "rmsnorm", "instancenorm2d_running",
                                  "affine1d", "affine1d_nobias_seq"])
def test_kfac_norm_layers_exact(name):
    # A = [[n]], G = the full layer block: KFAC is the exact block, for any batch
    model, x, _, lc, lid = build(name)
    A, G = TorchHooksJacobianBackend(model).get_kfac_blocks(x, lc)[lid]
    assert A.shape == (1, 1) and A.item() == 1.0
    exact = _exact_block(model, x, lc, lid)
    torch.testing.assert_close(_kfac_dense(lc, lid, A, G), exact, atol=1e-12 * exact.abs().max().item(),
                               rtol=0)


def test_kfac_linear_one_position_exact_and_factors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), MeanPositions(), nn.Linear(4, 2)).double()
    x = _x(1, 1, 3)  # one example, one position: KFAC (expand and reduce) is exact
    lc = LayerCollection.from_model(model).sub(["0"])
    gen = TorchHooksJacobianBackend(model)
    exact = _exact_block(model, x, lc, "0")
    for approx in ("expand", "reduce"):
        A, G = gen.get_kfac_blocks(x, lc, approx=approx)["0"]
        torch.testing.assert_close(_kfac_dense(lc, "0", A, G), exact, atol=1e-13, rtol=0)
    # several positions: the factors follow their definitions
    x = _x(3, 4, 3)
    n, T = 3, 4
    a = torch.cat([x, torch.ones(n, T, 1, dtype=DT)], dim=2)
    with torch.no_grad():
        h = model[0](x)
    gy = per_example_gy(model, x, h)  # (K, n, T, out)
    A, G = gen.get_kfac_blocks(x, lc, approx="expand")["0"]
    aa = a.reshape(-1, 4)
    torch.testing.assert_close(A, aa.t() @ aa / n, atol=1e-13, rtol=0)
    gg = gy.reshape(-1, 4)
    torch.testing.assert_close(G, gg.t() @ gg / (T * n), atol=1e-13, rtol=0)
    A, G = gen.get_kfac_blocks(x, lc, approx="reduce")["0"]
    am = a.mean(dim=1)
    torch.testing.assert_close(A, am.t() @ am / n, atol=1e-13, rtol=0)
    gs = gy.sum(dim=2).reshape(-1, 4)
    torch.testing.assert_close(G, gs.t() @ gs / n, atol=1e-13, rtol=0)


class MeanPositions(nn.Module):
    def forward(self, h):
        return h.mean(dim=1)


def per_example_gy(model, x, h):
    """Gradients of each output ``(n, K)`` w.r.t. model[0]'s output h: ``(K, n, T, out)``
    (examples are independent, so the gradient of the sum over examples is per example)."""
    h = h.clone().requires_grad_(True)
    out = model[1:](h)
    return torch.stack([torch.autograd.grad(out[:, k].sum(), h, retain_graph=True)[0]
                        for k in range(out.shape[1])])


def test_kfac_reduce_exact_for_position_constant_inputs():
    # inputs identical at all positions: reduce is exact (one example)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Flatten(), nn.Linear(20, 2)).double()
    x = _x(1, 1, 3).expand(1, 5, 3).contiguous()
    lc = LayerCollection.from_model(model).sub(["0"])
    A, G = TorchHooksJacobianBackend(model).get_kfac_blocks(x, lc, approx="reduce")["0"]
    exact = _exact_block(model, x, lc, "0")
    torch.testing.assert_close(_kfac_dense(lc, "0", A, G), exact, atol=1e-12, rtol=0)


@pytest.mark.parametrize("conv", [
    lambda: nn.Conv2d(2, 3, 2), lambda: nn.Conv1d(2, 3, 3, dilation=2), lambda: nn.Conv3d(2, 3, 2),
    lambda: nn.ConvTranspose2d(2, 3, 2, padding=1),  # equivalent direct conv has no padding
    lambda: nn.ConvTranspose1d(2, 3, 3, padding=2, bias=False)])
def test_kfac_conv_spatially_constant_rule(conv):
    # spatially constant input, gradients constant over locations (mean pooling right after):
    # the exact block is L x KFAC('expand'), and KFAC('reduce') is exact
    torch.manual_seed(0)
    c = conv().double()
    d = c.weight.dim() - 2
    pool = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[d](1)
    model = nn.Sequential(c, pool, nn.Flatten(), nn.Linear(3, 2)).double()
    x = _x(1, 2, *([1] * d)).expand(1, 2, *([5] * d)).contiguous()
    lc = LayerCollection.from_model(model).sub(["0"])
    gen = TorchHooksJacobianBackend(model)
    L = model[0](x)[0, 0].numel()
    exact = _exact_block(model, x, lc, "0")
    assert exact.abs().max() > 0
    A, G = gen.get_kfac_blocks(x, lc)["0"]
    torch.testing.assert_close(L * _kfac_dense(lc, "0", A, G), exact, atol=1e-12, rtol=0)
    A, G = gen.get_kfac_blocks(x, lc, approx="reduce")["0"]
    torch.testing.assert_close(_kfac_dense(lc, "0", A, G), exact, atol=1e-12, rtol=0)


def test_kfac_embedding_diagonal_input_factor():
    model, x, _, lc, lid = build("embedding")
    gen = TorchHooksJacobianBackend(model)
    A, G = gen.get_kfac_blocks(x, lc)[lid]
    n, T = x.shape
    assert A.shape == (6,)  # diagonal, never V x V
    counts = torch.bincount(x.reshape(-1), minlength=6).to(DT)
    counts[1] = 0  # padding_idx gets no gradient
    torch.testing.assert_close(A, counts / n, atol=0, rtol=0)
    assert G.shape == (3, 3)
    # one example, one position: exact block
    x1 = x[2:3, :1]
    model1 = Wrap(nn.Embedding(6, 3, padding_idx=1)).double()
    model1(x1)
    lc1 = LayerCollection.from_model(model1).sub(["layer"])
    A, G = TorchHooksJacobianBackend(model1).get_kfac_blocks(x1, lc1)["layer"]
    exact = _exact_block(model1, x1, lc1, "layer")
    torch.testing.assert_close(_kfac_dense(lc1, "layer", A, G), exact, atol=1e-13, rtol=0)
    with pytest.raises(NotImplementedError, match="reduce"):
        gen.get_kfac_blocks(x, lc, approx="reduce")


@pytest.mark.parametrize("name,match", [
    ("conv1d", "grouped"), ("mha_kvdim_biaskv", "add_bias_kv"), ("generic", "Quad"),
    ("weightnorm1d", "WeightNorm1d"), ("cosine1d", "Cosine1d"), ("embedding_freq", "scale_grad")])
def test_kfac_refusals(name, match):
    model, x, _, lc, lid = build(name)
    with pytest.raises(NotImplementedError, match=match):
        TorchHooksJacobianBackend(model).get_kfac_blocks(x, lc)


def test_spec_flags_and_layouts():
    model, x, lc_all, lc, lid = build("mha_kvdim_biaskv")
    layer = lc[lid]
    assert isinstance(layer, MultiheadAttentionLayer) and not layer.supports_kfac
    assert layer.param_names() == ["q_proj_weight", "k_proj_weight", "v_proj_weight",
                                   "in_proj_bias", "bias_k", "bias_v", "out_proj.weight",
                                   "out_proj.bias"]
    assert "layer.mha.out_proj" not in lc_all  # held by the attention layer
    assert layer.numel() == sum(p.numel() for p in model.layer.mha.parameters())
    assert not Conv1dLayer(4, 6, 3, groups=2).supports_kfac and Conv1dLayer(4, 6, 3).supports_kfac
    assert ConvTranspose2dLayer(2, 3, 2).weight.size == (2, 3, 2, 2)
    g = LayerCollection.from_model(build("generic")[0])["layer"]
    assert isinstance(g, GenericLayer) and g.param_names() == ["w", "s"] and "Quad" in repr(g)
    e = EmbeddingLayer(4, 3)
    perm = e.kfac_permutation()
    assert perm[1 * 3 + 2] == 2 * 4 + 1  # (v=1, d=2) -> d*V + v
    assert LinearLayer(3, 2) == LinearLayer(3, 2) and LinearLayer(3, 2) != LinearLayer(3, 2, False)


def test_mha_out_proj_hook_never_fires_but_layer_is_right():
    # the nested out_proj Linear is part of the attention layer, with a correct block
    model, x, lc_all, lc, lid = build("mha")
    J = per_example_jacobian(model, x, lc).transpose(0, 1)
    J2 = TorchHooksJacobianBackend(model).get_jacobian(x, lc)
    nw = model.layer.mha.in_proj_weight.numel() + model.layer.mha.in_proj_bias.numel()
    assert J[:, :, nw:].abs().max() > 0  # out_proj part is non-zero
    torch.testing.assert_close(J2, J, atol=1e-12, rtol=0)


def test_rnn_refused_and_ignorable():
    model = nn.Sequential(nn.Linear(3, 4), nn.LSTM(4, 4, batch_first=True))
    with pytest.raises(UnsupportedLayerError, match="LSTM.*ignore_unsupported_layers=True"):
        LayerCollection.from_model(model)
    lc = LayerCollection.from_model(model, ignore_unsupported_layers=True)
    assert lc.layer_ids() == ["0"]


def test_batchnorm_train_mode_refused():
    # in training mode the batch statistics couple the examples: per-example Jacobians are not
    # defined, so the generator refuses (naming the layer and the fix) and leaves the model as
    # it was; in eval mode the same layer is accepted
    model, x, lc_all, lc, lid = build("bn2d")
    model.train()
    with pytest.raises(RuntimeError, match=r"BatchNorm layer 'layer'.*model\.eval\(\)"):
        TorchHooksJacobianBackend(model).get_jacobian(x, lc)
    with pytest.raises(RuntimeError, match="training mode"):
        TorchHooksJacobianBackend(model).implicit_mv(torch.ones(lc.numel(), dtype=DT), x, lc)
    model2, _, _, _, _ = build("bn2d")
    torch.testing.assert_close(model.layer.running_mean, model2.layer.running_mean, atol=0, rtol=0)
    assert all(not m._forward_hooks for m in model.modules())
    model.eval()
    assert TorchHooksJacobianBackend(model).get_jacobian(x, lc).shape[1] == x.shape[0]


def test_random_forward_refused():
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3, dtype=DT))

        def forward(self, x):
            return nn.functional.dropout(x * self.w, 0.5, training=True)

    model = nn.Sequential(Noisy(), nn.Linear(3, 2)).double()
    lc = LayerCollection.from_model(model).sub(["0"])
    with pytest.raises(RuntimeError, match="deterministic"):
        TorchHooksJacobianBackend(model).get_jacobian(_x(4, 3), lc)


def _orth(d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, d, generator=g, dtype=DT))[0]


@pytest.mark.parametrize("case", ["embedding_pad", "embedding_freq", "linear_seq",
                                  "linear_seq_nobias", "conv2d", "conv_transpose2d_groups"])
def test_layer_fast_paths_equal_per_example_route(case):
    """The layer types' own diag / kfe_diag (no (K, n, numel) per-example gradients: chunks of
    directions, projections per position, sums per (example, index) pair) equal the generic
    route through per_example_grad, on repeated indices, padding and several positions."""
    from nngeometry.layer_types import AbstractLayer
    torch.manual_seed(0)
    K, n = 3, 4
    if case.startswith("embedding"):
        mod = nn.Embedding(7, 5, padding_idx=2, scale_grad_by_freq=case.endswith("freq")).to(DT)
        x = torch.randint(0, 7, (n, 6))
        x[0, :3] = 2  # padding positions
        x[1, :4] = 3  # an index repeated in one example
        gy = torch.randn(K, n, 6, 5, dtype=DT)
    elif case.startswith("linear"):
        mod = nn.Linear(4, 3, bias=case == "linear_seq").to(DT)
        x = torch.randn(n, 2, 5, 4, dtype=DT)
        gy = torch.randn(K, n, 2, 5, 3, dtype=DT)
    elif case == "conv2d":
        mod = nn.Conv2d(3, 4, 3, padding=1).to(DT)
        x = torch.randn(n, 3, 5, 6, dtype=DT)
        gy = torch.randn(K, n, 4, 5, 6, dtype=DT)
    else:
        mod = nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2).to(DT)
        x = torch.randn(n, 4, 3, 3, dtype=DT)
        gy = torch.randn((K,) + tuple(mod(x).shape), dtype=DT)
    layer = LayerCollection.from_model(nn.Sequential(mod)).layers["0"]
    g = layer.per_example_grad(mod, x, gy)
    scale = g.abs().max().item() ** 2
    assert scale > 0
    torch.testing.assert_close(layer.diag(mod, x, gy), (g * g).sum(dim=(0, 1)),
                               atol=1e-12 * scale, rtol=0)
    torch.testing.assert_close(AbstractLayer.diag(layer, mod, x, gy), (g * g).sum(dim=(0, 1)),
                               atol=1e-12 * scale, rtol=0)
    if not layer.supports_kfac or case.startswith("conv") or case == "embedding_freq":
        return
    perm = layer.kfac_permutation()
    if case.startswith("embedding"):
        UA, UG = layer.num_embeddings, _orth(layer.embedding_dim, 1)
    else:
        dA = layer.in_features + (1 if layer.bias is not None else 0)
        UA, UG = _orth(dA, 1), _orth(layer.out_features, 2)
    fast = layer.kfe_diag(mod, x, gy, UA, UG)
    ref = AbstractLayer.kfe_diag(layer, mod, x, gy, UA, UG)
    assert fast.shape == ref.shape and perm.numel() == ref.numel()
    torch.testing.assert_close(fast, ref, atol=1e-12 * scale, rtol=0)
