"""A tiny Hugging Face GPT-2 built from a config (no download), on a dict loader: Diag, KFAC and
Implicit against brute force (torch.func per-example Jacobians, float64)."""
import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

transformers = pytest.importorskip("transformers")

from nngeometry import FIM, EmpiricalFisher  # noqa: E402
from nngeometry.layercollection import LayerCollection  # noqa: E402
from nngeometry.object import PMatDense, PMatDiag, PMatImplicit, PMatKFAC, PVector  # noqa: E402

N, T, V = 2, 3, 50
# the brute-force references below sum over every position with its own token; the model's
# own convention (shifted labels, mean over tokens) is tested in tests/curvature/test_lm_losses.py
ALL_POSITIONS = dict(causal_lm=False, positions="sum")


def gpt2(tied=True):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=V, n_positions=32,
                                  attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
                                  tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = "eager"
    return transformers.GPT2LMHeadModel(cfg).double().eval()


def batch(with_positions=True, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (N, T), generator=g)
    b = {"input_ids": ids, "attention_mask": torch.ones(N, T, dtype=torch.long), "labels": ids}
    if with_positions:
        b["position_ids"] = torch.arange(T).expand(N, T)
    return b


def collection(model, skip=()):
    lc = LayerCollection()
    for name, mod in model.named_modules():
        if list(mod.parameters(recurse=False)) and name not in skip:
            lc.add_layer_from_model(model, mod)
    return lc


def brute_parts(model, b, lc):
    """``(J, Σ)``: per-example Jacobians ``(N, T·V, P)`` of the logits and the per-token
    softmax covariances, block-diagonal ``(N, T·V, T·V)``: the closed-form Fisher (sum over
    tokens) is ``Σ_i J_iᵀ Σ_i J_i / N``."""
    names = []
    for lid, layer in lc.layers.items():
        names += [f"{lid}.{p}" for p in layer.param_names()]
    allp = dict(model.named_parameters())
    params = {k: allp[k].detach() for k in names}
    inputs = {k: v for k, v in b.items() if k != "labels"}

    def f(p, one):
        out = functional_call(model, {**allp, **p}, (), {k: v.unsqueeze(0) for k, v in one.items()})
        return out.logits.reshape(-1)
    J = vmap(jacrev(f), (None, 0))(params, inputs)
    J = torch.cat([J[k].reshape(N, T * V, -1) for k in names], dim=2)
    with torch.no_grad():
        logits = model(**inputs).logits.reshape(N, T, V)
    p = torch.softmax(logits, -1)
    cov = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)  # (N, T, V, V)
    Sig = torch.stack([torch.block_diag(*cov[i]) for i in range(N)])
    return J, Sig


def brute_fim(model, b, lc):
    J, Sig = brute_parts(model, b, lc)
    return torch.einsum("ndp,nde,neq->pq", J, Sig, J) / N


def test_tied_model_diag_kfac_implicit():
    from nngeometry.backend import TorchHooksJacobianBackend
    from nngeometry.backend.model_and_data import default_function
    from nngeometry.object import PMatMixed
    from nngeometry.curvature import closed_form_function

    model = gpt2(tied=True)
    assert model.lm_head.weight is model.transformer.wte.weight
    b = batch()
    # tied_weights='sum' (the default) adds lm_head's use of the weight to wte's per-example
    # gradients; 'refuse' refuses the shared parameter
    with pytest.raises(ValueError, match="tied weights.*tied_weights='sum'"):
        LayerCollection.from_model(model, tied_weights="refuse")
    lc = LayerCollection.from_model(model)
    assert "lm_head" not in lc.layer_ids() and lc.tied["transformer.wte"][0][0] == "lm_head"
    J, Sig = brute_parts(model, b, lc)  # functional_call: both uses of the tied weight
    diag = FIM(model, [b], PMatDiag, layer_collection=lc, **ALL_POSITIONS).get_diag()
    torch.testing.assert_close(diag, torch.einsum("ndp,nde,nep->p", J, Sig, J) / N,
                               atol=1e-10, rtol=1e-8)
    imp = FIM(model, [b], PMatImplicit, layer_collection=lc, **ALL_POSITIONS)
    v = torch.randn(lc.numel(), dtype=torch.float64)
    ref_mv = torch.einsum("ndp,nde,ne->p", J, Sig, J @ v) / N
    torch.testing.assert_close(imp.mv(PVector(lc, vector_repr=v)).to_torch(), ref_mv,
                               atol=1e-10, rtol=1e-8)
    # KFAC: the tied layer's block is a sum of two Kronecker products: a PMatKFAC built
    # directly refuses it with advice...
    gen0 = TorchHooksJacobianBackend(model, closed_form_function(default_function(model),
                                                                 "classif_logits"))
    with pytest.raises(NotImplementedError, match="tied weights.*PMatMixed"):
        PMatKFAC(generator=gen0, examples=[b], layer_collection=lc)
    # ... the entry point gives the tied layer its exact diagonal, with a warning
    with pytest.warns(UserWarning, match="'transformer.wte'.*PMatDiag"):
        auto = FIM(model, [b], PMatKFAC, **ALL_POSITIONS)
    assert isinstance(auto, PMatMixed)
    torch.testing.assert_close(auto.get_diag()[lc.slice("transformer.wte")],
                               diag[lc.slice("transformer.wte")], atol=1e-10, rtol=1e-8)
    # ... KFAC on every other layer, the diagonal on the tied one
    gen = TorchHooksJacobianBackend(model, closed_form_function(default_function(model),
                                                                "classif_logits"))
    mixed = PMatMixed.from_mapping(lc, gen, PMatKFAC, {"transformer.wte": PMatDiag},
                                   examples=[b])
    d = mixed.get_diag()
    sl = lc.slice("transformer.wte")
    torch.testing.assert_close(d[sl], diag[sl], atol=1e-10, rtol=1e-8)
    assert torch.isfinite(d).all() and d.min() >= 0
    w = PVector(lc, vector_repr=torch.randn(lc.numel(), dtype=torch.float64))
    assert float(mixed.vTMv(w)) > 0


def test_position_embedding_broadcast_is_exact():
    """GPT-2 looks positions up with shape (1, T), broadcast over the batch: the hooks expand
    the lookup to the batch, so its per-example quantities are exact, as with batched
    position_ids."""
    model = gpt2(tied=False)
    lc = LayerCollection.from_model(model)
    sub = collection(model, skip=[n for n, _ in model.named_modules()
                                  if n not in ("transformer.wpe", "transformer.h.0.attn.c_attn")])
    for b in (batch(), batch(with_positions=False)):
        ref = brute_fim(model, b, sub)
        torch.testing.assert_close(
            FIM(model, [b], PMatDense, layer_collection=sub, **ALL_POSITIONS).to_torch(),
            ref, atol=1e-10, rtol=1e-8)
    b = batch()
    assert lc.numel() > sub.numel()
    # the default loss of the empirical Fisher reads the labels of the dict batch
    ef = EmpiricalFisher(model, [b], PMatDiag, layer_collection=sub, **ALL_POSITIONS).get_diag()
    assert torch.isfinite(ef).all() and ef.sum() > 0


class _Lin(nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.l1 = nn.Linear(conv.weight.shape[0], conv.weight.shape[1])
        with torch.no_grad():
            self.l1.weight.copy_(conv.weight.t())
            self.l1.bias.copy_(conv.bias)
        self.l2 = nn.Linear(conv.weight.shape[1], 3)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


def test_conv1d_is_a_transposed_linear():
    """Conv1D: every representation equals the nn.Linear model's with the weight transposed
    (indices permuted), KFAC included."""
    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(0)
    conv = Conv1D(5, 4).double()

    class M(nn.Module):
        def __init__(self, lin):
            super().__init__()
            self.l1, self.l2 = conv, lin.l2

        def forward(self, x):
            return self.l2(torch.tanh(self.l1(x)))
    lin = _Lin(conv).double()
    m = M(lin).double()
    x = torch.randn(6, 3, 4, dtype=torch.float64)  # with positions
    # flat index of the Conv1D layout -> Linear layout
    W = torch.arange(20).reshape(4, 5)  # Conv1D weight (in, out): entry (i, o)
    lin_index = (torch.arange(5).unsqueeze(0) * 4 + torch.arange(4).unsqueeze(1)).reshape(-1)
    perm = torch.cat([lin_index, torch.arange(20, 20 + 5 + 18)])
    assert W.numel() == 20
    for rep in (PMatDense, PMatKFAC):
        a = FIM(m, (x,), rep, class_dim=-1).to_torch()
        b = FIM(lin, (x,), rep, class_dim=-1).to_torch()[perm][:, perm]
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(FIM(m, (x,), PMatDiag, class_dim=-1).get_diag(),
                               FIM(lin, (x,), PMatDiag, class_dim=-1).get_diag()[perm])
