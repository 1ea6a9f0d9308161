"""Every block type's primitives against torch.linalg on its own dense matrix (float64):
products, reductions, eigenvalues, ``matpower(p, damping)``, ``solve``, ``logdet``, for a scalar
and a per-entry damping (exact where the structure allows, ``NotImplementedError`` elsewhere),
gradients with respect to the damping, and the structured sums and scalings."""
import pytest
import torch

from nngeometry.object.pspace._checks import NotPositiveSemiDefiniteError, SingularMatrixError
from nngeometry.object.pspace.blocks import (ArrowInverseBlock, DenseBlock, DiagBlock,
                                             EigenKronBlock, KronBlock, LowRankBlock,
                                             QuasiDiagBlock, ScaledIdentityBlock)

DT = torch.float64


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _spd(n, seed, diag_shift=0.2):
    X = torch.randn(n, n + 2, generator=_g(seed), dtype=DT)
    return X @ X.t() / (n + 2) + diag_shift * torch.eye(n, dtype=DT)


def _pos(shape, seed):
    return 0.3 + torch.rand(shape, generator=_g(seed), dtype=DT)


def make(kind):
    """``(block, entries_ok, powers)``: the block, whether a per-entry damping is exact, and
    the powers ``matpower`` supports with each kind of damping ``{'scalar': ..., 'entries': ...}``."""
    all_p = (1.0, -1.0, 0.5, -0.5, 2.0)
    if kind == "dense":
        return DenseBlock(_spd(6, 1)), {"scalar": all_p, "entries": all_p}
    if kind == "diag":
        return DiagBlock(_pos(6, 2)), {"scalar": all_p, "entries": all_p}
    if kind == "identity":
        return ScaledIdentityBlock(torch.tensor(0.7, dtype=DT), (6,)), \
            {"scalar": all_p, "entries": all_p}
    if kind == "kron":
        return KronBlock(_spd(4, 3), _spd(3, 4)), {"scalar": all_p, "entries": ()}
    if kind == "kron-diagA":
        return KronBlock(_pos(4, 5), _spd(3, 6)), {"scalar": all_p, "entries": ()}
    if kind == "eigen-kron":
        B = KronBlock(_spd(4, 7), _spd(3, 8)).eigen()
        return EigenKronBlock(B.UA, B.UG, _pos((3, 4), 9)), {"scalar": all_p, "entries": ()}
    if kind == "quasidiag":
        a = 1.0 + torch.rand(3, 4, generator=_g(10), dtype=DT)
        c = 0.3 * torch.randn(3, 4, generator=_g(11), dtype=DT)
        s = 1.5 + torch.rand(3, generator=_g(12), dtype=DT)
        return QuasiDiagBlock(a, c, s), {"scalar": (1.0, -1.0), "entries": (1.0, -1.0)}
    if kind == "lowrank":
        return LowRankBlock(torch.randn(2, 6, generator=_g(13), dtype=DT), 0.4), \
            {"scalar": all_p, "entries": (1.0, -1.0)}
    if kind == "lowrank-C-diagalpha":
        C = _spd(3, 14)
        return LowRankBlock(torch.randn(3, 6, generator=_g(15), dtype=DT), _pos(6, 16), C), \
            {"scalar": (1.0, -1.0), "entries": (1.0, -1.0)}
    if kind == "lowrank-pure":
        return LowRankBlock(torch.randn(2, 6, generator=_g(17), dtype=DT)), \
            {"scalar": all_p, "entries": (1.0, -1.0)}
    raise KeyError(kind)


KINDS = ["dense", "diag", "identity", "kron", "kron-diagA", "eigen-kron", "quasidiag", "lowrank",
         "lowrank-C-diagalpha", "lowrank-pure"]


def _dense_power(M, p):
    ev, U = torch.linalg.eigh(M)
    return (U * ev ** p) @ U.t()


def _entries(B, seed=20):
    return 0.1 + torch.rand(B.shape, generator=_g(seed), dtype=DT)


def _damped_dense(B, damping):
    D = B.dense()
    if torch.is_tensor(damping) and damping.dim() > 0:
        return D + torch.diag(damping.reshape(-1))
    return D + damping * torch.eye(D.shape[0], dtype=DT)


@pytest.mark.parametrize("kind", KINDS)
def test_products_and_reductions(kind):
    B, _ = make(kind)
    D = B.dense()
    torch.testing.assert_close(D, D.t())
    V = torch.randn(2, 3, *B.shape, generator=_g(30), dtype=DT)
    flat = V.reshape(2, 3, -1)
    torch.testing.assert_close(B.apply(V).reshape(2, 3, -1), flat @ D)
    torch.testing.assert_close(B.quadratic(V), torch.einsum("abp,pq,abq->ab", flat, D, flat))
    torch.testing.assert_close(B.diag().reshape(-1), torch.diagonal(D))
    torch.testing.assert_close(B.trace(), torch.trace(D))
    torch.testing.assert_close(B.frobenius_sq(), (D * D).sum())
    torch.testing.assert_close(torch.sort(B.eigenvalues().reshape(-1))[0],
                               torch.linalg.eigvalsh(D))
    assert B.numel == D.shape[0]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dkind", ["scalar", "entries"])
def test_functions_of_the_damped_block(kind, dkind):
    B, powers = make(kind)
    damping = 0.3 if dkind == "scalar" else _entries(B)
    V = torch.randn(4, *B.shape, generator=_g(31), dtype=DT)
    flat = V.reshape(4, -1)
    if not powers[dkind]:
        for call in (lambda: B.matpower(-1.0, damping), lambda: B.logdet(damping),
                     lambda: B.solve(V, damping), lambda: B.eigenvalues(damping)):
            with pytest.raises(NotImplementedError, match="per-entry damping"):
                call()
        return
    ref = _damped_dense(B, damping)
    torch.testing.assert_close(B.logdet(damping), torch.logdet(ref))
    torch.testing.assert_close(B.solve(V, damping).reshape(4, -1),
                               torch.linalg.solve(ref, flat.t()).t())
    torch.testing.assert_close(torch.sort(B.eigenvalues(damping).reshape(-1))[0],
                               torch.linalg.eigvalsh(ref))
    for p in powers[dkind]:
        P = B.matpower(p, damping)
        torch.testing.assert_close(P.dense(), _dense_power(ref, p), msg=f"p={p}")
        torch.testing.assert_close(P.apply(V).reshape(4, -1), flat @ _dense_power(ref, p))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dkind", ["scalar", "entries"])
def test_gradient_with_respect_to_the_damping(kind, dkind):
    """``d/dΛ log det(B + Λ) = diag((B + Λ)⁻¹)`` (the trace formula), and the gradient of
    ``vᵀ (B + Λ)⁻¹ v`` against autograd through the dense matrix."""
    B, powers = make(kind)
    if not powers[dkind]:
        return
    base = torch.tensor(0.3, dtype=DT) if dkind == "scalar" else _entries(B)
    lam = base.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(B.logdet(lam), lam)
    inv_diag = torch.diagonal(torch.linalg.inv(_damped_dense(B, base.detach())))
    expected = inv_diag.sum() if dkind == "scalar" else inv_diag.reshape(B.shape)
    torch.testing.assert_close(g, expected)

    v = torch.randn(B.shape, generator=_g(32), dtype=DT)
    lam = base.clone().requires_grad_(True)
    (g,) = torch.autograd.grad((v * B.solve(v, lam)).sum(), lam)
    lam2 = base.clone().requires_grad_(True)
    f = v.reshape(-1)
    (g2,) = torch.autograd.grad(f @ torch.linalg.solve(_damped_dense(B, lam2), f), lam2)
    torch.testing.assert_close(g, g2)


@pytest.mark.parametrize("kind", KINDS)
def test_scaled_and_plus_identity(kind):
    B, _ = make(kind)
    torch.testing.assert_close(B.scaled(-0.5).dense(), -0.5 * B.dense())
    S = B.add_identity(0.25)
    torch.testing.assert_close(S.dense(), B.dense() + 0.25 * torch.eye(B.numel, dtype=DT))


def test_structured_sums():
    d1, d2 = DiagBlock(_pos(6, 40)), DiagBlock(_pos(6, 41))
    assert isinstance(d1.add(d2), DiagBlock)
    torch.testing.assert_close(d1.add(d2).dense(), d1.dense() + d2.dense())
    L1, L2 = make("lowrank")[0], make("lowrank-pure")[0]
    s = L1.add(L2)
    assert isinstance(s, LowRankBlock) and s.J.shape[0] == 4
    torch.testing.assert_close(s.dense(), L1.dense() + L2.dense())
    torch.testing.assert_close(L1.add(d1).dense(), L1.dense() + d1.dense())
    q = make("quasidiag")[0]
    torch.testing.assert_close(q.add(q).dense(), 2 * q.dense())
    e = make("eigen-kron")[0]
    torch.testing.assert_close(e.add(e.scaled(2.0)).dense(), 3 * e.dense())
    k = make("kron")[0]
    with pytest.raises(NotImplementedError, match="no structured form"):
        k.add(make("kron-diagA")[0])
    dense = DenseBlock(_spd(6, 42))
    torch.testing.assert_close(dense.add(d1).dense(), dense.dense() + d1.dense())


def test_arrow_inverse_is_the_inverse():
    q = make("quasidiag")[0]
    inv = q.matpower(-1.0, 0.2)
    assert isinstance(inv, ArrowInverseBlock)
    ref = torch.linalg.inv(q.dense() + 0.2 * torch.eye(q.numel, dtype=DT))
    torch.testing.assert_close(inv.dense(), ref)
    torch.testing.assert_close(inv.diag().reshape(-1), torch.diagonal(ref))
    torch.testing.assert_close(torch.sort(inv.eigenvalues())[0], torch.linalg.eigvalsh(ref))
    torch.testing.assert_close(inv.scaled(3.0).dense(), 3 * ref)


@pytest.mark.parametrize("kind", ["dense", "diag", "identity", "kron", "eigen-kron", "lowrank"])
def test_indefinite_and_singular_refused(kind):
    """The shared errors: a fractional power or logdet of a block that is not PSD after damping,
    a negative power of a singular one; a rank-deficient block with ``p > 0`` is fine."""
    B, _ = make(kind)
    low = float(B.eigenvalues().min())
    with pytest.raises(NotPositiveSemiDefiniteError):
        B.matpower(0.5, -low - 0.2)
    with pytest.raises(NotPositiveSemiDefiniteError):
        B.logdet(-low - 0.2)
    with pytest.raises(SingularMatrixError):
        B.matpower(-1.0, -low)
    ref = _damped_dense(B, -low)
    torch.testing.assert_close(B.matpower(0.5, -low).dense(), _sqrt_psd(ref), atol=1e-7, rtol=0)


def _sqrt_psd(M):
    ev, U = torch.linalg.eigh(M)
    return (U * ev.clamp(min=0).sqrt()) @ U.t()


def test_bad_vector_shape_named():
    from nngeometry.object.pspace.blocks.base import check_shape
    with pytest.raises(ValueError, match=r"\(\.\.\., 3, 4\)"):
        check_shape(torch.zeros(2, 12), (3, 4), "KronBlock.apply")
