"""No representation but PMatDense allocates a ``P × P`` tensor (unless ``to_torch`` is asked for).

Two checks:

* In this process, on models with ``P ≈ 1600-1900`` (``P²`` is allocatable, about 25 MB): building each
  representation and running its operations under a ``TorchDispatchMode`` spy that records the
  largest storage any aten op produces; it must stay below ``P²/4`` elements, which is also below
  the square of the largest layer (so a representation that formed a layer's dense block on the
  one-big-layer model would be caught). PMatDense and ``to_torch()`` are the positive controls:
  the spy sees their ``P²``.
* In a subprocess limited to a few GiB of address space (``RLIMIT_AS``), on models with
  ``P ≈ 64k`` (``P²`` in float64 = 31 GiB, more than this machine has): every non-dense
  representation is built and runs ``mv``, ``vTMv``, ``solve``, ``get_diag``, ``trace`` and the
  norm; and ``PMatDense`` must refuse with a ``MemoryError`` naming the size before allocating
  anything (an attempted ``P²`` allocation would fail at once under the limit, as a
  ``RuntimeError``, instead of thrashing the machine).
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.data import DataLoader, TensorDataset

from nngeometry import FIM
from nngeometry.layercollection import LayerCollection
from nngeometry.layers import WeightNorm1d
from nngeometry.object import (PMatBlockDiag, PMatDense, PMatDiag, PMatEKFAC, PMatEKFACBlockDiag,
                               PMatEye, PMatImplicit, PMatKFAC, PMatLowRank, PMatMixed,
                               PMatQuasiDiag, random_pfmap, random_pvector)

DT = torch.float64


class LargestStorage(TorchDispatchMode):
    """Records the largest storage (in elements) produced by any aten op while active."""

    def __init__(self):
        super().__init__()
        self.largest, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                try:
                    n = t.untyped_storage().nbytes() // t.element_size()
                except (RuntimeError, NotImplementedError):
                    n = t.numel()
                if n > self.largest:
                    self.largest, self.op = n, str(func)
        return out


pytestmark = pytest.mark.usefixtures("one_thread")


# ====================================================================== models
def one_big_layer(n_in, n_hidden):
    """Almost all parameters in one Linear layer (its block alone is about ``P × P``)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(n_in, n_hidden), nn.Tanh(), nn.Linear(n_hidden, 3)).to(DT), n_in


def many_small_layers(units, width):
    """Many layers of ``width² + width`` parameters; every other one a WeightNorm1d (no KFAC:
    a dense block in PMatEKFACBlockDiag)."""
    torch.manual_seed(0)
    layers = []
    for _ in range(units):
        layers += [nn.Linear(width, width), nn.Tanh(), WeightNorm1d(width, width), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(width, 3)).to(DT), width


def loader_for(n_in, n=4):
    torch.manual_seed(1)
    return DataLoader(TensorDataset(torch.randn(n, n_in, dtype=DT)), batch_size=4)


def build(cls, model, loader):
    lc = LayerCollection.from_model(model)
    if cls is PMatEye:
        return PMatEye(lc, scaling=torch.tensor(2.0, dtype=DT))
    if cls is PMatMixed:
        ids = lc.layer_ids()
        return FIM(model, loader, PMatMixed, layer_map={i: ("big" if i == ids[0] else "rest") for i in ids},
                   sub_pmats={"big": PMatKFAC, "rest": PMatDiag})
    return FIM(model, loader, cls)


def run_ops(M):
    """The operations that must stay linear-ish in memory (those a representation supports)."""
    lc = M.layer_collection
    v = random_pvector(lc, dtype=DT)
    m = random_pfmap(lc, 2, 3, dtype=DT)
    M.mv(v)
    M.vTMv(v)
    M.solve(v, regul=0.1)
    M.solve(m, regul=0.1)
    M.mmap(m)
    M.mapTMmap(m)
    M.get_diag()
    M.trace()
    for op in (M.norm, lambda: M.inv(0.1), lambda: M.logdet(0.1)):
        try:
            op()
        except NotImplementedError:  # e.g. PMatImplicit: documented as unsupported
            pass
        except ValueError as e:
            # PMatQuasiDiag's quasi-diagonal of a PSD matrix can be indefinite, and its
            # log-determinant undefined (det < 0): refused (it was a silent NaN)
            if "det < 0" not in str(e):
                raise
    if isinstance(M, PMatKFAC):
        M.solve(v, regul=0.1, damping="exact")


# ====================================================================== in-process spy
SPY_CASES = [(PMatDiag, "big"), (PMatKFAC, "big"), (PMatEKFAC, "big"), (PMatQuasiDiag, "big"),
             (PMatLowRank, "big"), (PMatImplicit, "big"), (PMatEye, "big"), (PMatMixed, "big"),
             (PMatBlockDiag, "small"), (PMatEKFACBlockDiag, "small"), (PMatQuasiDiag, "small")]


def spy_model(kind):
    return one_big_layer(40, 36) if kind == "big" else many_small_layers(6, 12)


@pytest.mark.parametrize("cls,kind", SPY_CASES, ids=[f"{c.__name__}-{k}" for c, k in SPY_CASES])
def test_no_p_squared_allocation(cls, kind):
    model, n_in = spy_model(kind)
    lc = LayerCollection.from_model(model)
    P = lc.numel()
    biggest_layer = max(layer.numel() for layer in lc.layers.values())
    limit = P * P // 4
    if kind == "big":  # the big layer's dense block would be caught too
        assert biggest_layer ** 2 > limit
    with LargestStorage() as spy:
        M = build(cls, model, loader_for(n_in))
        run_ops(M)
    assert spy.largest < limit, (
        f"{cls.__name__} allocated {spy.largest} elements in {spy.op} (P = {P}, P² = {P * P})")
    # positive control: the spy does see a P × P tensor when one is asked for
    with LargestStorage() as spy:
        D = M.to_torch(allow_dense=True) if cls is PMatImplicit else M.to_torch()
    assert D.shape == (P, P) and spy.largest >= P * P


def test_spy_sees_dense():
    model, n_in = spy_model("big")
    P = LayerCollection.from_model(model).numel()
    with LargestStorage() as spy:
        M = FIM(model, loader_for(n_in), PMatDense)
        M.mv(random_pvector(M.layer_collection, dtype=DT))
    assert spy.largest >= P * P


# ====================================================================== P too large to allocate
CHILD = textwrap.dedent(r"""
    import resource, sys, time
    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import torch
    torch.set_num_threads(1)  # robust timings on a busy machine
    sys.path.insert(0, sys.argv[2])
    from test_memory import (PMatBlockDiag, PMatDense, PMatDiag, PMatEKFAC, PMatEKFACBlockDiag,
                             PMatEye, PMatImplicit, PMatKFAC, PMatLowRank, PMatQuasiDiag, FIM,
                             LayerCollection, build, loader_for, many_small_layers, one_big_layer,
                             random_pvector, DT)

    def ops(M):
        v = random_pvector(M.layer_collection, dtype=DT)
        M.mv(v); M.vTMv(v); M.solve(v, regul=0.1); M.get_diag(); M.trace()
        if not isinstance(M, PMatImplicit):
            M.norm()

    cases = [(one_big_layer(400, 160), [PMatDiag, PMatKFAC, PMatEKFAC, PMatQuasiDiag,
                                        PMatLowRank, PMatImplicit, PMatEye]),
             (many_small_layers(80, 20), [PMatBlockDiag, PMatEKFACBlockDiag])]
    for (model, n_in), classes in cases:
        loader = loader_for(n_in, n=4)
        P = LayerCollection.from_model(model).numel()
        assert P * P * 8 > 30 * 2 ** 30, P  # a P × P float64 matrix: more than 30 GiB
        for cls in classes:
            t = time.time()
            ops(build(cls, model, loader))
            print(f"{cls.__name__} P={P}: {time.time() - t:.2f}s", flush=True)
        try:
            FIM(model, loader, PMatDense)
        except MemoryError as e:
            print("DENSE-REFUSED", P, e, flush=True)
        else:
            print("DENSE-BUILT", P, flush=True)
""")


def test_large_models_in_limited_memory(tmp_path):
    limit = 6 * 2 ** 30
    env = dict(os.environ, MALLOC_ARENA_MAX="2", OMP_NUM_THREADS="1")
    # this module's folder, the tests folder (brute.py, models.py) and the repository root
    here = Path(__file__).resolve().parent
    tests = here.parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(here), str(tests), str(tests.parent),
                                         env.get("PYTHONPATH", "")])
    here = str(here)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    r = subprocess.run([sys.executable, str(script), str(limit), here], capture_output=True,
                       text=True, timeout=120, env=env)
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr[-3000:]}"
    refused = [line for line in r.stdout.splitlines() if line.startswith("DENSE-")]
    assert len(refused) == 2 and all(line.startswith("DENSE-REFUSED") for line in refused), r.stdout
    for line in refused:
        P = line.split()[1]
        assert f"{P} × {P}" in line and "GiB" in line, line  # names the size
        assert "PMatKFAC" in line, line  # and what to use instead
