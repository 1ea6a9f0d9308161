"""PMatMixed: KFAC on some layers and Diag on the others equals the two built separately; every
operation against its own dense form; grouping errors."""
import pytest
import torch

from _kfac_helpers import (DT, Setup, check_layout_errors, check_pickle, check_solve_against,
                           close, damped_inv)
from _reps_fixtures import check_products
from nngeometry.metrics import FIM
from nngeometry.object import PMatDiag, PMatKFAC, PMatMixed, PVector


@pytest.fixture(scope="module", params=["mlp", "cnn"])
def built(request):
    s = Setup(request.param)
    first, last = s.lc.layer_ids()[0], s.lc.layer_ids()[-1]
    each = {"kfac": s.lc.sub([first]), "diag": s.lc.sub([last])}
    M = PMatMixed(s.lc, s.generator(), layer_collection_each=each,
                  sub_pmats={"kfac": PMatKFAC, "diag": PMatDiag}, examples=s.loader)
    Kf = PMatKFAC(each["kfac"], s.generator(), examples=s.loader)
    Dg = PMatDiag(each["diag"], s.generator(), examples=s.loader)
    return s, M, M.to_torch(), Kf, Dg


def _assembled(s, Kf, Dg):
    P = s.lc.numel()
    out = torch.zeros(P, P, dtype=DT)
    for sub in (Kf, Dg):
        for lid in sub.layer_collection.layer_ids():
            out[s.lc.slice(lid), s.lc.slice(lid)] = \
                sub.to_torch()[sub.layer_collection.slice(lid), sub.layer_collection.slice(lid)]
    return out


def test_equals_parts_built_separately(built):
    s, M, D, Kf, Dg = built
    close(D, _assembled(s, Kf, Dg), rtol=1e-12)
    v = s.vec()
    mv = M.mv(v)
    for sub in (Kf, Dg):
        close(mv.restrict(sub.layer_collection).get_flat_representation(),
              sub.mv(v.restrict(sub.layer_collection)).get_flat_representation(), rtol=1e-12)
    close(M.vTMv(v), Kf.vTMv(v.restrict(Kf.layer_collection)) + Dg.vTMv(v.restrict(Dg.layer_collection)),
          rtol=1e-12)
    # through FIM with a layer_map, and from built matrices
    layer_map = {lid: ("kfac" if lid in Kf.layer_collection else "diag") for lid in s.lc.layer_ids()}
    M2 = FIM(s.model, s.loader, PMatMixed, variant=s.variant, layer_map=layer_map,
             sub_pmats={"kfac": PMatKFAC, "diag": PMatDiag})
    close(M2.to_torch(), D, rtol=1e-12)
    M3 = PMatMixed(s.lc, None, sub_pmats={"kfac": Kf, "diag": Dg})
    close(M3.to_torch(), D, rtol=0)
    assert M3.layer_map == layer_map


def test_operations(built):
    s, M, D, Kf, Dg = built
    check_products(M, D, s)
    assert len(s.lc.layer_ids()) == 2  # first layer: KFAC group, second: Diag group
    close(M.get_diag(), torch.cat([Kf.get_diag(), Dg.get_diag()]), rtol=1e-12)
    regul = 0.3
    # exact damping in the KFAC group: the whole solve is (D + λI)⁻¹
    check_solve_against(M, damped_inv(D, regul), s, regul=regul, damping="exact")
    close(M.inv(regul, damping="exact").to_torch(), damped_inv(D, regul), rtol=1e-8)
    close(M.logdet(0.1), torch.logdet(D + 0.1 * torch.eye(D.shape[0], dtype=DT)), rtol=1e-10)
    # π-damping (default) in the KFAC group, exact in the Diag group
    Pi = M.inv(regul)
    close(Pi.to_torch(), _assembled(s, Kf.inv(regul), Dg.inv(regul)), rtol=1e-12)
    check_solve_against(M, Pi.to_torch(), s, regul=regul)
    close(M.pow(2).to_torch(), D @ D, rtol=1e-10)
    close((M * 2).to_torch(), 2 * D)
    close((M + M).to_torch(), 2 * D)
    close((M - 2 * M).to_torch(), -D)
    close(M.mm(M).to_torch(), D @ D, rtol=1e-10)


def test_pickle_and_errors(built):
    s, M, D, Kf, Dg = built
    check_pickle(M, D, s)
    check_layout_errors(M, s)
    lc = s.lc
    first, last = lc.layer_ids()[0], lc.layer_ids()[-1]
    with pytest.raises(ValueError, match="belong to no group"):
        PMatMixed(lc, None, layer_collection_each={"a": lc.sub([first])}, sub_pmats={"a": Kf})
    with pytest.raises(ValueError, match="no group"):
        PMatMixed(lc, s.generator(), layer_map={first: "a"}, sub_pmats={"a": PMatKFAC},
                  examples=s.loader)
    with pytest.raises(ValueError, match="two groups"):
        PMatMixed(lc, None, layer_collection_each={"a": lc.sub([first]), "b": lc},
                  sub_pmats={"a": Kf, "b": Dg})
    with pytest.raises(ValueError, match="needs examples"):
        PMatMixed(lc, s.generator(), layer_collection_each=M.layer_collection_each,
                  sub_pmats={"kfac": PMatKFAC, "diag": Dg})
    with pytest.raises(ValueError, match="built on layers"):
        PMatMixed(lc, None, layer_collection_each=M.layer_collection_each,
                  sub_pmats={"kfac": Dg, "diag": Kf})
    other = PMatMixed(lc, None, sub_pmats={"all": PMatDiag(lc, s.generator(), examples=s.loader)})
    with pytest.raises(NotImplementedError, match="differently"):
        M + other


def test_pvector_restrict_concat(built):
    s, M, D, Kf, Dg = built
    v = s.vec()
    parts = [v.restrict(Dg.layer_collection), v.restrict(Kf.layer_collection)]
    w = PVector.concat(s.lc, parts)
    close(w.get_flat_representation(), v.get_flat_representation(), rtol=0)
    with pytest.raises(ValueError, match="no part covers"):
        PVector.concat(s.lc, parts[:1])
    with pytest.raises(ValueError, match="two of the parts"):
        PVector.concat(s.lc, parts + parts[:1])
