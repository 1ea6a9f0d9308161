"""The model and the data during a computation: what the engine does to the user's model, how
it puts it back, what it requires of it, and how the examples become batches.

The module it works on (`unwrap_model`: the one inside a ``DistributedDataParallel`` /
``DataParallel`` wrapper), one lock per model (`model_lock`: a build or an implicit product on
a model runs alone, across threads; `in_engine_pass` tells whether this thread is inside one),
the model's parameters swapped for functional tensors (`tensors_in_model`, what the
``torch.func`` products differentiate through), the fused attention kernels turned off
(`_no_fused_attention`), the checks that a model can give per-example quantities at all
(BatchNorm on batch statistics, parameters of one dtype and device), and the parameters'
``requires_grad`` flags and buffers kept as they were (`model_state_kept`).

What the model computes must be deterministic and finite. Random models are refused: dropout
modules in training mode (`refuse_random_modules`), and forwards that draw from the global RNG
(watched with `_rng_state` / `_same_rng`) and give other outputs when run again on a forked RNG
(`probe_deterministic` for a pass with hooks, `probe_functional` for an implicit product).
Non-finite statistics and products are refused with the layers they come from
(`check_statistic`, `_check_product`).

The data comes in as batches: what the user passes as ``examples`` (a loader, a list of
batches, one mini-batch) is read as batches (`iterate_batches`), moved to the model's device
and dtype and checked finite (`prepare_batch`); the model is called on a batch by
`default_function` (``model(inputs)``, or ``model(**batch)`` for dict batches), whose outputs
must be a tensor (`check_outputs`).
"""
import cmath
import contextlib
import functools
import math
import threading
import weakref
from collections.abc import Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader

from torch.nn.utils import parametrize

from ..layer_types.base import AbstractLayer, layer_type_for, recording_paused
from ..layer_types.parametrized import parametrizations_prepared


# ---------------------------------------------------------------------- the model
def unwrap_model(model):
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` wrappers: the hooks go
    on the inner module (the wrapper's forward would start a gradient synchronisation that no
    ``backward`` of the parameters completes), and its layer ids are the model's own (without
    the wrapper's ``module.`` prefix)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _check_uniform_params(layer_collection, modules):
    """``(dtype, device)`` shared by all the collection's parameters; ``ValueError`` naming the
    first layer that differs otherwise (the statistics are accumulated in one dtype)."""
    first = None
    for lid, module in modules.items():
        for p in layer_collection[lid].parameters_of(module):
            if first is None:
                first = (lid, p.dtype, p.device)
            elif (p.dtype, p.device) != first[1:]:
                raise ValueError(
                    f"the layers of the LayerCollection do not share one dtype and device: "
                    f"'{first[0]}' has {first[1]} on {first[2]}, '{lid}' has {p.dtype} on "
                    f"{p.device}. Convert the model with model.to(dtype) / model.to(device), or "
                    "leave the differing layers out of the LayerCollection")
    if first is None:
        return None, torch.device("cpu")
    return first[1], first[2]


def _refuse_batch_statistics(model):
    """``RuntimeError`` if a BatchNorm module of ``model`` normalizes with the batch's own
    statistics (training mode, or no running statistics): each example's output then depends on
    the other examples of the batch, and per-example Jacobians are not defined."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (
                module.training or not module.track_running_stats):
            why = ("is in training mode" if module.track_running_stats else
                   "has track_running_stats=False")
            raise RuntimeError(
                f"BatchNorm layer '{name or type(module).__name__}' ({type(module).__name__}) "
                f"{why}: it normalizes with the statistics of the batch, which couple the "
                "examples, so per-example Jacobians are not defined. Call model.eval() before "
                "computing the matrix (its running statistics are then used)")


#: the process-wide attention flags changed by _no_fused_attention: how many blocks are inside
#: it (all threads) and the flags to put back when the last one leaves
_FUSED_LOCK = threading.Lock()
_FUSED_STATE = {"depth": 0, "saved": None}


@contextlib.contextmanager
def _no_fused_attention():
    """Turn off the fused kernels of attention: inside torch.func transforms the parameters don't
    require grad, so eval-mode nn.MultiheadAttention / TransformerEncoderLayer would take their
    fused inference path, and scaled_dot_product_attention its flash kernel: neither has
    forward-mode AD. The math implementation is used instead (same values).

    Those switches are process-wide (torch has no thread-local version), so they are counted:
    the first block to enter (in any thread) saves and sets them, the last to leave restores
    them. (Saving and restoring per block let two threads' blocks restore each other's settings
    and leave the fast path off after both had finished.) Meanwhile other threads' attention
    takes the same math path: same values, only slower."""
    from torch.nn.attention import SDPBackend, _cur_sdpa_kernel_backends, _sdpa_kernel

    with _FUSED_LOCK:
        if _FUSED_STATE["depth"] == 0:
            _FUSED_STATE["saved"] = (torch.backends.mha.get_fastpath_enabled(),
                                     _cur_sdpa_kernel_backends())
            torch.backends.mha.set_fastpath_enabled(False)
            _sdpa_kernel([SDPBackend.MATH])
        _FUSED_STATE["depth"] += 1
    try:
        yield
    finally:
        with _FUSED_LOCK:
            _FUSED_STATE["depth"] -= 1
            if _FUSED_STATE["depth"] == 0:
                fastpath, backends = _FUSED_STATE["saved"]
                _sdpa_kernel(backends)
                torch.backends.mha.set_fastpath_enabled(fastpath)
                _FUSED_STATE["saved"] = None


#: see `products.MatrixFreeProducts._functional_batches`
_FORWARD_AD_LOCK = threading.RLock()

#: one lock per model (weakly held): see model_lock
_MODEL_LOCKS = weakref.WeakKeyDictionary()
_MODEL_LOCKS_GUARD = threading.Lock()
#: per thread, ``{id(model): depth}`` of the computations in progress (see in_engine_pass)
_ENGINE_PASSES = threading.local()


@contextlib.contextmanager
def model_lock(model):
    """Computations on one model run one at a time, across threads: a build installs hooks (and
    an attention module's instance forward) on the model's modules, and the implicit products
    swap its parameters for functional tensors (``tensors_in_model``); two at once would record
    each other's calls or see each other's tensors (wrong numbers, not an error). A second
    thread waits for the first to finish; the same thread may nest (a preconditioner's product
    inside a CG solve). Different models run in parallel."""
    with _MODEL_LOCKS_GUARD:
        lock = _MODEL_LOCKS.get(model)
        if lock is None:
            lock = _MODEL_LOCKS[model] = threading.RLock()
    with lock:
        depth = _ENGINE_PASSES.__dict__.setdefault("depth", {})
        depth[id(model)] = depth.get(id(model), 0) + 1
        try:
            yield
        finally:
            depth[id(model)] -= 1
            if not depth[id(model)]:
                del depth[id(model)]


def in_engine_pass(model):
    """Whether this thread is inside one of the library's own computations on ``model`` (a
    build or an implicit product): its forward passes are not the user's (a recorder of
    training steps, `.capture`, ignores them)."""
    return id(model) in getattr(_ENGINE_PASSES, "depth", {})


@contextlib.contextmanager
def tensors_in_model(model, tensors):
    """Within the block, ``model``'s parameters and buffers named in ``tensors`` (qualified
    name -> tensor) are these tensors; the original objects are put back on exit, also on an
    exception. This is what ``torch.func`` transforms differentiate through.

    Every place holding the same original tensor (a module reached under two names, a weight
    shared by two modules) sees the new one, as ``torch.func.functional_call``'s
    ``tie_weights`` does. ``functional_call`` is not used: with a module reached under two
    names it leaves plain tensors in place of the module's Parameters (torch 2.13), which
    breaks every later use of the model."""
    owners = {}  # id(original tensor) -> [(module's _parameters or _buffers dict, name)]
    for mod in model.modules():
        for store in (mod._parameters, mod._buffers):
            for name, t in store.items():
                if t is not None:
                    owners.setdefault(id(t), []).append((store, name))
    swapped = []
    try:
        for qualified, new in tensors.items():
            path, _, name = qualified.rpartition(".")
            mod = model.get_submodule(path)
            store = mod._parameters if name in mod._parameters else mod._buffers
            if name not in store:
                raise KeyError(f"'{qualified}' is neither a parameter nor a buffer of the model")
            for holder, key in owners.get(id(store[name]), [(store, name)]):
                swapped.append((holder, key, holder[key]))
                holder[key] = new
        yield
    finally:
        for holder, key, original in reversed(swapped):
            holder[key] = original


def constant_uses(model, named):
    """``[(module, name, key, mask)]``: for each use of a parameter of ``named`` (key -> the
    collection's parameter, keys ``"{layer_id}.{param_name}"``) by a module whose layer type
    declares entries that autograd's backward treats as constants (an Embedding's
    ``padding_idx`` row, see `AbstractLayer.constant_entries`), the module, the parameter's name
    in it, its key and the ``bool`` mask. A weight tied between such a module and another one
    (an embedding and an output layer) is constant there for the first use only: the masks are
    per use, not per parameter."""
    keys = {id(p): key for key, p in named.items()}
    uses = []
    for module in model.modules():
        held = [(name, keys[id(t)]) for name, t in module._parameters.items()
                if t is not None and id(t) in keys]
        if not held:
            continue
        ltype = layer_type_for(module)
        if ltype is None or ltype.constant_entries is AbstractLayer.constant_entries:
            continue
        masks = ltype.from_module(module).constant_entries(module)
        uses.extend((module, name, key, masks[name]) for name, key in held if name in masks)
    return uses


@contextlib.contextmanager
def constants_detached(uses, tensors):
    """Within the block (inside `tensors_in_model`), each use of `constant_uses` sees its
    parameter ``tensors[key]`` with the constant entries detached; the parameter's other uses
    (a tied weight's) see it whole. Forward-mode and ``torch.func`` products then agree with
    backward's per-example gradients."""
    swapped = []
    try:
        for module, name, key, mask in uses:
            t = tensors[key]
            swapped.append((module, name, module._parameters[name]))
            module._parameters[name] = torch.where(mask, t.detach(), t)
        yield
    finally:
        for module, name, original in reversed(swapped):
            module._parameters[name] = original


@contextlib.contextmanager
def model_state_kept(model, layer_collection):
    """Make the collection's parameters require grad and keep the model's buffers (e.g.
    BatchNorm running statistics) as they were: building a matrix must not change the model.
    Yields ``(modules, params)``: the collection's ``{layer_id: module}`` and its parameters."""
    modules = layer_collection.get_layerid_module_map(model)
    _check_uniform_params(layer_collection, modules)
    params = layer_collection.parameters(modules)
    # the other parameters are constants for the time of the pass: autograd then records
    # no graph below the collection's first layer (a last-layer matrix runs no backward
    # pass through the rest of the network)
    mine = {id(p) for p in params}
    others = [p for p in model.parameters() if id(p) not in mine]
    flags = [p.requires_grad for p in params]
    other_flags = [p.requires_grad for p in others]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    # torch.nn.utils.parametrize: one function for the whole computation (spectral_norm
    # in training mode would advance its power iteration at every forward pass)
    restore_parametrizations = parametrizations_prepared(model) if any(
        parametrize.is_parametrized(m) for m in model.modules()) else None
    try:
        for p in params:
            p.requires_grad_(True)
        for p in others:
            p.requires_grad_(False)
        yield modules, params
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        for p, f in zip(others, other_flags):
            p.requires_grad_(f)
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        if restore_parametrizations is not None:
            restore_parametrizations()


# ---------------------------------------------------------------------- the batches
_BATCH_HELP = ("pass a DataLoader, a list of batches [(x1, y1), (x2, y2), ...], or one mini-batch "
               "as a tuple (inputs, targets, ...), a tensor of inputs or a dict of tensors")


def _one_batch(batch):
    """A batch as the tuple of arguments of ``function(*batch)``."""
    if isinstance(batch, (tuple, list)):
        if len(batch) == 0:
            raise ValueError(f"a batch is empty ({type(batch).__name__} of length 0): it has no "
                             f"inputs; {_BATCH_HELP}")
        return _refuse_no_examples(tuple(batch))
    return _refuse_no_examples((batch,))


def _refuse_no_examples(batch):
    """``batch`` unless its inputs hold 0 examples (a first dimension of size 0, e.g.
    ``(X[:0], y[:0])``): refused with a ``ValueError``, since an empty batch has no statistics
    and would otherwise fail deep inside the computation."""
    n = _leading_size(batch[0])
    first = batch[0]
    if isinstance(first, Mapping):
        # the examples are in whichever value is batched: empty only if every one is
        batched = [v for v in first.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
        first = next(iter(batched), None)
        n = 0 if batched and all(v.shape[0] == 0 for v in batched) else None
    if n == 0 and isinstance(first, torch.Tensor) and first.dim() > 0:
        raise ValueError(
            f"a batch holds 0 examples (inputs of shape {tuple(first.shape)}): nngeometry "
            "computes from the examples of every batch, so drop empty batches before passing "
            "them (e.g. filter them out of the list, or keep the DataLoader's batch_size > 0)")
    return batch


def _looks_like_batches(examples):
    """Whether the tuple ``examples`` is several batches ``((x1, y1), (x2, y2), ...)`` rather
    than one mini-batch: two or more tuples or lists of tensors, of one length, holding at each
    position tensors of one dtype and one shape after the first dimension (one mini-batch never
    has that shape: its elements are its inputs and targets)."""
    if len(examples) < 2 or not all(isinstance(b, (tuple, list)) and b for b in examples):
        return False
    first = examples[0]
    if any(len(b) != len(first) for b in examples):
        return False
    for j in range(len(first)):
        ts = [b[j] for b in examples]
        if not all(isinstance(t, torch.Tensor) and t.dim() > 0 for t in ts):
            return False
        if any(t.dtype != ts[0].dtype or t.shape[1:] != ts[0].shape[1:] for t in ts):
            return False
    return True


def _refuse_ambiguous_list(examples):
    """``ValueError`` for a list of tensors that may be one mini-batch ``[inputs, targets]`` (as
    a DataLoader yields it) or several batches of inputs ``[x1, x2, ...]``: reading it the wrong
    way silently uses the first batch only. Ambiguous: two or more tensors of one dtype and one
    number of dimensions whose shapes are those of batches of one kind (same shape after the
    first dimension, or different first dimensions, which one mini-batch cannot have)."""
    if len(examples) < 2 or not all(isinstance(t, torch.Tensor) for t in examples):
        return
    first = examples[0]
    if any(t.dtype != first.dtype or t.dim() != first.dim() for t in examples) or first.dim() == 0:
        return
    same_rest = all(t.shape[1:] == first.shape[1:] for t in examples)
    sizes_differ = any(t.shape[0] != first.shape[0] for t in examples)
    if same_rest or sizes_differ:
        shapes = ", ".join(str(tuple(t.shape)) for t in examples[:4])
        more = ", ..." if len(examples) > 4 else ""
        raise ValueError(
            f"examples is a list of {len(examples)} tensors of shapes [{shapes}{more}]: it may be "
            f"one mini-batch [inputs, targets, ...] or {len(examples)} batches of inputs, and "
            "nngeometry cannot tell which. Pass one mini-batch as a tuple (inputs, targets), or "
            "several batches as a list of tuples [(x1,), (x2,), ...] or a DataLoader")


def iterate_batches(examples):
    """Yield batches as tuples of arguments for ``function(*batch)``.

    ``examples`` is

    * a ``DataLoader`` or any other iterable of batches (not a tuple, list, tensor or dict);
    * a list of batches ``[(x1, y1), (x2, y2), ...]``: a list whose elements are all tuples,
      lists or dicts is iterated like a loader;
    * a single mini-batch: a tuple ``(inputs, targets, ...)``, a tensor of inputs, a dict (e.g.
      a Hugging Face batch), or a list of tensors ``[inputs, targets, ...]`` (what a DataLoader
      yields). A list of tensors that could as well be several batches of inputs (see
      ``_refuse_ambiguous_list``) is refused: pass a tuple for one mini-batch.

    Empty examples (``()``, ``[]``, an empty batch, a batch of 0 examples such as
    ``(X[:0], y[:0])``) raise a ``ValueError``, and so does a tuple of batches
    ``((x1, y1), (x2, y2))`` (see ``_looks_like_batches``: a tuple is one mini-batch).
    """
    if isinstance(examples, list) and examples and all(
            isinstance(b, (tuple, list, Mapping)) for b in examples):
        for batch in examples:
            yield _one_batch(batch)
    elif isinstance(examples, (tuple, list)):
        if len(examples) >= 2 and all(isinstance(b, Mapping) for b in examples):
            # one mini-batch (inputs, targets) never has two dicts: several dict batches, of
            # which only the first would be used
            raise ValueError(
                f"examples is a tuple of {len(examples)} dicts: nngeometry reads a tuple as one "
                "mini-batch (inputs, targets, ...), whose inputs would be the first dict only. "
                "Pass several dict batches as a list [batch1, batch2, ...] or a DataLoader, or "
                "one batch as the dict itself")
        if len(examples) == 0:
            raise ValueError(f"examples is an empty {type(examples).__name__}: there is no data "
                             f"to compute from; {_BATCH_HELP}")
        if isinstance(examples, tuple) and _looks_like_batches(examples):
            # read as one mini-batch, its inputs would be the first batch (x1, y1) itself
            raise ValueError(
                f"examples is a tuple of {len(examples)} batches (each a "
                f"{type(examples[0]).__name__} of {len(examples[0])} tensors): nngeometry reads "
                "a tuple as one mini-batch (inputs, targets, ...), whose inputs would be the "
                "first batch. Pass several batches as a list [(x1, y1), (x2, y2), ...] or a "
                "DataLoader, or one mini-batch as (inputs, targets); a mini-batch whose inputs "
                "and targets are themselves tuples ((x1, x2), (t1, t2)) goes in a list of one "
                "batch: [((x1, x2), (t1, t2))]")
        if isinstance(examples, list):
            _refuse_ambiguous_list(examples)
        yield _refuse_no_examples(tuple(examples))
    elif isinstance(examples, (torch.Tensor, Mapping)):
        yield _refuse_no_examples((examples,))
    elif isinstance(examples, DataLoader) or hasattr(examples, "__iter__"):
        for batch in examples:
            yield _one_batch(batch)
    else:
        raise TypeError(f"examples must be a DataLoader or a single mini-batch, got "
                        f"{type(examples).__name__}; {_BATCH_HELP}")


def to_device(obj, device, dtype=None):
    """Move tensors (possibly nested in tuples, lists or dicts) to ``device``; with ``dtype``,
    also cast the real floating-point ones to it (the model's dtype: float32 data for a float64
    model). Integer tensors (token ids, labels) are never cast, complex ones neither. Tensors
    created under ``torch.inference_mode()`` are copied to normal tensors, which autograd can
    save for the backward pass."""
    if isinstance(obj, torch.Tensor):
        if dtype is not None and obj.is_floating_point() and obj.dtype != dtype:
            obj = obj.to(device=device, dtype=dtype)
        else:
            obj = obj.to(device)
        if obj.is_inference():
            with torch.inference_mode(False):
                obj = obj.clone()
        return obj
    if isinstance(obj, Mapping):
        return {k: to_device(v, device, dtype) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(v, device, dtype) for v in obj)
    return obj


def _float_tensors(obj):
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() or obj.is_complex():
            yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _float_tensors(v)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from _float_tensors(v)


def all_finite(t):
    """Whether every entry of the floating-point tensor ``t`` is finite.

    A NaN or ±Inf entry makes the sum NaN or ±Inf, so a finite sum proves the tensor finite: one
    reduction without temporaries, about 25x cheaper than ``isfinite(t).all()`` (which builds two
    boolean tensors) on a batch of MNIST-sized inputs. Only a non-finite sum (a bad entry, or an
    overflow of finite entries) takes the exact check.
    """
    if t.numel() == 0:
        return True
    s = t.sum().item()  # a Python scalar: cmath/math checks cost less than a tensor op
    if cmath.isfinite(s) if isinstance(s, complex) else math.isfinite(s):
        return True
    return bool(torch.isfinite(t).all())


#: the finiteness checks recorded on accelerators inside deferred_finite_checks (per thread)
_DEFERRED = threading.local()


@contextlib.contextmanager
def deferred_finite_checks():
    """Within the block, `check_finite` on a tensor that is not on the CPU records a
    device-side flag instead of reading the answer at once: reading it is a host
    synchronisation, which once per batch stalls a GPU's queue. On leaving the block normally
    the flags are read together (one synchronisation per pass) and the first failure raises
    its ``ValueError``. (A NaN may then reach the statistics before the error; the error is the
    same.) CPU tensors are checked at once, as outside the block."""
    outer = getattr(_DEFERRED, "pending", None)
    pending = _DEFERRED.pending = []
    try:
        yield
    finally:
        _DEFERRED.pending = outer
    if pending:
        flags = torch.stack([f.to(pending[0][0].device) for f, _ in pending])
        if not bool(flags.all()):  # the one synchronisation
            raise ValueError(pending[int(torch.nonzero(~flags)[0, 0])][1])


def check_finite(t, message):
    """``ValueError(message)`` if the floating-point tensor ``t`` holds a NaN or an Inf; on an
    accelerator inside `deferred_finite_checks`, when the block ends."""
    pending = getattr(_DEFERRED, "pending", None)
    if pending is not None and t.device.type != "cpu":
        if t.numel():
            pending.append((torch.isfinite(t).all(), message))
        return
    if not all_finite(t):
        raise ValueError(message)


def prepare_batch(batch, device, dtype=None):
    """Move the batch to ``device`` (and its floating-point tensors to ``dtype``, see
    `to_device`) and refuse NaN or Inf in its floating-point tensors (they would otherwise
    give NaN statistics, or none of the error, e.g. behind a saturating tanh)."""
    batch = to_device(batch, device, dtype)
    for t in _float_tensors(batch):
        check_finite(t, "the data contain NaN or Inf (in a batch tensor of shape "
                        f"{tuple(t.shape)}); clean or impute the inputs before computing the "
                        "matrix")
    return batch


def _describe(obj):
    if isinstance(obj, torch.Tensor):
        return f"Tensor{tuple(obj.shape)}"
    return type(obj).__name__


def check_outputs(out, source="function"):
    """``out`` if it is a tensor; otherwise a ``TypeError`` that says what it is and how to
    choose the tensor to differentiate (``function=``). ``source`` names what returned it."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        keys = list(out)[:6]
        inner = ", ".join(f"{k!r}: {_describe(out[k])}" for k in keys)
        pick = f"model(x)[{keys[0]!r}]" if keys else "model(x)[key]"
        raise TypeError(
            f"{source} returns a {type(out).__name__} {{{inner}}}, not a tensor: nngeometry "
            f"differentiates one tensor of outputs (n, ...). Choose it with function=, e.g. "
            f"function=lambda x, *rest: {pick}")
    if isinstance(out, (tuple, list)):
        inner = ", ".join(_describe(o) for o in out[:6])
        raise TypeError(
            f"{source} returns a {type(out).__name__} ({inner}), not a tensor: nngeometry "
            "differentiates one tensor of outputs (n, ...). Choose it with function=, e.g. "
            "function=lambda x, *rest: model(x)[0] for the first element")
    raise TypeError(f"{source} must return a tensor of outputs (n, ...), got "
                    f"{type(out).__name__}; choose it with function=")


def _leading_size(x):
    """The first dimension of the model's input (the first tensor of a dict), or None."""
    if isinstance(x, Mapping):
        x = next((v for v in x.values() if isinstance(v, torch.Tensor)), None)
    if not isinstance(x, torch.Tensor):
        return None
    return x.shape[0] if x.dim() > 0 else 0


def default_function(model, target_key="labels"):
    """``model(inputs)`` for batches ``(inputs, targets, ...)``; for dict batches (Hugging Face
    style, ``{'input_ids': ..., 'attention_mask': ..., 'labels': ...}``) ``model(**inputs)``
    with every key but ``target_key`` (the targets, ``'labels'``: passing them would make a
    Hugging Face model compute its loss, and they are not an input).

    Hugging Face style outputs with a ``logits`` attribute are reduced to the logits. Other
    non-tensor outputs (tuples, dicts) are refused (``TypeError`` naming ``function=``), and so
    are outputs whose first dimension is not the inputs' (``ValueError``): an input without its
    batch dimension (one example ``x`` of shape ``(d,)`` instead of ``(1, d)``), or a model
    that puts the batch elsewhere, would otherwise give a matrix of the wrong examples.
    """
    def function(*batch):
        first = batch[0]
        if isinstance(first, Mapping):
            inputs = {k: v for k, v in first.items() if k != target_key}
            try:
                out = model(**inputs)
            except TypeError as e:
                # only the call's own refusal of a key, not a TypeError from inside forward
                if "unexpected keyword argument" not in str(e) or \
                        not any(repr(k) in str(e) for k in inputs):
                    raise
                raise _dict_keys_error(model, first, target_key, e) from e
        else:
            out = model(first)
        if hasattr(out, "logits"):
            out = out.logits
            # Hugging Face logits are (batch, [tokens,] classes): the class axis is the last,
            # read by the likelihoods' transforms (nngeometry.curvature.output_class_dim)
            function.output_class_dim = -1
        check_outputs(out, "the model")
        if isinstance(first, Mapping):
            # any batched value may come first (position_ids of shape (1, T), a 0-dim flag):
            # the outputs must have the first dimension of one of them
            sizes = {v.shape[0] for v in first.values()
                     if isinstance(v, torch.Tensor) and v.dim() > 0}
            bad = bool(sizes) and (out.dim() == 0 or out.shape[0] not in sizes)
        else:
            n = _leading_size(first)
            bad = n is not None and (out.dim() == 0 or out.shape[0] != n)
        if bad:
            shape = tuple(first.shape) if isinstance(first, torch.Tensor) else \
                "(" + ", ".join(f"{k}: {tuple(v.shape)}" for k, v in first.items()
                                if isinstance(v, torch.Tensor)) + ")"
            raise ValueError(
                f"the model's outputs have shape {tuple(out.shape)} for inputs of shape {shape}: "
                "the first dimension of the inputs and of the outputs must be the batch (n "
                "examples). For one example add its batch dimension (x.unsqueeze(0), i.e. "
                "x[None]); for a model that puts the batch elsewhere (e.g. sequence first) pass "
                "function= returning outputs (n, ...)")
        return out
    # the same computation for every call on this model (see passes.uses_key)
    function.nngeometry_default_of = model
    return function


def _dict_keys_error(model, batch, target_key, error):
    """The ``TypeError`` for a dict batch whose keys are not the model's keyword arguments
    (e.g. ``{'x': ..., 'y': ...}`` for a model ``forward(self, x)`` called as
    ``model(x=..., y=...)``): it says how nngeometry reads a dict and how to map the keys."""
    keys = list(batch)
    inputs = [k for k in keys if k != target_key]
    x_key = inputs[0] if inputs else "x"
    y_key = target_key if target_key in batch else (inputs[1] if len(inputs) > 1 else None)
    name = type(model).__name__
    how = f"function=lambda b: model(b[{x_key!r}])"
    if y_key is not None and y_key != target_key:
        how += f" and target_key={y_key!r} (the key of the targets, for the losses that use them)"
    return TypeError(
        f"the batches are dicts with keys {keys}, which nngeometry passes as keyword arguments, "
        f"model(**batch) without the key target_key={target_key!r} (Hugging Face style); "
        f"{name}.forward does not take them ({error}). Map the keys yourself: pass {how}, or "
        "yield batches (inputs, targets) (or, for a model that takes keywords, drop the keys "
        "its forward does not take)")


def batch_size_of(batch):
    """The number of examples of ``batch``: the first dimension of its first tensor; for a
    dict, the largest first dimension of its values (those not batched, such as position_ids of
    shape ``(1, T)`` or a 0-dim flag, may come first)."""
    first = batch[0]
    if isinstance(first, Mapping):
        sizes = [v.shape[0] for v in first.values() if isinstance(v, torch.Tensor) and v.dim()]
        if sizes:
            return max(sizes)
        first = next(iter(first.values()))
    return first.shape[0]


# ---------------------------------------------------------------------- deterministic and finite
def random_in_vmap_explained(method):
    """Products vmapped over many vectors (``torch.func.vmap``) refuse a forward that draws
    random numbers with torch's own message about vmap's randomness flags; say what it means
    for the user's model instead."""
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except RuntimeError as e:
            if "randomness error mode" not in str(e):
                raise
            raise RuntimeError(
                "the function is not deterministic: its forward draws random numbers (a "
                "dropout module in training mode, F.dropout(x, p, training=True), or torch.rand "
                "/ torch.randn noise in forward), which makes every matrix random. Call "
                "model.eval(), make that randomness follow the module's mode "
                "(F.dropout(x, p, training=self.training), or nn.Dropout)") from e
    return wrapper


def _refuse_inference_parameters(tensors):
    """Parameters created inside ``torch.inference_mode()`` can't take part in autograd."""
    for name, t in tensors.items():
        if torch.is_inference(t):
            raise RuntimeError(
                f"the model's parameter '{name}' is an inference tensor (the model was created "
                "or loaded inside torch.inference_mode()): autograd, which the implicit products "
                "need, can't use it. Create or load the model outside inference mode, or clone "
                "its parameters outside it")


def _flat(v):
    """The flat ``(P,)`` tensor of a PVector or a tensor."""
    return v.get_flat_representation() if hasattr(v, "get_flat_representation") else v


_BACKWARD_NONFINITE = (
    "although the model's outputs are finite: a gradient became NaN or Inf in the backward "
    "pass, at an operation that is not differentiable where it is evaluated (e.g. "
    "torch.sqrt(h * h) or h.abs() ** 0.5 at h = 0, torch.where whose unused branch has an "
    "infinite gradient) or that overflows. Find it with "
    "torch.autograd.set_detect_anomaly(True) on a backward pass of the model, and make it "
    "differentiable there (e.g. torch.sqrt(h * h + eps))")


def _nonfinite_layers(result, layer_collection):
    """The ids of the layers whose part of ``result`` (a tensor whose last dimension is the
    collection's ``P``, or a dict keyed by layer id) holds a NaN or an Inf."""
    if isinstance(result, dict):
        bad = []
        for lid, part in result.items():
            if any(not bool(torch.isfinite(t).all()) for t in _tensor_leaves(part)):
                bad.append(lid)
        return bad
    if torch.is_tensor(result) and result.dim() and \
            result.shape[-1] == layer_collection.numel():
        P = result.shape[-1]
        # a dense (P, P) matrix: a layer's bad gradients also spoil its rows in the other
        # layers' columns; its diagonal says whose they are
        part = torch.diagonal(result) if result.shape == (P, P) else result
        ok = torch.isfinite(part).reshape(-1, P).all(dim=0)
        return [lid for lid in layer_collection.layer_ids()
                if not bool(ok[layer_collection.slice(lid)].all())]
    return []


def _tensor_leaves(obj):
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensor_leaves(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in _tensor_leaves(v)]
    return []


def check_statistic(result, layer_collection):
    """``ValueError`` naming the layers if the statistic ``result`` of a pass (whose outputs
    were checked finite) holds a NaN or an Inf: checked once per pass, one host
    synchronisation on an accelerator."""
    leaves = [t for t in _tensor_leaves(result) if t.is_floating_point() and t.numel()]
    if not leaves:
        return
    if leaves[0].device.type == "cpu":
        ok = all(all_finite(t) for t in leaves)
    else:
        ok = bool(torch.stack([torch.isfinite(t).all() for t in leaves]).all())
    if ok:
        return
    lids = _nonfinite_layers(result, layer_collection)
    where = f" of layer(s) {', '.join(repr(lid) for lid in lids)}" if lids else ""
    raise ValueError(f"the statistics{where} contain NaN or Inf " + _BACKWARD_NONFINITE)


def _check_product(out, inp, what):
    """``ValueError`` if an implicit product ``out`` holds a NaN or an Inf (one check per
    product, i.e. per pass over the examples)."""
    if not torch.is_tensor(out) or not out.is_floating_point() or all_finite(out):
        return
    t = _flat(inp) if hasattr(inp, "get_flat_representation") else inp
    if torch.is_tensor(t) and t.is_floating_point() and not all_finite(t):
        raise ValueError(f"{what}: the vector multiplied contains NaN or Inf")
    raise ValueError(f"{what}: the product contains NaN or Inf " + _BACKWARD_NONFINITE)


def _rng_state(device):
    """The global RNG state that a forward on ``device`` draws from: the CPU generator's, and
    the device's generator's for an accelerator."""
    state = [torch.get_rng_state()]
    if device.type == "cuda":
        state.append(torch.cuda.get_rng_state(device))
    return state


def _same_rng(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def _random_outside_modules(diff, scale):
    return (
        f"the function is not deterministic: run twice on the same batch its outputs differ by "
        f"up to {diff:.3g} (largest output {scale:.3g}), and every module is in eval mode: the "
        "forward draws from the global random number generator outside a module's training "
        "mode (e.g. F.dropout(x, p, training=True), or noise from torch.rand / torch.randn in "
        "forward), which makes every matrix random. Make that randomness follow the module's "
        "mode (F.dropout(x, p, training=self.training), or nn.Dropout), or pass "
        "check_deterministic=False if the randomness is intended")


def first_random_module(model):
    """``(name, module, p)`` of the first module of ``model`` that draws random numbers in its
    forward (a dropout module, ``nn.Dropout``, ``Dropout1d/2d/3d``, ``AlphaDropout``,
    ``FeatureAlphaDropout``, or an ``nn.MultiheadAttention`` with ``dropout > 0``, in training
    mode), or None. ``name`` is its qualified name (its class name for the model itself)."""
    for name, module in model.named_modules():
        if not module.training:
            continue
        if isinstance(module, nn.modules.dropout._DropoutNd):
            p = module.p
        elif isinstance(module, nn.MultiheadAttention):
            p = module.dropout
        else:
            continue
        if p > 0:
            return name or type(module).__name__, module, p
    return None


_RANDOM_MATRIX = ("the matrix would be a random one (per-example quantities need a "
                  "deterministic forward). Call model.eval() before computing the matrix, or "
                  "pass check_deterministic=False if this is intended")


def refuse_random_modules(model, consequence=_RANDOM_MATRIX):
    """``RuntimeError`` naming the first module of ``model`` that draws random numbers in its
    forward (see `first_random_module`). Such a model gives a random matrix at each call,
    whose mean is not the matrix of the model used for prediction (in eval mode).
    ``consequence``: the end of the message, what the randomness would do and the fixes."""
    found = first_random_module(model)
    if found is not None:
        name, module, p = found
        raise RuntimeError(
            f"module '{name}' ({type(module).__name__}, p={p}) is in training mode: its "
            f"forward is random, so {consequence}")


def probe_deterministic(function, model, device, batch, raw, rng_consumed=False):
    """``RuntimeError`` if the model part of ``function`` (the generator's: a function of the
    batch, or an output transform) gives other outputs than ``raw`` on ``batch`` when run again
    (without gradients, hooks paused). The probe runs on a forked RNG (the CPU's and the
    ``device``'s when it is a CUDA device): the global RNG state is as if it had not run, and a
    random model draws other numbers than in the first run."""
    fn = function
    fn = fn.function if hasattr(fn, "model_outputs") and hasattr(fn, "split") else fn
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad(), recording_paused(), \
            _no_fused_attention():
        again = fn(*batch)
    if not isinstance(again, torch.Tensor) or again.shape != raw.shape:
        shape = tuple(again.shape) if isinstance(again, torch.Tensor) else type(again).__name__
        raise RuntimeError(
            f"the function is not deterministic: run twice on the same batch it returned "
            f"outputs of shape {tuple(raw.shape)}, then {shape}. Call model.eval(), or pass "
            "check_deterministic=False if this is intended")
    ref = raw.detach()
    if not ref.is_floating_point() or ref.numel() == 0:
        return
    # the second run differs by round-off only where kernels differ between grad and
    # no-grad modes: a tolerance of a few dozen ulps of the largest output
    tol = 64 * torch.finfo(ref.dtype).eps
    diff = (again - ref).abs().max().item()
    scale = ref.abs().max().item()
    if not diff <= tol * max(scale, torch.finfo(ref.dtype).tiny):
        if rng_consumed and not any(m.training for m in model.modules()):
            raise RuntimeError(_random_outside_modules(diff, scale))
        raise RuntimeError(
            f"the function is not deterministic: run twice on the same batch its outputs "
            f"differ by up to {diff:.3g} (largest output {scale:.3g}); a random layer "
            "(dropout or another stochastic module in training mode?) makes every matrix "
            "random. Call model.eval() before computing the matrix, or pass "
            "check_deterministic=False if the randomness is intended")


def probe_functional(model, f, params, device):
    """``RuntimeError`` if ``f(params)`` (the forward of an implicit product) gives other
    outputs when run twice (on a forked RNG: the global state is left as it was)."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad(), _no_fused_attention():
        a, b = f(params), f(params)
    if not torch.is_floating_point(a) or a.numel() == 0:
        return
    diff = (a - b).abs().max().item()
    scale = a.abs().max().item()
    if not diff <= 64 * torch.finfo(a.dtype).eps * max(scale, torch.finfo(a.dtype).tiny):
        if any(m.training for m in model.modules()):
            raise RuntimeError(
                f"the function is not deterministic: run twice on the same batch its "
                f"outputs differ by up to {diff:.3g} (largest output {scale:.3g}); a random "
                "layer in training mode makes every product random. Call model.eval(), or "
                "pass check_deterministic=False if the randomness is intended")
        raise RuntimeError(_random_outside_modules(diff, scale))
