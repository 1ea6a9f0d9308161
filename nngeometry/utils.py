"""Small helpers on parameter-space objects: gradients as PVectors, correlation plots."""
import torch

from .object.vector import PVector


def grad(output, vec, *args, **kwargs):
    """The gradient of the scalar ``output`` with respect to the tensors held by the PVector
    ``vec``, as a PVector with the same layer collection and layout.

    ``vec`` must hold the tensors of the graph themselves, per layer (its dictionary form,
    e.g. ``PVector.from_model(model)``, whose tensors are the model's parameters): a vector
    given by a flat tensor is a new tensor, which ``output`` does not depend on, and is refused
    with a ``RuntimeError``. ``*args`` / ``**kwargs`` go to ``torch.autograd.grad``
    (e.g. ``retain_graph=True``); with ``allow_unused=True`` unused tensors get zero gradients.
    """
    parts = getattr(vec, "dict_repr", None)
    if parts is None:
        raise RuntimeError(
            "grad needs a PVector that holds the graph's tensors per layer (e.g. "
            "PVector.from_model(model)); this one was built from a flat tensor, which the output "
            "does not depend on")
    layer_ids = list(parts.keys())
    tensors = [t for lid in layer_ids for t in parts[lid]]
    grads = torch.autograd.grad(output, tensors, *args, **kwargs)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, tensors)]
    out, i = {}, 0
    for lid in layer_ids:
        k = len(parts[lid])
        out[lid] = tuple(grads[i:i + k])
        i += k
    return PVector(vec.layer_collection, dict_repr=out)


def display_correl(M, axis):
    """Show on the matplotlib ``axis`` (``None``: the current axes) the absolute correlations
    ``|M_ij| / sqrt((M_ii + δ)(M_jj + δ))`` of the parameter-space matrix ``M`` (anything with
    ``to_torch()``, or a ``(P, P)`` tensor), with ``δ = mean_i(M_ii) / 100`` so that
    parameters with a (near) zero diagonal do not divide by zero. Returns the ``(P, P)``
    correlation tensor (on the CPU)."""
    dense = M.to_torch() if hasattr(M, "to_torch") else M
    d = torch.diagonal(dense)
    scale = torch.sqrt(d + d.mean() / 100)
    correl = (dense.abs() / scale.unsqueeze(0) / scale.unsqueeze(1)).detach().cpu()
    if axis is None:
        try:
            import matplotlib.pyplot as plt
        except ImportError as e:
            raise ImportError("display_correl(M, None) draws on matplotlib's current axes: "
                              "install matplotlib (pip install matplotlib) or pass an axis")\
                from e
        axis = plt.gca()
    axis.imshow(correl)
    return correl


__all__ = ["grad", "display_correl"]
