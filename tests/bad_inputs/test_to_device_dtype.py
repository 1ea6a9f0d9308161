"""``.to(device / dtype)`` of every representation, PVector, PFMapDense and FMatDense: a moved
copy (the original unchanged) whose to_torch() is the original's in the new dtype, and whose
operations (products, solves: caches recomputed, not reused in the old dtype) are exact in it.
PMatImplicit, which stores nothing, follows its model: another dtype is refused with the fix."""
import functools
import pickle

import pytest
import torch
from torch import nn

from nngeometry import FIM, GramMatrix, Jacobian
from nngeometry.layercollection import LayerCollection
from nngeometry.object import (PMatBlockDiag, PMatDense, PMatDiag, PMatEKFAC,
                               PMatEKFACBlockDiag, PMatEye, PMatImplicit, PMatKFAC, PMatLowRank,
                               PMatMixed, PMatQuasiDiag, PVector)

F32, F64 = torch.float32, torch.float64


def model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    return model, torch.randn(10, 3)


@functools.lru_cache(maxsize=1)
def all_matrices():
    model, x = model_and_data()
    lc = LayerCollection.from_model(model)
    out = {R.__name__: FIM(model, (x,), R) for R in (
        PMatDense, PMatDiag, PMatBlockDiag, PMatKFAC, PMatEKFAC, PMatLowRank, PMatQuasiDiag,
        PMatEKFACBlockDiag)}
    out["PMatEye"] = PMatEye(lc, scaling=torch.tensor(2.0))
    out["PMatEyePlusLowRank"] = out["PMatLowRank"].inv(0.1)
    out["PMatQuasiDiagInverse"] = out["PMatQuasiDiag"].inv(0.1)
    out["PMatMixed"] = FIM(model, (x,), PMatMixed, sub_pmats={"a": PMatKFAC, "b": PMatDiag},
                           layer_map={"0": "a", "2": "b"})
    return model, x, out


#: the representations whose solve is exactly (M + λI)⁻¹ by default (not EKFAC here: its
#: eigenbasis, computed in float32, is orthonormal to float32 precision only, and its solve
#: takes Uᵀ for U⁻¹)
EXACT_SOLVE = {"PMatDense", "PMatDiag", "PMatBlockDiag", "PMatLowRank", "PMatQuasiDiag",
               "PMatEye", "PMatEyePlusLowRank"}


def test_every_representation_to_float64_and_back():
    _, _, mats = all_matrices()
    for name, M in mats.items():
        D32 = M.to_torch()
        if name in EXACT_SOLVE:  # a factorization cached in float32 must not be reused
            M.solve(PVector(M.layer_collection, vector_repr=torch.ones(D32.shape[0])), regul=0.3)
        M64 = M.to(F64)
        assert type(M64) is type(M), name
        D64 = M64.to_torch()
        assert D64.dtype == F64 and M.to_torch().dtype == F32, name  # the original unchanged
        torch.testing.assert_close(D64, D32.double(), rtol=1e-5, atol=1e-6, msg=name)
        # a float32 -> float64 -> float32 round trip is lossless
        assert torch.equal(M64.to(F32).to_torch(), D32), name
        # operations in float64, against the float64 dense matrix
        v = PVector(M64.layer_collection, vector_repr=torch.randn(D64.shape[0], dtype=F64))
        assert M64.layer_collection.dtype == F64  # random_pvector's default follows
        f = v.get_flat_representation()
        torch.testing.assert_close(M64.mv(v).get_flat_representation(), D64 @ f,
                                   rtol=1e-12, atol=1e-13, msg=name)
        torch.testing.assert_close(M64.get_diag(), torch.diag(D64), rtol=1e-12, atol=1e-13)
        if name in EXACT_SOLVE:
            want = torch.linalg.solve(D64 + 0.3 * torch.eye(D64.shape[0], dtype=F64), f)
            got = M64.solve(v, regul=0.3).get_flat_representation()
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=name)
        pickle.loads(pickle.dumps(M64))  # still a plain, picklable matrix


def test_eigendecomposition_recomputed_after_to():
    """An eigendecomposition computed in float32 is not carried into the float64 copy: its
    powers are float64-exact."""
    _, _, mats = all_matrices()
    for name in ("PMatDense", "PMatLowRank", "PMatBlockDiag"):
        M = mats[name]
        M.pow(0.5, regul=0.3)  # computes (and caches) the float32 eigendecomposition
        M64 = M.to(F64)
        D = M64.to_torch()
        e, V = torch.linalg.eigh(D + 0.3 * torch.eye(D.shape[0], dtype=F64))
        want = (V * e ** 0.5) @ V.t()
        torch.testing.assert_close(M64.pow(0.5, regul=0.3).to_torch(), want, rtol=1e-11,
                                   atol=1e-12, msg=name)


def test_kfac_pi_damped_solve_after_to():
    _, _, mats = all_matrices()
    K = mats["PMatKFAC"]
    K64 = K.to(F64)
    v = PVector(K64.layer_collection, vector_repr=torch.randn(K64.size(0), dtype=F64))
    ref = PMatKFAC(K64.layer_collection, data={k: (a.double(), g.double())
                                               for k, (a, g) in K.data.items()})
    torch.testing.assert_close(K64.solve(v, regul=0.3).get_flat_representation(),
                               ref.solve(v, regul=0.3).get_flat_representation(), rtol=0, atol=0)


def test_pvector_and_maps():
    model, x = model_and_data()
    lc = LayerCollection.from_model(model)
    v = PVector.from_model(model)  # views the parameters (dict storage)
    v64 = v.to(F64)
    assert v64.dtype == F64 and v.dtype == F32
    assert torch.equal(v64.get_flat_representation(), v.get_flat_representation().double())
    flat = PVector(lc, vector_repr=torch.randn(lc.numel()))
    f64 = flat.to(torch.zeros((), dtype=F64))  # a tensor's dtype, as Tensor.to
    assert f64.vector_repr is not None and f64.dtype == F64
    assert torch.equal(f64.to(F32).get_flat_representation(), flat.get_flat_representation())
    assert flat.to("cpu").dtype == F32
    with pytest.raises(TypeError, match="floating-point dtype"):
        flat.to(torch.int64)
    J = Jacobian(model, (x,))
    assert J.to(F64).to_torch().dtype == F64
    G = GramMatrix(model, (x,))
    G64 = G.to(F64)
    assert G64.to_torch().dtype == F64 and torch.equal(G64.to_torch(), G.to_torch().double())


def test_implicit_follows_its_model():
    model, x = model_and_data()
    M = FIM(model, (x,), PMatImplicit)
    with pytest.raises(ValueError, match="stores no entries.*Move the model instead"):
        M.to(F64)
    same = M.to("cpu", F32)
    v = PVector(M.layer_collection, vector_repr=torch.randn(M.size(0)))
    torch.testing.assert_close(same.mv(v).get_flat_representation(),
                               M.mv(v).get_flat_representation())
    # the fix the message names: move the model, the matrix follows
    model.double()
    v64 = v.to(F64)
    D = FIM(model, (x,), PMatDense).to_torch()
    torch.testing.assert_close(M.mv(v64).get_flat_representation(),
                               D @ v64.get_flat_representation(), rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_to_gpu_and_back():
    _, _, mats = all_matrices()
    for name, M in mats.items():
        Mg = M.to("cuda", F64)
        Dg = Mg.to_torch()
        assert Dg.is_cuda, name
        v = PVector(Mg.layer_collection, vector_repr=torch.randn(Dg.shape[0], dtype=F64,
                                                                 device="cuda"))
        torch.testing.assert_close(Mg.mv(v).get_flat_representation(),
                                   Dg @ v.get_flat_representation(), rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(Mg.to("cpu").to_torch(), Dg.cpu())
