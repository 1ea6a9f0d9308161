"""Influence on a tiny Hugging Face GPT-2 (built from a config, float64): ``causal_lm_loss`` is
the model's own ``.loss`` on each sequence alone (shifted labels, -100 ignored; the model
computes it in float32), the scores' gradients are those of that loss written out per sequence
(float64 autograd), and the completion's log-probability serves as the query's measurement."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from nngeometry.influence import Influence, causal_lm_log_prob, causal_lm_loss  # noqa: E402
from nngeometry.layercollection import LayerCollection  # noqa: E402
from nngeometry.object import PMatDiag  # noqa: E402

N, T, V = 4, 5, 20


def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=V, n_positions=16,
                                  attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
                                  bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = "eager"
    return transformers.GPT2LMHeadModel(cfg).double().eval()


def batch(n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (n, T), generator=g)
    labels = ids.clone()
    labels[:, :2] = -100  # a prompt: only the completion is scored
    labels[0, 3] = -100
    return {"input_ids": ids, "attention_mask": torch.ones(n, T, dtype=torch.long),
            "position_ids": torch.arange(T).expand(n, T), "labels": labels}


def sequence_loss(logits, labels):
    """One sequence's loss written out: the mean over the labelled positions ``t + 1`` of
    ``-log softmax(logits[t])[labels[t + 1]]`` (what the model's ``.loss`` is for a batch of
    this one sequence)."""
    terms = [-torch.log_softmax(logits[t], 0)[labels[t + 1]] for t in range(T - 1)
             if labels[t + 1] != -100]
    return torch.stack(terms).mean(), len(terms)


def brute_grads(model, b, lc, log_prob=False):
    """``(n, P)``: the gradient of each sequence's loss (or of its completion's
    log-probability, ``-loss × labelled tokens``), one sequence at a time, in float64, in the
    layout of ``lc`` (a tied weight gets the sum over its uses, as autograd gives it)."""
    rows = []
    for i in range(b["input_ids"].shape[0]):
        model.zero_grad()
        one = {k: v[i:i + 1] for k, v in b.items() if k != "labels"}
        loss, count = sequence_loss(model(**one).logits[0], b["labels"][i])
        (-loss * count if log_prob else loss).backward()
        rows.append(torch.cat([model.get_submodule(lid).get_parameter(name).grad.reshape(-1)
                               for lid, layer in lc.layers.items()
                               for name in layer.param_names()]))
    model.zero_grad()
    return torch.stack(rows)


def test_causal_lm_loss_is_the_models_own_loss():
    model = gpt2()
    b = batch(3, 4)
    inputs = {k: v for k, v in b.items() if k != "labels"}
    with torch.no_grad():
        ours = causal_lm_loss(model(**inputs).logits, b["labels"])
        # the model computes its loss in float32 (it upcasts/downcasts the logits)
        theirs = torch.stack([model(**{k: v[i:i + 1] for k, v in b.items()}).loss
                              for i in range(3)])
    assert torch.allclose(ours, theirs.to(ours.dtype), rtol=1e-6, atol=0)


def test_scores_use_the_models_own_loss_per_sequence():
    model = gpt2()
    lc = LayerCollection.from_model(model, tied_weights="sum")
    train, query = [batch(2, 1), batch(2, 2)], batch(3, 3)
    gz = torch.cat([brute_grads(model, b, lc) for b in train])
    gq = brute_grads(model, query, lc, log_prob=True)
    inf = Influence(model, PMatDiag, damping=1e-3, curvature="empirical", layer_collection=lc,
                    loss_function=causal_lm_loss, measurement=causal_lm_log_prob).fit(train)
    d = (gz ** 2).mean(0)  # the empirical Fisher's diagonal over the 4 training sequences
    assert torch.allclose(inf.matrix.get_diag(), d, rtol=1e-10, atol=1e-16)
    want = (gq / (d + 1e-3)) @ gz.t()
    got = inf.pairwise_scores(train, query)
    assert got.shape == (3, N)
    assert torch.allclose(got, want, rtol=1e-8, atol=1e-10 * want.abs().max())
    self_want = ((gz / (d + 1e-3)) * gz).sum(1)
    assert torch.allclose(inf.self_scores(train), self_want, rtol=1e-8, atol=0)
