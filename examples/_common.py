"""What the digit examples share: the data (scikit-learn's bundled 8×8 digits, no download),
matplotlib when it is installed, and their command-line conventions."""
import argparse
from pathlib import Path

import torch
from sklearn.datasets import load_digits

HERE = Path(__file__).resolve().parent


def digits(seed=0):
    """``(x, y)``: the 1797 digits as float32 pixels in [0, 1] (shape ``(1797, 64)``) and their
    labels, in a fixed random order."""
    data = load_digits()
    g = torch.Generator().manual_seed(seed)
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=g)
    return x[perm], y[perm]


def pyplot():
    """``matplotlib.pyplot`` with a non-interactive backend, or None (with a message) when
    matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no plot; pip install -e \".[examples]\")")
        return None
    return plt


def save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    fig.clf()
    print(f"plot: {path}")


def parser(doc, quick_help):
    """The examples' arguments: ``--quick`` (a smoke run) and ``--out`` (where the PNG and JSON
    go; default this folder)."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--out", type=Path, default=HERE)
    return p
