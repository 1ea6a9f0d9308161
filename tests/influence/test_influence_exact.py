"""Influence scores against brute force: per-example gradients from torch.func, the curvature
either brute-force too (Dense, Implicit) or the representation's own matrix (to_torch()), and
(G + Λ)⁻¹ by torch.linalg.solve, all in float64."""
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, TensorDataset

import nngeometry.influence as influence_module
from nngeometry.influence import HEURISTIC_FACTOR, Influence
from nngeometry.object import (PMatBlockDiag, PMatDense, PMatDiag, PMatEKFAC, PMatEye,
                               PMatImplicit, PMatKFAC, PMatLowRank)

N_TRAIN, N_QUERY = 10, 3


def make(out=3):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, out)).double()
    x = torch.randn(N_TRAIN + N_QUERY, 4, dtype=torch.float64)
    y = torch.randint(0, out, (N_TRAIN + N_QUERY,))
    train = DataLoader(TensorDataset(x[:N_TRAIN], y[:N_TRAIN]), batch_size=4)
    query = DataLoader(TensorDataset(x[N_TRAIN:], y[N_TRAIN:]), batch_size=2)
    return model, x, y, train, query


def brute_grads(model, x, y, loss=None):
    """``(n, P)``: ∇θ of each example's loss, in the collection's layout (parameters order)."""
    names = [k for k, _ in model.named_parameters()]
    params = {k: p.detach() for k, p in model.named_parameters()}
    loss = loss or (lambda out, t: F.cross_entropy(out, t, reduction="none"))

    def f(p, xi, yi):
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return loss(out, yi.unsqueeze(0)).sum()
    g = vmap(grad(f), (None, 0, 0))(params, x, y)
    return torch.cat([g[k].reshape(x.shape[0], -1) for k in names], dim=1)


def brute_ggn_ce(model, x):
    """The GGN of the cross-entropy (the closed-form Fisher), brute force."""
    from brute import fim_dense
    return fim_dense(model, x)


def damping_matrix(inf, P):
    lam = inf.damping_value
    if not isinstance(lam, dict):
        return float(lam) * torch.eye(P, dtype=torch.float64)
    lc = inf.layer_collection
    d = torch.zeros(P, dtype=torch.float64)
    for lid in lc.layer_ids():
        d[lc.slice(lid)] = lam[lid]
    return torch.diag(d)


def expected(G, Lam, gq, gz):
    return gq @ torch.linalg.solve(G + Lam, gz.t())


def test_dense_ggn_and_empirical_match_brute_force():
    model, x, y, train, query = make()
    gz, gq = brute_grads(model, x[:N_TRAIN], y[:N_TRAIN]), brute_grads(model, x[N_TRAIN:], y[N_TRAIN:])
    P = gz.shape[1]
    # the GGN of the cross-entropy (default curvature)
    inf = Influence(model, PMatDense, damping=1e-3).fit(train)
    want = expected(brute_ggn_ce(model, x[:N_TRAIN]), 1e-3 * torch.eye(P, dtype=torch.float64),
                    gq, gz)
    got = inf.pairwise_scores(train, query)
    assert got.shape == (N_QUERY, N_TRAIN)
    assert torch.allclose(got, want, rtol=1e-8, atol=0)
    # the empirical Fisher: G = (1/n) Σ g gᵀ from the same brute-force gradients
    inf = Influence(model, PMatDense, damping=0.05, curvature="empirical").fit(train)
    G = gz.t() @ gz / N_TRAIN
    got = inf.pairwise_scores(train, query)
    assert torch.allclose(got, expected(G, 0.05 * torch.eye(P, dtype=torch.float64), gq, gz),
                          rtol=1e-8, atol=0)
    # self-influence: the diagonal of the train × train scores
    self_want = torch.einsum("ip,pi->i", gz, torch.linalg.solve(G + 0.05 * torch.eye(P, dtype=torch.float64), gz.t()))
    assert torch.allclose(inf.self_scores(train), self_want, rtol=1e-8, atol=0)
    per_layer = inf.self_scores(train, per_layer=True)
    assert per_layer.shape == (2, N_TRAIN)
    assert torch.allclose(per_layer.sum(0), self_want, rtol=1e-8, atol=0)


def test_implicit_cg_matches_brute_force():
    model, x, y, _, _ = make()
    train = [(x[:N_TRAIN], y[:N_TRAIN])]  # one batch: each CG iteration is one pass
    query = (x[N_TRAIN:], y[N_TRAIN:])
    gz, gq = brute_grads(model, x[:N_TRAIN], y[:N_TRAIN]), brute_grads(model, x[N_TRAIN:], y[N_TRAIN:])
    P = gz.shape[1]
    inf = Influence(model, PMatImplicit, damping=0.1, curvature="empirical",
                    solve_options={"tol": 1e-13}).fit(train)
    G = gz.t() @ gz / N_TRAIN
    got = inf.pairwise_scores(train, query)
    assert torch.allclose(got, expected(G, 0.1 * torch.eye(P, dtype=torch.float64), gq, gz),
                          rtol=1e-8, atol=0)


@pytest.mark.parametrize("rep", [PMatEKFAC, PMatKFAC, PMatDiag, PMatBlockDiag, PMatLowRank])
def test_structured_matches_its_own_matrix(rep):
    """EKFAC/KFAC/Diag/BlockDiag/LowRank: the formula with that representation's matrix, the
    heuristic per-layer damping a tenth of each layer block's mean eigenvalue."""
    model, x, y, train, query = make()
    gz, gq = brute_grads(model, x[:N_TRAIN], y[:N_TRAIN]), brute_grads(model, x[N_TRAIN:], y[N_TRAIN:])
    inf = Influence(model, rep, damping="heuristic").fit(train)
    M = inf.matrix.to_torch()
    lc = inf.layer_collection
    for lid in lc.layer_ids():
        s = lc.slice(lid)
        want = HEURISTIC_FACTOR * torch.diagonal(M[s, s]).mean()
        assert abs(inf.damping_value[lid] - want) <= 1e-12 * want
    got = inf.pairwise_scores(train, query)
    assert torch.allclose(got, expected(M, damping_matrix(inf, M.shape[0]), gq, gz),
                          rtol=1e-8, atol=0)
    per_layer = inf.pairwise_scores(train, query, per_layer=True)
    assert per_layer.shape == (2, N_QUERY, N_TRAIN)
    assert torch.allclose(per_layer.sum(0), got, rtol=1e-10, atol=1e-14)


def test_ekfac_eigenvalues_are_refitted():
    """After the refit, each layer block of EKFAC has the trace of the curvature's block (the
    refitted eigenvalues are diag(Uᵀ G U)); KFAC's does not."""
    model, x, y, train, _ = make()
    gz = brute_grads(model, x[:N_TRAIN], y[:N_TRAIN])
    G = gz.t() @ gz / N_TRAIN
    ek = Influence(model, PMatEKFAC, curvature="empirical").fit(train).matrix.to_torch()
    kf = Influence(model, PMatKFAC, curvature="empirical").fit(train).matrix.to_torch()
    lc = Influence(model).layer_collection
    for lid in lc.layer_ids():
        s = lc.slice(lid)
        assert torch.allclose(torch.trace(ek[s, s]), torch.trace(G[s, s]), rtol=1e-10)
        assert not torch.allclose(torch.trace(kf[s, s]), torch.trace(G[s, s]), rtol=1e-3)


def test_identity_is_gradient_similarity_and_per_layer_damping():
    model, x, y, train, query = make()
    gz, gq = brute_grads(model, x[:N_TRAIN], y[:N_TRAIN]), brute_grads(model, x[N_TRAIN:], y[N_TRAIN:])
    inf = Influence(model, PMatEye, damping=0.0).fit(train)
    assert torch.allclose(inf.pairwise_scores(train, query), gq @ gz.t(), rtol=1e-12, atol=0)
    inf = Influence(model, PMatDiag, damping={"0": 0.3, "2": 0.01}).fit(train)
    M = inf.matrix.to_torch()
    assert torch.allclose(inf.pairwise_scores(train, query),
                          expected(M, damping_matrix(inf, M.shape[0]), gq, gz), rtol=1e-8, atol=0)


def test_regression_loss_and_separate_measurement():
    model, x, _, _, _ = make(out=2)
    yr = torch.randn(N_TRAIN + N_QUERY, 2, dtype=torch.float64)
    train = DataLoader(TensorDataset(x[:N_TRAIN], yr[:N_TRAIN]), batch_size=4)
    query = DataLoader(TensorDataset(x[N_TRAIN:], yr[N_TRAIN:]), batch_size=3)
    mse = lambda out, t: ((out - t) ** 2).sum(1)  # noqa: E731
    meas = lambda out, t: out[:, 0] * t[:, 1]  # noqa: E731
    gz = brute_grads(model, x[:N_TRAIN], yr[:N_TRAIN], mse)
    gq = brute_grads(model, x[N_TRAIN:], yr[N_TRAIN:], meas)
    # the GGN of the squared error: 2 JᵀJ
    from brute import per_example_jacobian
    J = per_example_jacobian(model, x[:N_TRAIN])
    G = 2 * torch.einsum("nkp,nkq->pq", J, J) / N_TRAIN
    inf = Influence(model, PMatDense, damping=1e-2, loss_function="mse", measurement=meas).fit(train)
    assert torch.allclose(inf.matrix.to_torch(), G, rtol=1e-10, atol=1e-13)
    P = G.shape[0]
    assert torch.allclose(inf.pairwise_scores(train, query),
                          expected(G, 1e-2 * torch.eye(P, dtype=torch.float64), gq, gz),
                          rtol=1e-8, atol=0)


def test_low_rank_queries_and_storage_dtype(monkeypatch):
    model, x, y, train, query = make()
    gz, gq = brute_grads(model, x[:N_TRAIN], y[:N_TRAIN]), brute_grads(model, x[N_TRAIN:], y[N_TRAIN:])
    inf = Influence(model, PMatEKFAC, damping=1e-2, query_rank=1).fit(train)
    lc = inf.layer_collection
    Q = torch.linalg.solve(inf.matrix.to_torch() + 1e-2 * torch.eye(gq.shape[1], dtype=torch.float64), gq.t()).t()
    want = torch.zeros(N_QUERY, N_TRAIN, dtype=torch.float64)
    for lid in lc.layer_ids():
        s = lc.slice(lid)
        W = lc[lid].weight.size
        mat = torch.cat([Q[:, s][:, :W[0] * W[1]].reshape(-1, *W), Q[:, s][:, W[0] * W[1]:, None]], 2)
        U, S, Vh = torch.linalg.svd(mat)
        r1 = S[:, :1, None] * U[:, :, :1] @ Vh[:, :1, :]
        flat = torch.cat([r1[:, :, :-1].reshape(N_QUERY, -1), r1[:, :, -1]], 1)
        want += flat @ gz[:, s].t()
    queries = inf.precondition(query)
    L, R = queries["layers"]["0"]
    assert L.shape == (N_QUERY, 5, 1) and R.shape == (N_QUERY, 5, 1)
    assert torch.allclose(inf.pairwise_scores(train, queries=queries), want, rtol=1e-8, atol=1e-14)
    # the queries solved and the low-rank rows expanded one query at a time: the same scores
    monkeypatch.setattr(influence_module, "_SCORE_CHUNK_BYTES", 1)
    monkeypatch.setattr(influence_module, "_SOLVE_CHUNK_BYTES", 1)
    assert torch.allclose(inf.pairwise_scores(train, query), want, rtol=1e-8, atol=1e-14)
    monkeypatch.undo()
    # float32 storage: the scores to float32 precision
    inf32 = Influence(model, PMatEKFAC, damping=1e-2, dtype=torch.float32).fit(train)
    full = Influence(model, PMatEKFAC, damping=1e-2).fit(train).pairwise_scores(train, query)
    q32 = inf32.precondition(query)
    assert q32["layers"]["0"].dtype == torch.float32
    got = inf32.pairwise_scores(train, queries=q32)
    assert got.dtype == torch.float64
    assert torch.allclose(got, full, rtol=1e-5, atol=1e-6 * full.abs().max())


def test_save_and_load_with_plain_torch_load():
    model, x, y, train, query = make()
    for rep in (PMatEKFAC, PMatKFAC, PMatDense, PMatEye):
        inf = Influence(model, rep).fit(train)
        want = inf.pairwise_scores(train, query)
        buf = io.BytesIO()
        torch.save({"state": inf.state_dict(), "queries": inf.precondition(query)}, buf)
        buf.seek(0)
        loaded = torch.load(buf)  # weights_only by default: plain tensors, dicts and numbers
        other = Influence(model, rep).load_state_dict(loaded["state"])
        assert torch.equal(other.pairwise_scores(train, queries=loaded["queries"]), want)
        assert torch.allclose(other.pairwise_scores(train, query), want, rtol=1e-12, atol=0)


def test_bad_inputs():
    model, x, y, train, query = make()
    with pytest.raises(ValueError, match="heuristic"):
        Influence(model, damping="mean")
    with pytest.raises(ValueError, match="≥ 0"):
        Influence(model, damping=-1.0)
    with pytest.raises(ValueError, match="query_rank"):
        Influence(model, query_rank=0)
    with pytest.raises(ValueError, match="curvature"):
        Influence(model, curvature="hessian")
    with pytest.raises(TypeError, match="PMat"):
        Influence(model, representation="ekfac")
    inf = Influence(model, PMatDiag)
    with pytest.raises(RuntimeError, match="fit"):
        inf.pairwise_scores(train, query)
    inf.fit(train)
    with pytest.raises(ValueError, match="exactly one"):
        inf.pairwise_scores(train)
    with pytest.raises(ValueError, match="one λ per layer"):
        Influence(model, PMatDiag, damping={"0": 1.0}).fit(train)
    with pytest.raises(ValueError, match="PMatImplicit stores no matrix"):
        Influence(model, PMatImplicit, damping=1.0).fit(train).state_dict()
