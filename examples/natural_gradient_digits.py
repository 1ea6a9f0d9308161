"""Natural gradient (KFAC and EKFAC preconditioning) against SGD and Adam on scikit-learn's digits.

A small MLP is trained for the same number of steps on the same mini-batches by

* SGD and Adam, each at the best learning rate of a small grid (best final training loss);
* SGD preconditioned by `nngeometry.optim.NaturalGradient` with a KFAC and an EKFAC Fisher
  (Monte-Carlo Fisher refreshed every 5 steps, running average, exact damping), learning rate
  tuned on the same kind of grid.

It prints the final training loss and test accuracy of each, and plots the training-loss and
test-accuracy curves to ``natural_gradient_digits.png`` (matplotlib) in ``--out``.

    python examples/natural_gradient_digits.py            # about 30 s on two cores
    python examples/natural_gradient_digits.py --quick    # a smoke run
"""
import json
import time

import torch
import torch.nn.functional as tF
from torch import nn

from nngeometry.object import PMatEKFAC, PMatKFAC
from nngeometry.optim import NaturalGradient

from _common import digits, parser, pyplot, save

GRIDS = {"SGD": [0.1, 0.3, 1.0, 3.0], "Adam": [3e-3, 1e-2, 3e-2, 1e-1],
         "NG-KFAC": [0.01, 0.03, 0.1, 0.3], "NG-EKFAC": [0.01, 0.03, 0.1, 0.3]}


def load(seed=0):
    x, y = digits(seed)
    n = int(0.8 * len(y))
    return (x[:n], y[:n]), (x[n:], y[n:])


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                         nn.Linear(64, 10))


def evaluate(model, train, test):
    with torch.no_grad():
        loss = tF.cross_entropy(model(train[0]), train[1]).item()
        acc = (model(test[0]).argmax(1) == test[1]).float().mean().item()
    return loss, acc


def run(method, lr, train, test, steps, batch_size=64, every=10):
    model = make_model()
    if method == "Adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr)
    pre = None
    if method.startswith("NG"):
        rep = PMatKFAC if method == "NG-KFAC" else PMatEKFAC
        pre = NaturalGradient(model, rep, curvature="mc", damping=1e-2, update_freq=5,
                              inv_freq=5, ema_decay=0.9, kl_clip=1e-2, optimizer=opt)
    g = torch.Generator().manual_seed(1)  # the same mini-batches for every method
    curve = [(0, *evaluate(model, train, test))]
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(train[1]), (batch_size,), generator=g)
        x, y = train[0][idx], train[1][idx]
        opt.zero_grad()
        tF.cross_entropy(model(x), y).backward()
        if pre is not None:
            pre.step((x, y))
        opt.step()
        if step % every == 0 or step == steps:
            curve.append((step, *evaluate(model, train, test)))
    return curve


def plot(best, path):
    plt = pyplot()
    if plt is None:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    for name, (lr, curve) in best.items():
        steps = [c[0] for c in curve]
        ax1.plot(steps, [c[1] for c in curve], label=f"{name} (lr {lr:g})")
        ax2.plot(steps, [c[2] for c in curve], label=name)
    ax1.set_yscale("log")
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss")
    ax1.legend(fontsize=8)
    ax2.set_xlabel("step")
    ax2.set_ylabel("test accuracy")
    lowest = min(c[2] for _, curve in best.values() for c in curve)
    ax2.set_ylim(max(0.0, lowest - 0.02), 1.0)
    fig.suptitle("Digits MLP: natural gradient (KFAC, EKFAC) vs SGD and Adam, tuned learning rates")
    save(fig, path)


def main(argv=None):
    p = parser(__doc__, "smoke run: 20 steps, one lr each")
    p.add_argument("--steps", type=int, default=300)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    steps = 20 if args.quick else args.steps
    train, test = load()
    t0 = time.time()
    best = {}
    print(f"{'method':>9s} {'lr':>7s} {'final train loss':>17s} {'test acc':>9s} {'time':>6s}")
    for method, grid in GRIDS.items():
        grid = grid[1:2] if args.quick else grid
        results = []
        for lr in grid:
            t = time.time()
            curve = run(method, lr, train, test, steps)
            results.append((curve[-1][1], lr, curve, time.time() - t))
        loss, lr, curve, dt = min(results, key=lambda r: r[0] if r[0] == r[0] else float("inf"))
        best[method] = (lr, curve)
        print(f"{method:>9s} {lr:7g} {loss:17.4f} {curve[-1][2]:9.3f} {dt:5.1f}s")
    print(f"(each at the best learning rate of its grid after {steps} steps of 64 examples)")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "natural_gradient_digits.json").write_text(json.dumps(
        {m: {"lr": lr, "curve": c} for m, (lr, c) in best.items()}, indent=1))
    plot(best, args.out / "natural_gradient_digits.png")
    print(f"total {time.time() - t0:.1f} s")
    return best


if __name__ == "__main__":
    main()
