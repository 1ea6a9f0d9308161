"""Influence with LiSSA solves of the implicit curvature, with a PMatMixed curvature, and
pairwise scores resumed from a checkpoint: against brute force (torch.func per-example
gradients, the dense GGN, torch.linalg.solve) in float64."""
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from test_influence_exact import N_TRAIN, brute_ggn_ce, brute_grads, expected, make

from nngeometry.influence import Influence
from nngeometry.object import PMatImplicit

LAM = 2.0
#: mini-batch LiSSA (4 of the 10 examples per step, 20 steps, s = 1.25 μ_max): the largest
#: relative error of the scores allowed for a seed (seeds 0-7 gave 0.07 to 0.135)
MINIBATCH_BOUND = 0.25


def one_batch_loaders(x, y):
    # one batch each: every LiSSA step is one pass of one batch
    train = DataLoader(TensorDataset(x[:N_TRAIN], y[:N_TRAIN]), batch_size=N_TRAIN)
    query = DataLoader(TensorDataset(x[N_TRAIN:], y[N_TRAIN:]), batch_size=len(x) - N_TRAIN)
    return train, query


def lissa_problem():
    model, x, y, _, _ = make()
    train, query = one_batch_loaders(x, y)
    gz, gq = brute_grads(model, x[:N_TRAIN], y[:N_TRAIN]), brute_grads(model, x[N_TRAIN:], y[N_TRAIN:])
    G = brute_ggn_ce(model, x[:N_TRAIN])
    A = G + LAM * torch.eye(G.shape[0], dtype=torch.float64)
    return model, train, query, expected(G, A - G, gq, gz), torch.linalg.eigvalsh(A)


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_full_batch_lissa_converges_to_the_damped_solve():
    model, train, query, want, mu = lissa_problem()
    s = float(mu.max())
    # the error after `depth` steps is at most (1 − μ_min / s)^(depth + 1) of the solution's
    depth = 20
    bound = (1 - float(mu.min()) / s) ** (depth + 1)
    assert bound < 1e-9
    inf = Influence(model, PMatImplicit, damping=LAM, solver="lissa",
                    solve_options={"depth": depth, "scale": s}).fit(train)
    got = inf.pairwise_scores(train, query)
    assert rel(got, want) < 1e-8
    # too few steps leave an error of the predicted size
    short = Influence(model, PMatImplicit, damping=LAM, solver="lissa",
                      solve_options={"depth": 3, "scale": s}).fit(train)
    assert rel(short.pairwise_scores(train, query), want) > 1e-3


def test_minibatch_lissa_error_over_seeds():
    model, train, query, want, mu = lissa_problem()
    # mini-batch curvatures have larger eigenvalues than the full one: a wider scale
    opts = {"depth": 20, "scale": 1.25 * float(mu.max()), "batch_size": 4}
    errors, runs = [], []
    for seed in range(2):
        inf = Influence(model, PMatImplicit, damping=LAM, solver="lissa",
                        solve_options=dict(opts, seed=seed)).fit(train)
        runs.append(inf.pairwise_scores(train, query))
        errors.append(rel(runs[-1], want))
    # stochastic (the draws matter), and within BOUND of the exact scores
    assert all(1e-6 < e < MINIBATCH_BOUND for e in errors), errors
    assert not torch.equal(runs[0], runs[1])
    again = Influence(model, PMatImplicit, damping=LAM, solver="lissa",
                      solve_options=dict(opts, seed=0)).fit(train)
    assert torch.equal(again.pairwise_scores(train, query), runs[0])


def test_lissa_default_scale_and_divergence():
    model, train, query, want, mu = lissa_problem()
    inf = Influence(model, PMatImplicit, damping=LAM, solver="lissa",
                    solve_options={"depth": 25}).fit(train)
    got = inf.pairwise_scores(train, query)
    # the estimated scale lies in [μ_max, 1.25 μ_max]
    assert float(mu.max()) * 0.99 < inf._lissa_scale <= 1.25 * float(mu.max()) * (1 + 1e-9)
    assert rel(got, want) < 1e-8
    bad = Influence(model, PMatImplicit, damping=LAM, solver="lissa",
                    solve_options={"depth": 16, "scale": 0.1 * float(mu.max())}).fit(train)
    with pytest.raises(ValueError, match="diverged.*scale"):
        bad.pairwise_scores(train, query)


def test_lissa_bad_options():
    model, _, _, _, _ = make()
    from nngeometry.object import PMatDense
    with pytest.raises(ValueError, match="representation=PMatImplicit"):
        Influence(model, PMatDense, solver="lissa")
    with pytest.raises(ValueError, match="'cg'.*'lissa'"):
        Influence(model, PMatImplicit, solver="newton")
    with pytest.raises(ValueError, match="unknown.*tol"):
        Influence(model, PMatImplicit, solver="lissa", solve_options={"tol": 1e-8})
    for key, value in (("depth", 0), ("repeats", 1.5), ("batch_size", 0), ("scale", -1.0),
                       ("scale", float("nan"))):
        with pytest.raises(ValueError, match=key):
            Influence(model, PMatImplicit, solver="lissa", solve_options={key: value})


@pytest.mark.parametrize("parts", [("PMatEKFAC", "PMatDense"), ("PMatKFAC", "PMatDiag")])
def test_mixed_matches_its_own_matrix_and_saves(parts, tmp_path):
    import nngeometry.object as O
    from test_influence_exact import damping_matrix
    model, x, y, train, query = make()
    gz, gq = brute_grads(model, x[:N_TRAIN], y[:N_TRAIN]), brute_grads(model, x[N_TRAIN:], y[N_TRAIN:])
    options = {"layer_map": {"0": "a", "2": "b"},
               "sub_pmats": {"a": getattr(O, parts[0]), "b": getattr(O, parts[1])}}
    inf = Influence(model, O.PMatMixed, damping="heuristic", curvature_options=options).fit(train)
    G = inf.matrix.to_torch()
    P = G.shape[0]
    # block-diagonal over the groups
    assert torch.all(G[:inf.layer_collection.numel() - 18, -18:] == 0)
    got = inf.pairwise_scores(train, query)
    assert torch.allclose(got, expected(G, damping_matrix(inf, P), gq, gz), rtol=1e-8, atol=0)
    # a group's block is the one its representation builds alone on those layers (EKFAC's
    # eigenvalues refitted)
    alone = Influence(model, getattr(O, parts[0]),
                      layer_collection=inf.layer_collection.sub(["0"])).fit(train)
    assert torch.allclose(inf.matrix.data["a"].to_torch(), alone.matrix.to_torch(),
                          rtol=1e-10, atol=1e-14)
    # saved with torch.save, loaded with the defaults
    torch.save(inf.state_dict(), tmp_path / "mixed.pt")
    back = Influence(model, O.PMatMixed, curvature_options=options).load_state_dict(
        torch.load(tmp_path / "mixed.pt"))
    assert torch.equal(back.pairwise_scores(train, query), got)


def test_mixed_needs_its_groups():
    from nngeometry.object import PMatMixed
    model, *_ = make()
    with pytest.raises(ValueError, match="sub_pmats"):
        Influence(model, PMatMixed)


class Interrupted(Exception):
    pass


def stopping_after(loader, k):
    """The loader's batches, then an interruption after ``k`` of them."""
    for i, b in enumerate(loader):
        if i == k:
            raise Interrupted
        yield b


@pytest.mark.parametrize("per_layer", [False, True])
def test_resumed_scores_equal_an_uninterrupted_run(per_layer, tmp_path):
    from nngeometry.object import PMatDiag
    model, x, y, _, query = make()
    train = DataLoader(TensorDataset(x[:N_TRAIN], y[:N_TRAIN]), batch_size=2)  # 5 batches
    inf = Influence(model, PMatDiag, damping=0.1).fit(train)
    whole = inf.pairwise_scores(train, query, per_layer=per_layer)
    path = tmp_path / "scores.pt"
    with pytest.raises(Interrupted):
        inf.pairwise_scores(stopping_after(train, 3), query, per_layer=per_layer,
                            checkpoint=path, checkpoint_every=2)
    saved = torch.load(path)
    assert saved["batches"] == 2 and saved["scores"].shape[-1] == 4
    # resumed: the saved queries, the 3 remaining batches
    resumed = inf.pairwise_scores(train, per_layer=per_layer, checkpoint=path,
                                  checkpoint_every=2)
    assert torch.equal(resumed, whole)
    assert torch.load(path)["batches"] == 5
    # a finished checkpoint: nothing left to compute, the same scores
    assert torch.equal(inf.pairwise_scores(train, per_layer=per_layer, checkpoint=path), whole)


def test_checkpoint_bad_inputs(tmp_path):
    from nngeometry.object import PMatDiag
    model, x, y, train, query = make()
    inf = Influence(model, PMatDiag, damping=0.1).fit(train)
    path = tmp_path / "s.pt"
    with pytest.raises(ValueError, match="checkpoint_every"):
        inf.pairwise_scores(train, query, checkpoint=path, checkpoint_every=0)
    inf.pairwise_scores(train, query, checkpoint=path)
    with pytest.raises(ValueError, match="per_layer"):
        inf.pairwise_scores(train, per_layer=True, checkpoint=path)
    other = inf.precondition(DataLoader(TensorDataset(x[:2], y[:2])))
    with pytest.raises(ValueError, match="differ from those saved"):
        inf.pairwise_scores(train, queries=other, checkpoint=path)
    with pytest.raises(ValueError, match="yields fewer"):
        inf.pairwise_scores([next(iter(train))], checkpoint=path)


def test_sharded_model_is_refused():
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    from torch import nn

    class Sharded(fsdp.FSDPModule, nn.Sequential):
        pass
    inner = nn.Sequential(nn.Linear(2, 2).double())
    inner.__class__ = Sharded  # what fully_shard does to a module
    with pytest.raises(ValueError, match="FSDP.*not supported"):
        Influence(nn.Sequential(inner))
