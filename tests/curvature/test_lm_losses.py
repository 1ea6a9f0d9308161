"""Language-model losses: a tiny causal LM (GPT-2 from a config, untied, float64) under its own
loss convention (shifted labels, -100 and padding excluded, mean over each sequence's tokens)
against Hugging Face's own ``loss`` and brute-force output Hessians; the implicit products of
the closed-form Fisher through the output metric ``H u = p ⊙ u − p (pᵀu)``."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev, vmap

transformers = pytest.importorskip("transformers")

from nngeometry import FIM, GGN, EmpiricalFisher, FIM_MonteCarlo  # noqa: E402
from nngeometry import curvature  # noqa: E402
from nngeometry.curvature import closed_form  # noqa: E402
from nngeometry.layercollection import LayerCollection  # noqa: E402
from nngeometry.object import PMatDense, PMatDiag, PMatImplicit, PVector  # noqa: E402

N, T, V = 4, 6, 11


def causal_lm():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=V, n_positions=8,
                                  attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
                                  tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = "eager"
    return transformers.GPT2LMHeadModel(cfg).double().eval()


def lm_batch():
    """Right-padded sequences (attention_mask 0, labels -100 on the padding, as Hugging Face's
    collators make them), a prompt token labelled -100, explicit batched position ids."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, V, (N, T), generator=g)
    mask = torch.ones(N, T, dtype=torch.long)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[0, 2] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "position_ids": torch.arange(T).expand(N, T)}


def one(b, i):
    return {k: v[i:i + 1] for k, v in b.items()}


def hf_gradients(model, b, monkeypatch):
    """``(N, P)``: the gradient of Hugging Face's ``model(**b_i).loss`` on each sequence alone.
    (Its loss casts the logits with ``.float()``: kept in float64 here so that the comparison
    can be to 1e-8; the unpatched loss is checked to float32 precision.)"""
    params = list(model.parameters())

    def grads():
        out = []
        for i in range(N):
            loss = model(**one(b, i)).loss
            out.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
        return torch.stack(out)
    g32 = grads()
    orig = torch.Tensor.float
    monkeypatch.setattr(torch.Tensor, "float",
                        lambda self, *a, **k: self if self.dtype == torch.float64
                        else orig(self, *a, **k))
    g64 = grads()
    monkeypatch.undo()
    torch.testing.assert_close(g32, g64, rtol=1e-4, atol=1e-6)
    return g64


def jacobians_and_logits(model, b):
    """Per-sequence Jacobians of the logits ``(N, T·V, P)`` and the logits ``(N, T, V)``."""
    allp = dict(model.named_parameters())
    params = {k: p.detach() for k, p in allp.items()}
    inputs = {k: v for k, v in b.items() if k != "labels"}

    def f(p, x):
        return functional_call(model, p, (), {k: v.unsqueeze(0) for k, v in x.items()}) \
            .logits.reshape(-1)
    J = vmap(jacrev(f), (None, 0))(params, inputs)
    J = torch.cat([J[k].reshape(N, T * V, -1) for k in allp], dim=2)
    with torch.no_grad():
        logits = model(**inputs).logits
    return J, logits


def convention_hessians(b, logits, positions="mean"):
    """Block-diagonal ``(N, T·V, T·V)``: position ``t < T-1`` carries the softmax covariance
    of its logits when token ``t+1`` counts (label not -100, mask 1), weighted by ``1/N_i``
    (mean) or 1 (sum); the last position carries nothing."""
    keep = (b["labels"][:, 1:] != -100) & (b["attention_mask"][:, 1:] != 0)
    w = keep.double()
    if positions == "mean":
        w = w / keep.sum(1, keepdim=True)
    w = F.pad(w, (0, 1))
    p = torch.softmax(logits, -1)
    cov = (torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)) * w[..., None, None]
    return torch.stack([torch.block_diag(*cov[i]) for i in range(N)])


def test_empirical_fisher_is_hf_loss_gradients(monkeypatch):
    model = causal_lm()
    assert curvature.is_causal_lm(model)
    b = lm_batch()
    G = hf_gradients(model, b, monkeypatch)
    ref = G.t() @ G / N
    ef = EmpiricalFisher(model, [b], PMatDense).to_torch()
    torch.testing.assert_close(ef, ref, rtol=1e-8, atol=1e-12)
    # two batches: the mean over the sequences of both
    ef2 = EmpiricalFisher(model, [one(b, 0), {k: v[1:] for k, v in b.items()}],
                          PMatDense).to_torch()
    torch.testing.assert_close(ef2, ref, rtol=1e-8, atol=1e-12)
    # per token: the sum over each sequence's counted tokens, ℓ_i = N_i · HF's loss
    counted = ((b["labels"][:, 1:] != -100) & (b["attention_mask"][:, 1:] != 0)).sum(1)
    Gs = G * counted.unsqueeze(1).double()
    torch.testing.assert_close(EmpiricalFisher(model, [b], PMatDiag, positions="sum").get_diag(),
                               (Gs * Gs).mean(0), rtol=1e-8, atol=1e-12)
    # the old pairing (each position with its own token) is another matrix
    other = EmpiricalFisher(model, [b], PMatDiag, causal_lm=False).get_diag()
    assert (other - torch.diag(ref)).abs().max() > 1e-2 * torch.diag(ref).abs().max()


def test_fisher_and_ggn_follow_the_convention():
    model = causal_lm()
    b = lm_batch()
    J, logits = jacobians_and_logits(model, b)
    # a callable gets the shifted logits and labels; per-position losses are weighted
    ce = lambda out, y: F.cross_entropy(out.transpose(1, 2), y, reduction="none")  # noqa: E731
    for positions in ("mean", "sum"):
        H = convention_hessians(b, logits, positions)
        ref = torch.einsum("ndp,nde,neq->pq", J, H, J) / N
        kw = {} if positions == "mean" else {"positions": "sum"}
        torch.testing.assert_close(FIM(model, [b], PMatDense, **kw).to_torch(), ref,
                                   rtol=1e-8, atol=1e-12)
        for loss in ("cross_entropy", nn.CrossEntropyLoss(reduction="none"), ce):
            torch.testing.assert_close(GGN(model, [b], PMatDense, loss, **kw).to_torch(), ref,
                                       rtol=1e-8, atol=1e-12)
    with pytest.raises(ValueError, match="causal_lm=False"):
        GGN(model, [b], PMatDiag, "mse")


def test_monte_carlo_follows_the_convention():
    """The expectation of the MC Fisher is the closed form: 800 draws, 3 % on the trace (within
    0.5 % for seeds 0-3; a wrong weighting, e.g. the sum over tokens or padding counted, is off
    by far more)."""
    model = causal_lm()
    b = lm_batch()
    exact = FIM(model, [b], PMatDiag).get_diag()
    mc = FIM_MonteCarlo(model, [b], PMatDiag, trials=800, seed=0).get_diag()
    assert abs(mc.sum() / exact.sum() - 1) < 0.03
    summed = FIM(model, [b], PMatDiag, positions="sum").get_diag()
    assert summed.sum() > 1.5 * exact.sum()


def test_implicit_products_use_the_output_metric(monkeypatch):
    """mv, vTMv, mm of the closed-form Fisher (and the cross-entropy GGN) equal the dense
    brute force, and never form the C × (C − 1) square roots."""
    model = causal_lm()
    b = lm_batch()
    J, logits = jacobians_and_logits(model, b)
    ref = torch.einsum("ndp,nde,neq->pq", J, convention_hessians(b, logits), J) / N
    lc = LayerCollection.from_model(model)

    def refuse(p):
        raise AssertionError("square root of the output Hessian formed")
    monkeypatch.setattr(closed_form, "multinomial_covariance_sqrt", refuse)
    g = torch.Generator().manual_seed(0)
    v = torch.randn(lc.numel(), generator=g, dtype=torch.float64)
    Vs = torch.randn(5, lc.numel(), generator=g, dtype=torch.float64)  # (> 4: chunked)
    for M in (FIM(model, [b], PMatImplicit), GGN(model, [b], PMatImplicit, "cross_entropy")):
        pv = PVector(lc, vector_repr=v)
        torch.testing.assert_close(M.mv(pv).to_torch(), ref @ v, rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(M.vTMv(pv), v @ ref @ v, rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(M.generator.implicit_mm(Vs, [b], lc), Vs @ ref,
                                   rtol=1e-8, atol=1e-12)
    # a classifier (n, C) and a segmentation-style (n, C, L) output: the same metric
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    lcm = LayerCollection.from_model(mlp)
    from brute import fim_dense
    monkeypatch.undo()
    refm = fim_dense(mlp, x)
    monkeypatch.setattr(closed_form, "multinomial_covariance_sqrt", refuse)
    w = torch.randn(lcm.numel(), dtype=torch.float64)
    got = FIM(mlp, (x,), PMatImplicit).mv(PVector(lcm, vector_repr=w)).to_torch()
    torch.testing.assert_close(got, refm @ w, rtol=1e-8, atol=1e-12)


def test_metric_memory_is_linear_in_the_vocabulary():
    """A vocabulary of 20000: the square roots would be 20000 × 19999 per position (3.2 GB per
    position in float64); the metric needs a few (n, T, V) tensors."""
    import tracemalloc

    Vb = 20000
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(Vb, 2), nn.Linear(2, Vb)).double()
    ids = torch.randint(0, Vb, (2, 3))
    lc = LayerCollection.from_model(model).last_layer()
    M = FIM(model, (ids,), PMatImplicit, layer_collection=lc, class_dim=-1)
    v = PVector(lc, vector_repr=torch.randn(lc.numel(), dtype=torch.float64))
    tracemalloc.start()
    try:
        r = M.vTMv(v)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert torch.isfinite(r) and float(r) > 0
    # (tracemalloc sees only Python allocations: the bound is on the generous side; the
    # test above asserts the square roots are never formed)
    assert peak < 50 * 2 ** 20


def test_dict_batches_of_other_models_unchanged():
    """A model that is not a causal LM keeps position t with label t, summed."""
    model = causal_lm()
    b = lm_batch()
    lc = LayerCollection.from_model(model)
    assert curvature.lm_convention(model) is not None
    assert curvature.lm_convention(nn.Linear(2, 2)) is None
    with pytest.raises(TypeError, match="causal_lm must be"):
        FIM(model, [b], PMatDiag, causal_lm="yes")
    # causal_lm=False: the convention without the shift, padding still excluded
    J, logits = jacobians_and_logits(model, b)
    keep = ((b["labels"] != -100) & (b["attention_mask"] != 0)).double()
    p = torch.softmax(logits, -1)
    cov = (torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)) * keep[..., None, None]
    H = torch.stack([torch.block_diag(*cov[i]) for i in range(N)])
    ref = torch.einsum("ndp,nde,neq->pq", J, H, J) / N
    torch.testing.assert_close(FIM(model, [b], PMatDense, causal_lm=False,
                                   positions="sum").to_torch(), ref, rtol=1e-8, atol=1e-12)
    assert lc.numel() == ref.shape[0]
    # a user's function defines its own outputs: no convention detected, the class axis given
    inputs = {k: v for k, v in b.items() if k != "labels"}
    plain = FIM(model, [b], PMatDense, function=lambda d: model(**{k: d[k] for k in inputs})
                .logits, class_dim=-1).to_torch()
    keep_all = torch.ones(N, T, dtype=torch.float64)
    cov = (torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)) * keep_all[..., None, None]
    H = torch.stack([torch.block_diag(*cov[i]) for i in range(N)])
    torch.testing.assert_close(plain, torch.einsum("ndp,nde,neq->pq", J, H, J) / N,
                               rtol=1e-8, atol=1e-12)


def test_many_class_sampler_draws_from_the_softmax():
    """With a vocabulary-sized softmax the one-trial sampler draws by the inverse CDF: the
    label frequencies match softmax(f), and a class of probability 0 is never drawn."""
    torch.manual_seed(0)
    C = 1024
    logits = torch.full((1, C), -200.0, dtype=torch.float64)
    logits[0, :4] = torch.tensor([2.0, 0.5, -1.0, 0.0], dtype=torch.float64)
    logits[0, -1] = 1.0
    n = 10_000
    f = curvature.monte_carlo_function(lambda x: x, "classif_logits", trials=1)
    lp = f(logits.expand(n, -1)).detach()[:, 0]
    logp = torch.log_softmax(logits[0], 0)
    keep = torch.tensor([0, 1, 2, 3, C - 1])
    labels = keep[(lp.unsqueeze(1) - logp[keep].unsqueeze(0)).abs().argmin(1)]
    assert torch.allclose(lp, logp[labels])  # only those classes are ever drawn
    freq = torch.bincount(labels, minlength=C).double() / n
    p = logp.exp()
    sigma = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() <= 5 * sigma + 1e-12).all()
