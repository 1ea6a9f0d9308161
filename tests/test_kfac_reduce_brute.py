"""KFAC-reduce against its definition, computed by brute force (torch.func, float64).

For a layer whose weight is shared over ``S`` positions (a convolution's output locations, a
Linear layer applied to ``(n, T, d)`` sequences), with ``ã_i`` the mean over positions of example
``i``'s bias-augmented inputs (patches) and ``Ĵ_i = Σ_s ∂f(x_i)/∂y_s`` the Jacobian of the outputs
w.r.t. the layer's output summed over positions, the closed-form Fisher's reduce factors are
``A = (1/n) Σ_i ã_i ã_iᵀ`` and ``G = (1/n) Σ_i Ĵ_iᵀ Σ_i Ĵ_i`` (``Σ_i`` the softmax covariance),
and the block is ``kron(G, A)`` in the ``[W | b]`` layout (the √K split between the factors does
not change it)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jacrev, vmap
from torch.utils.data import DataLoader, TensorDataset

from brute import multinomial_cov
from nngeometry import FIM
from nngeometry.layercollection import LayerCollection
from nngeometry.object import PMatEKFAC, PMatKFAC

pytestmark = pytest.mark.usefixtures("one_thread")


def _flat_block(G, A, n_out, D):
    """``kron(G, A)`` (index ``o (D + 1) + j``) in the flat layout ``[W.flatten(), b]``."""
    M = torch.kron(G.contiguous(), A.contiguous())
    perm = torch.empty(n_out * (D + 1), dtype=torch.long)
    for o in range(n_out):
        perm[o * (D + 1):o * (D + 1) + D] = torch.arange(o * D, o * D + D)
        perm[o * (D + 1) + D] = n_out * D + o
    out = torch.empty_like(M)
    out[perm.unsqueeze(1), perm.unsqueeze(0)] = M
    return out


def _check(M, J_hat, logits, a, n_out):
    n = logits.shape[0]
    S = multinomial_cov(logits)
    G = torch.einsum("nko,nkl,nlp->op", J_hat, S, J_hat) / n
    a1 = torch.cat([a, a.new_ones(n, 1)], dim=1)
    A = a1.t() @ a1 / n
    ref = _flat_block(G, A, n_out, a.shape[1])
    got = M.to_torch()
    assert (got - ref).abs().max() <= 1e-10 * ref.abs().max(), (got - ref).abs().max()
    return ref


def _loader(x):
    return DataLoader(TensorDataset(x, torch.zeros(x.shape[0], dtype=torch.long)), batch_size=3)


@pytest.mark.parametrize("rep", [PMatKFAC, PMatEKFAC])
def test_reduce_conv2d_vs_brute(rep):
    torch.manual_seed(0)
    conv, lin = nn.Conv2d(2, 3, 3, padding=1).double(), nn.Linear(3 * 16, 4).double()
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), lin)
    x = torch.randn(5, 2, 4, 4, dtype=torch.float64)
    lc = LayerCollection()
    lc.add_layer_from_model(model, conv)

    def head(xi, yi):
        return lin(torch.tanh(yi).reshape(-1))
    with torch.no_grad():
        y = conv(x)
        logits = model(x)
    J = vmap(jacrev(head, argnums=1))(x, y)  # (n, C, C_out, H, W)
    J_hat = J.sum(dim=(3, 4))
    a = F.unfold(x, 3, padding=1).mean(dim=2)  # mean patch, (n, C_in 3 3)
    M = FIM(model, _loader(x), rep, layer_collection=lc, kfac_approx="reduce")
    ref = _check(M, J_hat, logits, a, 3)
    expand = FIM(model, _loader(x), rep, layer_collection=lc).to_torch()
    assert (expand - ref).abs().max() > 1e-3 * ref.abs().max()  # reduce is another matrix


def test_reduce_sequence_linear_vs_brute():
    torch.manual_seed(1)
    lin, head_lin = nn.Linear(3, 4).double(), nn.Linear(4, 5).double()

    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.head = lin, head_lin

        def forward(self, x):  # (n, T, d) -> (n, C)
            return self.head(torch.tanh(self.lin(x)).mean(dim=1))
    model = Seq()
    x = torch.randn(6, 7, 3, dtype=torch.float64)
    lc = LayerCollection()
    lc.add_layer_from_model(model, model.lin)

    def head(xi, yi):
        return head_lin(torch.tanh(yi).mean(dim=0))
    with torch.no_grad():
        y = lin(x)
        logits = model(x)
    J_hat = vmap(jacrev(head, argnums=1))(x, y).sum(dim=2)  # (n, C, T, out) -> (n, C, out)
    M = FIM(model, _loader(x), PMatKFAC, layer_collection=lc, kfac_approx="reduce")
    ref = _check(M, J_hat, logits, x.mean(dim=1), 4)
    expand = FIM(model, _loader(x), PMatKFAC, layer_collection=lc).to_torch()
    assert (expand - ref).abs().max() > 1e-3 * ref.abs().max()
