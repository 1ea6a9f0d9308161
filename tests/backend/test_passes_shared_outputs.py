"""Layer outputs shared by the examples of a batch: batch dimension 1 (positions looked up with
shape (1, T), a learned table returned by a module) is expanded to the batch by the hooks; no
batch axis at all (a lookup on a (T, T) table) gets a backward pass of its own per example.
Both exact against brute force (torch.func per-example Jacobians, float64)."""
import torch
from torch import nn

from brute import fim_dense
from nngeometry import FIM, EmpiricalFisher, FIM_MonteCarlo
from nngeometry.layercollection import LayerCollection
from nngeometry.object import PMatDense, PMatDiag, PMatKFAC, PVector

TOL = dict(atol=1e-10, rtol=1e-8)
T, D, C = 4, 3, 3


class Table(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, T, D))

    def forward(self):
        return self.weight


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, D)
        self.pos1 = nn.Embedding(T, D)       # looked up with (1, T): output (1, T, D)
        self.pos0 = nn.Embedding(5, D)       # looked up with (T, T): output (T, T, D)
        self.table = Table()                 # returns (1, T, D)
        self.head = nn.Linear(D, C)

    def forward(self, x):
        pos = torch.arange(T)
        rel = (pos[:, None] - pos[None, :]).clamp(-2, 2) + 2
        bias = self.pos0(rel).mean(1)        # (T, D), no batch axis
        h = self.lin(x) + self.pos1(pos[None]) + self.table() + bias
        return self.head(torch.tanh(h)).sum(1)


class Batched(nn.Module):
    """``Shared``'s function with the positions looked up per example."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        m, n = self.m, x.shape[0]
        pos = torch.arange(T)
        rel = ((pos[:, None] - pos[None, :]).clamp(-2, 2) + 2).expand(n, T, T)
        h = m.lin(x) + m.pos1(pos.expand(n, T)) + m.table() + m.pos0(rel).mean(2)
        return m.head(torch.tanh(h)).sum(1)


def test_shared_outputs_exact():
    torch.manual_seed(0)
    m = Shared().double()
    x = torch.randn(3, T, 2, dtype=torch.float64)
    lc = LayerCollection.from_model(m)
    ref = fim_dense(m, x, layer_collection=lc)
    torch.testing.assert_close(FIM(m, (x,), PMatDense).to_torch(), ref, **TOL)
    torch.testing.assert_close(FIM(m, (x,), PMatDiag).get_diag(), torch.diag(ref), **TOL)
    # the Monte-Carlo Fisher (its own graph per draw) and the empirical Fisher: as those of the
    # same function with every lookup batched by hand (same draws: same outputs, same seed)
    y = torch.randint(0, C, (3,))
    mb = Batched(m)
    for entry, kw in ((FIM_MonteCarlo, dict(trials=3, seed=0)), (EmpiricalFisher, {})):
        got = entry(m, (x, y), PMatDense, **kw).to_torch()
        torch.testing.assert_close(got, entry(mb, (x, y), PMatDense, **kw).to_torch(), **TOL)
        assert got.abs().max() > 0
    # KFAC of the two embeddings and the linear layers (the table is a generic layer)
    sub = lc.sub(["lin", "pos1", "pos0", "head"])
    K = FIM(m, (x,), PMatKFAC, layer_collection=sub)
    v = PVector(sub, vector_repr=torch.randn(sub.numel(), dtype=torch.float64))
    assert float(K.vTMv(v)) > 0


def test_batch_size_read_from_the_outputs():
    """A batch whose first tensor is not batched (shared positions first, with a function of
    the user's): the number of examples is read from the outputs, and the forward pass run
    again with it."""
    torch.manual_seed(0)

    class ByDict(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(T, D)
            self.lin = nn.Linear(2, D)
            self.head = nn.Linear(D, C)

        def forward(self, position_ids, x):
            return self.head(torch.tanh(self.lin(x) + self.emb(position_ids))).sum(1)

    m = ByDict().double()
    x = torch.randn(3, T, 2, dtype=torch.float64)
    b = {"position_ids": torch.arange(T)[None], "x": x}
    lc = LayerCollection.from_model(m)
    got = FIM(m, [b], PMatDense, function=lambda d: m(**d)).to_torch()
    # brute force: the model called on one example at a time, positions bound
    m.forward = lambda xi, f=m.forward: f(torch.arange(T)[None], xi)
    try:
        ref = fim_dense(m, x, layer_collection=lc)
    finally:
        del m.forward
    torch.testing.assert_close(got, ref, **TOL)


def test_shared_output_repeated_or_concatenated_by_the_model():
    """A layer output of batch dimension 1 that the model repeats along the batch itself (a
    class token tiled, which the expanded copy would break) or concatenates along it (the
    number of outputs would change once expanded): left as it is, it gets the backward pass
    of its own of outputs with no batch axis; exact against brute force."""
    from torch.func import functional_call, jacrev

    torch.manual_seed(0)

    class Cls(nn.Module):
        def __init__(self):
            super().__init__()
            self.cls = nn.Embedding(1, 2)
            self.lin = nn.Linear(2, C)

        def forward(self, x):
            c = self.cls(torch.zeros(1, 1, dtype=torch.long)).repeat(x.shape[0], 1, 1)
            return self.lin(torch.tanh(torch.cat([c, x], 1))).mean(1)

    m = Cls().double()
    x = torch.randn(4, 3, 2, dtype=torch.float64)
    torch.testing.assert_close(FIM(m, (x,), PMatDense).to_torch(), fim_dense(m, x), **TOL)

    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, C)

        def forward(self, x):
            return torch.cat([self.lin(x[:1]), x.new_zeros(x.shape[0], C)])

    m = Cat().double()
    x = torch.randn(3, 2, dtype=torch.float64)
    got = FIM(m, [{"x0": torch.zeros(1), "x": x}], PMatDense, function=lambda d: m(d["x"]))
    # the function's 4 output rows are its examples
    params = {k: v.detach() for k, v in m.named_parameters()}
    J = jacrev(lambda p: functional_call(m, p, (x,)))(params)
    J = torch.cat([J[k].reshape(4, C, -1) for k in ("lin.weight", "lin.bias")], 2)
    p = torch.softmax(m(x).detach(), 1)
    S = torch.diag_embed(p) - p[:, :, None] * p[:, None]
    ref = torch.einsum("nkp,nkl,nlq->pq", J, S, J) / 4
    torch.testing.assert_close(got.to_torch(), ref, **TOL)
    assert ref.abs().max() > 0


def test_table_as_long_as_the_batch_is_shared():
    """A ``(T, D)`` table (positions of shape ``(T,)``, no batch axis) in a batch of ``T``
    examples (here the loader's batches of 3, 3, 2) looks batched by its shape: it is found
    shared from its gradients, and the matrices equal brute force / the single-batch result."""
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    t = 3

    class Tab(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Embedding(t, D)
            self.tab = nn.Linear(D, 2)
            self.lin = nn.Linear(2, C)

        def forward(self, x):
            p = self.tab(self.pos(torch.arange(t)))          # (t, 2), shared
            return self.lin(torch.tanh(x + p)).mean(1)

    m = Tab().double()
    x = torch.randn(8, t, 2, dtype=torch.float64)
    data = TensorDataset(x)
    ref = fim_dense(m, x, layer_collection=LayerCollection.from_model(m))
    got = FIM(m, DataLoader(data, batch_size=t), PMatDense).to_torch()
    torch.testing.assert_close(got, ref, **TOL)
    # KFAC (factors summed over the batches): the same from any batch size
    k_small = FIM(m, DataLoader(data, batch_size=t), PMatKFAC).to_torch()
    k_one = FIM(m, DataLoader(data, batch_size=8), PMatKFAC).to_torch()
    torch.testing.assert_close(k_small, k_one, **TOL)
