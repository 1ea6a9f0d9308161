"""KFAC ('expand' and 'reduce') against curvlinops' ``KFACLinearOperator`` (skipped when
curvlinops is not installed): the closed-form Fisher of the mean cross-entropy is curvlinops'
type-2 Fisher, with the weight and the bias in one Kronecker block."""
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nngeometry import FIM
from nngeometry.object import PMatKFAC

curvlinops = pytest.importorskip("curvlinops")

pytestmark = pytest.mark.usefixtures("one_thread")


class _Seq(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.head = nn.Linear(3, 4), nn.Linear(4, 5)

    def forward(self, x):  # (n, T, d) -> (n, C)
        return self.head(torch.tanh(self.lin(x)).mean(dim=1))


def _models():
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(),
                        nn.Linear(3 * 16, 4)).double()
    return {"conv2d": (cnn, torch.randn(6, 2, 4, 4, dtype=torch.float64)),
            "sequence": (_Seq().double(), torch.randn(6, 7, 3, dtype=torch.float64))}


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("name", ["conv2d", "sequence"])
def test_kfac_vs_curvlinops(name, approx):
    model, x = _models()[name]
    y = torch.zeros(x.shape[0], dtype=torch.long)
    loader = DataLoader(TensorDataset(x, y), batch_size=3)
    params = [p for p in model.parameters()]
    op = curvlinops.KFACLinearOperator(
        model, nn.CrossEntropyLoss(), params, [(x[:3], y[:3]), (x[3:], y[3:])],
        fisher_type="type-2", kfac_approx=approx, separate_weight_and_bias=False,
        check_deterministic=False)
    P = sum(p.numel() for p in params)
    ref = op @ torch.eye(P, dtype=torch.float64)
    got = FIM(model, loader, PMatKFAC, kfac_approx=approx).to_torch()
    assert (got - ref).abs().max() <= 1e-10 * ref.abs().max(), (got - ref).abs().max()
