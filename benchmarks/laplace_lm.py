#!/usr/bin/env python
"""Last-layer Laplace of GPT-2 small (built from ``transformers``' ``GPT2Config()`` defaults,
random weights, no download), CPU float32: ``LastLayerLMLaplace`` over the output layer
(768 × 50257, 38.6 M parameters, no bias) with KFAC and with the diagonal: fit (the
transformer body's features under ``no_grad``, then the head in chunks of positions), log
marginal likelihood, and the probit predictive at every position of the same sequences.

Usage::

    python benchmarks/laplace_lm.py                      # 64 sequences of 128 tokens
    python benchmarks/laplace_lm.py --n 8 --seq 32 --layers 2 --json out.json   # reduced
    python benchmarks/laplace_lm.py --small              # smoke run: a tiny config

Each row (form) runs in its own subprocess; its peak memory is the process's peak resident set
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) after the model is built (*floor*: the model,
the batches and torch) and after each step (it only grows). Times are wall seconds, one thread
by default (``--threads``), also as the process's CPU time (the figure that a loaded machine
inflates least with one thread). KFAC's output factor is ``diag(p̄) − B Bᵀ`` with ``B Bᵀ`` of rank
``--output-rank`` (Nyström; the exact term has ``min(n, V)`` columns).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # this checkout's nngeometry


def clocks():
    return time.perf_counter(), time.process_time()


def since(start):
    wall, cpu = clocks()
    return wall - start[0], cpu - start[1]


def rss_mib():
    # ru_maxrss is in KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one_row(a):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from nngeometry.laplace_lm import LastLayerLMLaplace

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    if a.small:
        cfg = GPT2Config(vocab_size=97, n_positions=64, n_embd=16, n_layer=1, n_head=2)
    else:
        cfg = GPT2Config(n_layer=a.layers) if a.layers else GPT2Config()
    model = GPT2LMHeadModel(cfg).float().eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (a.n, a.seq), generator=g)
    loader = [{"input_ids": ids[i:i + a.batch], "attention_mask": torch.ones_like(
        ids[i:i + a.batch]), "labels": ids[i:i + a.batch]} for i in range(0, a.n, a.batch)]
    row = {"form": a.row, "vocab": cfg.vocab_size, "width": cfg.n_embd, "layers": cfg.n_layer,
           "n_seq": a.n, "seq": a.seq, "floor_rss_mib": rss_mib()}
    # the transformer body alone, for scale: what the fit and the predictive each pay once
    t = clocks()
    with torch.no_grad():
        for b in loader:
            model.transformer(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    row["body_s"], row["body_cpu_s"] = since(t)
    kw = {"output_rank": a.output_rank} if a.row == "kfac" else {}
    la = LastLayerLMLaplace(model, a.row, prior_precision=1.0, chunk_size=a.chunk, **kw)
    t = clocks()
    la.fit(loader)
    (row["fit_s"], row["fit_cpu_s"]), row["fit_rss_mib"] = since(t), rss_mib()
    row["positions"], row["params"] = la.n, la.n_params
    t = clocks()
    with torch.no_grad():
        lml = la.log_marginal_likelihood()
    (row["evidence_s"], row["evidence_cpu_s"]), row["evidence_rss_mib"] = since(t), rss_mib()
    row["log_marglik"] = float(lml)
    t = clocks()
    probs = [la.predictive(b) for b in loader]  # kept: the whole predictive is in memory
    (row["predictive_s"], row["predictive_cpu_s"]), row["predictive_rss_mib"] = since(t), rss_mib()
    row["predictive_shape"] = [a.n, *probs[0].shape[1:]]
    row["predictive_bytes"] = sum(q.numel() * q.element_size() for q in probs)
    row["probs_sum_err"] = max(float((q.sum(-1) - 1).abs().max()) for q in probs)
    print(json.dumps(row))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=64, help="sequences")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=8, help="sequences per batch")
    p.add_argument("--layers", type=int, default=0, help="transformer blocks (0: GPT-2's 12)")
    p.add_argument("--output-rank", type=int, default=64)
    p.add_argument("--chunk", type=int, default=512, help="positions per chunk of the head")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--forms", default="kfac,diag")
    p.add_argument("--small", action="store_true", help="a tiny config (smoke run)")
    p.add_argument("--json", default=None)
    p.add_argument("--row", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.row:
        return one_row(a)
    rows = []
    for form in a.forms.split(","):
        args = [sys.executable, __file__, "--row", form] + [
            x for x in (argv if argv is not None else sys.argv[1:])]
        env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
        proc = subprocess.run(args, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines()
            why = lines[-1] if lines else f"killed by signal {-proc.returncode} (out of memory?)"
            rows.append({"form": form, "error": why})
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    ok = [r for r in rows if "error" not in r]
    if ok:
        r0 = ok[0]
        print(f"GPT-2 last layer {r0['width']} × {r0['vocab']} ({r0['params']} parameters), "
              f"{r0['layers']} blocks, {r0['n_seq']} sequences × {r0['seq']} tokens = "
              f"{r0['positions']} positions, float32, {a.threads} thread(s)")
    print("seconds as CPU / wall (the CPU time of one thread is the unloaded figure); peak "
          "resident MiB")
    print(f"{'form':>5s} {'body s':>13s} {'fit s':>13s} {'evidence s':>13s} {'predictive s':>13s} "
          f"{'floor MiB':>10s} {'peak fit':>9s} {'peak ev.':>9s} {'peak pred.':>11s}")
    for r in rows:
        if "error" in r:
            print(f"{r['form']:>5s} n/a ({r['error']})")
            continue
        cols = " ".join(f"{r[k + '_cpu_s']:6.1f}/{r[k + '_s']:6.1f}"
                        for k in ("body", "fit", "evidence", "predictive"))
        print(f"{r['form']:>5s} {cols} {r['floor_rss_mib']:10.0f} {r['fit_rss_mib']:9.0f} "
              f"{r['evidence_rss_mib']:9.0f} {r['predictive_rss_mib']:11.0f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"threads": a.threads, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
