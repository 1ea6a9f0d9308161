"""Shared helpers for the KFAC / EKFAC / EKFACBlockDiag / Mixed tests: tiny float64 models,
seeded data, brute-force blocks, a layer type without KFAC, and generic checks of a matrix's
operations against its own ``to_torch()``."""
import pickle

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nngeometry.backend import TorchHooksJacobianBackend
from nngeometry.backend.model_and_data import default_function
from nngeometry.layer_types import AbstractLayer, Parameter, register_layer_type
from nngeometry.layercollection import LayerCollection
from nngeometry.object import PFMapDense, PVector, random_pfmap, random_pvector
from nngeometry.curvature import closed_form_function

from brute import fim_dense

DT = torch.float64
N = 9  # loader batches of 4, 4, 1


# ---------------------------------------------------------------------- a layer type without KFAC
class Scale(nn.Module):
    """``y = x * weight`` (elementwise): a layer type with no KFAC maths."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return x * self.weight


@register_layer_type
class ScaleLayer(AbstractLayer):
    module_types = (Scale,)

    def __init__(self, d):
        self.weight = Parameter(d)
        self.bias = None

    @classmethod
    def from_module(cls, module):
        return cls(module.weight.shape[0])

    def per_example_grad(self, module, x, gy):
        return gy * x.unsqueeze(0)


# ---------------------------------------------------------------------- models
def mlp(bias=True):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5, bias=bias), nn.Tanh(), nn.Linear(5, 3, bias=bias)).to(DT)


def cnn(bias=True):
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(2, 3, 3, bias=bias), nn.Tanh(), nn.Flatten(),
                         nn.Linear(3 * 2 * 2, 3)).to(DT)


def odd_model():
    """A grouped convolution (KFAC refuses it), a Linear layer, and a Scale layer (no KFAC)."""
    torch.manual_seed(2)
    return nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Tanh(), nn.Flatten(),
                         nn.Linear(4 * 2 * 2, 3), Scale(3)).to(DT)


def inputs(kind, n=N, seed=3):
    torch.manual_seed(seed)
    if kind.startswith("mlp"):
        return torch.randn(n, 4, dtype=DT)
    return torch.randn(n, 2, 4, 4, dtype=DT)


MODELS = {"mlp": lambda: mlp(True), "mlp_nobias": lambda: mlp(False), "cnn": lambda: cnn(True),
          "cnn_nobias": lambda: cnn(False), "odd": odd_model}


class Setup:
    def __init__(self, kind, variant="classif_logits"):
        self.kind, self.variant = kind, variant
        self.model = MODELS[kind]()
        self.x = inputs(kind)
        self.y = torch.zeros(N, dtype=torch.long)
        self.loader = DataLoader(TensorDataset(self.x, self.y), batch_size=4)
        self.lc = LayerCollection.from_model(self.model)
        self._dense = None

    @property
    def dense(self):
        if self._dense is None:
            self._dense = fim_dense(self.model, self.x, self.variant, self.lc)
        return self._dense

    def generator(self):
        return TorchHooksJacobianBackend(
            self.model, closed_form_function(default_function(self.model), self.variant))

    def vec(self, seed=5):
        torch.manual_seed(seed)
        return random_pvector(self.lc, dtype=DT)

    def pfmap(self, seed=6, K=2, n=3):
        torch.manual_seed(seed)
        return random_pfmap(self.lc, K, n, dtype=DT)


def close(a, b, rtol=1e-10, scale=None):
    """``max|a - b| ≤ rtol · max(scale, max|b|)``."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    assert a.shape == b.shape, f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"
    s = max(float(b.abs().max()) if b.numel() else 0.0, scale or 0.0, 1e-300)
    err = float((a - b).abs().max()) if a.numel() else 0.0
    assert err <= rtol * s, f"max abs error {err:.3e} > {rtol:.0e} × {s:.3e}"


def block(D, lc, lid):
    s = lc.slice(lid)
    return D[s, s]


def dense_pow(D, x, regul=0.0):
    evals, evecs = torch.linalg.eigh(D)
    ev = evals + regul
    if not float(x).is_integer():
        ev = ev.clamp(min=0)
    return (evecs * ev ** x) @ evecs.t()


def damped_inv(D, regul):
    return torch.linalg.inv(D + regul * torch.eye(D.shape[0], dtype=D.dtype))


# ---------------------------------------------------------------------- generic checks
def check_products(M, D, s):
    """mv, @, vTMv, mmap, mapTMmap, get_diag, trace, norms against ``D``."""
    v = s.vec()
    f = v.get_flat_representation()
    close(M.mv(v).get_flat_representation(), D @ f)
    close((M @ v).get_flat_representation(), D @ f)
    close(M.vTMv(v), f @ D @ f)
    Jm = s.pfmap()
    J = Jm.to_torch()
    close(M.mmap(Jm).to_torch(), J @ D)
    # (K, n) quadratic forms J[k,i] D J[k,i]ᵀ, and their sum over k, (n,)
    close(M.mapTMmap(Jm, reduction="diag"), torch.einsum("kip,pq,kiq->ki", J, D, J))
    close(M.mapTMmap(Jm, reduction="sum"), torch.einsum("kip,pq,kiq->i", J, D, J))
    with pytest.raises(ValueError, match="reduction"):
        M.mapTMmap(Jm, reduction="mean")
    close(M.get_diag(), torch.diagonal(D))
    close(M.trace(), torch.trace(D))
    close(M.norm(), torch.linalg.norm(D))
    close(M.norm(), torch.linalg.norm(D))
    P = s.lc.numel()
    assert M.size() == (P, P) and M.size(1) == P


def check_solve_against(M, Dinv, s, **kw):
    """``solve`` on a PVector and a PFMap against the dense inverse ``Dinv``."""
    v = s.vec()
    close(M.solve(v, **kw).get_flat_representation(), Dinv @ v.get_flat_representation(), rtol=1e-8)
    J = s.pfmap().to_torch()
    close(M.solve(s.pfmap(), **kw).to_torch(), J @ Dinv.t(), rtol=1e-8)


def check_pickle(M, D, s):
    M2 = pickle.loads(pickle.dumps(M))
    assert M2.generator is None
    close(M2.to_torch(), D, rtol=1e-14)
    close(M2.mv(s.vec()).get_flat_representation(), D @ s.vec().get_flat_representation())


def check_layout_errors(M, s):
    lc2 = s.lc.last_layer()
    v = PVector(lc2, vector_repr=torch.zeros(lc2.numel(), dtype=DT))
    m = PFMapDense(lc2, data=torch.zeros(1, 2, lc2.numel(), dtype=DT))
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
