"""Checks shared by the representations' ``from_statistics``: a statistic computed on another
layer collection, or of another shape, is refused with what was expected, instead of a matrix
that silently mixes layouts."""
import torch


def check_tensor(owner, statistics, shape, what):
    """``statistics`` is a tensor of ``shape`` (``None`` entries: any size)."""
    if not torch.is_tensor(statistics):
        raise TypeError(f"{owner}.from_statistics: expected {what} as a tensor, got "
                        f"{type(statistics).__name__}")
    if statistics.dim() != len(shape) or any(
            s is not None and s != t for s, t in zip(shape, statistics.shape)):
        want = ", ".join("·" if s is None else str(s) for s in shape)
        raise ValueError(f"{owner}.from_statistics: {what} must have shape ({want}) for this "
                         f"layer collection, got {tuple(statistics.shape)}; compute it on the "
                         "same LayerCollection")


def check_layers(owner, layer_collection, statistics, what):
    """``statistics`` is a dict with one entry per layer of ``layer_collection``."""
    if not isinstance(statistics, dict):
        raise TypeError(f"{owner}.from_statistics: expected {what} as a dict over layers, got "
                        f"{type(statistics).__name__}")
    ids = layer_collection.layer_ids()
    if set(statistics) != set(ids):
        raise ValueError(f"{owner}.from_statistics: {what} has layers {sorted(statistics)}, the "
                         f"layer collection {sorted(ids)}; compute it on the same "
                         "LayerCollection")
