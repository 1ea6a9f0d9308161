"""Outputs that the examples of a batch share: layers whose output has no batch axis, or a
batch axis of size 1 that the model broadcasts.

The forward hooks expand an output of batch dimension 1 to the batch's ``n`` examples
(`_Broadcast` says to how many; `_expand_axis`), so that its per-example gradients are those of
the copy; an output with no batch axis, or one whose length along the batch axis only happens
to be ``n`` (`_mark_coincident_shared`), gets a backward pass of its own per (direction,
example) (`SharedOutputs._shared_gradients`); an output whose gradient is already summed over
the examples is refused (`_refuse_unbatched_calls`). `SharedOutputs` is the part of
`TorchHooksJacobianBackend` that runs the forward pass with the hooks told the batch's size.
"""
import weakref

import torch

from .batches import batch_size_of
from .context import uses_key


class _Broadcast:
    """What the forward hooks of a generator expand shared outputs to: ``n``, the number of
    examples of the batch being run (None: expand nothing), whether an output was expanded or
    marked shared in the current forward pass, whether one of batch dimension 1 was expanded
    (``widened``; ``last_widened``: in the last pass, read after it ended), and
    ``keep_ones``: outputs of batch dimension 1 are left as they are and get the backward pass
    of their own of outputs with no batch axis (for a model that repeats such an output along
    the batch itself, which the expanded copy would break)."""

    __slots__ = ("n", "expanded", "widened", "last_widened", "keep_ones")

    def __init__(self):
        self.n, self.expanded, self.keep_ones = None, False, False
        self.widened = self.last_widened = False


def _expand_axis(t, axis, n):
    """``t`` with its size-1 axis ``axis`` repeated ``n`` times (a copy: the model may write to
    it in place); other values as they are."""
    if not isinstance(t, torch.Tensor) or t.dim() <= axis or t.shape[axis] != 1:
        return t
    shape = list(t.shape)
    shape[axis] = n
    return t.expand(shape).clone()


def _rebuild_tuple(output, first):
    """``output`` (a tuple, possibly a named tuple) with its first element replaced."""
    if hasattr(output, "_fields"):
        return output._replace(**{output._fields[0]: first})
    return (first, *output[1:])


#: model -> {(function/collection key, n, candidate shapes): the calls found shared}
_COINCIDENT_SHARED = weakref.WeakKeyDictionary()


def _mark_coincident_shared(out, model, function, layer_collection, modules, calls):
    """Mark as shared (see ``Call.expand_shared``) the calls whose output has the batch's ``n``
    along its batch axis without holding the examples there: a ``(T, d)`` table looked up on
    positions of shape ``(T,)``, or returned as is, when ``T == n`` (e.g. the last batch of a
    loader). Its shape cannot tell it from a batched output; its gradients can. Row ``j`` of a
    batched output reaches example ``j``'s outputs only, so the gradient of a combination of
    example 0's outputs w.r.t. it is exactly zero off row 0; a shared output's rows reach every
    example. The shared treatment is exact for such a call (each example gets the gradient
    w.r.t. the whole output), as it is for any output that couples the examples.

    One backward pass of one direction, once per model, function, collection, ``n`` and shapes
    of the outputs in a process (a loader's batches have one or two sizes)."""
    n = out.shape[0]
    cands = []
    for lid, store in calls.items():
        for i, c in enumerate(store):
            if c.shared is not None:
                continue
            axis = (c.spec or layer_collection[lid]).batch_axis(c.module or modules[lid])
            t = c.targets[0]
            if len(t.shape) > axis and t.shape[axis] == n and \
                    not isinstance(t.edge, torch.Tensor):
                cands.append((lid, i, c, axis))
    if not cands or not out.requires_grad:
        return
    key = (uses_key(model, function, layer_collection), n,
           tuple((lid, i, tuple(c.targets[0].shape)) for lid, i, c, _ in cands))
    try:
        known = _COINCIDENT_SHARED.get(model, {}).get(key)
    except TypeError:
        known = None
    if known is None:
        # a fixed pseudo-random combination (no cancellation between directions; the global
        # RNG is left alone)
        gen = torch.Generator().manual_seed(0)
        w = torch.rand(out.shape[1], generator=gen, dtype=torch.float64) + 0.5
        cot = torch.zeros_like(out)
        cot[0] = w.to(dtype=out.dtype, device=out.device)
        grads = torch.autograd.grad(out, [c.targets[0].edge for _, _, c, _ in cands], cot,
                                    retain_graph=True, allow_unused=True)
        known = set()
        for (lid, i, c, axis), g in zip(cands, grads):
            if g is not None and g.narrow(axis, 1, n - 1).count_nonzero().item():
                known.add((lid, i))
        try:
            _COINCIDENT_SHARED.setdefault(model, {})[key] = known
        except TypeError:
            pass
    for lid, i, c, axis in cands:
        if (lid, i) in known:
            c.shared = (n, axis)


def _refuse_unbatched_calls(layer_collection, modules, calls, n):
    """``RuntimeError`` for a call of a layer's module whose output does not hold the ``n``
    examples of the batch along its batch axis, nor one shared example that the hooks expanded
    (see ``_make_hook``): e.g. T5's relative position bias, an Embedding looked up on a
    ``(T, T)`` table. The gradient w.r.t. such an output is already summed over the examples,
    so per-example gradients (and every matrix built from them) cannot be recovered from it."""
    for lid, store in calls.items():
        for c in store:
            if getattr(c, "shared", None) is not None:
                continue
            layer, module = c.spec or layer_collection[lid], c.module or modules[lid]
            axis = layer.batch_axis(module)
            shape = c.targets[0].shape
            if len(shape) > axis and shape[axis] != n:
                raise RuntimeError(
                    f"layer '{lid}' ({type(module).__name__}) returned an output of shape "
                    f"{tuple(shape)} for a batch of {n} examples: its output has no batch axis "
                    f"(dimension {axis} is not the examples; e.g. T5's relative position bias, "
                    "looked up on a (T, T) table, then broadcast over the batch), so its "
                    "gradients are summed over the examples and per-example quantities cannot "
                    "be computed (outputs with batch dimension 1 are expanded to the batch "
                    "automatically). Fixes: use PMatImplicit (exact through torch.func), or "
                    "leave the layer out of the LayerCollection")


class SharedOutputs:
    """The forward pass of a batch with shared outputs expanded, and the per-example gradients
    of the outputs that stay shared. Mixed into `TorchHooksJacobianBackend` (uses its
    ``_broadcast``, ``_outputs`` and ``_backward_directions``)."""

    def _broadcast_outputs(self, batch, index, calls, watch_rng=False):
        """`_outputs` run with the hooks told the batch's number of examples, so that a
        layer whose output is shared by the batch's examples (e.g. a position embedding looked
        up with positions of shape ``(1, T)``) gets that output expanded to the ``n`` examples
        (see ``_make_hook``): its per-example quantities are then exact. The number is read
        from the batch (the first dimension of its first tensor); if the outputs show another
        one and a layer's output does not have it, the forward pass is run again with the
        outputs' own."""
        try:
            guess = int(batch_size_of(batch))
        except Exception:  # a batch whose first element is not a batched tensor
            guess = None
        keep_ones = False
        try:
            raw, out, columns, expanded = self._forward_expanding(batch, index, calls, guess,
                                                                  watch_rng)
        except Exception as first:
            if not self._broadcast.last_widened:
                raise
            # the model does not take the expanded copy of an output of batch dimension 1
            # (it repeats or tiles it along the batch itself): such outputs are then left as
            # they are, with the backward pass of their own of shared outputs (exact too)
            keep_ones = True
            try:
                raw, out, columns, expanded = self._forward_expanding(
                    batch, index, calls, guess, watch_rng, keep_ones=True)
            except Exception:
                raise first from None
        n = out.shape[0]
        if not keep_ones and guess is not None and n != guess and \
                self._broadcast.last_widened:
            # expanding changed the number of outputs (the model concatenates the output of
            # batch dimension 1 along the batch): run again with it left as it is
            keep_ones = True
            raw, out, columns, expanded = self._forward_expanding(
                batch, index, calls, guess, watch_rng, keep_ones=True)
            n = out.shape[0]
        if n != guess and n > 1 and (expanded or any(
                len(c.targets[0].shape) and c.targets[0].shape[0] != n
                for store in calls.values() for c in store)):
            raw, out, columns, _ = self._forward_expanding(batch, index, calls, n, watch_rng,
                                                           keep_ones)
            if out.shape[0] != n:
                raise RuntimeError(
                    f"the function's outputs had {n} examples, and {out.shape[0]} once the "
                    f"layers' outputs shared by the examples were expanded to {n}: a layer's "
                    "output of batch dimension 1 is not broadcast over the examples by the model "
                    "(e.g. it is concatenated along the batch). Pass the batch with its examples "
                    "along the first dimension of its first tensor, or leave that layer out of "
                    "the LayerCollection")
        return raw, out, columns

    def _forward_expanding(self, batch, index, calls, n, watch_rng=False, keep_ones=False):
        """``(raw, out, columns, expanded)``: `_outputs` with the hooks expanding shared
        outputs to ``n`` examples (with ``keep_ones``, those of batch dimension 1 are left as
        they are), and whether one was."""
        for store in calls.values():
            store.clear()
        broadcast = self._broadcast
        broadcast.n, broadcast.expanded, broadcast.keep_ones = n, False, keep_ones
        broadcast.widened = False
        try:
            with torch.enable_grad():
                raw, out, columns = self._outputs(batch, index, watch_rng=watch_rng)
            return raw, out, columns, broadcast.expanded
        finally:
            broadcast.last_widened = broadcast.widened
            broadcast.n, broadcast.expanded, broadcast.keep_ones = None, False, False
            broadcast.widened = False

    def _shared_gradients(self, out, shared, k0, k1):
        """``(K, n, *shape)`` per shared call: the gradient of output direction ``k`` of
        example ``i`` alone w.r.t. an output that the examples share (no batch axis), for
        directions ``k0 .. k1 - 1``. The backward pass of all the examples together gives only
        their sum; here each (direction, example) pair is a cotangent of its own: ``K · n``
        directions, one backward pass (the graph is kept for the main one)."""
        n, n_output = out.shape
        K = k1 - k0
        cot = torch.zeros(K, n, n, n_output, dtype=out.dtype, device=out.device)
        ks = torch.arange(K, device=out.device).unsqueeze(1)
        idx = torch.arange(n, device=out.device).unsqueeze(0)
        cot[ks, idx, idx, k0 + ks] = 1
        edges = [c.targets[0].edge for _, c in shared]
        grads = self._backward_directions(out, edges, cot.reshape(K * n, n, n_output), True)
        return [g.reshape(K, n, *c.targets[0].shape) if g is not None
                else c.targets[0].zeros(K * n).reshape(K, n, *c.targets[0].shape)
                for g, (_, c) in zip(grads, shared)]
