"""PMatQuasiDiag (Ollivier 2015): the diagonal and the per-unit bias rows/columns of the exact
FIM, the exact damped solve through the per-unit Schur complement, and its operations against its
own dense form."""
import pytest
import torch

from _reps_fixtures import (DT, check_inverse, check_layout_errors, check_pickle, check_products,
                            check_solves, close, dense_pow, setup)  # noqa: F401
from nngeometry.metrics import FIM
from nngeometry.object import PMatBlockDiag, PMatEye, PMatQuasiDiag, PMatQuasiDiagInverse


@pytest.fixture(scope="module")
def mats(setup):
    M = FIM(setup.model, setup.loader, PMatQuasiDiag, variant=setup.variant)
    return setup, M, M.to_torch()


def quasidiag_mask(lc):
    """True on the diagonal and on (w_{o,i}, b_o), (b_o, w_{o,i}) of layers with a bias."""
    P = lc.numel()
    mask = torch.eye(P, dtype=torch.bool)
    for lid, layer in lc:
        if layer.bias is None:
            continue
        start = lc.p_pos[lid]
        out = layer.weight.size[0]
        n_in = layer.weight.numel() // out
        for o in range(out):
            b = start + layer.weight.numel() + o
            w = slice(start + o * n_in, start + (o + 1) * n_in)
            mask[w, b] = True
            mask[b, w] = True
    return mask


def test_equals_quasidiag_part_of_dense(mats):
    s, M, D = mats
    mask = quasidiag_mask(s.lc)
    close(D, torch.where(mask, s.dense, torch.zeros_like(s.dense)), rtol=1e-10)
    assert D.dtype == DT
    # the layers without bias are diagonal only; and the couplings are really there
    assert any(c is None for _, c in M.data.values())
    assert all(c.abs().max() > 0 for _, c in M.data.values() if c is not None)
    M2 = PMatQuasiDiag(s.lc, s.generator(), examples=s.loader)
    close(M2.to_torch(), D, rtol=1e-12)
    M3 = PMatQuasiDiag(s.lc, s.generator(), examples=(s.x, s.y))
    close(M3.to_torch(), D, rtol=1e-12)


def test_products(mats):
    s, M, D = mats
    check_products(M, D, s)


def test_solve_is_exact_damped_inverse(mats):
    s, M, D = mats
    check_solves(M, D, s, regul=0.3)
    check_solves(M, D, s, regul=1e-3)
    with pytest.raises(ValueError, match="solve"):
        M.solve(s.vec(), regul=1.0, solve="cholesky")


def test_inverse(mats):
    s, M, D = mats
    check_inverse(M, D, regul=0.3)
    Minv = M.inv(regul=0.05)
    assert isinstance(Minv, PMatQuasiDiagInverse)
    Dinv = torch.linalg.inv(D + 0.05 * torch.eye(D.shape[0], dtype=DT))
    # the inverse's own operations agree with its dense form
    check_products(Minv, Minv.to_torch(), s)
    close(Minv.to_torch(), Dinv, rtol=1e-8)
    close((Minv * 3.0).to_torch(), 3.0 * Dinv, rtol=1e-8)
    close(M.pow(-1, regul=0.05).to_torch(), Dinv, rtol=1e-8)
    # M (M + λI)⁻¹ v + λ (M + λI)⁻¹ v = v
    v = s.vec()
    w = Minv.mv(v)
    close((M.mv(w) + w * 0.05).get_flat_representation(), v.get_flat_representation(), rtol=1e-9)


def test_pow_logdet_and_unsupported(mats):
    s, M, D = mats
    I = torch.eye(D.shape[0], dtype=DT)
    close(M.pow(1, regul=0.2).to_torch(), D + 0.2 * I)
    close(M.logdet(regul=0.2), torch.logdet(D + 0.2 * I))
    # other powers are dense per unit: a PMatBlockDiag, exact
    R = M.pow(-0.5, regul=0.2)
    assert isinstance(R, PMatBlockDiag)
    close(R.to_torch(), dense_pow(D, -0.5, regul=0.2))
    with pytest.raises(NotImplementedError, match="mv/mmap"):
        M.mm(M)


def test_arithmetic(mats):
    s, M, D = mats
    M2 = M * 0.5 + PMatEye(s.lc, scaling=torch.tensor(0.3, dtype=DT))
    D2 = 0.5 * D + 0.3 * torch.eye(D.shape[0], dtype=DT)
    close(M2.to_torch(), D2)
    close((M + M2).to_torch(), D + D2)
    close((M - M2).to_torch(), D - D2)
    close((M / 4).to_torch(), D / 4)
    close((-M).to_torch(), -D)
    E = PMatEye(s.lc, scaling=torch.tensor(0.7, dtype=DT))
    close((E + M).to_torch(), D + E.to_torch())
    close((M - E).to_torch(), D - E.to_torch())
    with pytest.raises(NotImplementedError, match="PMatBlockDiag"):
        M + PMatBlockDiag(s.lc, None, data={lid: torch.zeros(l.numel(), l.numel(), dtype=DT)
                                           for lid, l in s.lc})


def test_pickle_and_layout(mats):
    s, M, D = mats
    check_pickle(M, D, s)
    check_layout_errors(M, s)


def test_inverse_is_a_container_of_blocks(mats):
    """The inverse's solves, log-determinant, diagonal of the inverse and eigenvalues (damped:
    Sherman-Morrison and the determinant lemma; undamped: its arrowheads) against the dense
    ``(D + λI)⁻¹``, with ``D + λI`` positive definite (a quasi-diagonal need not be)."""
    s, M, D = mats
    I = torch.eye(D.shape[0], dtype=DT)
    lam = 0.05 + max(0.0, -float(torch.linalg.eigvalsh(D).min()))
    assert float(torch.linalg.eigvalsh(D + lam * I).min()) > 0
    Minv = M.inv(regul=lam)
    Dinv = torch.linalg.inv(D + lam * I)
    v = s.vec()
    f = v.get_flat_representation()
    # undamped: the arrowheads it came from
    close(Minv.solve(v, regul=0.0).get_flat_representation(), (D + lam * I) @ f, rtol=1e-9)
    back = Minv.inv(regul=0.0)
    assert isinstance(back, PMatQuasiDiag)
    close(back.to_torch(), D + lam * I, rtol=1e-9)
    close(Minv.pow(-1).to_torch(), D + lam * I, rtol=1e-9)
    close(Minv.pow(1).to_torch(), Dinv, rtol=1e-12)
    close(Minv.logdet(), -torch.linalg.slogdet(D + lam * I)[1], rtol=1e-9)
    close(Minv.diag_of_inverse(regul=0.0), torch.diagonal(D) + lam, rtol=1e-9)
    # damped, by a scalar and per layer
    lams = {lid: 0.2 + 0.1 * i for i, lid in enumerate(s.lc.layer_ids())}
    flat = torch.cat([torch.full((s.lc[lid].numel(),), lams[lid], dtype=DT)
                      for lid in s.lc.layer_ids()])
    for regul, lam in ((0.2, torch.full_like(f, 0.2)), (lams, flat)):
        A = Dinv + torch.diag(lam)
        close(Minv.solve(v, regul=regul).get_flat_representation(), torch.linalg.solve(A, f),
              rtol=1e-8)
        close(Minv.logdet(regul=regul), torch.linalg.slogdet(A)[1], rtol=1e-9)
        close(Minv.diag_of_inverse(regul=regul), torch.diagonal(torch.linalg.inv(A)), rtol=1e-8)
    m = s.pfmap()
    J = m.to_torch()
    close(Minv.solve(m, regul=0.2).to_torch(),
          J @ torch.linalg.inv(Dinv + 0.2 * I), rtol=1e-8)
    close(torch.sort(Minv.eigenvalues(regul=0.2))[0], torch.linalg.eigvalsh(Dinv + 0.2 * I),
          rtol=1e-9)
    # forms no representation stores: refused, naming what to use
    with pytest.raises(NotImplementedError, match=r"use solve\(\)"):
        Minv.inv(regul=0.2)
    with pytest.raises(NotImplementedError, match=r"use solve\(\)"):
        Minv + PMatEye(s.lc, scaling=torch.tensor(0.3, dtype=DT))
    with pytest.raises(NotImplementedError, match="use solve"):
        Minv.pow(0.5)
