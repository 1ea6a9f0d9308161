"""``.to(device / dtype)`` for the objects of ``nngeometry.object``: the arguments read as
``torch.Tensor.to`` reads them, and the recursive move of a stored state."""
import copy

import torch

from ..layercollection import LayerCollection
from ..serialization import SharedGeneratorCopy


def parse_to(args, kwargs, owner):
    """``(device, dtype, non_blocking)`` from the arguments of ``.to``: a device, a dtype, both,
    or a tensor whose device and dtype are taken (``torch.Tensor.to``'s forms); ``copy=`` is
    accepted (the result is always a new object)."""
    kwargs = dict(kwargs)
    kwargs.pop("copy", None)
    try:
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
    except TypeError as e:
        raise TypeError(f"{owner}.to takes a device, a dtype, both (e.g. .to('cuda', "
                        f"torch.float64)) or a tensor, as torch.Tensor.to: {e}") from None
    if dtype is not None and not (dtype.is_floating_point or dtype.is_complex):
        raise TypeError(f"{owner}.to(dtype={dtype}): a matrix or vector of the parameter space "
                        "holds floating-point values; pass a floating-point dtype "
                        "(torch.float32, torch.float64, ...)")
    return device, dtype, non_blocking


def move_tensor(t, device, dtype, non_blocking=False):
    """``t`` on ``device``; floating-point tensors also in ``dtype`` (integer tensors, such as
    indices, keep theirs)."""
    if dtype is not None and t.is_floating_point() and dtype.is_floating_point:
        return t.to(device=device, dtype=dtype, non_blocking=non_blocking)
    return t.to(device=device, non_blocking=non_blocking) if device is not None else t


def move_collection(lc, device, dtype):
    """A copy of the LayerCollection ``lc`` recording the new dtype / device (what
    ``random_pvector`` and friends default to); the layers are shared."""
    out = copy.copy(lc)
    if dtype is not None:
        out.dtype = dtype
    if device is not None:
        out.device = device
    return out


def move(obj, device, dtype, non_blocking=False):
    """``obj`` with every tensor moved (`move_tensor`), through dicts, lists, tuples,
    LayerCollections and the matrices and maps of ``nngeometry.object``, which have their own
    ``.to`` (e.g. the matrices of a group)."""
    if isinstance(obj, torch.Tensor):
        return move_tensor(obj, device, dtype, non_blocking)
    if isinstance(obj, LayerCollection):
        return move_collection(obj, device, dtype)
    if isinstance(obj, SharedGeneratorCopy):  # PMat*, PFMap*, FMat*
        return obj.to(device=device, dtype=dtype, non_blocking=non_blocking)
    if isinstance(obj, dict):
        return {k: move(v, device, dtype, non_blocking) for k, v in obj.items()}
    if isinstance(obj, list):
        return [move(v, device, dtype, non_blocking) for v in obj]
    if isinstance(obj, tuple):
        items = [move(v, device, dtype, non_blocking) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    return obj
