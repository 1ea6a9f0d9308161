"""Shared fixtures for the tests of the structured representations (Diag, BlockDiag, QuasiDiag,
LowRank, Implicit, Eye): tiny float64 models, seeded data, brute-force dense Fisher, and a
generic check that a representation's operations agree with its own ``to_torch()``."""
import pickle

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nngeometry.backend import TorchHooksJacobianBackend
from nngeometry.backend.model_and_data import default_function
from nngeometry.layercollection import LayerCollection
from nngeometry.object import PFMapDense, PVector, random_pfmap, random_pvector
from nngeometry.curvature import closed_form_function

from brute import fim_dense

DT = torch.float64
N_EXAMPLES = 11  # batches of 4, 4, 3: accumulation over uneven batches is exercised


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5, bias=False), nn.Tanh(),
                         nn.Linear(5, 3)).to(DT)


def cnn():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Conv2d(3, 2, 2, bias=False), nn.Tanh(),
                         nn.Flatten(), nn.Linear(2 * 2 * 2, 3)).to(DT)


def inputs(kind):
    torch.manual_seed(2)
    if kind == "mlp":
        return torch.randn(N_EXAMPLES, 4, dtype=DT)
    return torch.randn(N_EXAMPLES, 2, 5, 5, dtype=DT)


class Setup:
    """A model, its data (tensor and loader), its LayerCollection and the brute-force FIM."""

    def __init__(self, kind, variant):
        self.kind, self.variant = kind, variant
        self.model = mlp() if kind == "mlp" else cnn()
        self.x = inputs(kind)
        self.y = torch.zeros(N_EXAMPLES, dtype=torch.long)
        self.loader = DataLoader(TensorDataset(self.x, self.y), batch_size=4)
        self.lc = LayerCollection.from_model(self.model)
        self.dense = fim_dense(self.model, self.x, variant, self.lc)

    def generator(self):
        return TorchHooksJacobianBackend(
            self.model, closed_form_function(default_function(self.model), self.variant))

    def vec(self, seed=3):
        torch.manual_seed(seed)
        return random_pvector(self.lc, dtype=DT)

    def pfmap(self, seed=4, K=2, n=3):
        torch.manual_seed(seed)
        return random_pfmap(self.lc, K, n, dtype=DT)


SETUPS = [("mlp", "classif_logits"), ("cnn", "classif_logits"), ("mlp", "regression")]


@pytest.fixture(scope="module", params=SETUPS, ids=["-".join(s) for s in SETUPS])
def setup(request):
    return Setup(*request.param)


def close(a, b, scale=None, rtol=1e-9):
    """``|a - b| ≤ rtol · max(scale, max|b|)`` elementwise, with a message."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    assert a.shape == b.shape, f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"
    ref = float(b.abs().max()) if b.numel() else 0.0
    s = max(ref, scale or 0.0, 1e-300)
    err = float((a - b).abs().max()) if a.numel() else 0.0
    assert err <= rtol * s, f"max abs error {err:.3e} > {rtol:.0e} × {s:.3e}"


def check_products(M, D, s):
    """mv, vTMv, mmap, mapTMmap (sum and diag), @, get_diag, trace, norm against ``D``."""
    v = s.vec()
    f = v.get_flat_representation()
    close(M.mv(v).get_flat_representation(), D @ f)
    close((M @ v).get_flat_representation(), D @ f)
    close(M.vTMv(v), f @ D @ f)
    Jm = s.pfmap()
    J = Jm.to_torch()
    close(M.mmap(Jm).to_torch(), J @ D)
    close((M @ Jm).to_torch(), J @ D)
    # mapTMmap: the (K, n) quadratic forms J[k, i] D J[k, i]ᵀ ('diag') and their sum over k
    forms = torch.einsum("kip,pq,kiq->ki", J, D, J)
    close(M.mapTMmap(Jm, reduction="diag"), forms)
    close(M.mapTMmap(Jm, reduction="sum"), forms.sum(dim=0))
    close(M.mapTMmap(Jm), forms.sum(dim=0))  # 'sum' is the default
    with pytest.raises(ValueError, match="reduction"):
        M.mapTMmap(Jm, reduction="mean")
    close(M.get_diag(), torch.diagonal(D))
    close(M.trace(), torch.trace(D))
    close(M.norm(), torch.linalg.norm(D))
    close(M.norm(), torch.linalg.norm(D))
    assert M.size() == (s.lc.numel(), s.lc.numel()) and M.size(0) == s.lc.numel()


def check_solves(M, D, s, regul=0.3, **kw):
    """solve (PVector and PFMap) and inverse/inv with damping ``regul`` against ``D``."""
    P = D.shape[0]
    Dr = D + regul * torch.eye(P, dtype=DT)
    v = s.vec()
    f = v.get_flat_representation()
    close(M.solve(v, regul=regul, **kw).get_flat_representation(), torch.linalg.solve(Dr, f),
          rtol=1e-8)
    close(M.solvePVec(v, regul=regul, **kw).get_flat_representation(), torch.linalg.solve(Dr, f),
          rtol=1e-8)
    J = s.pfmap().to_torch()
    K, n, _ = J.shape
    ref = torch.linalg.solve(Dr, J.reshape(K * n, P).t()).t().reshape(K, n, P)
    close(M.solve(s.pfmap(), regul=regul, **kw).to_torch(), ref, rtol=1e-8)


def check_inverse(M, D, regul=0.3):
    Dr_inv = torch.linalg.inv(D + regul * torch.eye(D.shape[0], dtype=DT))
    close(M.inv(regul=regul).to_torch(), Dr_inv, rtol=1e-8)
    close(M.inv(regul).to_torch(), Dr_inv, rtol=1e-8)


def dense_pow(D, x, regul=0.0):
    evals, evecs = torch.linalg.eigh(D)
    ev = (evals + regul).clamp(min=0) if not float(x).is_integer() else evals + regul
    return (evecs * ev ** x) @ evecs.t()


def check_arithmetic(M, M2, D, D2):
    """``*``, ``/``, negation, ``+``, ``-`` with another matrix of the same kind."""
    close((M * 2.5).to_torch(), 2.5 * D)
    close((2.5 * M).to_torch(), 2.5 * D)
    close((M * torch.tensor(0.5, dtype=DT)).to_torch(), 0.5 * D)
    close((M / 4).to_torch(), D / 4)
    close((M + M2).to_torch(), D + D2)
    close((M - M2).to_torch(), D - D2)


def check_pickle(M, D, s):
    M2 = pickle.loads(pickle.dumps(M))
    assert M2.generator is None
    close(M2.to_torch(), D)
    close(M2.mv(s.vec()).get_flat_representation(), D @ s.vec().get_flat_representation())


def other_layout_vector(s):
    """A PVector and a PFMap on a different LayerCollection (the last layer only)."""
    lc2 = s.lc.last_layer()
    return (PVector(lc2, vector_repr=torch.zeros(lc2.numel(), dtype=DT)),
            PFMapDense(lc2, data=torch.zeros(1, 2, lc2.numel(), dtype=DT)))


def check_layout_errors(M, s):
    v, m = other_layout_vector(s)
    for op in (M.mv, M.vTMv):
        with pytest.raises(ValueError, match="layout"):
            op(v)
    with pytest.raises(ValueError, match="layout"):
        M.solve(v, regul=1.0)
    for op in (M.mmap, M.mapTMmap):
        with pytest.raises(ValueError, match="layout"):
            op(m)
    with pytest.raises(TypeError, match="PVector"):
        M.mv(torch.zeros(s.lc.numel(), dtype=DT))
