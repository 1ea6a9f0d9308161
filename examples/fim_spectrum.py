"""The Fisher spectrum of a trained MLP and CNN: exact against KFAC, EKFAC and matrix-free Lanczos.

Both networks are trained briefly on scikit-learn's 8×8 digits (no download). For each, the
eigenvalues of its Fisher information are computed

* exactly, from the dense matrix (``PMatDense``; the models are small enough);
* from KFAC and EKFAC, through their structure (no ``P × P`` matrix:
  `nngeometry.spectrum.eigenvalues`);
* matrix-free: the top 20 by block Lanczos on ``PMatImplicit`` (products only), and the whole
  density by stochastic Lanczos quadrature (`nngeometry.estimators.spectral_density`);

with the effective dimension ``Σ λ/(λ + α)`` of each. Plots in ``fim_spectrum.png`` (``--out``).

    python examples/fim_spectrum.py            # about 30 s on two cores
    python examples/fim_spectrum.py --quick    # a smoke run
"""
import json
import time

import torch
import torch.nn.functional as tF
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nngeometry import FIM
from nngeometry.estimators import spectral_density
from nngeometry.object import PMatDense, PMatEKFAC, PMatImplicit, PMatKFAC
from nngeometry.spectrum import effective_dimension, eigenvalues

from _common import digits, parser, pyplot, save


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        h = torch.relu(self.conv1(x.view(-1, 1, 8, 8)))
        h = tF.max_pool2d(torch.relu(self.conv2(h)), 2)
        return self.fc(h.flatten(1))


def train(model, x, y, steps):
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=g)
        opt.zero_grad()
        tF.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()


def spectra(model, loader, n_top):
    out = {}
    F = FIM(model, loader, PMatDense, verbose=True)
    out["exact"] = eigenvalues(F)
    out["KFAC"] = eigenvalues(FIM(model, loader, PMatKFAC))
    E = FIM(model, loader, PMatEKFAC)
    E.update_diag(loader)
    out["EKFAC"] = eigenvalues(E)
    implicit = FIM(model, loader, PMatImplicit)
    t = time.time()
    out["Lanczos (implicit)"] = eigenvalues(implicit, k=n_top, max_dense=0, generator=0)
    lanczos_time = time.time() - t
    density = spectral_density(implicit, n_lanczos=40, n_repeats=4, generator=0, verbose=True)
    return out, density, lanczos_time


def plot(results, path):
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for row, (name, (ev, density)) in enumerate(results.items()):
        ax = axes[row, 0]
        for label, e in ev.items():
            e = e.clamp_min(1e-12)
            style = "o" if label.startswith("Lanczos") else "-"
            ax.plot(range(1, len(e) + 1), e.tolist(), style, ms=3, label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylim(1e-8, None)
        ax.set_xlabel("rank")
        ax.set_ylabel("eigenvalue")
        ax.set_title(f"{name}: sorted eigenvalues")
        ax.legend(fontsize=7)
        ax = axes[row, 1]
        exact = ev["exact"]
        ax.hist(exact.tolist(), bins=60, density=True, alpha=0.4, log=True, label="exact (histogram)")
        ax.plot(density.grid.tolist(), density.density.tolist(), label="Lanczos quadrature")
        ax.set_ylim(1e-3, 2 * float(density.density.max()))  # the Gaussian tails say nothing
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density")
        ax.set_title(f"{name}: spectral density")
        ax.legend(fontsize=7)
    save(fig, path)


def main(argv=None):
    args = parser(__doc__, "a smoke run: fewer training steps").parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    x, y = digits()
    x, y = x[:1000], y[:1000]
    loader = DataLoader(TensorDataset(x, y), batch_size=250)
    steps = 30 if args.quick else 400
    alpha = 1e-3
    results, summary = {}, {}
    torch.manual_seed(0)
    for name, model in [("MLP 64-32-10", nn.Sequential(nn.Linear(64, 32), nn.Tanh(),
                                                        nn.Linear(32, 10))),
                        ("CNN conv8-conv8-pool-fc", SmallCNN())]:
        train(model, x, y, steps)
        ev, density, t_lanczos = spectra(model, loader, n_top=20)
        results[name] = (ev, density)
        P = len(ev["exact"])
        print(f"\n{name}: {P} parameters; top 5 eigenvalues and effective dimension (α = {alpha:g})")
        summary[name] = {}
        for label, e in ev.items():
            top = ", ".join(f"{v:.4f}" for v in e[:5].tolist())
            d_eff = effective_dimension(e, alpha).item() if len(e) == P else float("nan")
            summary[name][label] = {"top": e[:5].tolist(), "d_eff": d_eff}
            d = f"{d_eff:8.1f}" if d_eff == d_eff else f"{'(top 20)':>8s}"
            print(f"  {label:20s} {top}   d_eff {d}")
        rel = (ev["Lanczos (implicit)"] - ev["exact"][:20]).abs().max() / ev["exact"][0]
        print(f"  Lanczos top 20 vs exact: max error {rel.item():.1e} (relative to λ_max), "
              f"{t_lanczos:.1f} s, products only")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fim_spectrum.json").write_text(json.dumps(summary, indent=1))
    plot(results, args.out / "fim_spectrum.png")
    print(f"total {time.time() - t0:.1f} s")
    return summary


if __name__ == "__main__":
    main()
