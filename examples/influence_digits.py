"""Which training digits made the network get these test digits wrong? Influence functions.

An MLP is trained on 1000 of scikit-learn's 8×8 digits (no download), 4 % of them with a wrong
label on purpose. `nngeometry.influence.Influence` with an EKFAC Gauss–Newton (eigenvalues
refitted, damping a tenth of each layer's mean eigenvalue) scores every training digit against
every misclassified test digit, `I(z, q) = ∇ℓ(q)ᵀ (G + Λ)⁻¹ ∇ℓ(z)` with `ℓ(q)` the loss of the
test digit's true label: a positive score means that training on `z` lowers it (helpful), a
negative score that it raises it (harmful). The picture (``influence_digits.png`` in ``--out``,
matplotlib) shows, for misclassified test digits, the most helpful and the most harmful
training digits with their training labels (red: a deliberately wrong label).

It also prints how well EKFAC, diagonal and identity (gradient similarity, TracIn) scores
agree with the exact dense Gauss–Newton's (Spearman rank correlation over all the pairs), and
how many of the wrong labels are among the training digits of highest self-influence
``∇ℓ(z)ᵀ (G + Λ)⁻¹ ∇ℓ(z)`` (a data-cleaning heuristic).

    python examples/influence_digits.py            # about 15 s on two cores
    python examples/influence_digits.py --quick    # a smoke run
"""
import json
import time

import torch
import torch.nn.functional as tF
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nngeometry.influence import Influence
from nngeometry.object import PMatDense, PMatDiag, PMatEKFAC, PMatEye

from _common import digits, parser, pyplot, save


def train(model, x, y, steps, lr=0.2, momentum=0.9):
    """Minibatch SGD with momentum, written out (torch.optim's first use costs seconds of
    imports, longer than this whole training)."""
    g = torch.Generator().manual_seed(0)
    params = list(model.parameters())
    velocity = [torch.zeros_like(p) for p in params]
    for _ in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=g)
        grads = torch.autograd.grad(tF.cross_entropy(model(x[idx]), y[idx]), params)
        with torch.no_grad():
            for p, v, gr in zip(params, velocity, grads):
                v.mul_(momentum).add_(gr)
                p.sub_(lr * v)


def spearman(a, b):
    ra = a.flatten().argsort().argsort().double()
    rb = b.flatten().argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def plot(x_train, y_train, noisy, x_q, y_q, pred_q, scores, path, k=4):
    plt = pyplot()
    if plt is None:
        return
    n_q = len(y_q)
    fig, axes = plt.subplots(n_q, 2 * k + 1, figsize=(1.1 * (2 * k + 1), 1.25 * n_q))
    axes = axes.reshape(n_q, -1)
    for i in range(n_q):
        order = scores[i].argsort(descending=True)
        cells = [("test", x_q[i], f"{int(y_q[i])}→{int(pred_q[i])}", "black")]
        cells += [("helpful", x_train[j], f"{int(y_train[j])}", "red" if noisy[j] else "green")
                  for j in order[:k]]
        cells += [("harmful", x_train[j], f"{int(y_train[j])}", "red" if noisy[j] else "blue")
                  for j in order.flip(0)[:k]]
        for ax, (kind, img, label, color) in zip(axes[i], cells):
            ax.imshow(img.reshape(8, 8), cmap="gray_r")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(label, fontsize=8, color=color)
            if i == 0:
                ax.set_xlabel(kind, fontsize=7)
                ax.xaxis.set_label_position("top")
    fig.suptitle("misclassified test digit (true→predicted) | most helpful | most harmful "
                 "training digits (their labels; red: wrong label)", fontsize=8)
    save(fig, path)


def main(argv=None):
    p = parser(__doc__, "smoke run: fewer digits and steps")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    x, y = digits()
    n_train = 300 if args.quick else 1000
    x_train, y_clean = x[:n_train], y[:n_train]
    x_test, y_test = x[1000:], y[1000:]
    # a few wrong labels, to see where they rank
    g = torch.Generator().manual_seed(1)
    noisy = torch.rand(n_train, generator=g) < 0.04
    y_train = torch.where(noisy, (y_clean + torch.randint(1, 10, (n_train,), generator=g)) % 10,
                          y_clean)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    train(model, x_train, y_train, 200 if args.quick else 1500)
    model.eval()
    with torch.no_grad():
        pred = model(x_test).argmax(1)
    wrong = (pred != y_test).nonzero().flatten()[:3 if args.quick else 6]
    print(f"test accuracy {float((pred == y_test).float().mean()):.3f}; "
          f"{int((pred != y_test).sum())} misclassified, scoring {len(wrong)} of them")
    train_loader = DataLoader(TensorDataset(x_train, y_train), batch_size=250)
    query = (x_test[wrong], y_test[wrong])

    results, scores = {}, {}
    for name, rep in [("EKFAC", PMatEKFAC), ("Diag", PMatDiag), ("identity", PMatEye),
                      ("Dense", PMatDense)]:
        t = time.time()
        inf = Influence(model, rep, damping="heuristic", verbose=True).fit(train_loader)
        scores[name] = inf.pairwise_scores(train_loader, query)
        results[name] = {"seconds": time.time() - t}
        if name == "EKFAC":
            self_scores = inf.self_scores(train_loader)
    for name in ("EKFAC", "Diag", "identity"):
        results[name]["spearman_vs_dense"] = spearman(scores[name], scores["Dense"])
        print(f"{name:9s} scores vs exact dense GGN: Spearman {results[name]['spearman_vs_dense']:.3f}"
              f"  ({results[name]['seconds']:.2f} s)")
    top = self_scores.argsort(descending=True)[:max(1, n_train // 20)]
    found = int(noisy[top].sum())
    print(f"wrong labels among the top 5 % self-influence: {found} of {int(noisy.sum())} "
          f"(at random: {int(noisy.sum()) / 20:.1f})")
    plot(x_train, y_train, noisy, query[0], query[1], pred[wrong], scores["EKFAC"],
         args.out / "influence_digits.png", k=3 if args.quick else 4)
    summary = {"results": results, "wrong_labels": int(noisy.sum()),
               "wrong_labels_in_top_self_influence": found, "seconds": time.time() - t0}
    (args.out / "influence_digits.json").write_text(json.dumps(summary, indent=1))
    print(f"done in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
