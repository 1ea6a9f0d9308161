"""First KFAC build on a fresh model against the second build on the same model.

A small CNN (3×16×16 inputs, conv8-relu-maxpool-conv16-relu-global mean-fc10: 1562 parameters),
256 images in batches of 64, closed-form Fisher (``FIM(..., PMatKFAC)``), one thread. Each line
is measured in a fresh Python process:

* ``cold``: the first build in the process, then a second build on the same model;
* ``torch warm``: the same after one ``torch.autograd.grad`` with explicit ``grad_outputs`` on an
  unrelated tensor: torch imports its symbolic-shapes machinery (sympy, 1.5–2 s) at that first
  call. The engine's backward passes do not go through that check (``strategy._grad``), so a
  build no longer pays it; this line shows what a process that paid it already sees;
* ``gc``: the seconds of the first build spent in Python's garbage collector (a first full
  collection of the objects ``import torch`` left, 0.1–0.4 s, falls in whatever code runs first
  after the imports and allocates enough: a process's cost, not the build's);
* ``new model``: after the two builds, a new model of the same structure (the backward-strategy
  choice is kept per structure) and one of another structure (16 → 12 channels).

    python benchmarks/first_build.py [--repeats 3] [--json out.json]
"""
import argparse
import json
import statistics
import subprocess
import sys
import time

WORKER = r'''
import sys, time, json, gc
sys.path.insert(0, {root!r})
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
torch.set_num_threads(1)
from nngeometry import FIM
from nngeometry.object import PMatKFAC
if {warm}:
    x = torch.randn(3, requires_grad=True)
    torch.autograd.grad(x * 2, x, torch.ones(3))
def net(c=16):
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, c, 3),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))
torch.manual_seed(0)
X, y = torch.randn(256, 3, 16, 16), torch.randint(0, 10, (256,))
loader = DataLoader(TensorDataset(X, y), batch_size=64)
GC = [0.0, 0.0]
def _gc(phase, info):
    if phase == "start":
        GC[1] = time.perf_counter()
    else:
        GC[0] += time.perf_counter() - GC[1]
gc.callbacks.append(_gc)
def build(m):
    GC[0] = 0.0
    t = time.perf_counter()
    FIM(m, loader, PMatKFAC, variant="classif_logits")
    return time.perf_counter() - t
m = net()
assert sum(p.numel() for p in m.parameters()) == 1562
r = {{"first": build(m), "gc": GC[0], "second": build(m), "same_structure": build(net()),
      "other_structure": build(net(12))}}
print(json.dumps(r))
'''


def run(warm, root):
    code = WORKER.format(root=root, warm=warm)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"OMP_NUM_THREADS": "1", "PATH": ""}, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    import os
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--root", default=None, help="the nngeometry checkout to measure "
                    "(default: this one)")
    args = ap.parse_args(argv)
    root = args.root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    results = {}
    for label, warm in (("cold", False), ("torch warm", True)):
        runs = [run(warm, root) for _ in range(args.repeats)]
        results[label] = runs
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        ratios = [r["first"] / r["second"] for r in runs]
        print(f"{label:>10}: first {med['first']:.3f} s (gc {med['gc']:.3f} s), second {med['second']:.3f} s, "
              f"first/second {statistics.median(ratios):.2f} (runs: "
              + ", ".join(f"{x:.2f}" for x in ratios) + "); new model, same structure "
              f"{med['same_structure']:.3f} s, other structure {med['other_structure']:.3f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
