"""The path of ``FIM(model, loader, PMatKFAC)`` and ``.solve(v, regul)`` on a plain MLP (see
benchmarks/call_path.py): the machinery that does nothing for such a model (data parallelism,
parametrizations, positions and class axes, tied layers, priors) is not entered, and the number
of functions entered stays within the bounds of docs/architecture.md."""
import importlib.util
import os

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nngeometry import FIM
from nngeometry.object import PMatKFAC, PVector

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _call_path():
    spec = importlib.util.spec_from_file_location(
        "call_path", os.path.join(ROOT, "benchmarks", "call_path.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plain_mlp_path_skips_what_does_not_apply():
    traced = _call_path().traced
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    loader = DataLoader(TensorDataset(torch.randn(16, 5), torch.randint(0, 3, (16,))),
                        batch_size=8)
    v = PVector.from_model(model)
    FIM(model, loader, PMatKFAC).solve(v, 1e-3)  # imports and first-call caches
    M, build = traced(lambda: FIM(model, loader, PMatKFAC), inner=False)
    x, solve = traced(lambda: M.solve(v, 1e-3), inner=False)
    assert torch.isfinite(x.get_flat_representation()).all()

    build_files = {f for f, _ in build}
    for skipped in ("backend/distributed.py", "layer_types/parametrized.py",
                    "curvature/positions.py", "curvature/language_models.py", "object/map.py",
                    "object/pspace/blocks/kron.py"):
        assert os.path.join("nngeometry", skipped) not in build_files, skipped
    assert ("nngeometry/metrics.py", "_tied_kfac") not in build
    assert os.path.join("nngeometry", "object", "pspace", "_prior.py") not in \
        {f for f, _ in solve}
    # the bounds the path was brought under (docs/architecture.md, "One call, file by file")
    assert len(build) <= 144 and len(solve) <= 54
    assert len(build_files) <= 15 and len({f for f, _ in solve}) <= 7
