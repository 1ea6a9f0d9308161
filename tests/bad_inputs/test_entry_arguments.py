"""Arguments of the entry points and of Laplace.fit that used to surface torch's internals:
representation names, a tuple of batches, an empty batch, a model on the meta device, Laplace
targets (missing, float labels, (n, 1), class labels for regression), PMatQuasiDiag.logdet's
det < 0. Each against brute force or the fix its message names."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from brute import fim_dense

from nngeometry import FIM, GGN, Hessian
from nngeometry.laplace import Laplace
from nngeometry.layercollection import LayerCollection
from nngeometry.object import (PMatBlockDiag, PMatDense, PMatDiag, PMatKFAC, PMatLowRank,
                               PMatQuasiDiag)

DT = torch.float64


def data(seed=0, n=6):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    x = torch.randn(n, 3, dtype=DT)
    y = torch.randint(0, 3, (n,))
    return model, x, y


# ---------------------------------------------------------------------- representation names
@pytest.mark.parametrize("name, cls", [("kfac", PMatKFAC), ("KFAC", PMatKFAC),
                                       ("PMatKFAC", PMatKFAC), ("dense", PMatDense),
                                       ("Diag", PMatDiag), ("block_diag", PMatBlockDiag),
                                       ("lowrank", PMatLowRank), ("quasidiag", PMatQuasiDiag)])
def test_representation_by_name(name, cls):
    model, x, _ = data()
    got = FIM(model, (x,), name)
    assert type(got) is cls
    torch.testing.assert_close(got.to_torch(), FIM(model, (x,), cls).to_torch())


def test_representation_name_everywhere_and_refusals():
    model, x, y = data()
    torch.testing.assert_close(FIM(model, (x,), "dense").to_torch(), fim_dense(model, x),
                               rtol=1e-10, atol=1e-12)
    H = Hessian(model, (x, y), "dense").to_torch()
    torch.testing.assert_close(H, Hessian(model, (x, y), PMatDense).to_torch())
    ce = lambda out, t: F.cross_entropy(out, t, reduction="none")  # noqa: E731
    torch.testing.assert_close(GGN(model, (x, y), "diag", ce).get_diag(),
                               GGN(model, (x, y), PMatDiag, ce).get_diag())
    with pytest.raises(ValueError, match="unknown representation 'kfc'.*kfac"):
        FIM(model, (x,), "kfc")
    with pytest.raises(TypeError, match="must be a PMat\\* class .* or its name"):
        FIM(model, (x,), 3)
    lap = Laplace(model, representation="diag").fit([(x, y)])
    assert type(lap.ggn) is PMatDiag
    from nngeometry.object import PMatEKFAC
    from nngeometry.optim import NaturalGradient
    assert NaturalGradient(model, "EKFAC").representation is PMatEKFAC
    assert NaturalGradient(model, "kfac", damping_mode="pi").representation is PMatKFAC


# ---------------------------------------------------------------------- batches
def test_tuple_of_batches_refused_list_accepted():
    model, x, y = data()
    with pytest.raises(ValueError, match=r"tuple of 2 batches.*list \[\(x1, y1\)"):
        FIM(model, ((x[:3], y[:3]), (x[3:], y[3:])), PMatDense)
    got = FIM(model, [(x[:3], y[:3]), (x[3:], y[3:])], PMatDense).to_torch()
    torch.testing.assert_close(got, fim_dense(model, x), rtol=1e-10, atol=1e-12)
    # one mini-batch whose inputs are a tuple (a two-input model) is still one batch
    two = lambda a, b: model(a + b)  # noqa: E731
    got = FIM(model, ((x, x), y), PMatDense, function=lambda xs, t: two(*xs)).to_torch()
    torch.testing.assert_close(got, fim_dense(model, 2 * x), rtol=1e-10, atol=1e-12)
    # inputs and targets both pairs of one shape: refused as a tuple, and the refusal names the
    # list of one batch, which is accepted
    f = lambda xs, ts: two(*xs)  # noqa: E731
    with pytest.raises(ValueError, match=r"list of one batch: \[\(\(x1, x2\), \(t1, t2\)\)\]"):
        FIM(model, ((x, x), (x, x)), PMatDense, function=f)
    got = FIM(model, [((x, x), (x, x))], PMatDense, function=f).to_torch()
    torch.testing.assert_close(got, fim_dense(model, 2 * x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rep", [PMatDense, PMatKFAC])
def test_empty_batch_refused(rep):
    model, x, y = data()
    with pytest.raises(ValueError, match="0 examples.*drop empty batches"):
        FIM(model, [(x, y), (x[:0], y[:0])], rep)
    with pytest.raises(ValueError, match="0 examples"):
        Laplace(model).fit([(x[:0], y[:0])])


def test_meta_model_refused():
    model, x, y = data()
    with pytest.raises(ValueError, match="meta device.*to_empty.*assign=True"):
        FIM(model.to("meta"), (x,), PMatDense)


# ---------------------------------------------------------------------- Laplace targets
def test_laplace_targets():
    model, x, y = data()
    with pytest.raises(ValueError, match="needs the targets.*only inputs.*TensorDataset"):
        Laplace(model).fit([(x,)])
    with pytest.raises(ValueError, match=r"integer class labels.*y\.long\(\)"):
        Laplace(model).fit([(x, y.to(DT))])
    with pytest.raises(ValueError, match=r"class labels must be in \[0, 3\)"):
        Laplace(model).fit([(x, y + 3)])
    with pytest.raises(ValueError, match="look like class labels.*likelihood='classification'"):
        Laplace(model, "regression").fit([(x, y)])
    with pytest.raises(ValueError, match=r"regression' needs targets of the outputs' shape "
                                         r"\(6, 3\)"):
        Laplace(model, "regression").fit([(x, torch.randn(6, 2, dtype=DT))])
    # (n, 1) class labels: one per example, read as (n,); the data term is the summed CE
    lap = Laplace(model, representation=PMatDense).fit([(x, y[:, None])])
    torch.testing.assert_close(lap.loss, F.cross_entropy(model(x), y, reduction="sum").detach())
    # regression: (n, K) targets, data term ½ Σ ||f - y||²
    t = torch.randn(6, 3, dtype=DT)
    reg = Laplace(model, "regression", representation=PMatDense).fit([(x, t)])
    torch.testing.assert_close(reg.loss, 0.5 * ((model(x) - t) ** 2).sum().detach())


# ---------------------------------------------------------------------- QuasiDiag logdet
def _two_layer_quasidiag(s1, s2):
    """Two Linear(2, 1) layers, one unit each: arrowheads [[1, 0.9, 1.0]...], s < Σc²/a gives
    one negative pivot in that layer."""
    model = nn.Sequential(nn.Linear(2, 1), nn.Linear(1, 1)).to(DT)
    lc = LayerCollection.from_model(model)
    l0, l1 = lc.layer_ids()
    d0 = torch.tensor([1.0, 2.0, s1], dtype=DT)
    d1 = torch.tensor([1.5, s2], dtype=DT)
    return PMatQuasiDiag(lc, data={l0: (d0, torch.tensor([[0.9, 1.0]], dtype=DT)),
                                   l1: (d1, torch.tensor([[1.1]], dtype=DT))}), l0, l1


def test_quasidiag_logdet_names_layer_and_uses_whole_determinant():
    Q, l0, l1 = _two_layer_quasidiag(0.2, 5.0)  # one negative pivot, in layer l0
    assert torch.det(Q.to_torch()) < 0
    with pytest.raises(ValueError, match=f"det\\(M \\+ regul·I\\) < 0.*layer\\(s\\) '{l0}' \\(1 negative pivot\\)"
                                         ".*whole matrix det > 0"):
        Q.logdet()
    # one negative pivot in each layer: each block has det < 0, the whole matrix det > 0
    Q2, _, _ = _two_layer_quasidiag(0.2, 0.1)
    D = Q2.to_torch()
    assert torch.det(D) > 0
    torch.testing.assert_close(Q2.logdet(), torch.logdet(D))
    torch.testing.assert_close(Q2.logdet(0.05), torch.logdet(D + 0.05 * torch.eye(5, dtype=DT)))
