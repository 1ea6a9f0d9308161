#!/usr/bin/env python
"""Influence scores: time and peak memory of the factor fitting and of the pairwise scores
(1000 training × 100 query examples) on the workload W2 of ``benchmarks/run.py`` (a small CNN
on 3×32×32 inputs, 10 classes), for ``nngeometry.influence.Influence`` and, side by side in
the same run, kronfluence when it is importable.

Usage::

    python benchmarks/influence.py                      # EKFAC, KFAC, Diag, identity
    python benchmarks/influence.py --strategies ekfac --json influence.json
    python benchmarks/influence.py --quick              # 64 × 8 examples: a smoke run
    python benchmarks/influence.py --workload W6 --strategies ekfac --query-rank 32

``--workload W6``: the GPT-2-style model of ``benchmarks/real.py`` (6 layers, width 256,
vocabulary 8192, 128 tokens, untied output layer), the per-sequence next-token loss summed over
tokens, nngeometry only (kronfluence tracks ``nn.Linear`` and ``nn.Conv2d`` modules, not the
``transformers`` ``Conv1D`` projections of GPT-2); 100 full query gradients would take 3.6 GB,
hence ``--query-rank`` (each layer's preconditioned query gradient kept at that rank).

Both sides use the same model, data, batches (64 training, 100 query examples per batch),
curvature (the empirical Fisher: kronfluence's ``use_empirical_fisher=True``) and damping
(kronfluence's heuristic, ``damping='heuristic'`` here); everything in float32 on one thread.
Times are process CPU time (one sample each: the runs take seconds); peak memory is the peak
of the tensor memory allocated during the call (``torch.profiler``, as in
``benchmarks/run.py``). kronfluence's times include writing its factors and scores to disk
(safetensors), which it always does. ``agree`` is the Pearson correlation of the two
libraries' scores (1.0 where they compute the same matrix; convolutions are factored
differently by the two, see docs/influence.md).
"""
import argparse
import json
import os
import sys
import tempfile
import time

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
try:
    import nngeometry  # noqa: E402,F401
except ImportError:
    sys.path.insert(0, os.path.dirname(HERE))

from run import CNN, peak_memory  # noqa: E402

from nngeometry.influence import Influence  # noqa: E402
from nngeometry.object import PMatDiag, PMatEKFAC, PMatEye, PMatKFAC  # noqa: E402

REPS = {"ekfac": PMatEKFAC, "kfac": PMatKFAC, "diagonal": PMatDiag, "identity": PMatEye}
BATCH, QUERY_BATCH = 64, 100


def data(n_train, n_query):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n_train + n_query, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n_train + n_query,), generator=g)
    return (TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:]))


def clocked(fn):
    t0 = time.process_time()
    out = fn()
    return out, time.process_time() - t0


def ours(model, train, query, strategy, **kwargs):
    train_loader = train if isinstance(train, list) else DataLoader(train, batch_size=BATCH)
    query_loader = query if isinstance(query, list) else DataLoader(query, batch_size=QUERY_BATCH)
    damping = 0.0 if strategy == "identity" else "heuristic"

    def make():
        return Influence(model, REPS[strategy], damping=damping, curvature="empirical",
                         **kwargs)
    inf = make()
    _, t_fit = clocked(lambda: inf.fit(train_loader))
    _, peak_fit, _ = peak_memory(lambda: make().fit(train_loader))
    scores, t_scores = clocked(lambda: inf.pairwise_scores(train_loader, query_loader))
    _, peak_scores, _ = peak_memory(lambda: inf.pairwise_scores(train_loader, query_loader))
    return scores, {"fit_s": t_fit, "fit_peak_MiB": peak_fit / 2 ** 20, "scores_s": t_scores,
                    "scores_peak_MiB": peak_scores / 2 ** 20}


def theirs(model, train, query, strategy, workdir):
    import copy

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class Classification(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

    task = Classification()
    kmodel = prepare_model(copy.deepcopy(model), task)
    an = Analyzer(analysis_name="bench", model=kmodel, task=task, cpu=True, disable_tqdm=True,
                  output_dir=workdir)
    fargs = FactorArguments(strategy=strategy, use_empirical_fisher=True)
    sargs = ScoreArguments(damping_factor=None)
    runs = {"n": 0}

    def fit():
        runs["n"] += 1
        an.fit_all_factors(factors_name=f"{strategy}{runs['n']}", dataset=train,
                           per_device_batch_size=BATCH, factor_args=fargs,
                           overwrite_output_dir=True)
    _, t_fit = clocked(fit)
    _, peak_fit, _ = peak_memory(fit)

    def scores():
        an.compute_pairwise_scores(scores_name=strategy, factors_name=f"{strategy}1",
                                   query_dataset=query, train_dataset=train,
                                   per_device_query_batch_size=QUERY_BATCH,
                                   per_device_train_batch_size=BATCH, score_args=sargs,
                                   overwrite_output_dir=True)
        return an.load_pairwise_scores(strategy)["all_modules"]
    s, t_scores = clocked(scores)
    _, peak_scores, _ = peak_memory(scores)
    return s, {"fit_s": t_fit, "fit_peak_MiB": peak_fit / 2 ** 20, "scores_s": t_scores,
               "scores_peak_MiB": peak_scores / 2 ** 20}


def main_w6(args):
    from real import w6

    n_train, n_query = (32, 4) if args.quick else (1000, 100)
    setup = w6(n_train + n_query)
    batches = setup.loader  # dicts of 16 sequences
    n_train_batches = n_train // 16 if n_train >= 16 else 1
    train = batches[:n_train_batches]
    query = [{k: v[:n_query] for k, v in b.items()} for b in batches[n_train_batches:][:1]] \
        if n_query < 16 else batches[n_train_batches:]
    kw = setup.kwargs
    print(f"W6 (GPT-2-style), {16 * len(train)} train x "
          f"{sum(b['input_ids'].shape[0] for b in query)} query sequences, float32, one thread, "
          f"CPU time, query_rank={args.query_rank}; nngeometry only")
    for strategy in args.strategies.split(","):
        _, r = ours(setup.model, train, query, strategy, function=kw["function"],
                    loss_function=kw["loss_function"], query_rank=args.query_rank)
        print(f"{strategy:9s} nngeometry   fit {r['fit_s']:.2f} s, {r['fit_peak_MiB']:.1f} MiB; "
              f"scores {r['scores_s']:.2f} s, {r['scores_peak_MiB']:.1f} MiB")


def pearson(a, b):
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--strategies", default="ekfac,kfac,diagonal,identity")
    p.add_argument("--quick", action="store_true", help="64 × 8 examples: a smoke run")
    p.add_argument("--json", default=None)
    p.add_argument("--workload", default="W2", choices=("W2", "W6"))
    p.add_argument("--query-rank", type=int, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.workload == "W6":
        return main_w6(args)
    n_train, n_query = (64, 8) if args.quick else (1000, 100)
    train, query = data(n_train, n_query)
    torch.manual_seed(0)
    model = CNN().float().eval()
    try:
        import kronfluence  # noqa: F401
        have_kf = True
    except ImportError:
        have_kf = False
        print("(kronfluence is not importable: nngeometry's rows only)")
    rows = []
    print(f"W2 (CNN 3x32x32), {n_train} train x {n_query} query, float32, one thread, CPU time")
    print(f"{'strategy':9s} {'library':12s} {'fit s':>8s} {'fit MiB':>8s} {'scores s':>9s} "
          f"{'scores MiB':>10s} {'agree':>6s}")
    for strategy in args.strategies.split(","):
        s_ours, r = ours(model, train, query, strategy)
        rows.append(dict(strategy=strategy, library="nngeometry", **r))
        line = [(strategy, "nngeometry", r, "")]
        if have_kf:
            with tempfile.TemporaryDirectory() as d:
                try:
                    s_kf, rk = theirs(model, train, query, strategy, d)
                    agree = pearson(s_ours, s_kf)
                    rows.append(dict(strategy=strategy, library="kronfluence", agree=agree, **rk))
                    line.append((strategy, "kronfluence", rk, f"{agree:.4f}"))
                except Exception as e:  # a failure of the peer is reported, not fatal
                    print(f"{strategy:9s} kronfluence  n/a ({type(e).__name__}: {e})")
        for st, lib, r, agree in line:
            print(f"{st:9s} {lib:12s} {r['fit_s']:8.2f} {r['fit_peak_MiB']:8.1f} "
                  f"{r['scores_s']:9.2f} {r['scores_peak_MiB']:10.1f} {agree:>6s}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"n_train": n_train, "n_query": n_query, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
