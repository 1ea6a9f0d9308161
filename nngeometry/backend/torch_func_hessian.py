"""Upstream nngeometry's module path for the Hessian generator built on ``torch.func``.

`TorchFuncHessianBackend` is `HessianBackend` with
upstream's constructor ``(model, function, verbose=False)``, where ``function(prediction,
targets)`` is the loss of a batch given the model's outputs ``model(batch[0])`` and the targets
``batch[1]`` (use a summed reduction for the Hessian of the total loss). `hvp` and
`batched_hvp` are the Hessian-vector products it is built from.
"""
from .hessian_products import HessianBackend, batched_hvp, hvp


def loss_of_targets(function):
    """Our ``loss_function(outputs, *batch)`` for upstream's ``function(prediction, targets)``
    (``targets = batch[1]``)."""
    if not callable(function):
        raise TypeError(f"function must be callable (prediction, targets) -> scalar loss, got "
                        f"{type(function).__name__}")

    def loss_function(outputs, *batch):
        if len(batch) < 2:
            raise ValueError("function(prediction, targets) needs batches (inputs, targets, ...)")
        return function(outputs, batch[1])

    return loss_function


class TorchFuncHessianBackend(HessianBackend):
    """The Hessian ``H = Σ_b ∇²_θ function(model(x_b), y_b)`` summed over the batches
    ``(x_b, y_b, ...)`` (see `HessianBackend`).

    Args:
        model: the ``torch.nn.Module``.
        function: ``function(prediction, targets) -> scalar``, the loss of a batch; ``None``:
            the cross-entropy summed over the batch.
        verbose: show a progress bar over the batches.
        **kwargs: passed to ``HessianBackend`` (``rows_per_pass``, ``function`` for the
            outputs is not accepted here: the outputs are ``model(batch[0])``).
    """

    def __init__(self, model, function=None, verbose=False, **kwargs):
        loss = None if function is None else loss_of_targets(function)
        super().__init__(model, loss_function=loss, verbose=verbose, **kwargs)

    def implicit_mmap(self, pfmap, examples, layer_collection):
        """``(K, n, P)`` tensor: ``H`` applied to each row ``pfmap[k, i, :]`` of a map
        (a ``PFMap*`` object or a ``(K, n, P)`` tensor); one vmapped HVP per row and batch."""
        J = pfmap.to_torch() if hasattr(pfmap, "to_torch") else pfmap
        K, n, P = J.shape
        return self.implicit_mm(J.reshape(K * n, P), examples, layer_collection).reshape(K, n, P)


__all__ = ["TorchFuncHessianBackend", "hvp", "batched_hvp"]

# Upstream import paths: re-exports only (upstream's module exposed these through its imports)
from ..layercollection import LayerCollection  # noqa: E402,F401
