"""Cost of KFAC-reduce against KFAC-expand: Monte-Carlo KFAC build (one trial) on W2 (CNN),
W5 (ResNet-18) and W6 (GPT-2-style LM; its Embedding layers left out of the collection for
both, since 'reduce' is refused for them), one thread, wall time, the two interleaved.

    python benchmarks/kfac_reduce.py [--workloads W2,W5,W6] [--repeats 3] [--quick] [--json out.json]
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import real  # noqa: E402
import run as R  # noqa: E402
from nngeometry import FIM_MonteCarlo  # noqa: E402
from nngeometry.layercollection import LayerCollection  # noqa: E402
from nngeometry.object import PMatKFAC  # noqa: E402


def setup(name, quick):
    if name in R.WORKLOADS:
        w = R.WORKLOADS[name]
        model, loader = R.make_setup(w, 128 if quick else w.n)
        return model, loader, {}
    make, n, n_quick = real.WORKLOADS[name]
    s = make(n_quick if quick else n)
    kw = {"function": s.kwargs["function"]} if "function" in s.kwargs else {}
    return s.model, s.loader, kw


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="W2,W5,W6")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = {}
    for name in args.workloads.split(","):
        model, loader, kw = setup(name, args.quick)
        lc = LayerCollection()
        for lid, layer in LayerCollection.from_model(model).layers.items():
            if type(layer).__name__ != "EmbeddingLayer":
                lc.add_layer(lid, layer)
        times = {"expand": [], "reduce": []}
        for r in range(args.repeats + 1):  # the first round warms up
            for approx in ("expand", "reduce"):
                t0 = time.perf_counter()
                FIM_MonteCarlo(model, loader, PMatKFAC, layer_collection=lc, trials=1,
                               kfac_approx=approx, variant="classif_logits", **kw)
                if r:
                    times[approx].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        out[name] = times
        print(f"{name}: expand {med['expand']:.3f} s, reduce {med['reduce']:.3f} s, "
              f"reduce/expand {med['reduce'] / med['expand']:.2f} "
              f"(runs: {', '.join(f'{a:.2f}/{b:.2f}' for a, b in zip(times['reduce'], times['expand']))})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
