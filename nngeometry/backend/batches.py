"""Turning what the user passes as ``examples`` into batches on the right device and dtype, and
checking what the model returns."""
import cmath
import contextlib
import math
import threading
from collections.abc import Mapping

import torch
from torch.utils.data import DataLoader

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
