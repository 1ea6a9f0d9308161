"""How the engine chunks its work and which backward pass it uses.

Output directions per backward pass (`BackwardStrategy._chunk_size`, within
`DIRECTION_CHUNK_BYTES` and the generator's ``max_chunk_bytes``), vectors per vmapped
matrix-free product (`_vector_chunk`), and the two ways of getting the gradients of several
output directions, one vmapped backward (`_backward_batched`) or one backward per direction
(`_backward_looped`), with the timing autotuner that picks the faster once per model structure
(`_backward_sampled`, its choices in `_BACKWARD_CHOICE`, keyed by `BackwardStrategy._backward_key`:
the model's structure, never the model object's ``id``).
"""
import math
import time
import warnings

import torch


#: output gradients of one chunk of directions may take this much even when one direction's
#: per-example Jacobian of the whole model is smaller (see ``_chunk_size``)
DIRECTION_CHUNK_BYTES = 16 * 2 ** 20

#: 'auto': the loop takes at most this many directions of a batch while the choice is open
#: (see ``_backward_directions``)
LOOPED_TIMING_DIRECTIONS = 16
#: 'auto': batches split between the two strategies before the choice is made
BACKWARD_TIMING_ROUNDS = 2
#: structure key (``_backward_key``) -> 'batched' | 'looped', filled by 'auto'
_BACKWARD_CHOICE = {}
#: structure key -> {'batched': best seconds per direction, 'looped': ..., 'rounds': n} while
#: the choice is open
_BACKWARD_SAMPLES = {}


def _backward_batched(out, targets, cot, retain):
    """One vmapped backward for all directions; None if an op has no batching rule."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return list(torch.autograd.grad(out, targets, cot, retain_graph=retain,
                                            allow_unused=True, is_grads_batched=True))
    except RuntimeError:
        return None


def _backward_looped(out, targets, cot, retain):
    """One backward per direction, written into preallocated ``(K, ...)`` tensors."""
    K = cot.shape[0]
    grads = [None] * len(targets)
    for k in range(K):
        gk = torch.autograd.grad(out, targets, cot[k], retain_graph=retain or k < K - 1,
                                 allow_unused=True)
        for j, g in enumerate(gk):
            if g is None:
                continue
            if grads[j] is None:
                grads[j] = g.new_empty((K,) + g.shape)
            grads[j][k] = g
    return grads


def _timed(fn, device):
    """``(seconds, fn())``, synchronizing an accelerator so that the time is the work's."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    result = fn()
    sync()
    return time.perf_counter() - t0, result


def _backward_sampled(key, out, targets, cot, retain):
    """The gradients of all ``K`` directions, the first ones by the vmapped backward and the
    last ones (at most ``LOOPED_TIMING_DIRECTIONS``, at least one) by the loop, each timed per
    direction and recorded under ``key``; the choice is made once ``BACKWARD_TIMING_ROUNDS``
    batches are recorded (see ``_backward_directions``). With one direction both are the same
    backward: no sample."""
    K = cot.shape[0]
    if K < 2:
        return _backward_looped(out, targets, cot, retain)
    samples = _BACKWARD_SAMPLES.setdefault(key, {"batched": math.inf, "looped": math.inf,
                                                 "rounds": 0})
    k_loop = min(LOOPED_TIMING_DIRECTIONS, K // 2)
    k_vmap = K - k_loop
    parts = {}
    order = ("batched", "looped") if samples["rounds"] % 2 == 0 else ("looped", "batched")
    for i, which in enumerate(order):
        keep = retain or i == 0
        if which == "batched":
            # the graph kept: a vmapped backward that fails may have freed part of it
            t, g = _timed(lambda: _backward_batched(out, targets, cot[:k_vmap], True), out.device)
            if g is None:  # an op without a batching rule: the loop, no more timing
                _BACKWARD_CHOICE[key] = "looped"
                _BACKWARD_SAMPLES.pop(key, None)
                if i == 0:
                    return _backward_looped(out, targets, cot, retain)
                g = _backward_looped(out, targets, cot[:k_vmap], keep)
                t = math.inf
            samples["batched"] = min(samples["batched"], t / k_vmap)
        else:
            t, g = _timed(lambda: _backward_looped(out, targets, cot[k_vmap:], keep), out.device)
            samples["looped"] = min(samples["looped"], t / k_loop)
        parts[which] = g
    samples["rounds"] += 1
    if samples["rounds"] >= BACKWARD_TIMING_ROUNDS and key not in _BACKWARD_CHOICE:
        _BACKWARD_CHOICE[key] = "batched" if samples["batched"] <= samples["looped"] \
            else "looped"
        _BACKWARD_SAMPLES.pop(key, None)
    # a target unused by the outputs is unused by every direction: None in both parts
    return [None if a is None or b is None else torch.cat([a, b])
            for a, b in zip(parts["batched"], parts["looped"])]


#: numbers (activations and parameters) one chunk of vmapped vector products may hold per
#: batch: about 32 MB in float32, measured best on an MLP (chunks of 16-25) and a
#: CNN (2-4)
_VECTOR_CHUNK_NUMBERS = 2 ** 23


def _vector_chunk(backend, m, examples, layer_collection):
    """How many of ``m`` vectors the batched products (``_mm``, ``_JV``) push through one
    vmapped pass: ``_VECTOR_CHUNK_NUMBERS // (A + P)``, with ``A`` the numbers in the outputs of
    the model's modules for the first batch (one forward without graph, measured by forward
    hooks on the model's modules) and ``P`` the collection's parameters; between 1 and ``m``.
    A few vectors (``m ≤ 4``) go through at once without measuring."""
    if m <= 4:
        return m
    counted = [0]

    def count(module, inputs, output):
        for t in (output if isinstance(output, (tuple, list)) else (output,)):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                counted[0] += t.numel()

    handles = []
    try:
        for module in backend.model.modules():
            if not list(module.children()):  # leaf modules: every activation once
                handles.append(module.register_forward_hook(count))
        # (the model's outputs only when the products use the output metric: the transform
        # would form the square roots the metric avoids)
        raw = getattr(backend, "_uses_metric", lambda: False)()
        for batch, params, f, *_ in backend._functional_batches(examples, layer_collection,
                                                                raw):
            with torch.no_grad():
                f(params)
            break
    finally:
        for h in handles:
            h.remove()
    per_vector = counted[0] + layer_collection.numel()
    return max(1, min(m, _VECTOR_CHUNK_NUMBERS // max(per_vector, 1)))


class BackwardStrategy:
    """Chunk sizes and the backward pass of a chunk of output directions. Mixed into
    `TorchHooksJacobianBackend` (uses its ``max_chunk_bytes``, ``backward`` and ``model``)."""

    def _chunk_size(self, layer_calls, n, n_output, n_params, chunk_bytes=None,
                    columns=False):
        """Output directions per backward pass: their gradients w.r.t. all the layers' outputs
        (held together until the consumer is done with the chunk) fit in ``max_chunk_bytes``
        and in the larger of `DIRECTION_CHUNK_BYTES` and one direction's per-example
        Jacobian of the whole model for the batch (``n P`` numbers). Where the layers' outputs
        are small next to the parameters (MLPs, transformers) that is every direction at once;
        for a CNN, whose activations outweigh its parameters, all ``K`` directions' gradients
        would exceed the batch's whole Jacobian (a small CNN: 54 MiB for K = 9, vs 6 MiB per direction
        for the Jacobian): they are taken a few directions at a time.

        The gradients at the ``(n, n_output)`` outputs themselves fit in the budget too: ``K``
        one-hot cotangents of the whole output take ``K · n · n_output``; with ``columns`` (the
        outputs of a chunk have a graph of their own, e.g. Monte-Carlo trials) ``K · n · K``."""
        # a call whose output the examples share holds one gradient per example and direction
        # (see _shared_gradients)
        per_direction = sum(c.out_nbytes * (n if getattr(c, "shared", None) else 1)
                            for c in layer_calls)
        itemsize = layer_calls[0].out_dtype.itemsize if layer_calls else 4
        budget = max(DIRECTION_CHUNK_BYTES, n * n_params * itemsize) if chunk_bytes is None \
            else chunk_bytes
        budget = min(self.max_chunk_bytes, budget)
        # each direction's unit cotangent on the (n, n_output) outputs, and the gradients
        # autograd forms at them, are (n, n_output) each too: with many outputs (Monte-Carlo
        # trials) all K directions at once would take K · n · n_output, quadratic in the number
        # of outputs (2.2 GiB for 2000 trials and 64 examples). They fit in the budget as well.
        if columns:
            fit_out = math.isqrt(budget // max(1, 2 * n * itemsize))
        else:
            fit_out = budget // max(1, 2 * n * n_output * itemsize)
        fit = max(1, min(n_output, budget // max(1, per_direction), fit_out))
        # as few chunks as fit, of about equal sizes (e.g. 3 + 3 + 3 rather than 4 + 4 + 1):
        # the layers' work on the inputs only (e.g. patches) is redone per chunk
        n_chunks = -(-n_output // fit)
        return -(-n_output // n_chunks)

    def _batched_backward(self, out, targets, k0, k1, retain):
        K = k1 - k0
        n = out.shape[0]
        if K == 1:
            # one direction (e.g. Monte-Carlo with one trial): a plain backward, and the unit
            # cotangent built without index tensors (this runs once per batch)
            if out.shape[1] == 1:
                cot = torch.ones_like(out)
            else:
                cot = torch.zeros_like(out)
                cot[:, k0] = 1
            grads = torch.autograd.grad(out, targets, cot, retain_graph=retain, allow_unused=True)
            grads = [g.unsqueeze(0) if g is not None else None for g in grads]
        else:
            cot = torch.zeros(K, n, out.shape[1], dtype=out.dtype, device=out.device)
            cot[torch.arange(K), :, torch.arange(k0, k1)] = 1
            grads = self._backward_directions(out, targets, cot, retain)
        return grads

    def _backward_directions(self, out, targets, cot, retain):
        """Gradients of the ``K`` output directions ``cot[k]`` w.r.t. ``targets``.

        Two strategies give the same numbers: one vmapped backward (``is_grads_batched``), fast
        through matrix products, or one backward per direction, faster through ops whose batching
        rule just loops (max-pooling, ReLU's backward on some builds). With ``backward='auto'``
        the choice costs no extra backward pass: while it is open, the directions of a batch are
        split, the first ones through the vmapped backward and the last ones (at most
        ``LOOPED_TIMING_DIRECTIONS``) through the loop, and each strategy's time per direction
        is recorded; both strategies cost about the same per direction at any count, so after
        ``BACKWARD_TIMING_ROUNDS`` such batches (the order of the two swapped each time, the best
        time of each kept: one sample each picked the slower strategy on a busy machine) the
        faster one is used for all directions. An op without a batching rule decides at once for
        the loop. The choice is kept per model *structure* (see ``_backward_key``), not per model
        object: a new model of the same architecture reuses it, and a freed model's id reused by
        another one cannot hand it a choice made for a different graph.
        """
        mode = self.backward
        key = None
        if mode == "auto":
            key = self._backward_key(out, targets, cot)
            mode = _BACKWARD_CHOICE.get(key)
        if mode == "batched":
            grads = _backward_batched(out, targets, cot, retain)
            if grads is None:  # an op without a batching rule
                grads = _backward_looped(out, targets, cot, retain)
            return grads
        if mode == "looped":
            return _backward_looped(out, targets, cot, retain)
        return _backward_sampled(key, out, targets, cot, retain)

    def _backward_key(self, out, targets, cot):
        """What the faster backward strategy depends on: the model's structure (per module its
        type, training flag and its own parameters' shapes), the shapes of the targets' gradients
        and of the outputs without the batch dimension (a smaller last batch reuses the choice),
        the number of directions, the dtype and the device type."""
        struct = getattr(self, "_structure_cache", None)
        if struct is None or struct[0] is not self.model:
            sig = tuple((type(m).__name__, m.training,
                         tuple(tuple(p.shape) for p in m.parameters(recurse=False)))
                        for m in self.model.modules())
            struct = (self.model, sig)
            self._structure_cache = struct
        shapes = []
        for t in targets:
            node = getattr(t, "node", None)
            try:
                meta = node._input_metadata[t.output_nr] if node is not None else None
                shapes.append(tuple(meta.shape[1:]) if meta is not None else None)
            except (AttributeError, IndexError, RuntimeError):
                shapes.append(None)
        return (struct[1], tuple(shapes), cot.shape[0], tuple(cot.shape[2:]), cot.dtype,
                out.device.type)
