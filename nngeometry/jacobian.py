"""Entry point: the per-example Jacobians of a model's outputs."""
from ._entry import prepare_entry
from .backend import TorchHooksJacobianBackend
from .object.map import PFMapDense


def Jacobian(model, loader, function=None, representation=PFMapDense, layer_collection=None,
             device=None, verbose=False, centering=False, check_deterministic=True):
    """The per-example Jacobians ``J[k, i, :] = ∂f_k(x_i)/∂θ`` of ``function`` (default: the
    model's outputs ``model(batch[0])``, flattened to ``(n, K)``), as a parameter-to-function
    map of shape ``(K, n, P)``; not normalized.

    Args:
        model: the ``torch.nn.Module``.
        loader: a DataLoader (or a single mini-batch) of ``(inputs, targets, ...)``.
        function: ``function(*batch) -> outputs (n, K)``.
        representation: the map class (default ``PFMapDense``), built with
            ``layer_collection=``, ``generator=`` and ``examples=``.
        layer_collection: the parameters to differentiate; default all layers of the model.
        device: kept for compatibility; batches are moved to the model's device.
        verbose: show a progress bar.
        centering: subtract the mean Jacobian over the whole data set from each example's.
        check_deterministic: refuse a random model (dropout in training mode, or outputs that
            differ when the model runs twice on the first batch); ``False`` skips the check.
    """
    function, layer_collection = prepare_entry(model, function, layer_collection)
    generator = TorchHooksJacobianBackend(model, function, centering=centering, verbose=verbose,
                                          layer_collection=layer_collection,
                                          check_deterministic=check_deterministic)
    return representation(layer_collection=layer_collection, generator=generator,
                          examples=loader)


__all__ = ["Jacobian"]
