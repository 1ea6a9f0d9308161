"""Data parallelism over torch.distributed: 2 and 3 CPU processes (gloo), float64. Every rank's
result must equal the single-process result on the whole data set to 1e-10, for every
representation and entry point, with uneven shards and a rank whose shard is empty.

Process start-up costs seconds, so there are only two spawns (2 ranks with uneven shards; 3
ranks, one of them with no example), each running every check and writing its results to a
file that the parent compares with a single-process run. The batches are dealt to the ranks in
turn (rank r takes batches r, r + W, ...), the sharding under which a seeded Monte-Carlo Fisher
draws the same targets as one process (see nngeometry.backend.distributed.global_batch_index).
"""
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

TOL = dict(atol=1e-10, rtol=1e-10)
BATCH = 4
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def make_data(n):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return TensorDataset(x, y)


def batches_of(n, rank=None, world=None):
    """The batches (lists of example indices) of a rank: batches dealt in turn; all of them
    for rank None."""
    all_batches = [list(range(i, min(n, i + BATCH))) for i in range(0, n, BATCH)]
    if rank is None:
        return all_batches
    return all_batches[rank::world]


def loader_of(n, rank=None, world=None):
    return DataLoader(make_data(n), batch_sampler=batches_of(n, rank, world))


def rank_order(n, world):
    """The examples in the order the ranks' rows are gathered (rank 0's first)."""
    return [i for r in range(world) for b in batches_of(n, r, world) for i in b]


def compute_all(loader, n, world):
    """Every statistic checked, as tensors: on one rank's shard under torch.distributed, or on
    the whole data set in one process (the reference)."""
    from nngeometry import FIM, FIM_MonteCarlo, GramMatrix, Hessian, Jacobian
    from nngeometry.backend import TorchHooksJacobianBackend
    from nngeometry.backend.distributed import resolve_group, spread_eigh
    from nngeometry.layercollection import LayerCollection
    from nngeometry.metrics import GGN, EmpiricalFisher
    from nngeometry.object import (PMatBlockDiag, PMatDense, PMatDiag, PMatEKFAC,
                                   PMatEKFACBlockDiag, PMatImplicit, PMatKFAC, PMatLowRank,
                                   PMatQuasiDiag, PVector)
    from nngeometry.solve import cg

    model = make_model()
    lc = LayerCollection.from_model(model)
    v = PVector(lc, vector_repr=torch.linspace(-1, 1, lc.numel(), dtype=torch.float64))
    out = {}
    # KAISA-style eigendecompositions of the reduced KFAC factors: each on one rank
    factors = FIM(model, loader, PMatKFAC).data
    mats = {f"{lid}/{w}": m for lid, (A, G) in factors.items() for w, m in (("A", A), ("G", G))}
    eig = spread_eigh(mats, resolve_group())
    out["spread_eigh/evals"] = torch.cat([e for e, _ in eig.values()])
    out["spread_eigh/reconstructed"] = torch.cat([((U * e) @ U.t()).reshape(-1)
                                                  for e, U in eig.values()])
    out["spread_eigh/evecs"] = torch.cat([U.reshape(-1) for _, U in eig.values()])
    for rep in (PMatDense, PMatBlockDiag, PMatDiag, PMatKFAC, PMatEKFAC, PMatEKFACBlockDiag,
                PMatQuasiDiag, PMatLowRank):
        M = FIM(model, loader, rep)
        out[f"FIM/{rep.__name__}"] = M.to_torch()
        if rep is PMatKFAC:
            out["FIM/PMatKFAC/factors"] = torch.cat([torch.cat([A.reshape(-1), G.reshape(-1)])
                                                     for A, G in M.data.values()])
        if rep is PMatEKFAC:
            M.update_diag(loader)
            out["FIM/PMatEKFAC/update_diag"] = M.to_torch()
    M = FIM(model, loader, PMatImplicit)
    out["FIM/PMatImplicit/mv"] = M.mv(v).to_torch()
    out["FIM/PMatImplicit/vTMv"] = M.vTMv(v).reshape(1)
    out["FIM/PMatImplicit/diag"] = M.get_diag()
    out["FIM/PMatImplicit/cg"] = cg(M, v, regul=1e-2, rtol=1e-12).to_torch()
    out["FIM/subnetwork"] = FIM(model, loader, PMatDense, subnetwork_indices=[0, 5, 9, 40]
                                ).to_torch()
    for rep in (PMatKFAC, PMatDense):
        out[f"MC/{rep.__name__}"] = FIM_MonteCarlo(model, loader, rep, trials=2,
                                                   seed=3).to_torch()
    out["EF/PMatDiag"] = EmpiricalFisher(model, loader, PMatDiag).to_torch()
    out["GGN/PMatDense"] = GGN(model, loader, PMatDense,
                               loss_function=lambda f, y: F.cross_entropy(f, y, reduction="none")
                               ).to_torch()
    for rep in (PMatDense, PMatBlockDiag, PMatDiag):
        out[f"Hessian/{rep.__name__}"] = Hessian(model, loader, rep).to_torch()
    out["Hessian/PMatImplicit/mv"] = Hessian(model, loader, PMatImplicit).mv(v).to_torch()
    gen = TorchHooksJacobianBackend(model, centering=True)
    out["centered/dense"] = gen.get_covariance_matrix(loader, lc)
    out["centered/mv"] = gen.implicit_mv(v, loader, lc)
    # per-example rows: every rank's examples in rank order
    J = Jacobian(model, loader).to_torch()
    out["Jacobian"] = J
    out["GramMatrix"] = GramMatrix(model, loader).to_torch()
    gen = TorchHooksJacobianBackend(model)
    Jv = gen.implicit_Jv(v, loader, lc)
    out["implicit_Jv"] = Jv
    out["implicit_JTv"] = gen.implicit_JTv(Jv, loader, lc)
    # influence: the curvature of all the ranks' examples, the same queries on every rank, the
    # training columns in rank order
    from nngeometry.influence import Influence
    inf = Influence(model, PMatEKFAC, curvature="empirical").fit(loader)
    queries = make_data(3).tensors
    out["influence/damping"] = torch.tensor(list(inf.damping_value.values()))
    out["influence/pairwise"] = inf.pairwise_scores(loader, queries)
    out["influence/self"] = inf.self_scores(loader)
    return out


def natural_gradient_step(model, x, y):
    """One preconditioned SGD step on (x, y); the direction and the new parameters."""
    from nngeometry.object import PMatKFAC
    from nngeometry.optim import NaturalGradient

    precond = NaturalGradient(model, PMatKFAC, curvature="fisher", damping=1e-2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    p = precond.step((x, y)).to_torch()
    opt.step()
    return p, torch.cat([q.detach().reshape(-1) for q in model.parameters()])


def count_collectives(loader):
    """The collectives of one KFAC build and of one implicit product over several batches:
    one per statistic, not one per batch."""
    import torch.distributed as dist

    from nngeometry import FIM
    from nngeometry.object import PMatImplicit, PMatKFAC, PVector

    names = ("all_reduce", "all_gather", "all_gather_object", "broadcast")
    calls = dict.fromkeys(names, 0)
    saved = {k: getattr(dist, k) for k in names}

    def counting(name):
        def call(*args, **kwargs):
            calls[name] += 1
            return saved[name](*args, **kwargs)
        return call

    out = []
    try:
        for k in names:
            setattr(dist, k, counting(k))
        M = FIM(make_model(), loader, PMatKFAC)
        out.append([calls[k] for k in names])
        calls.update(dict.fromkeys(names, 0))
        M = FIM(make_model(), loader, PMatImplicit)
        M.mv(PVector(M.layer_collection, vector_repr=torch.ones(M.layer_collection.numel(),
                                                                  dtype=torch.float64)))
        out.append([calls[k] for k in names])
    finally:
        for k in names:
            setattr(dist, k, saved[k])
    return torch.tensor(out)


def second_pass_refused(loader):
    """A statistic reduced over the ranks can't take another pass (it would count the earlier
    examples once per rank): refused on every rank, before any collective."""
    from nngeometry.backend import TorchHooksJacobianBackend
    from nngeometry.backend import consumers as C
    from nngeometry.layercollection import LayerCollection

    model = make_model()
    lc = LayerCollection.from_model(model)
    gen = TorchHooksJacobianBackend(model)
    c = gen.accumulate(loader, lc, C.DiagCovariance(lc), finalize=False)
    try:
        gen.accumulate(loader, lc, c)
    except RuntimeError as e:
        return torch.tensor(int("already holds the statistic of all the ranks" in str(e)))
    return torch.tensor(0)


def _worker(rank, world, init, n, out_dir, run_example):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        res = compute_all(loader_of(n, rank, world), n, world)
        res["collectives"] = count_collectives(loader_of(n, rank, world))
        res["second_pass_refused"] = second_pass_refused(loader_of(n, rank, world))
        if run_example:
            # NaturalGradient under DistributedDataParallel: each rank holds half of one batch
            model = make_model()
            ddp = nn.parallel.DistributedDataParallel(model)
            data = make_data(8)
            idx = slice(rank * 4, rank * 4 + 4)
            p, params = natural_gradient_step(ddp, data.tensors[0][idx], data.tensors[1][idx])
            res["optim/direction"], res["optim/params"] = p, params
            # the documentation's example, on this rank's shard
            spec = importlib.util.spec_from_file_location(
                "distributed_fim", os.path.join(ROOT, "examples", "distributed_fim.py"))
            example = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(example)
            res["example"] = example.main(steps=2, quiet=True)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path, world, n, run_example=False):
    import torch.multiprocessing as mp

    init = f"file://{tmp_path / 'init'}"
    mp.spawn(_worker, args=(world, init, n, str(tmp_path), run_example), nprocs=world,
             join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def _reference(n, world):
    ref = compute_all(loader_of(n), n, 1)
    order = torch.tensor(rank_order(n, world))
    # row statistics come in rank order
    ref["Jacobian"] = ref["Jacobian"][:, order]
    ref["GramMatrix"] = ref["GramMatrix"][:, order][:, :, :, order]
    ref["implicit_Jv"] = ref["implicit_Jv"][:, order]
    ref["influence/pairwise"] = ref["influence/pairwise"][:, order]
    ref["influence/self"] = ref["influence/self"][order]
    return ref


def _compare(results, ref):
    # the eigenvectors come from one rank's decomposition: the same bits on every rank (their
    # signs may differ from the single process's, hence the comparison of U Λ Uᵀ below)
    for res in results[1:]:
        assert torch.equal(res["spread_eigh/evecs"], results[0]["spread_eigh/evecs"])
    ref = {k: v for k, v in ref.items() if k != "spread_eigh/evecs"}
    assert set(ref) <= set(results[0])
    for rank, res in enumerate(results):
        for name, expected in ref.items():
            got = res[name]
            assert got.shape == expected.shape, (rank, name)
            torch.testing.assert_close(got, expected, **TOL,
                                       msg=lambda m: f"rank {rank}, {name}: {m}")


def test_two_ranks_uneven_shards_ddp_optimizer_and_example(tmp_path, one_thread):
    n = 26  # 7 batches: rank 0 takes 4 (14 examples), rank 1 takes 3 (12)
    results = _spawn(tmp_path, 2, n, run_example=True)
    for res in results:
        # KFAC over 4 batches: one all_reduce of all the factors (one dtype) after one exchange
        # of counts and shapes; an implicit product: the same
        assert res.pop("collectives").tolist() == [[1, 0, 1, 0], [1, 0, 1, 0]]
        assert res.pop("second_pass_refused").item() == 1
    assert [len(sum(batches_of(n, r, 2), [])) for r in range(2)] == [14, 12]
    _compare(results, _reference(n, 2))
    # the natural-gradient step under DDP is the single-process step on the whole batch
    data = make_data(8)
    p, params = natural_gradient_step(make_model(), *data.tensors)
    for res in results:
        torch.testing.assert_close(res["optim/direction"], p, **TOL)
        torch.testing.assert_close(res["optim/params"], params, **TOL)
    # the example ran on both ranks and they agree (its figures are the whole data's)
    torch.testing.assert_close(results[0]["example"], results[1]["example"], **TOL)


def test_three_ranks_one_empty(tmp_path, one_thread):
    n = 7  # 2 batches (4 + 3 examples): rank 2 has none, and still joins every collective
    assert batches_of(n, 2, 3) == []
    results = _spawn(tmp_path, 3, n)
    _compare(results, _reference(n, 3))


def test_two_ranks_all_empty_is_refused_clearly(tmp_path, one_thread):
    pytest.importorskip("torch.distributed")
    # (no spawn: the single-process behaviour with an empty loader is unchanged)
    from nngeometry import FIM
    from nngeometry.object import PMatDiag

    empty = DataLoader(make_data(4), batch_sampler=[])
    with pytest.raises(ValueError, match="no data"):
        FIM(make_model(), empty, PMatDiag)


def test_deferred_finite_checks_raise_at_the_end_of_the_pass():
    """On an accelerator the finiteness flags of a pass are read once, when the pass ends (no
    host synchronisation per batch); CPU tensors are still checked at once. (No GPU here: the
    deferred flags are recorded by hand, as check_finite records them for CUDA tensors.)"""
    from nngeometry.backend import model_and_data as B

    with pytest.raises(ValueError, match="at once"):
        with B.deferred_finite_checks():
            B.check_finite(torch.tensor([1.0, float("nan")]), "at once")
    with pytest.raises(ValueError, match="second batch"):
        with B.deferred_finite_checks():
            B._DEFERRED.pending.append((torch.tensor(True), "first batch"))
            B._DEFERRED.pending.append((torch.tensor(False), "second batch"))
            B._DEFERRED.pending.append((torch.tensor(False), "third batch"))
    with B.deferred_finite_checks():  # all finite: nothing raised
        B._DEFERRED.pending.append((torch.tensor(True), "fine"))
    assert getattr(B._DEFERRED, "pending", None) is None
