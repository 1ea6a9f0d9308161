"""Hugging Face architectures built from ``transformers`` configs (random weights, tiny widths,
float64, no download), with the plain call ``FIM(model, [batch_dict], representation)``: no
batch rewriting (positions looked up with shape (1, T)), tied embeddings as the model has them.
Each is compared to a brute-force reference: per-example Jacobians of the logits by
``torch.func.jacrev``, example by example, w.r.t. every parameter of the collection, and the
closed-form Fisher ``(1/n) Σ_i J_iᵀ Σ_i J_i`` with ``Σ_i`` the block-diagonal softmax
covariances of the positions (for the causal LMs, their own loss convention: position ``t``
describes token ``t + 1``, the last position nothing, and each sequence's terms are averaged
over its ``T − 1`` predicted tokens)."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, jacrev

transformers = pytest.importorskip("transformers")

from nngeometry import FIM, FIM_MonteCarlo, EmpiricalFisher, GGN  # noqa: E402
from nngeometry.layercollection import LayerCollection  # noqa: E402
from nngeometry.object import (PMatDense, PMatDiag, PMatImplicit, PMatKFAC,  # noqa: E402
                               PMatMixed, PVector)

N, T, V, C = 2, 3, 20, 3
TOL = dict(atol=1e-10, rtol=1e-8)


@pytest.fixture(scope="module", autouse=True)
def float64_throughout():
    """Some Hugging Face modules compute in float32 whatever the model's dtype (attention
    softmax with ``dtype=torch.float32``, Llama's and T5's RMS norms): their outputs, and
    every matrix, would carry float32 rounding, the same function computed by two routes
    differing by ~1e-9. For the duration of this module they keep float64 (same maths)."""
    from transformers.models.llama import modeling_llama
    from transformers.models.t5 import modeling_t5

    softmax = F.softmax

    def softmax64(x, dim=None, _stacklevel=3, dtype=None):
        if dtype is not None and x.dtype == torch.float64:
            dtype = None
        return softmax(x, dim=dim, dtype=dtype)

    def rms_norm(self, h):
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.functional, "softmax", softmax64)
        mp.setattr(modeling_llama.LlamaRMSNorm, "forward", rms_norm)
        mp.setattr(modeling_t5.T5LayerNorm, "forward", rms_norm)
        yield


def _tiny(cls, **kw):
    cfg = cls(**kw)
    cfg._attn_implementation = "eager"
    return cfg


def build(name):
    torch.manual_seed(0)
    if name == "gpt2":
        m = transformers.GPT2LMHeadModel(_tiny(
            transformers.GPT2Config, n_layer=1, n_embd=8, n_head=2, vocab_size=V,
            n_positions=8, bos_token_id=0, eos_token_id=0))
    elif name == "pythia":
        m = transformers.GPTNeoXForCausalLM(_tiny(
            transformers.GPTNeoXConfig, num_hidden_layers=1, hidden_size=8, num_attention_heads=2,
            intermediate_size=16, vocab_size=V, max_position_embeddings=8, rotary_pct=0.5,
            bos_token_id=0, eos_token_id=0))
    elif name in ("llama", "llama_tied"):
        m = transformers.LlamaForCausalLM(_tiny(
            transformers.LlamaConfig, num_hidden_layers=1, hidden_size=8, num_attention_heads=2,
            num_key_value_heads=1, intermediate_size=12, vocab_size=V,
            max_position_embeddings=8, tie_word_embeddings=name == "llama_tied",
            bos_token_id=0, eos_token_id=0))
    elif name == "bert":
        m = transformers.BertForSequenceClassification(_tiny(
            transformers.BertConfig, num_hidden_layers=1, hidden_size=8, num_attention_heads=2,
            intermediate_size=12, vocab_size=V, max_position_embeddings=8, num_labels=C,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    elif name == "vit":
        m = transformers.ViTForImageClassification(_tiny(
            transformers.ViTConfig, num_hidden_layers=1, hidden_size=8, num_attention_heads=2,
            intermediate_size=12, image_size=8, patch_size=4, num_channels=2, num_labels=C))
    elif name == "t5":
        m = transformers.T5ForConditionalGeneration(_tiny(
            transformers.T5Config, num_layers=1, num_decoder_layers=1, d_model=8, d_kv=4,
            num_heads=2, d_ff=12, vocab_size=V, decoder_start_token_id=0,
            relative_attention_num_buckets=4, dropout_rate=0.0))
    else:
        raise ValueError(name)
    m = m.double().eval()
    with torch.no_grad():  # a non-trivial point (some initialisations are zeros or ones)
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def batch(name, seed=1):
    g = torch.Generator().manual_seed(seed)
    if name == "vit":
        return {"pixel_values": torch.randn(N, 2, 8, 8, generator=g, dtype=torch.float64),
                "labels": torch.randint(0, C, (N,), generator=g)}
    ids = torch.randint(0, V, (N, T), generator=g)
    b = {"input_ids": ids, "attention_mask": torch.ones(N, T, dtype=torch.long)}
    if name == "bert":
        b["labels"] = torch.randint(0, C, (N,), generator=g)
    elif name == "t5":
        b["decoder_input_ids"] = torch.randint(0, V, (N, T), generator=g)
        b["labels"] = torch.randint(0, V, (N, T), generator=g)
    else:
        b["labels"] = ids
    return b


def names_of(model, lc):
    return [f"{lid}.{p}" for lid, layer in lc.layers.items() for p in layer.param_names()]


CAUSAL = ("gpt2", "pythia", "llama", "llama_tied")


def brute_parts(model, b, lc, causal=False):
    """``(J, Σ)``: per-example Jacobians ``(N, D, P)`` of the logits (``D`` = positions ×
    classes) and the block-diagonal softmax covariances ``(N, D, D)`` (``causal``: weighted
    ``1/(T−1)`` on the first ``T − 1`` positions, 0 on the last)."""
    names = names_of(model, lc)
    allp = dict(model.named_parameters())
    params = {k: allp[k].detach() for k in names}
    inputs = {k: v for k, v in b.items() if k != "labels"}
    Js, logits = [], []
    for i in range(N):
        one = {k: v[i:i + 1] for k, v in inputs.items()}

        def f(p):
            return functional_call(model, {**allp, **p}, (), one).logits.reshape(-1)
        J = jacrev(f)(params)
        Js.append(torch.cat([J[k].reshape(J[k].shape[0], -1) for k in names], dim=1))
        with torch.no_grad():
            logits.append(model(**one).logits.reshape(-1, model.config.num_labels
                                                      if "labels" in b and b["labels"].dim() == 1
                                                      else V))
    p = torch.softmax(torch.stack(logits), -1)  # (N, positions, classes)
    cov = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    if causal:
        w = torch.full((cov.shape[1],), 1.0 / (cov.shape[1] - 1), dtype=cov.dtype)
        w[-1] = 0
        cov = cov * w[:, None, None]
    Sig = torch.stack([torch.block_diag(*cov[i]) for i in range(N)])
    return torch.stack(Js), Sig


ARCHS = ["gpt2", "pythia", "llama", "llama_tied", "bert", "vit", "t5"]


@pytest.fixture(scope="module", params=ARCHS)
def arch(request):
    name = request.param
    model = build(name)
    b = batch(name)
    lc = LayerCollection.from_model(model)
    # T5: the encoder's and decoder's embeddings (and the head) share one matrix
    assert bool(lc.tied) == (name in ("gpt2", "llama_tied", "t5"))
    J, Sig = brute_parts(model, b, lc, causal=name in CAUSAL)
    return name, model, b, lc, J, Sig


def test_plain_call_dense_is_exact(arch):
    name, model, b, lc, J, Sig = arch
    ref = torch.einsum("ndp,nde,neq->pq", J, Sig, J) / N
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no tied-layer or other fallback
        dense = FIM(model, [b], PMatDense)
    torch.testing.assert_close(dense.to_torch(), ref, **TOL)
    v = torch.randn(lc.numel(), dtype=torch.float64)
    torch.testing.assert_close(
        FIM(model, [b], PMatImplicit).mv(PVector(lc, vector_repr=v)).to_torch(), ref @ v, **TOL)


def _ce(out, y):
    """Cross-entropy per example, per position for sequences (summed over them, or for a
    causal LM averaged under its convention: the GGN of which is the closed-form Fisher,
    whatever the targets)."""
    if out.dim() == 2:
        return F.cross_entropy(out, y, reduction="none")
    return F.cross_entropy(out.transpose(1, 2), y, reduction="none")


def test_other_entry_points(arch):
    name, model, b, lc, J, Sig = arch
    ref = torch.einsum("ndp,nde,nep->p", J, Sig, J) / N
    torch.testing.assert_close(GGN(model, [b], PMatDiag, loss_function=_ce).get_diag(), ref,
                               **TOL)
    mc = FIM_MonteCarlo(model, [b], PMatDiag, trials=2, seed=0).get_diag()
    ef = EmpiricalFisher(model, [b], PMatDiag).get_diag()
    for d in (mc, ef):
        assert d.shape == (lc.numel(),) and torch.isfinite(d).all() and d.min() >= 0
        assert d.sum() > 0


def test_tied_gpt2_diag_implicit_exact_kfac_runs():
    model = build("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    b = batch("gpt2")
    lc = LayerCollection.from_model(model)
    assert [u for u, _ in lc.tied["transformer.wte"]] == ["lm_head"]
    J, Sig = brute_parts(model, b, lc, causal=True)
    diag = FIM(model, [b], PMatDiag).get_diag()
    torch.testing.assert_close(diag, torch.einsum("ndp,nde,nep->p", J, Sig, J) / N, **TOL)
    v = torch.randn(lc.numel(), dtype=torch.float64)
    torch.testing.assert_close(
        FIM(model, [b], PMatImplicit).mv(PVector(lc, vector_repr=v)).to_torch(),
        torch.einsum("ndp,nde,ne->p", J, Sig, J @ v) / N, **TOL)
    with pytest.warns(UserWarning, match="tied layer.*'transformer.wte'"):
        kfac = FIM(model, [b], PMatKFAC)
    assert isinstance(kfac, PMatMixed)
    s = lc.slice("transformer.wte")
    torch.testing.assert_close(kfac.get_diag()[s], diag[s], **TOL)
    assert float(kfac.vTMv(PVector(lc, vector_repr=v))) > 0
