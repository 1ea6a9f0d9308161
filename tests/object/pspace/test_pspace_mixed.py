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


def test_interleaved_groups_against_brute_force():
    """Groups whose layers are not contiguous in the flat layout (a dense group on the first and
    last layers, with their cross terms; a diagonal group on the middle one): every operation,
    written once from the groups' blocks, against the brute-force Fisher of that structure."""
    from _reps_fixtures import Setup as RepsSetup, check_arithmetic, check_solves, dense_pow
    from nngeometry.object import PMatDense, PMatEye

    s = RepsSetup("mlp", "classif_logits")
    ids = s.lc.layer_ids()
    assert len(ids) == 3
    each = {"dense": s.lc.sub([ids[0], ids[2]]), "diag": s.lc.sub([ids[1]])}
    M = PMatMixed(s.lc, s.generator(), layer_collection_each=each,
                  sub_pmats={"dense": PMatDense, "diag": PMatDiag}, examples=s.loader)
    P = s.lc.numel()
    idx = torch.cat([torch.arange(s.lc.slice(i).start, s.lc.slice(i).stop) for i in
                     (ids[0], ids[2])])
    keep = torch.eye(P, dtype=torch.bool)
    keep[idx.unsqueeze(1), idx.unsqueeze(0)] = True
    D = torch.where(keep, s.dense, torch.zeros_like(s.dense))
    close(M.to_torch(), D, rtol=1e-10)
    check_products(M, D, s)
    close(M.norm(2), torch.linalg.matrix_norm(D, 2), rtol=1e-9)
    check_solves(M, D, s, regul=0.3)
    I = torch.eye(P, dtype=DT)
    close(M.inv(0.3).to_torch(), torch.linalg.inv(D + 0.3 * I), rtol=1e-8)
    close(M.pow(0.5, regul=0.3).to_torch(), dense_pow(D, 0.5, regul=0.3), rtol=1e-8)
    close(M.logdet(0.3), torch.logdet(D + 0.3 * I), rtol=1e-10)
    close(torch.sort(M.eigenvalues(0.3))[0], torch.linalg.eigvalsh(D + 0.3 * I), rtol=1e-9)
    close(M.diag_of_inverse(0.3), torch.diagonal(torch.linalg.inv(D + 0.3 * I)), rtol=1e-8)
    # a per-layer prior reaches each group restricted to its layers
    lams = {lid: 0.2 + 0.1 * i for i, lid in enumerate(ids)}
    lam = torch.cat([torch.full((s.lc[lid].numel(),), lams[lid], dtype=DT) for lid in ids])
    v = s.vec()
    close(M.solve(v, regul=lams).get_flat_representation(),
          torch.linalg.solve(D + torch.diag(lam), v.get_flat_representation()), rtol=1e-8)
    close(M.logdet(lams), torch.logdet(D + torch.diag(lam)), rtol=1e-10)
    check_arithmetic(M, M * 0.5 + PMatEye(s.lc, scaling=torch.tensor(0.2, dtype=DT)), D,
                     0.5 * D + 0.2 * I)
    close((M - PMatEye(s.lc, scaling=torch.tensor(0.2, dtype=DT))).to_torch(), D - 0.2 * I)
    close((-M).to_torch(), -D)
