"""The engine's backward call (`strategy._grad`): the numbers of ``torch.autograd.grad``,
and no import of torch's symbolic-shapes module (with sympy, seconds) on a fresh process's
first build."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from nngeometry.backend.strategy import _grad


def _graph():
    torch.manual_seed(0)
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    unused = torch.randn(2, dtype=torch.float64, requires_grad=True)
    h = torch.tanh(x @ w)
    return x, w, unused, h, (h * h).sin()


def test_grad_matches_autograd_plain_and_batched():
    x, w, unused, h, out = _graph()
    cot = torch.randn(6, 4, 3, dtype=torch.float64)
    inputs = [x, w, unused, h]
    ref = torch.autograd.grad(out, inputs, cot[0], retain_graph=True, allow_unused=True)
    got = _grad(out, inputs, cot[0], retain_graph=True, allow_unused=True)
    assert got[2] is None and ref[2] is None
    for a, b in zip(got, ref):
        if b is not None:
            assert torch.equal(a, b)
    ref = torch.autograd.grad(out, inputs, cot, retain_graph=True, allow_unused=True,
                              is_grads_batched=True)
    got = _grad(out, inputs, cot, retain_graph=True, allow_unused=True, is_grads_batched=True)
    assert got[2] is None
    for k in range(cot.shape[0]):  # each direction against its own backward
        one = torch.autograd.grad(out, [x, w, h], cot[k], retain_graph=True)
        for a, b, c in zip([got[0], got[1], got[3]], [ref[0], ref[1], ref[3]], one):
            torch.testing.assert_close(a[k], c, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(b[k], c, rtol=1e-12, atol=1e-12)
    # gradient edges as inputs (the engine's layer outputs), and the graph freed at the end
    ref = torch.autograd.grad(out, [h], cot[1], retain_graph=True)[0]
    got = _grad(out, [torch.autograd.graph.get_gradient_edge(h)], cot[1])
    assert torch.equal(got[0], ref)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        _grad(out, [x], cot[1])


def test_grad_refuses_wrong_shapes():
    x, w, unused, h, out = _graph()
    with pytest.raises(RuntimeError, match=r"shape \(3, 4\).*shape \(4, 3\)"):
        _grad(out, [x], torch.ones(3, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="first dimension is the directions"):
        _grad(out, [x], torch.ones(4, 3, dtype=torch.float64), is_grads_batched=True)


FRESH = textwrap.dedent("""
    import sys
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from nngeometry import FIM, FIM_MonteCarlo
    from nngeometry.object import PMatKFAC, PMatDiag, PMatImplicit, PVector
    SYM = "torch.fx.experimental.symbolic_shapes"
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4))
    loader = DataLoader(TensorDataset(torch.randn(6, 2, 4, 4), torch.randint(0, 4, (6,))),
                        batch_size=3)
    FIM(m, loader, PMatKFAC, variant="classif_logits")
    FIM_MonteCarlo(m, loader, PMatDiag, variant="classif_logits")
    FIM(m, loader, PMatImplicit, variant="classif_logits").mv(PVector.from_model(m))
    built = SYM in sys.modules
    x = torch.randn(3, requires_grad=True)  # torch's own call with grad_outputs imports it
    torch.autograd.grad(x * 2, x, torch.ones(3))
    print(built, SYM in sys.modules)
""")


def test_fresh_process_builds_without_symbolic_shapes():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", FRESH], capture_output=True, text=True,
                         env=env, cwd=root, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["False", "True"]
