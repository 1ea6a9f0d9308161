"""Dict batches (Hugging Face style): model(**inputs) without the target key, targets from it,
integer inputs never differentiated, several dict batches never read as one."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nngeometry import FIM, GGN, EmpiricalFisher
from nngeometry.layercollection import LayerCollection
from nngeometry.object import PMatDense, PMatDiag, PMatImplicit, PMatKFAC, PVector


class Out:
    def __init__(self, logits):
        self.logits = logits


class TokenModel(nn.Module):
    """input_ids (n, T) (+ attention_mask) -> .logits (n, T, V); refuses a labels argument as a
    Hugging Face model would not (it would compute a loss)."""

    def __init__(self, V=5, d=4):
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.head = nn.Linear(d, V)

    def forward(self, input_ids, attention_mask=None, **extra):
        assert not extra, f"unexpected inputs {list(extra)}"
        h = torch.tanh(self.emb(input_ids))
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1).to(h.dtype)
        return Out(self.head(h))


def batches(n=3, T=4, V=5, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(k):
        ids = torch.randint(0, V, (n, T), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones(n, T, dtype=torch.long),
                    "labels": torch.randint(0, V, (n, T), generator=g)})
    return out


def as_tuples(dicts):
    return [(d["input_ids"], d["labels"]) for d in dicts]


def model_and_plain():
    torch.manual_seed(0)
    m = TokenModel().double().eval()

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = m.emb, m.head

        def forward(self, ids):
            return self.head(torch.tanh(self.emb(ids)))
    return m, Plain().eval()


def ce(out, y):
    return F.cross_entropy(out.transpose(1, 2), y, reduction="none").sum(1)


def test_dict_loader_equals_tuple_loader():
    m, plain = model_and_plain()
    dicts = batches()
    tup = as_tuples(dicts)
    # (the plain model returns a tensor (n, T, V): its class axis is given; the dict model's
    # .logits have it last)
    for entry in (lambda mod, dl, r: FIM(mod, dl, r, class_dim=-1 if mod is plain else None),
                  lambda mod, dl, r: EmpiricalFisher(
                      mod, dl, r, class_dim=-1 if mod is plain else None),
                  lambda mod, dl, r: GGN(mod, dl, r, loss_function=ce)):
        ref = entry(plain, tup, PMatDense).to_torch()
        torch.testing.assert_close(entry(m, dicts, PMatDense).to_torch(), ref)
        torch.testing.assert_close(entry(m, dicts, PMatDiag).get_diag(), torch.diag(ref))
        lc = LayerCollection.from_model(m)
        v = torch.randn(lc.numel(), dtype=torch.float64)
        torch.testing.assert_close(
            entry(m, dicts, PMatImplicit).mv(PVector(lc, vector_repr=v)).to_torch(), ref @ v)


def test_target_key_configurable():
    m, plain = model_and_plain()
    dicts = [{"input_ids": d["input_ids"], "y": d["labels"]} for d in batches()]
    ref = EmpiricalFisher(plain, as_tuples(batches()), PMatDense, class_dim=-1).to_torch()
    torch.testing.assert_close(EmpiricalFisher(m, dicts, PMatDense, target_key="y").to_torch(),
                               ref)
    with pytest.raises(ValueError, match="has no key 'labels'.*target_key="):
        EmpiricalFisher(m, [{"input_ids": d["input_ids"]} for d in batches()], PMatDense)


def test_tuple_of_dicts_refused():
    m, _ = model_and_plain()
    d1, d2 = batches()
    with pytest.raises(ValueError, match="tuple of 2 dicts.*list"):
        FIM(m, (d1, d2), PMatDiag)
    # a list of dicts is several batches: the two batches' examples all count
    both = FIM(m, [d1, d2], PMatDense).to_torch()
    one = FIM(m, [d1], PMatDense).to_torch()
    two = FIM(m, [d2], PMatDense).to_torch()
    torch.testing.assert_close(both, (one + two) / 2)


def test_kfac_on_dict_batches():
    m, plain = model_and_plain()
    k1 = FIM(m, batches(), PMatKFAC).to_torch()
    k2 = FIM(plain, as_tuples(batches()), PMatKFAC, class_dim=-1).to_torch()
    torch.testing.assert_close(k1, k2)


def test_hessian_default_loss_on_dict_sequence_batches():
    """Hessian's default loss on (n, T, V) outputs of a dict batch: the per-token cross-entropy
    summed, targets from 'labels' (F.cross_entropy on (n, T, V) would read T as the classes)."""
    from nngeometry import Hessian
    m, plain = model_and_plain()
    d = batches(k=1)[0]
    H = Hessian(m, [d], PMatDense).to_torch()
    ids, y = d["input_ids"], d["labels"]
    lc = LayerCollection.from_model(plain)
    params = dict(plain.named_parameters())
    names = [f"{lid}.{p}" for lid, layer in lc.layers.items() for p in layer.param_names()]
    flat = torch.cat([params[k].detach().reshape(-1) for k in names])

    def loss(theta):
        p, i = {}, 0
        for k in names:
            p[k] = theta[i:i + params[k].numel()].reshape(params[k].shape)
            i += params[k].numel()
        out = torch.func.functional_call(plain, p, (ids,))
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum")
    torch.testing.assert_close(H, torch.func.hessian(loss)(flat))


def test_dict_batch_whose_first_value_is_not_batched():
    """A Hugging Face style batch whose first value is not batched (position_ids of shape
    (1, T) or (T,), a 0-dim flag): accepted, the same matrix as with the batched value first;
    a dict whose batched values all hold 0 examples is refused."""
    torch.manual_seed(0)
    t = 4

    class KW(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 3)
            self.pos = nn.Embedding(t, 3)
            self.head = nn.Linear(3, 2)

        def forward(self, input_ids=None, position_ids=None, flag=None):
            return self.head(torch.tanh(self.emb(input_ids) + self.pos(position_ids))).sum(1)

    m = KW().double()
    ids = torch.randint(0, 10, (5, t))
    ref = FIM(m, {"input_ids": ids, "position_ids": torch.arange(t)[None]}, PMatDense).to_torch()
    for first in ({"position_ids": torch.arange(t)[None]}, {"position_ids": torch.arange(t)},
                  {"flag": torch.tensor(1.0), "position_ids": torch.arange(t)[None]}):
        got = FIM(m, {**first, "input_ids": ids}, PMatDense).to_torch()
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="0 examples"):
        FIM(m, {"position_ids": torch.arange(t)[:0], "input_ids": ids[:0]}, PMatDense)
