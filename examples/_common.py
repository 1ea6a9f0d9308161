"""What the digit examples share: the data (scikit-learn's bundled 8×8 digits, no download),
matplotlib when it is installed, and their command-line conventions."""
import argparse
import hashlib
import sys
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


def source_digest(example):
    """sha256 of what draws ``example``'s picture: its script and this module."""
    h = hashlib.sha256()
    for name in (f"{example}.py", "_common.py"):
        h.update((HERE / name).read_bytes())
    return h.hexdigest()


def save(fig, path):
    """Write the figure as a PNG stamped with what made it (the example, the digest of its code,
    its command-line arguments), so that a picture in the docs can be checked against the code
    (tests/docs/test_docs_images.py). The picture of ``examples/NAME.py`` is ``NAME.png``."""
    path = Path(path)
    args, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
        elif a == "--out":
            skip = True
        elif not a.startswith("--out="):
            args.append(a)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={
        "Software": "nngeometry examples",
        "nngeometry-example": path.stem,
        "nngeometry-source-sha256": source_digest(path.stem),
        "nngeometry-arguments": " ".join(args)})
    fig.clf()
    print(f"plot: {path}")


def parser(doc, quick_help):
    """The examples' arguments: ``--quick`` (a smoke run) and ``--out`` (where the PNG and JSON
    go; default this folder)."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--out", type=Path, default=HERE)
    return p
