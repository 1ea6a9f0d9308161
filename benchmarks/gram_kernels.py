"""Kernels for the reduction over locations of a convolution's KFAC output factor.

``G = Σ_b g_b g_bᵀ`` for ``g`` of shape ``(B, C, L)`` (``B`` = directions × examples, ``C`` output
channels, ``L`` output locations) can be computed by

* ``addbmm``: ``G.addbmm_(g, g.transpose(1, 2))`` (no intermediate);
* ``bmm_sum``: ``torch.bmm(g, g.transpose(1, 2)).sum(0)`` (a ``(B, C, C)`` intermediate);
* ``einsum``: ``torch.einsum('bcl,bdl->cd', g, g)``;
* ``gemm``: one GEMM on a channels-first copy, ``h @ hᵀ`` with ``h = g.transpose(0, 1)``
  reshaped to ``(C, B L)`` (a copy of ``g``).

Each is timed (median of ``--repeats`` after a warm-up) on one thread (``--threads``) for shapes
of small CNNs, the benchmark CNN (W2) and ResNet-like layers; the table gives each time and the
fastest, ``--json`` writes the figures.

    python benchmarks/gram_kernels.py [--threads 1] [--repeats 5] [--json kernels.json] [--quick]
"""
import argparse
import json
import statistics
import time

import torch

#: (B, C, L): directions × examples, channels, locations
SHAPES = [
    (9 * 64, 8, 196), (9 * 64, 16, 36),      # small CNN (3×16×16, conv8-pool-conv16), K = 9
    (9 * 64, 16, 1024), (9 * 64, 32, 256),   # W2 closed form, K = 9
    (64, 16, 1024), (64, 32, 256),           # W2 Monte-Carlo, one trial
    (32, 64, 3136), (32, 128, 784), (32, 256, 196), (32, 512, 49),  # ResNet-like stages
    (128, 8, 16), (128, 4, 4096),            # few locations / few channels
]


def kernels():
    def addbmm(g):
        C = g.shape[1]
        return g.new_zeros(C, C).addbmm_(g, g.transpose(1, 2))

    def bmm_sum(g):
        return torch.bmm(g, g.transpose(1, 2)).sum(0)

    def einsum(g):
        return torch.einsum("bcl,bdl->cd", g, g)

    def gemm(g):
        h = g.transpose(0, 1).reshape(g.shape[1], -1)
        return h @ h.t()
    return {"addbmm": addbmm, "bmm_sum": bmm_sum, "einsum": einsum, "gemm": gemm}


def time_it(fn, g, repeats):
    fn(g)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(g)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true", help="three small shapes, one repeat")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shapes = [(128, 8, 16), (64, 4, 64), (32, 16, 36)] if args.quick else SHAPES
    repeats = 1 if args.quick else args.repeats
    ks = kernels()
    rows = []
    print(f"threads={args.threads}, float32, median of {repeats} (ms)")
    print(f"{'B':>6} {'C':>5} {'L':>6} " + " ".join(f"{k:>9}" for k in ks) + "  fastest")
    for B, C, L in shapes:
        g = torch.randn(B, C, L)
        ref = ks["addbmm"](g.double())
        times = {}
        for name, fn in ks.items():
            torch.testing.assert_close(fn(g).double(), ref, rtol=1e-4, atol=1e-3 * ref.abs().max().item())
            times[name] = time_it(fn, g, repeats)
        best = min(times, key=times.get)
        rows.append({"B": B, "C": C, "L": L, "ms": {k: v * 1e3 for k, v in times.items()},
                     "fastest": best})
        print(f"{B:>6} {C:>5} {L:>6} " + " ".join(f"{times[k] * 1e3:>9.3f}" for k in ks)
              + f"  {best}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "repeats": repeats, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
