#!/usr/bin/env python
"""Which of the operations written once in ``PMatAbstract`` (from the blocks' primitives) each
representation writes again itself.

    python benchmarks/overrides.py        # one line per representation: count and names
    python benchmarks/overrides.py --json # the same as JSON

An operation counts as overridden by a class when the class or one of its package base classes
(other than ``PMatAbstract``) defines it. Docstring-only pass-throughs (a method whose body is
``return super().<same>(...)``, or the implementation behind a deprecated name,
``_<same>_impl``) are not counted: they keep upstream's parameter names, defaults and
documentation, not a second implementation.
"""
import argparse
import ast
import inspect
import json
import os
import sys
import textwrap

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nngeometry.object import pspace  # noqa: E402
from nngeometry.object.pspace.abstract import PMatAbstract  # noqa: E402

# the operations PMatAbstract writes from the blocks' primitives
OPERATIONS = ("mv", "vTMv", "mmap", "mapTMmap", "solvePVec", "solvePFMap", "solve", "inverse",
              "inv", "pow", "__pow__", "logdet", "eigenvalues", "diag_of_inverse", "sqrt",
              "get_diag", "trace", "frobenius_norm", "norm", "to_torch", "_scaled", "__add__",
              "__sub__")


def _is_pass_through(fn, name):
    try:
        src = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError):
        return False
    body = ast.parse(src).body[0].body
    body = [s for s in body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    if len(body) != 1 or not isinstance(body[0], ast.Return):
        return False
    call = body[0].value
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)):
        return False
    target = call.func.value
    to_super = isinstance(target, ast.Call) and getattr(target.func, "id", None) == "super"
    to_self = isinstance(target, ast.Name) and target.id == "self"
    impl = call.func.attr == f"_{name}_impl" or (name == "inv" and call.func.attr == "_inverse_impl")
    return (to_super and (call.func.attr == name or impl)) or (to_self and impl)


def overrides(cls):
    out = []
    for name in OPERATIONS:
        for base in cls.__mro__:
            if base is PMatAbstract or not issubclass(base, PMatAbstract):
                continue
            fn = base.__dict__.get(name)
            if fn is None:
                continue
            fn = getattr(fn, "__wrapped__", fn)  # the renamed-method shim wraps the implementation
            if not _is_pass_through(fn, name):
                out.append(name)
            break
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    reps = sorted((c for c in vars(pspace).values() if inspect.isclass(c)
                   and issubclass(c, PMatAbstract) and c is not PMatAbstract),
                  key=lambda c: c.__name__)
    table = {c.__name__: overrides(c) for c in reps}
    if args.json:
        print(json.dumps(table, indent=1))
        return
    print(f"{len(OPERATIONS)} operations written once in PMatAbstract")
    for name, ops in table.items():
        print(f"{name:22s} {len(ops):2d}  {' '.join(ops)}")
    print(f"total {sum(map(len, table.values()))}")


if __name__ == "__main__":
    main()
