"""Data parallelism over ``torch.distributed``: the collectives that turn per-rank statistics
into the statistics of the whole data set.

Every rank runs the model over its own shard of the examples (e.g. a ``DataLoader`` with a
``DistributedSampler``) and accumulates *sums* (see `nngeometry.backend.consumers`); after
the pass, and not per batch:

* statistics that are sums over examples (Grams, diagonals, KFAC factors, EKFAC diagonals,
  quasi-diagonals, Hessians, implicit products) are summed over the ranks with one
  ``all_reduce`` (one flat buffer per dtype), then divided by the global example count;
* statistics with one row per example (per-example Jacobians, ``J v`` products) are gathered
  with one ``all_gather``, concatenated in **rank order**: rank 0's examples first, in the order
  its loader gave them, then rank 1's, ... (a ``DistributedSampler`` interleaves the data set,
  so this is not the data set's own order).

Before either, one small ``all_gather_object`` exchanges each rank's example count and the
*shapes* of its statistic: a rank whose shard is empty (it saw no example, so it has no tensor
of the right shape) builds zeros of the shapes the other ranks report and still takes part in
the collective. All the ranks must call the same computations in the same order, as with any
collective.

The collectives run on the statistics' device: NCCL process groups with CUDA tensors, gloo with
CPU tensors, whichever the group's backend is (nothing here moves a tensor to the host).
"""
import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten


def _dist():
    import torch.distributed as dist

    return dist


def resolve_group(distributed=None, process_group=None):
    """The process group to reduce over, or ``None`` for a single-process computation.

    ``distributed``: ``None`` (auto: on when ``torch.distributed`` is initialised and the group
    has more than one rank), ``True`` (required: ``RuntimeError`` if no process group is
    initialised) or ``False`` (off: each rank computes the matrix of its own examples).
    ``process_group``: the group (default: the world)."""
    if distributed not in (None, True, False):
        raise ValueError(f"distributed={distributed!r}: use None (auto), True or False")
    if distributed is False:
        return None
    dist = _dist()
    if not (dist.is_available() and dist.is_initialized()):
        if distributed:
            raise RuntimeError(
                "distributed=True but torch.distributed has no initialised process group: call "
                "torch.distributed.init_process_group(...) first (torchrun sets the environment "
                "for it), or pass distributed=None / False")
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    if distributed is None and dist.get_world_size(group) <= 1:
        return None
    return group


class _TensorSpec:
    """What an empty rank needs to build zeros in place of a statistic's tensor."""

    __slots__ = ("shape", "dtype")

    def __init__(self, t):
        self.shape, self.dtype = tuple(t.shape), t.dtype

    def __eq__(self, other):
        return isinstance(other, _TensorSpec) and (self.shape, self.dtype) == \
            (other.shape, other.dtype)

    def __repr__(self):
        return f"tensor{self.shape} {self.dtype}"

    def zeros(self, device):
        return torch.zeros(self.shape, dtype=self.dtype, device=device)


def _describe(tree):
    """The tree with its tensors replaced by their shapes and dtypes: plain containers, cheap
    to pickle (a pytree TreeSpec is not sent: its unpickling warns in recent torch)."""
    return tree_map(lambda x: _TensorSpec(x) if isinstance(x, torch.Tensor) else x, tree)


def _exchange(count, tree, group, what, rows_dim=None, device=None):
    """``(counts, reference description, tree)`` after one ``all_gather_object`` of every rank's
    count and shapes; ``tree`` is replaced by zeros of the reference's shapes on a rank whose
    count is 0, on ``device`` (default: the device of the tree's tensors, else the CPU).
    ``rows_dim``: the dimension along which shapes may differ (gathered rows)."""
    dist = _dist()
    world = dist.get_world_size(group)
    desc = _describe(tree) if count else None
    gathered = [None] * world
    dist.all_gather_object(gathered, (int(count), desc), group=group)
    counts = [c for c, _ in gathered]
    ref = next(((d, r) for r, (c, d) in enumerate(gathered) if c), None)
    if ref is None:
        return counts, None, tree
    ref_desc, ref_rank = ref
    ref_leaves, ref_spec = tree_flatten(ref_desc)
    for r, (c, d) in enumerate(gathered):
        if not c:
            continue
        leaves, spec = tree_flatten(d)
        same = spec == ref_spec and len(leaves) == len(ref_leaves) and all(
            _same_shape(a, b, rows_dim) for a, b in zip(leaves, ref_leaves))
        if not same:
            raise RuntimeError(
                f"{what}: rank {r} and rank {ref_rank} hold statistics of different structures "
                f"or shapes ({_short(leaves)} vs {_short(ref_leaves)}), so they can't be summed: "
                "every rank must run the same model, layer collection and function (only the "
                "examples may differ)")
    if not count:
        device = device if device is not None else _local_device(tree)
        leaves = [(x.zeros(device) if isinstance(x, _TensorSpec) else x) for x in ref_leaves]
        if rows_dim is not None:
            leaves = [_empty_rows(x, rows_dim) if isinstance(x, torch.Tensor) else x
                      for x in leaves]
        tree = tree_unflatten(leaves, ref_spec)
    return counts, ref_leaves, tree


def _same_shape(a, b, rows_dim):
    if isinstance(a, _TensorSpec) != isinstance(b, _TensorSpec):
        return False
    if not isinstance(a, _TensorSpec):
        return True  # non-tensor leaves (flags) are taken from the reference on an empty rank
    if rows_dim is None:
        return a == b
    sa, sb = list(a.shape), list(b.shape)
    if len(sa) != len(sb) or a.dtype != b.dtype:
        return False
    sa[rows_dim] = sb[rows_dim] = 0
    return sa == sb


def _empty_rows(t, dim):
    shape = list(t.shape)
    shape[dim] = 0
    return t.new_zeros(shape)


def _short(leaves):
    s = repr([x for x in leaves if isinstance(x, _TensorSpec)])
    return s if len(s) < 200 else s[:200] + "...]"


def _local_device(tree):
    leaves, _ = tree_flatten(tree)
    for x in leaves:
        if isinstance(x, torch.Tensor):
            return x.device
    return torch.device("cpu")


def all_reduce_tree(tree, count, group, what="statistic", device=None):
    """``(tree, global count)``: every tensor leaf of ``tree`` (dicts, lists, tuples of tensors:
    a statistic's sums) summed over the ranks of ``group``, with one ``all_reduce`` per dtype
    (the leaves are packed into one flat buffer); non-tensor leaves are kept (taken from another
    rank when this one saw no example). ``count``: this rank's number of examples. A rank with
    ``count == 0`` gets its shapes from the others (see the module docstring)."""
    dist = _dist()
    counts, ref, tree = _exchange(count, tree, group, what, device=device)
    total = sum(counts)
    if ref is None:
        return tree, 0
    leaves, spec = tree_flatten(tree)
    by_dtype = {}
    for i, x in enumerate(leaves):
        if isinstance(x, torch.Tensor):
            by_dtype.setdefault(x.dtype, []).append(i)
    for dtype, idx in by_dtype.items():
        parts = [leaves[i] for i in idx]
        flat = torch.cat([p.reshape(-1) for p in parts]) if len(parts) > 1 else \
            parts[0].reshape(-1).clone()
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        start = 0
        for i, p in zip(idx, parts):
            leaves[i] = flat[start:start + p.numel()].view(p.shape)
            start += p.numel()
    return tree_unflatten(leaves, spec), total


def all_gather_rows(t, count, group, dim, what="statistic", device=None):
    """``(tensor, counts)``: the ranks' ``t`` (``count`` rows along ``dim`` on this rank)
    concatenated along ``dim`` in rank order, with one ``all_gather`` (the pieces are padded to
    the largest count: uneven and empty shards are allowed). ``t`` may be None where
    ``count == 0``."""
    dist = _dist()
    counts, ref, tree = _exchange(count, [t], group, what, rows_dim=dim, device=device)
    if ref is None:
        return t, counts
    t = tree[0]
    top = max(counts)
    if t.shape[dim] < top:
        pad_shape = list(t.shape)
        pad_shape[dim] = top - t.shape[dim]
        t = torch.cat([t, t.new_zeros(pad_shape)], dim=dim)
    t = t.contiguous()
    pieces = [torch.empty_like(t) for _ in counts]
    dist.all_gather(pieces, t, group=group)
    return torch.cat([p.narrow(dim, 0, c) for p, c in zip(pieces, counts)], dim=dim), counts


def global_batch_index(local_index, group):
    """The batch index that draws of Monte-Carlo targets are keyed with (see
    `nngeometry.curvature.batch_key`): ``local_index`` in a single process; under data
    parallelism ``local_index · world + rank``, the index the batch has in a single process
    when batches are dealt to the ranks in turn (rank ``r`` takes batches ``r, r + W, ...``).
    With that sharding a seeded ``FIM_MonteCarlo`` draws the same targets as one process on the
    whole loader; with another sharding (e.g. a ``DistributedSampler``, which deals *examples*)
    the batches themselves differ, and so do the draws (the estimate is as good, not equal)."""
    if group is None:
        return local_index
    dist = _dist()
    return local_index * dist.get_world_size(group) + dist.get_rank(group)


def spread_eigh(matrices, group=None):
    """``{key: (eigenvalues, eigenvectors)}`` (``torch.linalg.eigh``) of the symmetric matrices
    ``{key: (d, d)}`` (e.g. the KFAC factors of every layer), the work spread over the ranks as
    KAISA does (Pauloski et al. 2021): each matrix is decomposed on one rank only (the largest
    first, each to the rank with the least work so far, work counted as ``d³``), and every rank
    receives every result, by one ``broadcast`` per rank that has work. Every rank must pass
    the same keys, in the same order, with the same shapes (the reduced statistics of a
    data-parallel build are the same on every rank). The results are identical on every rank
    (they come from one decomposition). ``group=None``: all the decompositions here."""
    keys = list(matrices)
    if group is None:
        return {k: tuple(torch.linalg.eigh(matrices[k])) for k in keys}
    dist = _dist()
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    load, owner = [0] * world, {}
    order = sorted(range(len(keys)), key=lambda i: (-matrices[keys[i]].shape[0], i))
    for i in order:
        r = min(range(world), key=lambda j: (load[j], j))
        owner[keys[i]] = r
        load[r] += matrices[keys[i]].shape[0] ** 3
    out = {}
    for r in range(world):
        mine = [k for k in keys if owner[k] == r]
        if not mine:
            continue
        ref = matrices[mine[0]]
        sizes = [matrices[k].shape[0] for k in mine]
        if r == rank:
            parts = []
            for k in mine:
                evals, evecs = torch.linalg.eigh(matrices[k])
                parts += [evals.reshape(-1), evecs.reshape(-1)]
            buf = torch.cat(parts)
        else:
            buf = torch.empty(sum(d + d * d for d in sizes), dtype=ref.dtype, device=ref.device)
        dist.broadcast(buf, src=dist.get_global_rank(group, r) if group is not dist.group.WORLD
                       else r, group=group)
        start = 0
        for k, d in zip(mine, sizes):
            evals = buf[start:start + d]
            evecs = buf[start + d:start + d + d * d].view(d, d)
            out[k] = (evals, evecs)
            start += d + d * d
    return {k: out[k] for k in keys}


# kept importable from here: the module the engine works on is chosen in `model_and_data`
from .model_and_data import unwrap_model  # noqa: E402,F401
