"""PMatEKFAC: equal to KFAC before update_diag, the exact projected diagonal after it, and every
operation against its own dense form."""
import pytest
import torch
from torch import nn

from _kfac_helpers import (DT, Setup, check_layout_errors, check_pickle, check_products,
                           check_solve_against, close, damped_inv, dense_pow)
from brute import fim_dense
from nngeometry.layer_types import LinearLayer
from nngeometry.layer_types.base import AbstractLayer
from nngeometry.layercollection import LayerCollection
from nngeometry.metrics import FIM
from nngeometry.object import PMatEKFAC, PMatKFAC


@pytest.fixture(scope="module", params=["mlp", "mlp_nobias", "cnn"])
def built(request):
    s = Setup(request.param)
    K = PMatKFAC(s.lc, s.generator(), examples=s.loader)
    E = PMatEKFAC(s.lc, s.generator(), examples=s.loader)
    return s, K, E


@pytest.fixture(scope="module")
def updated(built):
    s, K, E0 = built
    E = PMatEKFAC(s.lc, s.generator(), examples=s.loader)
    E.update_diag(s.loader)
    return s, E, E.to_torch()


def test_equals_kfac_before_update(built):
    s, K, E = built
    close(E.to_torch(), K.to_torch(), rtol=1e-11)
    close(E.to_torch(split_weight_bias=False), K.to_torch(split_weight_bias=False), rtol=1e-11)
    close(E.get_diag(), K.get_diag(), rtol=1e-11)
    close(PMatEKFAC.from_kfac(K).to_torch(), K.to_torch(), rtol=1e-11)


def test_update_diag_is_projection_of_exact_fim(updated):
    """After update_diag, D = diag(Uᵀ F U) per layer, F the exact FIM and U the KFE."""
    s, E, D = updated
    F = s.dense
    for lid in s.lc.layer_ids():
        U = E.get_KFE(lid)
        sl = s.lc.slice(lid)
        close(U.t() @ U, torch.eye(U.shape[0], dtype=DT), rtol=1e-12)
        close(E.data[1][lid], torch.diagonal(U.t() @ F[sl, sl] @ U), rtol=1e-10)
        # the Kronecker-ordered basis is the same basis with rows re-indexed
        perm = s.lc[lid].kfac_permutation()
        close(E.get_KFE(lid, split_weight_bias=False)[perm], U, rtol=0)
    # the new diagonal differs from KFAC's
    E0 = PMatEKFAC(s.lc, s.generator(), examples=s.loader)
    assert (E0.to_torch() - D).abs().max() > 1e-8
    # ... and the dense form is U diag(D) Uᵀ
    for lid in s.lc.layer_ids():
        U = E.get_KFE(lid)
        sl = s.lc.slice(lid)
        close(D[sl, sl], (U * E.data[1][lid]) @ U.t(), rtol=1e-12)
    assert isinstance(E.get_KFE(), dict) and set(E.get_KFE()) == set(s.lc.layer_ids())


def test_eigendecomposition_argument(updated, built):
    """Building on a given eigenbasis estimates the diagonal directly (= update_diag)."""
    s, E, D = updated
    _, K, _ = built
    E2 = PMatEKFAC(s.lc, s.generator(), examples=s.loader, eigendecomposition=K)
    close(E2.to_torch(), D, rtol=1e-11)
    bases = dict(E.data[0])
    E3 = PMatEKFAC(s.lc, s.generator(), examples=(s.x, s.y), eigendecomposition=bases)
    close(E3.to_torch(), D, rtol=1e-11)


def test_products(updated):
    s, E, D = updated
    check_products(E, D, s)
    Dk = E.to_torch(split_weight_bias=False)
    close(E.get_diag(split_weight_bias=False), torch.diagonal(Dk))
    for lid in s.lc.layer_ids():
        sl = s.lc.slice(lid)
        perm = s.lc[lid].kfac_permutation()
        close(Dk[sl, sl][perm][:, perm], D[sl, sl], rtol=1e-14)


def test_solves_and_functions(updated):
    s, E, D = updated
    regul = 0.3
    ref = damped_inv(D, regul)
    check_solve_against(E, ref, s, regul=regul)
    close(E.inv(regul).to_torch(), ref, rtol=1e-8)
    close(E.inv(regul).to_torch(), ref, rtol=1e-8)
    close(E.pow(2).to_torch(), D @ D, rtol=1e-10)
    close(E.pow(0.5).to_torch(), dense_pow(D, 0.5), rtol=1e-7)
    close(E.pow(-0.5, regul=0.2).to_torch(), dense_pow(D, -0.5, 0.2), rtol=1e-8)
    close(E.logdet(0.1), torch.logdet(D + 0.1 * torch.eye(D.shape[0], dtype=DT)), rtol=1e-10)
    with pytest.raises(ValueError, match="damping"):
        E.solve(s.vec(), regul=regul, damping="pi")


def test_arithmetic(updated):
    s, E, D = updated
    close((E * 2.5).to_torch(), 2.5 * D)
    close((E / 4).to_torch(), D / 4)
    close((E + 2 * E).to_torch(), 3 * D)
    close((E - E).to_torch(), 0 * D, scale=float(D.abs().max()))
    close(E.mm(E.inv(0.1)).to_torch(), D @ damped_inv(D, 0.1), rtol=1e-8)
    other = PMatEKFAC(s.lc, s.generator(), examples=(s.x[:3],))
    with pytest.raises(NotImplementedError, match="eigenbases"):
        E + other
    with pytest.raises(NotImplementedError):
        E + PMatKFAC(s.lc, s.generator(), examples=(s.x[:3],))


def test_pickle_and_errors(updated):
    import pickle

    s, E, D = updated
    check_pickle(E, D, s)
    check_layout_errors(E, s)
    E2 = pickle.loads(pickle.dumps(E))
    with pytest.raises(AttributeError, match="not pickled.*generator = "):
        E2.update_diag(s.loader)
    # the stored per-block form is accepted as data too, and checked
    bad = dict(E._store)
    UA, UG, Dg = bad[s.lc.layer_ids()[0]]
    bad[s.lc.layer_ids()[0]] = (UA, UG, Dg[:, :-1])
    with pytest.raises(ValueError, match="does not match the bases"):
        PMatEKFAC(s.lc, None, data=bad)
    # upstream's (evecs, diags): a diagonal of the wrong size is refused, naming the layer
    evecs, diags = E.data
    lid = s.lc.layer_ids()[0]
    diags = dict(diags, **{lid: diags[lid][:-1]})
    with pytest.raises(ValueError, match=f"layer '{lid}'.*values"):
        PMatEKFAC(s.lc, None, data=(evecs, diags))


def test_unsupported_layers_refused():
    s = Setup("odd")
    with pytest.raises(NotImplementedError, match=r"'0'.*Conv2dLayer.*PMatEKFACBlockDiag"):
        PMatEKFAC(s.lc, s.generator(), examples=s.loader)
    with pytest.raises(NotImplementedError, match=r"'4'.*ScaleLayer.*PMatEKFACBlockDiag"):
        PMatEKFAC(s.lc.sub(["3", "4"]), s.generator(), examples=s.loader)


# ---------------------------------------------------------------------- the KFE diagonal itself
def test_linear_fast_path_equals_generic():
    """LinearLayer.kfe_diag (from inputs and output gradients) = the generic projection of
    per-example gradients; also for sequences (weight sharing), where the generic path is used."""
    torch.manual_seed(0)
    for bias in (True, False):
        layer = LinearLayer(4, 3, bias=bias)
        module = nn.Linear(4, 3, bias=bias).to(DT)
        dA = 4 + bias
        UA = torch.linalg.qr(torch.randn(dA, dA, dtype=DT))[0]
        UG = torch.linalg.qr(torch.randn(3, 3, dtype=DT))[0]
        for shape in ((6, 4), (6, 5, 4)):
            x = torch.randn(*shape, dtype=DT)
            gy = torch.randn(2, *shape[:-1], 3, dtype=DT)
            fast = layer.kfe_diag(module, x, gy, UA, UG)
            generic = AbstractLayer.kfe_diag(layer, module, x, gy, UA, UG)
            close(fast, generic, rtol=1e-12)
            # identity bases given as ints: the squared gradients in the Kronecker layout
            g = layer.per_example_grad(module, x, gy)
            perm = layer.kfac_permutation()
            kron = torch.empty_like(g)
            kron[..., perm] = g
            close(layer.kfe_diag(module, x, gy, dA, 3), (kron ** 2).sum((0, 1)).reshape(3, dA),
                  rtol=1e-12)


def test_kfe_diag_sequence_model():
    """Linear layers on sequences: update_diag still gives the exact projection."""
    torch.manual_seed(0)

    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1 = nn.Linear(3, 4)
            self.l2 = nn.Linear(4, 2)

        def forward(self, x):
            return self.l2(torch.tanh(self.l1(x))).sum(1)

    model = Seq().to(DT)
    x = torch.randn(5, 3, 3, dtype=DT)
    lc = LayerCollection.from_model(model)
    E = FIM(model, (x, None), PMatEKFAC, variant="regression")
    E.update_diag((x, None))
    _check_refit_diagonals(E, fim_dense(model, x, "regression", lc), lc)


def test_embedding_diagonal_input_factor():
    """Embedding: KFAC's input factor is 1-D (token counts) and stays so; EKFAC's basis for it
    is the identity (an int); KFAC is exact on a single one-token example; update_diag is the
    exact projection."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(6, 3), nn.Flatten(), nn.Linear(3, 2)).to(DT)
    lc = LayerCollection.from_model(model)
    x1 = torch.tensor([[4]])
    K1 = FIM(model, (x1, None), PMatKFAC)
    assert K1.data["0"][0].dim() == 1
    s = lc.slice("0")
    close(K1.to_torch()[s, s], fim_dense(model, x1, "classif_logits", lc)[s, s], rtol=1e-12)
    x = torch.randint(0, 6, (7, 1))
    K = FIM(model, (x, None), PMatKFAC)
    E = FIM(model, (x, None), PMatEKFAC)
    assert isinstance(E.data[0]["0"][0], int)
    close(E.to_torch(), K.to_torch(), rtol=1e-11)
    E.update_diag((x, None))
    F = fim_dense(model, x, "classif_logits", lc)
    for lid in lc.layer_ids():
        U = E.get_KFE(lid)
        sl = lc.slice(lid)
        close(E.data[1][lid], torch.diagonal(U.t() @ F[sl, sl] @ U), rtol=1e-10)


class _EqualLayers(nn.Module):
    """Two pairs of Linear layers of equal shapes (with and without a bias), on examples or on
    sequences of positions sharing the weights."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 5)
        self.a, self.b = nn.Linear(5, 5), nn.Linear(5, 5)
        self.c, self.d = nn.Linear(5, 5, bias=False), nn.Linear(5, 5, bias=False)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        for m in (self.a, self.b, self.c, self.d):
            h = torch.tanh(m(h))
        h = self.out(h)
        return h.mean(dim=1) if h.dim() == 3 else h


@pytest.mark.parametrize("positions", [0, 3])
def test_update_diag_of_layers_of_equal_shapes(positions):
    """Layers whose eigenbases have equal shapes (with and without a bias) each get the
    ``diag(Uᵀ F U)`` of their own block of the exact Fisher, never another layer's (closed
    form: examples, and sequences whose positions share the weights)."""
    torch.manual_seed(0)
    model = _EqualLayers().to(DT)
    g = torch.Generator().manual_seed(1)
    shape = (6, positions, 4) if positions else (6, 4)
    x = torch.randn(*shape, generator=g, dtype=DT)
    y = torch.randint(0, 3, (6,), generator=g)
    lc = LayerCollection.from_model(model)
    E = FIM(model, (x, y), PMatEKFAC, layer_collection=lc)
    E.update_diag((x, y))
    _check_refit_diagonals(E, fim_dense(model, x, "classif_logits", lc), lc)


def _check_refit_diagonals(E, F, lc):
    """Each layer's refitted diagonal is ``diag(Uᵀ F_ll U)``, ``U`` its Kronecker eigenbasis and
    ``F_ll`` the layer's block of the dense Fisher ``F``."""
    for lid in lc.layer_ids():
        U = E.get_KFE(lid)
        sl = lc.slice(lid)
        close(E.data[1][lid], torch.diagonal(U.t() @ F[sl, sl] @ U), rtol=1e-10)
