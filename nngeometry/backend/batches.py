"""Turning what the user passes as ``examples`` into batches on the right device."""
from collections.abc import Mapping

import torch
from torch.utils.data import DataLoader


def iterate_batches(examples):
    """Yield batches as tuples of arguments for ``function(*batch)``.

    ``examples`` is a ``DataLoader`` (or any iterable of batches), or a single mini-batch: a tuple
    or list ``(inputs, targets, ...)``, a tensor of inputs, or a dict (e.g. a Hugging Face batch).
    """
    if isinstance(examples, (tuple, list)):
        yield tuple(examples)
    elif isinstance(examples, (torch.Tensor, Mapping)):
        yield (examples,)
    elif isinstance(examples, DataLoader) or hasattr(examples, "__iter__"):
        for batch in examples:
            if isinstance(batch, (tuple, list)):
                yield tuple(batch)
            else:
                yield (batch,)
    else:
        raise TypeError(
            f"examples must be a DataLoader or a single mini-batch (tuple of tensors, tensor or "
            f"dict), got {type(examples).__name__}")


def to_device(obj, device):
    """Move tensors (possibly nested in tuples, lists or dicts) to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def default_function(model):
    """``model(inputs)`` for batches ``(inputs, targets, ...)``; ``model(**batch)`` for dicts.

    Hugging Face style outputs with a ``logits`` attribute are reduced to the logits.
    """
    def function(*batch):
        first = batch[0]
        out = model(**first) if isinstance(first, Mapping) else model(first)
        if hasattr(out, "logits"):
            out = out.logits
        return out
    return function


def batch_size_of(batch):
    first = batch[0]
    if isinstance(first, Mapping):
        first = next(iter(first.values()))
    return first.shape[0]
