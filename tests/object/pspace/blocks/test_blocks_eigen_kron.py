"""The eigen-Kronecker block's primitives against its dense matrix (float64)."""
import pytest
import torch

from nngeometry.object.pspace.blocks import EigenKronBlock

DT = torch.float64


def _orth(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))[0].contiguous()


@pytest.mark.parametrize("diag_A", [False, True], ids=["dense-bases", "identity-A"])
def test_primitives_against_dense(diag_A):
    dG, dA = 3, 4
    UA = dA if diag_A else _orth(dA, 1)
    UG = _orth(dG, 2)
    D = 0.1 + torch.rand(dG, dA, generator=torch.Generator().manual_seed(3), dtype=DT)
    B = EigenKronBlock(UA, UG, D)
    dense = B.dense()
    U = torch.kron(UG, torch.eye(dA, dtype=DT) if diag_A else UA)
    torch.testing.assert_close(dense, (U * D.reshape(-1)) @ U.t())
    V = torch.randn(2, 5, dG, dA, generator=torch.Generator().manual_seed(4), dtype=DT)
    flat = V.reshape(2, 5, -1)
    torch.testing.assert_close(B.apply(V).reshape(2, 5, -1), flat @ dense)
    torch.testing.assert_close(B.quadratic(V), torch.einsum("abp,pq,abq->ab", flat, dense, flat))
    torch.testing.assert_close(B.diagonal().reshape(-1), torch.diagonal(dense))
    torch.testing.assert_close(B.trace(), torch.trace(dense))
    torch.testing.assert_close(B.frobenius_sq(), (dense * dense).sum())
    lam = 0.3
    damped = dense + lam * torch.eye(dG * dA, dtype=DT)
    torch.testing.assert_close(B.logdet(lam), torch.logdet(damped))
    evals, evecs = torch.linalg.eigh(damped)
    for p in (-1.0, 0.5, -0.5):
        ref = (evecs * evals ** p) @ evecs.t()
        torch.testing.assert_close(B.matpower(p, lam).dense(), ref)
        torch.testing.assert_close(B.apply_power(V, p, lam).reshape(2, 5, -1), flat @ ref)
