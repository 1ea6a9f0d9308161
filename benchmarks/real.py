#!/usr/bin/env python
"""Real-sized workloads: build and solve costs on a ResNet-18 and a GPT-2-style language model,
as multiples of the floor (one forward + backward of the mean loss over the same batches), with
the peak tensor memory of each build.

Usage::

    python benchmarks/real.py                       # W5 and W6, table on stdout
    python benchmarks/real.py --workloads W5 --json real.json
    python benchmarks/real.py --quick               # far fewer examples: a smoke run

Workloads (float32, fixed seeds, one thread, clock and memory probe of ``benchmarks/run.py``):

* **W5** ResNet-18 for 3×32×32 inputs (CIFAR stem: 3×3 convolution, no max-pool; BatchNorm in
  eval mode; 11.2 M parameters), 128 images in batches of 32, 10 classes;
* **W6** GPT-2-style language model built from a ``transformers`` config (no download: 6 layers,
  width 256, 4 heads, vocabulary 8192, 128 positions, tied embeddings), 256 sequences of 128
  tokens in batches of 16, dict batches ``{'input_ids', 'labels'}``; the loss is the next-token
  cross-entropy, summed over positions (the Fisher of the sequence's likelihood).

Each row's time is the median of ``--repeats`` samples (``[min-max]``: the smallest and largest
sample, as multiples of the median floor); a build's peak is measured in one more call.

Rows: Monte-Carlo Diag and KFAC builds, closed-form EKFAC build and its ``update_diag``,
empirical-Fisher Diag and KFAC builds, ``PMatImplicit.mv``, KFAC and EKFAC ``solve`` (first call,
which decomposes, then a later call), last-layer Dense build. A row whose API is missing or that
raises is ``n/a (reason)``. Targets: MC Diag ≤ 1.3× floor, MC KFAC ≤ 2×, closed-form
KFAC on W5 ≤ 8×, first KFAC solve on W5 ≤ 1×.
"""
import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as R  # noqa: E402  (also puts this checkout on the path when not installed)
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import nngeometry  # noqa: E402


# ====================================================================== models
class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 (He et al. 2016) with the CIFAR stem: 11.2 M parameters for 10 classes."""

    def __init__(self, n_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        blocks, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(512, n_classes)

    def forward(self, x):
        h = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


def gpt2(vocab=8192, positions=128, width=256, layers=6, heads=4):
    from transformers import GPT2Config, GPT2LMHeadModel
    # untied output layer: a tied one is one parameter used by two modules, which the per-layer
    # statistics refuse by default (LayerCollection.from_model(tied_weights='sum') sums them)
    cfg = GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=width, n_layer=layers,
                     n_head=heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     tie_word_embeddings=False)
    return GPT2LMHeadModel(cfg)


# ====================================================================== workloads
class Setup:
    """A model in eval mode, its loader, the floor's loss and the keywords the entry points
    need for it."""

    def __init__(self, model, loader, loss, kwargs, lm=False):
        self.model, self.loader, self.loss, self.kwargs, self.lm = model, loader, loss, kwargs, lm


def w5(n):
    torch.manual_seed(0)
    model = ResNet18().float().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    loader = [(x[i:i + 32], y[i:i + 32]) for i in range(0, n, 32)]
    return Setup(model, loader, lambda m, b: F.cross_entropy(m(b[0]), b[1]), {})


def w6(n):
    torch.manual_seed(0)
    model = gpt2().float().eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 8192, (n, 128), generator=g)
    loader = [{"input_ids": ids[i:i + 16], "labels": ids[i:i + 16]} for i in range(0, n, 16)]

    def loss(m, b):
        logits = m(input_ids=b["input_ids"]).logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b["labels"][:, 1:].reshape(-1))

    def function(b):  # next-token logits (n, T-1, V)
        ids = b["input_ids"]
        # positions per example: an unbatched (1, T) lookup is refused (its per-example
        # gradients would be summed over the batch)
        pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        return model(input_ids=ids, position_ids=pos).logits[:, :-1]

    def per_example_loss(out, labels):
        # classes on the last, contiguous axis: cross-entropy over a transposed (strided) class
        # axis costs about three times as much
        n, t, v = out.shape
        ce = F.cross_entropy(out.reshape(n * t, v), labels[:, 1:].reshape(n * t), reduction="none")
        return ce.reshape(n, t).sum(1)

    return Setup(model, loader, loss, {"function": function, "loss_function": per_example_loss},
                 lm=True)


WORKLOADS = {"W5": (w5, 128, 32), "W6": (w6, 256, 32)}  # name: (make, n, n with --quick)


# ====================================================================== rows
def floor(s):
    def go():
        s.model.zero_grad(set_to_none=True)
        for b in s.loader:
            s.loss(s.model, b).backward()
    return go


def _entry(name):
    fn = getattr(nngeometry, name, None)
    if fn is None:
        raise R.NotAvailable(f"not available: nngeometry.{name}")
    return fn


def _kw(s, entry):
    """The keywords of an entry point for this workload (the LM's function and loss)."""
    kw = {}
    if "function" in s.kwargs:
        kw["function"] = s.kwargs["function"]
    if entry == "EmpiricalFisher" and "loss_function" in s.kwargs:
        kw["loss_function"] = s.kwargs["loss_function"]
    if entry in ("FIM", "FIM_MonteCarlo"):
        kw["variant"] = "classif_logits"
    if s.lm:
        kw["class_dim"] = -1  # the function's shifted logits (n, T-1, V): classes last
    return kw


def rows(s):
    from nngeometry.layercollection import LayerCollection
    from nngeometry.object import PMatDense, PMatDiag, PMatEKFAC, PMatImplicit, PMatKFAC
    from nngeometry.object.vector import random_pvector

    def build(entry, rep, **extra):
        return lambda: _entry(entry)(s.model, s.loader, rep, **_kw(s, entry), **extra)

    # the language model's closed form would back-propagate T·(V − 1) ≈ 10⁶ output directions
    # per sequence (and its implicit product form the per-position V × (V − 1) square roots):
    # its EKFAC and implicit rows use the Monte-Carlo Fisher (one sampled token per position)
    closed = "FIM_MonteCarlo" if s.lm else "FIM"
    out = {
        "MC Diag build": build("FIM_MonteCarlo", PMatDiag),
        "MC KFAC build": build("FIM_MonteCarlo", PMatKFAC),
        "KFAC build (closed form)": build("FIM", PMatKFAC),
        "EKFAC build (closed form)": build(closed, PMatEKFAC),
        "EF Diag build": build("EmpiricalFisher", PMatDiag),
        "EF KFAC build": build("EmpiricalFisher", PMatKFAC),
    }
    if s.lm:
        del out["KFAC build (closed form)"]
        out["EKFAC build (MC)"] = out.pop("EKFAC build (closed form)")
    ekfac_row = "EKFAC build (MC)" if s.lm else "EKFAC build (closed form)"
    implicit = (lambda: _entry("FIM_MonteCarlo")(s.model, s.loader, PMatImplicit, seed=0,
                                                 **_kw(s, "FIM_MonteCarlo"))) if s.lm else \
        build("FIM", PMatImplicit)

    def last_layer():
        lc = LayerCollection.from_model(s.model).last_layer()
        return _entry("FIM_MonteCarlo")(s.model, s.loader, PMatDense, layer_collection=lc,
                                        **_kw(s, "FIM_MonteCarlo"))
    out["last-layer Dense build (MC)"] = last_layer
    cache = {}

    def built(key, make):
        if key not in cache:
            cache[key] = make()
        return cache[key]

    # rows on a built matrix: ``prepare`` (untimed) builds it, so that the timed call is the
    # operation alone (a build of more than 2 s would otherwise count as the first sample)
    def update_diag():
        M = built("ekfac", out[ekfac_row])
        M.update_diag(s.loader)
    update_diag.prepare = lambda: built("ekfac", out[ekfac_row])
    out["EKFAC update_diag"] = update_diag

    def implicit_mv():
        M = built("implicit", implicit)
        v = built("v", lambda: random_pvector(M.layer_collection))
        return M.mv(v)
    implicit_mv.prepare = lambda: built("implicit", implicit)
    out["Implicit mv"] = implicit_mv

    def solve(key, make, first):
        def go():
            M = built(key, make)
            v = built("v", lambda: random_pvector(M.layer_collection))
            if first:  # a fresh copy of the factors: nothing decomposed yet
                M = type(M)(M.layer_collection, data=M.data)
            return M.solve(v, regul=1e-3)

        def prepare():
            M = built(key, make)
            if not first:  # the factorizations of the first solves are done
                v = built("v", lambda: random_pvector(M.layer_collection))
                M.solve(v, regul=1e-3)
                M.solve(v, regul=1e-3)
        go.prepare = prepare
        return go
    mc_kfac = out["MC KFAC build"]
    out["KFAC solve, first"] = solve("kfac", mc_kfac, True)
    out["KFAC solve, later"] = solve("kfac", mc_kfac, False)
    return out


def run_workload(name, quick, repeats, log, only=None):
    make, n, n_quick = WORKLOADS[name]
    try:
        s = make(n_quick if quick else n)
    except Exception as e:  # noqa: BLE001
        return {"error": R.reason_of(e)}
    res = {"n": n_quick if quick else n,
           "params": sum(p.numel() for p in s.model.parameters())}
    floor_t, floor_samples, _ = R.timeit(floor(s), repeats)
    _, floor_peak, _ = R.peak_memory(floor(s))
    res["floor"] = {"time": floor_t, "peak": floor_peak, "samples": floor_samples}
    log(f"{name}: {res['params'] / 1e6:.1f} M parameters, floor {floor_t:.2f} s, "
        f"peak {floor_peak / 2**20:.0f} MiB")
    res["rows"] = {}
    for label, fn in rows(s).items():
        if only and label not in only:
            continue
        try:
            if hasattr(fn, "prepare"):
                R._quiet_warnings(fn.prepare)
            t, samples, _ = R.timeit(lambda: R._quiet_warnings(fn), repeats, budget_s=600)
            row = {"time": t, "x_floor": t / floor_t, "samples": samples,
                   "x_floor_min": min(samples) / floor_t, "x_floor_max": max(samples) / floor_t}
            if "build" in label:
                _, peak, retained = R.peak_memory(lambda: R._quiet_warnings(fn))
                row.update(peak=peak, retained=retained)
        except Exception as e:  # noqa: BLE001
            row = {"error": R.reason_of(e)}
        res["rows"][label] = row
        log(f"  {label:30s} " + (f"{row['time']:8.2f} s {row['x_floor']:6.2f}x floor"
                                  if "time" in row else row["error"]))
    return res


def print_table(results):
    for name, res in results.items():
        if "error" in res:
            print(f"\n{name}: n/a ({res['error']})")
            continue
        f = res["floor"]
        print(f"\n{name}: {res['params'] / 1e6:.1f} M parameters, {res['n']} examples; floor "
              f"{f['time']:.2f} s, floor peak {f['peak'] / 2**20:.0f} MiB")
        print(f"{'row':30s} {'time':>10s} {'x floor':>8s} {'[min-max]':>13s} {'peak':>10s}")
        for label, r in res["rows"].items():
            if "error" in r:
                print(f"{label:30s} n/a ({r['error']})")
                continue
            peak = f"{r['peak'] / 2**20:8.0f} MiB" if "peak" in r else ""
            spread = f"[{r['x_floor_min']:.2f}-{r['x_floor_max']:.2f}]" if "samples" in r else ""
            print(f"{label:30s} {r['time']:8.2f} s {r['x_floor']:8.2f} {spread:>13s} {peak:>10s}")


def main(argv=None):
    p = argparse.ArgumentParser(description="real-sized workloads (see the docstring)")
    p.add_argument("--workloads", default="W5,W6")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--rows", default=None,
                   help="the row labels to run, separated by ';' (default: all), e.g. "
                        "'KFAC solve, first;KFAC solve, later'")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    results = {}
    for name in args.workloads.split(","):
        only = set(args.rows.split(";")) if args.rows else None
        results[name] = run_workload(name, args.quick, args.repeats,
                                     lambda m: print(m, file=sys.stderr, flush=True), only)
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
