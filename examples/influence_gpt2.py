"""Which training sequences support a language model's completion? Influence on a small GPT-2.

A 2-layer GPT-2 (Hugging Face ``transformers``, built from a config: no download) learns
arithmetic progressions modulo 10: a sequence is a step token ``+1``, ``+2`` or ``+3`` followed
by 8 digits ``x, x + s, x + 2s, ...``. The query is a prompt (step token and two digits) and
its completion (the next three digits); its measurement is the completion's negative
log-probability (``-causal_lm_log_prob``, the prompt's labels set to -100), so that a positive
score means that training on the sequence makes the completion likelier; the training loss is
the model's own per-sequence loss (``causal_lm_loss``). `Influence` with EKFAC (on the attention and MLP
projections, the position embedding and the layer norms; the token embedding, tied to the
output layer, is left out: KFAC has no form for a weight used twice) scores every training
sequence, with the curvature the empirical Fisher of the training loss.

What to look for: the training sequences with the largest scores (those whose training makes
the completion likelier) should mostly have the query's step; the printout gives the share of
the query's step among the top 20 (a third at random).

    python examples/influence_gpt2.py            # about a minute on two cores
    python examples/influence_gpt2.py --quick    # a smoke run
"""
import json
import time

import torch

from nngeometry.influence import Influence, causal_lm_log_prob, causal_lm_loss
from nngeometry.layercollection import LayerCollection
from nngeometry.object import PMatEKFAC

from _common import parser

STEPS = (1, 2, 3)
LENGTH = 8  # digits after the step token
VOCAB = 10 + len(STEPS)  # digits 0-9, then one token per step


def sequences(n, g):
    step = torch.randint(0, len(STEPS), (n,), generator=g)
    start = torch.randint(0, 10, (n,), generator=g)
    s = torch.tensor(STEPS)[step]
    digits = (start[:, None] + s[:, None] * torch.arange(LENGTH)[None]) % 10
    return torch.cat([(10 + step)[:, None], digits], dim=1), step


def batch_of(ids, prompt=0):
    n, T = ids.shape
    labels = ids.clone()
    labels[:, :prompt] = -100
    return {"input_ids": ids, "attention_mask": torch.ones(n, T, dtype=torch.long),
            "position_ids": torch.arange(T).expand(n, T), "labels": labels}


def main(argv=None):
    import transformers

    p = parser(__doc__, "smoke run: fewer sequences and steps")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    g = torch.Generator().manual_seed(0)
    n_train = 120 if args.quick else 300
    ids, step = sequences(n_train, g)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB,
                                  n_positions=16, attn_pdrop=0.0, resid_pdrop=0.0,
                                  embd_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = "eager"
    model = transformers.GPT2LMHeadModel(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for it in range(100 if args.quick else 400):
        idx = torch.randint(0, n_train, (32,), generator=g)
        opt.zero_grad()
        model(**batch_of(ids[idx])).loss.backward()
        opt.step()
    model.eval()
    train = [batch_of(ids[i:i + 50]) for i in range(0, n_train, 50)]
    with torch.no_grad():
        train_loss = sum(float(model(**b).loss) for b in train) / len(train)
    print(f"trained: mean training loss {train_loss:.3f} (uniform guess {torch.log(torch.tensor(10.)):.3f})")

    # the query: prompt "+2, 3, 5" and its completion "7, 9, 1"
    q_step = 1  # index of the step 2
    prompt = torch.tensor([[10 + q_step, 3, 5, 7, 9, 1]])
    query = batch_of(prompt, prompt=3)
    with torch.no_grad():
        logp = float(causal_lm_log_prob(model(**{k: v for k, v in query.items()
                                                 if k != "labels"}).logits, query["labels"]))
    print(f"query: +2 | 3 5 → 7 9 1, log-probability of the completion {logp:.3f}")

    lc = LayerCollection.from_model(model, tied_weights="sum")
    lc = lc.sub([lid for lid in lc.layer_ids() if lid not in lc.tied and lid != "lm_head"])
    inf = Influence(model, PMatEKFAC, layer_collection=lc, curvature="empirical",
                    loss_function=causal_lm_loss,
                    measurement=lambda out, y: -causal_lm_log_prob(out, y))
    t = time.time()
    inf.fit(train)
    scores = inf.pairwise_scores(train, [query])[0]
    seconds = time.time() - t
    top = scores.argsort(descending=True)[:20]
    share = float((step[top] == q_step).float().mean())
    print(f"EKFAC influence on {len(lc.layer_ids())} layers, {lc.numel()} parameters, "
          f"{n_train} training sequences: {seconds:.1f} s")
    print(f"share of step +2 among the 20 most supportive training sequences: {share:.2f} "
          f"(at random {float((step == q_step).float().mean()):.2f})")
    shown = []
    for i in top.tolist():  # the 30 distinct sequences each appear several times
        seq = tuple(ids[i].tolist())
        if seq not in shown:
            shown.append(seq)
            print(f"  {float(scores[i]):+.3e}  +{STEPS[seq[0] - 10]} | "
                  + " ".join(map(str, seq[1:])))
        if len(shown) == 5:
            break
    summary = {"train_loss": train_loss, "query_log_prob": logp, "top20_same_step": share,
               "seconds": time.time() - t0}
    (args.out / "influence_gpt2.json").write_text(json.dumps(summary, indent=1))
    print(f"done in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
