"""Data-parallel build time: KFAC (closed-form Fisher and Monte-Carlo) on W2 (the CNN of
benchmarks/run.py, N = 512, batches of 64, float32) in one process vs two processes
(torch.distributed, gloo, one thread each), every process on its half of the batches.

    python benchmarks/distributed.py [--repeats 5] [--n 512] [--json distributed.json]

Rows: one process with one thread, one process with two threads, two processes with one
thread each (the time of a build is the slowest rank's, between two barriers, so it includes
the reduction of the factors). Median of ``--repeats`` builds after a warm-up build (which also
times the backward strategies, once per process), in wall-clock time and in CPU time of the
slowest process (all its threads: on free cores that is its wall time, and it is not inflated
by other work on a shared machine). The target:
two processes ≤ 0.65 × one process with one thread, on a machine with 2 free cores.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

VARIANTS = ("FIM", "MC")


def _setup(n, rank=0, world=1):
    from torch.utils.data import DataLoader

    from run import WORKLOADS, make_setup

    model, loader = make_setup(WORKLOADS["W2"], n)
    batches = list(loader.sampler)[rank::world]  # the batches dealt in turn
    return model, DataLoader(loader.dataset, sampler=batches, batch_size=None)


def _build(model, loader, variant):
    from nngeometry import FIM, FIM_MonteCarlo
    from nngeometry.object import PMatKFAC

    if variant == "FIM":
        return FIM(model, loader, PMatKFAC)
    return FIM_MonteCarlo(model, loader, PMatKFAC, trials=1, seed=0)


def _time_builds(model, loader, variant, repeats, barrier=None):
    """``(wall times, CPU times, last matrix)``: the CPU time of the process (all its threads,
    gloo's included) is what the build costs on free cores, whatever else runs on the machine."""
    _build(model, loader, variant)  # warm-up: backward strategy, parameter-use check
    times, cpu = [], []
    for _ in range(repeats):
        if barrier:
            barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        M = _build(model, loader, variant)
        c1 = time.process_time()
        if barrier:
            barrier()
        times.append(time.perf_counter() - t0)
        cpu.append(c1 - c0)
    return times, cpu, M


def _worker(rank, world, init, n, repeats, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model, loader = _setup(n, rank, world)
        res = {}
        for variant in VARIANTS:
            times, cpu, M = _time_builds(model, loader, variant, repeats, dist.barrier)
            res[variant] = {"times": times, "cpu": cpu, "trace": float(M.trace())}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(res, f)
    finally:
        dist.destroy_process_group()


def one_process(n, repeats, threads):
    torch.set_num_threads(threads)
    model, loader = _setup(n)
    out = {}
    for variant in VARIANTS:
        times, cpu, M = _time_builds(model, loader, variant, repeats)
        out[variant] = {"times": times, "cpu": cpu, "trace": float(M.trace())}
    return out


def processes(n, repeats, world):
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{os.path.join(tmp, 'init')}"
        mp.spawn(_worker, args=(world, init, n, repeats, tmp), nprocs=world, join=True)
        ranks = []
        for r in range(world):
            with open(os.path.join(tmp, f"rank{r}.json")) as f:
                ranks.append(json.load(f))
    # a build takes as long as its slowest rank (the barriers make the ranks' times equal
    # up to the barrier's own latency)
    out = {}
    for variant in VARIANTS:
        per_build = [max(r[variant]["times"][i] for r in ranks) for i in range(repeats)]
        cpu = [max(r[variant]["cpu"][i] for r in ranks) for i in range(repeats)]
        out[variant] = {"times": per_build, "cpu": cpu, "trace": ranks[0][variant]["trace"],
                        "traces_agree": all(abs(r[variant]["trace"] - ranks[0][variant]["trace"])
                                            <= 1e-5 * abs(ranks[0][variant]["trace"])
                                            for r in ranks)}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--json", default=None, help="write the figures to this file")
    args = ap.parse_args(argv)

    rows = {
        "1 process, 1 thread": one_process(args.n, args.repeats, 1),
        "1 process, 2 threads": one_process(args.n, args.repeats, 2),
        "2 processes, 1 thread each": processes(args.n, args.repeats, 2),
    }
    one = rows["1 process, 1 thread"]
    base = {v: statistics.median(one[v]["times"]) for v in VARIANTS}
    base_cpu = {v: statistics.median(one[v]["cpu"]) for v in VARIANTS}
    print(f"KFAC build on W2 (N={args.n}, batches of 64, float32), median of {args.repeats}; "
          "ratio to 1 process with 1 thread (target for 2 processes: ≤ 0.65). wall: "
          "wall-clock time; cpu: the slowest process's CPU time (the wall time on free cores)")
    print(f"{'':30s}" + "".join(f"{v + ' wall':>10s}{'ratio':>7s}{v + ' cpu':>10s}{'ratio':>7s}"
                                for v in VARIANTS))
    table = {}
    for name, res in rows.items():
        line = f"{name:30s}"
        table[name] = {}
        for v in VARIANTS:
            med, cpu = statistics.median(res[v]["times"]), statistics.median(res[v]["cpu"])
            table[name][v] = {"median_s": med, "ratio": med / base[v], "times_s": res[v]["times"],
                              "cpu_median_s": cpu, "cpu_ratio": cpu / base_cpu[v],
                              "cpu_s": res[v]["cpu"], "trace": res[v]["trace"]}
            line += f"{med:10.3f}{med / base[v]:7.2f}{cpu:10.3f}{cpu / base_cpu[v]:7.2f}"
        print(line)
    two = table["2 processes, 1 thread each"]
    for v in VARIANTS:
        # the data-parallel matrix is the one-process matrix (float32 round-off)
        ref = table["1 process, 1 thread"][v]["trace"]
        ok = abs(two[v]["trace"] - ref) <= 1e-4 * abs(ref)
        print(f"{v}: 2-process trace {two[v]['trace']:.6g} vs 1-process {ref:.6g} "
              f"({'same' if ok else 'DIFFERENT'}); target ≤ 0.65: wall "
              f"{'met' if two[v]['ratio'] <= 0.65 else 'not met'} ({two[v]['ratio']:.2f}), "
              f"cpu {'met' if two[v]['cpu_ratio'] <= 0.65 else 'not met'} "
              f"({two[v]['cpu_ratio']:.2f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"n": args.n, "repeats": args.repeats, "cpus": os.cpu_count(),
                       "torch": torch.__version__, "rows": table}, f, indent=1)
    return table


if __name__ == "__main__":
    main()
