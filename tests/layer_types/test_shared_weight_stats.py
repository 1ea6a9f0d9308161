"""The diagonal of layers whose weight is shared over positions, called several times, or tied
to another module's, formed by blocks of examples and rows: against brute-force per-example
Jacobians (float64), for block budgets that cut the rows, group examples, or hold everything."""
import pytest
import torch
from torch import nn

from brute import per_example_jacobian
from nngeometry.backend import TorchHooksJacobianBackend
from nngeometry.layer_types import base
from nngeometry.layercollection import LayerCollection

V, D, S, N = 11, 4, 5, 6


class TiedSeq(nn.Module):
    """Tied embedding and head, a Linear called twice on sequences, a Linear called twice on
    (n, d) inputs, and (when transformers is there) a Hugging Face Conv1D on sequences."""

    def __init__(self, conv1d=None, padding_idx=3):
        super().__init__()
        self.emb = nn.Embedding(V, D, padding_idx=padding_idx)
        self.lin = nn.Linear(D, D)
        self.conv = conv1d(D, D) if conv1d is not None else nn.Identity()
        self.pool = nn.Linear(D, D)
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        h = torch.tanh(self.lin(self.emb(ids)))
        h = self.conv(self.lin(h))
        p = self.pool(torch.tanh(self.pool(h.mean(1))))
        return self.head(h + p.unsqueeze(1)).reshape(ids.shape[0], -1)


@pytest.mark.parametrize("budget", [None, 3 * D * 8, 2 * V * D * 8 + 8])
def test_row_chunked_diag_matches_brute_force(monkeypatch, budget):
    tr = pytest.importorskip("transformers.pytorch_utils")
    torch.manual_seed(0)
    model = TiedSeq(tr.Conv1D).double()
    ids = torch.randint(0, V, (N, S))
    ids[0, 1] = 3  # a padding position: no gradient for that row
    ids[1, :] = 5  # one index at every position of an example
    lc = LayerCollection.from_model(model)
    assert "emb" in lc.tied
    if budget is not None:
        monkeypatch.setattr(base, "ROW_CHUNK_BYTES", budget)
    diag = TorchHooksJacobianBackend(model).get_covariance_diag([(ids,)], lc)
    J = per_example_jacobian(model, ids, lc)
    torch.testing.assert_close(diag, (J * J).sum(dim=(0, 1)) / N, rtol=1e-10, atol=1e-12)


def test_tied_kfac_one_pass_equals_groups_built_apart():
    from nngeometry import FIM
    from nngeometry.object import PMatDiag, PMatKFAC, PMatMixed

    torch.manual_seed(1)
    model = TiedSeq().double()
    ids = torch.randint(0, V, (N, S))
    loader = [(ids,)]
    lc = LayerCollection.from_model(model)
    with pytest.warns(UserWarning, match="tied layer.*'emb'"):
        one = FIM(model, loader, PMatKFAC)
    gen = TorchHooksJacobianBackend(model, one.generator.function)
    apart = PMatMixed.from_mapping(lc, gen, PMatKFAC, {"emb": PMatDiag}, examples=loader)
    assert isinstance(one, PMatMixed) and set(one.sub_pmats) == set(apart.sub_pmats)
    torch.testing.assert_close(one.to_torch(), apart.to_torch(), rtol=1e-10, atol=1e-12)
    J = per_example_jacobian(model, ids, lc)
    s = lc.slice("emb")
    # the closed-form Fisher's diagonal of the tied block: Σ_k over the softmax's square root
    p = torch.softmax(model(ids), dim=1)
    Sig = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    ref = torch.einsum("ndp,nde,nep->p", J[..., s], Sig, J[..., s]) / N
    torch.testing.assert_close(one.get_diag()[s], ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("one_pass_bytes", [0, 2 ** 40])
def test_closed_form_mv_one_and_two_passes(monkeypatch, one_pass_bytes):
    from nngeometry import FIM
    from nngeometry.backend import products
    from nngeometry.object import PMatDense, PMatImplicit, PVector

    monkeypatch.setattr(products, "MV_ONE_PASS_BYTES", one_pass_bytes)
    torch.manual_seed(2)
    model = TiedSeq(padding_idx=None).double()
    loader = [(torch.randint(0, V, (N, S)),), (torch.randint(0, V, (N - 2, S)),)]
    lc = LayerCollection.from_model(model)
    M = FIM(model, loader, PMatImplicit)
    ref = FIM(model, loader, PMatDense).to_torch()
    for _ in range(2):  # the first batch of the first product decides for the later ones
        v = torch.randn(lc.numel(), dtype=torch.float64)
        torch.testing.assert_close(M.mv(PVector(lc, vector_repr=v)).to_torch(), ref @ v,
                                   rtol=1e-10, atol=1e-12)
    assert M.generator._mv_two_pass is (one_pass_bytes == 0)


def test_inverse_cdf_draws_by_blocks_of_rows_unchanged(monkeypatch):
    from nngeometry import FIM_MonteCarlo
    from nngeometry.curvature import monte_carlo
    from nngeometry.object import PMatDiag

    torch.manual_seed(3)
    model = nn.Linear(3, 1500).double()  # enough classes for the inverse-CDF sampler
    loader = [(torch.randn(9, 3, dtype=torch.float64), torch.zeros(9, dtype=torch.long))]
    diags = []
    for block in (monte_carlo._CDF_BLOCK_BYTES, 2 * 8 * 1500):  # one block; blocks of 2 rows
        monkeypatch.setattr(monte_carlo, "_CDF_BLOCK_BYTES", block)
        torch.manual_seed(4)
        diags.append(FIM_MonteCarlo(model, loader, PMatDiag).get_diag())
    assert torch.equal(diags[0], diags[1]) and diags[0].abs().sum() > 0
