"""Times an upstream nngeometry test suite, test by test, against upstream's own package and
against this checkout's.

Usage (from the project root)::

    python benchmarks/upstream_suite_timing.py UPSTREAM [--shim DIR] [--files test_a.py ...]
        [--out timings.json] [--timeout SECONDS] [--preimport MODULE ...]

``UPSTREAM`` is an unpacked upstream source tree: its ``tests/`` folder and its ``nngeometry/``
package (a released source distribution or a checkout of its main branch). Nothing of it is
copied here. Each test file runs twice in a row, first with upstream's package first on the
import path, then with this checkout's, so that both runs of a file see about the same machine
load; pytest's JUnit report gives each test's time (setup, call and teardown). ``--shim`` is a
folder put first on the import path of both runs (e.g. an offline stand-in for
``torchvision.datasets.MNIST``). ``--preimport`` imports modules in both processes before the
tests start, so that a one-time import is not charged to the first test that triggers it: e.g.
``torch.fx.experimental.symbolic_shapes`` (with ``sympy``), which torch imports on the first
``autograd.grad`` call given ``grad_outputs``, as this package's batched backward passes do
(2 to 5 s on a loaded 2-core machine, once per process).

Prints one row per test (upstream seconds, ours, ratio ours / upstream, the outcomes) and the
totals; ``--out`` also writes them as JSON.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

OURS = Path(__file__).resolve().parents[1]


def _env(package_root, shim):
    env = dict(os.environ)
    path = [str(p) for p in (shim, package_root) if p is not None]
    env["PYTHONPATH"] = os.pathsep.join(path + [env["PYTHONPATH"]] if env.get("PYTHONPATH")
                                        else path)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _which_package(env, cwd):
    out = subprocess.run([sys.executable, "-c", "import nngeometry; print(nngeometry.__file__)"],
                         env=env, cwd=cwd, capture_output=True, text=True)
    return out.stdout.strip() or out.stderr.strip().splitlines()[-1]


def _run_file(test_file, tests_dir, env, timeout, preimport=()):
    """{test name: (seconds, outcome)} of one pytest run of ``test_file``."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        args = ["-q", "-p", "no:cacheprovider", "-o", "addopts=",
                "-o", "junit_duration_report=total", f"--junitxml={xml}", test_file]
        boot = "".join(f"import {m}; " for m in preimport)
        cmd = [sys.executable, "-c", f"{boot}import sys, pytest; sys.exit(pytest.main({args!r}))"]
        t0 = time.perf_counter()
        try:
            subprocess.run(cmd, cwd=tests_dir, env=env, capture_output=True, text=True,
                           timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"<file timed out>": (time.perf_counter() - t0, "timeout")}
        if not xml.exists():
            return {"<no report>": (time.perf_counter() - t0, "error")}
        out = {}
        for case in ET.parse(xml).getroot().iter("testcase"):
            outcome = "passed"
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    outcome = child.tag
            out[case.get("name")] = (float(case.get("time", 0.0)), outcome)
        return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("upstream", type=Path)
    ap.add_argument("--shim", type=Path, default=None)
    ap.add_argument("--files", nargs="*", default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--timeout", type=float, default=3600.0)
    ap.add_argument("--preimport", nargs="*", default=())
    args = ap.parse_args(argv)
    up = args.upstream.resolve()
    tests_dir = up / "tests"
    files = args.files or sorted(p.name for p in tests_dir.glob("test_*.py"))
    envs = {"upstream": _env(up, args.shim), "ours": _env(OURS, args.shim)}
    for label, env in envs.items():
        print(f"{label}: nngeometry from {_which_package(env, tests_dir)}", flush=True)
    rows = []
    for f in files:
        res = {label: _run_file(f, tests_dir, env, args.timeout, args.preimport)
               for label, env in envs.items()}
        for name in sorted(set(res["upstream"]) | set(res["ours"])):
            tu, ou = res["upstream"].get(name, (float("nan"), "absent"))
            to, oo = res["ours"].get(name, (float("nan"), "absent"))
            rows.append(dict(file=f, test=name, upstream_s=tu, ours_s=to, upstream=ou, ours=oo))
            print(f"{f}::{name:45s} upstream {tu:8.2f}s {ou:8s} ours {to:8.2f}s {oo:8s} "
                  f"ratio {to / tu if tu > 0 else float('nan'):6.2f}", flush=True)
    tu = sum(r["upstream_s"] for r in rows if r["upstream_s"] == r["upstream_s"])
    to = sum(r["ours_s"] for r in rows if r["ours_s"] == r["ours_s"])
    print(f"total: upstream {tu:.1f}s, ours {to:.1f}s, ratio {to / tu:.2f}")
    if args.out is not None:
        args.out.write_text(json.dumps(dict(rows=rows, upstream_total_s=tu, ours_total_s=to),
                                       indent=1))


if __name__ == "__main__":
    main()
