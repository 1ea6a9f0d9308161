#!/usr/bin/env python
"""Ours against the peers, in one run: nngeometry (this checkout), upstream nngeometry, curvlinops
and BackPACK on the same workloads, rows interleaved, each figure as a multiple of its own
process's floor (one forward + backward of the mean cross-entropy over the same batches).

Usage::

    python benchmarks/peers.py                                  # W1, W2; every library found
    python benchmarks/peers.py --workloads W1 --repeats 5 --json peers.json
    python benchmarks/peers.py --upstream-python /path/to/venv/bin/python \\
                               --peer-python /path/to/other/venv/bin/python
    python benchmarks/peers.py --quick --json peers.json          # small sizes: a smoke run

The whole interleaved pass over the rows is made ``--runs`` times (default 3), each figure in
its own fresh process: every cell shows the median of the runs and their range
(``1.52x [1.48-1.61]``: median multiple of the floor, then the smallest and largest), and the
JSON holds every run's figures with the min / median / max of the time and of the multiple.

Every figure is measured in a fresh subprocess (``--worker``) that builds the workload (same
seeds as ``benchmarks/run.py``: it imports its workloads, clock and memory probe), measures the
floor, then the row: so imports, caches and allocator state of one library never touch another's
figure, and the libraries alternate row by row so that a slow phase of the machine hits all of
them. The Python that runs each library:

* ours: this interpreter, with this checkout first on ``PYTHONPATH``;
* upstream nngeometry: ``--upstream-python`` (a virtual environment where ``pip install
  nngeometry`` installed the release; it must not see this checkout);
* curvlinops and BackPACK: ``--peer-python`` (default: this interpreter, if it imports them).
  ``pip install -e ".[bench]"`` installs them here; BackPACK needs torchvision, which must match
  the installed torch, so a separate environment is often simpler.

A library or row that is missing or raises is reported as ``n/a (reason)``. Rows (closed form =
the exact Fisher/GGN of the cross-entropy, "type-2"; MC = one sampled target per example):

============================  ==========================  ===================  =================
row                           nngeometry (ours/upstream)  curvlinops 3         BackPACK 1.7
============================  ==========================  ===================  =================
KFAC build, closed form       FIM(PMatKFAC)               KFAC type-2          KFLR
KFAC build, MC                FIM_MonteCarlo(PMatKFAC)    KFAC mc              KFAC(mc_samples=1)
EKFAC build + diag refit      FIM(PMatEKFAC)+update_diag  EKFAC type-2         -
Diag build, closed form       FIM(PMatDiag)               -                    DiagGGNExact
Diag build, MC                FIM_MonteCarlo(PMatDiag)    -                    DiagGGNMC
KFAC mv                       PMatKFAC.mv                 KFAC @ v             -
GGN mv (matrix-free)          PMatImplicit.mv             GGNLinearOperator@v  -
============================  ==========================  ===================  =================

The KFAC rows compute the same matrix in every library: the joint ``[W | b]`` factors of
nngeometry and upstream (``785 × 785`` input factor on W1's first layer, with the weight-bias
cross terms), which curvlinops computes with ``separate_weight_and_bias=False`` (its default,
``True``, factors weight and bias separately: a ``784 × 784`` input factor and no cross terms,
a different and slightly cheaper matrix). Each product is bound by the same two matrix products
per layer.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LIBS = ("ours", "upstream", "curvlinops", "backpack")
ROWS = {
    "kfac_fim": "KFAC build, closed form",
    "kfac_mc": "KFAC build, MC",
    "ekfac_fim": "EKFAC build + diag refit",
    "diag_fim": "Diag build, closed form",
    "diag_mc": "Diag build, MC",
    "kfac_mv": "KFAC mv",
    "ggn_mv": "GGN mv (matrix-free)",
}


# ====================================================================== worker side
def _nngeometry_row(row, model, loader):
    import nngeometry
    import nngeometry.object as obj
    FIM = getattr(nngeometry, "FIM", None) or nngeometry.metrics.FIM
    MC = getattr(nngeometry, "FIM_MonteCarlo", None) or nngeometry.metrics.FIM_MonteCarlo

    def fim(cls):
        return FIM(model=model, loader=loader, representation=cls, variant="classif_logits")

    def mc(cls):
        return MC(model=model, loader=loader, representation=cls, variant="classif_logits",
                  trials=1)

    if row == "kfac_fim":
        return lambda: fim(obj.PMatKFAC)
    if row == "kfac_mc":
        return lambda: mc(obj.PMatKFAC)
    if row == "ekfac_fim":
        def run():
            M = fim(obj.PMatEKFAC)
            M.update_diag(loader)
            return M
        return run
    if row == "diag_fim":
        return lambda: fim(obj.PMatDiag)
    if row == "diag_mc":
        return lambda: mc(obj.PMatDiag)
    if row in ("kfac_mv", "ggn_mv"):
        from nngeometry.object.vector import random_pvector
        M = fim(obj.PMatKFAC if row == "kfac_mv" else obj.PMatImplicit)
        # upstream 0.4's matrices keep their collection on the generator
        lc = getattr(M, "layer_collection", None) or M.generator.layer_collection
        import torch
        try:
            v = random_pvector(lc, dtype=torch.float32)
        except TypeError:  # (upstream 0.4 has the keyword; older releases make float32)
            v = random_pvector(lc)
        return lambda: M.mv(v)
    raise KeyError(row)


def _curvlinops_row(row, model, loader):
    import torch
    from curvlinops import EKFACLinearOperator, GGNLinearOperator, KFACLinearOperator
    params = [p for p in model.parameters() if p.requires_grad]
    loss = torch.nn.CrossEntropyLoss()
    data = list(loader)
    common = dict(check_deterministic=False)

    def kfac(fisher_type, cls=KFACLinearOperator):
        op = cls(model, loss, params, data, fisher_type=fisher_type, mc_samples=1,
                 separate_weight_and_bias=False, **common)
        op.compute_kronecker_factors()
        return op

    if row == "kfac_fim":
        return lambda: kfac("type-2")
    if row == "kfac_mc":
        return lambda: kfac("mc")
    if row == "ekfac_fim":
        def run():
            op = kfac("type-2", EKFACLinearOperator)
            op.compute_eigenvalue_correction()
            return op
        return run
    if row == "kfac_mv":
        op = kfac("type-2")
        v = torch.randn(sum(p.numel() for p in params))
        return lambda: op @ v
    if row == "ggn_mv":
        op = GGNLinearOperator(model, loss, params, data, **common)
        v = torch.randn(sum(p.numel() for p in params))
        return lambda: op @ v
    raise NotImplementedError("no equivalent in curvlinops")


def _backpack_model(model):
    """BackPACK needs modules for every operation: the W2 CNN's functional pooling and flatten
    become modules, with the same parameters (same arithmetic)."""
    import torch.nn as nn
    if isinstance(model, nn.Sequential):
        return model
    if hasattr(model, "conv1") and hasattr(model, "fc"):
        seq = nn.Sequential(model.conv1, nn.ReLU(), nn.MaxPool2d(2), model.conv2, nn.ReLU(),
                            nn.MaxPool2d(2), nn.Flatten(), model.fc)
        return seq
    raise NotImplementedError("BackPACK: this model has operations BackPACK can't extend")


def _backpack_row(row, model, loader):
    import torch
    from backpack import backpack, extend
    from backpack.extensions import KFAC, KFLR, DiagGGNExact, DiagGGNMC
    model = extend(_backpack_model(model))
    lossfunc = extend(torch.nn.CrossEntropyLoss())
    ext = {"kfac_fim": KFLR, "kfac_mc": lambda: KFAC(mc_samples=1), "diag_fim": DiagGGNExact,
           "diag_mc": DiagGGNMC}.get(row)
    if ext is None:
        raise NotImplementedError("no equivalent in BackPACK")

    def run():
        # BackPACK's statistics are per mini-batch: one backward per batch, each with the
        # extension (the accumulation over batches is left to the user; not counted)
        for x, y in loader:
            model.zero_grad()
            with backpack(ext()):
                lossfunc(model(x), y).backward()
    return run


def worker(lib, wname, row, repeats, n):
    sys.path.insert(0, str(HERE))
    import torch
    import run as R
    torch.set_num_threads(1)
    w = R.WORKLOADS[wname]
    model, loader = R.make_setup(w, n or w.n)
    out = {"lib": lib, "workload": wname, "row": row}
    try:
        floor_t, _, _ = R.timeit(R.floor_fn(model, loader), repeats)
        _, floor_peak, _ = R.peak_memory(R.floor_fn(model, loader))
        out.update(floor=floor_t, floor_peak=floor_peak)
        make = {"ours": _nngeometry_row, "upstream": _nngeometry_row,
                "curvlinops": _curvlinops_row, "backpack": _backpack_row}[lib]
        fn = R._quiet_warnings(lambda: make(row, model, loader))
        t, _, _ = R.timeit(lambda: R._quiet_warnings(fn), repeats)
        _, peak, _ = R.peak_memory(lambda: R._quiet_warnings(fn))
        out.update(time=t, x_floor=t / floor_t, peak=peak)
    except Exception as e:  # noqa: BLE001 - every failure becomes an n/a cell
        out["error"] = R.reason_of(e)
    print("PEERS_JSON " + json.dumps(out))


# ====================================================================== orchestrator
def _python_for(lib, args):
    if lib == "ours":
        return sys.executable
    if lib == "upstream":
        return args.upstream_python
    return args.peer_python or sys.executable


def _env_for(lib):
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if lib == "ours":
        env["PYTHONPATH"] = str(ROOT)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = "1"
    return env


def measure(lib, wname, row, args):
    python = _python_for(lib, args)
    if not python or not shutil.which(python) and not Path(python).exists():
        return {"lib": lib, "workload": wname, "row": row,
                "error": "not installed (see --upstream-python / --peer-python)"}
    cmd = [python, str(Path(__file__).resolve()), "--worker", lib, wname, row,
           "--repeats", str(args.repeats)]
    if args.n:
        cmd += ["--n", str(args.n)]
    # upstream runs from a neutral folder so that this checkout is never imported by accident
    cwd = "/" if lib == "upstream" else str(ROOT)
    try:
        proc = subprocess.run(cmd, env=_env_for(lib), cwd=cwd, capture_output=True, text=True,
                              timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"lib": lib, "workload": wname, "row": row, "error": f"over {args.timeout} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("PEERS_JSON "):
            return json.loads(line[len("PEERS_JSON "):])
    err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    if "ModuleNotFoundError" in proc.stderr:
        err = "not installed: " + err
    return {"lib": lib, "workload": wname, "row": row, "error": err[:160]}


def summarize(runs):
    """One cell from the worker results of its runs: the runs themselves, and for the time,
    the multiple of the floor and the peak the ``min`` / ``median`` / ``max`` over the runs
    that succeeded (an error only when none did: the last one)."""
    ok = [r for r in runs if "error" not in r]
    cell = {k: runs[-1][k] for k in ("lib", "workload", "row")}
    cell["runs"] = runs
    if not ok:
        cell["error"] = runs[-1]["error"]
        return cell
    for key in ("time", "x_floor", "peak", "floor"):
        vals = [r[key] for r in ok]
        cell[key] = {"min": min(vals), "median": statistics.median(vals), "max": max(vals)}
    cell["n_runs"] = len(ok)
    return cell


def _cell(c):
    if c is None:
        return "-"
    if "error" in c:
        return "n/a (" + c["error"][:40] + ")"
    t, x = c["time"], c["x_floor"]
    return (f"{t['median'] * 1e3:8.1f} ms {x['median']:5.2f}x "
            f"[{x['min']:.2f}-{x['max']:.2f}] {c['peak']['median'] / 2**20:6.1f} MiB")


def print_table(cells, libs, workloads, rows=tuple(ROWS)):
    width = 42
    for wname in workloads:
        print(f"\n{wname}: median time, median x floor (its own process's) [min-max over the "
              "runs], median peak tensor memory")
        print(f"{'row':26s} " + " ".join(f"{lib:>{width}s}" for lib in libs) + "  fastest")
        for row in rows:
            cs = [cells.get((wname, row, lib)) for lib in libs]
            ok = [(c["x_floor"]["median"], c["lib"]) for c in cs if c and "x_floor" in c]
            fastest = min(ok)[1] if ok else "-"
            print(f"{ROWS[row]:26s} " + " ".join(f"{_cell(c):>{width}s}" for c in cs)
                  + f"  {fastest}")


def main(argv=None):
    p = argparse.ArgumentParser(description="nngeometry against its peers (see the docstring)")
    p.add_argument("--worker", nargs=3, metavar=("LIB", "WORKLOAD", "ROW"), help=argparse.SUPPRESS)
    p.add_argument("--workloads", default="W1,W2")
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--libs", default=",".join(LIBS))
    p.add_argument("--repeats", type=int, default=3,
                   help="timed samples per figure within its process (their median)")
    p.add_argument("--runs", type=int, default=3,
                   help="interleaved passes over the rows, each figure in a fresh process")
    p.add_argument("--n", type=int, default=None, help="examples (default: run.py's)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 64 examples, one sample per figure (the spread is then "
                        "over the runs only)")
    p.add_argument("--upstream-python", default=None,
                   help="the Python of an environment with upstream nngeometry installed")
    p.add_argument("--peer-python", default=None,
                   help="the Python of an environment with curvlinops and BackPACK")
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.worker:
        lib, wname, row = args.worker
        return worker(lib, wname, row, args.repeats, args.n)
    if args.quick:
        args.n = args.n or 64
        args.repeats = 1
    workloads = args.workloads.split(",")
    rows = args.rows.split(",")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}: choose among {','.join(ROWS)}")
    libs = args.libs.split(",")
    results = {}
    for run in range(args.runs):
        for wname in workloads:
            for i, row in enumerate(rows):
                # rotate the order of the libraries from row to row and from run to run
                j = (i + run) % len(libs)
                for lib in libs[j:] + libs[:j]:
                    r = measure(lib, wname, row, args)
                    results.setdefault((wname, row, lib), []).append(r)
                    status = r.get("error") or f"{r['x_floor']:.2f}x floor"
                    print(f"  run {run + 1}/{args.runs} {wname} {row:10s} {lib:10s} {status}",
                          file=sys.stderr)
    cells = {key: summarize(runs) for key, runs in results.items()}
    print_table(cells, libs, workloads, rows)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"runs": args.runs, "repeats": args.repeats, "n": args.n,
             "cells": list(cells.values())}, indent=1))


if __name__ == "__main__":
    main()
