"""Fisher information of a small digit classifier, and an EWC penalty built from it.

Runs in well under a minute on two CPU cores, with no download (scikit-learn's bundled 8×8
digits):

1. train a small MLP on digits 0–4 ("task A");
2. compute its Fisher information matrix F on task A, exactly (PMatDense) and with KFAC
   (PMatKFAC), and look at it: size, trace, top eigenvalues, how well KFAC matches;
3. continue training on digits 5–9 ("task B"), without a penalty and with the elastic weight
   consolidation penalty (λ/2)·(θ − θ_A)ᵀ F (θ − θ_A) (Kirkpatrick et al. 2017), computed with
   ``F.vTMv`` for the dense and for the KFAC F, and compare how much of task A each run forgets.

    python examples/fim_digits.py

With matplotlib installed it also writes ``fim_digits.png`` next to this file (``--out`` to
change the folder): the eigenvalue spectrum of the exact Fisher against KFAC's and EKFAC's.
"""
import time

import torch
import torch.nn.functional as tF
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nngeometry import FIM
from nngeometry.object import PMatDense, PMatEKFAC, PMatKFAC, PVector

from _common import digits, parser, pyplot, save

torch.manual_seed(0)
# a tiny model: one thread avoids the cost of splitting tiny operations over threads (and the
# slow-down when the machine is busy)
torch.set_num_threads(1)


def load_tasks():
    x, y = digits()
    n_train = int(0.8 * len(y))

    def split(mask):
        tr = mask[:n_train]
        te = mask[n_train:]
        return (x[:n_train][tr], y[:n_train][tr]), (x[n_train:][te], y[n_train:][te])

    return split(y < 5), split(y >= 5)


def accuracy(model, data):
    x, y = data
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def train(model, data, steps, lr=1e-2, penalty=None):
    """Adam on mini-batches of 64; ``penalty()`` is added to the loss if given."""
    x, y = data
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for step in range(steps):
        idx = torch.randint(0, len(y), (64,))
        loss = tF.cross_entropy(model(x[idx]), y[idx])
        if penalty is not None:
            loss = loss + penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()


def plot_spectra(spectra, path):
    """Sorted eigenvalues of each matrix, log scale (matplotlib optional)."""
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, ev in spectra.items():
        ev = ev.sort(descending=True).values.clamp_min(1e-12)
        ax.plot(range(1, len(ev) + 1), ev.tolist(), label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(1e-8, None)
    ax.set_xlabel("rank")
    ax.set_ylabel("eigenvalue")
    ax.set_title("Fisher of a digits MLP: exact vs KFAC vs EKFAC")
    ax.legend()
    save(fig, path)


def main(argv=None):
    args = parser(__doc__, "(no effect: the demo is quick)").parse_args(argv)
    t_start = time.time()
    (a_train, a_test), (b_train, b_test) = load_tasks()
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"MLP 64-32-10, {n_params} parameters; task A: {len(a_train[1])} training images of "
          f"digits 0-4, task B: {len(b_train[1])} of digits 5-9")

    t = time.time()
    train(model, a_train, steps=300)
    print(f"trained on task A in {time.time() - t:.1f} s: test accuracy A {accuracy(model, a_test):.3f}")

    # ---------------------------------------------------------------- the Fisher on task A
    loader = DataLoader(TensorDataset(*a_train), batch_size=100)
    t = time.time()
    F = FIM(model, loader, PMatDense, variant="classif_logits", verbose=True)
    t_dense = time.time() - t
    evals = torch.linalg.eigvalsh(F.to_torch())  # ascending
    top = evals.flip(0)[:5]
    print(f"\nFisher information matrix (PMatDense): size {F.size()}, computed in {t_dense:.2f} s")
    print(f"  trace {F.trace().item():.4f}; top eigenvalues " +
          ", ".join(f"{e:.4f}" for e in top.tolist()))
    print(f"  the top 20 eigenvalues hold {(evals[-20:].sum() / evals.sum()).item():.1%} of the "
          f"trace: the Fisher is strongly concentrated on a few directions")

    t = time.time()
    F_kfac = FIM(model, loader, PMatKFAC, variant="classif_logits")
    t_kfac = time.time() - t
    dense, approx = F.to_torch(), F_kfac.to_torch()
    rel = (torch.linalg.norm(approx - dense) / torch.linalg.norm(dense)).item()
    print(f"\nKFAC approximation (PMatKFAC, {t_kfac:.2f} s): relative Frobenius error {rel:.3f}, "
          f"trace {F_kfac.trace().item():.4f}")
    F_ekfac = FIM(model, loader, PMatEKFAC, variant="classif_logits")
    F_ekfac.update_diag(loader)  # refit the eigenvalues in KFAC's eigenbasis
    rel_e = (torch.linalg.norm(F_ekfac.to_torch() - dense) / torch.linalg.norm(dense)).item()
    print(f"EKFAC (KFAC's eigenbasis, refitted eigenvalues): relative Frobenius error {rel_e:.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    plot_spectra({"exact (PMatDense)": evals, "KFAC": torch.linalg.eigvalsh(approx),
                  "EKFAC": torch.linalg.eigvalsh(F_ekfac.to_torch())}, args.out / "fim_digits.png")

    # ---------------------------------------------------------------- EWC on task B
    theta_a = PVector.from_model(model).clone().detach()
    acc_a_before = accuracy(model, a_test)
    lam = 1000.0
    state = {k: v.clone() for k, v in model.state_dict().items()}
    print(f"\ncontinuing on task B for 200 steps (EWC strength λ = {lam:g}):")
    results = {}
    for name, fisher in [("no penalty", None), ("EWC, dense F", F), ("EWC, KFAC F", F_kfac)]:
        model.load_state_dict(state)
        penalty = None
        if fisher is not None:
            def penalty(fisher=fisher):
                # (λ/2) (θ − θ_A)ᵀ F (θ − θ_A): vTMv is differentiable in v
                return 0.5 * lam * fisher.vTMv(PVector.from_model(model) - theta_a)
        t = time.time()
        train(model, b_train, steps=200, penalty=penalty)
        with torch.no_grad():
            ewc = 0.5 * lam * F.vTMv(PVector.from_model(model) - theta_a)
        results[name] = (accuracy(model, a_test), accuracy(model, b_test), ewc.item(), time.time() - t)
    # the last column measures every run's distance from θ_A with the same (dense) F
    print(f"  {'':14s} {'acc A':>7s} {'acc B':>7s} {'(λ/2)dᵀFd':>12s} {'time':>7s}")
    print(f"  {'after task A':14s} {acc_a_before:7.3f} {'-':>7s} {0.0:12.3f} {'':>7s}")
    for name, (acc_a, acc_b, ewc, dt) in results.items():
        print(f"  {name:14s} {acc_a:7.3f} {acc_b:7.3f} {ewc:12.3f} {dt:6.1f}s")
    print("  (d = θ − θ_A; without a penalty task A is forgotten, the Fisher-weighted penalty keeps "
          "much of it"
          "\n   while task B is learnt almost as well)")
    print(f"\ntotal time {time.time() - t_start:.1f} s")


if __name__ == "__main__":
    main()
