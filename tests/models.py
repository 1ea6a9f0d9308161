"""Tiny real-world-shaped models for the layer-coverage tests (float64, no downloads).

Each ``make_*`` returns ``(model, inputs)`` with the model in float64 and eval mode (so that
BatchNorm uses its running statistics and examples are independent, as the brute-force ground
truth assumes) and a small batch of inputs.
"""
import torch
from torch import nn

from nngeometry.layers import Affine1d, Cosine1d, WeightNorm1d, WeightNorm2d


def _randomize_norm_stats(model, gen):
    """Non-trivial running statistics and affine parameters for the norm layers."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._NormBase,)) and m.track_running_stats:
                m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
            if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm,
                              nn.RMSNorm, Affine1d)):
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=gen))
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=gen))


class ResBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(h)))


class SmallResNet(nn.Module):
    """Conv stem + BatchNorm, one residual block, a strided conv, global average pool, head."""

    def __init__(self, c=3, n_classes=3):
        super().__init__()
        self.stem = nn.Conv2d(2, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.block = ResBlock(c)
        self.down = nn.Conv2d(c, 4, 2, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(4, n_classes)

    def forward(self, x):
        h = torch.relu(self.bn(self.stem(x)))
        h = torch.relu(self.down(self.block(h)))
        return self.head(self.pool(h).flatten(1))


class Conv1dNet(nn.Module):
    """1-D convolutions (strided, dilated, grouped), InstanceNorm1d, BatchNorm1d, a head."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 3, stride=2, padding=1)
        self.inorm = nn.InstanceNorm1d(4, affine=True)
        self.c2 = nn.Conv1d(4, 4, 3, dilation=2, groups=2, padding=2)
        self.bn = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.inorm(self.c1(x)))
        h = torch.tanh(self.bn(self.c2(h)))
        return self.head(h.mean(dim=2))


class TinyUNet(nn.Module):
    """Encoder (conv, strided conv), decoder (ConvTranspose2d), skip concatenation, GroupNorm,
    per-pixel logits ``(n, 2, H, W)``."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(1, 4, 3, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.down = nn.Conv2d(4, 4, 2, stride=2)
        self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        e = torch.relu(self.gn(self.enc(x)))
        u = torch.relu(self.up(torch.relu(self.down(e))))
        return self.out(torch.cat([e, u], dim=1))


class TinyTransformer(nn.Module):
    """Token embedding (+ learned positions), one TransformerEncoderLayer (MultiheadAttention,
    LayerNorm, MLP), mean pooling, Linear head: sequence classification."""

    def __init__(self, vocab=7, d=8, T=5, n_classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.pos = nn.Parameter(0.1 * torch.randn(T, d))
        self.enc = nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=12, dropout=0.0,
                                              batch_first=True)
        self.head = nn.Linear(d, n_classes)

    def forward(self, idx):
        h = self.emb(idx) + self.pos
        h = self.enc(h)
        return self.head(h.mean(dim=1))


class PolyAct(nn.Module):
    """A user's own parametrized layer: ``y = a * x + b * x² + c`` per feature, with a child
    Linear applied first (its parameters are a layer of their own)."""

    def __init__(self, d):
        super().__init__()
        self.a = nn.Parameter(1 + 0.2 * torch.randn(d))
        self.b = nn.Parameter(0.2 * torch.randn(d))
        self.c = nn.Parameter(0.2 * torch.randn(1, d))
        self.lin = nn.Linear(d, d)

    def forward(self, x, scale=1.0):
        x = self.lin(x)
        return scale * (self.a * x + self.b * x * x + self.c)


class CustomNet(nn.Module):
    """A model holding a custom parametrized module, plus nngeometry's own layers
    (WeightNorm1d, Affine1d, Cosine1d) and RMSNorm."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 5)
        self.custom = PolyAct(5)
        self.rms = nn.RMSNorm(5)
        self.wn = WeightNorm1d(5, 4)
        self.aff = Affine1d(4)
        self.cos = Cosine1d(4, 3)

    def forward(self, x):
        h = torch.tanh(self.custom(self.fc(x), scale=0.7))
        h = torch.tanh(self.aff(self.wn(self.rms(h))))
        return 3 * self.cos(h)


def _finish(model, x, seed):
    gen = torch.Generator().manual_seed(seed)
    model = model.double()
    _randomize_norm_stats(model, gen)
    return model.eval(), x


def make_resnet(n=4, seed=0):
    torch.manual_seed(seed)
    return _finish(SmallResNet(), torch.randn(n, 2, 6, 6, dtype=torch.float64), seed)


def make_conv1d(n=4, seed=0):
    torch.manual_seed(seed)
    return _finish(Conv1dNet(), torch.randn(n, 2, 11, dtype=torch.float64), seed)


def make_unet(n=3, seed=0):
    torch.manual_seed(seed)
    return _finish(TinyUNet(), torch.randn(n, 1, 4, 4, dtype=torch.float64), seed)


def make_transformer(n=4, seed=0):
    torch.manual_seed(seed)
    idx = torch.randint(0, 7, (n, 5))
    idx[0, -1] = 0  # a padding token
    return _finish(TinyTransformer(), idx, seed)


def make_custom(n=5, seed=0):
    torch.manual_seed(seed)
    return _finish(CustomNet(), torch.randn(n, 4, dtype=torch.float64), seed)


MODELS = {
    "resnet": make_resnet,
    "conv1d": make_conv1d,
    "unet": make_unet,
    "transformer": make_transformer,
    "custom": make_custom,
}
