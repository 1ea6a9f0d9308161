"""The last-layer Laplace of a language model (token positions as examples, no backward pass)
against brute force: per-position Jacobians of the output layer from torch.func, output
Hessians ``diag(p) − ppᵀ`` formed densely, the shifted labels selected by an explicit loop."""
import math

import pytest
import torch
from torch import nn
from torch.func import jacrev

from nngeometry._bridge import _laplace_bridge
from nngeometry.laplace_lm import LastLayerLMLaplace

transformers = pytest.importorskip("transformers")

T_TEMP = 0.7
LAM = 0.9


def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=23, n_positions=16, n_embd=6, n_layer=1, n_head=2,
                                   bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).double().eval()
    with torch.no_grad():  # logits far from uniform: a Λ_i that differs between positions
        model.lm_head.weight.mul_(8.0)
    return model


def lm_batches(V, n_seq=3, T=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (n_seq, T), generator=g)
    mask = torch.ones(n_seq, T, dtype=torch.long)
    mask[1, 5:] = 0  # padding at the end of a sequence
    labels = ids.clone()
    labels[0, 3] = -100
    labels[1, 5:] = -100
    return [{"input_ids": ids[:2], "attention_mask": mask[:2], "labels": labels[:2]},
            {"input_ids": ids[2:], "attention_mask": mask[2:], "labels": labels[2:]}]


class TinyLM(nn.Module):
    """Embedding → tanh features → a linear head with a bias."""

    def __init__(self, V=5, d=3):
        super().__init__()
        torch.manual_seed(2)
        self.emb = nn.Embedding(V, d)
        self.head = nn.Linear(d, V)
        self.double()
        with torch.no_grad():
            self.head.weight.mul_(3.0)

    def features(self, batch):
        return torch.tanh(self.emb(batch["input_ids"]))


def brute(features, W, b, batches, T=T_TEMP, lam=LAM):
    """The counted positions' features, the GGN's sum ``Σ JᵀΛJ``, its KFAC and the loss."""
    xs, ys = [], []
    for batch in batches:
        h = features(batch).detach()
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        for s in range(ids.shape[0]):
            for t in range(ids.shape[1] - 1):
                if labels[s, t + 1] != -100 and mask[s, t + 1] != 0:
                    xs.append(h[s, t])
                    ys.append(int(labels[s, t + 1]))
    X = torch.stack(xs)
    V, d = W.shape
    theta = torch.cat([W.reshape(-1)] + ([b] if b is not None else []))

    def f(th, x):
        out = th[:V * d].reshape(V, d) @ x
        return out + th[V * d:] if b is not None else out

    ggn = torch.zeros(len(theta), len(theta), dtype=W.dtype)
    lams, loss = [], 0.0
    for x, y in zip(X, ys):
        J = jacrev(f)(theta, x)
        p = torch.softmax(f(theta, x), -1)
        L = torch.diag(p) - torch.outer(p, p)
        lams.append(L)
        ggn += J.T @ L @ J
        loss -= torch.log(p[y])
    Xt = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1) if b is not None else X
    kfac = torch.kron(torch.stack(lams).mean(0), Xt.T @ Xt / len(X))  # Kronecker layout
    D = Xt.shape[1]
    idx = torch.arange(V * D).reshape(V, D)
    perm = torch.cat([idx[:, :d].reshape(-1)] + ([idx[:, d]] if b is not None else []))
    kfac = kfac[perm][:, perm] * len(X)  # flat layout, summed over positions
    return dict(X=X, n=len(X), ggn=ggn, kfac=kfac, loss=loss, theta=theta, f=f)


def evidence(ref, H, lam=LAM, T=T_TEMP, mean=0.0):
    P = H.shape[0]
    return (-ref["loss"] / T - 0.5 * lam * ((ref["theta"] - mean) ** 2).sum()
            - 0.5 * (torch.linalg.slogdet(H)[1] - P * torch.log(torch.as_tensor(lam, dtype=torch.float64))))


def brute_predictive(ref, H, features, batch, bias):
    h = features(batch).detach().reshape(-1, ref["X"].shape[1])
    Hinv = torch.linalg.inv(H)
    probit, bridge, diag = [], [], []
    for x in h:
        J = jacrev(ref["f"])(ref["theta"], x)
        S = J @ Hinv @ J.T
        mu = ref["f"](ref["theta"], x)
        diag.append(torch.diagonal(S))
        probit.append(torch.softmax(mu / torch.sqrt(1 + math.pi / 8 * torch.diagonal(S)), -1))
        bridge.append(_laplace_bridge(mu[None], S[None])[0])
    return torch.stack(probit), torch.stack(bridge), torch.stack(diag)


@pytest.mark.parametrize("form", ["dense", "diag", "kfac"])
def test_gpt2_last_layer_against_brute_force(form):
    model = gpt2()
    batches = lm_batches(model.config.vocab_size)
    W = model.lm_head.weight.detach()
    body = lambda b: model.transformer(input_ids=b["input_ids"],
                                       attention_mask=b["attention_mask"]).last_hidden_state
    # the features are the logits' inputs: head(features) is the model's own output
    out = model(input_ids=batches[0]["input_ids"], attention_mask=batches[0]["attention_mask"])
    assert torch.allclose(out.logits, body(batches[0]) @ W.T, atol=1e-12)
    ref = brute(body, W, None, batches)
    mat = {"dense": ref["ggn"], "diag": torch.diag(torch.diagonal(ref["ggn"])),
           "kfac": ref["kfac"]}[form]
    H = mat / T_TEMP + LAM * torch.eye(mat.shape[0], dtype=mat.dtype)

    la = LastLayerLMLaplace(model, form, prior_precision=LAM, temperature=T_TEMP,
                            chunk_size=4).fit(batches)
    assert la.n == ref["n"] == 15
    torch.testing.assert_close(la.posterior_precision, H, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(la.log_marginal_likelihood(), evidence(ref, H), rtol=1e-10,
                               atol=1e-8)
    probit, bridge, diag = brute_predictive(ref, H, body, batches[0], bias=False)
    shape = (*batches[0]["input_ids"].shape, model.config.vocab_size)
    torch.testing.assert_close(la.functional_variance(batches[0]), diag.reshape(shape),
                               rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(la.predictive(batches[0]), probit.reshape(shape), rtol=1e-9,
                               atol=1e-12)
    torch.testing.assert_close(la.predictive(batches[0], link_approx="bridge"),
                               bridge.reshape(shape), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("form", ["dense", "kfac", "diag"])
def test_head_with_bias_more_positions_than_tokens(form):
    """A head with a bias (flat layout ``[W, b]``), more counted positions than tokens (the
    exact KFAC keeps the V × V Gram of the probabilities) and a prior mean."""
    model = TinyLM()
    V = model.head.out_features
    batches = lm_batches(V, n_seq=4, T=8, seed=3)
    ref = brute(model.features, model.head.weight.detach(), model.head.bias.detach(), batches)
    mat = {"dense": ref["ggn"], "diag": torch.diag(torch.diagonal(ref["ggn"])),
           "kfac": ref["kfac"]}[form]
    H = mat / T_TEMP + LAM * torch.eye(mat.shape[0], dtype=mat.dtype)
    mean = torch.linspace(-0.3, 0.3, H.shape[0], dtype=torch.float64)
    la = LastLayerLMLaplace(model, form, prior_precision=LAM, temperature=T_TEMP,
                            head=model.head, features=model.features, causal_lm=True,
                            prior_mean=mean, chunk_size=3).fit(batches)
    assert la.n == ref["n"] > V
    torch.testing.assert_close(la.posterior_precision, H, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(la.log_marginal_likelihood(), evidence(ref, H, mean=mean),
                               rtol=1e-10, atol=1e-8)
    probit, bridge, _ = brute_predictive(ref, H, model.features, batches[1], bias=True)
    torch.testing.assert_close(la.predictive(batches[1]).reshape(-1, V), probit, rtol=1e-9,
                               atol=1e-12)
    torch.testing.assert_close(la.predictive(batches[1], link_approx="bridge").reshape(-1, V),
                               bridge, rtol=1e-8, atol=1e-12)
    # the evidence's gradient in λ (what optimize_prior_precision follows), by autograd on both
    lam = torch.tensor(LAM, dtype=torch.float64, requires_grad=True)
    g_ours, = torch.autograd.grad(la.log_marginal_likelihood(lam), lam)
    lam2 = torch.tensor(LAM, dtype=torch.float64, requires_grad=True)
    H2 = mat / T_TEMP + lam2 * torch.eye(mat.shape[0], dtype=mat.dtype)
    g_ref, = torch.autograd.grad(evidence(ref, H2, lam=lam2, mean=mean), lam2)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-9, atol=1e-10)


def test_kfac_nystrom_output_factor_is_bounded_by_the_exact_one():
    """``output_rank=k``: the Nyström term is below ``(1/n) Σ p pᵀ`` (PSD order), so ``G`` and
    ``log det H`` are not below the exact ones; it is close for a rank near the exact one."""
    model = gpt2()
    batches = lm_batches(model.config.vocab_size)
    exact = LastLayerLMLaplace(model, "kfac", prior_precision=LAM).fit(batches)
    approx = LastLayerLMLaplace(model, "kfac", prior_precision=LAM, output_rank=6).fit(batches)
    gap = exact.B @ exact.B.T - approx.B @ approx.B.T
    assert approx.B.shape[1] == 6 and torch.linalg.eigvalsh(gap).min() > -1e-12
    assert float(torch.linalg.matrix_norm(gap)) > 1e-6  # rank 6 < 15: not the exact term
    assert approx.posterior_precision_logdet() >= exact.posterior_precision_logdet() - 1e-10
    probs = approx.predictive(batches[0])
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1], dtype=probs.dtype))


def test_prior_optimisation_and_refusals():
    model = gpt2()
    batches = lm_batches(model.config.vocab_size)
    la = LastLayerLMLaplace(model, "diag", prior_precision=1.0).fit(batches)
    lam = la.optimize_prior_precision(n_steps=200, lr=0.1)
    t = torch.tensor(lam, dtype=torch.float64, requires_grad=True)
    grad, = torch.autograd.grad(la.log_marginal_likelihood(t), t)
    assert abs(float(grad)) * lam < 1e-3  # a stationary point in log λ
    with pytest.raises(ValueError, match="one prior precision"):
        la.log_marginal_likelihood(torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="link_approx='mc' with KFAC"):
        LastLayerLMLaplace(model, "kfac").fit(batches).predictive(batches[0], link_approx="mc")
    with pytest.raises(ValueError, match="output_rank"):
        LastLayerLMLaplace(model, "diag", output_rank=4)
    with pytest.raises(ValueError, match="no key 'labels'"):
        LastLayerLMLaplace(model, "diag").fit([{"input_ids": batches[0]["input_ids"]}])
    with pytest.raises(ValueError, match="not supported"):
        LastLayerLMLaplace(model, "ekfac")
