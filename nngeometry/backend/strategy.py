"""How the engine chunks its work and which backward pass it uses.

Output directions per backward pass (`BackwardStrategy._chunk_size`, within
`DIRECTION_CHUNK_BYTES` and the generator's ``max_chunk_bytes``), vectors per vmapped
matrix-free product (`_vector_chunk`), and the two ways of getting the gradients of several
output directions, one vmapped backward (`_backward_batched`) or one backward per direction
(`_backward_looped`), chosen once per model structure by a cost model read from the backward
graph's node types where it can (`_graph_choice`) and by the timing autotuner otherwise
(`_backward_sampled`); the choices are in `_BACKWARD_CHOICE`, keyed by
`BackwardStrategy._backward_key`: the model's structure, never the model object's ``id``.
"""
import math
import time
import warnings

import torch
from torch.overrides import has_torch_function

try:  # the engine call and the vmap that torch.autograd.grad itself uses (see ``_grad``)
    from torch.autograd.graph import _engine_run_backward
    from torch._vmap_internals import _vmap as _grads_vmap
except ImportError:  # pragma: no cover - another torch: the public function
    _engine_run_backward = _grads_vmap = None


def _grad(outputs, inputs, grad_outputs, retain_graph=False, allow_unused=True,
          is_grads_batched=False):
    """``torch.autograd.grad(outputs, inputs, grad_outputs, ...)``, the same engine call and
    numbers, without the first call's import of torch's symbolic-shapes module.

    ``torch.autograd.grad`` checks each explicit ``grad_outputs`` tensor's shape through
    ``torch.fx.experimental.symbolic_shapes``, whose first import (with sympy) takes 1.5–2 s
    once per process: more than seven times the whole KFAC build of a small CNN, paid by the
    first backward with ``grad_outputs`` (a user's ``loss.backward()`` of a scalar loss does not
    pay it). Here the shapes are compared as sizes, with an error naming both shapes, and the
    engine is called as torch does. Anything else (tensor subclasses, nested tensors, a missing
    ``grad_outputs`` entry, another torch without these internals) goes through
    ``torch.autograd.grad``.

    ``outputs``: a tensor or a sequence; ``inputs``: a sequence of tensors or gradient edges;
    ``grad_outputs``: one tensor per output, of the output's shape, or ``(K,)`` + that shape
    with ``is_grads_batched``. Returns a tuple, one gradient (or ``None``) per input."""
    outs = (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)
    gos = (grad_outputs,) if isinstance(grad_outputs, torch.Tensor) else tuple(grad_outputs)
    ins = tuple(inputs)
    plain = (_engine_run_backward is not None and len(gos) == len(outs)
             and all(type(o) is torch.Tensor and not o.is_nested for o in outs)
             and all(type(g) is torch.Tensor and not g.is_nested for g in gos)
             and not has_torch_function(tuple(t for t in ins if isinstance(t, torch.Tensor))))
    if not plain:
        return torch.autograd.grad(outs, ins, gos, retain_graph=retain_graph,
                                   allow_unused=allow_unused, is_grads_batched=is_grads_batched)
    for i, (o, g) in enumerate(zip(outs, gos)):
        shape = g.shape[1:] if is_grads_batched else g.shape
        if shape != o.shape or g.dtype.is_complex != o.dtype.is_complex:
            raise RuntimeError(
                f"grad_outputs[{i}] has shape {tuple(g.shape)} ({g.dtype}) for output {i} of "
                f"shape {tuple(o.shape)} ({o.dtype})"
                + (" (with is_grads_batched, the first dimension is the directions')"
                   if is_grads_batched else "") + ": give a gradient of the output's shape")
    if is_grads_batched:
        def vjp(g):
            return _engine_run_backward(outs, g, retain_graph, False, ins, allow_unused,
                                        accumulate_grad=False)
        return _grads_vmap(vjp, 0, 0, allow_none_pass_through=True)(gos)
    return _engine_run_backward(outs, gos, retain_graph, False, ins, allow_unused,
                                accumulate_grad=False)


#: output gradients of one chunk of directions may take this much even when one direction's
#: per-example Jacobian of the whole model is smaller (see ``_chunk_size``)
DIRECTION_CHUNK_BYTES = 16 * 2 ** 20

#: 'auto': the loop takes at most this many directions of a batch while the choice is open
#: (see ``_backward_directions``)
LOOPED_TIMING_DIRECTIONS = 16
#: 'auto': batches split between the two strategies before the choice is made
BACKWARD_TIMING_ROUNDS = 2
#: 'auto': a first round where one strategy is this many times faster per direction decides
#: at once (the second round is for close calls, which one sample on a busy machine may get
#: wrong; a factor of 2 in CPU seconds is not such a call)
BACKWARD_DECISIVE_RATIO = 2.0
#: structure key (``_backward_key``) -> 'batched' | 'looped', filled by 'auto'
_BACKWARD_CHOICE = {}
#: structure key -> {'batched': best seconds per direction, 'looped': ..., 'rounds': n} while
#: the choice is open
_BACKWARD_SAMPLES = {}

#: autograd nodes whose vmapped backward is as cheap per direction as their plain backward
#: (matrix products, convolutions, elementwise maps, views and reductions): a backward graph
#: made of these only is faster vmapped, decided without timing
BATCHED_NODES = frozenset(
    name + "Backward" + v for name in (
        "Addmm", "Mm", "Bmm", "Matmul", "Linear", "Convolution", "Relu", "Threshold", "Tanh",
        "Sigmoid", "Gelu", "Silu", "Elu", "LeakyRelu", "Hardtanh", "Softplus", "View",
        "UnsafeView", "Reshape", "ReshapeAlias", "T", "Transpose", "Permute", "Expand", "Mean",
        "Sum", "Add", "Sub", "Mul", "Div", "Neg", "Exp", "Log", "Sqrt", "Rsqrt", "Pow",
        "Squeeze", "Unsqueeze", "Clone", "Slice", "Select", "Cat", "Stack", "Split",
        "SplitWithSizes", "Unbind", "Softmax", "LogSoftmax", "Alias", "ToCopy",
        "NativeLayerNorm", "Gather")
    for v in ("0", "1", "2")) | {"AccumulateGrad"}
#: autograd nodes whose vmapped backward gains nothing per direction over one backward per
#: direction (max-pooling's scatter of the gradients to the argmax positions: on a small CNN
#: within about 10 % of the loop warm, and its first vmapped call 2-3 times slower, which made a
#: timed first sample pick at random): a graph with one of these takes the loop, decided
#: without timing
LOOPED_NODES = frozenset(
    name + "Backward0" for name in (
        "MaxPool1DWithIndices", "MaxPool2DWithIndices", "MaxPool3DWithIndices",
        "AdaptiveMaxPool1D", "AdaptiveMaxPool2D", "AdaptiveMaxPool3D",
        "FractionalMaxPool2D", "FractionalMaxPool3D", "MaxUnpool2D", "MaxUnpool3D"))
#: graphs larger than this are not walked (timing decides)
_GRAPH_WALK_LIMIT = 20000


def _graph_choice(out):
    """'batched' when every node of the backward graph of ``out`` is in `BATCHED_NODES`,
    'looped' when one is in `LOOPED_NODES`, None (the timing decides) otherwise: the cost model
    of the two strategies, read from the node types, so that a model made of well-batched ops
    (or with max-pooling) pays no timing sample, whose first vmapped call is also cold."""
    fn = getattr(out, "grad_fn", None)
    if fn is None:
        return None
    seen, stack, unknown = {fn}, [fn], False
    while stack:
        node = stack.pop()
        name = type(node).__name__
        if name in LOOPED_NODES:
            return "looped"
        if name not in BATCHED_NODES:
            unknown = True
        for nxt, _ in node.next_functions:
            if nxt is not None and nxt not in seen:
                if len(seen) >= _GRAPH_WALK_LIMIT:
                    return None
                seen.add(nxt)
                stack.append(nxt)
    return None if unknown else "batched"


def _backward_batched(out, targets, cot, retain):
    """One vmapped backward for all directions; None if an op has no batching rule."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return list(_grad(out, targets, cot, retain_graph=retain, allow_unused=True,
                              is_grads_batched=True))
    except RuntimeError:
        return None


def _backward_looped(out, targets, cot, retain):
    """One backward per direction, written into preallocated ``(K, ...)`` tensors."""
    K = cot.shape[0]
    grads = [None] * len(targets)
    for k in range(K):
        gk = _grad(out, targets, cot[k], retain_graph=retain or k < K - 1, allow_unused=True)
        for j, g in enumerate(gk):
            if g is None:
                continue
            if grads[j] is None:
                grads[j] = g.new_empty((K,) + g.shape)
            grads[j][k] = g
    return grads


def _timed(fn, device):
    """``(seconds, fn())``: on the CPU the process's CPU seconds (all its threads; a machine
    busy with other processes does not inflate them, where a wall-clock sample taken while the
    process waits for a core can be several times too long), on an accelerator the wall-clock
    seconds, synchronized so that the time is the work's."""
    if device.type == "cpu":
        t0 = time.process_time()
        result = fn()
        return time.process_time() - t0, result
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
    fast, slow = sorted((samples["batched"], samples["looped"]))
    decisive = slow >= BACKWARD_DECISIVE_RATIO * fast
    if (samples["rounds"] >= BACKWARD_TIMING_ROUNDS or decisive) and key not in _BACKWARD_CHOICE:
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
                    columns=False, per_layer=False):
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
        outputs of a chunk have a graph of their own, e.g. Monte-Carlo trials) ``K · n · K``.

        ``per_layer``: the consumer reduces each layer's gradients on its own (Kronecker
        factors) and never holds a per-example Jacobian of the whole model, so
        the ``n P`` allowance does not apply: the budget is the larger of
        `DIRECTION_CHUNK_BYTES` and one direction's gradients w.r.t. the layers' outputs, about
        the forward's own activation memory (a ResNet-18 on 32 images, closed-form Fisher: one
        direction at a time, a KFAC build's peak 821 MiB against 1877 MiB with all 10
        directions at once, and no slower)."""
        # a call whose output the examples share holds one gradient per example and direction
        # (see _shared_gradients)
        per_direction = sum(c.out_nbytes * (n if getattr(c, "shared", None) else 1)
                            for c in layer_calls)
        itemsize = layer_calls[0].out_dtype.itemsize if layer_calls else 4
        if chunk_bytes is not None:
            budget = chunk_bytes
        elif per_layer:
            budget = max(DIRECTION_CHUNK_BYTES, per_direction)
        else:
            budget = max(DIRECTION_CHUNK_BYTES, n * n_params * itemsize)
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
            grads = _grad(out, targets, cot, retain_graph=retain, allow_unused=True)
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
        faster one is used for all directions; a first batch where one is at least
        ``BACKWARD_DECISIVE_RATIO`` times faster decides at once (the second sample is for
        close calls). An op without a batching rule decides at once for the loop. Before any
        timing, the node types of the backward graph may decide (`_graph_choice`): only
        well-batched ops (`BATCHED_NODES`) give the vmapped backward, one of `LOOPED_NODES`
        (max-pooling) the loop; a graph with another node is timed. The choice is kept per model *structure* (see ``_backward_key``), not per model
        object: a new model of the same architecture reuses it, and a freed model's id reused by
        another one cannot hand it a choice made for a different graph.
        """
        mode = self.backward
        key = None
        if mode == "auto":
            key = self._backward_key(out, targets, cot)
            mode = _BACKWARD_CHOICE.get(key)
            if mode is None and key not in _BACKWARD_SAMPLES and cot.shape[0] > 1:
                mode = _graph_choice(out)
                if mode is not None:
                    _BACKWARD_CHOICE[key] = mode
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
