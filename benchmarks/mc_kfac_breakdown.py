#!/usr/bin/env python
"""Where the time of W1's Monte-Carlo KFAC build goes, against the floor, in one process.

W1 (MLP 784-256-256-10, 1024 examples in batches of 128, one thread). Every line is the
median over ``--repeats`` interleaved samples of CPU seconds:

* ``floor``: one forward + backward of the mean cross-entropy per batch (peers.py's floor);
* ``MC KFAC build``: ``FIM_MonteCarlo(model, loader, PMatKFAC, trials=1)``;
* its parts as bare tensor expressions over the same batches (no library code):
  ``forward + 1 backward to the outputs`` (the pass the build needs: the sampled labels'
  cross-entropy differentiated w.r.t. the layers' outputs, not the weights),
  ``input factors`` (``[x 1]ᵀ [x 1]`` per layer: 785², 257², 257² wide Grams), ``output factors``
  (``gᵀ g`` per layer: 256², 256², 10²);
* ``rest``: the build minus the three parts (sampling, hooks, bookkeeping, means).

    python benchmarks/mc_kfac_breakdown.py [--repeats 9] [--json out.json]
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import WORKLOADS  # noqa: E402

from nngeometry import FIM_MonteCarlo  # noqa: E402
from nngeometry.maths.gram_accumulator import SymmetricAccumulator  # noqa: E402
from nngeometry.object import PMatKFAC  # noqa: E402


def cpu(fn):
    t = time.process_time()
    fn()
    return time.process_time() - t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    w = WORKLOADS["W1"]
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = w.make_model()
    X = w.make_inputs(w.n, g)
    y = torch.randint(0, 10, (w.n,), generator=g)
    batches = [(X[i:i + w.batch], y[i:i + w.batch]) for i in range(0, w.n, w.batch)]
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]

    def floor():
        model.zero_grad(set_to_none=True)
        for xb, yb in batches:
            F.cross_entropy(model(xb), yb).backward()

    def build():
        FIM_MonteCarlo(model=model, loader=batches, representation=PMatKFAC,
                       variant="classif_logits", trials=1)

    # the bare parts: the layers' inputs and output gradients of one sampled direction
    acts, outs, raw = [], [], []
    for xb, _ in batches:
        h, a_b, o_b = xb, [], []
        for m in model:
            if isinstance(m, torch.nn.Linear):
                raw.append(h.detach())
                a_b.append(torch.cat([h, h.new_ones(h.shape[0], 1)], 1).detach())
                h = m(h)
                o_b.append(h.detach())
            else:
                h = m(h)
        acts.append(a_b)
        outs.append(o_b)

    def forward_backward():
        for xb, _ in batches:
            h, targets = xb, []
            for m in model:
                h = m(h)
                if isinstance(m, torch.nn.Linear):
                    targets.append(h)
            with torch.no_grad():
                yb = torch.multinomial(torch.softmax(h, 1), 1).squeeze(1)
            torch.autograd.grad(F.cross_entropy(h, yb, reduction="sum"), targets)

    def input_factors():
        for a_b in acts:
            for a in a_b:
                a.t() @ a

    def input_factors_triangle():
        accs = [SymmetricAccumulator(ones_column=True) for _ in linears]
        for j, h in enumerate(raw):
            accs[j % len(linears)].add(h)
        for acc in accs:
            acc.result()

    def output_factors():
        for o_b in outs:
            for o in o_b:
                o.t() @ o

    parts = {"floor": floor, "MC KFAC build": build, "forward + 1 backward to the outputs":
             forward_backward, "input factors": input_factors,
             "input factors, upper block-triangle": input_factors_triangle, "output factors": output_factors}
    for fn in parts.values():
        fn()
    times = {k: [] for k in parts}
    for _ in range(args.repeats):
        for k, fn in parts.items():
            times[k].append(cpu(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    med["rest"] = med["MC KFAC build"] - sum(med[k] for k in (
        "forward + 1 backward to the outputs", "input factors, upper block-triangle",
        "output factors"))
    fl = med["floor"]
    print(f"W1 MC KFAC breakdown, median of {args.repeats} interleaved samples, CPU seconds")
    for k, v in med.items():
        print(f"{k:<40} {v * 1e3:8.1f} ms  {v / fl:5.2f}x floor")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"median_s": med, "samples_s": times}, f, indent=1)


if __name__ == "__main__":
    main()
