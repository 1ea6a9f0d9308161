"""Vision networks built here (torchvision is not needed): a ResNet-18-style network (BasicBlocks,
BatchNorm in eval mode, a strided block with a 1x1 downsampling), a small ViT (patch
convolution, class token and position table held as module parameters and broadcast over the
batch, a pre-norm nn.TransformerEncoderLayer) and a ConvNeXt-style block (depthwise
convolution, LayerNorm over channels-last, pointwise MLP, layer-scale parameter). Diag, the
implicit products and a last-layer Laplace against brute force (torch.func per-example
Jacobians, float64); KFAC and EKFAC on the layers that have them."""
import pytest
import torch
from torch import nn

from brute import fim_dense, multinomial_cov, per_example_jacobian
from nngeometry import FIM
from nngeometry.laplace import Laplace
from nngeometry.layercollection import LayerCollection
from nngeometry.object import (PMatDense, PMatDiag, PMatEKFAC, PMatImplicit, PMatKFAC,
                               PMatMixed, PVector)

TOL = dict(atol=1e-10, rtol=1e-8)
N, C = 3, 3
# torch.func falls back to a loop for the fused attention kernels (slower, same numbers)
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return torch.relu(h + (x if self.down is None else self.down(x)))


class ResNet(nn.Module):
    def __init__(self, w=3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(2, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w),
                                  nn.ReLU())
        self.layer1 = BasicBlock(w, w)
        self.layer2 = BasicBlock(w, 2 * w, stride=2)
        self.fc = nn.Linear(2 * w, C)

    def forward(self, x):
        h = self.layer2(self.layer1(self.stem(x)))
        return self.fc(h.mean((2, 3)))


class Table(nn.Module):
    """A learned table shared by the examples (class token, position embeddings): its output
    has batch dimension 1 and is broadcast by the model."""

    def __init__(self, *shape):
        super().__init__()
        self.weight = nn.Parameter(0.1 * torch.randn(1, *shape))

    def forward(self):
        return self.weight


class ViT(nn.Module):
    def __init__(self, d=8, patch=4, image=8):
        super().__init__()
        self.patch = nn.Conv2d(2, d, patch, patch)
        n_tokens = (image // patch) ** 2 + 1
        self.cls = Table(1, d)
        self.pos = Table(n_tokens, d)
        self.block = nn.TransformerEncoderLayer(d, 2, 12, dropout=0.0, batch_first=True,
                                                norm_first=True)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, C)

    def forward(self, x):
        h = self.patch(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls().expand(h.shape[0], -1, -1), h], dim=1) + self.pos()
        return self.head(self.norm(self.block(h))[:, 0])


class LayerScale(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.gamma = nn.Parameter(0.5 + torch.rand(d))

    def forward(self, x):
        return self.gamma * x


class ConvNeXtBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.dw = nn.Conv2d(d, d, 3, padding=1, groups=d)
        self.norm = nn.LayerNorm(d)
        self.pw1 = nn.Linear(d, 2 * d)
        self.pw2 = nn.Linear(2 * d, d)
        self.scale = LayerScale(d)

    def forward(self, x):
        h = self.dw(x).permute(0, 2, 3, 1)  # channels-last
        h = self.scale(self.pw2(nn.functional.gelu(self.pw1(self.norm(h)))))
        return x + h.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self, d=4):
        super().__init__()
        self.stem = nn.Conv2d(2, d, 2, 2)
        self.block = ConvNeXtBlock(d)
        self.head = nn.Linear(d, C)

    def forward(self, x):
        return self.head(self.block(self.stem(x)).mean((2, 3)))


def build(name):
    torch.manual_seed(0)
    m = {"resnet": ResNet, "vit": ViT, "convnext": ConvNeXt}[name]().double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.copy_(0.3 * torch.randn(mod.running_mean.shape, generator=g))
                mod.running_var.copy_(0.5 + torch.rand(mod.running_var.shape, generator=g))
                mod.weight.copy_(1 + 0.3 * torch.randn(mod.weight.shape, generator=g))
    x = torch.randn(N, 2, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=g)
    return m.eval(), x, y


@pytest.fixture(scope="module", params=["resnet", "vit", "convnext"])
def net(request):
    model, x, y = build(request.param)
    lc = LayerCollection.from_model(model)
    return request.param, model, x, y, lc, fim_dense(model, x, layer_collection=lc)


def test_diag_and_implicit_exact(net):
    name, model, x, y, lc, ref = net
    torch.testing.assert_close(FIM(model, (x, y), PMatDiag).get_diag(), torch.diag(ref), **TOL)
    v = torch.randn(lc.numel(), dtype=torch.float64)
    M = FIM(model, (x, y), PMatImplicit)
    torch.testing.assert_close(M.mv(PVector(lc, vector_repr=v)).to_torch(), ref @ v, **TOL)
    torch.testing.assert_close(M.vTMv(PVector(lc, vector_repr=v)), v @ ref @ v, **TOL)


def _kfac_collection(lc):
    """The layers of the collection that have a Kronecker factorisation."""
    return lc.sub([lid for lid, layer in lc.layers.items() if layer.supports_kfac])


def test_kfac_ekfac(net):
    """KFAC and EKFAC on the layers that have them (the depthwise convolution, the learned
    tables and the layer scale have none: PMatMixed gives them their diagonal). With one
    example and no spatial positions, the head's KFAC block is its exact Fisher block."""
    name, model, x, y, lc, ref = net
    sub = _kfac_collection(lc)
    assert "fc" in sub.layer_ids() or "head" in sub.layer_ids()
    head = sub.layer_ids()[-1]
    for rep in (PMatKFAC, PMatEKFAC):
        M = FIM(model, (x, y), rep, layer_collection=sub)
        w = torch.randn(sub.numel(), dtype=torch.float64)
        assert float(M.vTMv(PVector(sub, vector_repr=w))) > 0
        one = FIM(model, (x[:1], y[:1]), rep, layer_collection=lc.sub([head])).to_torch()
        ref1 = fim_dense(model, x[:1], layer_collection=lc.sub([head]))
        torch.testing.assert_close(one, ref1, **TOL)
    if sub.numel() < lc.numel():
        from nngeometry.backend import TorchHooksJacobianBackend
        from nngeometry.backend.model_and_data import default_function
        from nngeometry.curvature import closed_form_function
        gen = TorchHooksJacobianBackend(model, closed_form_function(default_function(model),
                                                                    "classif_logits"))
        others = {lid: PMatDiag for lid in lc.layer_ids() if lid not in sub.layer_ids()}
        mixed = PMatMixed.from_mapping(lc, gen, PMatKFAC, others, examples=(x, y))
        d = mixed.get_diag()
        for lid in others:
            torch.testing.assert_close(d[lc.slice(lid)], torch.diag(ref)[lc.slice(lid)], **TOL)


def test_last_layer_laplace(net):
    """Last-layer Laplace: ``log det (n F_last + λ I)`` exact with PMatDense; KFAC runs."""
    name, model, x, y, lc, ref = net
    last = lc.last_layer()
    prior = 0.7
    la = Laplace(model, "classification", PMatDense, prior_precision=prior,
                 layer_collection=last).fit([(x, y)])
    s = lc.slice(last.layer_ids()[0])
    H = N * ref[s, s] + prior * torch.eye(last.numel(), dtype=torch.float64)
    torch.testing.assert_close(la.posterior_precision_logdet(), torch.logdet(H), **TOL)
    lk = Laplace(model, "classification", PMatKFAC, prior_precision=prior,
                 layer_collection=last).fit([(x, y)])
    assert torch.isfinite(torch.as_tensor(lk.log_marginal_likelihood()))
    probs = lk.predictive(x)
    torch.testing.assert_close(probs.sum(1), torch.ones(N, dtype=torch.float64))
