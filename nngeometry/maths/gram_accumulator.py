"""Accumulating symmetric Gram matrices ``Σ XᵀX`` at the cost of about half a GEMM.

Statistics such as the dense covariance ``Σ JᵀJ`` and KFAC's factors ``Σ x̄x̄ᵀ`` and ``Σ g gᵀ``
are Gram matrices of rows produced batch after batch. Three things make them cheap:

* symmetry: only the upper block-triangle ``X_iᵀ X_{i:}`` of each block-row ``i`` is computed
  (GEMMs), and mirrored once at the end (scaled on the way), which saves close to half of the
  multiply-adds for wide ``X``. (BLAS ``?syrk`` computes exactly the triangle and was 1.1-1.2x
  faster on the MLP below, but torch has none: SciPy's would mean a second BLAS and thread pool
  in the process, so it is not used);
* a column of ones (KFAC's bias-augmented inputs ``x̄ = (x, 1)``) is never materialized: the
  Gram of ``(X, 1)`` is ``[[XᵀX, Xᵀ1], [1ᵀX, m]]``, so the GEMM runs on ``X`` itself (written
  into the leading ``d × d`` view of the ``(d+1)²`` sum) and the last row/column is the running
  column sum ``Σ x``. No copy of ``X`` is made (a ``torch.cat`` with a ones column copied every
  batch's inputs);
* batching without copies: a piece of at least ``min_rows`` rows (default
  `MIN_GEMM_ROWS`) is multiplied as it is; only shorter pieces are buffered (and then
  concatenated) until they add up to ``min_rows``, so memory is never spent on rows waiting for a
  GEMM that would already run at full speed.

Measured on an MLP 784-256-256-10 (KFAC factors 785², 257², 256², N = 1024, batches of 128,
one thread): the 785-wide upper block-triangle takes 11.4-11.7 ms per 1024 rows with 128-row
pieces, 10.8-11.0 ms with 256-row pieces, 17.8 ms as a full GEMM. In a whole Monte-Carlo KFAC
build, where the six sums compete for the cache with the forward/backward, buffering up to 256
rows (``min_rows=256``) was 6-12% faster (paired A/B runs) but raised the build's peak tensor
memory from 4.4 to 5.9 MiB (the factors alone are 3.4 MiB): the default keeps the memory. With
8-row pieces a Gram takes 2.2x as long as with 64-row pieces, hence the buffering of short
pieces.
"""
import torch

#: widths below this use one plain GEMM (the block-triangle bookkeeping doesn't pay off)
SYMMETRIC_MIN_WIDTH = 192
#: rows needed in the first GEMM for the block-triangle to pay off (with 8 rows a 256-wide full
#: GEMM is faster; later GEMMs follow the path of the first one, so one sum is ever allocated)
SYMMETRIC_MIN_ROWS = 32
#: pieces with at least this many rows go straight to the GEMM; shorter ones are buffered
#: until they add up to it (GEMMs with 128 rows run within ≈ 5% of their full speed)
MIN_GEMM_ROWS = 128
#: the buffered rows never exceed this many bytes, nor the size of the Gram matrix itself
BUFFER_BYTES = 32 * 2 ** 20
class GramRows:
    """A statistic given as ``scale · R̄ᵀ R̄``, accumulated lazily, where ``R̄ = rows`` (shape
    ``(m, d)``), or ``R̄ = [rows, 1]`` (``(m, d + 1)``: a trailing column of ones, never
    materialized) when ``ones_column`` is True."""

    __slots__ = ("rows", "scale", "ones_column")

    def __init__(self, rows, scale=1.0, ones_column=False):
        self.rows = rows
        self.scale = scale
        self.ones_column = ones_column

    @property
    def width(self):
        """Side of the Gram matrix: ``d`` or ``d + 1``."""
        return self.rows.shape[-1] + int(self.ones_column)

    def dense(self):
        acc = SymmetricAccumulator(ones_column=self.ones_column)
        acc.add(self.rows, self.scale)
        return acc.result()


def _blocks(d, m=0):
    """Column blocks ``[(start, stop)]`` of the block-triangle for width ``d``: about 192 columns
    a block, from 2 to 8 blocks; at least 4 for tall pieces (``m >= 512`` rows), whose GEMMs stay
    efficient on narrower blocks (256 wide, 1152 rows: 4 blocks take 10% less time than 2)."""
    n_blocks = max(4 if m >= 512 else 2, min(8, d // 192))
    bs = -(-d // n_blocks)
    return [(s, min(d, s + bs)) for s in range(0, d, bs)]


class SymmetricAccumulator:
    """Running sum of ``scale · X̄ᵀX̄`` over row blocks ``X`` (``(m, d)``) that arrive one at a
    time, with ``X̄ = X`` or, if ``ones_column``, ``X̄ = [X, 1]`` (the Gram is then
    ``(d+1) × (d+1)``, its last row/column ``scale · (Σ_rows x, m)``).

    Wide, CPU-resident sums keep only the upper block-triangle (diagonal blocks in full) and
    mirror it once in `result`. ``min_rows``: pieces shorter than this are buffered (see the
    module docstring); ``buffer_bytes``: cap on the buffered bytes (default: the smaller of
    `BUFFER_BYTES` and the size of the Gram matrix).
    """

    def __init__(self, buffer_bytes=None, min_rows=MIN_GEMM_ROWS, ones_column=False):
        self.buffer_bytes = buffer_bytes
        self.min_rows = min_rows
        self.ones_column = ones_column
        self._rows, self._scale, self._bytes, self._n_rows = [], None, 0, 0
        self._width = None
        self._sum = None      # (D, D), D = d + ones_column; the lower triangle is stale
        self._written = False  # whether a GEMM has written the sum yet (the first one overwrites)
        self._blocks = None   # column blocks of the block-triangle path (None: full GEMMs)
        self._plan = None     # [(output view, start, stop)]: one GEMM each, views made once
        self._colsum = None   # Σ scale · x (ones_column only)
        self._count = 0.0     # Σ scale · m (ones_column only)

    def add(self, rows, scale=1.0):
        if rows.dim() != 2:
            raise ValueError(f"Gram rows must be a 2-D (rows, width) tensor, got shape "
                             f"{tuple(rows.shape)}: reshape them to (-1, width)")
        if self._width is None:
            self._width = rows.shape[1]
        elif rows.shape[1] != self._width:
            raise ValueError(f"rows of width {rows.shape[1]} can't be added to the Gram matrix of "
                             f"rows of width {self._width}: every piece of one statistic must "
                             "have the same number of columns")
        if rows.shape[0] == 0:
            return
        if self._rows and scale != self._scale:
            self.flush()  # pieces with different scales are not multiplied together
        if rows.shape[0] >= self.min_rows:
            # tall enough to run at full speed by itself: no copy (pending shorter pieces first)
            self.flush()
            self._gemm(rows, scale)
            return
        self._rows.append(rows)
        self._scale = scale
        self._bytes += rows.numel() * rows.element_size()
        self._n_rows += rows.shape[0]
        if self._n_rows >= self.min_rows or self._bytes >= self._buffer_cap(rows):
            self.flush()

    def _buffer_cap(self, rows):
        if self.buffer_bytes is not None:
            return self.buffer_bytes
        D = rows.shape[1] + int(self.ones_column)
        return min(BUFFER_BYTES, D * D * rows.element_size())

    def flush(self):
        """Multiply the buffered rows into the sum."""
        if not self._rows:
            return
        X = self._rows[0] if len(self._rows) == 1 else torch.cat(self._rows)
        scale = self._scale
        self._rows, self._bytes, self._n_rows = [], 0, 0
        self._gemm(X, scale)

    def _gemm(self, X, scale):
        m, d = X.shape
        if self._sum is not None and self._plan is None:
            raise RuntimeError("rows added after result() was taken: use a new accumulator")
        if self._sum is None:
            D = d + int(self.ones_column)
            # no zero fill: the first GEMM writes with beta=0 (which ignores the old contents)
            self._sum = S = X.new_empty(D, D)
            if d >= SYMMETRIC_MIN_WIDTH and m >= SYMMETRIC_MIN_ROWS and X.device.type == "cpu":
                self._blocks = _blocks(d, m)
                self._plan = [(S[start:stop, start:d], start, stop) for start, stop in self._blocks]
            else:
                self._plan = [(S[:d, :d], 0, d)]
            if self.ones_column:
                self._colsum = X.new_zeros(d)
        beta = 1 if self._written else 0
        Xt = X.t()
        for out, start, stop in self._plan:
            # block-row: X_blockᵀ X[:, start:] (the full path: one XᵀX)
            out.addmm_(Xt[start:stop], X[:, start:], beta=beta, alpha=scale)
        self._after_gemm(X, scale, m)

    def _after_gemm(self, X, scale, m):
        self._written = True
        if self.ones_column:
            self._colsum.add_(X.sum(dim=0), alpha=scale)
            self._count += scale * m

    def result(self, scale=1.0):
        """``scale`` times the sum (``None`` if no row was added), scaled while it is mirrored
        (one pass less over the matrix than scaling it afterwards). It is the accumulator's own
        buffer, not a copy; adding rows after this is not supported."""
        self.flush()
        S = self._sum
        if S is None:
            return None
        if self._plan is None:
            raise RuntimeError("result() was already taken from this accumulator")
        d = S.shape[0] - int(self.ones_column)
        if self._blocks is not None:
            _mirror_upper_in_place(S[:d, :d], self._blocks, scale)
        elif scale != 1.0:
            S[:d, :d].mul_(scale)
        self._plan = self._blocks = None
        if self.ones_column:
            colsum = self._colsum if scale == 1.0 else self._colsum.mul_(scale)
            S[:d, d].copy_(colsum)
            S[d, :d].copy_(colsum)
            S[d, d] = self._count * scale
        return S


def _mirror_upper_in_place(M, blocks, scale=1.0):
    """Complete ``M`` from its upper block-triangle, block by block, and multiply it by
    ``scale``.

    A whole ``M + Mᵀ`` reads one operand transposed across the full matrix, which is cache
    hostile (slower than the GEMMs for large P) and allocates a second ``P × P``; copying
    block-sized transposes keeps both the traffic local and the memory at one matrix. The
    diagonal blocks were computed in full: their lower triangle is overwritten by the upper one
    only so that the result is exactly symmetric (the two triangles can differ by rounding).
    """
    for i, (s0, e0) in enumerate(blocks):
        diag = M[s0:e0, s0:e0]
        upper_t = torch.triu(diag, diagonal=1).t()
        diag.triu_().add_(upper_t)
        if scale != 1.0:
            diag.mul_(scale)
        for s1, e1 in blocks[i + 1:]:
            upper = M[s0:e0, s1:e1]
            if scale != 1.0:
                upper.mul_(scale)
            M[s1:e1, s0:e0].copy_(upper.t())


def symmetric_gram(X):
    """``XᵀX`` computing about half of the products when ``X`` is wide."""
    acc = SymmetricAccumulator(buffer_bytes=float("inf"))
    acc.add(X)
    return acc.result()
