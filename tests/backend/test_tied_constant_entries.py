"""An Embedding's ``padding_idx`` row is a constant for backward in the embedding's use only:
with the weight tied to an output layer, the matrix-free (forward-mode / ``torch.func``)
products must still see that row's tangent through the output layer, as the per-example
gradients do."""
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from nngeometry import FIM
from nngeometry.hessian import Hessian
from nngeometry.layercollection import LayerCollection
from nngeometry.object import PMatImplicit, PVector

from brute import fim_dense, param_names

V, D, T = 7, 4, 3


class TiedWithPadding(nn.Module):
    def __init__(self, head_first):
        super().__init__()
        if head_first:  # the collection then registers the tied weight under the output layer
            self.head = nn.Linear(D, V, bias=False)
        self.emb = nn.Embedding(V, D, padding_idx=0)
        self.mix = nn.Linear(D, D)
        if not head_first:
            self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(torch.tanh(self.mix(self.emb(x)))).mean(1)


def _setup(head_first):
    torch.manual_seed(0)
    model = TiedWithPadding(head_first).double()
    x = torch.randint(0, V, (6, T))
    x[:, 0] = 0  # every sequence uses the padding row
    y = torch.randint(0, V, (6,))
    return model, x, y, DataLoader(TensorDataset(x, y), batch_size=3)


def test_fisher_implicit_products_keep_the_output_layers_tangent():
    for head_first in (False, True):
        model, x, y, loader = _setup(head_first)
        lc = LayerCollection.from_model(model)
        ref = fim_dense(model, x, "classif_logits", lc)
        M = FIM(model, loader, PMatImplicit)
        torch.manual_seed(1)
        v = torch.randn(lc.numel(), dtype=torch.float64)
        got = M.mv(PVector(lc, vector_repr=v)).get_flat_representation()
        want = ref @ v
        assert torch.allclose(got, want, rtol=0, atol=1e-12 * want.abs().max()), head_first
        # the padding row's tangent does reach the output layer (the test can fail)
        assert ref[:D, :D].abs().max() > 1e-3


def test_hessian_implicit_products_keep_the_output_layers_tangent():
    model, x, y, loader = _setup(False)
    lc = LayerCollection.from_model(model)
    names = param_names(model, lc)
    params = dict(model.named_parameters())
    shapes = [params[k].shape for k in names]
    sizes = [params[k].numel() for k in names]

    def loss(flat):
        p = {k: t.reshape(s) for k, t, s in zip(names, flat.split(sizes), shapes)}
        out = functional_call(model, {**params, **p}, (x,))
        return nn.functional.cross_entropy(out, y, reduction="sum")

    flat = torch.cat([params[k].detach().reshape(-1) for k in names])
    H = torch.autograd.functional.hessian(loss, flat)
    M = Hessian(model, loader, PMatImplicit)
    torch.manual_seed(2)
    v = torch.randn(lc.numel(), dtype=torch.float64)
    got = M.mv(PVector(lc, vector_repr=v)).get_flat_representation()
    want = H @ v
    assert torch.allclose(got, want, rtol=0, atol=1e-11 * want.abs().max())
