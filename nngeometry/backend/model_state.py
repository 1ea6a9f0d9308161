"""What the engine does to the user's model during a computation, and how it puts it back.

The module it works on (`unwrap_model`: the one inside a ``DistributedDataParallel`` /
``DataParallel`` wrapper), one lock per model (`model_lock`: a build or an implicit product on a model runs alone, across
threads; `in_engine_pass` tells whether this thread is inside one), the model's parameters
swapped for functional tensors (`tensors_in_model`, what the ``torch.func`` products
differentiate through), the fused attention kernels turned off (`_no_fused_attention`), the
checks that a model can give per-example quantities at all (BatchNorm on batch statistics,
parameters of one dtype and device), and the parameters' ``requires_grad`` flags and buffers
kept as they were (`model_state_kept`).
"""
import contextlib
import threading
import weakref

import torch
from torch import nn

from torch.nn.utils import parametrize

from ..layer_types.base import AbstractLayer, layer_type_for
from ..layer_types.parametrized import parametrizations_prepared


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
