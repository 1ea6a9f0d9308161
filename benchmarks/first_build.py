"""First KFAC build on a fresh model against the second build on the same model.

A small CNN (3×16×16 inputs, conv8-relu-maxpool-conv16-relu-global mean-fc10: 1562 parameters),
256 images in batches of 64, closed-form Fisher (``FIM(..., PMatKFAC)``), one thread, CPU
seconds of the process (not inflated by other processes sharing the cores). Each line is
measured in a fresh Python process, the three kinds of process interleaved:

* ``cold``: the first build in the process, then a second build on the same model;
* ``torch warm``: the same after one ``torch.autograd.grad`` with explicit ``grad_outputs`` on an
  unrelated tensor: torch imports its symbolic-shapes machinery (sympy, 1.5–2 s) at that first
  call. The engine's backward passes do not go through that check (``strategy._grad``), so a
  build no longer pays it; this line shows what a process that paid it already sees;
* ``trained``: the same after an epoch of SGD over the same loader on another model with the
  same layers, as in a process that trained a model before computing its Fisher: torch's own
  first calls (convolution kernel selection, the allocator's first blocks, the loader's first
  iteration) are paid; what is left of the first build's extra time is the library's
  once-per-model checks on the first batch (two backward passes of one direction: the
  parameter-use check, each layer's weight gradient from its own formula, and the check for
  outputs shared by the examples) and torch's first engine calls for the new model's shapes
  (the backward strategy of this CNN is read from its graph, max-pooling: the loop, with no
  timing sample);
* ``gc``: the seconds of the first build spent in Python's garbage collector (a first full
  collection of the objects ``import torch`` left, 0.1–0.4 s, falls in whatever code runs first
  after the imports and allocates enough: a process's cost, not the build's);
* ``new model``: after the two builds, a new model of the same structure (the backward-strategy
  choice is kept per structure) and one of another structure (16 → 12 channels).

    python benchmarks/first_build.py [--repeats 3] [--json out.json]
    python benchmarks/first_build.py --phases [--repeats 12]   # the first build's extra, by phase
"""
import argparse
import json
import statistics
import subprocess
import sys
import time

SETUP = r'''
import sys, time, json, gc, collections
sys.path.insert(0, {root!r})
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
torch.set_num_threads(1)
from nngeometry import FIM
from nngeometry.object import PMatKFAC
if {warm} >= 1:
    x = torch.randn(3, requires_grad=True)
    torch.autograd.grad(x * 2, x, torch.ones(3))
def net(c=16):
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, c, 3),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))
torch.manual_seed(0)
X, y = torch.randn(256, 3, 16, 16), torch.randint(0, 10, (256,))
loader = DataLoader(TensorDataset(X, y), batch_size=64)
if {warm} >= 2:
    # an epoch of SGD on another model of the same layers over the same loader: torch's own
    # first calls (kernel selection, allocator, the loader's first iteration) are paid, as in
    # a process that trained before computing a Fisher
    w = net()
    opt = torch.optim.SGD(w.parameters(), lr=0.01)
    for xb, yb in loader:
        opt.zero_grad()
        nn.functional.cross_entropy(w(xb), yb).backward()
        opt.step()
'''

WORKER = SETUP + r'''
GC = [0.0, 0.0]
def _gc(phase, info):
    if phase == "start":
        GC[1] = time.process_time()
    else:
        GC[0] += time.process_time() - GC[1]
gc.callbacks.append(_gc)
def build(m):
    GC[0] = 0.0
    t = time.process_time()
    FIM(m, loader, PMatKFAC, variant="classif_logits")
    return time.process_time() - t
m = net()
assert sum(p.numel() for p in m.parameters()) == 1562
r = {{"first": build(m), "gc": GC[0], "second": build(m), "same_structure": build(net()),
      "other_structure": build(net(12))}}
print(json.dumps(r))
'''

PHASES_WORKER = SETUP + r'''
import nngeometry.backend.passes as P
import nngeometry.backend.consumers as C
T = collections.defaultdict(float)
def timed(cls, name, key):
    f = getattr(cls, name)
    def g(*a, **k):
        t = time.process_time()
        try:
            return f(*a, **k)
        finally:
            T[key] += time.process_time() - t
    setattr(cls, name, g)
timed(P.HookedPasses, "_broadcast_outputs", "forward")
timed(P.HookedPasses, "_check_calls", "checks")
timed(C.KFACFactors, "update", "statistics")
chunks = P.HookedPasses._direction_chunks
def timed_chunks(self, *a, **k):
    it = chunks(self, *a, **k)
    while True:
        t = time.process_time()
        try:
            v = next(it)
        except StopIteration:
            return
        finally:
            T["backward"] += time.process_time() - t
        yield v
P.HookedPasses._direction_chunks = timed_chunks
m = net()
res = []
for i in range(2):
    T.clear()
    t = time.process_time()
    FIM(m, loader, PMatKFAC, variant="classif_logits")
    d = dict(T)
    d["total"] = time.process_time() - t
    d["rest"] = d["total"] - sum(T.values())
    res.append(d)
print(json.dumps(res))
'''


def run(warm, root):
    code = WORKER.format(root=root, warm=int(warm))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"OMP_NUM_THREADS": "1", "PATH": ""}, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def phases(root, repeats):
    """Median CPU milliseconds of each phase of the first and the second build in a trained
    process, and the median of their per-process differences."""
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", PHASES_WORKER.format(root=root, warm=2)],
                             capture_output=True, text=True,
                             env={"OMP_NUM_THREADS": "1", "PATH": ""}, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"trained process, {repeats} fresh processes: CPU ms per phase (median), first build, "
          "second build, and the median of first - second")
    table = {}
    for k in ("forward", "checks", "backward", "statistics", "rest", "total"):
        a = statistics.median(r[0][k] for r in runs) * 1e3
        b = statistics.median(r[1][k] for r in runs) * 1e3
        d = statistics.median(r[0][k] - r[1][k] for r in runs) * 1e3
        table[k] = {"first_ms": a, "second_ms": b, "difference_ms": d}
        print(f"{k:>12}: {a:7.2f} {b:7.2f} {d:+7.2f}")
    return table


def main(argv=None):
    import os
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--phases", action="store_true",
                    help="instead: where the first build's extra time goes, phase by phase "
                    "(forward, the once-per-model checks, the backward passes, the statistics' "
                    "updates, the rest), in trained processes")
    ap.add_argument("--root", default=None, help="the nngeometry checkout to measure "
                    "(default: this one)")
    args = ap.parse_args(argv)
    root = args.root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if args.phases:
        table = phases(root, max(args.repeats, 9))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(table, f, indent=1)
        return table
    results = {}
    labels = (("cold", 0), ("torch warm", 1), ("trained", 2))
    runs = {label: [] for label, _ in labels}
    for _ in range(args.repeats):  # the three kinds of process interleaved
        for label, warm in labels:
            runs[label].append(run(warm, root))
    for label, _ in labels:
        rs = results[label] = runs[label]
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        ratios = [r["first"] / r["second"] for r in rs]
        no_gc = [(r["first"] - r["gc"]) / r["second"] for r in rs]
        print(f"{label:>10}: first {med['first']:.3f} s (gc {med['gc']:.3f} s), second "
              f"{med['second']:.3f} s, first/second {statistics.median(ratios):.2f} (runs: "
              + ", ".join(f"{x:.2f}" for x in ratios) + "), without the gc "
              f"{statistics.median(no_gc):.2f} (runs: " + ", ".join(f"{x:.2f}" for x in no_gc)
              + f"); new model, same structure {med['same_structure']:.3f} s, other structure "
              f"{med['other_structure']:.3f} s")
        # a fresh model in a process that built one before: the library's once-per-model work
        # (the checks on the first batch) without the process's first use of torch's kernels
        # and of new memory
        fresh = {k: statistics.median(r[k] / r["second"] for r in rs)
                 for k in ("same_structure", "other_structure")}
        print(f"{'':>10}  fresh model after a first build, / second: same structure "
              f"{fresh['same_structure']:.2f}, other structure {fresh['other_structure']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
