#!/usr/bin/env python
"""Per-call overhead of the representations' operations: the median time of one call
of ``mv``, ``vTMv``, ``get_diag``, ``solve`` (a later call with the same ``regul``, so cached
factorizations are reused) and ``logdet`` for Diag, KFAC, EKFAC, Dense and BlockDiag on a small
float64 MLP (10-16-16-4, 532 parameters), one thread, in microseconds of process CPU time.

On a model this small the arithmetic is a few microseconds: what is measured is mostly the Python
work around it (checks, dispatch, wrapping the result), i.e. what a redesign of the
representations could make slower.

Usage::

    python benchmarks/ops_overhead.py                       # table on stdout
    python benchmarks/ops_overhead.py --json out.json       # also the figures as JSON
    python benchmarks/ops_overhead.py --baseline /path/to/other/checkout
        # also runs the same measurements with PYTHONPATH=/path/to/other/checkout, interleaved
        # with this checkout's (A B A B ... so a slow phase of the machine hits both), and prints
        # the ratio this / baseline per cell

Only the public API is used (``nngeometry.FIM``, ``nngeometry.object``), so the script runs
against any checkout of the package.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPS = ["Diag", "KFAC", "EKFAC", "Dense", "BlockDiag"]
OPS = ["mv", "vTMv", "get_diag", "solve", "logdet"]
REGUL = 0.1


def _setup():
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                          nn.Linear(16, 4)).double()
    x = torch.randn(64, 10, dtype=torch.float64)
    y = torch.randint(0, 4, (64,))
    return model, DataLoader(TensorDataset(x, y), batch_size=32)


def _median_us(fn, calls, rounds):
    """Median over ``rounds`` of the mean time of ``calls`` calls, in µs (after a warm-up), on
    the process CPU clock: on a shared machine, wall time also counts the time slices other
    processes take (spikes of hundreds of µs), CPU time only this process's work."""
    for _ in range(3):
        fn()
    samples = []
    for _ in range(rounds):
        t0 = time.process_time()
        for _ in range(calls):
            fn()
        samples.append((time.process_time() - t0) / calls * 1e6)
    return statistics.median(samples)


def measure(calls, rounds):
    """``{rep: {op: µs}}`` for this process's ``nngeometry``."""
    import nngeometry
    import nngeometry.object as obj

    model, loader = _setup()
    out = {}
    for rep in REPS:
        cls = getattr(obj, "PMat" + rep)
        M = nngeometry.FIM(model=model, loader=loader, representation=cls, n_output=4,
                           variant="classif_logits")
        torch = sys.modules["torch"]
        torch.manual_seed(1)
        v = obj.random_pvector(M.layer_collection, dtype=torch.float64)
        M.solve(v, regul=REGUL)  # first call: factorizations / eigendecompositions cached
        M.logdet(regul=REGUL)
        fns = {"mv": lambda: M.mv(v), "vTMv": lambda: M.vTMv(v), "get_diag": M.get_diag,
               "solve": lambda: M.solve(v, regul=REGUL), "logdet": lambda: M.logdet(regul=REGUL)}
        out[rep] = {op: _median_us(fns[op], calls, rounds) for op in OPS}
    return out


def _table(res, base=None):
    head = f"{'representation':<12}" + "".join(f"{op:>20}" for op in OPS)
    lines = [head, "-" * len(head)]
    for rep in REPS:
        cells = []
        for op in OPS:
            t = res[rep][op]
            if base is None:
                cells.append(f"{t:>17.1f} µs")
            else:
                b = base[rep][op]
                cells.append(f"{t:>7.1f}/{b:>7.1f} {t / b:>4.2f}x")
        lines.append(f"{rep:<12}" + "".join(f"{c:>20}" for c in cells))
    return "\n".join(lines)


def _child(path, calls, rounds):
    env = dict(os.environ, PYTHONPATH=path)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--calls",
                           str(calls), "--rounds", str(rounds)],
                          capture_output=True, text=True, env=env, cwd=path)
    if proc.returncode != 0:
        raise RuntimeError(f"measurement with PYTHONPATH={path} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=200, help="calls per timed round")
    ap.add_argument("--rounds", type=int, default=15, help="timed rounds (median taken)")
    ap.add_argument("--baseline", help="another checkout to compare with (its root folder)")
    ap.add_argument("--pairs", type=int, default=3,
                    help="with --baseline: alternating runs of each side (median per cell)")
    ap.add_argument("--json", help="write the figures to this file")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.calls, args.rounds)))
        return
    if args.baseline is None:
        res = measure(args.calls, args.rounds)
        print("per-call time, median (µs), float64 MLP 10-16-16-4, one thread")
        print(_table(res))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"this": res}, f, indent=1)
        return
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs = {"this": [], "baseline": []}
    for _ in range(args.pairs):
        runs["this"].append(_child(here, args.calls, args.rounds))
        runs["baseline"].append(_child(os.path.abspath(args.baseline), args.calls, args.rounds))
    med = {side: {rep: {op: statistics.median(r[rep][op] for r in rs) for op in OPS}
                  for rep in REPS} for side, rs in runs.items()}
    print(f"per-call time, median (µs): this ({here}) / baseline ({args.baseline}), ratio")
    print(_table(med["this"], med["baseline"]))
    if args.json:
        ratios = {rep: {op: med["this"][rep][op] / med["baseline"][rep][op] for op in OPS}
                  for rep in REPS}
        with open(args.json, "w") as f:
            json.dump({"this": med["this"], "baseline": med["baseline"], "ratio": ratios}, f,
                      indent=1)


if __name__ == "__main__":
    main()
