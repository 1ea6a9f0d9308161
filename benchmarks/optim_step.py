"""Cost of one natural-gradient training step, as a multiple of a plain SGD step.

    python benchmarks/optim_step.py [--workloads W1,W2] [--reps KFAC,EKFAC] [--repeats 5]
                                    [--json out.json]

For each workload (benchmarks/run.py's W1 and W2, one mini-batch of ``batch`` examples) and
representation, times a whole training step (forward, backward, ``NaturalGradient.step``,
``SGD.step``) with a new curvature estimate at every step (``update_freq = 1``) and the
matrix used for solves refreshed every ``--inv-freq`` steps (default: never after the first,
so that the figure is the statistics' cost, the part the two strategies differ in; the
eigendecompositions of a refresh cost the same in both), Monte-Carlo Fisher with one sample:

* ``capture``: the curvature taken from the training step itself (no extra forward pass);
* ``extra pass``: ``capture=False``, the engine runs its own pass over the step's batch.

Figures: median process CPU time over ``repeats`` (one thread), and the ratio to the SGD step
(the floor). Prints a table and writes JSON.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from run import WORKLOADS, make_setup  # noqa: E402

from nngeometry.object import PMatDiag, PMatEKFAC, PMatKFAC  # noqa: E402
from nngeometry.optim import NaturalGradient  # noqa: E402

REPS = {"KFAC": PMatKFAC, "EKFAC": PMatEKFAC, "Diag": PMatDiag}


def _time(step, repeats):
    step()  # warm-up (first-use work: decompositions, lazy set-up)
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        step()
        times.append(time.process_time() - t0)
    return statistics.median(times)


def measure(wname, rep_name, repeats, inv_freq):
    w = WORKLOADS[wname]
    model, loader = make_setup(w, w.batch)
    x, y = next(iter(loader))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def sgd_step():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    row = {"workload": wname, "rep": rep_name, "sgd_s": _time(sgd_step, repeats)}
    for name, capture in (("capture", True), ("extra_pass", False)):
        pre = NaturalGradient(model, REPS[rep_name], curvature="mc", damping=1e-2,
                              update_freq=1, inv_freq=inv_freq, capture=capture)

        def ng_step():
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            pre.step((x, y))
            opt.step()
        row[f"{name}_s"] = _time(ng_step, repeats)
        pre.close()
    row["capture_x_sgd"] = row["capture_s"] / row["sgd_s"]
    row["extra_pass_x_sgd"] = row["extra_pass_s"] / row["sgd_s"]
    row["capture_over_extra"] = row["capture_s"] / row["extra_pass_s"]
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="W1,W2")
    ap.add_argument("--reps", default="KFAC,EKFAC,Diag")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--inv-freq", type=int, default=10 ** 9)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    print(f"{'workload':8} {'rep':6} {'SGD step':>10} {'capture':>10} {'extra pass':>11} "
          f"{'cap×SGD':>8} {'extra×SGD':>9} {'cap/extra':>9}")
    for wname in args.workloads.split(","):
        for rep in args.reps.split(","):
            r = measure(wname, rep, args.repeats, args.inv_freq)
            rows.append(r)
            print(f"{wname:8} {rep:6} {r['sgd_s'] * 1e3:8.1f}ms {r['capture_s'] * 1e3:8.1f}ms "
                  f"{r['extra_pass_s'] * 1e3:9.1f}ms {r['capture_x_sgd']:8.2f} "
                  f"{r['extra_pass_x_sgd']:9.2f} {r['capture_over_extra']:9.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "torch": torch.__version__}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
