"""PMatEKFACBlockDiag: EKFAC on the layers with KFAC, exact dense blocks on a grouped
convolution (KFAC refuses it) and on a custom layer type without KFAC."""
import pytest
import torch

from _kfac_helpers import (DT, Setup, block, check_layout_errors, check_pickle, check_products,
                           check_solve_against, close, damped_inv, dense_pow)
from nngeometry.object import PMatEKFAC, PMatEKFACBlockDiag, PMatKFAC


@pytest.fixture(scope="module")
def built():
    s = Setup("odd")
    M = PMatEKFACBlockDiag(s.lc, s.generator(), examples=s.loader)
    return s, M, M.to_torch()


def test_layers_split_as_expected(built):
    s, M, D = built
    assert M.ekfac_layers == ["3"]
    assert sorted(M.dense_layers) == ["0", "4"]


def test_dense_layers_are_exact_blocks(built):
    s, M, D = built
    for lid in ("0", "4"):
        close(block(D, s.lc, lid), block(s.dense, s.lc, lid), rtol=1e-10)
    P = s.lc.numel()
    # cross-layer blocks are zero
    mask = torch.zeros(P, P, dtype=torch.bool)
    for lid in s.lc.layer_ids():
        sl = s.lc.slice(lid)
        mask[sl, sl] = True
    assert D[~mask].abs().max() == 0


def test_ekfac_layer_equals_kfac(built):
    s, M, D = built
    lc = s.lc.sub(["3"])
    K = PMatKFAC(lc, s.generator(), examples=s.loader)
    close(block(D, s.lc, "3"), K.to_torch(), rtol=1e-10)
    E = PMatEKFAC(lc, s.generator(), examples=s.loader)
    close(block(D, s.lc, "3"), E.to_torch(), rtol=1e-10)


def test_operations(built):
    s, M, D = built
    check_products(M, D, s)
    regul = 0.3
    ref = damped_inv(D, regul)
    check_solve_against(M, ref, s, regul=regul)
    close(M.inv(regul).to_torch(), ref, rtol=1e-8)
    assert isinstance(M.inv(regul), PMatEKFACBlockDiag)
    close(M.pow(0.5).to_torch(), dense_pow(D, 0.5), rtol=1e-7)
    close(M.logdet(0.1), torch.logdet(D + 0.1 * torch.eye(D.shape[0], dtype=DT)), rtol=1e-10)
    close((M * 3).to_torch(), 3 * D)
    close((M + M).to_torch(), 2 * D)
    close(M.mm(M).to_torch(), D @ D, rtol=1e-10)
    Dk = M.to_torch(split_weight_bias=False)
    close(M.get_diag(split_weight_bias=False), torch.diagonal(Dk))
    close(block(Dk, s.lc, "0"), block(D, s.lc, "0"), rtol=0)  # dense layers: flat order both ways


def test_update_diag(built):
    s, M0, _ = built
    M = PMatEKFACBlockDiag(s.lc, s.generator(), examples=s.loader)
    M.update_diag(s.loader)
    D = M.to_torch()
    F = s.dense
    # EKFAC layer: the projection of the exact block onto the KFE
    U = M.get_KFE("3")
    sl = s.lc.slice("3")
    close(M.data[1]["3"], torch.diagonal(U.t() @ F[sl, sl] @ U), rtol=1e-10)
    # dense layers, same data and parameters: still the exact blocks
    for lid in ("0", "4"):
        close(block(D, s.lc, lid), block(F, s.lc, lid), rtol=1e-9)
    check_products(M, D, s)


def test_pickle_and_errors(built):
    s, M, D = built
    check_pickle(M, D, s)
    check_layout_errors(M, s)
