"""Tied weights with LayerCollection.from_model(model) (tied_weights='sum'): the second module's
use of the parameter is added to the layer's per-example gradients (exact matrices)."""
import pytest
import torch
from torch import nn

from brute import fim_dense
from nngeometry import FIM, EmpiricalFisher
from nngeometry.backend.passes import ParameterUseError
from nngeometry.layercollection import LayerCollection
from nngeometry.object import (PMatBlockDiag, PMatDense, PMatDiag, PMatEKFAC, PMatImplicit,
                               PMatKFAC, PMatLowRank, PVector)

TOL = dict(atol=1e-10, rtol=1e-8)


class Tied(nn.Module):
    def __init__(self, V=7, d=5):
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.mid = nn.Linear(d, d)
        self.head = nn.Linear(d, V, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(torch.tanh(self.mid(self.emb(x))))


def setup():
    torch.manual_seed(0)
    return Tied().double().eval(), torch.randint(0, 7, (6,))


def test_tied_sum_is_exact_in_every_hooks_representation():
    m, x = setup()
    lc = LayerCollection.from_model(m, tied_weights="sum")
    assert lc.layer_ids() == ["emb", "mid"] and [n for n, _ in lc.tied["emb"]] == ["head"]
    ref = fim_dense(m, x, layer_collection=lc)  # functional_call sees both uses
    torch.testing.assert_close(FIM(m, (x,), PMatDense, layer_collection=lc).to_torch(), ref,
                               **TOL)
    torch.testing.assert_close(FIM(m, (x,), PMatLowRank, layer_collection=lc).to_torch(), ref,
                               **TOL)
    torch.testing.assert_close(FIM(m, (x,), PMatDiag, layer_collection=lc).get_diag(),
                               torch.diag(ref), **TOL)
    bd = FIM(m, (x,), PMatBlockDiag, layer_collection=lc).to_torch()
    s = lc.slice("emb")
    torch.testing.assert_close(bd[s, s], ref[s, s], **TOL)
    v = torch.randn(lc.numel(), dtype=torch.float64)
    torch.testing.assert_close(
        FIM(m, (x,), PMatImplicit, layer_collection=lc).mv(PVector(lc, vector_repr=v)).to_torch(),
        ref @ v, **TOL)
    # a sub-collection keeps the tied use
    sub = lc.sub(["emb"])
    torch.testing.assert_close(FIM(m, (x,), PMatDense, layer_collection=sub).to_torch(),
                               ref[s, s], **TOL)
    # KFAC/EKFAC: the tied layer gets its exact diagonal block, the others their KFAC/EKFAC
    sm = lc.slice("mid")
    for rep in (PMatKFAC, PMatEKFAC):
        with pytest.warns(UserWarning, match=r"tied layer\(s\) 'emb'.*PMatMixed"):
            mixed = FIM(m, (x,), rep, layer_collection=lc)
        dense = mixed.to_torch()
        torch.testing.assert_close(dense[s, s], torch.diag(torch.diag(ref)[s]), **TOL)
        assert dense[s, sm].abs().max() == 0
        torch.testing.assert_close(
            dense[sm, sm], FIM(m, (x,), rep, layer_collection=lc.sub(["mid"])).to_torch(), **TOL)
    with pytest.warns(UserWarning, match="tied"):
        only = FIM(m, (x,), PMatKFAC, layer_collection=sub)
    torch.testing.assert_close(only.get_diag(), torch.diag(ref)[s], **TOL)
    # the empirical Fisher too (targets given)
    y = torch.randint(0, 7, (6,))
    assert torch.isfinite(EmpiricalFisher(m, [(x, y)], PMatDiag, layer_collection=lc)
                          .get_diag()).all()


def test_collection_without_the_tied_use_still_refused():
    """The parameter-use check remembers collections with their tied uses: a verified tied
    collection does not let the same layers without the tied use through."""
    m, x = setup()
    lc = LayerCollection.from_model(m, tied_weights="sum")
    FIM(m, (x,), PMatDiag, layer_collection=lc)
    plain = LayerCollection()
    plain.add_layer_from_model(m, m.emb)
    plain.add_layer_from_model(m, m.mid)
    with pytest.raises(ParameterUseError, match="'emb'"):
        FIM(m, (x,), PMatDiag, layer_collection=plain)
    with pytest.raises(ValueError, match="tied_weights must be"):
        LayerCollection.from_model(m, tied_weights="yes")


def test_hessian_of_a_tied_model_by_default():
    """The default collection holds the tied parameter once; the Hessian (torch.func) sees both
    of its uses."""
    import torch.nn.functional as F
    from torch.func import functional_call

    from nngeometry import Hessian

    m, x = setup()
    y = torch.randint(0, 7, (6,))
    H = Hessian(m, [(x, y)], PMatDense).to_torch()
    names = ["emb.weight", "mid.weight", "mid.bias"]
    allp = dict(m.named_parameters())

    def loss(flat):
        parts, i = {}, 0
        for k in names:
            parts[k] = flat[i:i + allp[k].numel()].view_as(allp[k])
            i += allp[k].numel()
        out = functional_call(m, {**allp, **parts}, (x,))  # ties lm head and embedding
        return F.cross_entropy(out, y, reduction="sum")
    flat = torch.cat([allp[k].detach().reshape(-1) for k in names])
    torch.testing.assert_close(H, torch.func.hessian(loss)(flat), **TOL)


def test_tied_sum_quasidiag_jacobian_gram_and_mixed_operations():
    """QuasiDiag, the Jacobian and the Gram matrix of the default collection of a tied model
    against brute force; the PMatMixed of KFAC/EKFAC: mv, vTMv, trace agree with its dense
    matrix (EKFAC's solve too; KFAC's solve damps its factors, see its docstring)."""
    import warnings

    from brute import per_example_jacobian
    from nngeometry import GramMatrix, Jacobian
    from nngeometry.object import PMatQuasiDiag

    m, x = setup()
    lc = LayerCollection.from_model(m)
    ref = fim_dense(m, x, layer_collection=lc)
    Q = FIM(m, (x,), PMatQuasiDiag, layer_collection=lc).to_torch()
    torch.testing.assert_close(torch.diag(Q), torch.diag(ref), **TOL)
    nz = Q != 0
    assert nz.sum() > Q.shape[0]
    torch.testing.assert_close(Q[nz], ref[nz], **TOL)
    Jb = per_example_jacobian(m, x, lc)                       # (n, K, P)
    torch.testing.assert_close(Jacobian(m, (x,), layer_collection=lc).to_torch(),
                               Jb.transpose(0, 1), **TOL)
    torch.testing.assert_close(GramMatrix(m, (x,), layer_collection=lc).to_torch(),
                               torch.einsum("ikp,jlp->kilj", Jb, Jb), **TOL)
    v = torch.randn(lc.numel(), dtype=torch.float64)
    pv = PVector(lc, vector_repr=v)
    for rep in (PMatKFAC, PMatEKFAC):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mixed = FIM(m, (x,), rep, layer_collection=lc)
        D = mixed.to_torch()
        torch.testing.assert_close(mixed.mv(pv).to_torch(), D @ v, **TOL)
        torch.testing.assert_close(torch.as_tensor(float(mixed.vTMv(pv)), dtype=D.dtype),
                                   v @ D @ v, **TOL)
        torch.testing.assert_close(torch.as_tensor(float(mixed.trace()), dtype=D.dtype),
                                   torch.trace(D), **TOL)
    eye = torch.eye(lc.numel(), dtype=torch.float64)
    torch.testing.assert_close(mixed.solve(pv, regul=1e-3).to_torch(),
                               torch.linalg.solve(D + 1e-3 * eye, v), atol=1e-7, rtol=1e-7)
