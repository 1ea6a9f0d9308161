"""Bad inputs give errors that name the problem and the fix."""
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nngeometry import FIM, FIM_MonteCarlo, Jacobian
from nngeometry.backend import TorchHooksJacobianBackend
from nngeometry.layercollection import LayerCollection, UnsupportedLayerError
from nngeometry.object import PFMapDense, PMatDense, PVector, random_pfmap, random_pvector


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def batch(n=6):
    return (torch.randn(n, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64),
            torch.zeros(n, dtype=torch.long))


class WithRNN(nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.encoder = rnn
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        out, _ = self.encoder(x)
        return self.head(out[:, -1])


@pytest.mark.parametrize("rnn", [nn.GRU(4, 5, batch_first=True), nn.LSTM(4, 5, batch_first=True)])
def test_unsupported_layer(rnn):
    model = WithRNN(rnn).double()
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    name = type(rnn).__name__
    pattern = rf"module 'encoder' of type {name} .*ignore_unsupported_layers=True"
    with pytest.raises(UnsupportedLayerError, match=pattern):
        LayerCollection.from_model(model)
    with pytest.raises(UnsupportedLayerError, match=pattern):
        FIM(model, (x, None), PMatDense)
    assert issubclass(UnsupportedLayerError, TypeError)
    # the way out that the message names works: the RNN's parameters are constants
    lc = LayerCollection.from_model(model, ignore_unsupported_layers=True)
    assert lc.layer_ids() == ["head"]
    F = FIM(model, (x, None), PMatDense, layer_collection=lc)
    assert F.size() == (18, 18)
    with pytest.raises(UnsupportedLayerError, match=rf"module 'encoder' of type {name}"):
        LayerCollection().add_layer_from_model(model, model.encoder)


def test_pvector_and_pfmap_layout_mismatch():
    model = mlp()
    F = FIM(model, batch(), PMatDense)
    lc = F.layer_collection
    sub = lc.sub(["2"])
    v = random_pvector(sub, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"PVector's layout does not match the matrix.*18 parameters"
                                         r".*build the vector on the matrix's LayerCollection"):
        F.mv(v)
    with pytest.raises(ValueError, match="PVector's layout does not match"):
        F.vTMv(v)
    with pytest.raises(ValueError, match="PVector's layout does not match"):
        F.solve(v)
    m = random_pfmap(sub, 3, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="PFMap's layout does not match"):
        F.mmap(m)
    with pytest.raises(ValueError, match="PFMap's layout does not match"):
        F.mapTMmap(m)
    with pytest.raises(ValueError, match="PFMap's layout does not match"):
        F.solve(m)
    with pytest.raises(TypeError, match="expected a PVector, got Tensor"):
        F.vTMv(torch.zeros(lc.numel(), dtype=torch.float64))
    # a vector whose layer ids match but whose shapes do not
    with pytest.raises(ValueError, match=r"dict_repr\['2'\] has shapes"):
        PVector(lc, dict_repr={"0": (torch.zeros(5, 4), torch.zeros(5)),
                               "2": (torch.zeros(3, 4), torch.zeros(3))})
    with pytest.raises(ValueError, match="LayerCollection has 43 parameters"):
        PVector(lc, vector_repr=torch.zeros(37))
    # a collection that is not the model's
    bad = LayerCollection.from_model(nn.Sequential(nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, 3)))
    with pytest.raises(ValueError, match=r"module '0' \(Linear\) does not match"):
        FIM(model, batch(), PMatDense, layer_collection=bad)


def test_empty_loader():
    model = mlp()
    empty = DataLoader(TensorDataset(torch.zeros(0, 4, dtype=torch.float64),
                                     torch.zeros(0, dtype=torch.long)), batch_size=4)
    with pytest.raises(ValueError, match="empty loader"):
        FIM(model, empty, PMatDense)
    with pytest.raises(ValueError, match="empty loader"):
        Jacobian(model, empty)
    # all batches dropped
    short = DataLoader(TensorDataset(*batch(3)), batch_size=4, drop_last=True)
    with pytest.raises(ValueError, match="empty loader"):
        FIM(model, short, PMatDense)
    gen = TorchHooksJacobianBackend(model)
    lc = LayerCollection.from_model(model)
    with pytest.raises(ValueError, match="empty loader"):
        gen.implicit_mv(torch.zeros(lc.numel(), dtype=torch.float64), empty, lc)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh])
def test_non_finite_data(bad, act):
    # behind a tanh an Inf input gives finite outputs but NaN gradients: the data are checked
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), act(), nn.Linear(5, 3)).double()
    x, y = batch()
    x[2, 1] = bad
    with pytest.raises(ValueError, match=r"data contain NaN or Inf.*clean"):
        FIM(model, (x, y), PMatDense)
    with pytest.raises(ValueError, match="data contain NaN or Inf"):
        FIM_MonteCarlo(model, (x, y), PMatDense)
    loader = DataLoader(TensorDataset(x, y), batch_size=2)
    with pytest.raises(ValueError, match="data contain NaN or Inf"):
        FIM(model, loader, PMatDense, variant="regression")
    gen = TorchHooksJacobianBackend(model)
    lc = LayerCollection.from_model(model)
    with pytest.raises(ValueError, match="data contain NaN or Inf"):
        gen.implicit_vTMv(torch.ones(lc.numel(), dtype=torch.float64), (x, y), lc)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_outputs(bad):
    # finite data, but a parameter that makes the outputs non-finite
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        model[2].bias[1] = bad
    x, y = batch()
    with pytest.raises(ValueError, match=r"outputs contain NaN or Inf.*parameters"):
        FIM(model, (x, y), PMatDense, variant="regression")
    with pytest.raises(ValueError, match="outputs contain NaN or Inf"):
        FIM_MonteCarlo(model, (x, y), PMatDense)
    gen = TorchHooksJacobianBackend(model)
    lc = LayerCollection.from_model(model)
    with pytest.raises(ValueError, match="outputs contain NaN or Inf"):
        gen.implicit_vTMv(torch.ones(lc.numel(), dtype=torch.float64), (x, y), lc)


def test_unknown_variant():
    model = mlp()
    with pytest.raises(ValueError, match=r"unknown variant 'classif_logit' for FIM; expected one of"
                                         r".*classif_logits.*classif_binary_logits.*regression"):
        FIM(model, batch(), PMatDense, variant="classif_logit")
    with pytest.raises(ValueError, match=r"unknown variant 'classif_binary_logits' for "
                                         r"FIM_MonteCarlo; expected one of.*segmentation_logits"):
        FIM_MonteCarlo(model, batch(), PMatDense, variant="classif_binary_logits")


def test_variant_output_shape_mismatch():
    model = mlp()
    with pytest.raises(ValueError, match="expects one logit per example.*use 'classif_logits'"):
        FIM(model, batch(), PMatDense, variant="classif_binary_logits")
    one = nn.Linear(4, 1).double()
    with pytest.raises(ValueError, match="at least 2 logits.*use 'classif_binary_logits'"):
        FIM(one, batch(), PMatDense, variant="classif_logits")
    with pytest.raises(ValueError, match=r"expects outputs \(n, C, H, W"):
        FIM_MonteCarlo(model, batch(), PMatDense, variant="segmentation_logits")


@pytest.mark.parametrize("trials", [0, -1, 2.5])
def test_bad_trials(trials):
    with pytest.raises(ValueError, match="trials must be a positive integer"):
        FIM_MonteCarlo(mlp(), batch(), PMatDense, trials=trials)


def test_bad_examples_type():
    with pytest.raises(TypeError, match="examples must be a DataLoader or a single mini-batch"):
        FIM(mlp(), 3, PMatDense)


def test_layer_not_called():
    model = mlp()
    lc = LayerCollection.from_model(model)
    with pytest.raises(RuntimeError, match="layer '2' was not called.*remove it from the LayerCollection"):
        FIM(model, batch(), PMatDense, variant="regression", layer_collection=lc,
            function=lambda x, y: torch.tanh(model[0](x)))


def test_pfmap_without_layer_collection():
    with pytest.raises(ValueError, match="needs a LayerCollection"):
        PFMapDense(None, data=torch.zeros(1, 1, 1))
