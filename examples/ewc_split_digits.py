"""Continual learning on split digits: how much each Fisher representation's EWC penalty keeps.

scikit-learn's bundled 8×8 digits (no download) are split into three tasks, digits 0–3, 4–6 and
7–9, learnt one after the other by one MLP (task-incremental: each task reads its own classes'
logits). After each task the Fisher information of that task is computed in one representation
and added to an online EWC penalty (Schwarz et al. 2018)::

    F ← γ F + F_t,   θ* ← θ_t,   R(θ) = ½ λ (θ − θ*)ᵀ F (θ − θ*)

(`nngeometry.regularization.EWC`). Without a penalty the earlier tasks are forgotten; the table
and the plot show the final test accuracy on every task for no penalty and for the penalty with
a diagonal, KFAC, EKFAC, block-diagonal and dense Fisher.

    python examples/ewc_split_digits.py            # about 20 s on two cores
    python examples/ewc_split_digits.py --quick    # a smoke run (fewer steps)

Writes ``ewc_split_digits.png`` (and ``.json``) to ``--out`` (default: this folder) when
matplotlib is installed (``pip install -e ".[examples]"``).
"""
import json
import time

import torch
import torch.nn.functional as tF
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nngeometry import FIM
from nngeometry.object import PMatBlockDiag, PMatDense, PMatDiag, PMatEKFAC, PMatKFAC
from nngeometry.regularization import EWC

from _common import digits, parser, pyplot, save

TASKS = [(0, 1, 2, 3), (4, 5, 6), (7, 8, 9)]
REPRESENTATIONS = {"none": None, "Diag": PMatDiag, "KFAC": PMatKFAC, "EKFAC": PMatEKFAC,
                   "BlockDiag": PMatBlockDiag, "Dense": PMatDense}


def load_tasks(seed=0):
    x, y = digits(seed)
    n_train = int(0.8 * len(y))
    tasks = []
    for classes in TASKS:
        cls = torch.tensor(classes)
        tr = torch.isin(y[:n_train], cls)
        te = torch.isin(y[n_train:], cls)
        # labels relabelled 0..k-1 inside the task: the task's head reads its classes' logits
        remap = {c: i for i, c in enumerate(classes)}
        relabel = lambda t: torch.tensor([remap[int(v)] for v in t])  # noqa: E731
        tasks.append({"classes": cls,
                      "train": (x[:n_train][tr], relabel(y[:n_train][tr])),
                      "test": (x[n_train:][te], relabel(y[n_train:][te]))})
    return tasks


def task_logits(model, classes):
    return lambda x, *targets: model(x)[:, classes]


def accuracy(model, task):
    x, y = task["test"]
    with torch.no_grad():
        return (model(x)[:, task["classes"]].argmax(1) == y).float().mean().item()


def train(model, task, steps, penalty=None, lr=1e-2, seed=0):
    x, y = task["train"]
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=g)
        loss = tF.cross_entropy(model(x[idx])[:, task["classes"]], y[idx])
        if penalty is not None:
            loss = loss + penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()


def run(representation, tasks, steps, lam, gamma):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.Tanh(), nn.Linear(48, 10))
    ewc = EWC(model, lam=lam, gamma=gamma)
    for t, task in enumerate(tasks):
        train(model, task, steps, penalty=ewc.penalty if ewc.n_tasks else None, seed=t)
        if representation is not None:
            loader = DataLoader(TensorDataset(*task["train"]), batch_size=200)
            F = FIM(model, loader, representation, variant="classif_logits",
                    function=task_logits(model, task["classes"]))
            ewc.register_task(F)
    return [accuracy(model, task) for task in tasks]


def plot(results, path):
    plt = pyplot()
    if plt is None:
        return
    names = list(results)
    width = 0.8 / len(TASKS)
    fig, ax = plt.subplots(figsize=(9.5, 3.8))
    for t, classes in enumerate(TASKS):
        bars = ax.bar([i + (t - 1) * width for i in range(len(names))],
                      [results[n][t] for n in names], width,
                      label=f"task {t + 1}: digits {classes[0]}–{classes[-1]}")
        ax.bar_label(bars, fmt="%.3f", fontsize=6, rotation=90, padding=2)
    ax.set_xticks(range(len(names)), [f"EWC {n}" if n != "none" else "no penalty" for n in names])
    ax.set_ylabel("test accuracy after the last task")
    # the variants differ by a few per cent: an axis from 0 would hide the differences
    lowest = min(min(r) for r in results.values())
    ax.set_ylim(max(0.0, lowest - 0.05), 1.03)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ax.set_title("Online EWC on split digits: what each Fisher representation keeps")
    save(fig, path)


def main(argv=None):
    p = parser(__doc__, "a smoke run: 20 steps per task")
    p.add_argument("--steps", type=int, default=300, help="Adam steps per task")
    p.add_argument("--lam", type=float, default=500.0, help="EWC strength λ")
    p.add_argument("--gamma", type=float, default=1.0, help="online EWC decay γ")
    args = p.parse_args(argv)
    steps = 20 if args.quick else args.steps
    torch.set_num_threads(1)  # tiny matrices: threads cost more than they give
    tasks = load_tasks()
    t0 = time.time()
    results = {}
    print(f"{'penalty':>14s} " + " ".join(f"{'task ' + str(t + 1):>7s}" for t in range(len(TASKS)))
          + f" {'mean':>6s} {'time':>6s}")
    for name, rep in REPRESENTATIONS.items():
        t = time.time()
        results[name] = run(rep, tasks, steps, args.lam, args.gamma)
        accs = results[name]
        label = "no penalty" if rep is None else f"EWC {name}"
        print(f"{label:>14s} " + " ".join(f"{a:7.3f}" for a in accs)
              + f" {sum(accs) / len(accs):6.3f} {time.time() - t:5.1f}s")
    print("(test accuracy on each task after learning all three, in order; λ = "
          f"{args.lam:g}, γ = {args.gamma:g})")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ewc_split_digits.json").write_text(json.dumps(
        {"steps": steps, "lam": args.lam, "gamma": args.gamma, "accuracy": results}, indent=1))
    plot(results, args.out / "ewc_split_digits.png")
    print(f"total {time.time() - t0:.1f} s")
    return results


if __name__ == "__main__":
    main()
