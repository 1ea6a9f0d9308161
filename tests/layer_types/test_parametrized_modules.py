"""Modules reparametrized with torch.nn.utils.parametrize (weight_norm, spectral_norm,
orthogonal, a user's own): the curvature w.r.t. the original parameters, against brute force
(torch.func per-example Jacobians w.r.t. the originals, float64); the model is left as it was
(power-iteration buffers, training flags)."""
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations as P
from torch.nn.utils import parametrize

from brute import fim_dense
from nngeometry import FIM, EmpiricalFisher
from nngeometry.layercollection import LayerCollection
from nngeometry.object import PMatDense, PMatDiag, PMatImplicit, PMatKFAC, PVector

TOL = dict(atol=1e-10, rtol=1e-8)


class Double(nn.Module):
    def forward(self, b):
        return 2 * b


class Symmetric(nn.Module):
    def forward(self, X):
        return X.triu() + X.triu(1).T


def model():
    torch.manual_seed(0)
    m = nn.Sequential(P.weight_norm(nn.Linear(3, 4)), nn.Tanh(),
                      P.spectral_norm(nn.Linear(4, 4)), nn.Tanh(),
                      P.orthogonal(nn.Linear(4, 4, bias=False)), nn.Tanh(),
                      nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    parametrize.register_parametrization(m[6], "weight", Symmetric())
    return m


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_parametrized_modules_exact_wrt_originals_and_model_unchanged():
    m = model()
    x = torch.randn(5, 3, dtype=torch.float64)
    sn = m[2].parametrizations.weight[0]
    m.train()
    u, v = sn._u.clone(), sn._v.clone()
    lc = LayerCollection.from_model(m)
    assert lc.layer_ids() == ["0", "2", "4", "6", "8"]
    assert lc["0"].param_names() == ["bias", "parametrizations.weight.original0",
                                     "parametrizations.weight.original1"]
    assert lc["4"].param_names() == ["parametrizations.weight.original"]
    dense = FIM(m, (x,), PMatDense).to_torch()
    diag = FIM(m, (x,), PMatDiag).get_diag()
    w = torch.randn(lc.numel(), dtype=torch.float64)
    mv = FIM(m, (x,), PMatImplicit).mv(PVector(lc, vector_repr=w)).to_torch()
    ef = EmpiricalFisher(m, [(x, torch.tensor([0, 1, 2, 0, 1]))], PMatDiag).get_diag()
    # nothing advanced, nothing switched
    assert torch.equal(sn._u, u) and torch.equal(sn._v, v)
    assert m.training and all(mod.training for mod in m.modules())
    # the function computed: the parametrizations in evaluation mode (spectral_norm with its
    # stored vectors), w.r.t. the originals
    m.eval()
    ref = fim_dense(m, x, layer_collection=lc)
    assert torch.equal(sn._u, u)
    torch.testing.assert_close(dense, ref, **TOL)
    torch.testing.assert_close(diag, torch.diag(ref), **TOL)
    torch.testing.assert_close(mv, ref @ w, **TOL)
    assert torch.isfinite(ef).all() and ef.sum() > 0
    with pytest.raises(NotImplementedError, match="'0'.*torch.nn.utils.parametrize"):
        FIM(m, (x,), PMatKFAC)


def test_inside_parametrize_cached_same_matrices():
    """Under ``parametrize.cached()`` every access returns the tensor of the first one; the
    matrices must still be those w.r.t. the originals (the cache is off for the computation,
    and on again after)."""
    from nngeometry import Hessian

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    parametrize.register_parametrization(m[2], "bias", Double())
    P.weight_norm(m[0])
    x = torch.randn(4, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0])
    ref = fim_dense(m, x)
    href = Hessian(m, [(x, y)], PMatDense).to_torch()
    with parametrize.cached():
        torch.testing.assert_close(FIM(m, (x,), PMatDense).to_torch(), ref, **TOL)
        torch.testing.assert_close(Hessian(m, [(x, y)], PMatDense).to_torch(), href, **TOL)
        assert parametrize._cache_enabled == 1
