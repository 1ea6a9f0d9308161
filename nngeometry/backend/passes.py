"""The pass driver: runs the model over the data with hooks and feeds each batch's statistics
to a consumer.

`HookedPasses._accumulate` (behind `TorchHooksJacobianBackend.accumulate`) holds the model
(its lock, its state kept, see `model_and_data`), installs the hooks that record each layer's
calls (`HookedPasses._hooks`; `_InstanceForward` for layer types that record inside a module's
forward), and per batch (`HookedPasses._run_batch`) runs the forward (shared outputs expanded,
`SharedOutputs`), the determinism probe on the first batch (see `model_and_data`), the checks
of the recorded calls, and the backward of the output directions in chunks
(`HookedPasses._direction_chunks`, strategy in `strategy`), handing a `BatchContext` per chunk
to the consumer.

For every layer of the collection and every call of its module during the forward pass, a
`Call` records the module's input ``x`` and, after the batched backward pass, ``gy``: the
gradients of ``K`` output directions w.r.t. the module's output, shape ``(K, n, *out_shape)``
(`GradTarget`: what the backward pass differentiates to). `check_parameter_uses` checks, once
per model, function and collection, that the hooks see every use of the parameters.

Outputs that the examples of a batch share (layers whose output has no batch axis, or a batch
axis of size 1 that the model broadcasts): the forward hooks expand an output of batch
dimension 1 to the batch's ``n`` examples (`_Broadcast` says to how many; `_expand_axis`), so
that its per-example gradients are those of the copy; an output with no batch axis, or one
whose length along the batch axis only happens to be ``n`` (`_mark_coincident_shared`), gets a
backward pass of its own per (direction, example) (`SharedOutputs._shared_gradients`); an
output whose gradient is already summed over the examples is refused
(`_refuse_unbatched_calls`).
"""
import contextlib
import weakref

import torch
from torch.func import functional_call
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .distributed import global_batch_index
from .model_and_data import (_refuse_batch_statistics, _rng_state, _same_rng, batch_size_of,
                             check_finite, check_outputs, check_statistic, deferred_finite_checks,
                             iterate_batches, model_lock, model_state_kept, prepare_batch,
                             probe_deterministic, refuse_random_modules)
from .strategy import BackwardStrategy, _grad
from ..layer_types.base import AbstractLayer, is_recording_paused, recording_paused, same_maths
from ..layercollection import run_eagerly
from . import consumers
from .consumers import BatchContext


# ---------------------------------------------------------------------- what a forward records
#: model -> keys of (function, collection) whose parameter uses were verified in this process
_USES_VERIFIED = weakref.WeakKeyDictionary()


def _function_key(function):
    """What identifies the computation of ``function`` for `check_parameter_uses`: the
    user's function under any output transform (a variant changes the outputs' directions, not
    which parameters the forward uses); the default ``model(inputs)`` is one key per model; a
    user function is its code and the identities of what its closure holds (a lambda written
    once in a loop over models gets a key per model)."""
    while hasattr(function, "function") and callable(function.function):
        function = function.function
    if getattr(function, "nngeometry_default_of", None) is not None:
        return "default"
    code = getattr(function, "__code__", None)
    if code is None:
        return ("object", id(function))
    cells = tuple(id(c.cell_contents) for c in (function.__closure__ or ()))
    return (code, cells, id(getattr(function, "__self__", None)))


def uses_key(model, function, layer_collection):
    """The key under which the parameter-use check of ``(model, function, collection)`` is
    remembered, or None when it cannot be remembered (a model that cannot be weakly referenced).
    The parameters' identities are part of it: a module given a new parameter is checked again."""
    params = tuple(id(p) for p in model.parameters()) if hasattr(model, "parameters") else ()
    tied = tuple((lid, tuple(name for name, _ in uses))
                 for lid, uses in getattr(layer_collection, "tied", {}).items())
    return (_function_key(function), tuple(layer_collection.layer_ids()), params, tied)


def uses_verified(model, key):
    try:
        return key in _USES_VERIFIED.get(model, ())
    except TypeError:
        return False


def mark_uses_verified(model, key):
    try:
        _USES_VERIFIED.setdefault(model, set()).add(key)
    except TypeError:
        pass


class GradTarget:
    """A tensor of the forward pass that the backward pass differentiates to: its gradient edge
    (the autograd node that made it, and which of its outputs), with its shape, dtype and device
    (for zero gradients and memory budgets). A tensor with no graph (nothing it depends on
    requires grad) is kept as is: the backward pass then reports it."""

    __slots__ = ("edge", "shape", "dtype", "device")

    def __init__(self, t):
        self.shape, self.dtype, self.device = t.shape, t.dtype, t.device
        self.edge = torch.autograd.graph.get_gradient_edge(t) if t.requires_grad else t

    @property
    def nbytes(self):
        return self.shape.numel() * self.dtype.itemsize

    def zeros(self, K):
        """The gradient of ``K`` directions that do not depend on this tensor."""
        return torch.zeros((K,) + tuple(self.shape), dtype=self.dtype, device=self.device)


class Call:
    """One call of a module: its inputs, what the backward pass differentiates to and, once it
    has run, ``gy`` (the gradients w.r.t. the module's output).

    ``targets[0]`` is the module's output as a `GradTarget`, not the output tensor:
    holding the tensor kept e.g. every convolution's output alive through the backward pass
    (6 MiB for a small CNN in a build whose other transients are 16), and an in-place op applied to the
    output afterwards (``ReLU(inplace=True)``) made the tensor stand for that op's result, so
    that ``gy`` was the gradient w.r.t. the wrong quantity. The edge is the output as the module
    returned it.

    A layer type that records tensors inside the module's forward (see
    ``AbstractLayer.internal_recorder``) gets ``record`` (what its recorder kept) and the
    gradients w.r.t. its recorder's ``targets`` in ``extra_gy`` (same order, each
    ``(K, *shape)``)."""

    __slots__ = ("args", "kwargs", "targets", "record", "gy", "extra_gy", "spec", "module",
                 "shared")

    def __init__(self, args, kwargs, output, recorder=None, spec=None, module=None):
        self.args = args
        self.kwargs = kwargs
        # a call of another module that uses the layer's parameters (tied weights): its own
        # layer spec and module; None for the layer's own module
        self.spec = spec
        self.module = module
        self.targets = [GradTarget(output)]
        self.record = None
        if recorder is not None:
            self.record = recorder.record
            self.targets += [GradTarget(t) for t in recorder.targets]
        self.gy = None
        self.extra_gy = []
        # (n, axis) for an output with no batch axis, shared by the n examples (see
        # expand_shared); None otherwise
        self.shared = None

    def expand_shared(self):
        """Give every tensor argument of a call whose output has no batch axis a batch axis
        of ``n`` copies: each example's per-example quantities are then those of the whole
        call with that example's own output gradient (``gy``: ``(K, n, *out_shape)``)."""
        n, axis = self.shared

        def rep(t):
            if not isinstance(t, torch.Tensor):
                return t
            t = t.unsqueeze(axis)
            shape = list(t.shape)
            shape[axis] = n
            return t.expand(shape)
        self.args = tuple(rep(a) for a in self.args)
        self.kwargs = {k: rep(v) for k, v in self.kwargs.items()}

    @property
    def target(self):
        return self.targets[0].edge

    @property
    def out_dtype(self):
        return self.targets[0].dtype

    @property
    def out_nbytes(self):
        """Bytes of one direction's gradients w.r.t. everything this call differentiates to."""
        return sum(t.nbytes for t in self.targets)

    def set_gradients(self, grads, K):
        """Store the backward pass's gradients (one per target, None: independent of it)."""
        grads = [g if g is not None else t.zeros(K) for g, t in zip(grads, self.targets)]
        self.gy, self.extra_gy = grads[0], grads[1:]

    @property
    def x(self):
        return self.args[0]


# ---------------------------------------------------------------------- checks of the calls
class ParameterUseError(RuntimeError):
    """A parameter of the collection is used outside the forward of the module that holds it
    (e.g. ``F.linear(h, self.emb.weight)`` in the parent's forward): the per-layer hooks do not
    see that use, and the statistics built from them would miss part of the gradient."""


def check_parameter_uses(out, layer_collection, modules, calls):
    """Check, on one batch, that the per-layer hooks see every use of the collection's
    parameters; raise `ParameterUseError` naming the layers where they do not.

    With ``u`` a fixed pseudo-random cotangent of the outputs ``out`` (``(n, K)``) and ``gy_c``
    the resulting gradient w.r.t. the output of each recorded call ``c`` of a layer's module,
    what the hooks can account for is ``Σ_c vjp(module(args_c; θ), gy_c)``: the module's forward
    re-run on its recorded (detached) arguments, differentiated w.r.t. its own parameters (for
    a layer type with ``grad_sum``, e.g. Linear, Embedding and the direct convolutions, that
    formula on the recorded input instead: no re-run, and the layer's maths checked along). It
    must equal autograd's gradient of ``Σ u ⊙ f`` w.r.t. ``θ``; it differs exactly when the
    parameter is also used elsewhere: outside the module's forward (a tied head written
    ``F.linear(h, emb.weight)``), or by another module (tied weights with one module left out of
    the collection). Cost: one backward pass with one direction, and one forward and backward of
    each layer's module (one GEMM for those with ``grad_sum``), on one batch; no per-example
    quantity is formed.

    ``out`` must still have its graph (the caller's backward passes retain it)."""
    if out.shape[0] == 0 or not out.requires_grad:
        return

    gen = torch.Generator(device="cpu").manual_seed(0)  # no global RNG state touched
    u = torch.randn(out.shape, generator=gen, dtype=out.dtype).to(out.device)
    lids = list(layer_collection.layer_ids())
    params = {lid: layer_collection[lid].parameters_of(modules[lid]) for lid in lids}
    flat_params = [p for lid in lids for p in params[lid]]
    layer_calls = [(lid, c) for lid in lids for c in calls[lid]]
    targets = [c.targets[0].edge for _, c in layer_calls]
    grads = _grad(out, targets + flat_params, u, retain_graph=True, allow_unused=True)
    gys, true = grads[:len(targets)], grads[len(targets):]
    hooked = {lid: [torch.zeros_like(p) for p in params[lid]] for lid in lids}
    # a random forward (dropout in training mode) re-run here must not move the RNG
    devices = [out.device] if out.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), recording_paused(), torch.enable_grad():
        for (lid, c), gy in zip(layer_calls, gys):
            if gy is None:
                continue
            spec = c.spec or layer_collection[lid]
            g = None
            if c.shared is None and not c.extra_gy and same_maths(spec, "grad_sum"):
                x = spec.inputs_of(c)
                if isinstance(x, torch.Tensor) and x.shape[:1] == gy.shape[:1]:
                    # the layer type's own formula: no forward re-run (for a language
                    # model's output layer, a product as large as the model's forward)
                    g = spec.grad_sum(c.module or modules[lid], x, gy)
            if g is not None:
                for acc, gk in zip(hooked[lid], g):
                    acc += gk
                continue
            names = spec.param_names()
            leaves = {nm: p.detach().requires_grad_(True) for nm, p in zip(names, params[lid])}
            y = functional_call(c.module or modules[lid], leaves, c.args, c.kwargs)
            if not isinstance(y, torch.Tensor):
                y = y[0]  # the hooks differentiate through the first output (see Call)
            if y.shape != gy.shape:
                # an output shared by the examples, expanded to the batch by the hooks
                y = y.expand(gy.shape)
            g = _grad(y, list(leaves.values()), gy, allow_unused=True)
            for acc, gk in zip(hooked[lid], g):
                if gk is not None:
                    acc += gk
    eps = torch.finfo(out.dtype).eps
    bad, j = [], 0
    for lid in lids:
        ref = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                         for g, p in zip(true[j:j + len(params[lid])], params[lid])])
        j += len(params[lid])
        mine = torch.cat([g.reshape(-1) for g in hooked[lid]])
        err = (mine - ref).norm()
        # rounding: the same products in another order
        if err > 1e3 * eps * (ref.norm() + mine.norm()) + torch.finfo(out.dtype).tiny:
            bad.append((lid, float(err / ref.norm().clamp_min(torch.finfo(out.dtype).tiny))))
    # a module whose forward is random differs from itself: not this check's business (the
    # layer types and the determinism checks report it with their own messages)
    bad = [(lid, r) for lid, r in bad if not _is_random(modules[lid], calls[lid], devices)]
    if bad:
        names = ", ".join(f"'{lid}' (relative difference {rel:.2g})" for lid, rel in bad)
        raise ParameterUseError(
            f"the gradients of layer(s) {names} seen by the per-layer hooks differ from "
            "autograd's: a parameter of these layers is used outside its module's forward (e.g. "
            "a tied head written F.linear(h, self.emb.weight) in the parent's forward, or a "
            "weight shared with a module left out of the LayerCollection), and the matrix would "
            "miss that part of the gradient. Fixes: use PMatImplicit (its products go through "
            "torch.func and see every use of the parameters), or leave these layers out of the "
            "LayerCollection (their parameters are then constants)")


def _is_random(module, layer_calls, devices):
    """Whether re-running ``module`` on its recorded arguments gives another output (dropout in
    training mode); the RNG state is restored."""
    with torch.random.fork_rng(devices=devices), recording_paused(), torch.no_grad():
        for c in layer_calls:
            ys = []
            for _ in range(2):
                y = functional_call(c.module or module, {}, c.args, c.kwargs)
                ys.append(y if isinstance(y, torch.Tensor) else y[0])
            if not torch.equal(ys[0], ys[1]):
                return True
    return False


# ---------------------------------------------------------------------- shared outputs
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
        grads = _grad(out, [c.targets[0].edge for _, _, c, _ in cands], cot,
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


# ---------------------------------------------------------------------- the driver
def _examples_count(examples):
    """The number of examples a DataLoader will yield if it can be known without iterating
    (a sized sampler); None otherwise (iterables, single mini-batches: the size is then checked
    batch by batch)."""
    if not isinstance(examples, DataLoader):
        return None
    try:
        n = len(examples.sampler) if examples.batch_sampler is not None else len(examples)
    except TypeError:
        return None
    bs = examples.batch_size
    if bs and examples.drop_last:
        n = (n // bs) * bs
    return n


class _InstanceForward:
    """While the generator's hooks are on ``module``, its calls run through the forward of the
    call's recorder (``active[-1]``, pushed by the pre-hook; see
    ``AbstractLayer.internal_recorder``) when it has one. Set on the module *instance* (its
    ``__dict__``), never on the class or on a function of torch, so that other modules, other
    models and other threads are not affected; `remove` puts back what was there."""

    def __init__(self, module, active):
        self.module = module
        self.saved = module.__dict__.get("forward", _InstanceForward)
        original = module.forward

        def forward(*args, **kwargs):
            rec = active[-1] if active and not is_recording_paused() else None
            if rec is None or not hasattr(rec, "forward"):
                return original(*args, **kwargs)
            return rec.forward(original, *args, **kwargs)

        module.__dict__["forward"] = forward

    def remove(self):
        if self.saved is _InstanceForward:
            self.module.__dict__.pop("forward", None)
        else:
            self.module.__dict__["forward"] = self.saved


class _MeanJacobian(consumers.Consumer):
    """Consumer of [`TorchHooksJacobianBackend.accumulate`][nngeometry.backend.TorchHooksJacobianBackend.accumulate]: ``(1/n) Σ_x J(x)``, shape
    ``(n_output, P)`` in the collection's layout. State: ``_sum``."""

    state_attrs = ("_sum",)

    def __init__(self, layer_collection):
        self.lc = layer_collection
        self._sum = None
        self.result = None

    def update(self, ctx):
        if self._sum is None:
            ref = ctx.calls[ctx.layer_ids()[0]][0].gy
            self._sum = torch.zeros(ctx.n_output, self.lc.numel(), dtype=ref.dtype,
                                    device=ref.device)
        rows = self._sum[ctx.k_start:ctx.k_start + ctx.K]
        for lid in ctx.layer_ids():
            rows[:, self.lc.slice(lid)] += ctx.per_example_grad(lid).sum(dim=1)
            ctx.release(lid)

    def finalize(self, n):
        self.result = self._sum.div_(n)


class HookedPasses(SharedOutputs, BackwardStrategy):
    """The passes over the data with hooks. Mixed into `TorchHooksJacobianBackend` (uses its
    ``model``, ``function``, ``centering``, ``verbose``, ``check_deterministic``,
    ``_broadcast`` and ``_group``)."""

    def _accumulate(self, examples, layer_collection, consumer, chunk_bytes=None,
                    finalize=True):
        """The pass behind `TorchHooksJacobianBackend.accumulate` (its docstring states the
        consumer protocol, the chunking and the reduction over ranks)."""
        group = self._group()
        if group is not None and getattr(consumer, "_reduced", False):
            raise RuntimeError(
                f"this {type(consumer).__name__} already holds the statistic of all the ranks: "
                "another pass into it would count the earlier examples once per rank; "
                "accumulate into a new statistic and merge() the two")
        # inference_mode(False): inside a user's `with torch.inference_mode():` autograd would
        # record nothing (the backward pass fails); the batches' inference tensors are copied
        # in _batches. Leaving the block restores the user's mode.
        with torch.inference_mode(False):
            mean = self._mean_jacobian(examples, layer_collection) if self.centering else None
            n_total = 0
            # the probe costs one more forward of the first batch (+8% to +29% for one-batch
            # builds of an MLP): only where a module is in training mode, the mode in which
            # modules are random, or where the first forward drew from the global RNG
            # (randomness outside the modules: F.dropout(x, training=True), torch.rand); a
            # model in eval mode whose forward leaves the RNG alone is deterministic
            probe = self.check_deterministic
            with self._prepared(layer_collection) as (modules, calls), deferred_finite_checks():
                for i, batch in enumerate(self._batches(examples)):
                    n_total += self._run_batch(batch, layer_collection, modules, calls, consumer,
                                               chunk_bytes, mean, probe=probe and i == 0,
                                               index=i if group is None else
                                               global_batch_index(i, group))
        # a statistic may already hold the examples of an earlier pass (accumulated into again)
        consumer.count = getattr(consumer, "count", 0) + n_total
        n_total = consumer.count
        if group is not None:
            if not hasattr(consumer, "all_reduce"):
                raise TypeError(
                    f"{type(consumer).__name__} can't be reduced across ranks: under "
                    "torch.distributed a consumer must follow the protocol of "
                    "nngeometry.backend.consumers.Consumer (subclass it), or pass "
                    "distributed=False to the generator")
            # once per statistic, after the pass (never per batch)
            consumer.all_reduce(group, self._device())
            n_total = consumer.count
        if n_total == 0:
            raise ValueError("the examples yielded no data (empty loader): nothing to compute from")
        if finalize:
            consumer.finalize(n_total)
            check_statistic(getattr(consumer, "result", None), layer_collection)
        return consumer

    def _mean_jacobian(self, examples, layer_collection):
        """``(n_output, P)``: ``J̄ = (1/n) Σ_x J(x)`` over all the examples, by the same
        per-example gradients as the statistics (one pass, uncentered)."""
        return self.accumulate_uncentered(examples, layer_collection,
                                          _MeanJacobian(layer_collection)).result

    # ================================================================== internals
    def _batches(self, examples):
        """The batches of ``examples`` as tuples, on the model's device, floating-point tensors
        in the model's dtype (see `to_device`). First refuses
        random modules (``check_deterministic``)."""
        if self.check_deterministic:
            refuse_random_modules(self.model)
        device, dtype = self._device(), self._dtype()
        it = (prepare_batch(batch, device, dtype) for batch in iterate_batches(examples))
        if self.verbose:
            total = len(examples) if isinstance(examples, DataLoader) else None
            it = tqdm(it, total=total, desc="nngeometry", unit="batch")
        return it

    def _device(self):
        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")

    def _dtype(self):
        """The dtype of the model's first floating-point parameter (None without one): the
        dtype floating-point inputs are cast to."""
        for p in self.model.parameters():
            if p.is_floating_point():
                return p.dtype
        return None

    @contextlib.contextmanager
    def _prepared(self, layer_collection):
        _refuse_batch_statistics(self.model)
        # compiled code would not run the hooks: the compiled parts run their Python code
        with model_lock(self.model), run_eagerly(self.model), \
                model_state_kept(self.model, layer_collection) as (modules, params), \
                self._hooks(layer_collection, modules) as calls:
            yield modules, calls

    @contextlib.contextmanager
    def _hooks(self, layer_collection, modules):
        """``{layer_id: [Call, ...]}``, filled by the forward passes run inside the block: the
        hooks that record each call of the collection's modules (and of modules tied to them).
        Nothing else about the model is changed (see `capture`, which records a user's
        own training step with them)."""
        calls = {lid: [] for lid in modules}
        handles, recorders = [], []
        broadcast = getattr(self, "_broadcast", None)
        try:
            for lid, module in modules.items():
                layer = layer_collection[lid]
                # recorders of tensors inside the module's forward (see
                # AbstractLayer.internal_recorder), one per call in progress
                active = [] if type(layer).internal_recorder is not \
                    AbstractLayer.internal_recorder else None
                if active is not None:
                    recorders.append(active)
                    handles.append(module.register_forward_pre_hook(
                        self._make_pre_hook(layer, active)))
                    # the recorder's own forward, on this instance only (removed with the
                    # hooks)
                    handles.append(_InstanceForward(module, active))
                handles.append(module.register_forward_hook(
                    self._make_hook(calls[lid], active, layer=layer, broadcast=broadcast),
                    with_kwargs=True))
                # other modules using this layer's parameters (tied weights): their calls
                # are calls of the layer, with their own spec and module
                for tname, tspec in getattr(layer_collection, "tied", {}).get(lid, ()):
                    tmod = self.model.get_submodule(tname)
                    handles.append(tmod.register_forward_hook(
                        self._make_hook(calls[lid], None, tspec, tmod, layer=tspec,
                                        broadcast=broadcast), with_kwargs=True))
            yield calls
        finally:
            for h in reversed(handles):
                h.remove()
            if recorders:
                self._close_recorders(recorders)

    @staticmethod
    def _close_recorders(recorders):
        """Exit the recorders of module calls that did not return (an exception in the forward
        pass): they must not stay active."""
        for active in recorders:
            while active:
                active.pop().__exit__(None, None, None)

    @staticmethod
    def _make_pre_hook(layer, active):
        def pre_hook(module, args):
            if is_recording_paused():
                return
            rec = layer.internal_recorder(module)
            rec.__enter__()
            active.append(rec)
        return pre_hook

    @staticmethod
    def _make_hook(store, active=None, spec=None, tied_module=None, layer=None, broadcast=None):
        def hook(module, args, kwargs, output):
            if is_recording_paused():
                # a layer type re-running this module's forward to compute its statistics
                return
            rec = None
            if active:
                rec = active.pop()
                rec.__exit__(None, None, None)
            if isinstance(output, torch.Tensor):
                out = output
            elif isinstance(output, (tuple, list)) and isinstance(output[0], torch.Tensor):
                out = output[0]
            else:
                raise TypeError(f"cannot differentiate through the output of {type(module).__name__}")
            replaced = shared = None
            n = broadcast.n if broadcast is not None else None
            if n is not None and n > 1 and layer is not None and rec is None:
                axis = layer.batch_axis(module)
                if out.dim() > axis and out.shape[axis] == 1 and not broadcast.keep_ones:
                    # one output shared by the n examples (positions (1, T), a learned table):
                    # the model would broadcast it; broadcasting it here instead makes the
                    # gradient w.r.t. the copy per-example (the gradient w.r.t. the shared
                    # output is their sum, from which they cannot be recovered)
                    out = _expand_axis(out, axis, n)
                    args = tuple(_expand_axis(a, axis, n) for a in args)
                    kwargs = {k: _expand_axis(v, axis, n) for k, v in kwargs.items()}
                    replaced = out if isinstance(output, torch.Tensor) else \
                        type(output)([out, *output[1:]]) if isinstance(output, list) else \
                        _rebuild_tuple(output, out)
                    broadcast.expanded = broadcast.widened = True
                elif out.dim() > axis and out.shape[axis] != n:
                    # an output with no batch axis (T5's relative position bias, looked up on
                    # a (T, T) table): its per-example gradients take a backward pass of
                    # their own (see _direction_chunks)
                    shared = (n, axis)
                    broadcast.expanded = True
            call = Call(tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args),
                        {k: v.detach() if isinstance(v, torch.Tensor) else v
                         for k, v in kwargs.items()}, out, rec, spec, tied_module)
            call.shared = shared
            store.append(call)
            return replaced
        return hook

    @staticmethod
    def _check_finite(outputs):
        # on an accelerator, within a pass, read once at the end of the pass (no host
        # synchronisation per batch; see deferred_finite_checks)
        check_finite(outputs, "the model's outputs contain NaN or Inf; check the inputs (NaN/Inf "
                              "in the data?) and the model's parameters")

    @staticmethod
    def _check_nonempty(n):
        if n == 0:
            raise consumers.EmptyExamplesError(
                "the examples yielded no data (empty loader): nothing to compute from")

    def _outputs(self, batch, index=None, watch_rng=False):
        """``(model_outputs, out, columns)``: what the model part of ``function`` returns (for
        the determinism probe), the outputs to differentiate, flattened to ``(n, n_output)``,
        and ``columns(k0, k1)``, the graph of ``out[:, k0:k1]`` alone (or None). For a
        likelihood's transform (``OutputTransform``, see `nngeometry.curvature`) the model
        part is its ``function``; otherwise the whole ``function``."""
        fn = self.function
        transform = hasattr(fn, "model_outputs") and hasattr(fn, "split")
        rng = _rng_state(self._device()) if watch_rng else None
        raw = fn.model_outputs(*batch) if transform else check_outputs(fn(*batch))
        self._rng_consumed = watch_rng and not _same_rng(rng, _rng_state(self._device()))
        if not transform:
            return raw, *self._flat_outputs(raw, None)
        info = fn.batch_info(batch, index) if getattr(fn, "needs_batch", False) else None
        out, columns = self._transformed(raw, info)
        return raw, out, columns

    def _transformed(self, raw, info=None):
        """``(out, columns)`` of an output transform applied to the model's outputs ``raw``
        (``info``: the batch's, for transforms that read it)."""
        fn = self.function
        # losses of the observed targets, seeded draws: the transform reads the batch
        out, columns = fn.split(raw, info) if info is not None else fn.split(raw)
        return self._flat_outputs(check_outputs(out), columns)

    def _flat_outputs(self, out, columns):
        n = out.shape[0] if out.dim() > 0 else 0
        if columns is not None and out.dim() != 2:
            columns = None
        out = out.reshape(n, -1)
        self._check_finite(out)
        return out, columns

    def _run_batch(self, batch, layer_collection, modules, calls, consumer, chunk_bytes=None,
                   mean_jacobian=None, probe=False, index=None):
        # (the batch comes from _batches: on the model's device and dtype, checked finite)
        raw, out, columns = self._broadcast_outputs(batch, index, calls, watch_rng=probe)
        if probe and (self._rng_consumed or any(m.training for m in self.model.modules())):
            probe_deterministic(self.function, self.model, self._device(), batch, raw,
                                self._rng_consumed)
        n, n_output = out.shape
        if n == 0:
            return 0
        self._check_calls(out, layer_collection, modules, calls)
        layer_calls = [c for store in calls.values() for c in store]
        for c in layer_calls:
            if c.shared is not None:
                c.expand_shared()
        for k0, k1, grads in self._direction_chunks(out, columns, calls, layer_collection,
                                                    chunk_bytes,
                                                    per_layer=getattr(consumer, "per_layer",
                                                                      False)):
            i = 0
            for c in layer_calls:
                c.set_gradients(grads[i:i + len(c.targets)], k1 - k0)
                i += len(c.targets)
            ctx = BatchContext(layer_collection, modules, calls, n, k1 - k0, k0, n_output,
                               mean_jacobian, out.detach())
            consumer.update(ctx)
        for store in calls.values():
            store.clear()
        return n

    def _check_calls(self, out, layer_collection, modules, calls, what_ran="the function"):
        """Refuse a forward pass whose recorded calls can't give the statistics: a layer not
        called, a layer called on an unbatched input, a parameter used outside its module."""
        n = out.shape[0]
        for lid, store in calls.items():
            if not store:
                raise RuntimeError(
                    f"layer '{lid}' was not called during the forward pass of {what_ran}; "
                    "remove it from the LayerCollection or check the function")
        if n > 1:
            _refuse_unbatched_calls(layer_collection, modules, calls, n)
            _mark_coincident_shared(out, self.model, self.function, layer_collection, modules,
                                    calls)
        key = uses_key(self.model, self.function, layer_collection)
        if not uses_verified(self.model, key):
            # once per model, function and collection in a process (entry points build a new
            # generator per call: the check must not cost a pass each time): a parameter used
            # outside its module's forward would give a plausible wrong matrix
            check_parameter_uses(out, layer_collection, modules, calls)
            mark_uses_verified(self.model, key)

    def _direction_chunks(self, out, columns, calls, layer_collection, chunk_bytes=None,
                          keep_graph=False, per_layer=False):
        """``(k0, k1, grads)`` per chunk of output directions: the gradients of directions
        ``k0 .. k1 - 1`` of ``out`` (``(n, n_output)``; ``columns(k0, k1)``: the chunk's own
        graph, or None) w.r.t. every target of the recorded calls, in call order. The graph is
        freed after the last chunk unless ``keep_graph`` (a training step's backward pass goes
        on through it). ``per_layer``: the consumer's attribute of that name (see
        ``_chunk_size``)."""
        n, n_output = out.shape
        layer_calls = [c for store in calls.values() for c in store]
        chunk = self._chunk_size(layer_calls, n, n_output, layer_collection.numel(),
                                 chunk_bytes, columns is not None, per_layer=per_layer)
        targets = [t.edge for c in layer_calls for t in c.targets]
        # calls whose output has no batch axis: index of their output among the targets
        shared, j = [], 0
        for c in layer_calls:
            if getattr(c, "shared", None) is not None:
                shared.append((j, c))
            j += len(c.targets)
        for k0 in range(0, n_output, chunk):
            k1 = min(n_output, k0 + chunk)
            retain = keep_graph or k1 < n_output
            own = self._shared_gradients(out, shared, k0, k1) if shared else None
            if columns is None or chunk == n_output:
                grads = self._batched_backward(out, targets, k0, k1, retain=retain)
            else:
                # the chunk's own columns: (K, n, K) cotangents instead of (K, n, n_output)
                grads = self._batched_backward(columns(k0, k1), targets, 0, k1 - k0,
                                               retain=retain)
            if own is not None:
                grads = list(grads)
                for (j, _), g in zip(shared, own):
                    grads[j] = g
            yield k0, k1, grads
