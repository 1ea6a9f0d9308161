"""Entry point: the exact Hessian of a loss summed over the batches."""
from ._entry import check_representation, prepare_entry
from .backend import HessianBackend
from .backend.torch_func_hessian import loss_of_targets


def Hessian(model, loader, representation, function=None, layer_collection=None, verbose=False,
            loss_function=None, device=None, output_function=None, check_deterministic=True,
            **kwargs):
    """The Hessian of the total loss, ``H = Σ_b ∇²_θ ℓ_b`` (a sum over the batches of the
    loader, not a mean), in the chosen representation.

    The loss of batch ``b = (x, y, ...)`` is, by priority:

    * ``function(prediction, y)`` with ``prediction = model(x)`` (upstream nngeometry's
      meaning of ``function``: a loss of the outputs and the targets ``batch[1]``);
    * ``loss_function(outputs, *batch)`` with ``outputs = output_function(*batch)`` (default
      ``model(batch[0])``), for losses that need the whole batch;
    * by default the cross-entropy of ``model(x)`` against ``y`` summed over the examples
      (``reduction='sum'``): ``H`` is then the Hessian of ``Σ_x -log p(y|x)`` over the data
      set, i.e. ``n`` times the mean-loss Hessian.

    Use a summed reduction in a custom loss for the Hessian of the total loss. Unlike a Fisher
    matrix ``H`` contains the second derivatives of the network itself and may be indefinite.

    Built from Hessian-vector products (forward-over-reverse ``torch.func``): supported
    representations are ``PMatDense`` (``P`` HVPs per batch), ``PMatBlockDiag`` and ``PMatDiag``
    (exact diagonal blocks / diagonal, ``P`` HVPs per batch), ``PMatImplicit`` (one HVP per batch
    and product; its CG ``solve`` needs ``H + regul·I`` positive definite) and ``PMatMixed``
    groups of those. KFAC, EKFAC, LowRank and QuasiDiag approximate a Gauss-Newton matrix
    ``Σ JᵀJ`` and raise ``NotImplementedError``.

    Args:
        model: the ``torch.nn.Module``.
        loader: a DataLoader (or a single mini-batch) of ``(inputs, targets, ...)``.
        representation: a ``PMat*`` class (see above).
        function: ``function(prediction, targets) -> scalar`` loss of a batch (see above).
        layer_collection: the layers to differentiate; default all layers of the model (the
            other parameters are held constant).
        verbose: show a progress bar.
        loss_function: ``loss_function(outputs, *batch) -> scalar`` (not with ``function``).
        device: kept for compatibility; batches are moved to the model's device.
        output_function: ``output_function(*batch) -> outputs`` given to ``loss_function``;
            default ``model(batch[0])``.
        check_deterministic: refuse a random model (dropout modules in training mode:
            ``RuntimeError`` naming ``model.eval()``); ``False`` skips the check.
        **kwargs: passed to the representation; a keyword it does not take is refused
            (``TypeError``), and so is ``PMatEye`` without ``scaling=`` (``ValueError``: not built
            from data).
    """
    check_representation(representation, kwargs, "Hessian")
    if function is not None:
        if loss_function is not None:
            raise ValueError("pass either function(prediction, targets) or "
                             "loss_function(outputs, *batch), not both: both are the loss")
        if output_function is not None:
            raise ValueError("function(prediction, targets) receives model(batch[0]); to loss "
                             "other outputs use output_function= with loss_function=")
        loss_function = loss_of_targets(function)
    output_function, layer_collection = prepare_entry(model, output_function, layer_collection)
    generator = HessianBackend(model, loss_function=loss_function, function=output_function,
                               verbose=verbose)
    # the backend iterates the batches through its Jacobian generator, which checks the model
    generator._helper.check_deterministic = bool(check_deterministic)
    return representation(layer_collection=layer_collection, generator=generator,
                          examples=loader, **kwargs)


__all__ = ["Hessian"]
