"""EmpiricalFisher, GGN, FIM and FIM_MonteCarlo on an MLP, a CNN and a sequence-output model,
in every representation, against brute force (torch.func per-example Jacobians, gradients and
output Hessians, float64)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev, vmap
from torch.utils.data import DataLoader, TensorDataset

from brute import param_names
from nngeometry import FIM, GGN, EmpiricalFisher, FIM_MonteCarlo
from nngeometry.layercollection import LayerCollection
from nngeometry.object import (PMatBlockDiag, PMatDense, PMatDiag, PMatEKFAC, PMatImplicit,
                               PMatKFAC, PMatLowRank, PMatQuasiDiag, PVector)

C = 3


class Seq(nn.Module):
    """(n, T, d) -> (n, T, C): a per-token MLP (weights shared over positions)."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(4, 5)
        self.l2 = nn.Linear(5, C)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


def make(kind, n=6, seed=0):
    torch.manual_seed(seed)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, C))
        x = torch.randn(n, 4)
        y = torch.randint(0, C, (n,))
    elif kind == "cnn":
        model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4, C))
        x = torch.randn(n, 2, 4, 4)
        y = torch.randint(0, C, (n,))
    else:
        model = Seq()
        x = torch.randn(n, 3, 4)
        y = torch.randint(0, C, (n, 3))
    return model.double().eval(), x.double(), y


def _params(model):
    lc = LayerCollection.from_model(model)
    names = param_names(model, lc)
    allp = dict(model.named_parameters())
    return lc, names, {k: allp[k].detach() for k in names}


def brute_jac(model, x):
    """(n, D, P) Jacobians of the flattened outputs."""
    lc, names, params = _params(model)

    def f(p, xi):
        return functional_call(model, p, (xi.unsqueeze(0),)).reshape(-1)
    J = vmap(jacrev(f), (None, 0))(params, x)
    n = x.shape[0]
    return torch.cat([J[k].reshape(n, J[k].shape[1], -1) for k in names], dim=2)


def ce_sum(out, y):
    """Per-example cross-entropy summed over positions: (n,)."""
    fp = out if out.dim() == 3 else out.unsqueeze(1)
    return F.cross_entropy(fp.reshape(-1, C), y.reshape(-1), reduction="none") \
        .reshape(out.shape[0], -1).sum(1)


def brute_grads(model, x, y, loss):
    """(n, P) per-example gradients of loss(model(x_i), y_i)."""
    lc, names, params = _params(model)

    def li(p, xi, yi):
        return loss(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0)).sum()
    G = vmap(grad(li), (None, 0, 0))(params, x, y)
    return torch.cat([G[k].reshape(x.shape[0], -1) for k in names], dim=1)


def brute_ggn(model, x, y, loss):
    J = brute_jac(model, x)
    with torch.no_grad():
        out = model(x)

    def li(fi, yi):
        return loss(fi.unsqueeze(0), yi.unsqueeze(0)).sum()
    H = vmap(hessian(li))(out, y).reshape(x.shape[0], J.shape[1], J.shape[1])
    return torch.einsum("ndp,nde,neq->pq", J, H, J) / x.shape[0]


def brute_fim_classif(model, x):
    """Closed-form Fisher with one softmax per position."""
    J = brute_jac(model, x)
    with torch.no_grad():
        out = model(x)
    p = torch.softmax(out.reshape(-1, C), 1)
    cov = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)  # (n*S, C, C)
    n = x.shape[0]
    S = cov.shape[0] // n
    Sig = torch.block_diag(*[torch.block_diag(*cov[i * S:(i + 1) * S]) for i in range(n)])
    Sig = torch.stack([Sig[i * S * C:(i + 1) * S * C, i * S * C:(i + 1) * S * C]
                       for i in range(n)])
    return torch.einsum("ndp,nde,neq->pq", J, Sig, J) / n


def loader(x, y, bs=4):
    return DataLoader(TensorDataset(x, y), batch_size=bs)


def mse(out, y):
    return 0.5 * ((out - y) ** 2).reshape(out.shape[0], -1).sum(1)


KINDS = ["mlp", "cnn", "seq"]
TOL = dict(atol=1e-10, rtol=1e-8)


def reference(entry, model, x, y):
    if entry == "ef":
        G = brute_grads(model, x, y, ce_sum)
        return G.t() @ G / x.shape[0]
    if entry == "ggn":
        return brute_ggn(model, x, y, ce_sum)
    return brute_fim_classif(model, x)


def build(entry, model, dl, rep, **kw):
    kw.setdefault("class_dim", -1)  # the "seq" model's (n, T, C) outputs
    if entry == "ef":
        return EmpiricalFisher(model, dl, rep, loss_function=ce_sum, **kw)
    if entry == "ggn":
        return GGN(model, dl, rep, loss_function=ce_sum, **kw)
    return FIM(model, dl, rep, variant="classif_logits", **kw)


def block_mask(lc):
    P = lc.numel()
    M = torch.zeros(P, P, dtype=torch.bool)
    for lid in lc.layer_ids():
        sl = lc.slice(lid)
        M[sl, sl] = True
    return M


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("entry", ["ef", "ggn", "fim"])
def test_dense_family(kind, entry):
    model, x, y = make(kind)
    ref = reference(entry, model, x, y)
    dl = loader(x, y)
    lc = LayerCollection.from_model(model)
    torch.testing.assert_close(build(entry, model, dl, PMatDense).to_torch(), ref, **TOL)
    torch.testing.assert_close(build(entry, model, dl, PMatLowRank).to_torch(), ref, **TOL)
    bd = build(entry, model, dl, PMatBlockDiag).to_torch()
    torch.testing.assert_close(bd, torch.where(block_mask(lc), ref, torch.zeros_like(ref)), **TOL)
    torch.testing.assert_close(build(entry, model, dl, PMatDiag).get_diag(), torch.diag(ref),
                               **TOL)
    q = build(entry, model, dl, PMatQuasiDiag).to_torch()
    support = q != 0
    assert support.sum() > ref.shape[0]  # more than the diagonal
    torch.testing.assert_close(q[support], ref[support], **TOL)
    imp = build(entry, model, dl, PMatImplicit)
    v = torch.randn(ref.shape[0], dtype=torch.float64)
    torch.testing.assert_close(imp.mv(PVector(lc, vector_repr=v)).to_torch(), ref @ v, **TOL)


def test_ggn_identities():
    """GGN(CE) = FIM(classif_logits); GGN(0.5||f - y||²) = FIM(regression)."""
    for kind in KINDS:
        model, x, y = make(kind)
        dl = loader(x, y)
        torch.testing.assert_close(GGN(model, dl, PMatDense, loss_function=ce_sum).to_torch(),
                                   FIM(model, dl, PMatDense, class_dim=-1).to_torch(), **TOL)
        with torch.no_grad():
            yr = model(x) + torch.randn_like(model(x))
        dlr = loader(x, yr)
        torch.testing.assert_close(GGN(model, dlr, PMatDense, loss_function=mse).to_torch(),
                                   FIM(model, dlr, PMatDense, variant="regression",
                                       class_dim=-1).to_torch(),
                                   **TOL)


def test_ggn_other_losses():
    """Weighted MSE, Gaussian NLL with a given variance, Poisson NLL and label smoothing,
    against the explicit output Hessians."""
    model, x, y = make("mlp", n=5)
    with torch.no_grad():
        out = model(x)
    J = brute_jac(model, x)
    w = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    yr = out + 0.3 * torch.randn_like(out)
    # weighted MSE: H = diag(w)
    M = GGN(model, loader(x, yr), PMatDense,
            loss_function=lambda o, t: (w * (o - t) ** 2).sum(1) / 2).to_torch()
    torch.testing.assert_close(M, torch.einsum("ndp,d,ndq->pq", J, w, J) / 5, **TOL)
    # Gaussian NLL with variance 0.25: H = I / 0.25
    M = GGN(model, loader(x, yr), PMatDense,
            loss_function=lambda o, t: F.gaussian_nll_loss(
                o, t, torch.full_like(o, 0.25), reduction="none").sum(1)).to_torch()
    torch.testing.assert_close(M, torch.einsum("ndp,ndq->pq", J, J) / 5 / 0.25, **TOL)
    # Poisson with log-rate outputs: H = diag(exp(f))
    yc = torch.poisson(torch.ones_like(out))
    M = GGN(model, loader(x, yc), PMatDense,
            loss_function=lambda o, t: F.poisson_nll_loss(o, t, reduction="none").sum(1)
            ).to_torch()
    torch.testing.assert_close(M, torch.einsum("ndp,nd,ndq->pq", J, out.exp(), J) / 5, **TOL)
    # label smoothing: the Hessian of CE in the logits does not depend on the targets
    M = GGN(model, loader(x, y), PMatDense,
            loss_function=lambda o, t: F.cross_entropy(o, t, reduction="none",
                                                       label_smoothing=0.1)).to_torch()
    torch.testing.assert_close(M, FIM(model, loader(x, y), PMatDense).to_torch(), **TOL)


def test_ggn_refuses_nonconvex_loss():
    model, x, y = make("mlp", n=4)
    yr = torch.randn(4, C, dtype=torch.float64)
    with pytest.raises(ValueError, match="not convex in the outputs.*Hessian"):
        GGN(model, loader(x, yr), PMatDiag, loss_function=lambda o, t: -((o - t) ** 2).sum(1))


def test_losses_must_be_per_example():
    model, x, y = make("mlp", n=4)
    with pytest.raises(ValueError, match=r"one loss per example, shape \(4,\)"):
        EmpiricalFisher(model, loader(x, y), PMatDiag,
                        loss_function=lambda o, t: F.cross_entropy(o, t))
    with pytest.raises(ValueError, match="needs the observed targets"):
        EmpiricalFisher(model, [(x,)], PMatDiag)
    with pytest.raises(TypeError, match="GGN needs loss_function"):
        GGN(model, loader(x, y), PMatDiag, loss_function=None)


def test_ef_default_loss_is_cross_entropy():
    for kind in KINDS:
        model, x, y = make(kind)
        torch.testing.assert_close(
            EmpiricalFisher(model, loader(x, y), PMatDense, class_dim=-1).to_torch(),
            reference("ef", model, x, y), **TOL)


# ---------------------------------------------------------------- sequences: sum and mean
def test_sequence_fim_not_one_softmax():
    """(n, T, C) outputs: one softmax per position (the silent error was one over T·C)."""
    model, x, y = make("seq")
    ref = brute_fim_classif(model, x)
    dl = loader(x, y)
    torch.testing.assert_close(FIM(model, dl, PMatDense, class_dim=-1).to_torch(), ref, **TOL)
    T = x.shape[1]
    torch.testing.assert_close(FIM(model, dl, PMatDense, positions="mean", class_dim=-1)
                               .to_torch(), ref / T, **TOL)
    torch.testing.assert_close(
        GGN(model, dl, PMatDense, positions="mean",
            loss_function=lambda o, t: F.cross_entropy(o.transpose(1, 2), t, reduction="none")
            ).to_torch(), ref / T, **TOL)
    torch.testing.assert_close(
        FIM(model, dl, PMatDense, variant="regression", positions="mean",
            class_dim=-1).to_torch(),
        torch.einsum("ndp,ndq->pq", brute_jac(model, x), brute_jac(model, x)) / x.shape[0] / T,
        **TOL)
    with pytest.raises(ValueError, match="positions must be 'sum'"):
        FIM(model, dl, PMatDense, positions="avg")


def test_image_outputs_classes_on_dim1():
    """(n, C, H, W) outputs: classes along dimension 1, one softmax per pixel."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, C, 1), nn.Tanh(), nn.Conv2d(C, C, 1)).double()
    x = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    J = brute_jac(model, x)  # (n, C*H*W, P), C-major
    with torch.no_grad():
        out = model(x)
    p = torch.softmax(out, 1).movedim(1, -1).reshape(3, 4, C)
    cov = torch.diag_embed(p) - p.unsqueeze(3) * p.unsqueeze(2)  # (n, 4, C, C)
    # in the (C, H*W) order of J: Σ[c s, d t] = δ_st cov[s, c, d]
    Sig = torch.einsum("nscd,st->ncsdt", cov, torch.eye(4, dtype=torch.float64)) \
        .reshape(3, 4 * C, 4 * C)
    ref = torch.einsum("ndp,nde,neq->pq", J, Sig, J) / 3
    torch.testing.assert_close(FIM(model, (x,), PMatDense, class_dim=1).to_torch(), ref, **TOL)
    # the class axis is never guessed
    with pytest.raises(ValueError, match=r"class_dim=-1.*\(n, T, C\).*class_dim=1.*\(n, C, H, W\)"):
        FIM(model, (x,), PMatDense)


# ---------------------------------------------------------------- KFAC / EKFAC definitions
class _Rec:
    def __init__(self, model):
        self.x = {}
        self.hs = [m.register_forward_hook(self.hook(name)) for name, m in model.named_modules()
                   if isinstance(m, nn.Linear)]

    def hook(self, name):
        def h(m, i, o):
            self.x[name] = i[0].detach()
        return h


def _kron_perm(out_f, in_f, bias=True):
    """Index in the common layout (weight.flatten(), bias) of each Kronecker-order entry."""
    idx = []
    for o in range(out_f):
        idx.extend(o * in_f + i for i in range(in_f))
        if bias:
            idx.append(out_f * in_f + o)
    return torch.tensor(idx)


def _dgdf(transform, model, x, y):
    """(n, K, C): gradient of each output direction g_k of the transform w.r.t. the outputs."""
    from nngeometry.curvature import BatchInfo
    with torch.no_grad():
        out = model(x)
    f = out.detach().requires_grad_(True)
    info = transform.batch_info((x, y), 0) if transform.needs_batch else None
    g = transform.transform(f, info) if info is not None else transform.transform(f)
    rows = [torch.autograd.grad(g[:, k].sum(), f, retain_graph=True)[0]
            for k in range(g.shape[1])]
    assert isinstance(info, (BatchInfo, type(None)))
    return torch.stack(rows, 1)


@pytest.mark.parametrize("entry", ["ef", "ggn", "mc", "fim"])
def test_kfac_is_the_per_layer_kronecker_definition(entry):
    """On an MLP: KFAC's layer block = G ⊗ A (Kronecker order) with A = mean [a;1][a;1]ᵀ and
    G = mean_i Σ_k g_{k,i} g_{k,i}ᵀ, g the gradients of the output directions w.r.t. the
    layer's outputs."""
    from nngeometry import curvature as V
    model, x, y = make("mlp", n=8)
    fn = lambda *b: model(b[0])  # noqa: E731
    transform = {"ef": lambda: V.empirical_function(fn, ce_sum),
                 "ggn": lambda: V.ggn_function(fn, ce_sum),
                 "mc": lambda: V.monte_carlo_function(fn, "classif_logits", 3, seed=5),
                 "fim": lambda: V.closed_form_function(fn, "classif_logits")}[entry]()
    dl = [(x, y)]
    kw = dict(loss_function=ce_sum)
    M = {"ef": lambda r: EmpiricalFisher(model, dl, r, **kw),
         "ggn": lambda r: GGN(model, dl, r, **kw),
         "mc": lambda r: FIM_MonteCarlo(model, dl, r, trials=3, seed=5),
         "fim": lambda r: FIM(model, dl, r)}[entry]
    kfac = M(PMatKFAC)
    rec = _Rec(model)
    U = _dgdf(transform, model, x, y)  # (n, K, C)
    for h in rec.hs:
        h.remove()
    n = x.shape[0]
    W2 = model[2].weight.detach()
    s1 = model[0](x).detach()
    gl = {"2": U, "0": torch.einsum("nkc,ci,ni->nki", U, W2, 1 - torch.tanh(s1) ** 2)}
    dense = kfac.to_torch(split_weight_bias=False)
    lc = LayerCollection.from_model(model)
    for lid in ("0", "2"):
        a = torch.cat([rec.x[lid], torch.ones(n, 1, dtype=torch.float64)], 1)
        A = a.t() @ a / n
        G = torch.einsum("nki,nkj->ij", gl[lid], gl[lid]) / n
        sl = lc.slice(lid)
        torch.testing.assert_close(dense[sl, sl], torch.kron(G, A), **TOL)


@pytest.mark.parametrize("entry", ["ef", "ggn"])
def test_ekfac_diag_in_kfe(entry):
    """EKFAC after update_diag: V diag(Vᵀ M_l V) Vᵀ per layer, V = U_G ⊗ U_A."""
    model, x, y = make("mlp", n=8)
    dl = [(x, y)]
    ref = reference(entry, model, x, y)
    ek = build(entry, model, dl, PMatEKFAC)
    ek.update_diag(dl)
    lc = LayerCollection.from_model(model)
    evecs = ek.data[0]
    dense = ek.to_torch(split_weight_bias=False)
    for lid in lc.layer_ids():
        layer = lc[lid]
        perm = _kron_perm(layer.out_features, layer.in_features)
        sl = lc.slice(lid)
        Mk = ref[sl, sl][perm][:, perm]
        UA, UG = evecs[lid][:2]
        Vb = torch.kron(UG, UA)
        d = torch.diag(Vb.t() @ Mk @ Vb)
        torch.testing.assert_close(dense[sl, sl], Vb @ torch.diag(d) @ Vb.t(), **TOL)


# ---------------------------------------------------------------- Monte-Carlo with a seed
def test_mc_seed_makes_one_fixed_matrix():
    model, x, y = make("mlp", n=10)
    dl = loader(x, y, bs=4)
    lc = LayerCollection.from_model(model)
    v = PVector(lc, vector_repr=torch.randn(lc.numel(), dtype=torch.float64))
    imp = FIM_MonteCarlo(model, dl, PMatImplicit, trials=2, seed=3)
    a, b = imp.mv(v).to_torch(), imp.mv(v).to_torch()
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    d1 = FIM_MonteCarlo(model, dl, PMatDense, trials=2, seed=3).to_torch()
    d2 = FIM_MonteCarlo(model, dl, PMatDense, trials=2, seed=3).to_torch()
    torch.testing.assert_close(d1, d2, atol=0, rtol=0)
    # the implicit matrix is the dense one
    torch.testing.assert_close(a, d1 @ v.to_torch(), **TOL)
    # no global RNG use by the draws (a DataLoader's iterator itself draws its base seed)
    state = torch.random.get_rng_state()
    FIM_MonteCarlo(model, [(x[:4], y[:4]), (x[4:], y[4:])], PMatDiag, trials=2, seed=3)
    assert torch.equal(state, torch.random.get_rng_state())
    d3 = FIM_MonteCarlo(model, dl, PMatDense, trials=2, seed=4).to_torch()
    assert (d3 - d1).norm() > 1e-3 * d1.norm()


@pytest.mark.parametrize("variant", ["classif_logits", "regression"])
def test_mc_seeded_is_unbiased(variant):
    """Over many seeds the mean of the seeded estimates is the closed form (error bars)."""
    model, x, y = make("mlp", n=3)
    dl = [(x, y)]
    exact = FIM(model, dl, PMatDense, variant=variant).to_torch()
    ests = torch.stack([FIM_MonteCarlo(model, dl, PMatDense, variant=variant, trials=4,
                                       seed=s).to_torch() for s in range(300)])
    mean, se = ests.mean(0), ests.std(0) / 300 ** 0.5
    z = (mean - exact).abs() / (se + 1e-12)
    assert float(z.max()) < 5.5
    assert float((z < 2).double().mean()) > 0.85


def test_mc_sequence_per_position():
    """MC on (n, T, C): one label per position; the mean over seeds is the per-position
    closed form."""
    model, x, y = make("seq", n=2)
    dl = [(x, y)]
    exact = FIM(model, dl, PMatDense, class_dim=-1).to_torch()
    ests = torch.stack([FIM_MonteCarlo(model, dl, PMatDense, trials=4, seed=s,
                                       class_dim=-1).to_torch()
                        for s in range(300)])
    z = (ests.mean(0) - exact).abs() / (ests.std(0) / 300 ** 0.5 + 1e-12)
    assert float(z.max()) < 5.5


@pytest.mark.parametrize("kind", KINDS)
def test_mc_seeded_every_representation(kind):
    """Seeded FIM_MonteCarlo in every representation against brute force for the same draws:
    ``(1/n) Σ_i J_iᵀ U_iᵀ U_i J_i`` with ``U_i`` the gradients of the sampled log-likelihoods
    w.r.t. the outputs (the draws are a fixed function of the seed and the batch)."""
    from nngeometry import curvature as V
    model, x, y = make(kind)
    dl = [(x, y)]
    t = V.monte_carlo_function(lambda *b: model(b[0]), "classif_logits", 2, seed=7,
                               class_dim=-1)
    U = _dgdf(t, model, x, y)
    U = U.reshape(U.shape[0], U.shape[1], -1)  # (n, K, D)
    J = brute_jac(model, x)
    ref = torch.einsum("nkd,ndp,nke,neq->pq", U, J, U, J) / x.shape[0]
    lc = LayerCollection.from_model(model)

    def mc(rep):
        return FIM_MonteCarlo(model, dl, rep, trials=2, seed=7, class_dim=-1)
    torch.testing.assert_close(mc(PMatDense).to_torch(), ref, **TOL)
    torch.testing.assert_close(mc(PMatLowRank).to_torch(), ref, **TOL)
    torch.testing.assert_close(mc(PMatDiag).get_diag(), torch.diag(ref), **TOL)
    bd = mc(PMatBlockDiag).to_torch()
    torch.testing.assert_close(bd, torch.where(block_mask(lc), ref, torch.zeros_like(ref)), **TOL)
    v = torch.randn(ref.shape[0], dtype=torch.float64)
    torch.testing.assert_close(mc(PMatImplicit).mv(PVector(lc, vector_repr=v)).to_torch(),
                               ref @ v, **TOL)


@pytest.mark.parametrize("kind", ["mlp", "seq"])
def test_implicit_products_every_entry(kind):
    """PMatImplicit's vTMv and the generator's multi-vector product (vmapped torch.func paths)
    for GGN, EmpiricalFisher and seeded Monte-Carlo equal the dense matrix's."""
    model, x, y = make(kind)
    lc = LayerCollection.from_model(model)
    dl = [(x, y)]
    builds = (lambda r: GGN(model, dl, r, loss_function=ce_sum),
              lambda r: EmpiricalFisher(model, dl, r, loss_function=ce_sum),
              lambda r: FIM_MonteCarlo(model, dl, r, trials=3, seed=1, class_dim=-1))
    for build_it in builds:
        D = build_it(PMatDense).to_torch()
        imp = build_it(PMatImplicit)
        v = torch.randn(lc.numel(), dtype=torch.float64)
        torch.testing.assert_close(imp.vTMv(PVector(lc, vector_repr=v)), v @ D @ v, **TOL)
        V = torch.randn(3, lc.numel(), dtype=torch.float64)
        torch.testing.assert_close(imp.generator.implicit_mm(V, dl, lc), V @ D, **TOL)
