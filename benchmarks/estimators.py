#!/usr/bin/env python
"""Benchmark of the matrix-free estimators: the cost of 100 Hutchinson products with
the exact Fisher ``PMatImplicit`` on the workloads of benchmarks/run.py, as multiples of the same
floor (one forward + backward of the mean cross-entropy over the same data and batches).

Usage::

    python benchmarks/estimators.py                        # W1 and W2, table on stdout
    python benchmarks/estimators.py --workloads W1 --n 256 --json est.json --repeats 3
    python benchmarks/estimators.py --quick                # smaller N, one repeat

Rows, per workload:

* **trace**: ``trace_estimate(M, 100)`` (Hutchinson): the 100 quadratic forms ``ωᵀMω`` in one
  batched ``mapTMmap`` (one pass over the data, forward-mode JVPs only, vmapped over the probes);
* **diag**: ``diag_estimate(M, 100)``: the 100 products ``Mω`` in one batched ``mmap`` (one pass,
  JVPs and VJPs vmapped over the probes);
* **single**: 100 calls to ``M.mv``: 100 passes over the data (what a hand-written loop does);
* ``single / trace``, ``single / diag``: the speed-ups.

Timing, clock, threads (one) and float32 synthetic data are those of benchmarks/run.py, whose
functions are imported (``make_setup``, ``floor_fn``, ``timeit``).
"""
import argparse
import contextlib
import json
import os
import statistics
import sys
import time

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import run as harness  # noqa: E402  (benchmarks/run.py: the floor and the timing)

N_PRODUCTS = 100
ROWS = ("trace", "diag", "single")


def bench_workload(wname, n, repeats, log, n_products=None):
    import nngeometry
    from nngeometry.estimators import diag_estimate, trace_estimate
    from nngeometry.object import PMatImplicit, random_pvector

    n_products = n_products or N_PRODUCTS
    w = harness.WORKLOADS[wname]
    model, loader = harness.make_setup(w, n)
    floor = harness.floor_fn(model, loader)
    floor_samples = list(harness.timeit(floor, max(repeats, 3))[1])
    M = nngeometry.FIM(model=model, loader=loader, representation=PMatImplicit,
                       variant="classif_logits")
    v = random_pvector(M.layer_collection)
    res = {"description": w.description, "n": n,
           "n_params": M.layer_collection.numel(), "n_products": n_products}

    def trace():
        return trace_estimate(M, n_products, generator=0)

    def diag():
        return diag_estimate(M, n_products, generator=0)

    def single():
        for _ in range(n_products):
            out = M.mv(v)
        return out

    for name, fn in (("trace", trace), ("diag", diag), ("single", single)):
        log(f"{wname}: {name}")
        try:
            t, samples, _ = harness.timeit(fn, repeats)
            res[name] = {"time_s": t, "samples": samples}
        except Exception as exc:  # noqa: BLE001  (e.g. out of memory for the batched pass)
            res[name] = {"reason": harness.reason_of(exc)}
    floor_samples += list(harness.timeit(floor, max(repeats, 3))[1])
    floor_t = statistics.median(floor_samples)
    res["floor"] = {"time_s": floor_t, "samples": floor_samples}
    for name in ROWS:
        if "time_s" in res[name]:
            res[name]["x_floor"] = res[name]["time_s"] / floor_t
    for name in ("trace", "diag"):
        if "time_s" in res[name] and "time_s" in res["single"]:
            res[f"single_over_{name}"] = res["single"]["time_s"] / res[name]["time_s"]
    return res


def print_table(results, n_products=N_PRODUCTS):
    print(f"== {n_products} products with PMatImplicit (exact Fisher, classif_logits), as "
          f"multiples of the floor (threads={torch.get_num_threads()})")
    print(f"{'workload':<10}{'n':>6}{'P':>10}{'floor s':>10}{'trace':>10}{'diag':>10}"
          f"{'single':>10}{'single/trace':>14}{'single/diag':>13}")
    for wname, r in results.items():
        if "floor" not in r:
            print(f"{wname:<10} n/a ({r.get('reason')})")
            continue

        def cell(name):
            d = r[name]
            return f"{d['x_floor']:.1f}x" if "x_floor" in d else "n/a"

        def ratio(name):
            return f"{r[name]:.1f}" if name in r else "n/a"
        print(f"{wname:<10}{r['n']:>6}{r['n_params']:>10}{r['floor']['time_s']:>10.3f}"
              f"{cell('trace'):>10}{cell('diag'):>10}{cell('single'):>10}"
              f"{ratio('single_over_trace'):>14}{ratio('single_over_diag'):>13}")
        for name in ROWS:
            if "reason" in r[name]:
                print(f"   {name}: n/a ({r[name]['reason']})")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default="W1,W2", help="comma-separated subset of W1..W4")
    ap.add_argument("--n", type=int, default=None, help="examples per workload (default: the "
                    "workload's N, or its quick N with --quick)")
    ap.add_argument("--repeats", type=int, default=None, help="samples per figure (default 3, "
                    "1 with --quick)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--products", type=int, default=N_PRODUCTS,
                    help=f"products per row (default {N_PRODUCTS}; fewer for a smoke run)")
    ap.add_argument("--json", default=None, metavar="PATH")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    harness._clock = harness.CLOCK[args.clock]
    torch.set_num_threads(1)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    results = {}
    for wname in [x.strip() for x in args.workloads.split(",") if x.strip()]:
        if wname not in harness.WORKLOADS:
            raise SystemExit(f"unknown workload {wname}; choose from "
                             f"{', '.join(harness.WORKLOADS)}")
        w = harness.WORKLOADS[wname]
        n = args.n or (w.n_quick if args.quick else w.n)
        try:
            results[wname] = bench_workload(wname, n, repeats, log, args.products)
        except Exception as exc:  # noqa: BLE001
            results[wname] = {"description": w.description, "reason": harness.reason_of(exc)}
    print_table(results, args.products)
    if args.json:
        meta = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                "repeats": repeats, "clock": args.clock, "dtype": "float32",
                "date": time.strftime("%Y-%m-%d %H:%M:%S")}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "workloads": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
