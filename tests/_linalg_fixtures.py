"""Small problems shared by the estimator and solver tests (float64)."""
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nngeometry.layercollection import LayerCollection, LinearLayer

DT = torch.float64


def layout(n_in=5, n_out=4):
    """One linear layer of ``n_out · (n_in + 1)`` parameters: a layout for matrices given by
    their data."""
    return LayerCollection([("a", LinearLayer(n_in, n_out))])


def sym(P, seed=0, shift=0.0):
    """A random symmetric (indefinite) ``P × P`` matrix, plus ``shift · I``."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(P, P, generator=g, dtype=DT)
    return A + A.T + shift * torch.eye(P, dtype=DT)


def hessian_problem():
    """``(model, loader)`` of a tanh MLP whose loss Hessian has negative eigenvalues."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, generator=g, dtype=DT)
    y = torch.randint(0, 3, (8,), generator=g)
    return model, DataLoader(TensorDataset(x, y), batch_size=4)
