"""Consumers of per-batch statistics: each accumulates one kind of matrix over the batches.

A consumer has ``update(ctx)`` (called once per mini-batch and chunk of output directions with a
:class:`~nngeometry.backend.context.BatchContext`) and ``finalize(n)`` (called once, with the
number of examples seen). Keeping the running sums in one object per statistic is what lets
statistics be summed across data-parallel workers before ``finalize``.
"""
import torch

from ..maths.gram import GramRows, SymmetricAccumulator


class Consumer:
    def update(self, ctx):
        raise NotImplementedError

    def finalize(self, n):
        raise NotImplementedError


class DenseCovariance(Consumer):
    """``(1/n) Σ_x J(x)ᵀ J(x)``, shape ``(P, P)``."""

    def __init__(self, layer_collection):
        self.lc = layer_collection
        self._acc = SymmetricAccumulator()
        self.result = None

    def update(self, ctx):
        J = ctx.jacobian()
        self._acc.add(J.reshape(-1, J.shape[-1]))

    def finalize(self, n):
        # the 1/n is applied while the sum is mirrored (no extra pass over the P × P matrix)
        self.result = self._acc.result(1.0 / n)


class SubnetworkCovariance(Consumer):
    """``(1/n) Σ_x J(x)[:, idx]ᵀ J(x)[:, idx]``, shape ``(k, k)``: the matrix restricted to the
    flat parameter indices ``idx`` (a subnetwork), from each batch's per-example Jacobian
    columns (``K n k`` numbers per layer batch, never ``P × P``)."""

    def __init__(self, layer_collection, indices):
        self.lc = layer_collection
        self.indices = indices
        self._parts = None  # per layer: (positions in the result, offsets in the layer)
        self._acc = SymmetricAccumulator()
        self.result = None

    def _split(self, device):
        parts = []
        for lid in self.lc.layer_ids():
            sl = self.lc.slice(lid)
            mask = (self.indices >= sl.start) & (self.indices < sl.stop)
            pos = torch.nonzero(mask).reshape(-1)
            if pos.numel():
                parts.append((lid, pos.to(device), (self.indices[pos] - sl.start).to(device)))
        return parts

    def update(self, ctx):
        if self._parts is None:
            self._parts = self._split(ctx.outputs.device)
        rows = None
        for lid, pos, local in self._parts:
            g = ctx.per_example_grad(lid)
            if rows is None:
                rows = g.new_zeros(g.shape[0], g.shape[1], self.indices.numel())
            rows[:, :, pos] = g[:, :, local]
            ctx.release(lid)
        if rows is not None:
            self._acc.add(rows.reshape(-1, rows.shape[-1]))

    def finalize(self, n):
        self.result = self._acc.result(1.0 / n)


class DiagCovariance(Consumer):
    """Diagonal of ``(1/n) Σ_x J(x)ᵀ J(x)``, shape ``(P,)``."""

    def __init__(self, layer_collection):
        self.lc = layer_collection
        self.result = None

    def update(self, ctx):
        if self.result is None:
            ref = ctx.calls[ctx.layer_ids()[0]][0].gy  # the layers' gradient dtype/device
            self.result = torch.zeros(self.lc.numel(), dtype=ref.dtype, device=ref.device)
        # in place, layer by layer, into the layer's slice of the sum: no concatenated copy and
        # no new (P,) sum per batch (layer types with ``diag_into`` add their GEMM in place)
        for lid in ctx.layer_ids():
            ctx.layer_diag_into(lid, self.result[self.lc.slice(lid)])

    def finalize(self, n):
        # in place: the running sum is this consumer's own buffer (no second (P,) allocation)
        self.result = self.result.div_(n)


class LayerBlocks(Consumer):
    """``{layer_id: (1/n) Σ_x J_l(x)ᵀ J_l(x)}``: one dense block per layer."""

    def __init__(self, layer_collection):
        self.lc = layer_collection
        self._acc = {}
        self.result = {}

    #: pieces shorter than this are buffered across batches (a GEMM on fewer rows runs slowly);
    #: taller ones are multiplied at once, so that no layer's per-example gradients outlive
    #: their batch and the buffers never hold a batch's whole-model Jacobian
    MIN_ROWS = 32

    def update(self, ctx):
        for lid in ctx.layer_ids():
            g = ctx.per_example_grad(lid)
            acc = self._acc.get(lid)
            if acc is None:
                acc = self._acc[lid] = SymmetricAccumulator(min_rows=self.MIN_ROWS)
            acc.add(g.reshape(-1, g.shape[-1]))
            # drop our reference too: the next layer's gradients are formed while this one
            # would otherwise still be held
            del g
            ctx.release(lid)

    def finalize(self, n):
        self.result = {lid: acc.result(1.0 / n) for lid, acc in self._acc.items()}


class KFACFactors(Consumer):
    """``{layer_id: (A, G)}`` with both factors divided by ``n`` (see ``kfac_factors``); a layer
    with several Kronecker blocks (e.g. MultiheadAttention) gets the tuple
    ``((A_0, G_0), (A_1, G_1), ...)`` in its Kronecker layout order.

    ``sqrt_k_split=True`` moves a factor ``√K`` from ``G`` to ``A``, ``K`` the number of output
    directions of the function (its output width: ``C - 1`` for the closed-form
    ``classif_logits`` Fisher, ``trials`` for Monte-Carlo, ...):
    ``A = √K · (1/n) Σ a aᵀ`` and ``G = (1/√K) · (1/n) Σ_k Σ g_k g_kᵀ``. ``A ⊗ G`` is unchanged;
    this is upstream nngeometry's split of the scale, which code that reads the factors or
    damps them without π (``use_pi=False``) relies on.
    """

    def __init__(self, layer_collection, approx="expand", sqrt_k_split=False):
        self.lc = layer_collection
        self.approx = approx
        self.sqrt_k_split = sqrt_k_split
        #: K, the function's number of output directions (taken from the first batch)
        self.n_directions = None
        # lid -> one entry per Kronecker block: [[dense sum, Gram accumulator] for A, same for G]
        self._acc = {}
        self._multi = {}
        self.result = {}

    def update(self, ctx):
        if self.n_directions is None:
            self.n_directions = ctx.n_output
        for lid in ctx.layer_ids():
            try:
                blocks, multi = ctx.kfac_factor_blocks(lid, approx=self.approx, lazy=True)
            except NotImplementedError as e:
                raise NotImplementedError(
                    f"KFAC is not available for layer '{lid}' (layer type "
                    f"{type(self.lc[lid]).__name__}): {e}. Use PMatEKFACBlockDiag (EKFAC where KFAC "
                    "exists, dense blocks elsewhere), PMatBlockDiag, or a PMatMixed that puts this "
                    "layer in a non-KFAC representation") from e
            if lid not in self._acc:
                self._acc[lid] = [[[None, None], [None, None]] for _ in blocks]
                self._multi[lid] = multi
            elif len(blocks) != len(self._acc[lid]):
                raise NotImplementedError(
                    f"layer '{lid}' gives a different number of Kronecker blocks in two batches "
                    f"({len(self._acc[lid])} and {len(blocks)}): its KFAC factors cannot be "
                    "summed; use PMatBlockDiag or a PMatMixed with another representation for it")
            for b, (A, G) in enumerate(blocks):
                if A is not None:
                    self._add(lid, b, 0, A)
                self._add(lid, b, 1, G)

    def _add(self, lid, block, which, pieces):
        slots = self._acc[lid][block][which]
        for p in pieces:
            if isinstance(p, GramRows):
                if slots[1] is None:
                    slots[1] = SymmetricAccumulator(ones_column=p.ones_column)
                elif slots[1].ones_column != p.ones_column:
                    raise ValueError(
                        f"layer '{lid}' gives KFAC factor pieces with and without the ones "
                        "(bias) column in two batches: they can't be summed")
                slots[1].add(p.rows, p.scale)
            else:
                slots[0] = p if slots[0] is None else slots[0] + p

    @staticmethod
    def _mean(slots, n):
        """The slot's sum divided by ``n``, in place where the sum is a buffer of ours (no
        second factor-sized allocation at the end of the build)."""
        dense, gram = slots
        if gram is None:
            return dense / n  # may be a layer type's own tensor: not modified
        if dense is None:
            return gram.result(1.0 / n)  # the accumulator's own buffer, scaled as it is mirrored
        return gram.result().add_(dense).div_(n)

    def finalize(self, n):
        # the √K split folded into the divisions (in place where the sums are our buffers)
        root_k = float(self.n_directions) ** 0.5 if self.sqrt_k_split and self.n_directions else 1.0
        self.result = {}
        for lid, blocks in self._acc.items():
            pairs = tuple((self._mean(a, n / root_k), self._mean(g, n * root_k)) for a, g in blocks)
            self.result[lid] = pairs if self._multi[lid] else pairs[0]


class KFEDiag(Consumer):
    """EKFAC's diagonal: ``{layer_id: (1/n) Σ_{x,k} (U_Gᵀ Ĝ_k(x) U_A)²}``, shape ``(dG, dA)``.

    ``kfe`` maps each layer id to ``(U_A, U_G)`` or ``(U_A, U_G, perm)``: orthogonal matrices
    (or ints: identity) and optionally the flat -> Kronecker re-indexing (default: the layer's
    ``kfac_permutation()``). Only the layers listed in ``kfe`` are computed. A layer with several
    Kronecker blocks takes the tuple ``((U_A_0, U_G_0), (U_A_1, U_G_1), ...)`` and its result is
    the list of the blocks' ``(dG_b, dA_b)`` diagonals.
    """

    def __init__(self, layer_collection, kfe):
        self.lc = layer_collection
        self.kfe = kfe
        self.result = {}

    def update(self, ctx):
        for lid, entry in self.kfe.items():
            if isinstance(entry[0], (tuple, list)):  # several Kronecker blocks
                d = ctx.kfe_diag_blocks(lid, [tuple(e[:2]) for e in entry])
                self.result[lid] = d if lid not in self.result else \
                    [a + b for a, b in zip(self.result[lid], d)]
                continue
            UA, UG = entry[0], entry[1]
            perm = entry[2] if len(entry) > 2 else None
            d = ctx.kfe_diag(lid, UA, UG, perm)
            self.result[lid] = d if lid not in self.result else self.result[lid] + d

    def finalize(self, n):
        self.result = {lid: ([x / n for x in d] if isinstance(d, list) else d / n)
                       for lid, d in self.result.items()}


def _format_bytes(n):
    for unit, size in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def check_fits(need_bytes, what, alternatives, limit_bytes=None):
    """``MemoryError`` naming ``what``, its size and ``alternatives`` if ``need_bytes`` is more
    than this process can still allocate. The memory available is PMatDense's estimate (the
    least of ``MemAvailable``, the cgroup's limit and ``RLIMIT_AS``; see
    ``object.pspace.dense._available_memory``); ``limit_bytes`` replaces it. Checked before the
    allocation, so that a too-large result says what to do instead of failing in the allocator
    (or getting the process killed) after the whole pass over the data."""
    if limit_bytes is None:
        from ..object.pspace.dense import _available_memory  # (object imports the backend)

        limit_bytes = _available_memory()
    if limit_bytes is not None and need_bytes > limit_bytes:
        raise MemoryError(
            f"{what} needs {_format_bytes(need_bytes)}, more than the "
            f"{_format_bytes(limit_bytes)} available; {alternatives}")


#: what to use instead of per-example Jacobians too large to hold
JACOBIAN_ALTERNATIVES = (
    "use fewer examples (or a smaller LayerCollection), PMatImplicit / PFMapImplicit (products "
    "with the Jacobian, nothing of size n·P stored), or a representation that never stores "
    "per-example gradients (PMatKFAC, PMatEKFAC, PMatDiag, PMatBlockDiag)")


class Jacobian(Consumer):
    """The per-example Jacobians stacked over batches: ``(n_output, n, P)``, not normalized.

    ``n_expected``: the number of examples if known in advance (a sized DataLoader): the whole
    result's size (``n_output · n · P`` entries, held twice while the batches are concatenated)
    is checked against the memory available at the first batch (:func:`check_fits`); the
    running size is checked at every batch in any case."""

    def __init__(self, layer_collection, n_expected=None, limit_bytes=None):
        self.lc = layer_collection
        self.batches = []  # one entry per batch: list of (k_start, (K, nb, P))
        self.result = None
        self.n_expected = n_expected
        self.limit_bytes = limit_bytes
        self._n_seen = 0
        self._held = 0

    def _check_size(self, ctx):
        ref = ctx.calls[ctx.layer_ids()[0]][0].gy
        self._n_seen += ctx.n
        n = max(self.n_expected or 0, self._n_seen)
        K, P = ctx.n_output, self.lc.numel()
        need = n * K * P * ref.dtype.itemsize
        # peak: the batches' pieces and their concatenation; what is held already is not free
        check_fits(2 * need - self._held,
                   f"the per-example Jacobians (n_output={K} × n={n} × P={P}, "
                   f"{_format_bytes(need)}, held twice while concatenated)",
                   JACOBIAN_ALTERNATIVES, self.limit_bytes)
        self._held += ctx.n * K * P * ref.dtype.itemsize

    def update(self, ctx):
        if ctx.first_chunk:
            self._check_size(ctx)
            self.batches.append([])
        self.batches[-1].append(ctx.jacobian())

    def finalize(self, n):
        per_batch = [torch.cat(chunks, dim=0) for chunks in self.batches]
        self.result = torch.cat(per_batch, dim=1)
        self.batches = []


class QuasiDiagCovariance(Consumer):
    """Quasi-diagonal of ``(1/n) Σ_x J(x)ᵀ J(x)`` (Ollivier 2015), per layer ``(diag, cross)``.

    ``diag`` (``(p_l,)``) is the layer's diagonal; for a layer whose weight has shape
    ``(out, ...)`` and whose bias has shape ``(out,)``, ``cross`` (``(out, numel(weight)/out)``)
    holds ``M[w_{o,i}, b_o]``: the coupling between output unit ``o``'s bias and each of its
    weights. ``cross`` is None for layers without such a bias. Computed from the per-example
    gradients with one contraction over (outputs, examples) per layer.
    """

    def __init__(self, layer_collection):
        self.lc = layer_collection
        self.result = {}

    @staticmethod
    def unit_shape(layer):
        """``(out, n_in)`` if the layer has one bias per row of its weight, else None."""
        if layer.bias is None or not getattr(layer, "quasidiag_rows", True):
            return None
        out = layer.weight.size[0]
        if layer.bias.size != (out,):
            return None
        return out, layer.weight.numel() // out

    def update(self, ctx):
        for lid in ctx.layer_ids():
            layer = self.lc[lid]
            shape = self.unit_shape(layer)
            if shape is None:
                d, cross = ctx.layer_diag(lid), None
            else:
                g = ctx.per_example_grad(lid)
                K, n = g.shape[:2]
                nw = layer.weight.numel()
                d = (g * g).sum(dim=(0, 1))
                gw = g[:, :, :nw].reshape(K, n, *shape)
                cross = torch.einsum("knoi,kno->oi", gw, g[:, :, nw:])
                del g, gw
                ctx.release(lid)
            if lid not in self.result:
                self.result[lid] = [d, cross]
            else:
                acc = self.result[lid]
                acc[0] = acc[0] + d
                if cross is not None:
                    acc[1] = acc[1] + cross

    def finalize(self, n):
        self.result = {lid: (d / n, None if c is None else c / n)
                       for lid, (d, c) in self.result.items()}
