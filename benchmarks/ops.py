#!/usr/bin/env python
"""Per-operation cost against the bare tensor expression it needs, and against upstream.

    python benchmarks/ops.py                                    # W1, W2; ours and bare
    python benchmarks/ops.py --upstream-python /path/to/venv/bin/python --json ops.json

For the closed-form Fisher of W1 and W2 (``benchmarks/run.py``'s workloads, float32, one
thread) in Diag, KFAC and EKFAC, times ``mv``, ``vTMv``, ``get_diag``, ``trace`` and ``solve``
(after the first call with the same ``regul``: the factorizations are cached) of

* **ours**: the public operation on a ``PVector`` (so layout conversions, checks and the
  PVector wrapping count);
* **bare**: the tensor expression the maths needs, on operands already in the layout it wants
  (per layer ``V`` of shape ``(d_G, d_A)`` for Kronecker layouts, flat for Diag):
  Diag ``mv = d·v``, ``vTMv = ⟨v, d·v⟩``, ``solve = v / (d + λ)``, ``trace = Σ d``; KFAC
  ``mv = G V A`` per layer, ``vTMv = Σ ⟨V, G V A⟩``, ``get_diag = diag(G) diag(A)ᵀ``,
  ``trace = Σ tr(G) tr(A)``, ``solve = G̃⁻¹ V Ã⁻¹`` with the damped inverses precomputed; EKFAC
  ``mv = U_G (D ∘ U_Gᵀ V U_A) U_Aᵀ``, ``solve`` with ``1/(D + λ)``,
  ``get_diag = (U_G∘U_G) D (U_A∘U_A)ᵀ``, ``trace = Σ D``;
* **upstream**: the same public operation in upstream nngeometry (``--upstream-python``, a
  virtual environment where the release is installed; it runs from a neutral folder).

Each figure is the median over ``--repeats`` samples of at least 20 ms (cheap calls looped), in
one process per library, with ``ours / bare`` and ``ours / upstream``; the overhead column is
``ours − bare`` per call in µs. Prints a table and writes JSON.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OPS = ("mv", "vTMv", "get_diag", "trace", "solve")
REPS = ("Diag", "KFAC", "EKFAC")
REGUL = 1e-3


def _build(R, wname, rep):
    import nngeometry
    import nngeometry.object as obj
    FIM = getattr(nngeometry, "FIM", None) or nngeometry.metrics.FIM
    w = R.WORKLOADS[wname]
    model, loader = R.make_setup(w, w.batch)
    M = FIM(model=model, loader=loader, representation=getattr(obj, "PMat" + rep),
            variant="classif_logits")
    if rep == "EKFAC":
        M.update_diag(loader)
    return M


def _ours(M, op):
    from nngeometry.object.vector import random_pvector
    import torch
    lc = getattr(M, "layer_collection", None) or M.generator.layer_collection
    try:
        v = random_pvector(lc, dtype=torch.float32)
    except TypeError:  # a release without the dtype keyword
        v = random_pvector(lc)
    if op == "mv":
        return lambda: M.mv(v)
    if op == "vTMv":
        return lambda: M.vTMv(v)
    if op == "get_diag":
        try:
            M.get_diag()
        except TypeError:  # upstream 0.4's PMatEKFAC.get_diag(v) takes an unused argument
            return lambda: M.get_diag(None)
        return lambda: M.get_diag()
    if op == "trace":
        return lambda: M.trace()
    if op == "solve":
        return lambda: M.solve(v, regul=REGUL)
    raise KeyError(op)


def _kfac_operands(M_kfac):
    """Per layer ``(A, G, V)`` with ``V`` random of shape ``(d_G, d_A)`` (float32)."""
    import torch
    g = torch.Generator().manual_seed(0)
    out = []
    for lid, (A, G) in M_kfac.data.items():
        out.append((A, G, torch.randn(G.shape[0], A.shape[0], generator=g, dtype=A.dtype)))
    return out


def _bare(R, wname, rep, op):
    import torch
    if rep == "Diag":
        M = _build(R, wname, "Diag")
        d = M.get_diag().clone()
        v = torch.randn_like(d)
        return {"mv": lambda: d * v, "vTMv": lambda: torch.dot(v, d * v),
                "get_diag": lambda: d, "trace": lambda: d.sum(),
                "solve": lambda: v / (d + REGUL)}[op]
    K = _build(R, wname, "KFAC")
    layers = _kfac_operands(K)
    if rep == "KFAC":
        if op == "mv":
            return lambda: [G @ V @ A for A, G, V in layers]
        if op == "vTMv":
            return lambda: sum(torch.dot(V.reshape(-1), (G @ V @ A).reshape(-1))
                               for A, G, V in layers)
        if op == "get_diag":
            return lambda: [torch.outer(torch.diagonal(G), torch.diagonal(A))
                            for A, G, V in layers]
        if op == "trace":
            return lambda: sum(torch.trace(A) * torch.trace(G) for A, G, V in layers)
        if op == "solve":
            eye = [(torch.eye(A.shape[0]), torch.eye(G.shape[0])) for A, G, _ in layers]
            inv = [(torch.linalg.inv(A + REGUL ** 0.5 * IA), torch.linalg.inv(G + REGUL ** 0.5 * IG),
                    V) for (A, G, V), (IA, IG) in zip(layers, eye)]
            return lambda: [Gi @ V @ Ai for Ai, Gi, V in inv]
    eig = []
    for A, G, V in layers:
        lA, UA = torch.linalg.eigh(A)
        lG, UG = torch.linalg.eigh(G)
        eig.append((UA, UG, torch.outer(lG, lA).clamp_min(0), V))
    if op == "mv":
        return lambda: [UG @ (D * (UG.t() @ V @ UA)) @ UA.t() for UA, UG, D, V in eig]
    if op == "vTMv":
        return lambda: sum(((UG.t() @ V @ UA) ** 2 * D).sum() for UA, UG, D, V in eig)
    if op == "get_diag":
        return lambda: [(UG * UG) @ D @ (UA * UA).t() for UA, UG, D, V in eig]
    if op == "trace":
        return lambda: sum(D.sum() for UA, UG, D, V in eig)
    if op == "solve":
        return lambda: [UG @ ((UG.t() @ V @ UA) / (D + REGUL)) @ UA.t() for UA, UG, D, V in eig]
    raise KeyError(op)


def worker(lib, wname, repeats):
    sys.path.insert(0, str(HERE))
    import torch
    import run as R
    torch.set_num_threads(1)
    out = []
    for rep in REPS:
        M = None
        for op in OPS:
            row = {"lib": lib, "workload": wname, "rep": rep, "op": op}
            try:
                if lib == "bare":
                    fn = _bare(R, wname, rep, op)
                else:
                    if M is None:
                        M = R._quiet_warnings(lambda: _build(R, wname, rep))
                    fn = _ours(M, op)
                fn()  # the first call (factorizations for solve) is not timed
                t, _, _ = R.timeit(lambda: R._quiet_warnings(fn), repeats)
                row["time"] = t
            except Exception as e:  # noqa: BLE001 - every failure becomes an n/a cell
                row["error"] = R.reason_of(e)
            out.append(row)
    print("OPS_JSON " + json.dumps(out))


def measure(lib, wname, args):
    python = args.upstream_python if lib == "upstream" else sys.executable
    if not python:
        return []
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if lib != "upstream":
        env["PYTHONPATH"] = str(ROOT)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = "1"
    cmd = [python, str(Path(__file__).resolve()), "--worker", lib, wname,
           "--repeats", str(args.repeats)]
    proc = subprocess.run(cmd, env=env, cwd="/" if lib == "upstream" else str(ROOT),
                          capture_output=True, text=True, timeout=args.timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("OPS_JSON "):
            return json.loads(line[len("OPS_JSON "):])
    err = (proc.stderr.strip().splitlines() or ["no output"])[-1][:160]
    return [{"lib": lib, "workload": wname, "rep": r, "op": o, "error": err}
            for r in REPS for o in OPS]


def _fmt(t):
    return "n/a" if t is None else (f"{t * 1e6:8.1f}µs" if t < 1e-3 else f"{t * 1e3:8.2f}ms")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="W1,W2")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--upstream-python", default=None)
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", nargs=2, metavar=("LIB", "WORKLOAD"))
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.worker[0], args.worker[1], args.repeats)
    libs = ["ours", "bare"] + (["upstream"] if args.upstream_python else [])
    rows = []
    for wname in args.workloads.split(","):
        res = {lib: {(r["rep"], r["op"]): r for r in measure(lib, wname, args)} for lib in libs}
        for rep in REPS:
            for op in OPS:
                t = {lib: res[lib].get((rep, op), {}).get("time") for lib in libs}
                row = {"workload": wname, "rep": rep, "op": op,
                       **{f"{lib}_s": t[lib] for lib in libs}}
                if t["ours"] and t["bare"]:
                    row["ours_x_bare"] = t["ours"] / t["bare"]
                    row["overhead_us"] = (t["ours"] - t["bare"]) * 1e6
                if t.get("upstream") and t["ours"]:
                    row["ours_x_upstream"] = t["ours"] / t["upstream"]
                rows.append(row)
    head = f"{'wl':3} {'rep':6} {'op':9} {'ours':>10} {'bare':>10} {'ours/bare':>9} {'overhead':>10}"
    if args.upstream_python:
        head += f" {'upstream':>10} {'ours/up':>8}"
    print(head)
    for r in rows:
        line = (f"{r['workload']:3} {r['rep']:6} {r['op']:9} {_fmt(r.get('ours_s')):>10} "
                f"{_fmt(r.get('bare_s')):>10} "
                f"{r['ours_x_bare'] if 'ours_x_bare' in r else float('nan'):9.2f} "
                f"{r.get('overhead_us', float('nan')):8.1f}µs")
        if args.upstream_python:
            line += (f" {_fmt(r.get('upstream_s')):>10} "
                     f"{r['ours_x_upstream'] if 'ours_x_upstream' in r else float('nan'):8.2f}")
        print(line, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "regul": REGUL}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
