"""The tiny models and the representations built on them that the executed table of
docs/representations.md checks (tests/object/pspace/test_representation_table.py), shared with
other tests that need one built representation of each kind."""
import functools

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nngeometry import FIM, FIM_MonteCarlo
from nngeometry.layercollection import LayerCollection
from nngeometry.layers import WeightNorm1d
from nngeometry.object import (PMatBlockDiag, PMatDense, PMatDiag, PMatEKFAC,
                               PMatEKFACBlockDiag, PMatEye, PMatImplicit, PMatKFAC, PMatLowRank,
                               PMatMixed, PMatQuasiDiag, random_pfmap, random_pvector)

from brute import fim_dense

DT = torch.float64
REGUL = 0.3


# ====================================================================== the tiny models
def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=DT)
    return x, DataLoader(TensorDataset(x, torch.zeros(n, dtype=torch.long)), batch_size=4)


def _model(kind):
    torch.manual_seed(0)
    if kind == "mlp":  # a layer with a bias, a layer without
        layers = [nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3, bias=False)]
    else:  # plus a layer type without KFAC (dense block in PMatEKFACBlockDiag)
        layers = [nn.Linear(4, 5), nn.Tanh(), WeightNorm1d(5, 4), nn.Tanh(),
                  nn.Linear(4, 3, bias=False)]
    return nn.Sequential(*layers).to(DT)


class Built:
    """A representation ``M`` built on the first data set, a second one ``M2`` of the same kind
    (other data, Monte-Carlo Fisher), their dense forms, and what the tests need around them."""

    def __init__(self, rep):
        self.rep = rep
        kind = "mlp_wn" if rep == "PMatEKFACBlockDiag" else "mlp"
        self.model = _model(kind)
        self.lc = LayerCollection.from_model(self.model)
        self.x, loader = _data(7, 1)  # batches of 4 and 3
        _, loader2 = _data(6, 2)
        self.P = self.lc.numel()
        ids = self.lc.layer_ids()

        def both(cls, **kw):
            torch.manual_seed(5)
            return (FIM(self.model, loader, cls, **kw),
                    FIM_MonteCarlo(self.model, loader2, cls, trials=5, **kw))

        eye = lambda s: PMatEye(self.lc, scaling=torch.tensor(s, dtype=DT))  # noqa: E731
        simple = {c.__name__: c for c in (PMatDense, PMatDiag, PMatBlockDiag, PMatQuasiDiag,
                                          PMatLowRank, PMatImplicit, PMatKFAC, PMatEKFAC,
                                          PMatEKFACBlockDiag)}
        if rep in simple:
            self.M, self.M2 = both(simple[rep])
        elif rep == "PMatMixed":
            self.M, self.M2 = both(PMatMixed, layer_map={ids[0]: "kfac", ids[1]: "diag"},
                                   sub_pmats={"kfac": PMatKFAC, "diag": PMatDiag})
        elif rep == "PMatEye":
            self.M, self.M2 = eye(0.7), eye(1.3)
        elif rep == "PMatQuasiDiagInverse":
            Q, Q2 = both(PMatQuasiDiag)
            self.M, self.M2 = Q.inverse(REGUL), Q2.inverse(0.5)
        elif rep == "PMatEyePlusLowRank":
            L, L2 = both(PMatLowRank)
            self.M, self.M2 = L.inverse(REGUL), L2 + eye(0.2)
        else:
            raise AssertionError(f"no recipe to build {rep}")
        assert type(self.M).__name__ == rep
        self.D = dense_of(self.M)
        self.D2 = dense_of(self.M2)
        torch.manual_seed(3)
        self.v = random_pvector(self.lc, dtype=DT)
        self.m = random_pfmap(self.lc, 2, 3, dtype=DT)
        self.eye = eye(0.4)

    @functools.cached_property
    def brute(self):
        return fim_dense(self.model, self.x, "classif_logits", self.lc)


def dense_of(M):
    return M.to_torch(allow_dense=True) if isinstance(M, PMatImplicit) else M.to_torch()


@functools.lru_cache(maxsize=None)
def built(rep):
    return Built(rep)
