"""Gram accumulation (``nngeometry.maths.gram_accumulator``): the block-triangle path, the
implicit ones column, row buffering and flushing, the scale applied while mirroring, against
plain float64 sums; and the Linear layer's KFAC factors / per-example gradients that use them."""
import pytest
import torch
from torch import nn

import nngeometry.maths.gram_accumulator as gram_accumulator
from brute import per_example_jacobian
from nngeometry.backend import consumers as C
from nngeometry.maths.gram_accumulator import GramRows, SymmetricAccumulator, symmetric_gram
from nngeometry.layercollection import LayerCollection
from nngeometry.layer_types.linear import LinearLayer

DT = torch.float64


def _close(a, b, tol=1e-12):
    scale = max(float(b.abs().max()), 1e-300)
    assert a.shape == b.shape
    assert float((a - b).abs().max()) <= tol * scale, float((a - b).abs().max()) / scale


def _aug(X):
    return torch.cat([X, X.new_ones(X.shape[0], 1)], dim=1)


def _brute(pieces, ones):
    d = pieces[0][0].shape[1] + int(ones)
    out = torch.zeros(d, d, dtype=DT)
    for X, s in pieces:
        Y = _aug(X) if ones else X
        out += s * Y.t() @ Y
    return out


def _pieces(widths_rows, d, seed=0, scales=None):
    g = torch.Generator().manual_seed(seed)
    scales = scales or [1.0] * len(widths_rows)
    return [(torch.randn(m, d, generator=g, dtype=DT), s) for m, s in zip(widths_rows, scales)]


@pytest.mark.parametrize("d", [5, 191, 200, 300])
@pytest.mark.parametrize("ones", [False, True])
@pytest.mark.parametrize("rows,first_gemm", [([7], 7), ([40], 40), ([600], 600),
                                              ([3, 5, 130, 2, 1, 64, 64, 600, 9], 8)])
def test_accumulator_matches_sum(d, ones, rows, first_gemm):
    """Widths below/above the block-triangle threshold, pieces shorter and taller than
    ``min_rows`` (buffered / direct), first GEMM short or tall (full, 2- or 4-block plan).
    ``first_gemm``: rows of the first GEMM (the mixed list flushes its 3 + 5 buffered rows
    when the 130-row piece arrives), which chooses the path."""
    pieces = _pieces(rows, d, seed=d + len(rows))
    acc = SymmetricAccumulator(ones_column=ones)
    for X, s in pieces:
        acc.add(X, s)
    acc.flush()
    block_path = acc._blocks is not None
    assert block_path == (d >= gram_accumulator.SYMMETRIC_MIN_WIDTH
                          and first_gemm >= gram_accumulator.SYMMETRIC_MIN_ROWS)
    R = acc.result()
    _close(R, _brute(pieces, ones))
    if block_path:
        assert torch.equal(R, R.t())  # mirrored: exactly symmetric, not only to rounding


@pytest.mark.parametrize("ones", [False, True])
def test_scales_and_result_scale(ones):
    """Pieces with different scales are never multiplied together (a short piece with another
    scale flushes the buffer); ``result(s)`` returns ``s`` times the sum, the ones column
    included."""
    d = 230
    pieces = _pieces([10, 20, 5, 200, 3, 3], d, seed=3, scales=[1.0, 0.25, 0.25, 2.0, 0.5, 1.0])
    acc = SymmetricAccumulator(ones_column=ones)
    for X, s in pieces:
        acc.add(X, s)
    R = acc.result(1.0 / 7)
    _close(R, _brute(pieces, ones) / 7)
    assert torch.equal(R, R.t())


def test_short_pieces_are_buffered_tall_pieces_are_not_copied(monkeypatch):
    """Pieces shorter than ``min_rows`` wait in the buffer (concatenated once they reach it);
    a piece with at least ``min_rows`` rows goes to the GEMM without any concatenation, and the
    ones column never costs a concatenation."""
    calls = []
    real_cat = torch.cat
    monkeypatch.setattr(gram_accumulator.torch, "cat",
                        lambda *a, **k: calls.append(1) or real_cat(*a, **k))
    d = 210
    acc = SymmetricAccumulator(ones_column=True, min_rows=16)
    p = _pieces([16, 40, 8, 7, 1, 16], d, seed=5)
    acc.add(*p[0])
    acc.add(*p[1])
    assert calls == [] and acc._n_rows == 0  # tall: multiplied at once, no copy
    acc.add(*p[2])
    acc.add(*p[3])
    assert calls == [] and acc._n_rows == 15  # 15 < 16 rows wait
    acc.add(*p[4])
    assert calls == [1] and acc._n_rows == 0  # 16 rows: one concatenation, flushed
    acc.add(*p[5])
    assert calls == [1]
    _close(acc.result(), _brute(p, True))


def test_buffer_bytes_cap_flushes():
    """The buffered bytes never exceed ``buffer_bytes`` (and by default the Gram's own size)."""
    d = 8
    p = _pieces([3, 3, 3], d, seed=6)
    acc = SymmetricAccumulator(buffer_bytes=6 * d * 8)  # two float64 pieces of 3 rows
    acc.add(*p[0])
    assert acc._n_rows == 3
    acc.add(*p[1])
    assert acc._n_rows == 0  # reached the cap: flushed
    acc.add(*p[2])
    _close(acc.result(), _brute(p, False))
    # default cap: a 4-wide Gram (128 bytes) flushes any piece of 3 x 4 float64 (96 bytes) once
    # a second one arrives
    acc = SymmetricAccumulator()
    q = _pieces([3, 3], 4, seed=7)
    acc.add(*q[0])
    assert acc._n_rows == 3
    acc.add(*q[1])
    assert acc._n_rows == 0
    _close(acc.result(), _brute(q, False))


def test_edge_cases_and_errors():
    acc = SymmetricAccumulator()
    assert acc.result() is None  # nothing added
    acc = SymmetricAccumulator(ones_column=True)
    X = torch.randn(0, 4, dtype=DT)
    acc.add(X)  # empty pieces are ignored
    assert acc.result() is None
    acc = SymmetricAccumulator()
    acc.add(torch.randn(3, 4, dtype=DT))
    with pytest.raises(ValueError, match="same number of columns"):
        acc.add(torch.randn(200, 5, dtype=DT))  # a tall piece: checked before any GEMM
    with pytest.raises(ValueError, match="2-D"):
        acc.add(torch.randn(2, 3, 4, dtype=DT))
    acc.result()
    with pytest.raises(RuntimeError, match="new accumulator"):
        acc.add(torch.randn(200, 4, dtype=DT))
    with pytest.raises(RuntimeError, match="already taken"):
        acc.result()


def test_gramrows_dense_and_symmetric_gram():
    X = torch.randn(50, 260, dtype=DT)
    _close(GramRows(X, 0.5, ones_column=True).dense(), 0.5 * _aug(X).t() @ _aug(X))
    assert GramRows(X, ones_column=True).width == 261
    _close(symmetric_gram(X), X.t() @ X)


def test_float32_stays_float32():
    X = torch.randn(300, 250)
    R = GramRows(X, ones_column=True).dense()
    assert R.dtype == torch.float32
    ref = _aug(X.double()).t() @ _aug(X.double())
    assert float((R.double() - ref).abs().max() / ref.abs().max()) < 1e-5


# ---------------------------------------------------------------- Linear layer pieces
@pytest.mark.parametrize("S", [1, 3])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_linear_kfac_bias_from_column_sums(S, approx):
    """The bias row/column of ``A`` from column sums equals the Gram of the concatenated
    ``(x, 1)`` (float64), for plain and sequence inputs, in both approximations."""
    torch.manual_seed(0)
    layer = LinearLayer(6, 4, bias=True)
    x = torch.randn(5, S, 6, dtype=DT) if S > 1 else torch.randn(5, 6, dtype=DT)
    gy = torch.randn(3, 5, S, 4, dtype=DT) if S > 1 else torch.randn(3, 5, 4, dtype=DT)
    A, G = layer.kfac_factors(None, x, gy, approx=approx)
    assert isinstance(A, GramRows) and A.ones_column and A.width == 7
    xs = x.reshape(5, S, 6)
    a = xs.mean(dim=1) if approx == "reduce" else xs.reshape(-1, 6)
    _close(A.dense(), _aug(a).t() @ _aug(a))
    nob = LinearLayer(6, 4, bias=False)
    A0, _ = nob.kfac_factors(None, x, gy, approx=approx)
    assert not A0.ones_column
    _close(A0.dense(), a.t() @ a)


@pytest.mark.parametrize("S", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_per_example_grad_written_in_place(S, bias):
    """Per-example gradients (weight part written into its slice, bias part summed into its
    own) against the outer products and the sum over positions."""
    layer = LinearLayer(6, 4, bias=bias)
    x = torch.randn(5, S, 6, dtype=DT)
    gy = torch.randn(3, 5, S, 4, dtype=DT)
    g = layer.per_example_grad(None, x if S > 1 else x[:, 0], gy if S > 1 else gy[:, :, 0])
    ref = torch.einsum("knso,nsi->knoi", gy, x).reshape(3, 5, -1)
    if bias:
        ref = torch.cat([ref, gy.sum(dim=2)], dim=2)
    _close(g, ref)


def test_layerblocks_small_batches_match_brute():
    """LayerBlocks with batches shorter than its MIN_ROWS (buffered) and taller (direct) equals
    the per-layer blocks of Σ JᵀJ from brute-force per-example Jacobians."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(7, 200), nn.Tanh(), nn.Linear(200, 3)).to(DT)
    lc = LayerCollection.from_model(model)
    from nngeometry.backend.jacobian import TorchHooksJacobianBackend
    X = torch.randn(60, 7, dtype=DT)
    batches = [X[:5], X[5:9], X[9:60]]  # 5·3 and 4·3 rows (< 32), then 51·3 rows
    gen = TorchHooksJacobianBackend(model=model, function=lambda x: model(x))
    blocks = gen.accumulate(iter(batches), lc, C.LayerBlocks(lc)).result
    J = per_example_jacobian(model, X, lc)  # (n, K, P)
    Jf = J.reshape(-1, J.shape[-1])
    for lid in lc.layer_ids():
        s = lc.slice(lid)
        _close(blocks[lid], Jf[:, s].t() @ Jf[:, s] / 60)


def test_linear_per_example_grad_differentiable():
    """With inputs that require grad, the per-example gradients stay differentiable."""
    layer = LinearLayer(3, 2, bias=True)
    x = torch.randn(4, 3, dtype=DT, requires_grad=True)
    gy = torch.randn(1, 4, 2, dtype=DT)
    g = layer.per_example_grad(None, x, gy)
    (gx,) = torch.autograd.grad(g.square().sum(), x)
    # d/dx Σ_o (gy_o x_i)² = 2 Σ_o gy_o² x
    _close(gx, 2 * (gy[0] ** 2).sum(dim=1, keepdim=True) * x.detach())
