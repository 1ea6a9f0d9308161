#!/usr/bin/env python
"""The path of one call through the package: which files and functions of nngeometry
``FIM(model, loader, PMatKFAC)`` (the build) and then ``.solve(v, regul)`` run.

    python benchmarks/call_path.py          # the counts
    python benchmarks/call_path.py -v       # and every function, file by file, in call order

A profile hook records every Python function entered whose code lives in the package, after a
first build and solve (so that imports and first-call caches are not counted). Functions are
counted by qualified name, leaving out comprehensions, generator expressions and lambdas
(``--inner`` counts them too). The model is a 2-layer MLP, two batches. docs/architecture.md explains the path.
"""
import argparse
import collections
import os
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import nngeometry  # noqa: E402
from nngeometry import FIM  # noqa: E402
from nngeometry.object import PMatKFAC, PVector  # noqa: E402

PKG = os.path.dirname(os.path.abspath(nngeometry.__file__))
INNER = ("<listcomp>", "<genexpr>", "<dictcomp>", "<setcomp>", "<lambda>")


def traced(fn, inner=True):
    """``fn()`` and the ``(file, function)`` pairs of the package it entered, in first-call order."""
    seen = collections.OrderedDict()

    def hook(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(PKG):
            name = frame.f_code.co_qualname
            if inner or not name.endswith(INNER):
                path = os.path.relpath(frame.f_code.co_filename, os.path.dirname(PKG))
                seen.setdefault((path, name), None)

    sys.setprofile(hook)
    try:
        out = fn()
    finally:
        sys.setprofile(None)
    return out, list(seen)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-v", action="store_true", help="list the functions, file by file")
    ap.add_argument("--inner", action="store_true",
                    help="count comprehensions, generator expressions and lambdas too")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    data = TensorDataset(torch.randn(16, 5), torch.randint(0, 3, (16,)))
    loader = DataLoader(data, batch_size=8)
    v = PVector.from_model(model)
    FIM(model, loader, PMatKFAC).solve(v, 1e-3)
    M, build = traced(lambda: FIM(model, loader, PMatKFAC), args.inner)
    _, solve = traced(lambda: M.solve(v, 1e-3), args.inner)
    for name, seen in (("build", build), ("solve", solve)):
        files = list(dict.fromkeys(f for f, _ in seen))
        print(f"{name}: {len(files)} files, {len(seen)} functions")
        if args.v:
            for f in files:
                print(f"    {f}: " + ", ".join(q for g, q in seen if g == f))


if __name__ == "__main__":
    main()
