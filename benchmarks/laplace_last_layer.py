"""Last-layer Laplace of a linear classifier head: the fit without backward pass (the GGN from
the head's inputs and the softmax probabilities) against the general per-example path, for the
diagonal and KFAC forms, and the evidence and probit predictive after it.

    PYTHONPATH=. python benchmarks/laplace_last_layer.py       # d=128, C=200, N=2048
    PYTHONPATH=. python benchmarks/laplace_last_layer.py --d 64 --C 50 --n 256  # smoke run

Float32, one thread; each time is the best of ``--repeats``. The general path is reached by
passing ``function=`` (the fast path needs the model's own forward)."""
import argparse
import time

import torch
from torch import nn

from nngeometry.laplace import Laplace
from nngeometry.layercollection import LayerCollection
from nngeometry.object import PMatDiag, PMatKFAC


def best_of(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--C", type=int, default=200)
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, args.d), nn.Tanh(), nn.Linear(args.d, args.C))
    x = torch.randn(args.n, 32)
    y = torch.randint(0, args.C, (args.n,))
    loader = [(x[i:i + args.batch], y[i:i + args.batch]) for i in range(0, args.n, args.batch)]
    lc = LayerCollection.from_model(model).last_layer()
    print(f"head {args.d}+1 -> {args.C} ({lc.numel()} parameters), {args.n} examples, "
          f"batches of {args.batch}, float32, 1 thread")
    print(f"{'form':>6s} {'path':>14s} {'fit s':>8s} {'evidence s':>11s} {'predictive s':>13s}")
    for rep in (PMatDiag, PMatKFAC):
        rows = {}
        for path, kw in (("no backward", {}), ("per-example", {"function": lambda b, *r: model(b)})):
            def fit():
                return Laplace(model, "classification", rep, layer_collection=lc, **kw).fit(loader)
            t_fit, la = best_of(fit, args.repeats)
            t_ev, _ = best_of(lambda: la.log_marginal_likelihood(), args.repeats)
            t_pr, _ = best_of(lambda: la.predictive(x[:4]), args.repeats)
            rows[path] = (t_fit, la)
            print(f"{rep.__name__[4:]:>6s} {path:>14s} {t_fit:8.3f} {t_ev:11.3f} {t_pr:13.3f}")
        fast, slow = rows["no backward"], rows["per-example"]
        diff = (fast[1].ggn.to_torch() - slow[1].ggn.to_torch()).abs().max() if lc.numel() <= 20000 \
            else float("nan")
        print(f"{'':>6s} fit speed-up {slow[0] / fast[0]:.1f}x; max |difference| of the two "
              f"matrices {float(diff):.2e}")


if __name__ == "__main__":
    main()
