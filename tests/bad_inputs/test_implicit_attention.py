"""Bad inputs on the generator side and the same model in two threads: PMatImplicit
behaves like the other representations (inference mode, gradients w.r.t. v, unpickling,
BatchNorm), attention statistics are recorded without touching global state (two threads, two
models), one model is not built on by two threads at once, and n·P-sized results are refused
before they are allocated. References: brute-force float64 Jacobians (tests/brute.py)."""
import pickle
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from brute import fim_dense, per_example_jacobian
from nngeometry.backend import TorchHooksJacobianBackend
from nngeometry.backend.model_and_data import default_function
from nngeometry.layercollection import LayerCollection
from nngeometry.metrics import FIM
from nngeometry.object import PMatDense, PMatDiag, PMatImplicit, PVector
from nngeometry.curvature import closed_form_function

DT = torch.float64


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)


@pytest.fixture(scope="module")
def implicit():
    model = _mlp()
    torch.manual_seed(1)
    x = torch.randn(9, 4, dtype=DT)
    lc = LayerCollection.from_model(model)
    M = FIM(model, (x, None), PMatImplicit, variant="classif_logits")
    D = fim_dense(model, x, "classif_logits", lc)
    return model, x, lc, M, D


def _vec(lc, seed=5, requires_grad=False):
    torch.manual_seed(seed)
    f = torch.randn(lc.numel(), dtype=DT, requires_grad=requires_grad)
    return f, PVector(lc, vector_repr=f)


# ---------------------------------------------------------------------- item 5: PMatImplicit
def test_inference_mode_gives_the_exact_products(implicit):
    model, x, lc, M, D = implicit
    f, v = _vec(lc)
    with torch.inference_mode():
        mv = M.mv(v).get_flat_representation()
        q = M.vTMv(v)
        y = M.solve(v, regul=0.5, tol=1e-12).get_flat_representation()
        # data made inside inference mode (inference tensors) too
        M_inf = FIM(model, (x.clone(), None), PMatImplicit, variant="classif_logits")
        mv_inf = M_inf.mv(PVector(lc, vector_repr=f.clone())).get_flat_representation()
    torch.testing.assert_close(mv, D @ f, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(q, f @ D @ f, rtol=1e-10, atol=1e-12)
    I = torch.eye(len(f), dtype=DT)
    torch.testing.assert_close(y, torch.linalg.solve(D + 0.5 * I, f), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(mv_inf, D @ f, rtol=1e-10, atol=1e-12)
    assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()


def test_inference_mode_parameters_refused():
    with torch.inference_mode():
        model = _mlp()
        x = torch.randn(3, 4, dtype=DT)
    M = FIM(model, (x, None), PMatImplicit, variant="classif_logits")
    _, v = _vec(M.layer_collection)
    with pytest.raises(RuntimeError, match="inference tensor .*outside inference mode"):
        M.mv(v)


def test_mv_and_vTMv_differentiable_wrt_v(implicit):
    model, x, lc, M, D = implicit
    f, v = _vec(lc, requires_grad=True)
    # the EWC-style penalty v·(M v): gradient (M + Mᵀ) v = 2 M v (half of it before)
    pen = (f * M.mv(v).get_flat_representation()).sum()
    (g,) = torch.autograd.grad(pen, f)
    torch.testing.assert_close(g, 2 * D @ f.detach(), rtol=1e-10, atol=1e-12)
    (g2,) = torch.autograd.grad(M.vTMv(v), f)
    torch.testing.assert_close(g2, 2 * D @ f.detach(), rtol=1e-10, atol=1e-12)
    # scaled matrices and second order: the Hessian-vector product of vᵀ(3M)v is 6 M u
    (g3,) = torch.autograd.grad((3 * M).vTMv(v), f, create_graph=True)
    u = torch.randn_like(f)
    (h,) = torch.autograd.grad(g3 @ u, f)
    torch.testing.assert_close(h, 6 * D @ u, rtol=1e-10, atol=1e-12)
    # a vector of a dict of layers gets its gradients too
    w = {lid: tuple(t.detach().clone().requires_grad_(True) for t in parts)
         for lid, parts in PVector(lc, vector_repr=f.detach()).get_dict_representation().items()}
    q = M.vTMv(PVector(lc, dict_repr=w))
    leaves = [t for parts in w.values() for t in parts]
    grads = torch.autograd.grad(q, leaves)
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in grads]), 2 * D @ f.detach(),
                               rtol=1e-10, atol=1e-12)


def test_unpickled_message_names_the_function(implicit):
    model, x, lc, M, D = implicit
    M2 = pickle.loads(pickle.dumps(M))
    _, v = _vec(lc)
    with pytest.raises(RuntimeError, match=r"built with the function nngeometry\.curvature\."
                                           r"closed_form_function.*SAME function"):
        M2.mv(v)
    with pytest.raises(RuntimeError, match="nngeometry.curvature.closed_form_function"):
        M2.vTMv(v)
    # following the message gives the matrix back exactly
    M2.generator = TorchHooksJacobianBackend(
        model, closed_form_function(lambda *b: model(b[0]), "classif_logits"))
    f = v.get_flat_representation()
    torch.testing.assert_close(M2.mv(v).get_flat_representation(), D @ f, rtol=1e-10, atol=1e-12)


def test_batchnorm_in_training_mode_refused_by_the_implicit_path():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).to(DT).train()
    x = torch.randn(6, 4, dtype=DT)
    M = FIM(model, (x, None), PMatImplicit, variant="classif_logits")
    _, v = _vec(M.layer_collection)
    state = {k: t.clone() for k, t in model.state_dict().items()}
    for call in (lambda: M.mv(v), lambda: M.vTMv(v), lambda: M.solve(v, regul=1.0)):
        with pytest.raises(RuntimeError, match=r"BatchNorm layer '1'.*training mode.*model\.eval"):
            call()
    assert all(torch.equal(t, model.state_dict()[k]) for k, t in state.items())
    model.eval()
    D = fim_dense(model, x, "classif_logits", M.layer_collection)
    f = v.get_flat_representation()
    torch.testing.assert_close(M.mv(v).get_flat_representation(), D @ f, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------- item 8: attention
class _AttnNet(nn.Module):
    def __init__(self, seed, E=8, heads=2, batch_first=True):
        super().__init__()
        torch.manual_seed(seed)
        self.mha = nn.MultiheadAttention(E, heads, batch_first=batch_first)
        self.head = nn.Linear(E, 3)
        self.batch_first = batch_first

    def forward(self, x):
        x = x if self.batch_first else x.transpose(0, 1)
        out = self.mha(x, x, x, need_weights=False)[0]
        out = out if self.batch_first else out.transpose(0, 1)
        return self.head(torch.tanh(out).mean(dim=1))


_CONFIGS = {
    "self": dict(), "self_time_major": dict(batch_first=False),
    "cross_kv": dict(kv="same"), "distinct": dict(kv="distinct"),
    "kdim": dict(kdim=5, vdim=6, kv="distinct"), "no_bias": dict(bias=False),
    "masks": dict(masks=True), "masks_weights": dict(masks=True, need_weights=True),
    "mask3d_zero_attn": dict(mask3d=True, add_zero_attn=True, need_weights=True),
    "causal": dict(causal=True), "weights_per_head": dict(need_weights=True, average=False),
}


@pytest.mark.parametrize("name", list(_CONFIGS))
def test_recorded_attention_is_the_module_forward(name):
    """The forward that records the projections gives the module's own outputs (and attention
    weights), in every configuration it writes out."""
    from nngeometry.layer_types.attention import MultiheadAttentionLayer

    c = _CONFIGS[name]
    torch.manual_seed(0)
    E, H, n, L, S = 8, 2, 3, 4, 5
    bf = c.get("batch_first", True)
    mha = nn.MultiheadAttention(E, H, bias=c.get("bias", True), add_zero_attn=c.get(
        "add_zero_attn", False), kdim=c.get("kdim"), vdim=c.get("vdim"), batch_first=bf).to(DT)

    def seq(T, d):
        return torch.randn(n, T, d, dtype=DT) if bf else torch.randn(T, n, d, dtype=DT)

    q = seq(L, E)
    kv = c.get("kv", "self")
    if kv == "self":
        k = v = q
        S = L
    elif kv == "same":
        k = v = seq(S, E)
    else:
        k, v = seq(S, c.get("kdim", E)), seq(S, c.get("vdim", E))
    kw = dict(need_weights=c.get("need_weights", False),
              average_attn_weights=c.get("average", True))
    if c.get("masks"):
        kw["attn_mask"] = torch.rand(L, S, dtype=DT) > 0.7
        kw["attn_mask"][:, 0] = False
        kpm = torch.zeros(n, S, dtype=torch.bool)
        kpm[1, -2:] = True
        kw["key_padding_mask"] = kpm
    if c.get("mask3d"):
        kw["attn_mask"] = torch.randn(n * H, L, S, dtype=DT)
    if c.get("causal"):
        kw["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(L, dtype=DT)
        kw["is_causal"] = True
    ref_out, ref_w = mha(q, k, v, **kw)
    rec = MultiheadAttentionLayer.from_module(mha).internal_recorder(mha)
    out, w = rec.forward(mha.forward, q, k, v, **kw)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-13)
    if ref_w is None:
        assert w is None
    else:
        torch.testing.assert_close(w, ref_w, rtol=1e-12, atol=1e-13)
    n_proj = {"self": 1, "same": 2}.get(kv, 3)
    assert len(rec.targets) == n_proj and rec.record[1].shape == (L * n, E)


def _attention_reference(model, x):
    lc = LayerCollection.from_model(model)
    return lc, fim_dense(model, x, "classif_logits", lc)


def _run_threads(jobs):
    """Run the callables at once (a barrier lines their starts up); their results or errors."""
    barrier = threading.Barrier(len(jobs))
    results = [None] * len(jobs)

    def run(i):
        barrier.wait()
        try:
            results[i] = jobs[i]()
        except BaseException as e:  # reported by the test
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_two_threads_two_attention_models_exact_and_nothing_global_left():
    linear, mha_forward = F.linear, nn.MultiheadAttention.__dict__["forward"]
    fastpath = torch.backends.mha.get_fastpath_enabled()
    models = [_AttnNet(seed).to(DT).eval() for seed in (0, 1)]
    torch.manual_seed(3)
    xs = [torch.randn(12, 4, 8, dtype=DT) for _ in models]
    refs = [_attention_reference(m, x)[1] for m, x in zip(models, xs)]
    loaders = [torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=3)
               for x in xs]
    for _ in range(3):
        dense = _run_threads([lambda m=m, ld=ld: FIM(m, ld, PMatDense).to_torch()
                              for m, ld in zip(models, loaders)])
        for D, ref in zip(dense, refs):
            assert not isinstance(D, BaseException), D
            torch.testing.assert_close(D, ref, rtol=1e-9, atol=1e-12)
    # implicit products (torch.func) in two threads: same numbers, flags put back
    f = torch.randn(refs[0].shape[0], dtype=DT)
    mvs = _run_threads([lambda m=m, ld=ld: FIM(m, ld, PMatImplicit).mv(
        PVector(LayerCollection.from_model(m), vector_repr=f)).get_flat_representation()
        for m, ld in zip(models, loaders)])
    for mv, ref in zip(mvs, refs):
        assert not isinstance(mv, BaseException), mv
        torch.testing.assert_close(mv, ref @ f, rtol=1e-9, atol=1e-12)
    assert F.linear is linear and F.linear is torch._C._nn.linear
    assert nn.MultiheadAttention.__dict__["forward"] is mha_forward
    assert all("forward" not in m.mha.__dict__ for m in models)
    assert torch.backends.mha.get_fastpath_enabled() == fastpath


def test_attention_build_that_raises_leaves_nothing_behind():
    model = _AttnNet(0).to(DT).eval()
    x = torch.randn(4, 4, 8, dtype=DT)

    def bad(*batch):
        model(batch[0])
        raise KeyError("boom")

    gen = TorchHooksJacobianBackend(model, bad)
    with pytest.raises(KeyError, match="boom"):
        gen.get_covariance_diag((x,))
    assert "forward" not in model.mha.__dict__
    assert not model.mha._forward_hooks and not model.mha._forward_pre_hooks
    assert F.linear is torch._C._nn.linear


# ---------------------------------------------------------------------- one model, two threads
def test_same_model_in_two_threads_is_exact():
    """Computations on one model from several threads run one after the other (a per-model
    lock): all are right, where the hooks of one build recorded the other's calls before, and
    an implicit product's parameter swap was seen by the other build. (The collection and
    generators are made before the threads start: reading the model's parameters outside a
    computation, as LayerCollection.from_model does, is not covered by the lock.)"""
    model = _AttnNet(2).to(DT).eval()
    torch.manual_seed(4)
    x = torch.randn(12, 4, 8, dtype=DT)
    lc, ref = _attention_reference(model, x)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=2)
    f = torch.randn(ref.shape[0], dtype=DT)
    v = PVector(lc, vector_repr=f)

    def gen():
        return TorchHooksJacobianBackend(
            model, closed_form_function(default_function(model), "classif_logits"),
            layer_collection=lc)

    M = PMatImplicit(lc, gen(), examples=loader)
    for _ in range(2):
        out = _run_threads([lambda: PMatDense(lc, gen(), examples=loader).to_torch(),
                            lambda: PMatDense(lc, gen(), examples=loader).to_torch(),
                            lambda: M.mv(v).get_flat_representation(),
                            lambda: gen().get_covariance_diag(loader, lc)])
        for r in out:
            assert not isinstance(r, BaseException), r
        torch.testing.assert_close(out[0], ref, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(out[1], ref, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(out[2], ref @ f, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(out[3], torch.diag(ref), rtol=1e-9, atol=1e-12)
    assert not model.mha._forward_hooks and "forward" not in model.mha.__dict__
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())


def test_entry_point_reading_the_model_while_another_thread_runs_an_implicit_product():
    """An entry point that reads the model's layers (no layer_collection given) waits for an
    implicit product of another thread, which has the parameters swapped for functional
    tensors while its function runs (here: held there until the other thread has started)."""
    import threading
    import time
    from nngeometry import FIM
    model = _AttnNet(2).to(DT).eval()
    torch.manual_seed(5)
    x = torch.randn(12, 4, 8, dtype=DT)
    lc, ref = _attention_reference(model, x)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=12)
    inside, armed = threading.Event(), [False]

    def slow(inputs):
        if armed[0]:
            inside.set()
            time.sleep(0.3)  # the other thread reads the model meanwhile
        return model(inputs)

    M = FIM(model, loader, PMatImplicit, layer_collection=lc, function=slow)
    v = PVector(lc, vector_repr=torch.randn(ref.shape[0], dtype=DT))
    armed[0] = True

    def reader():
        inside.wait(10)
        return FIM(model, loader, PMatDiag).get_diag()

    out = _run_threads([lambda: M.mv(v).get_flat_representation(), reader])
    for r in out:
        assert not isinstance(r, BaseException), r
    torch.testing.assert_close(out[0], ref @ v.get_flat_representation(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out[1], torch.diag(ref), rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------- item 11: n·P sizes
class _HugeDataset(torch.utils.data.Dataset):
    """Claims 10⁹ examples; only the first batch is ever made (the check comes first)."""

    def __len__(self):
        return 10 ** 9

    def __getitem__(self, i):
        return torch.ones(4, dtype=DT)


def test_jacobian_of_a_huge_loader_refused_before_the_pass():
    from nngeometry.metrics import Jacobian

    model = _mlp()
    loader = torch.utils.data.DataLoader(_HugeDataset(), batch_size=8)
    with pytest.raises(MemoryError, match=r"per-example Jacobians \(n_output=3 × n=1000000000 × "
                                          r"P=51, 1\.1 TiB.*PMatImplicit"):
        Jacobian(model, loader)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


@pytest.fixture
def small_memory(monkeypatch):
    """The memory this process can still get, as the size checks see it (no real pressure)."""
    import nngeometry._memory as memory

    def limit(nbytes):
        monkeypatch.setattr(memory, "available_memory", lambda: nbytes)
    return limit


def test_jacobian_gram_and_lowrank_sizes_checked(small_memory):
    from nngeometry.metrics import GramMatrix, Jacobian
    from nngeometry.object import PMatLowRank

    model = _mlp()
    torch.manual_seed(6)
    x = torch.randn(40, 4, dtype=DT)
    lc = LayerCollection.from_model(model)
    J_bytes = 3 * 40 * lc.numel() * 8  # 48960: held twice at the end
    G_bytes = (3 * 40) ** 2 * 8  # 115200
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=8)
    small_memory(2 * J_bytes - 1)
    with pytest.raises(MemoryError, match=r"n_output=3 × n=40 × P=51.*more than the 95\.6 KiB"):
        Jacobian(model, loader, function=lambda b: model(b))
    with pytest.raises(MemoryError, match="per-example Jacobians"):
        FIM(model, loader, PMatLowRank, variant="regression")
    # a single mini-batch (size unknown in advance): checked as the batches come
    with pytest.raises(MemoryError, match="n=40"):
        Jacobian(model, (x,), function=lambda b: model(b))
    small_memory(G_bytes - 1)
    with pytest.raises(MemoryError, match=r"Gram matrix \(\(n_output·n\)² = \(3·40\)² entries\) "
                                          r"needs 112\.5 KiB.*PFMapImplicit"):
        GramMatrix(model, loader, function=lambda b: model(b))
    small_memory(G_bytes)
    G = GramMatrix(model, loader, function=lambda b: model(b)).to_torch()
    Jb = per_example_jacobian(model, x, lc)  # (n, K, P)
    torch.testing.assert_close(G, torch.einsum("ikp,jlp->kilj", Jb, Jb), rtol=1e-10, atol=1e-12)
