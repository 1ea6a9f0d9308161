#!/usr/bin/env python
"""Benchmark suite for nngeometry: build and operation costs of every parameter-space
representation, as multiples of the cost of training the model.

Usage::

    python benchmarks/run.py --all                         # everything, table on stdout
    python benchmarks/run.py --workloads W1,W2 --reps KFAC,EKFAC --repeats 5
    python benchmarks/run.py --all --json results.json     # also write the figures as JSON
    python benchmarks/run.py --quick                       # smaller N, one repeat: a smoke run

What is measured (public API only: ``nngeometry.FIM``, ``nngeometry.FIM_MonteCarlo``,
``nngeometry.object`` ``PMat*`` / ``random_pvector``, ``LayerCollection``), so that the same script
runs against any package with nngeometry's API (``PYTHONPATH=... python benchmarks/run.py``):

* **floor**: one plain forward + backward of the mean cross-entropy over the same data and the
  same batches (gradients accumulated over the batches, as in one epoch without the optimizer
  step). Every time below is also given as a multiple of it. It is measured before and after the
  workload's other figures and the median of all its samples is used, so that a slow phase of the
  machine affects both sides of the ratio.
* **builds** of each representation through ``FIM`` (closed form, ``classif_logits``, C = 10) and
  ``FIM_MonteCarlo(trials=1)``; EKFAC's ``update_diag`` on the closed-form object;
* **operations** on the closed-form object: ``mv``, ``vTMv``, ``solve`` (first call with a given
  ``regul``, then later calls), ``get_diag``, ``trace``;
* **bare tensor expressions** of the operations (``--bare-ops``, see ``benchmarks/ops.py``):
  ``mv``, ``vTMv``, ``get_diag``, ``trace``, ``solve`` of Diag/KFAC/EKFAC against the expression
  each needs, with the per-call overhead in µs and the ratio to upstream nngeometry;
* **bare GEMM** (Dense, BlockDiag): one ``torch.mm(Jᵀ, J)`` of the stacked per-example Jacobians
  (per layer for BlockDiag), on random data of the shape the maths needs: ``J`` has ``K·N`` rows,
  ``K = C - 1 = 9`` for the closed form (the multinomial covariance has rank C - 1) and ``K = 1``
  for Monte-Carlo with one trial;
* **bare eigendecompositions** (EKFAC target): ``torch.linalg.eigh`` of random SPD matrices of the
  shapes of the KFAC factors of every layer;
* **peak memory per build**: the peak of the bytes held by tensors allocated during the build, as
  reported by PyTorch's CPU allocator to the profiler (``torch.profiler`` with
  ``profile_memory=True``: each allocation/free event carries the allocator's running total). It
  counts exactly the tensor memory (including temporaries inside ops and the result itself) and
  nothing else (no Python objects, no allocator caching, no shared libraries), which is what
  ``ru_maxrss`` or ``tracemalloc`` can't give. It is taken in a separate, untimed run of the build.
  ``retained`` is what is still allocated when the build returns (the representation's storage);
  ``transient = peak - retained``. The "never hold a per-example Jacobian of the whole model"
  target is checked as ``transient < J_batch + floor peak`` (for EKFAC, ``+`` the peak of the bare
  eigendecompositions of its factor widths, which no Jacobian enters), with ``J_batch = K · batch · P · 4``
  bytes the whole-model per-example Jacobian of one batch: a build that held it would need that
  much on top of the forward/backward state, which the floor's peak stands for.

Times are medians over ``--repeats`` samples after one untimed warm-up run (a run slower than 2 s
is its own warm-up and counts as a sample); cheap operations are looped so that one sample lasts at
least 20 ms. The clock is the process CPU time by default (``--clock cpu``): with one thread it is
the wall time the work takes on an idle core, and other processes sharing the machine do not
inflate it; ``--clock wall`` uses ``time.perf_counter``. Everything runs in float32 on fixed-seed
synthetic data, with one thread (``torch.set_num_threads(1)``).

Anything that can't be imported or raises is reported as ``n/a (reason)`` and the suite goes on.
"""
import argparse
import contextlib
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback

# one thread, also for the BLAS/OpenMP pools of libraries loaded with torch
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, TensorDataset  # noqa: E402

try:
    import nngeometry  # noqa: E402
except ImportError:  # running from a checkout that is not installed: use the checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import nngeometry  # noqa: E402,F401

N_CLASSES = 10
REGUL = 1e-3
IMPLICIT_CG_ITERS = 10
ALL_REPS = ("Dense", "BlockDiag", "Diag", "QuasiDiag", "LowRank", "Implicit", "KFAC", "EKFAC")


# ====================================================================== workloads
class CNN(nn.Module):
    """W2: Conv 3→16 k3 p1, ReLU, MaxPool2, Conv 16→32 k3 p1, ReLU, MaxPool2, Linear 2048→10."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(2048, N_CLASSES)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


class TinyTransformer(nn.Module):
    """W4: token + position embeddings, 2 post-norm encoder layers (d=32, 2 heads, ff 64, no
    dropout), mean pooling, linear classifier."""

    def __init__(self, vocab=200, seq_len=16, d_model=32, n_heads=2, d_ff=64, n_layers=2):
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        layer = nn.TransformerEncoderLayer(d_model, n_heads, d_ff, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, N_CLASSES)

    def forward(self, x):
        # one row of positions per example: an embedding looked up with unbatched positions
        # and broadcast over the batch has no per-example gradient (nngeometry refuses it)
        positions = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
        h = self.encoder(self.tok(x) + self.pos(positions))
        return self.head(h.mean(dim=1))


def mlp(*sizes):
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class Workload:
    def __init__(self, name, description, make_model, make_inputs, n, n_quick, batch, reps):
        self.name = name
        self.description = description
        self.make_model = make_model
        self.make_inputs = make_inputs
        self.n = n
        self.n_quick = n_quick
        self.batch = batch
        self.reps = reps


WORKLOADS = {
    "W1": Workload("W1", "MLP 784-256-256-10", lambda: mlp(784, 256, 256, N_CLASSES),
                   lambda n, g: torch.randn(n, 784, generator=g), 1024, 256, 128,
                   ("Diag", "KFAC", "EKFAC", "Implicit")),
    "W2": Workload("W2", "CNN 3x32x32: conv16-pool-conv32-pool-fc", CNN,
                   lambda n, g: torch.randn(n, 3, 32, 32, generator=g), 512, 128, 64,
                   ("Diag", "KFAC", "EKFAC", "Implicit")),
    "W3": Workload("W3", "MLP 64-64-64-10 (~9k params)", lambda: mlp(64, 64, 64, N_CLASSES),
                   lambda n, g: torch.randn(n, 64, generator=g), 256, 128, 128,
                   ("Dense", "BlockDiag", "LowRank", "QuasiDiag")),
    "W4": Workload("W4", "transformer encoder (emb 200x32, 2 layers, T=16), seq. classif.",
                   TinyTransformer, lambda n, g: torch.randint(0, 200, (n, 16), generator=g),
                   256, 64, 64, ("Diag", "KFAC", "EKFAC", "Implicit")),
}


def make_setup(w, n):
    """Fixed-seed model and loader (float32). The loader hands out whole batches (a BatchSampler
    on a TensorDataset: one indexing per batch, no per-example collation)."""
    torch.manual_seed(0)
    model = w.make_model().float()
    g = torch.Generator().manual_seed(1)
    x = w.make_inputs(n, g)
    if x.is_floating_point():
        x = x.float()
    y = torch.randint(0, N_CLASSES, (n,), generator=g)
    dataset = TensorDataset(x, y)
    sampler = BatchSampler(SequentialSampler(dataset), batch_size=w.batch, drop_last=False)
    loader = DataLoader(dataset, sampler=sampler, batch_size=None)
    return model, loader


# ====================================================================== measuring
class NotAvailable(Exception):
    pass


def reason_of(exc):
    if isinstance(exc, NotAvailable):
        return str(exc)
    msg = str(exc).strip().splitlines()
    msg = msg[0] if msg else ""
    if len(msg) > 160:
        msg = msg[:157] + "..."
    return f"{type(exc).__name__}: {msg}"


#: the clock of every timing: process CPU time by default (one thread: it equals the wall time of
#: an idle machine and is not inflated by other processes sharing the cores), or wall time
CLOCK = {"cpu": time.process_time, "wall": time.perf_counter}
_clock = CLOCK["cpu"]


def _sample(fn, number):
    # the collector is off while timing (as in timeit); timeit() runs it before each figure
    gc.disable()
    try:
        t0 = _clock()
        for _ in range(number):
            out = fn()
        dt = _clock() - t0
    finally:
        gc.enable()
    return dt / number, out


def timeit(fn, repeats, min_sample_s=0.02, budget_s=120.0, warmup=True):
    """Median time of ``fn()`` over ``repeats`` samples; returns (median, samples, last output).

    One untimed warm-up call, unless the call takes more than 2 s (it then counts as a sample).
    Fast calls are looped so that a sample lasts at least ``min_sample_s``. Stops early (with at
    least one sample) when the samples exceed ``budget_s`` in total.
    """
    samples = []
    number = 1
    gc.collect(1)  # the young generations only: a full collection is slow with torch loaded
    if warmup:
        t, out = _sample(fn, 1)
        if t > 2.0:
            samples.append(t)
        elif t < min_sample_s:
            number = max(1, min(1000, int(math.ceil(min_sample_s / max(t, 1e-7)))))
    while len(samples) < repeats and (not samples or sum(samples) * number < budget_s):
        t, out = _sample(fn, number)
        samples.append(t)
    return statistics.median(samples), samples, out


@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's C++ side prints start/stop lines on fd 2: hide them."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _allocation_events(prof):
    """(time, size, running total) of every CPU allocator event recorded by the profiler."""
    out = []
    alloc_tag = torch._C._profiler._EventType.Allocation
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == alloc_tag:
            f = e.extra_fields
            out.append((e.start_time_ns, f.alloc_size, f.total_allocated))
        stack.extend(e.children)
    out.sort(key=lambda a: a[0])
    return out


def peak_memory(fn):
    """Run ``fn()`` once under the profiler; returns (output, peak bytes, retained bytes) of tensor
    memory allocated during the call (see the module docstring)."""
    from torch.profiler import ProfilerActivity, profile
    gc.collect(1)
    with _quiet_stderr():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn()
    events = _allocation_events(prof)
    if not events:
        return out, 0, 0
    # running net allocation since the start (frees of tensors allocated before the window are
    # not known to the profiler's reporter and are not counted either way)
    running, peak = 0, 0
    for _, size, _total in events:
        running += size
        peak = max(peak, running)
    return out, peak, running


def _quiet_warnings(fn):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


# ====================================================================== the public API
def get_rep(name):
    import nngeometry.object as obj
    cls = getattr(obj, "PMat" + name, None)
    if cls is None:
        raise NotAvailable(f"not available: nngeometry.object has no PMat{name}")
    return cls


def _ce(out, y):
    return torch.nn.functional.cross_entropy(out, y, reduction="none")


def build(model, loader, cls, variant):
    if variant == "FIM":
        return nngeometry.FIM(model=model, loader=loader, representation=cls,
                              variant="classif_logits")
    if variant == "EF":
        # empirical Fisher: one backward direction, as MC with one trial
        return nngeometry.EmpiricalFisher(model, loader, cls, loss_function=_ce)
    if variant == "GGN":
        # GGN of the cross-entropy given as a torch.nn module: the closed-form square root of
        # its output Hessian (C - 1 directions, as FIM)
        return nngeometry.GGN(model, loader, cls,
                              loss_function=torch.nn.CrossEntropyLoss(reduction="none"))
    if variant == "GGNgen":
        # the same loss as an opaque callable: output Hessians by double backward and their
        # eigendecompositions (the generic path of any convex loss)
        return nngeometry.GGN(model, loader, cls, loss_function=_ce)
    if variant == "LL":
        # closed-form Fisher of the last layer only (no backward pass below it)
        return nngeometry.FIM(model=model, loader=loader, representation=cls,
                              variant="classif_logits",
                              layer_collection=layer_collection(model).last_layer())
    return nngeometry.FIM_MonteCarlo(model=model, loader=loader, representation=cls,
                                     variant="classif_logits", trials=1)


def layer_collection(model):
    from nngeometry import LayerCollection
    return LayerCollection.from_model(model)


def layer_param_shapes(lc):
    """[(layer_id, weight size, has bias)] from the public layer specs."""
    out = []
    for lid, layer in lc.layers.items():
        out.append((lid, tuple(layer.weight.size), layer.bias is not None, type(layer).__name__))
    return out


# ====================================================================== one workload
def floor_fn(model, loader):
    def run():
        model.zero_grad(set_to_none=True)
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
    return run


def bare_gemm(lc, n, K, per_layer, repeats):
    """Median time of ``Jᵀ J`` for ``J`` of shape ``(K n, P)`` (one mm), or of the per-layer
    blocks ``J_lᵀ J_l`` (one mm per layer)."""
    g = torch.Generator().manual_seed(2)
    sizes = [layer.numel() for layer in lc.layers.values()] if per_layer else [lc.numel()]
    mats = [torch.randn(K * n, p, generator=g) for p in sizes]

    def run():
        return [torch.mm(J.t(), J) for J in mats]
    t, samples, _ = timeit(run, repeats)
    return t, samples


def kfac_factor_dims(model, loader, lc):
    """Widths of the dense KFAC factors of every layer: read from a built ``PMatKFAC``'s
    ``data`` (``{layer_id: (A, G)}``, or a tuple of such pairs for a layer with several
    Kronecker blocks, as in upstream; a 1-D factor is diagonal and needs no eigh), or, for a
    package without it, derived from the Linear / Conv2d layer specs."""
    try:
        kfac = build(model, loader, get_rep("KFAC"), "MC")
        data = kfac.data
    except Exception:  # noqa: BLE001  (a package without PMatKFAC.data, or a layer it lacks)
        data = None
    if isinstance(data, dict) and data:
        dims = []
        for entry in data.values():
            pairs = entry if isinstance(entry[0], (tuple, list)) else (entry,)
            for pair in pairs:
                dims.extend(int(f.shape[0]) for f in pair if f.dim() == 2)
        return dims
    dims = []
    for lid, wsize, bias, kind in layer_param_shapes(lc):
        if kind not in ("LinearLayer", "Conv2dLayer"):
            raise NotAvailable(f"no KFAC factor shape known for layer type {kind}")
        dims += [math.prod(wsize[1:]) + (1 if bias else 0), wsize[0]]
    return dims


def _spd(dims):
    g = torch.Generator().manual_seed(3)
    mats = []
    for d in dims:
        X = torch.randn(d, d + 16, generator=g)
        mats.append(X @ X.t() / d)
    return mats


def bare_eigh(dims, repeats):
    """Median time of ``eigh`` on random SPD matrices of the given widths (the dense KFAC
    factors, see :func:`kfac_factor_dims`)."""
    mats = _spd(dims)

    def run():
        return [torch.linalg.eigh(m) for m in mats]
    t, samples, _ = timeit(run, repeats)
    return t, samples


def bare_eigh_once(mats):
    """Each factor copied (as a build makes it), decomposed and freed, one after the other:
    what the eigendecompositions alone need, for the EKFAC memory allowance."""
    out = []
    for m in mats:
        c = m.clone()
        out.append(torch.linalg.eigh(c)[1])
        del c
    return out


def run_workload(w, reps, variants, repeats, quick, memory, log, n=None):
    n = n if n is not None else (w.n_quick if quick else w.n)
    model, loader = make_setup(w, n)
    try:
        lc, lc_error = layer_collection(model), None
        P = lc.numel()
    except Exception as exc:  # noqa: BLE001  (e.g. a layer type not covered yet)
        lc, lc_error = None, NotAvailable(f"not available: LayerCollection.from_model: "
                                          f"{reason_of(exc)}")
        P = sum(p.numel() for p in model.parameters())
    res = {"description": w.description, "n": n, "batch": w.batch, "n_params": P,
           "n_classes": N_CLASSES, "reps": {}, "gemm": {}}
    log(f"[{w.name}] {w.description}: N={n}, batch {w.batch}, P={P}")

    floor = floor_fn(model, loader)
    floor_reps = max(repeats, 3)
    _, floor_samples, _ = timeit(floor, floor_reps)
    floor_chunks = [floor_samples]

    # per-example Jacobian of the whole model for one batch, per variant (K rows per example)
    K_of = {"FIM": N_CLASSES - 1, "MC": 1, "EF": 1, "GGN": N_CLASSES - 1,
            "GGNgen": N_CLASSES - 1, "LL": N_CLASSES - 1}
    res["jacobian_batch_bytes"] = {v: K_of[v] * w.batch * P * 4 for v in K_of}

    for name in reps:
        if len(floor_chunks) > 1 or name != reps[0]:
            # floor samples between representations: each one's ratios use the floor measured
            # just before and just after it, so that a slow phase of a shared machine moves both
            _, chunk, _ = timeit(floor, floor_reps)
            floor_chunks.append(chunk)
        log(f"[{w.name}] {name}")
        r = res["reps"][name] = {"status": "ok", "build": {}, "ops": {}}
        r["_chunk"] = len(floor_chunks) - 1
        try:
            if lc_error is not None:
                raise lc_error
            cls = get_rep(name)
        except Exception as exc:  # noqa: BLE001
            r["status"], r["reason"] = "n/a", reason_of(exc)
            continue
        objs = {}
        for variant in variants:
            entry = r["build"][variant] = {}
            try:
                t, samples, obj = timeit(lambda: build(model, loader, cls, variant), repeats)
                entry.update(time_s=t, samples=samples)
                objs[variant] = obj
                if memory:
                    del obj
                    mobj, peak, retained = peak_memory(lambda: build(model, loader, cls, variant))
                    del mobj
                    entry.update(peak_bytes=peak, retained_bytes=retained,
                                 transient_bytes=peak - retained)
            except Exception as exc:  # noqa: BLE001
                entry.update(status="n/a", reason=reason_of(exc))
                log(f"    build {variant}: n/a ({reason_of(exc)})")
            if name in ("Dense", "BlockDiag") and variant in ("FIM", "MC"):
                try:
                    t, samples = bare_gemm(lc, n, K_of[variant], name == "BlockDiag", repeats)
                    res["gemm"].setdefault(name, {})[variant] = {"time_s": t, "samples": samples}
                except Exception as exc:  # noqa: BLE001
                    res["gemm"].setdefault(name, {})[variant] = {"status": "n/a",
                                                                 "reason": reason_of(exc)}
        # EKFAC: update_diag on the closed-form object (the diagonal in the eigenbasis)
        obj = objs.get("FIM")
        if name == "EKFAC":
            entry = r["update_diag"] = {}
            if obj is None:
                entry.update(status="n/a", reason="no closed-form EKFAC object")
            else:
                try:
                    t, samples, _ = timeit(lambda: obj.update_diag(loader), repeats)
                    entry.update(time_s=t, samples=samples)
                except Exception as exc:  # noqa: BLE001
                    entry.update(status="n/a", reason=reason_of(exc))
        if name == "EKFAC" and "MC" in variants:
            try:
                dims = kfac_factor_dims(model, loader, lc)
                t, samples = bare_eigh(dims, repeats)
                res["eigh"] = {"time_s": t, "samples": samples}
                if memory:
                    mats = _spd(dims)
                    _, peak, _ = peak_memory(lambda: bare_eigh_once(mats))
                    res["eigh"]["peak_bytes"] = peak
                    del mats
            except Exception as exc:  # noqa: BLE001
                res["eigh"] = {"status": "n/a", "reason": reason_of(exc)}
        # operations on the closed-form object
        if obj is None:
            obj = objs.get("MC")
            r["ops_on"] = "MC" if obj is not None else None
        else:
            r["ops_on"] = "FIM"
        for op in ("solve_first", "mv", "vTMv", "solve", "get_diag", "trace"):
            entry = r["ops"][op] = {}
            if obj is None:
                entry.update(status="n/a", reason="no object was built")
                continue
            try:
                from nngeometry.object import random_pvector
                torch.manual_seed(4)
                v = random_pvector(lc, dtype=torch.float32)
                solve = lambda: obj.solve(v, regul=REGUL)  # noqa: E731
                if name == "Implicit" and op in ("solve", "solve_first"):
                    # iterative (conjugate gradients, one pass over the data per iteration) and
                    # ill-conditioned for small regul: time a fixed number of iterations
                    entry["note"] = f"{IMPLICIT_CG_ITERS} CG iterations"
                    solve = lambda: _quiet_warnings(  # noqa: E731
                        lambda: obj.solve(v, regul=REGUL, max_iter=IMPLICIT_CG_ITERS))
                if op == "solve_first":
                    # the first call with this regul, on the freshly built object (the last one
                    # timed above): may compute and cache a factorization
                    t, _ = _sample(solve, 1)
                    entry.update(time_s=t, samples=[t])
                    continue
                fn = {"mv": lambda: obj.mv(v), "vTMv": lambda: obj.vTMv(v),
                      "solve": solve,
                      "get_diag": lambda: obj.get_diag(), "trace": lambda: obj.trace()}[op]
                t, samples, _ = timeit(fn, repeats, budget_s=30.0)
                entry.update(time_s=t, samples=samples)
            except Exception as exc:  # noqa: BLE001
                entry.update(status="n/a", reason=reason_of(exc))
        objs.clear()
        del obj

    # the floor again at the end; its median over all samples is the workload's reference
    _, more, _ = timeit(floor, floor_reps)
    floor_chunks.append(more)
    floor_samples = [t for c in floor_chunks for t in c]
    floor_t = statistics.median(floor_samples)
    for r in res["reps"].values():
        i = r.pop("_chunk", None)
        if i is not None:
            r["floor_s"] = statistics.median(floor_chunks[i] + floor_chunks[i + 1])
    res["floor"] = {"time_s": floor_t, "samples": floor_samples}
    if memory:
        # the same starting state for every measurement: no gradients left by the timing runs
        model.zero_grad(set_to_none=True)
        _, peak, retained = peak_memory(floor)
        res["floor"].update(peak_bytes=peak, retained_bytes=retained)
    _add_ratios(res, floor_t)
    return res


def _add_ratios(res, floor_t):
    """``x_floor`` next to every time: representations against their local floor (measured just
    before and after them), the bare GEMM / eigh against the workload's median floor."""
    def walk(d, fl):
        if isinstance(d, dict):
            if "time_s" in d:
                d["x_floor"] = d["time_s"] / fl
            for v in d.values():
                walk(v, fl)
    for r in res["reps"].values():
        walk(r, r.get("floor_s", floor_t))
    for key in ("gemm", "eigh"):
        walk(res.get(key), floor_t)


# ====================================================================== targets
def _time(res, *path):
    d = res
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None, "not measured"
        d = d[p]
    if not isinstance(d, dict):
        return None, "not measured"
    if "time_s" in d:
        return d["time_s"], None
    return None, d.get("reason", "not measured")


def _rep_status(res, rep):
    r = res["reps"].get(rep)
    if r is None:
        return "not run"
    if r["status"] != "ok":
        return r.get("reason", "n/a")
    return None


def evaluate_targets(results):
    """Every target that applies to the workloads that were run."""
    targets = []

    def add(wname, tid, text, value_reason, limit, unit):
        value, reason = value_reason
        if value is None:
            status = "N/A"
        else:
            status = "MET" if value <= limit else "MISSED"
        targets.append({"id": tid, "workload": wname, "target": text, "measured": value,
                        "limit": limit, "unit": unit, "status": status,
                        "reason": (reason or "not measured") if value is None else None})

    for wname, res in results.items():
        fl = res["floor"]["time_s"]

        def ratio_of(rep, *path):
            why = _rep_status(res, rep)
            if why:
                return None, why
            t, why = _time(res["reps"][rep], *path)
            return (None, why) if t is None else (t / res["reps"][rep].get("floor_s", fl), None)

        def time_of(rep, *path):
            why = _rep_status(res, rep)
            return (None, why) if why else _time(res["reps"][rep], *path)

        reps = res["reps"]
        # Monte-Carlo builds (one trial)
        if "Diag" in reps:
            add(wname, "mc-diag", "FIM_MonteCarlo Diag build <= 1.2x floor",
                ratio_of("Diag", "build", "MC"), limit=1.2, unit="x floor")
        if "KFAC" in reps:
            add(wname, "mc-kfac", "FIM_MonteCarlo KFAC build <= 1.6x floor",
                ratio_of("KFAC", "build", "MC"), limit=1.6, unit="x floor")
        if "EKFAC" in reps and "KFAC" in reps:
            te, why = time_of("EKFAC", "build", "MC")
            tk, why2 = time_of("KFAC", "build", "MC")
            eig = res.get("eigh", {})
            value, reason = None, why or why2 or eig.get("reason")
            if te is not None and tk is not None and "time_s" in eig:
                value = te / (tk + eig["time_s"])
            add(wname, "mc-ekfac", "FIM_MonteCarlo EKFAC build <= 1.2x (KFAC build + bare eigh)",
                (value, reason), 1.2, "x (KFAC+eigh)")
        # closed form, C = 10
        limits = {"W1": {"Diag": 3, "KFAC": 4, "EKFAC": 10}, "W2": {"Diag": 6, "KFAC": 6, "EKFAC": 15}}
        for rep, lim in limits.get(wname, {}).items():
            if rep not in reps:
                continue
            if rep == "EKFAC":
                tb, why = ratio_of("EKFAC", "build", "FIM")
                tu, why2 = ratio_of("EKFAC", "update_diag")
                value = tb + tu if tb is not None and tu is not None else None
                add(wname, "fim-ekfac", f"FIM EKFAC build + update_diag <= {lim}x floor",
                    (value, why or why2), lim, "x floor")
            else:
                add(wname, f"fim-{rep.lower()}", f"FIM {rep} build <= {lim}x floor",
                    ratio_of(rep, "build", "FIM"), limit=lim, unit="x floor")
        # implicit products
        if "Implicit" in reps:
            for op in ("mv", "vTMv"):
                add(wname, f"implicit-{op.lower()}", f"PMatImplicit {op} (closed-form FIM) <= 3x floor",
                    ratio_of("Implicit", "ops", op), limit=3, unit="x floor")
        # Dense / BlockDiag vs bare GEMM
        for rep in ("Dense", "BlockDiag"):
            if rep not in reps:
                continue
            for variant in ("FIM", "MC"):
                why = _rep_status(res, rep)
                t, why2 = (None, why) if why else _time(reps[rep], "build", variant)
                gm = res["gemm"].get(rep, {}).get(variant, {})
                value = t / gm["time_s"] if t is not None and "time_s" in gm else None
                add(wname, f"{rep.lower()}-gemm-{variant.lower()}",
                    f"{'FIM' if variant == 'FIM' else 'FIM_MonteCarlo'} {rep} build <= 1.5x bare GEMM",
                    (value, why2 or gm.get("reason")), 1.5, "x GEMM")
        # KFAC / EKFAC solve after the first call
        for rep in ("KFAC", "EKFAC"):
            if rep not in reps:
                continue
            why = _rep_status(res, rep)
            ts, why1 = (None, why) if why else _time(reps[rep], "ops", "solve")
            tm, why2 = (None, why) if why else _time(reps[rep], "ops", "mv")
            value = ts / tm if ts is not None and tm is not None else None
            add(wname, f"{rep.lower()}-solve", f"{rep} solve (after the first call) <= 2x mv",
                (value, why1 or why2), 2, "x mv")
        # memory: no per-example Jacobian of the whole model
        for rep in ("KFAC", "EKFAC", "Diag", "QuasiDiag", "BlockDiag"):
            if rep not in reps:
                continue
            for variant in ("FIM", "MC"):
                why = _rep_status(res, rep)
                b = reps[rep]["build"].get(variant, {}) if not why else {}
                jb = res["jacobian_batch_bytes"][variant]
                allowance = jb + res["floor"].get("peak_bytes", 0)
                extra = ""
                if rep == "EKFAC":
                    # the eigendecompositions' own memory (the factor, a copy LAPACK works in,
                    # its workspace and the eigenvectors: ≈ 4-5 d² floats for a d-wide factor)
                    # has nothing to do with a Jacobian: it is allowed on top, as measured for
                    # the bare eigh of the same factor widths
                    ep = res.get("eigh", {}).get("peak_bytes")
                    if ep is None:
                        b = {}
                    else:
                        allowance += ep
                        extra = f" + bare eigh peak ({_fmt_bytes(ep)})"
                value = b["transient_bytes"] / allowance if "transient_bytes" in b else None
                add(wname, f"mem-nojac-{rep.lower()}-{variant.lower()}",
                    f"{variant} {rep} build: transient peak < one batch's whole-model Jacobian "
                    f"({_fmt_bytes(jb)}) + floor peak{extra}",
                    (value, why or b.get("reason") or "memory not measured"),
                    1.0 - 1e-9, "x (Jacobian+floor)")
        if wname == "W1" and "KFAC" in reps:
            for variant in ("FIM", "MC"):
                why = _rep_status(res, "KFAC")
                b = reps["KFAC"]["build"].get(variant, {}) if not why else {}
                fp = res["floor"].get("peak_bytes")
                value = b["peak_bytes"] / fp if "peak_bytes" in b and fp else None
                add(wname, f"mem-kfac-{variant.lower()}",
                    f"{variant} KFAC build peak memory <= 2x floor peak",
                    (value, why or b.get("reason") or "memory not measured"), 2, "x floor peak")
    return targets


# ====================================================================== output
def _fmt_bytes(b):
    if b is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(b) < 1024 or unit == "GiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024


def _fmt_time(t):
    if t is None:
        return "-"
    if t >= 1:
        return f"{t:.3f} s"
    if t >= 1e-3:
        return f"{t * 1e3:.2f} ms"
    return f"{t * 1e6:.1f} us"


def print_table(meta, results, targets, out=sys.stdout):
    p = lambda s="": print(s, file=out)  # noqa: E731
    p(f"nngeometry benchmarks: torch {meta['torch']}, nngeometry {meta['nngeometry']} "
      f"({meta['nngeometry_path']}), float32, threads={meta['threads']} "
      f"(torch.set_num_threads(1)), median of {meta['repeats']} repeat(s), clock: {meta['clock']}"
      f"{', QUICK' if meta['quick'] else ''}")
    p(f"machine: {meta['machine']}")
    for wname, res in results.items():
        fl = res["floor"]
        p()
        p(f"== {wname}: {res['description']}  N={res['n']} batch={res['batch']} "
          f"P={res['n_params']} C={res['n_classes']}")
        p(f"   floor (forward+backward of the mean CE over all batches): {_fmt_time(fl['time_s'])}"
          f" (median of {len(fl['samples'])} samples over the workload; each representation's "
          f"ratios use the floor measured next to it)  peak {_fmt_bytes(fl.get('peak_bytes'))}")
        for rep, g in res["gemm"].items():
            for variant, e in g.items():
                what = "per-layer mm" if rep == "BlockDiag" else "mm"
                rows = (N_CLASSES - 1 if variant == "FIM" else 1) * res["n"]
                if "time_s" in e:
                    p(f"   bare GEMM for {rep} {variant} ({what}, J with {rows} rows): "
                      f"{_fmt_time(e['time_s'])} = {e['x_floor']:.2f}x floor")
                else:
                    p(f"   bare GEMM for {rep} {variant}: n/a ({e.get('reason')})")
        if "eigh" in res:
            e = res["eigh"]
            p("   bare eigh of the KFAC factor shapes: "
              + (f"{_fmt_time(e['time_s'])} = {e['x_floor']:.2f}x floor" if "time_s" in e
                 else f"n/a ({e.get('reason')})"))
        p(f"   {'representation':<12} {'measure':<18} {'time':>11} {'x floor':>9} "
          f"{'peak mem':>10} {'transient':>10}")
        for rep, r in res["reps"].items():
            if r["status"] != "ok":
                p(f"   {rep:<12} n/a ({r.get('reason')})")
                continue
            if "floor_s" in r:
                p(f"   {rep:<12} {'(local floor)':<18} {_fmt_time(r['floor_s']):>11}")
            rows = [(f"build {v}", e) for v, e in r["build"].items()]
            if "update_diag" in r:
                rows.append(("update_diag (FIM)", r["update_diag"]))
            on = f" ({r['ops_on']})" if r.get("ops_on") else ""
            rows += [(f"{op}{on}", e) for op, e in r["ops"].items()]
            for label, e in rows:
                if e.get("note"):
                    label = f"{label} [{e['note']}]"
                if "time_s" in e:
                    p(f"   {rep:<12} {label:<18} {_fmt_time(e['time_s']):>11} "
                      f"{e['x_floor']:>8.2f}x {_fmt_bytes(e.get('peak_bytes')):>10} "
                      f"{_fmt_bytes(e.get('transient_bytes')):>10}")
                else:
                    p(f"   {rep:<12} {label:<18} n/a ({e.get('reason')})")
    p()
    p("== targets")
    counts = {"MET": 0, "MISSED": 0, "N/A": 0}
    for t in targets:
        counts[t["status"]] += 1
        if t["measured"] is None:
            meas = f"n/a ({t['reason']})"
        else:
            meas = f"{t['measured']:.2f} {t['unit']} (limit {t['limit']:.3g})"
        p(f"   [{t['status']:>6}] {t['workload']}  {t['target']}: {meas}")
    p(f"   {counts['MET']} met, {counts['MISSED']} missed, {counts['N/A']} not measurable")


# ====================================================================== main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--all", action="store_true",
                    help="every workload and every representation that applies (the default)")
    ap.add_argument("--workloads", default=None,
                    help=f"comma-separated subset of {','.join(WORKLOADS)}")
    ap.add_argument("--reps", default=None,
                    help=f"comma-separated subset of {','.join(ALL_REPS)} (each workload runs "
                         "those of them that apply to it)")
    ap.add_argument("--variants", default="FIM,MC",
                    help="builds to measure: FIM (closed form), MC (FIM_MonteCarlo, trials=1), "
                         "EF (EmpiricalFisher, cross-entropy), GGN (GGN of nn.CrossEntropyLoss: "
                         "closed form), GGNgen (GGN of the cross-entropy as an opaque callable: "
                         "generic output Hessians), LL (FIM of the last layer)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="samples per figure (median); default 3, 1 with --quick")
    ap.add_argument("--quick", action="store_true", help="smaller N per workload: a smoke run")
    ap.add_argument("--n", type=int, default=None,
                    help="number of examples for every workload (overrides N and --quick's N)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                    help="cpu: process CPU time (default; with one thread it is the wall time of "
                         "an idle machine, robust to other processes); wall: perf_counter")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    ap.add_argument("--bare-ops", action="store_true",
                    help="instead: every operation of Diag/KFAC/EKFAC on W1/W2 against the bare "
                         "tensor expression it needs (and upstream with --upstream-python): "
                         "benchmarks/ops.py")
    ap.add_argument("--upstream-python", default=None, help="with --bare-ops (see ops.py)")
    return ap.parse_args(argv)


def _split(s, allowed, what):
    items = [x.strip() for x in s.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad:
        raise SystemExit(f"unknown {what}: {', '.join(bad)}; choose from {', '.join(allowed)}")
    return items


def main(argv=None):
    args = parse_args(argv)
    if args.bare_ops:
        import ops
        extra = ["--repeats", str(args.repeats or 5)]
        if args.workloads:
            extra += ["--workloads", args.workloads]
        if args.upstream_python:
            extra += ["--upstream-python", args.upstream_python]
        if args.json:
            extra += ["--json", args.json]
        return ops.main(extra)
    global _clock
    _clock = CLOCK[args.clock]
    torch.set_num_threads(1)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    workloads = list(WORKLOADS) if args.all or not args.workloads else \
        _split(args.workloads, list(WORKLOADS), "workload")
    reps = list(ALL_REPS) if args.all or not args.reps else _split(args.reps, ALL_REPS, "representation")
    variants = _split(args.variants, ["FIM", "MC", "EF", "GGN", "GGNgen", "LL"],
                      "variant")
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))

    meta = {
        "torch": torch.__version__,
        "nngeometry": getattr(nngeometry, "__version__", "?"),
        "nngeometry_path": os.path.dirname(getattr(nngeometry, "__file__", "") or ""),
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "quick": args.quick,
        "clock": "process CPU time" if args.clock == "cpu" else "wall time",
        "dtype": "float32",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
                   f"python {platform.python_version()}",
        "memory_method": "torch.profiler(profile_memory=True): peak of the CPU allocator's net "
                         "allocations during the call",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    results = {}
    for wname in workloads:
        w = WORKLOADS[wname]
        chosen = [r for r in w.reps if r in reps]
        try:
            results[wname] = run_workload(w, chosen, variants, repeats, args.quick,
                                          not args.no_memory, log, n=args.n)
        except Exception as exc:  # noqa: BLE001  (e.g. the floor itself fails)
            log(traceback.format_exc())
            results[wname] = {"description": w.description, "status": "n/a",
                              "reason": reason_of(exc)}
    ok = {k: v for k, v in results.items() if "floor" in v}
    targets = evaluate_targets(ok)
    print_table(meta, ok, targets)
    for k, v in results.items():
        if k not in ok:
            print(f"   {k}: n/a ({v['reason']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "workloads": results, "targets": targets}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
