#!/usr/bin/env python
"""GPT-2 small (124 M parameters) built from a ``transformers`` config (no download), CPU
float32: the Monte-Carlo Diag and KFAC builds and the implicit closed-form ``mv`` of the Fisher
under the model's own loss convention (shifted labels, mean over each sequence's tokens), each
as a multiple of the floor, with peak tensor memory.

Usage::

    python benchmarks/hf.py                   # 64 sequences of 128 tokens, batches of 8
    python benchmarks/hf.py --small           # 4 sequences of 32 tokens, a 2-layer model
    python benchmarks/hf.py --n 16 --seq 64 --batch 4 --layers 12 --json hf.json

* **floor**: one forward + backward of Hugging Face's mean LM loss (``model(**batch).loss``)
  over the same batches;
* **MC Diag**: ``FIM_MonteCarlo(model, loader, PMatDiag)`` (one sampled token per position);
* **MC KFAC**: ``FIM_MonteCarlo(model, loader, PMatKFAC, layer_collection=...)`` on every layer
  but ``lm_head``, whose output-side factor would be ``V × V`` (50257², 10 GB in float32);
* **implicit mv**: one ``PMatImplicit.mv`` of the closed-form ``FIM`` (JVP, ``H u = p ⊙ u −
  p (pᵀu)`` per position, VJP: no ``V × (V − 1)`` square roots).

The model is GPT-2 small as published: the output layer tied to the token embedding, the batches
as a user writes them (``input_ids``, ``attention_mask``, ``labels``; the model builds its
positions of shape ``(1, T)``). The plain calls take it as it is: the tied parameter's gradient
is the sum over its two uses, and KFAC gives that layer its exact diagonal block (a
``PMatMixed``). ``--untied`` unties the head (162 M parameters) and leaves it out of KFAC (its
output-side factor would be ``V × V``); ``--position-ids`` passes positions of shape ``(n, T)``.

Targets: MC Diag ≤ 1.5× floor, MC KFAC ≤ 3×, implicit mv ≤ 3×, peak memory ≤ floor peak +
representation + one batch (the batch's logits, ``batch · T · V · 4`` bytes). Timings are
process CPU time (one thread by default, ``--threads``) of the row's first call in the
process (one-time checks included: the first curvature call on a model verifies the parameter
uses on one batch), each divided by a floor timed just before it; peaks are the tensor memory
allocated during the call (``benchmarks/run.py``'s profiler probe).
"""
import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # this checkout's nngeometry, even when one is installed

import run as R  # noqa: E402  (also puts this checkout on the path when not installed)
import torch  # noqa: E402


def gpt2(vocab, positions, width, layers, heads, tied=True):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=width, n_layer=layers,
                     n_head=heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     tie_word_embeddings=tied)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return GPT2LMHeadModel(cfg).float().eval()


def batches(n, seq, batch, vocab, position_ids=False):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (n, seq), generator=g)
    out = []
    for i in range(0, n, batch):
        b = ids[i:i + batch]
        one = {"input_ids": b, "attention_mask": torch.ones_like(b), "labels": b}
        if position_ids:
            one["position_ids"] = torch.arange(seq).expand_as(b)
        out.append(one)
    return out


def rep_bytes(M):
    """The bytes of a representation's tensors (its ``data``)."""
    subs = getattr(M, "sub_pmats", None)
    if isinstance(subs, dict):  # PMatMixed: its groups' matrices
        return sum(rep_bytes(sub) for sub in subs.values())
    data = getattr(M, "data", None)
    stack = [data]
    total = 0
    while stack:
        d = stack.pop()
        if isinstance(d, torch.Tensor):
            total += d.numel() * d.element_size()
        elif isinstance(d, dict):
            stack.extend(d.values())
        elif isinstance(d, (tuple, list)):
            stack.extend(d)
    return total


def measure(fn, repeats):
    t, _, out = R.timeit(lambda: R._quiet_warnings(fn), repeats, warmup=repeats > 1,
                         budget_s=900)
    _, peak, _ = R.peak_memory(lambda: R._quiet_warnings(fn))
    return t, peak, out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=64, help="sequences")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=8, help="sequences per batch")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--small", action="store_true",
                   help="4 sequences of 32 tokens, batches of 2, a 2-layer model of width 128 "
                        "(the vocabulary stays 50257)")
    p.add_argument("--untied", action="store_true",
                   help="untie the output layer (and leave it out of KFAC)")
    p.add_argument("--position-ids", action="store_true", help="pass positions of shape (n, T)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", default="floor,MC Diag,MC KFAC,implicit mv")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.small:
        a.n, a.seq, a.batch, a.layers, a.width, a.heads = 4, 32, 2, 2, 128, 2
    torch.set_num_threads(a.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))

    from nngeometry import FIM, FIM_MonteCarlo
    from nngeometry.layercollection import LayerCollection
    from nngeometry.object import PMatDiag, PMatImplicit, PMatKFAC, PVector

    model = gpt2(a.vocab, max(a.seq, 128), a.width, a.layers, a.heads, tied=not a.untied)
    loader = batches(a.n, a.seq, a.batch, a.vocab, a.position_ids)
    P = sum(q.numel() for q in model.parameters())
    one_batch = a.batch * a.seq * a.vocab * 4
    print(f"GPT-2 {a.layers} layers, width {a.width}, vocabulary {a.vocab}: {P / 1e6:.1f} M "
          f"parameters; {a.n} sequences of {a.seq} tokens in batches of {a.batch}; "
          f"{'untied' if a.untied else 'tied'} output layer; threads={a.threads}, float32")
    wanted = [r.strip() for r in a.rows.split(",")]
    res = {"config": vars(a), "params": P, "one_batch_bytes": one_batch, "rows": {}}

    def floor():
        model.zero_grad(set_to_none=True)
        for b in loader:
            model(**b).loss.backward()
        model.zero_grad(set_to_none=True)
    ft, fpeak, _ = measure(floor, a.repeats)
    res["floor"] = {"time": ft, "peak": fpeak}
    print(f"{'floor':14s} {ft:9.2f} s  1.00x  peak {fpeak / 2**20:9.0f} MiB")

    lc_all = LayerCollection.from_model(model)
    lc_kfac = lc_all
    if a.untied:
        lc_kfac = LayerCollection()
        for name, mod in model.named_modules():
            if list(mod.parameters(recurse=False)) and name != "lm_head":
                lc_kfac.add_layer_from_model(model, mod)
    implicit = {}

    def mv():
        if "M" not in implicit:
            implicit["M"] = FIM(model, loader, PMatImplicit)
            implicit["v"] = PVector(lc_all, vector_repr=torch.randn(P))
        return implicit["M"].mv(implicit["v"])

    rows = {
        "MC Diag": (lambda: FIM_MonteCarlo(model, loader, PMatDiag), 1.5),
        "MC KFAC": (lambda: FIM_MonteCarlo(model, loader, PMatKFAC,
                                           layer_collection=lc_kfac), 3.0),
        "implicit mv": (mv, 3.0),
    }
    for label, (fn, target) in rows.items():
        if label not in wanted:
            continue
        # the floor timed again just before each row: on a shared machine the load changes
        # between rows, and each ratio is taken against its neighbouring floor
        ft_row, _, _ = R.timeit(floor, a.repeats, warmup=False, budget_s=900)
        try:
            t, peak, out = measure(fn, a.repeats)
        except Exception as e:  # noqa: BLE001
            res["rows"][label] = {"error": R.reason_of(e)}
            print(f"{label:14s} n/a ({R.reason_of(e)})")
            continue
        rb = rep_bytes(out) if label != "implicit mv" else 2 * P * 4
        bound = fpeak + rb + one_batch
        row = {"time": t, "floor_time": ft_row, "x_floor": t / ft_row, "target_x": target,
               "peak": peak, "peak_bound": bound, "rep_bytes": rb,
               "time_ok": t / ft_row <= target, "peak_ok": peak <= bound}
        res["rows"][label] = row
        print(f"{label:14s} {t:9.2f} s {t / ft_row:5.2f}x (target ≤ {target}x: "
              f"{'met' if row['time_ok'] else 'missed'}; floor beside it {ft_row:.2f} s)  "
              f"peak {peak / 2**20:9.0f} MiB (bound floor + rep + one batch = "
              f"{bound / 2**20:.0f} MiB: {'met' if row['peak_ok'] else 'missed'})")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
