"""KFAC / EKFAC for nn.MultiheadAttention (several Kronecker blocks inside one layer), float64:
the recomputed per-position projection gradients against brute-force per-example gradients, the
exact blocks for sequences of length 1, every PMatKFAC / PMatEKFAC operation on a tiny
transformer against its own dense form, and EKFAC's diagonal against the exact Fisher."""
import pickle
import warnings

import pytest
import torch
from torch import nn

from _kfac_helpers import check_products, check_solve_against, close, damped_inv, dense_pow
from brute import fim_dense, per_example_jacobian
from models import make_transformer
from nngeometry.backend import TorchHooksJacobianBackend
from nngeometry.backend.consumers import Consumer
from nngeometry.layer_types.base import AbstractLayer
from nngeometry.layercollection import LayerCollection
from nngeometry.metrics import FIM
from nngeometry.object import (PMatEKFAC, PMatEKFACBlockDiag, PMatKFAC, random_pfmap,
                               random_pvector)

warnings.filterwarnings("ignore", message=".*performance drop.*")
DT = torch.float64
E = 4


class Att(nn.Module):
    """``head(flatten(tanh(mha(q, k, v))))`` with ``x (n, T, E)``; ``mode``: ``'self'``
    (q = k = v = x), ``'kv'`` (q = x, k = v = a memory computed from x, as a decoder's
    cross-attention), ``'qkv'`` (three different tensors)."""

    def __init__(self, mode="self", T=3, batch_first=True, kpm=False, causal=False, **mha_kw):
        super().__init__()
        self.mode, self.kpm, self.causal = mode, kpm, causal
        self.mha = nn.MultiheadAttention(E, 2, batch_first=batch_first, **mha_kw)
        self.pk = nn.Linear(E, mha_kw.get("kdim") or E, bias=False)
        self.pv = nn.Linear(E, mha_kw.get("vdim") or E, bias=False)
        self.head = nn.Linear(T * E, 3)

    def forward(self, x):
        if self.mode == "self":
            q = k = v = x
        elif self.mode == "kv":
            q, k = x, torch.tanh(self.pk(x))
            v = k
        else:
            q, k, v = x, self.pk(x), self.pv(x)
        kw = {}
        T = x.shape[1]
        if self.kpm:
            m = x[..., 0] > 0.7
            m[..., 0] = False  # never mask every key
            kw["key_padding_mask"] = m
        if self.causal:
            kw["attn_mask"] = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
            kw["is_causal"] = True
        if not self.mha.batch_first:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
            if v is not k and self.mode == "kv":
                v = k
        out = self.mha(q, k, v, need_weights=False, **kw)[0]
        if not self.mha.batch_first:
            out = out.transpose(0, 1)
        return self.head(torch.tanh(out).flatten(1))


def make(T=3, n=3, seed=0, **kw):
    torch.manual_seed(seed)
    model = Att(T=T, **kw).to(DT).eval()
    x = torch.randn(n, T, E, dtype=DT)
    lc_all = LayerCollection.from_model(model)
    return model, x, lc_all, lc_all.sub(["mha"])


class _Pieces(Consumer):
    """Collects, per batch, the attention layer's Kronecker pieces and per-example gradients."""

    def __init__(self):
        self.out = []

    def update(self, ctx):
        layer, module = ctx.layer_collection["mha"], ctx.modules["mha"]
        c = ctx.calls["mha"][0]
        self.out.append((layer.kfac_pieces(module, layer.inputs_of(c), c.gy),
                         ctx.per_example_grad("mha")))

    def finalize(self, n):
        pass


CONFIGS = {
    "self": dict(mode="self"),
    "self_time_major_kpm": dict(mode="self", batch_first=False, kpm=True),
    "self_causal": dict(mode="self", causal=True),
    # (not combined with is_causal: torch's SDPA path, taken for need_weights=False, then hides
    # the zero key that the explicit-mask path shows)
    "self_zero_attn_kpm": dict(mode="self", add_zero_attn=True, kpm=True),
    "self_nobias": dict(mode="self", bias=False),
    "cross_kv": dict(mode="kv", kpm=True),
    "cross_kv_time_major": dict(mode="kv", batch_first=False),
    "qkv": dict(mode="qkv"),
    "kdim_vdim": dict(mode="qkv", kdim=3, vdim=5),
}
# (input width, rows) of each Kronecker block, in layout order
BLOCKS = {"self": [(E, 3 * E), (E, E)], "kv": [(E, E), (E, 2 * E), (E, E)],
          "qkv": [(E, E), (E, E), (E, E), (E, E)], "kdim_vdim": [(E, E), (3, E), (5, E), (E, E)]}


def _blocks_of(name):
    return BLOCKS["kdim_vdim" if name == "kdim_vdim" else CONFIGS[name]["mode"]]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_pieces_rebuild_exact_per_example_gradients(name):
    """``Σ_s g_s [a_s, 1]ᵀ`` per block, re-indexed by kfac_permutation, is the brute-force
    per-example gradient of the whole attention layer (masks, time-major, cross-attention,
    separate kdim/vdim weights, add_zero_attn, causal)."""
    model, x, lc_all, lc = make(**CONFIGS[name])
    c = TorchHooksJacobianBackend(model).accumulate(x, lc, _Pieces())
    pieces, _ = c.out[0]
    bias = model.mha.in_proj_bias is not None
    assert [(a.shape[-1], g.shape[-1]) for a, g in pieces] == _blocks_of(name)
    kron = []
    for a, g in pieces:
        if bias:
            a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
        kron.append(torch.einsum("knso,nsi->knoi", g, a).reshape(*g.shape[:2], -1))
    layer = lc["mha"]
    rebuilt = torch.cat(kron, dim=-1)[..., layer.kfac_permutation()]
    ref = per_example_jacobian(model, x, lc_all).transpose(0, 1)[:, :, lc_all.slice("mha")]
    assert ref.abs().max() > 1e-3
    close(rebuilt, ref, rtol=1e-12)
    # the permutation is a bijection of the layer's coordinates
    perm = layer.kfac_permutation()
    assert torch.equal(torch.sort(perm).values, torch.arange(layer.numel()))


@pytest.mark.parametrize("name", ["self", "self_nobias", "cross_kv", "qkv", "kdim_vdim"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_single_position_blocks_are_exact(name, approx):
    """T = 1, one example: each Kronecker block (in_proj as one or several Linear blocks,
    out_proj) is the exact block of the Fisher (softmax over one key: trivial attention)."""
    model, x, lc_all, lc = make(T=1, n=1, **CONFIGS[name])
    F = fim_dense(model, x, "classif_logits", lc_all)[lc_all.slice("mha")][:, lc_all.slice("mha")]
    M = FIM(model, (x, None), PMatKFAC, layer_collection=lc, kfac_approx=approx)
    entry = M.data["mha"]
    assert isinstance(entry, tuple) and len(entry) == len(_blocks_of(name))
    sizes = [(G.shape[0], A.shape[0]) for A, G in entry]
    idx = lc["mha"].kfac_block_indices(sizes)
    for (A, G), ib in zip(entry, idx):
        close(torch.kron(G, A), F[ib][:, ib], rtol=1e-11, scale=float(F.abs().max()))
    # the value rows and out_proj carry the gradient at T = 1 (q, k rows are zero)
    assert F[idx[-1]][:, idx[-1]].abs().max() > 1e-4
    # cross-block couplings exist in F and are dropped by KFAC (block-diagonal in the layer)
    D = M.to_torch()
    assert F[idx[0]][:, idx[-1]].abs().max() > 1e-6 or F[idx[-2]][:, idx[-1]].abs().max() > 1e-6
    assert D[idx[-2]][:, idx[-1]].abs().max() == 0


def test_expand_scaling_and_reduce():
    """'expand': A sums (bias-augmented) inputs over positions, G sums gradients over positions
    divided by their count T; 'reduce': mean inputs, summed gradients (per example)."""
    model, x, lc_all, lc = make(T=3, n=3, mode="self")
    c = TorchHooksJacobianBackend(model).accumulate(x, lc, _Pieces())
    pieces, _ = c.out[0]
    gen = TorchHooksJacobianBackend(model)
    n, T = x.shape[:2]
    ex = gen.get_kfac_blocks(x, lc, approx="expand")["mha"]
    re = gen.get_kfac_blocks(x, lc, approx="reduce")["mha"]
    for (a, g), (Ae, Ge), (Ar, Gr) in zip(pieces, ex, re):
        a1 = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
        close(Ae, torch.einsum("nsi,nsj->ij", a1, a1) / n, rtol=1e-12)
        close(Ge, torch.einsum("knso,knsp->op", g, g) / (n * T), rtol=1e-12)
        am, gs = a1.mean(1), g.sum(2)
        close(Ar, am.t() @ am / n, rtol=1e-12)
        close(Gr, torch.einsum("kno,knp->op", gs, gs) / n, rtol=1e-12)


def test_kfe_diag_fast_path_equals_generic():
    """The attention layer's kfe_diag_blocks (from recomputed inputs and gradients) equals the
    generic projection of its torch.func per-example gradients."""
    model, x, lc_all, lc = make(mode="kv", kpm=True)
    layer = lc["mha"]

    class Both(Consumer):
        def update(self, ctx):
            c = ctx.calls["mha"][0]
            gen = torch.Generator().manual_seed(0)
            bases = []
            for d_in, rows in _blocks_of("cross_kv"):
                UA = torch.linalg.qr(torch.randn(d_in + 1, d_in + 1, dtype=DT, generator=gen))[0]
                UG = torch.linalg.qr(torch.randn(rows, rows, dtype=DT, generator=gen))[0]
                bases.append((UA, UG))
            bases[1] = (bases[1][0], 2 * E)  # an int identity basis too
            args = (ctx.modules["mha"], layer.inputs_of(c), c.gy, bases)
            self.fast = layer.kfe_diag_blocks(*args)
            self.generic = AbstractLayer.kfe_diag_blocks(layer, *args)

        def finalize(self, n):
            pass

    b = TorchHooksJacobianBackend(model).accumulate(x, lc, Both())
    assert len(b.fast) == 3
    for f, g in zip(b.fast, b.generic):
        close(f, g, rtol=1e-12)


# ---------------------------------------------------------------------- the tiny transformer
class TSetup:
    """The tiny transformer of tests/models.py restricted to the layers with KFAC (the root's
    learned position table is a generic layer)."""

    def __init__(self):
        self.model, self.x = make_transformer()
        lc_all = LayerCollection.from_model(self.model)
        self.lc = lc_all.sub([lid for lid in lc_all.layer_ids() if lid != ""])
        self.examples = (self.x, None)
        self.dense = fim_dense(self.model, self.x, "classif_logits", self.lc)

    def vec(self, seed=5):
        torch.manual_seed(seed)
        return random_pvector(self.lc, dtype=DT)

    def pfmap(self, seed=6, K=2, n=3):
        torch.manual_seed(seed)
        return random_pfmap(self.lc, K, n, dtype=DT)


@pytest.fixture(scope="module")
def tr():
    s = TSetup()
    K = FIM(s.model, s.examples, PMatKFAC, layer_collection=s.lc)
    E = FIM(s.model, s.examples, PMatEKFAC, layer_collection=s.lc)
    Eu = FIM(s.model, s.examples, PMatEKFAC, layer_collection=s.lc)
    Eu.update_diag(s.examples)
    return s, K, K.to_torch(), E, Eu, Eu.to_torch()


def _pi_dense(M, regul, power=-1.0, use_pi=True):
    """Block-diagonal (over layers and Kronecker blocks) of the π-damped factors' products."""
    lc = M.layer_collection
    P = lc.numel()
    out = torch.zeros(P, P, dtype=DT)
    sq = regul ** 0.5
    for lid, e in M.data.items():
        blocks = []
        for A, G in (e if isinstance(e[0], tuple) else [e]):
            A = torch.diag(A) if A.dim() == 1 else A
            G = torch.diag(G) if G.dim() == 1 else G
            pi = ((torch.trace(A) / A.shape[0]) / (torch.trace(G) / G.shape[0])) ** 0.5 \
                if use_pi else 1.0
            blocks.append(torch.kron(dense_pow(G + sq / pi * torch.eye(G.shape[0], dtype=DT), power),
                                     dense_pow(A + pi * sq * torch.eye(A.shape[0], dtype=DT), power)))
        perm = lc[lid].kfac_permutation()
        sl = lc.slice(lid)
        out[sl, sl] = torch.block_diag(*blocks)[perm][:, perm]
    return out


def test_transformer_structure_and_multiblock_consistency(tr):
    s, K, D, E, Eu, Du = tr
    entry = K.data["enc.self_attn"]
    # self-attention: in_proj is one Linear(8, 24) block, out_proj a Linear(8, 8) block
    assert isinstance(entry, tuple) and [(A.shape[0], G.shape[0]) for A, G in entry] == \
        [(9, 24), (9, 8)]
    assert K.data["head"][0].dim() == 2 and not isinstance(K.data["head"][0], tuple)
    lc = s.lc
    sl = lc.slice("enc.self_attn")
    Dk = K.to_torch(split_weight_bias=False)
    ref = torch.block_diag(*[torch.kron(G, A) for A, G in entry])
    close(Dk[sl, sl], ref, rtol=1e-14)
    perm = lc["enc.self_attn"].kfac_permutation()
    close(Dk[sl, sl][perm][:, perm], D[sl, sl], rtol=0)
    # block-diagonal inside the layer: nothing couples in_proj and out_proj
    i0, i1 = lc["enc.self_attn"].kfac_block_indices([(24, 9), (8, 9)])
    B = D[sl, sl]
    assert B[i0][:, i1].abs().max() == 0 and B[i0][:, i0].abs().max() > 0
    assert s.dense[sl, sl][i0][:, i1].abs().max() > 1e-6  # (and the exact Fisher has them)
    # the in_proj block in the flat layout: rows of in_proj_weight / in_proj_bias
    E_ = 8
    flat_w = (torch.arange(3 * E_).unsqueeze(1) * E_ + torch.arange(E_)).reshape(-1)
    assert set(i0.tolist()) == set(flat_w.tolist()) | set(range(3 * E_ * E_, 3 * E_ * E_ + 3 * E_))
    close(K.get_diag(split_weight_bias=False), torch.diagonal(Dk), rtol=1e-14)
    assert torch.linalg.eigvalsh(D).min() > -1e-12
    # EKFAC before update_diag equals KFAC, also in Kronecker order
    close(E.to_torch(), D, rtol=1e-11)
    close(E.to_torch(split_weight_bias=False), Dk, rtol=1e-11)
    close(PMatEKFAC.from_kfac(K).to_torch(), D, rtol=1e-11)


def test_transformer_kfac_operations(tr):
    s, K, D, E, Eu, Du = tr
    check_products(K, D, s)
    regul = 0.3
    for use_pi in (True, False):
        ref = _pi_dense(K, regul, use_pi=use_pi)
        check_solve_against(K, ref, s, regul=regul, use_pi=use_pi)
        close(K.inv(regul, use_pi=use_pi).to_torch(), ref, rtol=1e-8)
    exact = damped_inv(D, regul)
    check_solve_against(K, exact, s, regul=regul, damping="exact")
    Ki = K.inv(regul, damping="exact")
    assert isinstance(Ki, PMatEKFAC) and len(Ki.data[0]["enc.self_attn"]) == 2
    close(Ki.to_torch(), exact, rtol=1e-8)
    close(K.pow(2).to_torch(), D @ D, rtol=1e-10)
    close(K.pow(0.5, regul=0.2, damping="exact").to_torch(), dense_pow(D, 0.5, 0.2), rtol=1e-8)
    close(K.pow(-0.5, regul=0.2).to_torch(), _pi_dense(K, 0.2, power=-0.5), rtol=1e-8)
    eye = torch.eye(D.shape[0], dtype=DT)
    close(K.logdet(0.1), torch.logdet(D + 0.1 * eye), rtol=1e-10)
    close(K.logdet(0.1, damping="pi"), torch.logdet(_pi_dense(K, 0.1, power=1.0)), rtol=1e-10)
    close(K.mm(K).to_torch(), D @ D, rtol=1e-10)
    close((K + 2 * K).to_torch(), 3 * D)
    close((K / 4).to_torch(), D / 4)
    evals, evecs = K.get_eigendecomposition()
    eig = [((lA, UA), (lG, UG)) for (lA, lG), (UA, UG)
           in zip(evals["enc.self_attn"], evecs["enc.self_attn"])]
    assert len(eig) == 2
    for ((lA, UA), (lG, UG)), (A, G) in zip(eig, K.data["enc.self_attn"]):
        close((UA * lA) @ UA.t(), A, rtol=1e-12)
        close((UG * lG) @ UG.t(), G, rtol=1e-12)
    K2 = pickle.loads(pickle.dumps(K))
    close(K2.mv(s.vec()).get_flat_representation(), D @ s.vec().get_flat_representation())


def test_transformer_ekfac_update_diag_is_exact_projection(tr):
    """After update_diag, per layer (the attention layer's basis is block-diagonal over its
    Kronecker blocks) D = diag(Uᵀ F U) with F the exact Fisher of the transformer."""
    s, K, D, E, Eu, Du = tr
    F = s.dense
    for lid in s.lc.layer_ids():
        U = Eu.get_KFE(lid)
        sl = s.lc.slice(lid)
        close(U.t() @ U, torch.eye(U.shape[0], dtype=DT), rtol=1e-12)
        dl = Eu.data[1][lid]
        d = torch.cat(list(dl)) if isinstance(dl, tuple) else dl
        close(d, torch.diagonal(U.t() @ F[sl, sl] @ U), rtol=1e-10)
        close(Du[sl, sl], (U * d) @ U.t(), rtol=1e-12)
    assert (Du - D).abs().max() > 1e-8
    # building on a given eigenbasis = update_diag
    close(PMatEKFAC(s.lc, E.generator, examples=s.examples, eigendecomposition=K).to_torch(), Du,
          rtol=1e-11)
    close(PMatEKFAC(s.lc, E.generator, examples=s.examples, eigendecomposition=E).to_torch(), Du,
          rtol=1e-11)


def test_transformer_ekfac_operations(tr):
    s, K, D, E, Eu, Du = tr
    check_products(Eu, Du, s)
    regul = 0.3
    ref = damped_inv(Du, regul)
    check_solve_against(Eu, ref, s, regul=regul)
    close(Eu.inv(regul).to_torch(), ref, rtol=1e-8)
    close(Eu.pow(0.5).to_torch(), dense_pow(Du, 0.5), rtol=1e-7)
    close(Eu.pow(2).to_torch(), Du @ Du, rtol=1e-10)
    close(Eu.logdet(0.1), torch.logdet(Du + 0.1 * torch.eye(Du.shape[0], dtype=DT)), rtol=1e-10)
    close(Eu.get_diag(split_weight_bias=False), torch.diagonal(Eu.to_torch(False)))
    close((Eu + 2 * Eu).to_torch(), 3 * Du)
    close(Eu.mm(Eu.inv(0.1)).to_torch(), Du @ damped_inv(Du, 0.1), rtol=1e-8)
    E2 = pickle.loads(pickle.dumps(Eu))
    close(E2.to_torch(), Du, rtol=1e-14)
    bad = dict(Eu._store)
    b0, b1 = bad["enc.self_attn"]
    bad["enc.self_attn"] = (b0, (b1[0], b1[1], b1[2][:, :-1]))
    with pytest.raises(ValueError, match=r"layer 'enc.self_attn' \(block 1\)"):
        PMatEKFAC(s.lc, None, data=bad)


def test_transformer_ekfac_blockdiag():
    """PMatEKFACBlockDiag: the attention layer is now an EKFAC (multi-block) layer, the
    generic root layer a dense exact block."""
    model, x = make_transformer(n=3)
    lc = LayerCollection.from_model(model)
    M = FIM(model, (x, None), PMatEKFACBlockDiag, layer_collection=lc)
    assert M.dense_layers == [""] and "enc.self_attn" in M.ekfac_layers
    F = fim_dense(model, x, "classif_logits", lc)
    sl = lc.slice("")
    close(M.to_torch()[sl, sl], F[sl, sl], rtol=1e-10)
    M.update_diag((x, None))
    U = M.get_KFE("enc.self_attn")
    sl = lc.slice("enc.self_attn")
    d = torch.cat(list(M.data[1]["enc.self_attn"]))
    close(d, torch.diagonal(U.t() @ F[sl, sl] @ U), rtol=1e-10)


# ---------------------------------------------------------------------- refusals
def test_refusals():
    model, x, lc_all, lc = make(mode="qkv", kdim=3, vdim=5, add_bias_kv=True)
    assert not lc["mha"].supports_kfac
    with pytest.raises(NotImplementedError, match="'mha'.*MultiheadAttentionLayer"):
        FIM(model, (x, None), PMatKFAC, layer_collection=lc)
    with pytest.raises(NotImplementedError, match="add_bias_kv"):
        TorchHooksJacobianBackend(model).get_kfac_blocks(x, lc)
    # the same module as self- and cross-attention in one forward: blocks cannot be summed
    model, x, lc_all, lc = make(mode="self")

    class Twice(nn.Module):
        def __init__(self, att):
            super().__init__()
            self.att = att

        def forward(self, x):
            a = self.att.mha
            h = a(x, x, x)[0]
            return self.att.head(a(h, x, torch.tanh(x))[0].flatten(1))

    tw = Twice(model)
    lc2 = LayerCollection.from_model(tw).sub(["att.mha"])
    with pytest.raises(NotImplementedError, match="different number of Kronecker blocks"):
        TorchHooksJacobianBackend(tw).get_kfac_blocks(x, lc2)
    # dropout in training mode
    model, x, lc_all, lc = make(mode="self", dropout=0.5)
    model.train()
    with pytest.raises(RuntimeError, match="deterministic"):
        TorchHooksJacobianBackend(model).get_kfac_blocks(x, lc)


def test_projection_recorder_restores_linear_when_the_forward_raises():
    """The recorder points ``F.linear`` at a wrapper only while the attention runs in the
    generator's pass: after a build, and after a forward that raises inside the module, it is
    torch's own function again."""
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    linear = F.linear
    model, x, lc_all, lc = make(mode="self")
    gen = TorchHooksJacobianBackend(model)
    gen.get_covariance_diag(DataLoader(TensorDataset(x), batch_size=4), lc)
    assert F.linear is linear

    class Boom(Exception):
        pass

    def fail(*args, **kwargs):  # raises after the pre-hooks ran: the recorder is active
        F.linear(args[0], model.mha.out_proj.weight)
        raise Boom()

    model.mha.forward = fail
    try:
        with pytest.raises(Boom):
            gen.get_covariance_diag(DataLoader(TensorDataset(x), batch_size=4), lc)
    finally:
        del model.mha.forward
    assert F.linear is linear
