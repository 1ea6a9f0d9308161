#!/usr/bin/env python
"""Influence scores: time and peak memory of the factor fitting and of the pairwise scores
(1000 training × 100 query examples), for ``nngeometry.influence.Influence`` and, side by side
in the same run, kronfluence when it is importable.

Usage::

    python benchmarks/influence.py                      # W2: EKFAC, KFAC, Diag, identity
    python benchmarks/influence.py --strategies ekfac --json influence.json
    python benchmarks/influence.py --quick              # 64 × 8 examples: a smoke run
    python benchmarks/influence.py --workload W6 --strategies ekfac --query-rank 32
    python benchmarks/influence.py --workload W6 --n-train 128 --n-query 16   # reduced W6

Workloads:

* **W2**: the small CNN of ``benchmarks/run.py`` on 3×32×32 inputs, 10 classes; batches of
  64 training and 100 query examples; every layer.
* **W6**: the GPT-2-style model of ``benchmarks/real.py`` (6 layers, width 256, 4 heads,
  vocabulary 8192, 128 tokens, untied output layer) with its ``transformers`` ``Conv1D``
  projections replaced by the equivalent ``nn.Linear`` (same function: kronfluence tracks
  ``nn.Linear`` and ``nn.Conv2d`` modules only, not ``Conv1D``); the curvature and the scores
  on the 25 linear layers (4 per block and the output layer: kronfluence's default modules;
  embeddings and layer norms left out on both sides); the loss of a sequence is its next-token
  cross-entropy summed over its 127 predicted tokens; batches of 16 training and 20 query
  sequences. 100 full query gradients would take 3.6 GB: ``--query-rank`` keeps each layer's
  preconditioned query gradient at that rank (kronfluence's ``query_gradient_low_rank``, with
  ``use_full_svd=True``: the exact truncated SVD, as ours, not its default randomised one).

Both libraries use the same model, data, batches, curvature (the empirical Fisher:
kronfluence's ``use_empirical_fisher=True``) and damping (kronfluence's heuristic,
``damping='heuristic'`` here); everything in float32 on one thread.

Each row (one library, one strategy) runs in its own process, once (after one forward and
backward of the model, outside the measures): the fit, then the scores.
Times are that process's CPU time of each call. Peak memory is the peak resident set during the
call above the resident set at its start (the kernel's high-water mark, reset before the call
through ``/proc/self/clear_refs``; a 2 ms sampling thread where that is not writable): the
model, the data and, for the scores, the fitted factors are excluded. kronfluence's times
include writing its factors and scores to disk (safetensors), which it always does. ``agree``
is the Pearson correlation of the two libraries' scores (1.0 where they compute the same
matrix; convolutions are factored differently by the two, see docs/influence.md).
"""
import argparse
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, Dataset, TensorDataset  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# this checkout's nngeometry, before an installed one
sys.path[:0] = [HERE, os.path.dirname(HERE)]

from run import CNN  # noqa: E402

from nngeometry.influence import Influence  # noqa: E402
from nngeometry.layercollection import LayerCollection  # noqa: E402
from nngeometry.object import PMatDiag, PMatEKFAC, PMatEye, PMatKFAC  # noqa: E402

REPS = {"ekfac": PMatEKFAC, "kfac": PMatKFAC, "diagonal": PMatDiag, "identity": PMatEye}
BATCH = {"W2": (64, 100), "W6": (16, 20)}  # (training, query) batch sizes
VOCAB = 8192


# ====================================================================== memory and time
def _status(field):
    with open("/proc/self/status") as f:
        return int(re.search(field + r":\s+(\d+)", f.read()).group(1)) * 1024


class Probe:
    """CPU time and peak resident set above the start of a ``with`` block."""

    def __enter__(self):
        gc.collect()
        self.sampler = None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident set
        except OSError:
            self.sampler = self._sample()
        self.base = _status("VmRSS")
        self.t0 = time.process_time()
        return self

    def _sample(self):
        state = {"peak": _status("VmRSS"), "run": True}

        def go():
            while state["run"]:
                state["peak"] = max(state["peak"], _status("VmRSS"))
                time.sleep(0.002)
        t = threading.Thread(target=go, daemon=True)
        t.start()
        return state, t

    def __exit__(self, *exc):
        self.seconds = time.process_time() - self.t0
        if self.sampler is None:
            peak = _status("VmHWM")
        else:
            state, t = self.sampler
            state["run"] = False
            t.join()
            peak = max(state["peak"], _status("VmRSS"))
        self.mib = (peak - self.base) / 2 ** 20
        return False


# ====================================================================== workloads
def w2(n_train, n_query):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n_train + n_query, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n_train + n_query,), generator=g)
    torch.manual_seed(0)
    model = CNN().float().eval()
    return dict(model=model, train=TensorDataset(x[:n_train], y[:n_train]),
                query=TensorDataset(x[n_train:], y[n_train:]), kwargs={})


class Sequences(Dataset):
    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return self.ids.shape[0]

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def linearize(model):
    """Replace every ``transformers`` ``Conv1D`` (``y = x W + b``, ``W`` ``(in, out)``) by the
    ``nn.Linear`` computing the same function."""
    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if type(child).__name__ == "Conv1D":
                d_in, d_out = child.weight.shape
                lin = nn.Linear(d_in, d_out, bias=child.bias is not None)
                with torch.no_grad():
                    lin.weight.copy_(child.weight.t())
                    if child.bias is not None:
                        lin.bias.copy_(child.bias)
                setattr(mod, name, lin)
    return model


def lm_logits(model, ids):
    """Next-token logits ``(n, T - 1, V)``; positions given per example (an unbatched ``(1, T)``
    lookup is refused by the per-example statistics)."""
    pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    return model(input_ids=ids, position_ids=pos).logits[:, :-1]


def w6(n_train, n_query):
    from real import gpt2
    torch.manual_seed(0)
    model = linearize(gpt2(vocab=VOCAB)).float().eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (n_train + n_query, 128), generator=g)

    def function(b):
        return lm_logits(model, b["input_ids"])

    def loss(out, labels):  # (n,): each sequence's next-token cross-entropy, summed
        # (on the (n (T - 1), V) view: the softmax over a strided class axis, out.transpose(1,
        # 2), is 3x slower)
        n, t, v = out.shape
        return F.cross_entropy(out.reshape(n * t, v), labels[:, 1:].reshape(n * t),
                               reduction="none").view(n, t).sum(1)

    lc = LayerCollection()
    for m in model.modules():
        if isinstance(m, nn.Linear):
            lc.add_layer_from_model(model, m)
    return dict(model=model, train=Sequences(ids[:n_train]), query=Sequences(ids[n_train:]),
                kwargs=dict(function=function, loss_function=loss, layer_collection=lc))


WORKLOADS = {"W2": w2, "W6": w6}


# ====================================================================== one row per process
def ours(setup, workload, strategy, query_rank):
    bt, bq = BATCH[workload]
    train_loader = DataLoader(setup["train"], batch_size=bt)
    query_loader = DataLoader(setup["query"], batch_size=bq)
    damping = 0.0 if strategy == "identity" else "heuristic"
    inf = Influence(setup["model"], REPS[strategy], damping=damping, curvature="empirical",
                    query_rank=query_rank, **setup["kwargs"])
    with Probe() as fit:
        inf.fit(train_loader)
    with Probe() as sc:
        scores = inf.pairwise_scores(train_loader, query_loader)
    return scores, fit, sc


def theirs(setup, workload, strategy, query_rank, workdir):
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

    class LanguageModel(Task):
        def compute_train_loss(self, batch, model, sample=False):
            ids = batch["input_ids"]
            logits = lm_logits(model, ids)
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                   reduction="sum")

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

    bt, bq = BATCH[workload]
    task = Classification() if workload == "W2" else LanguageModel()
    kmodel = prepare_model(copy.deepcopy(setup["model"]), task)
    an = Analyzer(analysis_name="bench", model=kmodel, task=task, cpu=True, disable_tqdm=True,
                  output_dir=workdir)
    fargs = FactorArguments(strategy=strategy, use_empirical_fisher=True)
    # the exact truncated SVD, as ours (its default is a randomised one)
    sargs = ScoreArguments(damping_factor=None, query_gradient_low_rank=query_rank,
                           use_full_svd=query_rank is not None)
    with Probe() as fit:
        an.fit_all_factors(factors_name=strategy, dataset=setup["train"],
                           per_device_batch_size=bt, factor_args=fargs,
                           overwrite_output_dir=True)
    with Probe() as sc:
        an.compute_pairwise_scores(scores_name=strategy, factors_name=strategy,
                                   query_dataset=setup["query"], train_dataset=setup["train"],
                                   per_device_query_batch_size=bq,
                                   per_device_train_batch_size=bt, score_args=sargs,
                                   overwrite_output_dir=True)
        scores = an.load_pairwise_scores(strategy)["all_modules"]
    return scores, fit, sc


def warm_up(setup, workload):
    """One forward and backward of the model on two examples, so that the first probed call
    does not count the one-off costs of a process's first autograd pass."""
    model = setup["model"]
    two = DataLoader(setup["train"], batch_size=2)
    b = next(iter(two))
    if workload == "W2":
        loss = F.cross_entropy(model(b[0]), b[1])
    else:
        out = lm_logits(model, b["input_ids"])
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), b["input_ids"][:, 1:].reshape(-1))
    loss.backward()
    model.zero_grad(set_to_none=True)


def row(args):
    """Run one row in this process; write its figures (JSON) and scores (``torch.save``)."""
    torch.set_num_threads(1)
    setup = WORKLOADS[args.workload](args.n_train, args.n_query)
    warm_up(setup, args.workload)
    if args.library == "nngeometry":
        scores, fit, sc = ours(setup, args.workload, args.row, args.query_rank)
    else:
        with tempfile.TemporaryDirectory() as d:
            scores, fit, sc = theirs(setup, args.workload, args.row, args.query_rank, d)
    torch.save(scores.detach().float().clone(), args.out + ".pt")
    with open(args.out + ".json", "w") as f:
        json.dump({"fit_s": fit.seconds, "fit_peak_MiB": fit.mib, "scores_s": sc.seconds,
                   "scores_peak_MiB": sc.mib, "shape": list(scores.shape)}, f)


def run_row(args, strategy, library, workdir):
    out = os.path.join(workdir, f"{strategy}-{library}")
    cmd = [sys.executable, os.path.abspath(__file__), "--row", strategy, "--library", library,
           "--out", out, "--workload", args.workload, "--n-train", str(args.n_train),
           "--n-query", str(args.n_query)]
    if args.query_rank is not None:
        cmd += ["--query-rank", str(args.query_rank)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["?"])[-1]
        return None, tail
    with open(out + ".json") as f:
        r = json.load(f)
    return torch.load(out + ".pt"), r


def pearson(a, b):
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--strategies", default=None,
                   help="comma-separated (default: ekfac,kfac,diagonal,identity on W2, ekfac on W6)")
    p.add_argument("--quick", action="store_true", help="a few examples: a smoke run")
    p.add_argument("--json", default=None)
    p.add_argument("--workload", default="W2", choices=tuple(WORKLOADS))
    p.add_argument("--n-train", type=int, default=None)
    p.add_argument("--n-query", type=int, default=None)
    p.add_argument("--query-rank", type=int, default=None)
    p.add_argument("--libraries", default="nngeometry,kronfluence")
    # one row in this process (used by the driver)
    p.add_argument("--row", default=None, help=argparse.SUPPRESS)
    p.add_argument("--library", default="nngeometry", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    quick = {"W2": (64, 8), "W6": (32, 4)}[args.workload]
    if args.n_train is None:
        args.n_train = quick[0] if args.quick else 1000
    if args.n_query is None:
        args.n_query = quick[1] if args.quick else 100
    if args.row is not None:
        return row(args)
    strategies = args.strategies or ("ekfac" if args.workload == "W6"
                                     else "ekfac,kfac,diagonal,identity")
    libraries = args.libraries.split(",")
    if "kronfluence" in libraries:
        try:
            import kronfluence  # noqa: F401
        except ImportError:
            libraries.remove("kronfluence")
            print("(kronfluence is not importable: nngeometry's rows only)")
    what = {"W2": "CNN 3x32x32", "W6": "GPT-2-style, nn.Linear projections, 128 tokens"}
    print(f"{args.workload} ({what[args.workload]}), {args.n_train} train x {args.n_query} "
          f"query, float32, one thread, CPU time, query_rank={args.query_rank}")
    print(f"{'strategy':9s} {'library':12s} {'fit s':>8s} {'fit MiB':>8s} {'scores s':>9s} "
          f"{'scores MiB':>10s} {'agree':>6s}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for strategy in strategies.split(","):
            got = {}
            for lib in libraries:
                s, r = run_row(args, strategy, lib, d)
                if s is None:
                    print(f"{strategy:9s} {lib:12s} n/a ({r})", flush=True)
                    continue
                got[lib] = s
                agree = ""
                if lib != "nngeometry" and "nngeometry" in got:
                    agree = f"{pearson(got['nngeometry'], s):.4f}"
                    r["agree"] = float(agree)
                rows.append(dict(strategy=strategy, library=lib, **r))
                print(f"{strategy:9s} {lib:12s} {r['fit_s']:8.2f} {r['fit_peak_MiB']:8.1f} "
                      f"{r['scores_s']:9.2f} {r['scores_peak_MiB']:10.1f} {agree:>6s}",
                      flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"workload": args.workload, "n_train": args.n_train,
                       "n_query": args.n_query, "query_rank": args.query_rank, "rows": rows},
                      f, indent=1)


if __name__ == "__main__":
    main()
