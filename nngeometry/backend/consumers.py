"""Consumers of per-batch statistics: each accumulates one kind of matrix over the batches.

Every statistic follows one protocol (`Consumer`):

* ``add(ctx)`` (older name ``update``): called once per mini-batch and chunk of output
  directions with a `BatchContext`; adds the batch's
  contribution to running **sums** (never means), and the batch's examples to ``count``;
* ``state()``: the sums as plain tensors (a dict of nested dicts / lists of tensors), sealing
  the lazy accumulators (`SymmetricAccumulator` keeps half a
  Gram matrix until then: no row can be added afterwards);
* ``merge(other)``: ``self`` becomes the statistic of both sets of examples (sums added,
  counts added; for row statistics the rows of ``other`` are appended after ``self``'s);
* ``all_reduce(group)`` (sums) / ``all_gather(group)`` (row statistics, ``reduction = 'rows'``:
  per-example Jacobians, in rank order): the statistic of every rank's examples, on every rank,
  with one collective (see `nngeometry.backend.distributed`);
* ``ema(other, decay)``: the running average ``decay · mean(self) + (1 - decay) · mean(other)``
  of the normalised statistics (what an optimizer's curvature estimate needs);
* ``compute()``: the normalised statistic (the sums divided by the global ``count``), also left
  in the attribute ``result``, which the representations read (``finalize(n)``, the older
  name, does the same with an explicit ``n``). Once computed, the statistic is final.

A statistic is thus a function of its state and count only: merging the statistics of two
halves of a data set gives the statistic of the whole data set (the tests check it to 1e-12 in
float64), whichever process or device computed them.

What a consumer reads of a batch is a `BatchContext`: the calls the pass driver recorded (each
module's inputs, and the gradients of the chunk's output directions w.r.t. its outputs), turned
into the statistics that the representations need (per-example gradients, diagonals, KFAC
factors, eigenbasis diagonals), with caching, so that two consumers asking for the same
per-example gradients share the work.
"""
import copy
import weakref

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from .._memory import check_fits, format_bytes as _format_bytes
from ..layer_types.base import (is_multiblock, kfac_block_list, project_blocks_to_kfe,
                                project_to_kfe, row_chunked_diag_into, rows_compatible)
from ..maths.gram_accumulator import GramRows, SymmetricAccumulator
from .distributed import all_gather_rows, all_reduce_tree
from .model_and_data import check_statistic


# ---------------------------------------------------------------------- what one batch gives
class BatchContext:
    """Statistics of one mini-batch, for output directions ``k_start .. k_start + K - 1``.

    Attributes:
        n: number of examples in the batch.
        centering: whether the per-example gradients are centered; ``mean_jacobian`` then holds
            the mean Jacobian over the whole data set, ``(n_output, P)`` in the collection's
            layout, subtracted from every example's gradients.
        K: number of output directions in this context.
        k_start: index of the first of them among all the function's outputs.
        first_chunk: True for the first chunk of output directions of a batch (statistics that
            depend on the inputs only, like KFAC's ``A``, are taken there once).
        outputs: the function's outputs for the batch, shape ``(n, n_output)`` (detached).
    """

    def __init__(self, layer_collection, modules, calls, n, K, k_start, n_output, centering, outputs):
        # centering: None / False (no centering) or the (n_output, P) mean Jacobian over the
        # whole data set (computed by a first pass of the generator)
        self.layer_collection = layer_collection
        self.modules = modules
        self.calls = calls
        self.n = n
        self.K = K
        self.k_start = k_start
        self.n_output = n_output
        self.first_chunk = k_start == 0
        self.mean_jacobian = centering if isinstance(centering, torch.Tensor) else None
        if centering is True:
            raise ValueError("centering needs the mean Jacobian over the whole data set (a "
                             "(n_output, P) tensor), not True: the generator computes it")
        self.centering = self.mean_jacobian is not None
        self.outputs = outputs
        self._grads = {}
        self._jacobian = None

    def layer_ids(self):
        return self.layer_collection.layer_ids()

    def restricted(self, layer_collection):
        """This batch seen by a statistic of a sub-collection (``layer_collection``: some of
        this context's layers, see ``LayerCollection.sub``): the same calls and cached
        per-example gradients, its layers only."""
        if self.centering:
            raise NotImplementedError("a restricted batch context with centering (the mean "
                                      "Jacobian is in the whole collection's layout)")
        missing = [lid for lid in layer_collection.layer_ids() if lid not in self.calls]
        if missing:
            raise ValueError(f"layers {missing} are not in this batch's collection")
        view = copy.copy(self)
        view.layer_collection = layer_collection
        view._jacobian = None
        return view

    def per_example_grad(self, layer_id):
        """``(K, n, p_layer)``: per-example gradients of the layer (summed over its calls)."""
        g = self._grads.get(layer_id)
        if g is None:
            layer, module = self.layer_collection[layer_id], self.modules[layer_id]
            parts = [(c.spec or layer).per_example_grad(c.module or module,
                                                        (c.spec or layer).inputs_of(c), c.gy)
                     for c in self.calls[layer_id]]
            g = parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)
            if self.centering:
                # the data set's mean Jacobian, not the batch's: centering per mini-batch would
                # make the result depend on how the data is batched
                mean = self.mean_jacobian[self.k_start:self.k_start + self.K,
                                          self.layer_collection.slice(layer_id)]
                g = g - mean.unsqueeze(1)
            self._grads[layer_id] = g
        return g

    def release(self, layer_id):
        """Forget the layer's cached per-example gradients: consumers that go layer by layer call
        it once done with a layer, so that a batch's whole-model Jacobian is never held."""
        self._grads.pop(layer_id, None)

    def jacobian(self):
        """``(K, n, P)``: per-example Jacobian rows in the collection's layout."""
        if self._jacobian is None:
            ids = self.layer_ids()
            if len(ids) == 1:
                self._jacobian = self.per_example_grad(ids[0])
            else:
                self._jacobian = torch.cat([self.per_example_grad(lid) for lid in ids], dim=2)
                # the per-layer pieces are no longer needed: keep the peak memory down
                self._grads.clear()
        return self._jacobian

    def _row_uses(self, layer_id, prepare=True):
        """``[(layer spec, rows state), ...]`` for a layer called several times or sharing its
        weight with other modules, when every use has the row-block maths with one layout (see
        ``layer_types.base.row_chunked_diag_into``); None otherwise."""
        calls = self.calls[layer_id]
        if self.centering or layer_id in self._grads or \
                (len(calls) == 1 and calls[0].spec is None):
            return None
        layer, module = self.layer_collection[layer_id], self.modules[layer_id]
        specs = [c.spec or layer for c in calls]
        if not rows_compatible(specs):
            return None
        if not prepare:
            return True
        return [(spec, spec.rows_prepare(c.module or module, spec.inputs_of(c), c.gy))
                for spec, c in zip(specs, calls)]

    def layer_diag(self, layer_id):
        """``sum_{k,i} g_{k,i}²`` over the layer's coordinates, without per-example grads where
        the layer type allows it."""
        calls = self.calls[layer_id]
        if self._row_uses(layer_id, prepare=False) is not None:
            out = calls[0].gy.new_zeros(self.layer_collection[layer_id].numel())
            return self.layer_diag_into(layer_id, out)
        if len(calls) == 1 and calls[0].spec is None and not self.centering and \
                layer_id not in self._grads:
            layer = self.layer_collection[layer_id]
            return layer.diag(self.modules[layer_id], layer.inputs_of(calls[0]), calls[0].gy)
        g = self.per_example_grad(layer_id)
        return (g * g).sum(dim=(0, 1))

    def layer_diag_into(self, layer_id, out):
        """``out += layer_diag(layer_id)`` for ``out`` the layer's slice of a running sum: in
        place where the layer type has ``diag_into`` (no per-batch diagonal allocated)."""
        calls = self.calls[layer_id]
        layer = self.layer_collection[layer_id]
        if len(calls) == 1 and calls[0].spec is None and not self.centering and \
                layer_id not in self._grads:
            return layer.diag_into(self.modules[layer_id], layer.inputs_of(calls[0]),
                                   calls[0].gy, out)
        uses = self._row_uses(layer_id)
        if uses is not None:
            # tied weights or a module called several times: the summed per-example gradients
            # by blocks of examples and rows, never the (K, n, p) gradients of each use
            return row_chunked_diag_into(uses, calls[0].gy.shape[0], self.n, out)
        out += self.layer_diag(layer_id)
        return out

    def kfac_factors(self, layer_id, approx="expand", lazy=False):
        """Unnormalized ``(A, G)`` of the layer for this batch; ``A`` is None past the first chunk
        of output directions (it depends on the inputs only).

        With ``lazy=True`` each factor is a list of pieces, dense tensors or
        `GramRows` (left for the consumer to accumulate with
        symmetric, batched GEMMs); otherwise dense tensors (or 1-D for diagonal factors).
        """
        blocks, multi = self.kfac_factor_blocks(layer_id, approx=approx, lazy=lazy)
        return blocks if multi else blocks[0]

    def kfac_factor_blocks(self, layer_id, approx="expand", lazy=False, into=None):
        """``(blocks, multi)``: ``blocks`` the list of ``(A, G)`` (as `kfac_factors`) of
        each Kronecker block of the layer (one for most layer types), ``multi`` whether the
        layer type returned several blocks (see ``AbstractLayer.kfac_factors``).

        ``into``: for a layer type that can add its input factor into a running sum
        (`input_factor_into`), that sum (or None for a new one): every call of the layer adds
        its ``A`` there, and the block's ``A`` is that one tensor."""
        if self.centering:
            raise NotImplementedError("KFAC with centering=True is not implemented")
        if any(c.spec is not None for c in self.calls[layer_id]):
            raise NotImplementedError(
                f"layer '{layer_id}' has tied weights (another module uses its parameters): its "
                "block is a sum of two Kronecker products, which KFAC/EKFAC cannot hold. Use "
                "PMatMixed with PMatDiag or PMatBlockDiag for this layer, or leave the tied pair "
                "out of the LayerCollection")
        layer, module = self.layer_collection[layer_id], self.modules[layer_id]
        A, G, multi, locations = None, None, None, []
        accumulate = self.first_chunk and self.input_factor_into(layer_id, approx)
        # past the first chunk of directions A is dropped: layer types whose A is costly to
        # form (convolutions: a GEMM on the unfolded patches) are told not to form it
        skip_a = ({"input_factor": False}
                  if not self.first_chunk and getattr(layer, "kfac_input_factor_optional", False)
                  else {})
        for c in self.calls[layer_id]:
            x = layer.inputs_of(c)
            res = layer.kfac_factors(module, x, c.gy, approx=approx,
                                     **({"into": into} if accumulate else skip_a))
            locations.append(layer.kfac_locations(module, x, c.gy, approx=approx))
            pairs = kfac_block_list(res)
            if A is None:
                A, G = [[] for _ in pairs], [[] for _ in pairs]
                multi = is_multiblock(res)
            elif len(pairs) != len(A) or is_multiblock(res) != multi:
                raise NotImplementedError(
                    f"layer '{layer_id}' gives a different number of Kronecker blocks in two of "
                    f"its calls ({len(A)} and {len(pairs)}; e.g. an attention module used both "
                    "as self- and cross-attention): its KFAC factors cannot be summed; use "
                    "PMatBlockDiag or a PMatMixed with another representation for this layer")
            for b, (a, g) in enumerate(pairs):
                if accumulate:
                    # the calls' A added up in one tensor: it is the block's one piece
                    into, A[b] = a, [a]
                else:
                    A[b].append(a)
                G[b].append(g)
        uses = len(self.calls[layer_id])
        if uses > 1:
            # a module called R times in one forward (nn.Sequential(lin, act, lin)): each use
            # brings its locations of the shared weight, as positions do in 'expand' (see
            # docs/layers.md): A = Σ_r A_r, G = Σ_r S_r G_r / Σ_r S_r with G_r = Σ g gᵀ / S_r
            # as the layer type gives it, i.e. Σ g gᵀ over all the calls' locations divided by
            # their number: the same factors as one call on the locations put together. A
            # layer type that cannot say S_r: each call counts alike, (1/R) Σ_r G_r
            if None in locations:
                weights = [1.0 / uses] * uses
            else:
                weights = [s / sum(locations) for s in locations]
            G = [[_sum_pieces([_scaled(p, w) for p, w in zip(pg, weights)])] for pg in G]
        if lazy:
            return [((pa if self.first_chunk else None), pg) for pa, pg in zip(A, G)], multi
        return [((_sum_pieces(pa) if self.first_chunk else None), _sum_pieces(pg))
                for pa, pg in zip(A, G)], multi

    def input_factor_into(self, layer_id, approx="expand"):
        """Whether `kfac_factor_blocks` can add this layer's input factor into a given sum
        (a layer type with ``kfac_input_factor_into``, ``'expand'``, one Kronecker block, no
        tied weights)."""
        layer = self.layer_collection[layer_id]
        return (approx == "expand" and getattr(layer, "kfac_input_factor_into", False)
                and all(c.spec is None for c in self.calls[layer_id]))

    def kfe_diag(self, layer_id, UA, UG, perm=None):
        """``Σ_{k,i} (U_Gᵀ Ĝ_{k,i} U_A)²`` for this batch (EKFAC), shape ``(dG, dA)``; ``perm``
        (flat -> Kronecker index) defaults to the layer's ``kfac_permutation()``, and then the
        layer type's formula from inputs and output gradients is used where it applies."""
        layer, module = self.layer_collection[layer_id], self.modules[layer_id]
        calls = self.calls[layer_id]
        if perm is None and len(calls) == 1 and calls[0].spec is None and not self.centering \
                and layer_id not in self._grads:
            return layer.kfe_diag(module, layer.inputs_of(calls[0]), calls[0].gy, UA, UG)
        if perm is None:
            perm = layer.kfac_permutation()
        g = project_to_kfe(self.per_example_grad(layer_id), UA, UG, perm)
        return (g * g).sum(dim=(0, 1))

    def kfe_diag_blocks(self, layer_id, bases):
        """`kfe_diag` for a multi-block layer: ``bases`` ``[(U_A_b, U_G_b), ...]`` in the
        layer's Kronecker layout order; returns the list of ``(dG_b, dA_b)`` sums."""
        layer, module = self.layer_collection[layer_id], self.modules[layer_id]
        calls = self.calls[layer_id]
        if len(calls) == 1 and calls[0].spec is None and not self.centering and \
                layer_id not in self._grads:
            return layer.kfe_diag_blocks(module, layer.inputs_of(calls[0]), calls[0].gy, bases)
        gs = project_blocks_to_kfe(self.per_example_grad(layer_id), bases,
                                   layer.kfac_permutation())
        return [(g * g).sum(dim=(0, 1)) for g in gs]


def _scaled(piece, w):
    """``w`` times a factor piece (a dense tensor or GramRows)."""
    if isinstance(piece, GramRows):
        return GramRows(piece.rows, piece.scale * w, piece.ones_column)
    return piece * w


def _sum_pieces(pieces):
    """Sum of factor pieces (dense tensors or GramRows) as one tensor."""
    total = None
    for p in pieces:
        d = p.dense() if isinstance(p, GramRows) else p
        total = d if total is None else total + d
    return total


# ---------------------------------------------------------------------- the consumers
def _tree_combine(a, b, fn, what, rows_dim=None):
    """``fn(x, y)`` on the tensor leaves of two trees of the same structure (other leaves are
    taken from ``a``); the shapes must agree, except along ``rows_dim`` if given."""
    la, sa = tree_flatten(a)
    lb, sb = tree_flatten(b)
    if sa != sb or len(la) != len(lb):
        raise ValueError(f"{what}: the two statistics have different structures (different "
                         "layers, Kronecker blocks or output sizes), so they can't be combined: "
                         "both must come from the same model, layer collection and function")
    out = []
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            sx, sy = list(x.shape), list(y.shape)
            if rows_dim is not None and len(sx) == len(sy):
                sx[rows_dim] = sy[rows_dim] = 0
            if sx != sy:
                raise ValueError(f"{what}: a tensor of shape {tuple(x.shape)} can't be combined "
                                 f"with one of shape {tuple(y.shape)}")
            out.append(fn(x, y))
        else:
            out.append(x)
    return tree_unflatten(out, sa)


def _tree_map_tensors(tree, fn):
    leaves, spec = tree_flatten(tree)
    return tree_unflatten([fn(x) if isinstance(x, torch.Tensor) else x for x in leaves], spec)


class Consumer:
    """The accumulator protocol (see the module docstring).

    Subclasses implement ``update(ctx)`` (add one batch to the sums), ``finalize(n)`` (put the
    sums divided by ``n`` in ``result``), and say which attributes hold the sums
    (``state_attrs``; default: every attribute but the layer collection, the count and the
    result, which suits simple consumers whose sums are tensors in dicts and lists). Lazy
    accumulators are turned into tensors by ``_seal()``.
    """

    #: 'sum': statistics summed over examples (reduced with all_reduce); 'rows': one row per
    #: example along ``rows_dim`` (gathered with all_gather, in rank order)
    reduction = "sum"
    rows_dim = None
    #: names of the attributes holding the statistic's state (None: see the class docstring)
    state_attrs = None
    #: examples added so far (after a distributed reduction: of all the ranks)
    count = 0

    _NOT_STATE = ("lc", "layer_collection", "count", "result", "_reduced")

    # ---------------------------------------------------------------- per batch
    def add(self, ctx):
        """Add one batch (one chunk of output directions) to the sums."""
        if ctx.first_chunk:
            self.count = self.count + ctx.n
        self.update(ctx)

    def update(self, ctx):
        raise NotImplementedError

    def finalize(self, n):
        raise NotImplementedError

    # ---------------------------------------------------------------- state
    def _seal(self):
        """Turn lazy accumulators into plain tensors (no row can be added afterwards)."""

    def _state_names(self):
        if self.state_attrs is not None:
            return list(self.state_attrs)
        return [k for k in vars(self) if k not in self._NOT_STATE]

    def state(self):
        """The sums, as ``{attribute: nested dicts / lists / tuples of tensors}``."""
        self._seal()
        return {k: getattr(self, k) for k in self._state_names()}

    def load_state(self, state, count):
        """Replace the sums by ``state`` and the example count by ``count``. The containers
        (dicts, lists) are copied, the tensors are not: adding rows replaces this statistic's
        sums, never the tensors or the containers of ``state`` (nor of the statistic that gave
        it)."""
        for k, v in state.items():
            setattr(self, k, _tree_map_tensors(v, lambda t: t))
        self.count = count
        return self

    # ---------------------------------------------------------------- combining
    def merge(self, other):
        """``self`` becomes the statistic of its examples and of ``other``'s (returns ``self``)."""
        if type(other) is not type(self):
            raise TypeError(f"can't merge a {type(other).__name__} into a {type(self).__name__}")
        theirs = other.state()
        if not other.count:
            return self
        if not self.count:
            return self.load_state(_tree_map_tensors(theirs, torch.clone), other.count)
        mine = self.state()
        if self.reduction == "rows":
            combined = _tree_combine(mine, theirs, lambda a, b: torch.cat([a, b], self.rows_dim),
                                     f"merging {type(self).__name__}", self.rows_dim)
        else:
            combined = _tree_combine(mine, theirs, torch.add, f"merging {type(self).__name__}")
        return self.load_state(combined, self.count + other.count)

    def ema(self, other, decay):
        """``self`` becomes the running average of the normalised statistics,
        ``decay · (self's sums / self.count) + (1 - decay) · (other's sums / other.count)``,
        stored as sums over ``other.count`` examples (so ``compute()`` gives the average).
        ``decay`` in ``[0, 1]``; an empty ``self`` takes ``other`` as is."""
        if self.reduction == "rows":
            raise TypeError(f"{type(self).__name__} holds one row per example: a running average "
                            "of it has no meaning (average the matrices built from it instead)")
        decay = float(decay)
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay={decay} must lie in [0, 1]")
        if not other.count:
            raise ValueError("ema(): the new statistic saw no example")
        theirs = other.state()
        if not self.count:
            return self.load_state(_tree_map_tensors(theirs, torch.clone), other.count)
        mine = self.state()
        n_self, n_other = float(self.count), float(other.count)
        combined = _tree_combine(
            mine, theirs, lambda a, b: a * (decay * n_other / n_self) + b * (1.0 - decay),
            f"ema of {type(self).__name__}")
        return self.load_state(combined, other.count)

    def all_reduce(self, group=None, device=None):
        """Sum the state over the ranks of ``group`` (default: the world), with one collective
        (plus a small exchange of the counts and shapes, which lets a rank that saw no example
        take part): afterwards every rank holds the statistic of all the examples. ``device``:
        where a rank without examples makes its zeros (the model's device; the default, the
        CPU, suits gloo, not NCCL)."""
        if self.reduction == "rows":
            return self.all_gather(group, device)
        state, total = all_reduce_tree(self.state(), self.count, group, type(self).__name__,
                                       device)
        self._reduced = True  # (a later pass into it would count these examples again)
        return self.load_state(state, total)

    def all_gather(self, group=None, device=None):
        """Row statistics: every rank's rows concatenated along ``rows_dim`` in rank order
        (rank 0's examples first), on every rank."""
        if self.reduction != "rows":
            return self.all_reduce(group, device)
        names = self._state_names()
        if len(names) != 1:
            raise NotImplementedError("row statistics hold one tensor")
        t = self.state()[names[0]]
        t, counts = all_gather_rows(t if self.count else None, self.count, group, self.rows_dim,
                                    type(self).__name__, device)
        self._reduced = True
        return self.load_state({names[0]: t}, sum(counts))

    def compute(self):
        """The normalised statistic (also left in ``result``); final afterwards."""
        if not self.count:
            raise ValueError(f"{type(self).__name__}: no example was added, nothing to normalise")
        self.finalize(self.count)
        lc = getattr(self, "lc", None)
        if lc is not None:
            # NaN / Inf from the backward pass of any of the passes merged into it
            check_statistic(self.result, lc)
        return self.result


def _seal_gram(acc):
    """The full (mirrored) sum of a SymmetricAccumulator, or ``acc`` if it is a tensor/None."""
    return acc.result() if isinstance(acc, SymmetricAccumulator) else acc


def _mean_of(acc, n):
    """``acc / n`` for a (sealed or not) sum: scaled while mirrored where it is still lazy."""
    if acc is None:
        return None
    if isinstance(acc, SymmetricAccumulator):
        return acc.result(1.0 / n)
    return acc.div_(n)


def _live(acc, statistic):
    """``acc`` if rows can still be added to it (``RuntimeError`` once its state was taken)."""
    if not isinstance(acc, SymmetricAccumulator):
        raise RuntimeError(f"{statistic}: rows added after state() / merge() sealed the sums; "
                           "accumulate into a new statistic and merge it")
    return acc


class DenseCovariance(Consumer):
    """``(1/n) Σ_x J(x)ᵀ J(x)``, shape ``(P, P)``. State: ``_acc``, the ``(P, P)`` sum."""

    state_attrs = ("_acc",)

    def __init__(self, layer_collection):
        self.lc = layer_collection
        self._acc = SymmetricAccumulator()
        self.result = None

    def update(self, ctx):
        J = ctx.jacobian()
        _live(self._acc, "DenseCovariance").add(J.reshape(-1, J.shape[-1]))

    def _seal(self):
        self._acc = _seal_gram(self._acc)

    def finalize(self, n):
        # the 1/n is applied while the sum is mirrored (no extra pass over the P × P matrix)
        self.result = _mean_of(self._acc, n)


class SubnetworkCovariance(Consumer):
    """``(1/n) Σ_x J(x)[:, idx]ᵀ J(x)[:, idx]``, shape ``(k, k)``: the matrix restricted to the
    flat parameter indices ``idx`` (a subnetwork), from each batch's per-example Jacobian
    columns (``K n k`` numbers per layer batch, never ``P × P``). State: ``_acc``, the
    ``(k, k)`` sum."""

    state_attrs = ("_acc",)

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
            _live(self._acc, "SubnetworkCovariance").add(rows.reshape(-1, rows.shape[-1]))

    def _seal(self):
        self._acc = _seal_gram(self._acc)

    def finalize(self, n):
        self.result = _mean_of(self._acc, n)


class DiagCovariance(Consumer):
    """Diagonal of ``(1/n) Σ_x J(x)ᵀ J(x)``, shape ``(P,)``. State: ``_sum``, ``(P,)``."""

    state_attrs = ("_sum",)

    def __init__(self, layer_collection):
        self.lc = layer_collection
        self._sum = None
        self.result = None

    def update(self, ctx):
        if self._sum is None:
            ref = ctx.calls[ctx.layer_ids()[0]][0].gy  # the layers' gradient dtype/device
            self._sum = torch.zeros(self.lc.numel(), dtype=ref.dtype, device=ref.device)
        # in place, layer by layer, into the layer's slice of the sum: no concatenated copy and
        # no new (P,) sum per batch (layer types with ``diag_into`` add their GEMM in place)
        for lid in ctx.layer_ids():
            ctx.layer_diag_into(lid, self._sum[self.lc.slice(lid)])

    def finalize(self, n):
        # in place: the running sum is this consumer's own buffer (no second (P,) allocation)
        self.result = self._sum.div_(n)


class LayerGroups(Consumer):
    """Several statistics from one pass, each on its own layers: ``parts`` maps a name to a
    consumer built on a sub-collection of the pass's collection (its ``lc``); every batch is
    given to each consumer restricted to its layers (`BatchContext.restricted`), so that
    e.g. KFAC factors of some layers and the diagonal of others share one forward and one
    backward pass. ``result``: ``{name: that consumer's result}``. State: each consumer's."""

    def __init__(self, parts):
        self.parts = dict(parts)
        self.result = None

    def update(self, ctx):
        for part in self.parts.values():
            part.add(ctx.restricted(part.lc))

    def finalize(self, n):
        for part in self.parts.values():
            part.finalize(n)
        self.result = {name: part.result for name, part in self.parts.items()}

    def _seal(self):
        for part in self.parts.values():
            part._seal()

    def state(self):
        return {name: part.state() for name, part in self.parts.items()}

    def load_state(self, state, count):
        for name, part in self.parts.items():
            part.load_state(state[name], count)
        self.count = count
        return self


class LayerBlocks(Consumer):
    """``{layer_id: (1/n) Σ_x J_l(x)ᵀ J_l(x)}``: one dense block per layer. State: ``_acc``,
    ``{layer_id: (p_l, p_l) sum}``."""

    state_attrs = ("_acc",)

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
            _live(acc, "LayerBlocks").add(g.reshape(-1, g.shape[-1]))
            # drop our reference too: the next layer's gradients are formed while this one
            # would otherwise still be held
            del g
            ctx.release(lid)

    def _seal(self):
        self._acc = {lid: _seal_gram(acc) for lid, acc in self._acc.items()}

    def finalize(self, n):
        self.result = {lid: _mean_of(acc, n) for lid, acc in self._acc.items()}


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

    State: ``_acc``, ``{layer_id: [[A sum, None], [G sum, None]] per Kronecker block}`` once
    sealed (before: ``[dense part, Gram accumulator]`` pairs), plus ``_multi`` and
    ``n_directions`` (flags, not summed).
    """

    state_attrs = ("_acc", "_multi", "n_directions")
    #: each layer's gradients are reduced on their own: output directions are chunked by the
    #: layers' output gradients, not by the whole model's per-example Jacobian (see
    #: ``BackwardStrategy._chunk_size``)
    per_layer = True

    def __init__(self, layer_collection, approx="expand", sqrt_k_split=False):
        self.lc = layer_collection
        self.approx = approx
        self.sqrt_k_split = sqrt_k_split
        #: K, the function's number of output directions (taken from the first batch)
        self.n_directions = None
        # lid -> one entry per Kronecker block: [[dense sum, Gram accumulator] for A, same for G]
        self._acc = {}
        self._multi = {}
        self._sealed = False
        self.result = {}
        # id -> dense sum allocated here (added to and divided in place; a layer type's own
        # tensor, or one loaded by load_state, is never modified)
        self._owned = weakref.WeakValueDictionary()

    def __getstate__(self):  # (copies and pickles own nothing: their sums are copied as new)
        state = dict(self.__dict__)
        state.pop("_owned", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._owned = weakref.WeakValueDictionary()

    def _seal(self):
        # each slot [dense part, Gram accumulator] becomes [its whole sum, None]
        for blocks in self._acc.values():
            for pair in blocks:
                for slots in pair:
                    dense, gram = slots
                    if gram is not None:
                        total = gram.result()
                        if dense is not None:
                            total = total.add_(dense)
                        slots[0], slots[1] = total, None
        self._sealed = True
        self._owned.clear()  # the sums are shown by state(): not modified in place any more

    def update(self, ctx):
        if self._sealed:
            raise RuntimeError("KFACFactors: rows added after state() / merge() sealed the "
                               "sums; accumulate into a new statistic and merge it")
        if self.n_directions is None:
            self.n_directions = ctx.n_output
        for lid in ctx.layer_ids():
            # the input factor added into our running sum where the layer type can (a
            # convolution's A is a GEMM on its unfolded patches: no factor-sized tensor per
            # batch beside the sum)
            accumulates = ctx.first_chunk and ctx.input_factor_into(lid, self.approx)
            into = None
            if accumulates and len(self._acc.get(lid, ())) == 1:
                dense = self._acc[lid][0][0][0]
                into = dense if self._owns(dense) else None
            try:
                blocks, multi = ctx.kfac_factor_blocks(lid, approx=self.approx, lazy=True,
                                                       into=into)
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
                    self._add(lid, b, 0, A, own=accumulates)
                self._add(lid, b, 1, G)

    def _add(self, lid, block, which, pieces, own=False):
        """Add ``pieces`` to the slot; ``own``: a dense piece is a new tensor made for this
        statistic (a layer type's sum `into` which later batches add), or already the slot's
        own sum."""
        slots = self._acc[lid][block][which]
        for p in pieces:
            if p is slots[0]:
                continue  # added into the slot's sum in place
            if own and slots[0] is None and isinstance(p, torch.Tensor):
                slots[0] = self._own(p)
                continue
            if isinstance(p, GramRows):
                if slots[1] is None:
                    slots[1] = SymmetricAccumulator(ones_column=p.ones_column)
                elif slots[1].ones_column != p.ones_column:
                    raise ValueError(
                        f"layer '{lid}' gives KFAC factor pieces with and without the ones "
                        "(bias) column in two batches: they can't be summed")
                slots[1].add(p.rows, p.scale)
            elif slots[0] is None:
                slots[0] = p
            elif self._owns(slots[0]):
                slots[0].add_(p)
            else:
                slots[0] = self._own(slots[0] + p)

    def _owns(self, t):
        """Whether ``t`` is a sum allocated by this statistic (added to in place)."""
        return t is not None and self._owned.get(id(t)) is t

    def _own(self, t):
        self._owned[id(t)] = t
        return t

    def _mean(self, slots, n):
        """The slot's sum divided by ``n``, in place where the sum is a buffer of ours (no
        second factor-sized allocation at the end of the build: on a ResNet-18 the A factors
        alone are 350 MiB)."""
        dense, gram = slots
        if gram is None:
            if self._owns(dense):
                return dense.div_(n)
            return dense / n  # may be a layer type's own tensor (or another's): not modified
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


class KFACOrLayerBlocks(Consumer):
    """One pass over the data: KFAC factors for the layers whose type computes them, the dense
    block ``(1/n) Σ_x J_l(x)ᵀ J_l(x)`` for the others (including layers whose ``kfac_factors``
    refuses their configuration). What `PMatEKFACBlockDiag` is built from.

    After ``finalize(n)``: ``factors``, ``{layer_id: (A, G)}`` (both divided by ``n``; a layer
    with several Kronecker blocks gets the tuple ``((A_0, G_0), ...)``, as `KFACFactors`), and
    ``blocks``, ``{layer_id: (p_l, p_l)}`` for the other layers; ``result`` holds both, by
    layer."""

    def __init__(self, layer_collection, approx):
        self.lc = layer_collection
        self.approx = approx
        self.factors = {}
        self.multi = {}
        self.blocks = {}
        self.refused = set(lid for lid, l in layer_collection.layers.items()
                           if not getattr(l, "supports_kfac", False))

    def update(self, ctx):
        for lid in ctx.layer_ids():
            if lid not in self.refused:
                try:
                    blocks, multi = ctx.kfac_factor_blocks(lid, approx=self.approx)
                except NotImplementedError:
                    if lid in self.factors:
                        raise
                    self.refused.add(lid)
                else:
                    if lid not in self.factors:
                        self.factors[lid] = [[None, None] for _ in blocks]
                        self.multi[lid] = multi
                    elif len(blocks) != len(self.factors[lid]):
                        raise NotImplementedError(
                            f"layer '{lid}' gives a different number of Kronecker blocks in two "
                            "batches: its KFAC factors cannot be summed")
                    for acc, (A, G) in zip(self.factors[lid], blocks):
                        if A is not None:
                            acc[0] = A if acc[0] is None else acc[0] + A
                        acc[1] = G if acc[1] is None else acc[1] + G
                    continue
            g = ctx.per_example_grad(lid)
            g = g.reshape(-1, g.shape[-1])
            if lid not in self.blocks:
                self.blocks[lid] = g.new_zeros(g.shape[1], g.shape[1])
            self.blocks[lid].addmm_(g.t(), g)

    def finalize(self, n):
        out = {}
        for lid, accs in self.factors.items():
            pairs = tuple((A / n, G / n) for A, G in accs)
            out[lid] = pairs if self.multi[lid] else pairs[0]
        self.factors = out
        self.blocks = {lid: B / n for lid, B in self.blocks.items()}
        # one entry per layer (the two dicts' keys are disjoint): what the finiteness check reads
        self.result = {**self.factors, **self.blocks}


class KFEDiag(Consumer):
    """EKFAC's diagonal: ``{layer_id: (1/n) Σ_{x,k} (U_Gᵀ Ĝ_k(x) U_A)²}``, shape ``(dG, dA)``.

    ``kfe`` maps each layer id to ``(U_A, U_G)`` or ``(U_A, U_G, perm)``: orthogonal matrices
    (or ints: identity) and optionally the flat -> Kronecker re-indexing (default: the layer's
    ``kfac_permutation()``). Only the layers listed in ``kfe`` are computed. A layer with several
    Kronecker blocks takes the tuple ``((U_A_0, U_G_0), (U_A_1, U_G_1), ...)`` and its result is
    the list of the blocks' ``(dG_b, dA_b)`` diagonals.

    State: ``_sum``, ``{layer_id: (dG, dA) sum or list of them}``.
    """

    state_attrs = ("_sum",)

    def __init__(self, layer_collection, kfe):
        self.lc = layer_collection
        self.kfe = kfe
        self._sum = {}
        self.result = {}

    def update(self, ctx):
        for lid, entry in self.kfe.items():
            if isinstance(entry[0], (tuple, list)):  # several Kronecker blocks
                d = ctx.kfe_diag_blocks(lid, [tuple(e[:2]) for e in entry])
                self._sum[lid] = d if lid not in self._sum else \
                    [a + b for a, b in zip(self._sum[lid], d)]
                continue
            UA, UG = entry[0], entry[1]
            perm = entry[2] if len(entry) > 2 else None
            d = ctx.kfe_diag(lid, UA, UG, perm)
            self._sum[lid] = d if lid not in self._sum else self._sum[lid] + d

    def finalize(self, n):
        self.result = {lid: ([x / n for x in d] if isinstance(d, list) else d / n)
                       for lid, d in self._sum.items()}


#: what to use instead of per-example Jacobians too large to hold
JACOBIAN_ALTERNATIVES = (
    "use fewer examples (or a smaller LayerCollection), PMatImplicit / PFMapImplicit (products "
    "with the Jacobian, nothing of size n·P stored), or a representation that never stores "
    "per-example gradients (PMatKFAC, PMatEKFAC, PMatDiag, PMatBlockDiag)")


class PerExampleJacobians(Consumer):
    """The per-example Jacobians stacked over batches: ``(n_output, n, P)``, not normalized.

    ``n_expected``: the number of examples if known in advance (a sized DataLoader): the whole
    result's size (``n_output · n · P`` entries, held twice while the batches are concatenated)
    is checked against the memory available at the first batch (`check_fits`); the
    running size is checked at every batch in any case.

    A row statistic (``reduction = 'rows'``): its state ``batches`` is sealed into the one
    ``(n_output, n, P)`` tensor; [`merge`][nngeometry.layercollection.LayerCollection.merge] appends rows and `all_gather` concatenates
    the ranks' examples in rank order."""

    reduction = "rows"
    rows_dim = 1
    state_attrs = ("batches",)

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
        if not isinstance(self.batches, list):
            raise RuntimeError("PerExampleJacobians: rows added after state() / merge() sealed "
                               "them; accumulate into a new statistic and merge it")
        if ctx.first_chunk:
            self._check_size(ctx)
            self.batches.append([])
        self.batches[-1].append(ctx.jacobian())

    def _seal(self):
        if isinstance(self.batches, list):
            per_batch = [torch.cat(chunks, dim=0) for chunks in self.batches]
            self.batches = torch.cat(per_batch, dim=1) if per_batch else None

    def finalize(self, n):
        self._seal()
        self.result = self.batches
        self.batches = []


class QuasiDiagCovariance(Consumer):
    """Quasi-diagonal of ``(1/n) Σ_x J(x)ᵀ J(x)`` (Ollivier 2015), per layer ``(diag, cross)``.

    ``diag`` (``(p_l,)``) is the layer's diagonal; for a layer whose weight has shape
    ``(out, ...)`` and whose bias has shape ``(out,)``, ``cross`` (``(out, numel(weight)/out)``)
    holds ``M[w_{o,i}, b_o]``: the coupling between output unit ``o``'s bias and each of its
    weights. ``cross`` is None for layers without such a bias. Computed from the per-example
    gradients with one contraction over (outputs, examples) per layer.

    State: ``_sum``, ``{layer_id: [diag sum, cross sum or None]}``.
    """

    state_attrs = ("_sum",)

    def __init__(self, layer_collection):
        self.lc = layer_collection
        self._sum = {}
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
            if lid not in self._sum:
                self._sum[lid] = [d, cross]
            else:
                acc = self._sum[lid]
                acc[0] = acc[0] + d
                if cross is not None:
                    acc[1] = acc[1] + cross

    def finalize(self, n):
        self.result = {lid: (d / n, None if c is None else c / n)
                       for lid, (d, c) in self._sum.items()}


class EmptyExamplesError(ValueError):
    """The examples yielded no data. A ``ValueError`` (what callers catch); its own class so
    that a rank with an empty shard can take part in a reduction instead of failing."""
