"""The path of a mislabelled-example detector written against upstream: the last-layer Fisher
``FIM(..., PMatDense)`` scaled by ``N``, the per-example loss gradients ``Jacobian(model,
(inputs, targets), function=..., layer_collection=lc)``, then ``F.solve(J, regul=λ)`` and the
self-influence scores ``J_iᵀ (N F + λI)⁻¹ J_i``, against brute force; and the float32 round-off
that docs/index.md documents (relative to the largest entry, times the condition number for a
solve)."""
import copy

import torch
import torch.nn.functional as Fn
from torch import nn
from torch.func import functional_call, jacrev, vmap
from torch.utils.data import DataLoader, TensorDataset

from brute import fim_dense
from nngeometry import FIM, Jacobian
from nngeometry.layercollection import LayerCollection
from nngeometry.object import PMatDense

EPS32 = torch.finfo(torch.float32).eps
N, D, H, C = 24, 4, 5, 3


def _problem(dtype, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, C)).to(dtype)
    x, y = torch.randn(N, D, dtype=dtype), torch.randint(0, C, (N,))
    return model, x, y


def _ours(model, x, y, regul):
    lc = LayerCollection.from_model(model).last_layer()
    loader = DataLoader(TensorDataset(x, y), batch_size=10)
    F = FIM(model, loader, PMatDense, variant="classif_logits", layer_collection=lc) * N
    J = Jacobian(model, (x, y), layer_collection=lc,
                 function=lambda inp, tgt: Fn.cross_entropy(model(inp), tgt, reduction="none"))
    S = F.solve(J, regul=regul)
    return F.to_torch(), J.to_torch()[0], S.to_torch()[0]


def _brute(model, x, y):
    """float64: ``N F`` of the last layer and the per-example loss gradients ``(N, P)``."""
    m = copy.deepcopy(model).double()
    X = x.double()
    lc = LayerCollection.from_model(m).last_layer()
    NF = N * fim_dense(m, X, layer_collection=lc)
    params = {k: v.detach() for k, v in m.named_parameters()}
    names = ["2.weight", "2.bias"]

    def loss(p, xi, yi):
        out = functional_call(m, {**params, **p}, (xi.unsqueeze(0),))
        return Fn.cross_entropy(out, yi.unsqueeze(0))

    G = vmap(jacrev(loss), (None, 0, 0))({k: params[k] for k in names}, X, y)
    return NF, torch.cat([G[k].reshape(N, -1) for k in names], dim=1)


def test_lastlayer_fim_times_n_jacobian_function_solve_against_brute_force():
    model, x, y = _problem(torch.float64)
    regul = 1e-3
    NF, J, S = _ours(model, x, y, regul)
    NF_b, J_b = _brute(model, x, y)
    torch.testing.assert_close(NF, NF_b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(J, J_b, rtol=1e-10, atol=1e-12)
    P = NF_b.shape[0]
    S_b = torch.linalg.solve(NF_b + regul * torch.eye(P, dtype=NF_b.dtype), J_b.t()).t()
    torch.testing.assert_close(S, S_b, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close((S * J).sum(1), (S_b * J_b).sum(1), rtol=1e-9, atol=1e-12)
    # the softmax Fisher of the last layer is singular: adding the same value to every logit
    # (a weight direction 1 vᵀ, or the bias direction 1) changes no probability, H + 1 null
    # directions; (N F + λI)⁻¹ has a condition number ‖N F‖/λ there
    ev = torch.linalg.eigvalsh(NF_b)
    assert int((ev < 1e-10 * ev.max()).sum()) == H + 1


def test_lastlayer_solve_float32_within_condition_number_round_off():
    model, x, y = _problem(torch.float32, seed=1)
    regul = 1e-2
    NF, J, S = _ours(model, x, y, regul)
    NF_b, J_b = _brute(model, x, y)  # float64 from the same float32 parameters and inputs
    # building the matrix: a few float32 eps relative to its largest entry
    assert (NF.double() - NF_b).abs().max() <= 8 * EPS32 * NF_b.abs().max()
    A = NF_b + regul * torch.eye(NF_b.shape[0], dtype=NF_b.dtype)
    kappa = torch.linalg.cond(A)
    S_b = torch.linalg.solve(A, J_b.t()).t()
    assert 1e2 < kappa < 1e5
    # solving: relative error up to κ·eps (the round-off bound of any float32 solve)
    assert (S.double() - S_b).abs().max() <= kappa * EPS32 * S_b.abs().max()
    # the same bound for a perturbation of float32 size: two float32 solvers summing in
    # different orders can differ by that much, with neither of them wrong
    E = torch.randn(A.shape, dtype=A.dtype, generator=torch.Generator().manual_seed(0))
    A_pert = A + EPS32 * A.abs().max() * (E + E.t()) / 2
    gap = (torch.linalg.solve(A_pert, J_b.t()).t() - S_b).abs().max() / S_b.abs().max()
    assert EPS32 < gap <= kappa * EPS32


def test_float32_fim_within_a_few_eps_of_float64():
    model, x, y = _problem(torch.float32, seed=2)
    loader = DataLoader(TensorDataset(x, y), batch_size=7)
    F = FIM(model, loader, PMatDense, variant="classif_logits").to_torch().double()
    ref = fim_dense(copy.deepcopy(model).double(), x.double())
    assert (F - ref).abs().max() <= 8 * EPS32 * ref.abs().max()
