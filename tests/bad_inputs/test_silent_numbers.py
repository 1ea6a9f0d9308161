"""Cases that used to return a plausible wrong number: each is now exact against a brute-force
reference, or refused with an error that names the cause and the fix.

* an unpickled ``PMatImplicit`` / ``PMatEKFAC`` given a generator of another function;
* fractional negative powers of an indefinite ``PMatEKFAC``;
* randomness outside the modules (``F.dropout(x, training=True)``, ``torch.rand`` in forward);
* NaN / Inf that appear in the backward pass only;
* conjugate gradients / MINRES that do not converge;
* a module called twice in one forward (KFAC-expand over its calls; Dense and Diag exact).
"""
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jacrev, vmap

from brute import fim_dense, per_example_jacobian
from nngeometry import FIM, Hessian
from nngeometry.backend import TorchHooksJacobianBackend
from nngeometry.layercollection import LayerCollection
from nngeometry.object import (PMatDense, PMatDiag, PMatEKFAC, PMatImplicit, PMatKFAC, PVector,
                               random_pvector)
from nngeometry.object.pspace._checks import (NotPositiveSemiDefiniteError,
                                              SolverNotConvergedError)
from nngeometry.solve import cg, minres
from nngeometry.curvature import closed_form_function

DT = torch.float64


def mlp_and_data(n=6):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT).eval()
    x = torch.randn(n, 3, dtype=DT)
    y = torch.randint(0, 3, (n,))
    return model, x, y


# ---------------------------------------------------------------- re-attached generators
def test_reattached_generator_of_another_function_is_refused():
    model, x, y = mlp_and_data()
    ref = fim_dense(model, x)
    M = pickle.loads(pickle.dumps(FIM(model, [(x, y)], PMatImplicit)))
    v = random_pvector(M.layer_collection, dtype=DT)
    # the bare model's generator differentiates the logits, not the Fisher's function
    for gen in (TorchHooksJacobianBackend(model),
                TorchHooksJacobianBackend(model, function=lambda *b: model(b[0]))):
        M.generator = gen
        with pytest.raises(RuntimeError, match="another function.*closed_form_function"):
            M.mv(v)
    # the same function: exact
    M.generator = TorchHooksJacobianBackend(
        model, closed_form_function(lambda *b: model(b[0]), "classif_logits"))
    torch.testing.assert_close(M.mv(v).get_flat_representation(),
                               ref @ v.get_flat_representation(), rtol=1e-10, atol=1e-12)


def test_reattached_generator_of_another_function_is_refused_by_ekfac():
    model, x, y = mlp_and_data()
    E = pickle.loads(pickle.dumps(FIM(model, [(x, y)], PMatEKFAC)))
    E.generator = TorchHooksJacobianBackend(model)
    with pytest.raises(RuntimeError, match="another function"):
        E.update_diag([(x, y)])


# ---------------------------------------------------------------- indefinite EKFAC powers
@pytest.mark.parametrize("power", [-0.5, 0.5])
@pytest.mark.parametrize("regul", [0.0, 0.05])
def test_ekfac_fractional_power_of_indefinite_matrix_is_refused(power, regul):
    model, x, y = mlp_and_data()
    E = -1.0 * FIM(model, [(x, y)], PMatEKFAC)
    with pytest.raises(NotPositiveSemiDefiniteError, match="negative eigenvalue"):
        E.pow(power, regul=regul)
    # PSD: the power is exact in the eigenbasis
    P = FIM(model, [(x, y)], PMatEKFAC)
    d = P.to_torch()
    w, U = torch.linalg.eigh(d + 0.05 * torch.eye(d.shape[0], dtype=DT))
    torch.testing.assert_close(P.pow(-0.5, regul=0.05).to_torch(),
                               U @ torch.diag(w ** -0.5) @ U.t(), rtol=1e-8, atol=1e-10)


# ---------------------------------------------------------------- randomness outside modules
class FunctionalDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        return F.dropout(self.lin(x), 0.5, training=True)


class Noise(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        return self.lin(x) + 0.1 * torch.rand_like(x)


class UnusedDraw(nn.Module):
    """Draws from the RNG but its outputs do not depend on the draw: deterministic."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        torch.rand(3)
        return self.lin(x)


@pytest.mark.parametrize("cls", [FunctionalDropout, Noise])
@pytest.mark.parametrize("rep", [PMatDense, PMatImplicit])
def test_randomness_outside_modules_is_refused(cls, rep):
    torch.manual_seed(0)
    model = cls().to(DT).eval()
    x, y = torch.randn(5, 3, dtype=DT), torch.randint(0, 3, (5,))
    state = torch.get_rng_state()
    with pytest.raises(RuntimeError, match="every module is in eval mode.*training=self.training"):
        M = FIM(model, [(x, y)], rep)
        M.mv(random_pvector(M.layer_collection, dtype=DT))
    # opting out computes (one draw of) the random matrix
    FIM(model, [(x, y)], PMatDense, check_deterministic=False)
    assert not torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("rep", [PMatDense, PMatImplicit])
def test_randomness_outside_modules_is_refused_by_the_hessian(rep):
    torch.manual_seed(0)
    model = FunctionalDropout().to(DT).eval()
    x, y = torch.randn(5, 3, dtype=DT), torch.randint(0, 3, (5,))
    with pytest.raises(RuntimeError, match="not deterministic.*training=self.training"):
        H = Hessian(model, [(x, y)], rep)
        H.mv(random_pvector(H.layer_collection, dtype=DT))


def test_rng_draw_without_effect_is_accepted():
    torch.manual_seed(0)
    model = UnusedDraw().to(DT).eval()
    x, y = torch.randn(5, 3, dtype=DT), torch.randint(0, 3, (5,))
    # the reference: the same linear map without the draw (torch.func's vmap refuses draws)
    torch.testing.assert_close(FIM(model, [(x, y)], PMatDense).to_torch(),
                               fim_dense(model.lin, x), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- NaN / Inf in the backward pass
class SqrtOfSquare(nn.Module):
    """``sqrt(h²)``: finite outputs, but a NaN gradient where ``h = 0``."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(3, 3)
        self.l2 = nn.Linear(3, 3)

    def forward(self, x):
        h = self.l1(x)
        return self.l2(torch.sqrt(h * h))


def nan_backward_model():
    torch.manual_seed(0)
    model = SqrtOfSquare().to(DT).eval()
    with torch.no_grad():
        model.l1.weight[0].zero_()
        model.l1.bias[0] = 0.0  # h[:, 0] = 0 for every example
    x, y = torch.randn(4, 3, dtype=DT), torch.randint(0, 3, (4,))
    return model, [(x, y)]


@pytest.mark.parametrize("rep", [PMatDense, PMatDiag, PMatKFAC, PMatEKFAC])
def test_nonfinite_backward_is_refused(rep):
    model, ex = nan_backward_model()
    with pytest.raises(ValueError, match="statistics of layer\\(s\\) 'l1' contain NaN or Inf.*"
                                         "backward pass.*set_detect_anomaly"):
        FIM(model, ex, rep)


def test_nonfinite_backward_is_refused_by_merged_statistics():
    from nngeometry.backend import consumers as C

    model, ex = nan_backward_model()
    lc = LayerCollection.from_model(model)
    gen = TorchHooksJacobianBackend(model)
    stat = gen.accumulate(ex, lc, C.DiagCovariance(lc), finalize=False)
    with pytest.raises(ValueError, match="statistics of layer\\(s\\) 'l1' contain NaN"):
        stat.compute()


def test_nonfinite_backward_is_refused_by_implicit_products():
    model, ex = nan_backward_model()
    M = FIM(model, ex, PMatImplicit)
    v = random_pvector(M.layer_collection, dtype=DT)
    with pytest.raises(ValueError, match="implicit_mv: the product contains NaN.*backward"):
        M.mv(v)
    with pytest.raises(ValueError, match="NaN or Inf"):
        M.solve(v, regul=1.0)
    with pytest.raises(ValueError, match="the vector multiplied contains NaN"):
        mlp, x, y = mlp_and_data()
        Mm = FIM(mlp, [(x, y)], PMatImplicit)
        Mm.mv(PVector(Mm.layer_collection, vector_repr=torch.full(
            (Mm.layer_collection.numel(),), float("nan"), dtype=DT)))


# ---------------------------------------------------------------- solvers that do not converge
def test_implicit_cg_on_singular_matrix_raises_unless_asked_for_the_iterate():
    model, x, y = mlp_and_data(n=2)  # 2 examples × 3 outputs: rank ≤ 4 < P = 31
    M = FIM(model, [(x, y)], PMatImplicit)
    torch.manual_seed(1)
    b = random_pvector(M.layer_collection, dtype=DT)  # not in the range of M
    with pytest.raises(SolverNotConvergedError, match="did not converge.*regul > 0.*"
                                                      "return_info=True"):
        M.solve(b, regul=0.0)
    y_, info = M.solve(b, regul=0.0, return_info=True)
    assert not info["converged"] and info["iterations"] == M.layer_collection.numel()
    D = fim_dense(model, x)
    r = b.get_flat_representation() - D @ y_.get_flat_representation()
    # the iterate is not a solution, and the residual reported says so
    assert info["relative_residual"] > 1e-3 and r.norm() > 1e-3 * b.get_flat_representation().norm()
    # damped: converges, exact, and says so
    y2, info2 = M.solve(b, regul=0.1, return_info=True)
    assert info2["converged"]
    torch.testing.assert_close(y2.get_flat_representation(), torch.linalg.solve(
        D + 0.1 * torch.eye(D.shape[0], dtype=DT), b.get_flat_representation()),
        rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("solver", [cg, minres])
def test_iterative_solvers_raise_when_they_stop_early(solver):
    torch.manual_seed(0)
    model = nn.Linear(4, 2).to(DT)
    lc = LayerCollection.from_model(model)
    P = lc.numel()
    R = torch.randn(P, P, dtype=DT)
    A = PMatDense(lc, data=R @ R.t())
    b = PVector(lc, vector_repr=torch.randn(P, dtype=DT))
    with pytest.raises(SolverNotConvergedError, match=f"{solver.__name__}: the iterative solve "
                                                      "did not converge: 2 iterations"):
        solver(A, b, regul=1e-2, rtol=1e-12, max_iter=2)
    x, info = solver(A, b, regul=1e-2, rtol=1e-12, max_iter=2, return_info=True)
    assert not info.converged and info.iterations == 2


# ---------------------------------------------------------------- a module called twice
def twice_model():
    torch.manual_seed(0)
    lin = nn.Linear(3, 3).to(DT)
    model = nn.Sequential(lin, nn.Tanh(), lin).eval()
    x = torch.randn(5, 3, dtype=DT)
    return lin, model, x


def test_module_called_twice_dense_and_diag_are_exact():
    lin, model, x = twice_model()
    ex = [(x, torch.zeros(5))]
    lc = LayerCollection.from_model(model)
    assert list(lc.layer_ids()) == ["0"]

    def f(w, b, xi):
        return F.linear(torch.tanh(F.linear(xi, w, b)), w, b)

    # the per-example gradient through both calls, in the flat layout (weight, then bias)
    Jw, Jb = vmap(jacrev(f, argnums=(0, 1)), (None, None, 0))(lin.weight.detach(),
                                                              lin.bias.detach(), x)
    J = torch.cat([Jw.reshape(*Jw.shape[:2], -1), Jb], dim=2)
    ref = torch.einsum("nkp,nkq->pq", J, J) / x.shape[0]
    D = FIM(model, ex, PMatDense, variant="regression").to_torch()
    torch.testing.assert_close(D, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(FIM(model, ex, PMatDiag, variant="regression").get_diag(),
                               torch.diagonal(ref), rtol=1e-10, atol=1e-12)


def test_module_called_twice_kfac_is_expand_over_the_calls():
    lin, model, x = twice_model()
    n, d = x.shape
    W, b = lin.weight.detach(), lin.bias.detach()

    def out_of_use_outputs(e1, e2, xi):
        # the model with a perturbation added to each call's output
        return lin(torch.tanh(lin(xi) + e1)) + e2

    zero = torch.zeros(d, dtype=DT)
    g1, g2 = vmap(jacrev(out_of_use_outputs, argnums=(0, 1)), (None, None, 0))(zero, zero, x)
    # g_r[i, k, :]: gradient of output k w.r.t. call r's output, example i
    h1 = x @ W.t() + b
    a1 = torch.cat([x, torch.ones(n, 1, dtype=DT)], 1)
    a2 = torch.cat([torch.tanh(h1), torch.ones(n, 1, dtype=DT)], 1)
    R = 2
    A = (a1.t() @ a1 + a2.t() @ a2) / n
    G = (torch.einsum("iko,ikp->op", g1, g1) + torch.einsum("iko,ikp->op", g2, g2)) / (n * R)
    # the Kronecker product G ⊗ A in the flat layout (weight row-major, then bias)
    kron = torch.einsum("op,jq->ojpq", G, A)  # (out, in+1, out, in+1)
    idx = [o * d + j if j < d else d * d + o for o in range(d) for j in range(d + 1)]
    P = d * d + d
    ref = torch.zeros(P, P, dtype=DT)
    ref[torch.tensor(idx)[:, None], torch.tensor(idx)[None, :]] = kron.reshape(len(idx), len(idx))
    K = FIM(model, [(x, torch.zeros(n))], PMatKFAC, variant="regression")
    torch.testing.assert_close(K.to_torch(), ref, rtol=1e-10, atol=1e-12)
    # one call: the same rule gives the exact block
    single = nn.Sequential(lin).eval()
    Js = per_example_jacobian(single, x)
    torch.testing.assert_close(
        FIM(single, [(x, torch.zeros(n))], PMatKFAC, variant="regression").to_torch(),
        torch.einsum("nkp,nkq->pq", Js, Js) / n, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["linear", "embedding"])
def test_calls_with_different_position_counts_are_weighted_by_them(kind):
    """A module called on 1 position, then on 3 (and an unused split): its KFAC equals that of
    one call on the 4 positions put together (each location of the shared weight counts once,
    as positions do in 'expand'), for each call's own factors."""
    torch.manual_seed(0)

    class Split(nn.Module):
        def __init__(self, joint):
            super().__init__()
            self.joint = joint
            self.lay = nn.Linear(3, 3) if kind == "linear" else nn.Embedding(6, 3)
            self.head = nn.Linear(3, 2)

        def forward(self, x):
            h = self.lay(x) if self.joint else \
                torch.cat([self.lay(x[:, :1]), self.lay(x[:, 1:])], 1)
            return self.head(torch.tanh(h)).sum(1)

    split, joint = Split(False).to(DT), Split(True).to(DT)
    joint.load_state_dict(split.state_dict())
    x = torch.randn(5, 4, 3, dtype=DT) if kind == "linear" else torch.randint(0, 6, (5, 4))
    ks = FIM(split, (x,), PMatKFAC, n_output=2).to_torch()
    torch.testing.assert_close(ks, FIM(joint, (x,), PMatKFAC, n_output=2).to_torch(),
                               rtol=1e-10, atol=1e-12)
    assert ks.abs().max() > 0
